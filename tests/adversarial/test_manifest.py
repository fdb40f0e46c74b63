"""Hand-edited manifests through the real CLI: exit 2, one line naming the bad value (or the tampering), no
traceback, no file written or changed.

Nine subprocess cases; the variants (every field, ONNX stamps, random mutations) are in-process in
tests/test_manifest_schema.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from lrdeploy.serving.golden import MANIFEST_FILE, save_golden

from .conftest import Snapshot, assert_refused, lrdeploy


def _copy_bundle(lenet_bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(lenet_bundle, tmp_path / "bundle"))


def _export(bundle: Path, out: Path):
    return lrdeploy("export", bundle, "--out", out, "--fold", "factored", "--optimize", "none")


def _set_shape(value):
    return lambda m: m["model"].__setitem__("input_shape", value)


def _nest(m: dict) -> None:
    m["metrics"] = "@DEEP@"


EDITS = {
    "negative-dim": (_set_shape([-1, 28, 28]), "model.input_shape[0] must be a positive integer, got -1"),
    "string-dim": (_set_shape(["a", 28, 28]), 'model.input_shape[0] must be a positive integer, got "a"'),
    "empty-shape": (_set_shape([]), "model.input_shape must hold 1 to 8 items, got 0"),
    "dataset-string": (lambda m: m.__setitem__("dataset", "mnist"),
                       'dataset must be a JSON object, got "mnist"'),
    "num-classes-1e13": (lambda m: m["model"]["args"].__setitem__("num_classes", 1e13),
                         "model.args.num_classes must be a positive integer"),
    "nesting-100000": (_nest, "nested too deeply"),
}


@pytest.mark.parametrize("case", list(EDITS))
def test_export_refuses_a_hand_edited_manifest(lenet_bundle, tmp_path, case):
    change, needle = EDITS[case]
    bundle = _copy_bundle(lenet_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    text = json.dumps(manifest).replace('"@DEEP@"', "[" * 100_000 + "]" * 100_000)
    (bundle / "manifest.json").write_text(text)
    snap = Snapshot([tmp_path])
    proc = _export(bundle, tmp_path / "m.onnx")
    assert_refused(proc, "manifest.json", needle)
    snap.assert_unchanged()
    assert not (tmp_path / "m.onnx").exists()


def test_export_refuses_a_well_formed_edit_as_tampering(lenet_bundle, tmp_path):
    """Weights intact, every value valid, one value changed: only the manifest digest can tell."""
    bundle = _copy_bundle(lenet_bundle, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["dataset"] = {"name": "fashion-mnist"}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    snap = Snapshot([tmp_path])
    proc = _export(bundle, tmp_path / "m.onnx")
    assert_refused(proc, "manifest.json", "tampered or hand-edited")
    snap.assert_unchanged()


def _golden(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    return save_golden(tmp_path / "golden", x, rng.standard_normal((4, 10)).astype(np.float32))


def test_check_refuses_a_bad_golden_json(lenet_bundle, tmp_path):
    bundle, golden = _copy_bundle(lenet_bundle, tmp_path), _golden(tmp_path)
    manifest = json.loads((golden / MANIFEST_FILE).read_text())
    manifest["arrays"]["inputs/input"]["shape"] = [4, 1e12]
    (golden / MANIFEST_FILE).write_text(json.dumps(manifest))
    snap = Snapshot([tmp_path])
    proc = lrdeploy("check", bundle, "--golden", golden, "--json", tmp_path / "check.json")
    assert_refused(proc, "golden.json", 'arrays["inputs/input"].shape[1] must be a non-negative integer',
                   "got 1000000000000.0")
    snap.assert_unchanged()


def test_check_refuses_an_onnx_file_with_edited_metadata(lenet_onnx, tmp_path):
    """A user's ONNX file without our metadata is fine; one whose lrdeploy manifest was edited is not."""
    edited = tmp_path / "edited.onnx"
    proto = onnx.load(str(lenet_onnx))
    props = {p.key: p.value for p in proto.metadata_props}
    manifest = json.loads(props["lrdeploy.manifest"])
    manifest["metrics"] = {"test_accuracy": 0.999}
    props["lrdeploy.manifest"] = json.dumps(manifest, sort_keys=True)
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(edited))
    golden = _golden(tmp_path)
    snap = Snapshot([tmp_path, lenet_onnx])
    proc = lrdeploy("check", edited, "--golden", golden)
    assert_refused(proc, "edited.onnx", "lrdeploy.manifest", "tampered or hand-edited")
    snap.assert_unchanged()
