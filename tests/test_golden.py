"""Golden outputs: save/load round trip, tamper refusal, checks against a preset, and the CLI path users put
in CI (`compare --precision --save-golden --out`, then `check --golden`)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from lrdeploy.cli import app
from lrdeploy.errors import UserError
from lrdeploy.serving.golden import (
    ARRAYS_FILE,
    GOLDEN_SCHEMA,
    MANIFEST_FILE,
    array_sha256,
    check_golden,
    load_golden,
    save_golden,
)
from lrdeploy.serving.runtimes import IOInfo

runner = CliRunner()


def _arrays(n: int = 40, classes: int = 10):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype(np.float32)
    w = rng.standard_normal((3, classes)).astype(np.float32)
    return x, w, x @ w, (x @ w).argmax(axis=1)


class _Linear:
    """A runtime computing ``x @ w`` (optionally perturbed), like a tiny exported classifier."""

    name = "linear"

    def __init__(self, w: np.ndarray, noise: float = 0.0, output: str = "logits") -> None:
        self.w, self.noise, self.output = w, noise, output

    def inputs(self) -> list[IOInfo]:
        return [IOInfo("x", np.dtype(np.float32), ("batch", self.w.shape[0]))]

    def outputs(self) -> list[IOInfo]:
        return [IOInfo(self.output, np.dtype(np.float32), ("batch", self.w.shape[1]))]

    def run(self, feeds: dict) -> dict:
        y = feeds["x"] @ self.w
        return {self.output: y * (1 + self.noise) if self.noise else y}

    def describe(self) -> dict:
        return {"backend": "numpy"}


def test_round_trip_and_manifest(tmp_path):
    x, w, y, labels = _arrays()
    out = save_golden(tmp_path / "g", {"x": x}, {"logits": y}, labels=labels,
                      dataset={"name": "toy", "split": "test"}, precision="fp16",
                      reference={"name": "dense", "params": 30})
    assert sorted(p.name for p in out.iterdir()) == sorted([ARRAYS_FILE, MANIFEST_FILE])
    assert [p.name for p in tmp_path.iterdir()] == ["g"]  # no temporary directory left beside it
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["schema"] == GOLDEN_SCHEMA
    assert manifest["dataset"] == {"name": "toy", "split": "test", "samples": 40}
    assert manifest["precision"] == "fp16" and manifest["tolerance"]["rel_l2"] == 5e-3
    assert manifest["arrays"]["inputs/x"] == {"shape": [40, 3], "dtype": "<f4", "sha256": array_sha256(x)}
    assert set(manifest["arrays"]) == {"inputs/x", "outputs/logits", "labels"}
    g = load_golden(out)
    assert list(g.inputs) == ["x"]
    np.testing.assert_array_equal(g.inputs["x"], x)
    np.testing.assert_array_equal(g.outputs["logits"], y)
    np.testing.assert_array_equal(g.labels, labels)
    assert g.precision == "fp16" and g.samples == 40 and g.manifest["reference"]["name"] == "dense"


def test_array_hash_covers_shape_and_dtype():
    a = np.arange(6, dtype=np.float32)
    assert array_sha256(a) != array_sha256(a.reshape(2, 3))
    assert array_sha256(np.zeros(4, np.float32)) != array_sha256(np.zeros(4, np.int32))  # same bytes
    assert array_sha256(a.reshape(2, 3).T) == array_sha256(np.ascontiguousarray(a.reshape(2, 3).T))


def test_tampered_golden_is_refused(tmp_path):
    x, w, y, labels = _arrays()
    g = save_golden(tmp_path / "g", x, y, labels=labels)
    npz = g / ARRAYS_FILE
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    npz.write_bytes(bytes(blob))
    with pytest.raises(UserError, match="checksum"):
        load_golden(g)

    # arrays swapped for others, file hash updated to match: the per-array hashes still catch it
    g2 = save_golden(tmp_path / "g2", x, y, labels=labels)
    buf = io.BytesIO()
    np.savez(buf, **{"inputs/input": x, "outputs/output": y * 1.01, "labels": labels})
    (g2 / ARRAYS_FILE).write_bytes(buf.getvalue())
    manifest = json.loads((g2 / MANIFEST_FILE).read_text())
    manifest["files"][ARRAYS_FILE] = hashlib.sha256(buf.getvalue()).hexdigest()
    (g2 / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="outputs/output checksum"):
        load_golden(g2)

    (g2 / MANIFEST_FILE).write_text("{broken")
    with pytest.raises(UserError, match="not readable JSON"):
        load_golden(g2)
    with pytest.raises(UserError, match="does not exist"):
        load_golden(tmp_path / "nowhere")


def test_save_replaces_only_golden_sets(tmp_path):
    x, w, y, _ = _arrays()
    g = save_golden(tmp_path / "g", x, y)
    with pytest.raises(UserError, match="--force"):
        save_golden(g, x[:5], y[:5])  # an existing golden set is replaced only when asked
    assert load_golden(g).samples == len(x)
    save_golden(g, x[:5], y[:5], force=True)
    assert load_golden(g).samples == 5
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(UserError, match="not an lrdeploy golden set"):
        save_golden(mine, x, y, force=True)
    assert (mine / "notes.txt").read_text() == "keep"
    with pytest.raises(UserError, match="samples"):
        save_golden(tmp_path / "bad", x, y[:3])
    assert not (tmp_path / "bad").exists()


def test_check_golden_passes_identical_and_names_the_failing_statistic(tmp_path):
    x, w, y, labels = _arrays()
    g = load_golden(save_golden(tmp_path / "g", x, {"logits": y}, labels=labels, precision="fp32",
                                dataset={"name": "toy", "split": "test"}))
    ok = check_golden(g, _Linear(w), batch_size=16)
    assert ok["passed"] and ok["precision"] == "fp32" and ok["failures"] == []
    assert ok["accuracy"]["reference"] == ok["accuracy"]["candidate"] == 1.0
    assert ok["outputs"]["logits"]["rel_l2"] < 1e-6
    off = check_golden(g, _Linear(w, noise=1e-3))  # 1e-3 relative: fine for fp16, not for fp32
    assert not off["passed"] and any(f.startswith("logits: rel_l2") for f in off["failures"])
    assert check_golden(g, _Linear(w, noise=1e-3), precision="fp16")["passed"]


def test_check_golden_fails_nan_candidates_by_name_and_refuses_a_nan_reference(tmp_path):
    x, w, y, labels = _arrays()
    g = load_golden(save_golden(tmp_path / "g", x, {"logits": y}, labels=labels, precision="fp16"))
    broken = w.copy()
    broken[0, 0] = np.nan  # every sample's class-0 score becomes NaN
    res = check_golden(g, _Linear(broken))
    assert not res["passed"] and res["failures"][0] == "logits: outputs contain 40 NaN values (fp16)"
    assert res["accuracy"]["candidate"] < 1.0  # NaN rows count as wrong, whatever arg-max makes of them
    y_nan = y.copy()
    y_nan[3, 1] = np.inf
    with pytest.raises(UserError, match="contains 1 Inf value"):  # refused when saved ...
        save_golden(tmp_path / "bad", x, {"logits": y_nan}, precision="fp16")
    # ... and, for a set written by an older lrdeploy, when checked
    bad = dataclasses.replace(g, outputs={"logits": y_nan})
    with pytest.raises(UserError, match="reference output 'logits' contains 1 Inf value, so it cannot"):
        check_golden(bad, _Linear(w))


class _Pooler:
    """Two named inputs (ids, mask) → two named outputs, like a small encoder."""

    name = "pooler"

    def __init__(self, table: np.ndarray, drop: str | None = None) -> None:
        self.table, self.drop = table, drop

    def inputs(self) -> list[IOInfo]:
        return [IOInfo("input_ids", np.dtype(np.int64), ("batch", "seq")),
                IOInfo("attention_mask", np.dtype(np.int64), ("batch", "seq"))]

    def outputs(self) -> list[IOInfo]:
        return [IOInfo(n, np.dtype(np.float32), None) for n in ("pooled", "tokens") if n != self.drop]

    def run(self, feeds: dict) -> dict:
        tokens = self.table[feeds["input_ids"]] * feeds["attention_mask"][..., None]
        out = {"pooled": tokens.sum(1) / feeds["attention_mask"].sum(1, keepdims=True), "tokens": tokens}
        return {k: v for k, v in out.items() if k != self.drop}


def test_named_inputs_and_outputs_round_trip_and_every_output_is_checked(tmp_path):
    rng = np.random.default_rng(3)
    table = rng.standard_normal((20, 4)).astype(np.float32)
    ids = rng.integers(0, 20, (12, 6)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[:, 4:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    ref = _Pooler(table).run(feeds)
    g = load_golden(save_golden(tmp_path / "g", feeds, ref, precision="fp32"))
    assert list(g.inputs) == ["input_ids", "attention_mask"] and g.inputs["input_ids"].dtype == np.int64
    ok = check_golden(g, _Pooler(table), batch_size=5)
    assert ok["passed"] and set(ok["outputs"]) == {"pooled", "tokens"}
    assert ok["golden"]["inputs"] == {"input_ids": [12, 6], "attention_mask": [12, 6]}
    off = check_golden(g, _Pooler(table * 1.01))
    assert not off["passed"] and {f.split(":")[0] for f in off["failures"]} == {"pooled", "tokens"}
    missing = check_golden(g, _Pooler(table, drop="tokens"))
    assert not missing["passed"]
    assert missing["failures"] == ["tokens: missing from the candidate (outputs: pooled)"]


def test_a_golden_set_written_before_named_inputs_still_loads_and_checks(tmp_path):
    """lrdeploy.golden/1: one unnamed 'inputs' array; read as the input 'input', fed to a one-input model."""
    x, w, y, labels = _arrays()
    root = tmp_path / "old"
    root.mkdir()
    arrays = {"inputs": x, "outputs/output": y, "labels": labels}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (root / ARRAYS_FILE).write_bytes(buf.getvalue())
    manifest = {"schema": "lrdeploy.golden/1", "precision": "fp32", "dataset": {"samples": len(x)},
                "arrays": {k: {"shape": list(a.shape), "dtype": a.dtype.str, "sha256": array_sha256(a)}
                           for k, a in arrays.items()},
                "files": {ARRAYS_FILE: hashlib.sha256(buf.getvalue()).hexdigest()}}
    (root / MANIFEST_FILE).write_text(json.dumps(manifest))
    g = load_golden(root)
    assert list(g.inputs) == ["input"] and g.samples == len(x)
    res = check_golden(g, _Linear(w))  # its output is called logits: one output each, judged by position
    assert res["passed"] and res["outputs"]["output"]["matched_by"] == "position (candidate output 'logits')"


# --- the CLI path ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory, data_dir):
    from .parity_models import to_fp16, train_lenet_onnx

    root = tmp_path_factory.mktemp("golden-cli")
    fp32 = train_lenet_onnx(root, data_dir)
    return {"root": root, "fp32": fp32, "fp16": to_fp16(fp32, root / "fp16.onnx"),
            "bad": to_fp16(fp32, root / "fp16-bad.onnx", fault="scale")}


def _compare(models, data_dir, cand, *extra):
    return runner.invoke(app, [str(a) for a in ("compare", models["fp32"], cand, "--data-dir", data_dir,
                                                "--limit-test", "300", "--batch", "1", "--seconds", "0.05",
                                                *extra)], catch_exceptions=False)


def test_compare_precision_golden_and_check(models, data_dir, tmp_path):
    golden, run = tmp_path / "golden", tmp_path / "run"
    r = _compare(models, data_dir, models["fp16"], "--precision", "fp16", "--save-golden", golden,
                 "--golden-samples", "200", "--out", run)
    assert r.exit_code == 0, r.output
    report = json.loads((run / "report.json").read_text())
    assert report["parity"]["precision"] == "fp16" and report["parity"]["passed"] is True
    assert report["verdict"] == {"passed": True, "failures": []}
    assert report["golden"] == {"path": str(golden), "samples": 200, "precision": "fp16"}
    assert (run / "report.md").read_text().startswith("# lrdeploy compare: fp32 vs fp16")
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    g = load_golden(golden)
    assert g.samples == 200 and g.precision == "fp16" and g.manifest["dataset"]["name"] == "mnist"
    assert {k: v.shape for k, v in g.inputs.items()} == {"input": (200, 1, 28, 28)}
    assert g.labels.shape == (200,)

    r = runner.invoke(app, ["check", str(models["fp16"]), "--golden", str(golden), "--json",
                            str(tmp_path / "check.json")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output
    assert json.loads((tmp_path / "check.json").read_text())["passed"] is True

    r = runner.invoke(app, ["check", str(models["bad"]), "--golden", str(golden)], catch_exceptions=False)
    assert r.exit_code == 1
    assert "rel_l2" in r.output and "(fp16)" in r.output  # the failing statistic is named

    r = runner.invoke(app, ["check", str(models["fp16"]), "--golden", str(golden), "--precision", "fp32"],
                      catch_exceptions=False)
    assert r.exit_code == 1 and "rel_l2" in r.output


def test_compare_fp32_preset_rejects_fp16_and_fp16_rejects_corrupted(models, data_dir, tmp_path):
    r = _compare(models, data_dir, models["fp16"], "--precision", "fp32", "--json", tmp_path / "a.json")
    assert r.exit_code == 1
    assert "parity (fp32) failed" in r.output and "rel_l2" in r.output
    assert json.loads((tmp_path / "a.json").read_text())["verdict"]["passed"] is False
    r = _compare(models, data_dir, models["bad"], "--precision", "fp16")
    assert r.exit_code == 1 and "rel_l2" in r.output


def test_tampered_golden_fails_the_cli_in_one_line(models, tmp_path):
    x = np.zeros((4, 1, 28, 28), dtype=np.float32)
    g = save_golden(tmp_path / "g", x, np.zeros((4, 10), dtype=np.float32))
    blob = bytearray((g / ARRAYS_FILE).read_bytes())
    blob[-10] ^= 0xFF
    (g / ARRAYS_FILE).write_bytes(bytes(blob))
    cmd = [sys.executable, "-m", "lrdeploy", "check", str(models["fp16"]), "--golden", str(g)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "checksum" in lines[0] and "Traceback" not in proc.stderr


def test_save_refuses_non_finite_reference_outputs(tmp_path):
    x, _, y, _ = _arrays()
    y = y.copy()
    y[3, 0] = np.nan
    with pytest.raises(UserError, match="1 NaN value"):
        save_golden(tmp_path / "g", x, {"logits": y})
    assert not (tmp_path / "g").exists()


def test_an_archive_that_would_unpack_past_the_limit_is_refused_before_loading(tmp_path, monkeypatch):
    import lrdeploy.serving.golden as golden_mod

    x, _, y, _ = _arrays()
    g = save_golden(tmp_path / "g", x, y)
    unpacked = sum(a.nbytes for a in (x, y))
    monkeypatch.setattr(golden_mod, "MAX_UNPACKED_BYTES", unpacked // 2)  # as if the members were huge
    monkeypatch.setattr(golden_mod.np, "load", lambda *a, **k: pytest.fail("np.load ran before the check"))
    with pytest.raises(UserError, match="would unpack to"):
        load_golden(g)
