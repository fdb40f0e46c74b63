"""``lrdeploy loadtest``: closed-loop load on an Open Inference Protocol server (lrdeploy serve or Triton).

At each concurrency level, that many clients send infer requests back to back (aiohttp, keep-alive) until the
level's request count or time limit is reached; throughput counts answered requests per second, latencies
are per request (send to full response). A share of the requests can be malformed on purpose
(``malformed_share``): bad JSON, an unknown input, a wrong shape, a wrong datatype, an unknown model, a batch
over the model's maximum. Each must be refused with a 4xx; a 5xx or a dropped connection on any request is
an *error*. Loopback targets only: this measures a server on this machine, it is not a traffic generator.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from lrdeploy.errors import UserError

from .protocol import DATATYPES


def check_loopback(url: str) -> str:
    """``url`` without a trailing slash, if every address its host resolves to is a loopback address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http",) or not parts.hostname:
        raise UserError(f"URL {url!r} is not an http://HOST:PORT address", "e.g. http://127.0.0.1:8000")
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or 80, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError, ValueError) as exc:
        raise UserError(f"cannot resolve {parts.hostname!r}: {exc}", "use 127.0.0.1") from None
    addresses = {info[4][0] for info in infos}
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise UserError(f"loadtest only targets this machine (loopback); {parts.hostname} is "
                        f"{', '.join(sorted(addresses))}", "serve the model locally and use 127.0.0.1")
    return url.rstrip("/")


@dataclass
class Level:
    """One concurrency level's outcome."""

    concurrency: int
    sent: int = 0
    ok: int = 0
    rejected: int = 0  # malformed requests refused with a 4xx, as they should be
    errors: int = 0  # a 5xx, a dropped connection, a good request refused, a bad one accepted
    seconds: float = 0.0
    throughput_rps: float = 0.0
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    first_errors: list[str] = field(default_factory=list)


@dataclass
class Payload:
    path: str
    body: bytes
    headers: dict[str, str]
    malformed: bool = False


def _tensor(meta: dict[str, Any], batch: int, seq: int, rng: np.random.Generator) -> np.ndarray:
    dims = [int(d) for d in meta.get("shape") or []]
    shape = [batch if i == 0 and d < 0 else (seq if d < 0 else d) for i, d in enumerate(dims)]
    dtype = DATATYPES.get(meta.get("datatype", ""), None)
    if dtype is None or meta["datatype"] == "BYTES":
        raise UserError(f"input {meta.get('name')!r} has datatype {meta.get('datatype')!r}: loadtest sends "
                        "numeric tensors only")
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    return np.ones(shape, dtype=dtype)  # token ids / masks: 1 is valid for every vocabulary and mask


def _binary_request(inputs: list[tuple[dict[str, Any], np.ndarray]], datatype: str | None = None) -> Payload:
    header = {"inputs": [{"name": m["name"], "datatype": datatype or m["datatype"], "shape": list(a.shape),
                          "parameters": {"binary_data_size": a.nbytes}} for m, a in inputs],
              "parameters": {"binary_data_output": True}}
    text = json.dumps(header).encode()
    body = text + b"".join(np.ascontiguousarray(a).tobytes() for _, a in inputs)
    return Payload("", body, {"Inference-Header-Content-Length": str(len(text)),
                              "Content-Type": "application/octet-stream"})


def _json_request(inputs: list[tuple[dict[str, Any], np.ndarray]]) -> Payload:
    doc = {"inputs": [{"name": m["name"], "datatype": m["datatype"], "shape": list(a.shape),
                       "data": a.reshape(-1).tolist()} for m, a in inputs]}
    return Payload("", json.dumps(doc).encode(), {"Content-Type": "application/json"})


def build_payloads(metadata: dict[str, Any], *, batch: int = 1, seq: int = 16, binary: bool = True,
                   seed: int = 0) -> tuple[Payload, list[Payload]]:
    """The good request, and one of each kind of malformed request, for a model's metadata."""
    rng = np.random.default_rng(seed)
    inputs = [(m, _tensor(m, batch, seq, rng)) for m in metadata.get("inputs") or []]
    if not inputs:
        raise UserError(f"model {metadata.get('name')!r} declares no inputs")
    good = _binary_request(inputs) if binary else _json_request(inputs)
    bad: list[Payload] = [
        Payload("", b'{"inputs": [', {"Content-Type": "application/json"}),
        _json_request([({**inputs[0][0], "name": "no_such_input"}, inputs[0][1]), *inputs[1:]]),
        _json_request([(inputs[0][0], inputs[0][1][..., None]), *inputs[1:]]),  # one dimension too many
    ]
    wrong_type = "INT32" if inputs[0][0]["datatype"] != "INT32" else "FP32"
    cast = inputs[0][1].astype(DATATYPES[wrong_type])
    bad.append(_binary_request([(inputs[0][0], cast), *inputs[1:]], datatype=wrong_type)
               if len(inputs) == 1 else _json_request([({**inputs[0][0], "datatype": wrong_type}, cast),
                                                        *inputs[1:]]))
    bad.append(Payload("/v2/models/no-such-model/infer", good.body, good.headers))
    max_batch = (metadata.get("lrdeploy") or {}).get("max_batch_size")
    if isinstance(max_batch, int) and max_batch > 0 and (metadata.get("lrdeploy") or {}).get("batchable"):
        big = [(m, _tensor(m, max_batch + 1, seq, rng)) for m, _ in inputs]
        bad.append(_binary_request(big))
    for p in bad:
        p.malformed = True
    return good, bad


def _percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) * 1000.0 if values else None


async def _level(session: Any, base: str, model: str, good: Payload, bad: list[Payload], concurrency: int,
                 requests: int, max_seconds: float, malformed_every: int) -> Level:
    import aiohttp

    level = Level(concurrency)
    latencies: list[float] = []
    counter = iter(range(requests))
    infer = f"{base}/v2/models/{model}/infer"
    start = time.perf_counter()
    deadline = start + max_seconds

    def fail(message: str) -> None:
        level.errors += 1
        if len(level.first_errors) < 5:
            level.first_errors.append(message)

    async def client() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            payload = bad[(i // malformed_every) % len(bad)] if malformed_every and bad and \
                i % malformed_every == malformed_every - 1 else good
            url = base + payload.path if payload.path else infer
            level.sent += 1
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=payload.body, headers=payload.headers) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                fail(f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - t0
            level.statuses[str(status)] = level.statuses.get(str(status), 0) + 1
            if payload.malformed:
                if 400 <= status < 500:
                    level.rejected += 1
                else:
                    fail(f"a malformed request got HTTP {status}")
            elif status == 200:
                level.ok += 1
                latencies.append(elapsed)
            else:
                fail(f"a valid request got HTTP {status}")

    await asyncio.gather(*(client() for _ in range(concurrency)))
    level.seconds = time.perf_counter() - start
    level.throughput_rps = level.ok / level.seconds if level.seconds > 0 else 0.0
    level.p50_ms, level.p90_ms, level.p99_ms = (_percentile(latencies, q) for q in (50, 90, 99))
    return level


async def _run(base: str, model: str, concurrency: list[int], requests: int, max_seconds: float,
               malformed_share: float, batch: int, seq: int, binary: bool, warmup: int
               ) -> tuple[dict[str, Any], list[Level]]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=max(30.0, max_seconds))
    connector = aiohttp.TCPConnector(limit=max(concurrency) + 4)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        try:
            async with session.get(f"{base}/v2/models/{model}") as response:
                text = await response.text()
                if response.status != 200:
                    raise UserError(f"{base} does not serve model {model!r} (HTTP {response.status}: "
                                    f"{text[:200]})", "check --model against GET /v2/models/NAME")
                metadata = json.loads(text)
        except aiohttp.ClientError as exc:
            raise UserError(f"cannot reach {base}: {exc}", "start `lrdeploy serve` first") from None
        good, bad = build_payloads(metadata, batch=batch, seq=seq, binary=binary)
        every = round(1 / malformed_share) if malformed_share > 0 else 0
        if warmup:
            await _level(session, base, model, good, [], min(max(concurrency), warmup), warmup,
                         max_seconds, 0)
        levels = [await _level(session, base, model, good, bad, c, requests, max_seconds, every)
                  for c in concurrency]
    return metadata, levels


def loadtest(url: str, model: str, concurrency: list[int], *, requests: int = 1000, max_seconds: float = 60.0,
             malformed_share: float = 0.0, batch: int = 1, seq: int = 16, binary: bool = True,
             warmup: int = 50) -> dict[str, Any]:
    """Run every concurrency level against ``url`` (loopback only); the result as a JSON-ready dict."""
    base = check_loopback(url)
    if not 0 <= malformed_share <= 0.5:
        raise UserError(f"--malformed {malformed_share} must lie in [0, 0.5]", "e.g. --malformed 0.1")
    _, levels = asyncio.run(_run(base, model, concurrency, requests, max_seconds, malformed_share, batch, seq,
                                 binary, warmup))
    return {"url": base, "model": model, "requests_per_level": requests, "max_seconds": max_seconds,
            "malformed_share": malformed_share, "batch": batch, "binary": binary,
            "levels": [asdict(level) for level in levels],
            "errors": sum(level.errors for level in levels)}
