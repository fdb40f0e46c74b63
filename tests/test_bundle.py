"""Bundles: exact round trip, tamper/corruption refusal, never clobbering user files, plain checkpoints."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from lrdeploy import bundle as bundle_mod
from lrdeploy.bundle import MANIFEST, WEIGHTS, load_bundle, load_state_dict_checkpoint, save_bundle
from lrdeploy.compress import compress
from lrdeploy.errors import UserError
from lrdeploy.layers.lowrank import LowRankConv2d, LowRankLinear
from lrdeploy.models import create_model

META = {
    "method": {"name": "svd", "rank_ratio": 0.5},
    "dataset": {"name": "mnist", "preprocess": {"scale": 1 / 255, "mean": [0.1307], "std": [0.3081]}},
    "metrics": {"test_accuracy": 0.9876, "train_loss": 0.04},
}


def _dense(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("lenet5")


def _lowrank(seed: int = 0) -> torch.nn.Module:
    model = _dense(seed)
    compress(model, rank_ratio=0.5)
    return model


def _save(path: Path, model: torch.nn.Module, **kw) -> Path:
    return save_bundle(path, model, model_name="lenet5", model_args={"num_classes": 10}, **{**META, **kw})


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture(scope="module")
def lowrank_model() -> torch.nn.Module:
    return _lowrank()


# --- round trip ---


def test_dense_round_trip_is_exact(tmp_path):
    model = _dense()
    out = _save(tmp_path / "b", model, extra={"note": "hello"})
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, WEIGHTS]
    loaded = load_bundle(out)
    _assert_same_tensors(model, loaded.model)
    assert not loaded.model.training
    assert loaded.input_shape == (1, 28, 28)
    assert loaded.path == out

    on_disk = json.loads((out / MANIFEST).read_text())
    assert loaded.manifest == on_disk
    m = loaded.manifest
    assert m["format"] == "lrdeploy-bundle" and m["format_version"] == 1
    assert m["model"] == {"name": "lenet5", "args": {"num_classes": 10}, "input_shape": [1, 28, 28],
                          "task": "classification", "source": "registry"}
    for key in ("method", "dataset", "metrics"):
        assert m[key] == META[key], key
    assert m["note"] == "hello"
    assert m["structure"] == {}
    assert m["params"] == sum(p.numel() for p in model.parameters())
    assert m["flops"] > 0
    assert m["weights_sha256"] == hashlib.sha256((out / WEIGHTS).read_bytes()).hexdigest()


def test_compressed_round_trip_restores_structure(tmp_path, lowrank_model):
    out = _save(tmp_path / "lr", lowrank_model)
    loaded = load_bundle(out)
    _assert_same_tensors(lowrank_model, loaded.model)
    for name, module in lowrank_model.named_modules():
        twin = loaded.model.get_submodule(name)
        assert type(twin) is type(module), name
        if isinstance(module, (LowRankLinear, LowRankConv2d)):
            assert twin.rank == module.rank
    assert set(loaded.manifest["structure"]) == {"conv2", "fc1", "fc2"}
    x = torch.randn(4, 1, 28, 28)
    lowrank_model.eval()
    with torch.no_grad():
        assert torch.equal(lowrank_model(x), loaded.model(x))


def test_bundle_respects_the_umask(tmp_path):
    out = _save(tmp_path / "b", _dense())
    umask = os.umask(0)
    os.umask(umask)
    for p in (out, out / MANIFEST, out / WEIGHTS):
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(p.stat().st_mode) == want, p


def test_save_keeps_the_models_mode(tmp_path):
    model = _dense().train()
    _save(tmp_path / "b", model)
    assert model.training


def test_extra_may_not_overwrite_own_fields(tmp_path):
    with pytest.raises(ValueError, match="weights_sha256"):
        _save(tmp_path / "b", _dense(), extra={"weights_sha256": "0" * 64})
    assert not (tmp_path / "b").exists()


# --- tampering and corruption ---


def test_one_changed_weight_byte_is_refused(tmp_path):
    out = _save(tmp_path / "b", _dense())
    data = bytearray((out / WEIGHTS).read_bytes())
    data[-5] ^= 0x01
    (out / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        load_bundle(out)


def test_truncated_weights_are_refused(tmp_path):
    out = _save(tmp_path / "b", _dense())
    data = (out / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="modified or truncated"):
        load_bundle(out)


def test_edited_manifest_checksum_is_refused(tmp_path):
    out = _save(tmp_path / "b", _dense())
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["weights_sha256"] = "f" * 64
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="checksum"):
        load_bundle(out)


def test_structure_that_does_not_fit_the_weights_is_refused(tmp_path, lowrank_model):
    out = _save(tmp_path / "b", lowrank_model)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["structure"]["fc1"]["rank"] -= 1  # checksum still matches the weights: structure is the lie
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="tampered"):
        load_bundle(out)
    from lrdeploy.manifest_schema import DIGEST_KEY, manifest_digest

    manifest[DIGEST_KEY] = manifest_digest(manifest)  # a forger who re-seals it meets the shape check
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="do not fit"):
        load_bundle(out)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "no manifest.json"),
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        (b"[1, 2, 3]", "not an lrdeploy bundle"),
        (b'{"format": "something-else"}', "not an lrdeploy bundle"),
        (b'{"format": "lrdeploy-bundle", "format_version": 99}', "format version"),
        (b'{"format": "lrdeploy-bundle", "format_version": 1, "model": {"name": "lenet5"}}', "lacks"),
    ],
)
def test_missing_or_garbage_manifest_is_refused(tmp_path, content, match):
    out = _save(tmp_path / "b", _dense())
    if content is None:
        (out / MANIFEST).unlink()
    else:
        (out / MANIFEST).write_bytes(content)
    with pytest.raises(UserError, match=match):
        load_bundle(out)


def test_missing_bundle_or_weights_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_bundle(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="not a bundle directory"):
        load_bundle(tmp_path / "file")
    out = _save(tmp_path / "b", _dense())
    (out / WEIGHTS).unlink()
    with pytest.raises(UserError, match="no weights.safetensors"):
        load_bundle(out)


def test_load_accepts_the_manifest_path(tmp_path):
    out = _save(tmp_path / "b", _dense())
    assert load_bundle(out / MANIFEST).path == out


# --- writing safely ---


def test_refuses_to_clobber_a_users_directory(tmp_path):
    target = tmp_path / "mine"
    (target / "sub").mkdir(parents=True)
    (target / "notes.txt").write_text("precious")
    (target / "sub" / "data.bin").write_bytes(b"\x00\x01")
    before = _snapshot(target)
    with pytest.raises(UserError, match="--force"):
        _save(target, _dense())
    with pytest.raises(UserError, match="not an lrdeploy bundle"):  # not even with force
        _save(target, _dense(), force=True)
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temp debris beside it


def test_refuses_a_bundle_holding_foreign_files(tmp_path):
    out = _save(tmp_path / "b", _dense())
    (out / "model.onnx").write_bytes(b"user file")
    before = _snapshot(out)
    with pytest.raises(UserError, match="not an lrdeploy bundle"):  # replacing it would lose model.onnx
        _save(out, _dense(1), force=True)
    assert _snapshot(out) == before


def test_refuses_a_file_as_destination(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="not a directory"):
        _save(tmp_path / "f", _dense())
    assert (tmp_path / "f").read_text() == "x"


def test_empty_directory_is_fine(tmp_path):
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "empty", _dense())
    assert load_bundle(tmp_path / "empty").manifest["model"]["name"] == "lenet5"


def test_saving_over_a_bundle_replaces_it(tmp_path, lowrank_model):
    out = _save(tmp_path / "b", _dense(0))
    with pytest.raises(UserError, match="--force"):
        _save(out, lowrank_model)
    _save(out, lowrank_model, metrics={"test_accuracy": 0.5}, force=True)
    loaded = load_bundle(out)
    _assert_same_tensors(lowrank_model, loaded.model)
    assert loaded.manifest["metrics"] == {"test_accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_failed_save_leaves_the_old_bundle_intact(tmp_path, monkeypatch):
    out = _save(tmp_path / "b", _dense(0))
    before = _snapshot(out)

    real = bundle_mod._write_synced

    def boom(path, data):
        if path.name == MANIFEST:  # the weights are already written: a crash half-way through the save
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(bundle_mod, "_write_synced", boom)
    with pytest.raises(OSError, match="disk full"):
        _save(out, _dense(1), force=True)
    assert _snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    load_bundle(out)


def test_unserialisable_metadata_writes_nothing(tmp_path):
    with pytest.raises(TypeError):
        _save(tmp_path / "b", _dense(), metrics={"bad": object()})
    assert list(tmp_path.iterdir()) == []


# --- plain PyTorch checkpoints ---


@pytest.mark.parametrize(
    "wrap",
    [
        lambda sd: sd,
        lambda sd: {"state_dict": sd, "epoch": 3},
        lambda sd: {"model": sd, "optimizer": {"lr": 0.1}},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
        lambda sd: {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    ],
    ids=["raw", "state_dict", "model", "module-prefix", "wrapped-prefix"],
)
def test_checkpoint_loads(tmp_path, wrap):
    source = _dense(3)
    torch.save(wrap(source.state_dict()), tmp_path / "ckpt.pt")
    target = _dense(0)
    assert load_state_dict_checkpoint(tmp_path / "ckpt.pt", target) is target
    _assert_same_tensors(source, target)


def test_checkpoint_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    source = _dense(3)
    save_file(source.state_dict(), tmp_path / "ckpt.safetensors")
    target = _dense(0)
    load_state_dict_checkpoint(tmp_path / "ckpt.safetensors", target)
    _assert_same_tensors(source, target)


def test_checkpoint_wrong_key_is_refused(tmp_path):
    sd = _dense(3).state_dict()
    sd["fc9.weight"] = sd.pop("fc1.weight")
    torch.save(sd, tmp_path / "ckpt.pt")
    target = _dense(0)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError, match=r"missing fc1\.weight.*unexpected fc9\.weight"):
        load_state_dict_checkpoint(tmp_path / "ckpt.pt", target)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded


def test_checkpoint_wrong_shape_is_refused(tmp_path):
    torch.save(create_model("lenet5", num_classes=7).state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match=r"wrong shape fc3\.weight \(7, 84\) vs \(10, 84\)"):
        load_state_dict_checkpoint(tmp_path / "ckpt.pt", _dense(0))


def test_dense_checkpoint_into_compressed_model_is_refused(tmp_path, lowrank_model):
    torch.save(_dense(3).state_dict(), tmp_path / "ckpt.pt")
    with pytest.raises(UserError, match="does not match the model"):
        load_state_dict_checkpoint(tmp_path / "ckpt.pt", _lowrank())


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"not a checkpoint at all", "could not be read"),
        ("evil", "could not be read"),
        ("nontensor", "holds no state dict"),
    ],
)
def test_bad_checkpoint_files_are_refused(tmp_path, payload, match):
    path = tmp_path / "ckpt.pt"
    if payload == "evil":
        torch.save({"x": _Evil()}, path)
    elif payload == "nontensor":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    else:
        path.write_bytes(payload)
    with pytest.raises(UserError, match=match):
        load_state_dict_checkpoint(path, _dense())


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict_checkpoint(tmp_path / "nope.pt", _dense())


# --- checkpoints whose values cannot be weights (issue 9) ---


def _poison(name: str, tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.clone()
    if name == "nan":
        t.view(-1)[:3] = float("nan")
        t.view(-1)[3] = float("-inf")
        return t
    return {"complex": lambda: t.to(torch.complex64), "int": lambda: t.round().to(torch.int32),
            "bool": lambda: t > 0, "sparse": lambda: t.to_sparse(), "csr": lambda: t.to_sparse_csr(),
            "meta": lambda: t.to("meta")}[name]()


@pytest.mark.parametrize("kind, match", [
    ("nan", "tensor 'fc1.weight' contains 3 NaN / 1 Inf values (of 48000)"),
    ("complex", "tensor 'fc1.weight' is complex (complex64) where the model has real float32 weights"),
    ("int", "tensor 'fc1.weight' is int32 where the model has floating-point float32 weights"),
    ("bool", "tensor 'fc1.weight' is bool where"),
    ("sparse", "tensor 'fc1.weight' is a sparse tensor (layout sparse_coo)"),
    ("csr", "tensor 'fc1.weight' is a sparse tensor (layout sparse_csr)"),
    ("meta", "tensor 'fc1.weight' is a meta tensor (shape only, no data)"),
])
@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_checkpoint_values_that_cannot_be_weights_are_refused(tmp_path, kind, match):
    state = _dense(0).state_dict()
    state["fc1.weight"] = _poison(kind, state["fc1.weight"])
    state["fc2.weight"] = _poison(kind, state["fc2.weight"])
    torch.save(state, tmp_path / "ckpt.pt")
    target = _dense(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(UserError, match=re.escape(match)) as err:
        load_state_dict_checkpoint(tmp_path / "ckpt.pt", target)
    assert "\n" not in str(err.value) and "fc2" not in str(err.value)  # one line, first key in model order
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())  # nothing half-loaded


def test_integer_buffers_stay_integer_and_finite_checkpoints_still_load(tmp_path):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    state = model.state_dict()
    assert state["1.num_batches_tracked"].dtype == torch.int64  # not "where floats belong": accepted
    torch.save(state, tmp_path / "ckpt.pt")
    load_state_dict_checkpoint(tmp_path / "ckpt.pt", torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3),
                                                                        torch.nn.BatchNorm2d(2)))


def test_checkpoint_that_is_a_directory_says_so(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        load_state_dict_checkpoint(tmp_path, _dense(0))
    with pytest.raises(UserError, match="does not exist"):
        load_state_dict_checkpoint(tmp_path / "missing.pt", _dense(0))


class _Smuggled:
    """Any class outside the weights-only allowlist: its GLOBAL opcode is what torch refuses."""


def test_weights_only_refusal_names_the_blocked_global_in_one_line(tmp_path):
    torch.save({"fc1.weight": _Smuggled()}, tmp_path / "evil.pt")
    with pytest.raises(UserError) as err:
        load_state_dict_checkpoint(tmp_path / "evil.pt", _dense(0))
    text = str(err.value)
    # torch's message opens with ~300 characters of advice; the old 200-character cut never reached this part
    assert f"GLOBAL {__name__}._Smuggled" in text and "\n" not in text and "\x1b" not in text
    assert "weights-only unpickler blocked it" in text
