"""One manifest schema on every load: bundle manifests, ONNX metadata stamps and golden.json.

Every hand-edit or corruption must end in a one-line UserError naming the JSON path of the bad value (or, for
a well-formed edit, the integrity digest) — never a traceback from inside torch, json or numpy. The property
tests mutate real files at random JSON paths and assert exactly that.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lrdeploy import manifest_schema as ms
from lrdeploy.bundle import MANIFEST, WEIGHTS, load_bundle, read_manifest, save_bundle
from lrdeploy.compress import compress
from lrdeploy.errors import UserError
from lrdeploy.exporters.onnx import (
    META_EXPORT,
    META_EXPORT_SHA256,
    META_MANIFEST,
    META_MANIFEST_SHA256,
    _stamp,
    read_export_info,
    read_onnx_metadata,
)
from lrdeploy.models import create_model
from lrdeploy.serving.golden import MANIFEST_FILE, Golden, load_golden, save_golden

HINT = "hand-edited or is corrupt"


def _save(path: Path, model: torch.nn.Module, **kw: Any) -> Path:
    meta = {"method": {"name": "svd"}, "dataset": {"name": "mnist"}, "metrics": {"test_accuracy": 0.9}}
    return save_bundle(path, model, model_name="lenet5", model_args={"num_classes": 10}, **{**meta, **kw})


@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    """A dense and a low-rank LeNet-5 bundle, written once; tests copy them before editing."""
    root = tmp_path_factory.mktemp("ms")
    torch.manual_seed(0)
    dense = create_model("lenet5")
    lowrank = copy.deepcopy(dense)
    compress(lowrank, rank_ratio=0.5)
    return {"dense": _save(root / "dense", dense), "lowrank": _save(root / "lowrank", lowrank)}


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit(bundle: Path, change, *, digest: str = "keep") -> None:
    """Apply ``change(manifest)`` to the bundle's manifest.json; ``digest``: keep the stale one, drop it
    (a bundle written before the digest existed) or recompute it (a careful forger)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    change(manifest)
    if digest == "drop" and isinstance(manifest, dict):
        manifest.pop(ms.DIGEST_KEY, None)
    elif digest == "recompute" and isinstance(manifest, dict):
        manifest[ms.DIGEST_KEY] = ms.manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))


def _set(*path: Any, value: Any):
    def change(m: dict) -> None:
        for key in path[:-1]:
            m = m[key]
        m[path[-1]] = value

    return change


SHAPE, ARGS = ("model", "input_shape"), ("model", "args")


def _deep(n: int) -> str:
    return "[" * n + "]" * n


# --- the crashes of issue 9, one by one ---


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_set(*SHAPE, value=[-1, 28, 28]), "model.input_shape[0] must be a positive integer, got -1"),
        (_set(*SHAPE, value=["a", 28, 28]), 'model.input_shape[0] must be a positive integer, got "a"'),
        (_set(*SHAPE, value=[]), "model.input_shape must hold 1 to 8 items, got 0"),
        (_set(*SHAPE, value=[1, 65537, 1]), "model.input_shape[1] must be at most 65536"),
        (_set(*SHAPE, value=[3, 4096, 4096]), "model.input_shape describes 50331648 elements"),
        (_set(*SHAPE, value="1x28x28"), "model.input_shape must be a list"),
        (_set("dataset", value="mnist"), 'dataset must be a JSON object, got "mnist"'),
        (_set("dataset", "name", value=["mnist"]), "dataset.name must be a string"),
        (_set(*ARGS, "num_classes", value=1e13), "model.args.num_classes must be a positive integer"),
        (_set(*ARGS, "num_classes", value=10**13), "model.args.num_classes must be at most 1000000"),
        (_set(*ARGS, "num_classes", value=True), "model.args.num_classes must be a positive integer"),
        (_set(*ARGS, "dropout", value=0.5), "model.args.dropout is not an argument of model lenet5"),
        (_set("model", "name", value="lenet6"), 'model.name must name a registered model'),
        (_set("model", "name", value=7), "model.name must be a string, got 7"),
        (_set("weights_sha256", value="xyz"), "weights_sha256 must be a sha256 hex digest"),
        (_set("params", value=-3), "params must be a non-negative integer, got -3"),
        (_set("structure", value={"fc1": {"kind": "lowrank_linear", "rank": 500, "full_rank": 84}}),
         "structure.fc1.rank must be at most full_rank (84), got 500"),
        (_set("structure", value={"fc1": {"kind": "lowrank_linear", "rank": 2, "full_rank": 400, "in": 400,
                                          "out": 120}}), "structure.fc1.full_rank must be at most 120"),
        (_set("structure", value={"layer1.0": {"kind": "x", "rank": "2"}}),
         'structure["layer1.0"].rank must be a non-negative integer, got "2"'),
        (_set("metrics", "history", value=json.loads(_deep(40))), "is nested deeper than 32 levels"),
        (_set("tokenizers", value={"src": {"format": "w", "format_version": 1, "tokens": "abc"}}),
         "tokenizers.src.tokens must be a list"),
        (lambda m: m["model"].pop("input_shape"), "model lacks the required key 'input_shape'"),
        (lambda m: m.pop("weights_sha256"), "lacks the required key 'weights_sha256'"),
    ],
)
def test_bad_manifest_value_is_one_line_naming_its_path(tmp_path, bundles, change, needle):
    bundle = _copy(bundles["dense"], tmp_path / "b")
    _edit(bundle, change)
    before = {p.name: p.read_bytes() for p in bundle.iterdir()}
    for reader in (read_manifest, load_bundle):
        with pytest.raises(UserError) as err:
            reader(bundle)
        message = str(err.value)
        assert needle in message and HINT in message and "\n" not in message
        assert message.startswith(str(bundle / MANIFEST))
    assert {p.name: p.read_bytes() for p in bundle.iterdir()} == before


@pytest.mark.parametrize("depth", [100_000, 2_000, 500])
def test_deep_nesting_is_a_user_error_not_a_recursion_error(tmp_path, bundles, depth):
    bundle = _copy(bundles["dense"], tmp_path / "b")
    text = (bundle / MANIFEST).read_text()
    (bundle / MANIFEST).write_text(text.replace('"metrics": {', f'"deep": {_deep(depth)}, "metrics": {{', 1))
    with pytest.raises(UserError, match="nested (too deeply|deeper than 32 levels)"):
        load_bundle(bundle)


def test_duplicate_keys_and_oversized_manifests_are_refused(tmp_path, bundles, monkeypatch):
    bundle = _copy(bundles["dense"], tmp_path / "b")
    text = (bundle / MANIFEST).read_text()
    duplicate = text.replace('"metrics": {', '"dataset": {"name": "cifar10"}, "metrics": {', 1)
    (bundle / MANIFEST).write_text(duplicate)
    with pytest.raises(UserError, match="duplicate key 'dataset'"):
        load_bundle(bundle)
    (bundle / MANIFEST).write_text(text)
    monkeypatch.setattr(ms, "MAX_JSON_BYTES", 100)
    with pytest.raises(UserError, match="more than the 100 a manifest may be"):
        load_bundle(bundle)


def test_arguments_in_range_that_do_not_fit_the_weights_allocate_nothing(tmp_path, bundles):
    """in_channels 65536 passes the schema (an old bundle has no digest): the dry build on the meta device
    refuses it before the real constructor allocates a 65536-channel conv."""
    bundle = _copy(bundles["dense"], tmp_path / "b")
    _edit(bundle, _set("model", "args", "in_channels", value=65536), digest="drop")
    read_manifest(bundle)  # schema-valid
    with pytest.raises(UserError, match=r"do not fit model 'lenet5'.*wrong shape conv1\.weight"):
        load_bundle(bundle)


# --- the integrity digest ---


def test_the_digest_covers_every_key_and_survives_reformatting(tmp_path, bundles):
    manifest = json.loads((bundles["lowrank"] / MANIFEST).read_text())
    assert manifest[ms.DIGEST_KEY] == ms.manifest_digest(manifest)
    # same values, other key order and whitespace: still the same manifest
    bundle = _copy(bundles["lowrank"], tmp_path / "b")
    shuffled = dict(reversed(list(manifest.items())))
    (bundle / MANIFEST).write_text(json.dumps(shuffled, indent=7, ensure_ascii=False))
    assert load_bundle(bundle).manifest == manifest


@pytest.mark.parametrize(
    "change",
    [
        _set("dataset", "name", value="fashion-mnist"),
        _set("metrics", "test_accuracy", value=0.999),
        _set("model", "input_shape", value=[1, 32, 32]),
        _set("structure", "fc1", "rank", value=3),
        _set("weights_sha256", value="f" * 64),
        lambda m: m.pop("method"),
    ],
)
def test_a_well_formed_edit_is_reported_as_tampering(tmp_path, bundles, change):
    bundle = _copy(bundles["lowrank"], tmp_path / "b")
    _edit(bundle, change)
    with pytest.raises(UserError, match="tampered or hand-edited: its checksum"):
        read_manifest(bundle)


def test_bundles_written_before_the_digest_still_load(tmp_path, bundles):
    bundle = _copy(bundles["lowrank"], tmp_path / "b")
    _edit(bundle, lambda m: None, digest="drop")
    loaded = load_bundle(bundle)
    assert ms.DIGEST_KEY not in loaded.manifest
    assert set(loaded.manifest["structure"]) == {"conv2", "fc1", "fc2"}
    _edit(bundle, _set("model", "input_shape", value=[0, 28, 28]))  # still validated
    with pytest.raises(UserError, match=r"model\.input_shape\[0\] must be a positive integer, got 0"):
        load_bundle(bundle)


def test_save_refuses_what_it_could_not_read_back(tmp_path):
    model = create_model("lenet5")
    with pytest.raises(UserError, match="model.args.width is not an argument of model lenet5"):
        save_bundle(tmp_path / "b", model, model_name="lenet5", model_args={"width": 3}, method={},
                    dataset={}, metrics={})
    with pytest.raises(ValueError, match="manifest_sha256"):
        _save(tmp_path / "b", model, extra={"manifest_sha256": "0" * 64})
    assert not (tmp_path / "b").exists()


def test_nan_metric_of_a_diverged_run_round_trips(tmp_path):
    out = _save(tmp_path / "b", create_model("lenet5"), metrics={"train_loss": math.nan, "history": [1.0]})
    assert math.isnan(load_bundle(out).manifest["metrics"]["train_loss"])


# --- ONNX metadata ---


def _tiny_onnx(path: Path, manifest: dict | None, export_info: dict | None = None) -> Path:
    """A real one-node ONNX graph, stamped by export's own ``_stamp`` (or not stamped at all)."""
    h = onnx.helper
    graph = h.make_graph([h.make_node("Relu", ["input"], ["output"])], "g",
                         [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 4])],
                         [h.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 4])])
    proto = h.make_model(graph, opset_imports=[h.make_opsetid("", 20)])
    if manifest is not None:
        _stamp(proto, manifest, export_info or {"exporter": "dynamo", "input_shape": [4], "opset": 20})
    onnx.save(proto, str(path))
    return path


def _edit_props(path: Path, **changes: str | None) -> None:
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    for key, value in changes.items():
        key = {"manifest": META_MANIFEST, "manifest_sha": META_MANIFEST_SHA256, "export": META_EXPORT,
               "export_sha": META_EXPORT_SHA256}[key]
        if value is None:
            props.pop(key, None)
        else:
            props[key] = value
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, props)
    onnx.save(proto, str(path))


def test_onnx_metadata_round_trip_and_foreign_files(tmp_path, bundles):
    manifest = json.loads((bundles["lowrank"] / MANIFEST).read_text())
    manifest["fold"] = {"mode": "factored"}
    path = _tiny_onnx(tmp_path / "m.onnx", manifest)
    assert read_onnx_metadata(path) == manifest
    assert read_export_info(path)["input_shape"] == [4]
    foreign = _tiny_onnx(tmp_path / "f.onnx", None)  # a user's own ONNX file is legitimate input
    assert read_onnx_metadata(foreign) == {} and read_export_info(foreign) == {}
    bare = _tiny_onnx(tmp_path / "bare.onnx", {"origin": "test"})  # a bare module's export: its own keys
    assert read_onnx_metadata(bare) == {"origin": "test"}


def test_edited_onnx_metadata_is_tampering_or_a_named_value(tmp_path, bundles):
    manifest = json.loads((bundles["dense"] / MANIFEST).read_text())
    path = _tiny_onnx(tmp_path / "m.onnx", manifest)
    edited = {**manifest, "dataset": {"name": "cifar10"}}
    _edit_props(path, manifest=json.dumps(edited))
    with pytest.raises(UserError, match=r"metadata 'lrdeploy\.manifest' was tampered or hand-edited"):
        read_onnx_metadata(path)
    _edit_props(path, manifest=json.dumps({**manifest, "model": {**manifest["model"], "input_shape": [-1]}}))
    with pytest.raises(UserError, match=r"model\.input_shape\[0\] must be a positive integer, got -1"):
        read_onnx_metadata(path)
    _edit_props(path, manifest='{"a": ' + _deep(100_000) + "}")
    with pytest.raises(UserError, match="nested too deeply"):
        read_onnx_metadata(path)
    _edit_props(path, manifest=None)  # the manifest removed, its digest left behind
    with pytest.raises(UserError, match="was removed: the file was tampered or hand-edited"):
        read_onnx_metadata(path)
    _edit_props(path, manifest=json.dumps(edited), manifest_sha=None)  # exported before digests: validated
    assert read_onnx_metadata(path)["dataset"] == {"name": "cifar10"}
    _edit_props(path, manifest=json.dumps({**edited, "dataset": "mnist"}))
    with pytest.raises(UserError, match='dataset must be a JSON object, got "mnist"'):
        read_onnx_metadata(path)


def test_edited_export_record_is_refused(tmp_path):
    path = _tiny_onnx(tmp_path / "m.onnx", {"origin": "test"})
    _edit_props(path, export=json.dumps({"exporter": "dynamo", "input_shape": [8], "opset": 20}))
    with pytest.raises(UserError, match=r"metadata 'lrdeploy\.export' was tampered or hand-edited"):
        read_export_info(path)
    _edit_props(path, export=json.dumps({"input_shape": ["a"]}), export_sha=None)
    with pytest.raises(UserError, match=r"input_shape\[0\] must be a positive integer"):
        read_export_info(path)


def test_export_refuses_metadata_it_could_not_read_back(tmp_path):
    with pytest.raises(UserError, match="model must be a JSON object"):
        _tiny_onnx(tmp_path / "m.onnx", {"model": "lenet5"})
    assert not (tmp_path / "m.onnx").exists()


# --- golden.json ---


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 1, 4, 4)).astype(np.float32)
    y = rng.standard_normal((6, 3)).astype(np.float32)
    return save_golden(tmp_path_factory.mktemp("golden") / "g", x, {"logits": y}, labels=y.argmax(1),
                       dataset={"name": "toy", "split": "test"}, precision="fp16",
                       reference={"name": "dense"})


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (_set("arrays", value="inputs"), 'arrays must be an object, got "inputs"'),
        (lambda m: m.pop("files"), "lacks the required key 'files'"),
        (lambda m: m["arrays"].pop("inputs/input"), "arrays lacks the required entry 'inputs'"),
        (lambda m: m["arrays"].pop("outputs/logits"), "arrays holds no 'outputs/<name>' entry"),
        (_set("arrays", "inputs/input", "shape", value=[10**12, 1, 4, 4]),
         'arrays["inputs/input"].shape[0] must be at'),
        (_set("arrays", "inputs/input", "shape", value=[6, 65536, 65536]),
         'arrays["inputs/input"].shape describes'),
        (_set("arrays", "labels", "shape", value=[7]), 'arrays.labels.shape[0] must equal the 6 samples'),
        (_set("arrays", "inputs/input", "dtype", value=4),
         'arrays["inputs/input"].dtype must be a numpy dtype string'),
        (_set("tolerance", "rel_l2", value=math.nan), "tolerance.rel_l2 must be a finite number, got NaN"),
        (_set("dataset", value="toy"), 'dataset must be a JSON object, got "toy"'),
        (_set("dataset", "samples", value=5), "dataset.samples must equal the 6 input samples, got 5"),
        (_set("precision", value=["fp16"]), "precision must be a string"),
        (_set("reference", "x", value=json.loads(_deep(40))), "is nested deeper than 32 levels"),
        (_set("files", "golden.npz", value=None), 'files["golden.npz"] must be a sha256 hex digest'),
    ],
)
def test_bad_golden_json_is_one_line_naming_the_field(tmp_path, golden, change, needle):
    g = _copy(golden, tmp_path / "g")
    manifest = json.loads((g / MANIFEST_FILE).read_text())
    change(manifest)
    (g / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError) as err:
        load_golden(g)
    assert needle in str(err.value) and "regenerate it with --save-golden" in str(err.value)
    assert "\n" not in str(err.value)


def test_deeply_nested_golden_json_is_refused(tmp_path, golden):
    g = _copy(golden, tmp_path / "g")
    (g / MANIFEST_FILE).write_text('{"schema": "lrdeploy.golden/1", "x": ' + _deep(100_000) + "}")
    with pytest.raises(UserError, match="nested too deeply"):
        load_golden(g)


def test_validator_unit_messages():
    with pytest.raises(ms.SchemaError, match=r"must be at most 3, got 4"):
        ms.Int(1, 3).check(4, ("x",), 0)
    assert ms.format_path(("structure", "layer1.0.conv1", "rank")) == 'structure["layer1.0.conv1"].rank'
    assert ms.format_path(("arrays", "outputs/output", "shape", 0)) == 'arrays["outputs/output"].shape[0]'
    assert ms.describe_value(10**400).startswith("an integer of 401 digits")
    assert ms.describe_value(list(range(5))) == "a list of 5 items"
    ms.check_model_args("transformer", {"src_vocab": 100, "dropout": 0.2, "activation": "gelu"})
    with pytest.raises(ms.SchemaError, match=r"model\.args\.tie_embeddings must be true or false"):
        ms.check_model_args("transformer", {"tie_embeddings": "yes"})
    with pytest.raises(ms.SchemaError, match=r"model\.args\.dropout must be a finite number"):
        ms.check_model_args("transformer", {"dropout": math.inf})


# --- property tests: any mutation is a valid load or a UserError, never another exception ---

_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
    st.sampled_from(["lenet5", "resnet18", "lowrank_linear", "maestro_linear", "fc1", "mnist", "fp16"]),
)
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_PROPS = settings(max_examples=50, deadline=None,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(document: Any, data: st.DataObject) -> Any:
    """Replace (or delete) the value at a random JSON path of ``document`` by random JSON, 1-3 times."""
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(document)))
        value = data.draw(_json)
        if not path:
            document = value
            continue
        parent = document
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = value
    return document


@_PROPS
@given(data=st.data())
def test_property_mutated_bundle_manifest_loads_or_is_a_user_error(tmp_path_factory, bundles, data):
    which = data.draw(st.sampled_from(["dense", "lowrank"]))
    bundle = _copy(bundles[which], tmp_path_factory.mktemp("prop") / "b")
    manifest = _mutate(json.loads((bundle / MANIFEST).read_text()), data)
    digest = data.draw(st.sampled_from(["keep", "drop", "recompute"]))
    if isinstance(manifest, dict) and digest != "keep":
        manifest.pop(ms.DIGEST_KEY, None)
        if digest == "recompute":
            manifest[ms.DIGEST_KEY] = ms.manifest_digest(manifest)
    (bundle / MANIFEST).write_text(json.dumps(manifest))
    try:
        loaded = load_bundle(bundle)
    except UserError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert isinstance(loaded.model, torch.nn.Module) and not loaded.model.training
    assert all(isinstance(d, int) and d >= 1 for d in loaded.input_shape)
    assert (bundle / WEIGHTS).is_file()


@_PROPS
@given(document=_json)
def test_property_random_json_as_a_manifest_is_a_user_error(tmp_path_factory, bundles, document):
    bundle = _copy(bundles["dense"], tmp_path_factory.mktemp("prop") / "b")
    (bundle / MANIFEST).write_text(json.dumps(document))
    with pytest.raises(UserError):
        load_bundle(bundle)


@_PROPS
@given(data=st.data())
def test_property_mutated_onnx_manifest_validates_or_is_a_user_error(bundles, data):
    manifest = _mutate(json.loads((bundles[data.draw(st.sampled_from(["dense", "lowrank"]))] / MANIFEST)
                                  .read_text()), data)
    try:
        ms.validate_manifest(manifest, "m.onnx: metadata", onnx=True)
    except UserError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("m.onnx: metadata")


@_PROPS
@given(data=st.data())
def test_property_mutated_golden_json_loads_or_is_a_user_error(tmp_path_factory, golden, data):
    g = _copy(golden, tmp_path_factory.mktemp("gprop") / "g")
    manifest = _mutate(json.loads((g / MANIFEST_FILE).read_text()), data)
    (g / MANIFEST_FILE).write_text(json.dumps(manifest))
    try:
        loaded = load_golden(g)
    except UserError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(loaded, Golden) and loaded.samples == 6 and loaded.outputs
