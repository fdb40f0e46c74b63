"""``lrdeploy serve``: the Open Inference Protocol (KServe v2, as Triton speaks it) over ASGI (Starlette on
uvicorn), so ``tritonclient.http`` talks to it as to a Triton server.

Endpoints: ``GET /v2`` (server metadata), ``/v2/health/live``, ``/v2/health/ready``, ``GET /v2/models/{name}``
(metadata: inputs, outputs, datatypes, shapes, and lrdeploy's manifest summary under ``lrdeploy``),
``/v2/models/{name}/ready``, ``POST /v2/models/{name}/infer`` (JSON tensors or the binary-data extension),
the same under ``/versions/1``, and ``GET /metrics`` (Prometheus).

Every client mistake is a 4xx with ``{"error": "..."}``: unknown model or version (404), malformed body,
wrong input name/datatype/shape, batch over the model's maximum (400), body over ``max_request_bytes`` (413),
an unsupported ``Content-Encoding`` (415). A 5xx means a bug or a shutdown in progress (503).

Shutdown (SIGTERM or Ctrl-C): uvicorn stops accepting connections and waits for in-flight requests to be
answered; then the batchers drain and the instances stop; the process exits 0.
"""

from __future__ import annotations

import asyncio
import gzip
import logging
import signal
import socket
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

from .metrics import CONTENT_TYPE, ServerMetrics
from .model import ServedModel, ServingConfig
from .protocol import ProtocolError, encode_infer_response, parse_infer_request

log = logging.getLogger("lrdeploy.serve")
OFFLOAD_BYTES = 1 << 20  # bodies larger than this are decoded in a worker thread, not on the event loop


def _error(message: str, status: int) -> Any:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message}, status_code=status)


def _decompress(body: bytes, encoding: str, limit: int) -> bytes:
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ProtocolError(f"Content-Encoding {encoding!r} is not supported (gzip, deflate)", 415)
    wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
    inflater = zlib.decompressobj(wbits)
    try:
        data = inflater.decompress(body, limit + 1)
    except (zlib.error, gzip.BadGzipFile):
        raise ProtocolError(f"request body is not valid {encoding} data") from None
    if len(data) > limit:
        raise ProtocolError(f"request body inflates past the {limit}-byte limit", 413)
    return data


class ModelServer:
    """Models, metrics and the ASGI app that serves them."""

    def __init__(self, models: Mapping[str, ServedModel], config: ServingConfig, *,
                 max_request_bytes: int = 64 << 20) -> None:
        self.models = dict(models)
        self.config = config
        self.max_request_bytes = max_request_bytes
        self.metrics = ServerMetrics()
        self.ready = False
        self.app = self._build_app()

    # ------------------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Build every model's instances (sessions); ready once all are up."""
        try:
            for name, model in self.models.items():
                model.start(self.config, observe=self.metrics.observer(name))
        except BaseException:
            self.stop()
            raise
        self.ready = True

    def stop(self) -> None:
        """Not ready any more; queued requests still run, then the instances stop."""
        self.ready = False
        for model in self.models.values():
            model.stop()

    # ------------------------------------------------------------------------------------------ app
    def _build_app(self) -> Any:
        from contextlib import asynccontextmanager

        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.routing import Route

        @asynccontextmanager
        async def lifespan(app: Any):  # noqa: ANN202 - Starlette's lifespan protocol
            yield
            await asyncio.to_thread(self.stop)  # after uvicorn answered every in-flight request

        async def http_error(request: Any, exc: HTTPException) -> Any:
            return _error(str(exc.detail), exc.status_code)

        get = ["GET"]
        routes = [
            Route("/v2", self._server_metadata, methods=get),
            Route("/v2/health/live", self._live, methods=get),
            Route("/v2/health/ready", self._ready, methods=get),
            Route("/v2/models/{name}", self._model_metadata, methods=get),
            Route("/v2/models/{name}/versions/{version}", self._model_metadata, methods=get),
            Route("/v2/models/{name}/ready", self._model_ready, methods=get),
            Route("/v2/models/{name}/versions/{version}/ready", self._model_ready, methods=get),
            Route("/v2/models/{name}/infer", self._infer, methods=["POST"]),
            Route("/v2/models/{name}/versions/{version}/infer", self._infer, methods=["POST"]),
            Route("/metrics", self._metrics, methods=get),
        ]
        return Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})

    def _model(self, request: Any) -> ServedModel:
        name = request.path_params["name"]
        model = self.models.get(name)
        if model is None:
            raise ProtocolError(f"unknown model {name!r} (served: {', '.join(sorted(self.models))})", 404)
        version = request.path_params.get("version")
        if version is not None and version != "1":
            raise ProtocolError(f"model {name!r} has no version {version!r} (versions: 1)", 404)
        return model

    async def _server_metadata(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        from lrdeploy import __version__

        return JSONResponse({"name": "lrdeploy", "version": __version__,
                             "extensions": ["binary_tensor_data"]})

    async def _live(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"live": True})

    async def _ready(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def _model_metadata(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            model = self._model(request)
        except ProtocolError as exc:
            return _error(exc.message, exc.status)
        return JSONResponse(model.metadata())

    async def _model_ready(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        try:
            model = self._model(request)
        except ProtocolError as exc:
            return _error(exc.message, exc.status)
        ready = self.ready and model.batcher is not None
        return JSONResponse({"name": model.name, "ready": ready}, status_code=200 if ready else 503)

    async def _metrics(self, request: Any) -> Any:
        from starlette.responses import Response

        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def _read_body(self, request: Any) -> bytes:
        limit = self.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None:
            if not declared.isdigit():
                raise ProtocolError(f"Content-Length {declared!r} is not a byte count")
            if int(declared) > limit:
                raise ProtocolError(f"request body of {declared} bytes exceeds the {limit}-byte limit "
                                    "(--max-request-bytes)", 413)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(f"request body exceeds the {limit}-byte limit (--max-request-bytes)", 413)
            chunks.append(chunk)
        body = b"".join(chunks)
        return _decompress(body, request.headers.get("content-encoding", "").strip().lower(), limit)

    async def _infer(self, request: Any) -> Any:
        from starlette.responses import Response

        start = time.perf_counter()
        name = request.path_params["name"]
        label = name if name in self.models else ""  # unknown names would make unbounded label sets
        try:
            model = self._model(request)
            body = await self._read_body(request)
            header = request.headers.get("inference-header-content-length")
            if len(body) > OFFLOAD_BYTES:
                parsed = await asyncio.to_thread(parse_infer_request, body, header)
                feeds, rows = await asyncio.to_thread(model.feeds, parsed)
            else:
                parsed = parse_infer_request(body, header)
                feeds, rows = model.feeds(parsed)
            if model.batcher is None or not self.ready:
                raise ProtocolError("the server is shutting down", 503)
            gauge = self.metrics.inflight.labels(name)
            gauge.inc()
            try:
                outputs = await asyncio.wrap_future(model.batcher.submit(feeds, rows))
            except RuntimeError as exc:
                raise ProtocolError("the server is shutting down", 503) from exc
            finally:
                gauge.dec()
            if parsed.outputs is not None:
                outputs = {n: outputs[n] for n in parsed.outputs}
            payload, headers = encode_infer_response(name, outputs, parsed)
            media = "application/octet-stream" if headers else "application/json"
            response = Response(payload, media_type=media, headers=headers)
        except ProtocolError as exc:
            response = _error(exc.message, exc.status)
        except Exception as exc:  # noqa: BLE001 - ORT refusing the values of a valid-looking input is a 400
            if type(exc).__module__.startswith("onnxruntime"):
                from .runtimes.ort_session import one_line

                response = _error(f"model {name!r} rejected the input: {one_line(exc)}", 400)
            else:
                log.exception("infer on %r failed", name)
                response = _error(f"internal error: {type(exc).__name__}: {exc}", 500)
        self.metrics.count(label, "infer", response.status_code)
        if response.status_code == 200:
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
        return response


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (port 0: a free one; ``sock.getsockname()`` says which)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def uvicorn_server(server: ModelServer, *, access_log: bool = False, graceful_s: float = 30.0) -> Any:
    import uvicorn

    config = uvicorn.Config(server.app, log_level="warning", access_log=access_log, lifespan="on",
                            timeout_graceful_shutdown=graceful_s, server_header=False)
    return uvicorn.Server(config)


def run_forever(server: ModelServer, sock: socket.socket, *, access_log: bool = False,
                on_started: Callable[[], None] | None = None) -> None:
    """Serve on ``sock`` until SIGTERM/SIGINT, then drain and return (so the process exits 0).

    uvicorn re-raises the signal it caught once it has shut down; a no-op handler installed first is what
    it restores and re-raises into, so the drain ends in a normal return instead of a kill by signal.
    """
    uv = uvicorn_server(server, access_log=access_log)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if on_started is not None:
            _call_when_started(uv, on_started)
        uv.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.stop()


def _call_when_started(uv: Any, callback: Callable[[], None]) -> None:
    import threading

    def wait() -> None:
        while not uv.started and not uv.should_exit:
            time.sleep(0.01)
        if uv.started:
            callback()

    threading.Thread(target=wait, daemon=True).start()


class BackgroundServer:
    """``with BackgroundServer(server) as url:`` — serve on a free loopback port in a thread (tests, the
    benchmark script); leaving the block shuts it down as SIGTERM would (drain, then stop)."""

    def __init__(self, server: ModelServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server
        self.sock = bind(host, port)
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        self.uv: Any = None
        self.thread: Any = None

    def __enter__(self) -> str:
        import threading

        self.server.start()
        self.uv = uvicorn_server(self.server)
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.uv.should_exit = True
        self.thread.join(60)
        self.server.stop()
        self.sock.close()
