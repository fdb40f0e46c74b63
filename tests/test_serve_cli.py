"""`lrdeploy serve` / `loadtest` as commands: a real process stopped by SIGTERM while a request is in flight
(drained, exit 0), a bundle served through the export pipeline, and one-line errors (exit 2) for bad input."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

pytest.importorskip("uvicorn", reason="the serve extra is not installed")
th = pytest.importorskip("tritonclient.http", reason="the serve extra (tritonclient[http]) is not installed")

from lrdeploy.cli import app  # noqa: E402
from tests.test_serve import WIDTH, mlp_onnx, ort  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    return mlp_onnx(tmp_path_factory.mktemp("serve-cli") / "dense.onnx")


def _wait_for_url(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """The URL from the `serving N model(s) on http://…` line (the server picked a free port)."""
    deadline, seen = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            seen += line
            if line.startswith("serving "):
                return line.split(" on ", 1)[1].split()[0]
        if proc.poll() is not None:
            break
    rest = proc.stdout.read() if proc.poll() is not None else ""
    raise AssertionError(f"the server did not start: {seen}{rest}")


def test_sigterm_drains_in_flight_requests_and_exits_0(dense):
    # a 1.5 s batching window keeps a lone request in flight long enough to signal during it
    proc = subprocess.Popen([sys.executable, "-m", "lrdeploy", "serve", str(dense), "--port", "0",
                             "--max-delay-ms", "1500"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "COLUMNS": "200"})
    try:
        url = _wait_for_url(proc)
        x = np.ones((2, WIDTH), np.float32)
        result: dict = {}

        def infer() -> None:
            inp = th.InferInput("x", [2, WIDTH], "FP32")
            inp.set_data_from_numpy(x)
            try:
                result["y"] = th.InferenceServerClient(url.removeprefix("http://")).infer(
                    "dense", [inp]).as_numpy("logits")
            except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                result["error"] = exc

        t = threading.Thread(target=infer)
        sent = time.monotonic()
        t.start()
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        host, port = url.removeprefix("http://").split(":")
        with pytest.raises(OSError):  # no longer accepting
            socket.create_connection((host, int(port)), timeout=2).close()
        t.join(30)
        assert "error" not in result, result.get("error")
        assert time.monotonic() - sent >= 1.4  # it was answered after its batching window, not cut short
        np.testing.assert_allclose(result["y"], ort(dense, {"x": x})["logits"], rtol=1e-5)
        assert proc.wait(30) == 0
        assert "stopped: every in-flight request was answered" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_bundle_is_served_through_the_export_pipeline(tmp_path):
    import torch

    from lrdeploy.bundle import load_bundle
    from lrdeploy.serve_cmd import manifest_summary, resolved
    from lrdeploy.serving.model import ServedModel, ServingConfig
    from lrdeploy.serving.server import BackgroundServer, ModelServer

    r = runner.invoke(app, ["init", "--model", "lenet5", "--out", str(tmp_path / "lenet")])
    assert r.exit_code == 0, r.output
    config = ServingConfig(max_batch=4)
    with resolved([tmp_path / "lenet"], ["lenet"]) as arts:
        assert arts[0].kind == "bundle" and arts[0].onnx_path.suffix == ".onnx"
        model = ServedModel.load("lenet", arts[0].onnx_path, config, manifest_summary(arts[0]))
        with BackgroundServer(ModelServer({"lenet": model}, config)) as url:
            c = th.InferenceServerClient(url.removeprefix("http://"))
            meta = c.get_model_metadata("lenet")
            x = np.random.default_rng(0).standard_normal((3, 1, 28, 28)).astype(np.float32)
            inp = th.InferInput(meta["inputs"][0]["name"], list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            got = c.infer("lenet", [inp]).as_numpy(meta["outputs"][0]["name"])
    summary = meta["lrdeploy"]["summary"]
    assert summary["model"] == "lenet5" and summary["kind"] == "bundle" and summary["params"] == 61706
    assert "source" not in summary
    bundle = load_bundle(tmp_path / "lenet")
    with torch.no_grad():
        want = bundle.model.eval()(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _one_line_error(r, *needles: str) -> None:
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.output
    for needle in needles:
        assert needle in r.output, r.output


def test_serve_errors_are_one_line(dense, tmp_path):
    _one_line_error(runner.invoke(app, ["serve", str(tmp_path / "nope.onnx"), "--port", "0"]),
                    "does not exist")
    _one_line_error(runner.invoke(app, ["serve", str(dense), str(dense), "--names", "a", "--port", "0"]),
                    "--names")
    _one_line_error(runner.invoke(app, ["serve", str(dense), "--names", "a/b", "--port", "0"]), "URL")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _one_line_error(runner.invoke(app, ["serve", str(dense), "--port", str(port)]), "cannot listen")
    _one_line_error(runner.invoke(app, ["loadtest", "http://192.0.2.7:8000", "--model", "m"]), "loopback")
    _one_line_error(runner.invoke(app, ["loadtest", "http://127.0.0.1:9", "--model", "m",
                                        "--concurrency", "0"]), "--concurrency")


def test_loadtest_command_prints_the_table_and_writes_json(dense, tmp_path):
    from lrdeploy.serving.model import ServedModel, ServingConfig
    from lrdeploy.serving.server import BackgroundServer, ModelServer

    config = ServingConfig(max_batch=8)
    server = ModelServer({"dense": ServedModel.load("dense", dense, config)}, config)
    with BackgroundServer(server) as url:
        r = runner.invoke(app, ["loadtest", url, "--model", "dense", "--concurrency", "1,4", "--requests",
                                "60", "--malformed", "0.2", "--warmup", "5", "--json",
                                str(tmp_path / "lt.json")])
        assert r.exit_code == 0, r.output
        missing = runner.invoke(app, ["loadtest", url, "--model", "nope", "--requests", "5"])
    doc = json.loads((tmp_path / "lt.json").read_text())
    assert [lv["concurrency"] for lv in doc["levels"]] == [1, 4] and doc["errors"] == 0
    assert all(lv["ok"] == 48 and lv["rejected"] == 12 for lv in doc["levels"])
    assert "p99 ms" in r.output
    _one_line_error(missing, "does not serve model 'nope'")
