"""`lrdeploy serve`, `lrdeploy triton` and `lrdeploy loadtest`: options, artefact resolution, output.

    lrdeploy serve dense.onnx lowrank.onnx --port 8000 --max-batch 32 --max-delay-ms 2 --instances 2
    lrdeploy triton dense.onnx lowrank.onnx --repo triton_repo
    lrdeploy loadtest http://127.0.0.1:8000 --model lowrank --concurrency 1,8,32 --requests 2000

Engine side (like ``bench_cmd``): a bundle argument is exported through the one export pipeline
(:func:`lrdeploy.artifacts.resolve_artifact` → ``export_bundle``, ``--fold auto``, tokenizer beside the graph)
into a temporary directory; ``lrdeploy.serving`` then only sees ONNX files. The server stack (starlette,
uvicorn, prometheus-client, tritonclient, aiohttp) is the ``serve`` extra, imported when a command runs.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import RenderableType
from rich.table import Table

from lrdeploy import run_record, terminal
from lrdeploy.errors import UserError
from lrdeploy.tables import fit

console = terminal.out
INSTALL_HINT = "pip install 'lrdeploy[serve]' (starlette, uvicorn, prometheus-client, tritonclient, aiohttp)"
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def require(*modules: str) -> None:
    """Import the server stack's modules now, so a missing one is one line saying what to install."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UserError(f"the serving stack is not installed ({exc})", INSTALL_HINT) from None


def model_names(artefacts: Sequence[Path], names: str | None) -> list[str]:
    """``--names`` (comma-separated), else each file's stem / bundle's folder name, made unique."""
    if names is not None:
        labels = [n.strip() for n in names.split(",")]
        if len(labels) != len(artefacts):
            raise UserError(f"--names {names!r} gives {len(labels)} names for {len(artefacts)} models",
                            "give one name per artefact, e.g. --names dense,lowrank")
    else:
        labels = []
        for path in artefacts:
            name = path.name
            base = next((name[: -len(s)] for s in (".onnx", ".plan") if name.endswith(s)), name)
            labels.append(re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-") or "model")
    bad = [n for n in labels if not MODEL_NAME.match(n)]
    if bad:
        raise UserError(f"model name {bad[0]!r} is not usable in a URL", "use letters, digits, '.', '_', '-'")
    seen: set[str] = set()
    unique = []
    for label in labels:
        name, k = label, 2
        while name in seen:
            if names is not None:
                raise UserError(f"--names repeats {label!r}", "give every model its own name")
            name, k = f"{label}-{k}", k + 1
        seen.add(name)
        unique.append(name)
    return unique


def manifest_summary(art: Any) -> dict[str, Any]:
    """What the metadata endpoint says about a model: the artefact summary, with the per-layer structure
    reduced to a count per kind (the full map can hold thousands of entries)."""
    summary = dict(art.summary())
    structure = summary.pop("structure", None) or {}
    kinds: dict[str, int] = {}
    for layer in structure.values():
        kind = str(layer.get("kind", "?")) if isinstance(layer, dict) else "?"
        kinds[kind] = kinds.get(kind, 0) + 1
    summary["layers"] = kinds
    # a path on the server's disk is nobody else's business; how figures were counted is the report's
    for key in ("source", "label", "graph", "trained"):
        summary.pop(key, None)
    return summary


@contextlib.contextmanager
def resolved(artefacts: Sequence[Path], labels: Sequence[str], figures: bool = True) -> Iterator[list[Any]]:
    """Every artefact as an ONNX file (bundles exported into a temporary directory kept for the block)."""
    from lrdeploy.artifacts import resolve_artifact

    with tempfile.TemporaryDirectory(prefix="lrdeploy-serve-") as tmp:
        yield [resolve_artifact(label, Path(p), Path(tmp), figures=figures)
               for label, p in zip(labels, artefacts, strict=True)]


# Upper bounds of integer options, checked in the command (after lrdeploy's 64-bit check on every integer
# option, so an absurd value gets the same message everywhere).
LIMITS = {"--port": 65535, "--max-batch": 65536, "--instances": 256, "--requests": 10_000_000,
          "--batch": 65536, "--seq": 65536, "--warmup": 100_000}


def at_most(**values: int) -> None:
    """``at_most(port=70000)`` → UserError when a value passes its flag's limit in :data:`LIMITS`."""
    for key, value in values.items():
        flag = "--" + key.replace("_", "-")
        if value > LIMITS[flag]:
            raise UserError(f"{flag} {value} is above its limit {LIMITS[flag]}",
                            f"e.g. {flag} {LIMITS[flag]}")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ------------------------------------------------------------------------------------------------ serve
def serve(
    artefacts: list[Path] = typer.Argument(..., help="ONNX files or bundles (exported on the fly), one model "
                                           "each."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: loopback only)."),
    port: int = typer.Option(8000, "--port", min=0, help="Port (0: any free one, printed)."),
    names: str | None = typer.Option(None, "--names", help="Model names, comma-separated (default: the file "
                                     "stems)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1,
                                  help="Largest batch a request may carry and the batcher may form."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", min=0.0, max=10_000.0,
                                       help="How long the oldest queued request waits for others to join."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Dynamic batching (off: each "
                                  "request runs alone)."),
    instances: int = typer.Option(1, "--instances", min=1, help="Sessions per model, each pinned to "
                                  "its own share of the CPUs."),
    max_request_bytes: int = typer.Option(64 << 20, "--max-request-bytes", min=1,
                                          help="Larger request bodies are refused with 413."),
    access_log: bool = typer.Option(False, "--access-log", help="Log every request (costs throughput)."),
) -> None:
    """Serve models over the Open Inference Protocol (KServe v2; tritonclient.http works unchanged)."""
    at_most(port=port, max_batch=max_batch, instances=instances)
    require("starlette", "uvicorn", "prometheus_client")
    from lrdeploy.serving.model import ServedModel, ServingConfig
    from lrdeploy.serving.server import ModelServer, bind, run_forever

    labels = model_names(artefacts, names)
    config = ServingConfig(max_batch=max_batch, max_delay_ms=max_delay_ms, batching=batching,
                           instances=instances)
    try:
        sock = bind(host, port)
    except (OSError, OverflowError) as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                        "choose another --port (0: any free one) or --host") from None
    with sock, resolved(artefacts, labels) as arts:
        models = {a.label: ServedModel.load(a.label, a.onnx_path, config, manifest_summary(a)) for a in arts}
        server = ModelServer(models, config, max_request_bytes=max_request_bytes)
        server.start()
        bound_port = sock.getsockname()[1]
        if not _is_loopback(host):
            console.print(f"[yellow]note:[/] listening on {host}: reachable from other machines, with no "
                          "authentication", highlight=False)
        for name, model in models.items():
            console.print(f"model [bold]{name}[/] ({model.path.name}): max batch {model.max_batch}, "
                          f"{instances} instance(s), batching "
                          f"{'on' if batching and model.batchable else 'off'}"
                          + (", text input (tokenizer)" if model.tokenizer is not None else ""),
                          highlight=False, soft_wrap=True)
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}"

        def started() -> None:
            terminal.result(f"serving {len(models)} model(s) on {url} (Open Inference Protocol: {url}/v2; "
                          f"metrics: {url}/metrics); SIGTERM or Ctrl-C drains and stops", highlight=False,
                          soft_wrap=True)
            sys.stdout.flush()

        run_forever(server, sock, access_log=access_log, on_started=started)
    console.print("stopped: every in-flight request was answered", highlight=False)


# --------------------------------------------------------------------------------------------- loadtest
def loadtest(
    url: str = typer.Argument(..., help="Server address on this machine, e.g. http://127.0.0.1:8000."),
    model: str = typer.Option(..., "--model", help="Model name, as GET /v2/models/NAME knows it."),
    concurrency: str = typer.Option("1,8,32", "--concurrency", help="Concurrent clients per level."),
    requests: int = typer.Option(1000, "--requests", min=1, help="Requests per level."),
    max_seconds: float = typer.Option(60.0, "--max-seconds", min=0.1, max=3600.0,
                                      help="Time limit per level (it stops early; the table says so)."),
    batch: int = typer.Option(1, "--batch", min=1, help="Rows per request."),
    seq: int = typer.Option(16, "--seq", min=1, help="Size of other dynamic axes (sequence)."),
    malformed: float = typer.Option(0.0, "--malformed", min=0.0, max=0.5, help="Share of deliberately "
                                    "malformed requests (each must get a 4xx)."),
    json_body: bool = typer.Option(False, "--json-body", help="Send JSON tensors instead of binary data."),
    warmup: int = typer.Option(50, "--warmup", min=0, help="Untimed requests first."),
    json_path: Path | None = typer.Option(None, "--json", help="Also write the result as JSON here."),
    force: bool = typer.Option(False, "--force", help="Replace an existing --json file."),
) -> None:
    """Load-test a served model: throughput, p50/p90/p99 latency, errors per concurrency (loopback only)."""
    at_most(requests=requests, batch=batch, seq=seq, warmup=warmup)
    require("aiohttp")
    from lrdeploy.bench_cmd import parse_int_list
    from lrdeploy.outputs import Outputs
    from lrdeploy.serving.loadtest import check_loopback
    from lrdeploy.serving.loadtest import loadtest as run_loadtest

    levels = parse_int_list(concurrency, "--concurrency", "1,8,32")
    check_loopback(url)
    Outputs(force=force).file(json_path, "--json")
    result = run_loadtest(url, model, levels, requests=requests, max_seconds=max_seconds,
                          malformed_share=malformed, batch=batch, seq=seq, binary=not json_body,
                          warmup=warmup)
    console.print(render_loadtest_table(result))
    if json_path is not None:
        from lrdeploy import atomic

        atomic.write_text(json_path, json.dumps({**result, "run": run_record.current()}, indent=2) + "\n")
        if not terminal.json_on_stdout():
            console.print(f"JSON result: [bold]{json_path}[/]")
    from lrdeploy.result_lines import loadtest_line

    terminal.result(loadtest_line(result), highlight=False)
    if result["errors"]:
        firsts = [e for lv in result["levels"] for e in lv["first_errors"]][:3]
        terminal.alert.print(f"[bold red]{result['errors']} error(s):[/] {'; '.join(firsts)}",
                             highlight=False)
        raise typer.Exit(code=1)


def render_loadtest_table(result: Mapping[str, Any]) -> RenderableType:
    """One row per concurrency level of a ``loadtest`` result: requests sent, answered, refused as malformed,
    errors, throughput and latency percentiles; the caption says what 4xx, errors and a starred count mean."""
    requests, batch = result.get("requests_per_level"), result.get("batch")
    where = f"{result.get('model')} @ {result.get('url')}"
    table = Table(title=f"loadtest {where} ({requests} requests per level, batch {batch})")
    for col in ("clients", "sent", "ok", "4xx", "errors", "req/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(col, justify="right", no_wrap=True)

    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    stopped = False
    for lv in result["levels"]:
        short = isinstance(requests, int) and lv["sent"] < requests
        stopped |= short
        table.add_row(str(lv["concurrency"]), f"{lv['sent']}{'*' if short else ''}", str(lv["ok"]),
                      str(lv["rejected"]), str(lv["errors"]), f"{lv['throughput_rps']:.1f}", ms(lv["p50_ms"]),
                      ms(lv["p90_ms"]), ms(lv["p99_ms"]))
    notes = ["clients: concurrent requests", "4xx: malformed requests, refused as they must be",
             "errors: 5xx, dropped connections, good requests refused or bad ones accepted"]
    if stopped:
        notes.append(f"* stopped at the {result.get('max_seconds', 0):g} s time limit")
    table.caption = "; ".join(notes)
    return fit(table, keys=1)


# ----------------------------------------------------------------------------------------------- triton
def triton(
    artefacts: list[Path] = typer.Argument(..., help="ONNX files, bundles (exported on the fly) or TensorRT "
                                           "engines (.plan, with the ONNX they were built from)."),
    repo: Path = typer.Option(..., "--repo", help="Model repository directory to write."),
    names: str | None = typer.Option(None, "--names", help="Model names, comma-separated (default: stems)."),
    max_batch: int = typer.Option(32, "--max-batch", min=1, help="max_batch_size."),
    max_delay_ms: float = typer.Option(2.0, "--max-delay-ms", min=0.0, max=10_000.0,
                                       help="dynamic_batching max_queue_delay."),
    preferred: str | None = typer.Option(None, "--preferred", help="Preferred batch sizes, comma-separated "
                                         "(default: 4, 8, … up to --max-batch)."),
    batching: bool = typer.Option(True, "--batching/--no-batching", help="Write a dynamic_batching block."),
    instances: int = typer.Option(1, "--instances", min=1, help="instance_group count."),
    threads: int | None = typer.Option(None, "--threads", min=1, help="ORT intra-op threads per instance "
                                       "(default: this machine's CPUs / --instances)."),
    url: str = typer.Option("127.0.0.1:8000", "--url", help="Triton's HTTP address, for the printed "
                            "perf_analyzer command."),
    force: bool = typer.Option(False, "--force", help="Replace a repository lrdeploy wrote before."),
) -> None:
    """Write a Triton model repository (config.pbtxt validated as Triton's ModelConfig) and print how to
    load-test it with perf_analyzer."""
    from lrdeploy.bench_cmd import parse_int_list
    from lrdeploy.host import available_cpus
    from lrdeploy.outputs import Outputs
    from lrdeploy.serving import triton_repo as tr
    from lrdeploy.serving.model import graph_io, tokenizer_path

    at_most(max_batch=max_batch, instances=instances)
    tr._model_config_class()  # a missing tritonclient: one line, before any export
    labels = model_names(artefacts, names)
    Outputs(force=force, inputs=artefacts).directory(repo, "--repo", what="Triton model repository",
                                                      is_ours=tr.is_triton_repo)
    settings = tr.RepoSettings(
        max_batch=max_batch, max_delay_us=round(max_delay_ms * 1000), instances=instances,
        preferred=tuple(parse_int_list(preferred, "--preferred", "8,16,32")) if preferred else (),
        threads=threads or max(1, available_cpus() // instances), batching=batching)
    plans = [i for i, p in enumerate(artefacts) if Path(p).suffix.lower() == ".plan"]
    others = [i for i in range(len(artefacts)) if i not in plans]
    models: dict[int, tr.RepoModel] = {}
    with resolved([artefacts[i] for i in others], [labels[i] for i in others], figures=False) as arts:
        for i, art in zip(others, arts, strict=True):
            inputs, outputs = graph_io(art.onnx_path)
            tok = tokenizer_path(art.onnx_path)
            models[i] = tr.RepoModel(labels[i], art.onnx_path, inputs, outputs,
                                     tokenizer=tok if tok.is_file() else None)
        for i in plans:
            plan = Path(artefacts[i])
            if not plan.is_file():
                raise UserError(f"{plan} does not exist", "pass a TensorRT engine from lrdeploy export --trt")
            onnx_path, limit = tr.plan_io(plan)
            inputs, outputs = graph_io(onnx_path)
            tok = tokenizer_path(onnx_path)
            models[i] = tr.RepoModel(labels[i], plan, inputs, outputs,
                                     tokenizer=tok if tok.is_file() else None, max_batch_limit=limit)
        ordered = [models[i] for i in range(len(artefacts))]
        configs = tr.write_repository(ordered, repo, settings)
    for model, config in zip(ordered, configs, strict=True):
        console.print(f"[bold]{model.name}[/]: {config} ({model.platform}, max_batch_size "
                      f"{tr.validate_config(config.read_text(), model).max_batch_size}; valid ModelConfig)",
                      highlight=False)
    terminal.result(f"serve it:  tritonserver --model-repository={repo.resolve()}", highlight=False,
                    soft_wrap=True)
    for model in ordered:
        console.print(f"load-test: {tr.perf_analyzer_command(model, url)}", highlight=False, soft_wrap=True)
