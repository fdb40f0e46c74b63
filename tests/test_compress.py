"""compress() layer selection and rank choice, and the structure describe/apply round trip."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from lrdeploy.compress import NO_SAVING, compress
from lrdeploy.errors import UserError
from lrdeploy.flops import count_params
from lrdeploy.layers import LowRankConv2d, LowRankLinear, structure


class TinyLeNet(nn.Module):
    """LeNet-5-shaped test model (conv1, conv2, classifier.{0,2,4}); independent of lrdeploy.models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Sequential(
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.classifier(x.flatten(1))


def _model(seed: int = 0) -> TinyLeNet:
    torch.manual_seed(seed)
    return TinyLeNet().eval()


def _by_name(report):
    return {layer.name: layer for layer in report.layers}


def test_compress_by_ratio_selects_by_name_and_keeps_first_conv_and_classifier():
    model = _model()
    before = count_params(model)
    report = compress(model, rank_ratio=0.5)
    layers = _by_name(report)
    assert list(layers) == ["conv1", "conv2", "classifier.0", "classifier.2", "classifier.4"]

    assert isinstance(model.conv1, nn.Conv2d) and "first conv" in layers["conv1"].skipped
    assert type(model.classifier[4]) is nn.Linear and "classifier" in layers["classifier.4"].skipped
    assert isinstance(model.conv2, LowRankConv2d) and model.conv2.rank == 8  # ceil(0.5 · 16)
    assert isinstance(model.classifier[0], LowRankLinear) and model.classifier[0].rank == 60
    assert isinstance(model.classifier[2], LowRankLinear) and model.classifier[2].rank == 42
    assert [layer.name for layer in report.compressed] == ["conv2", "classifier.0", "classifier.2"]

    c2 = layers["conv2"]
    assert c2.shape == (16, 6, 5, 5) and c2.full_rank == 16 and c2.kind == "conv2d"
    assert c2.params_before == 16 * 150 + 16 and c2.params_after == 8 * 150 + 16 * 8 + 16
    assert 0 < c2.energy_kept < 1
    assert report.model_params_before == before
    assert report.model_params_after == count_params(model) < before
    saved = sum(lr.params_before - lr.params_after for lr in report.layers)
    assert before - report.model_params_after == saved
    json.dumps(report.to_dict())  # serialisable for manifests
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_compress_skips_layers_without_saving():
    model = _model()
    report = compress(model, rank_ratio=0.75)
    layers = _by_name(report)
    # classifier.2 is 84×120: r = 63 and 63·(84+120) = 12852 ≥ 84·120 = 10080 → no saving.
    assert layers["classifier.2"].skipped == NO_SAVING and layers["classifier.2"].rank == 63
    assert type(model.classifier[2]) is nn.Linear
    assert layers["classifier.2"].params_after == layers["classifier.2"].params_before
    # classifier.0 is 120×400: r = 90 and 90·520 = 46800 < 48000 → compressed.
    assert isinstance(model.classifier[0], LowRankLinear) and model.classifier[0].rank == 90
    assert isinstance(model.conv2, LowRankConv2d) and model.conv2.rank == 12

    dense = _model()
    report = compress(dense, rank_ratio=1.0)
    assert report.compressed == []
    assert all(lr.skipped for lr in report.layers)
    assert report.model_params_after == report.model_params_before


def test_compress_include_exclude_and_flags():
    model = _model()
    report = compress(model, rank_ratio=0.5, include=["classifier.*"])
    layers = _by_name(report)
    assert "include" in layers["conv2"].skipped and isinstance(model.conv2, nn.Conv2d)
    assert isinstance(model.classifier[0], LowRankLinear)

    model = _model()
    report = compress(model, rank_ratio=0.5, exclude="classifier.0")
    layers = _by_name(report)
    assert "exclude" in layers["classifier.0"].skipped and type(model.classifier[0]) is nn.Linear
    assert isinstance(model.conv2, LowRankConv2d) and isinstance(model.classifier[2], LowRankLinear)

    model = _model()
    compress(model, rank_ratio=0.5, keep_first_conv=False, keep_classifier=False)
    assert isinstance(model.conv1, LowRankConv2d) and model.conv1.rank == 3
    assert isinstance(model.classifier[4], LowRankLinear) and model.classifier[4].rank == 5

    # min_saving: conv2 saves 1 - 1328/2400 = 45 %, classifier.0 35 %, classifier.2 15 %.
    model = _model()
    report = compress(model, rank_ratio=0.5, min_saving=0.4)
    assert [lr.name for lr in report.compressed] == ["conv2"]
    assert "min_saving" in _by_name(report)["classifier.0"].skipped


def _with_spectrum(linear: nn.Linear, s: torch.Tensor) -> None:
    out_f, in_f = linear.weight.shape
    u, _ = torch.linalg.qr(torch.randn(out_f, len(s), dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(in_f, len(s), dtype=torch.float64))
    with torch.no_grad():
        linear.weight.copy_((u * s) @ v.T)


def test_compress_by_energy_on_known_spectrum():
    model = _model()
    s = 2.0 ** -torch.arange(120, dtype=torch.float64)  # energy kept by r components: 1 - 4^-r
    _with_spectrum(model.classifier[0], s)
    w = model.classifier[0].weight.detach().clone()
    report = compress(model, energy=0.99)
    layer = _by_name(report)["classifier.0"]
    # 1 - 4^-3 = 0.984 < 0.99 ≤ 1 - 4^-4 = 0.996
    assert layer.rank == 4 and model.classifier[0].rank == 4
    assert layer.energy_kept == pytest.approx(1 - 4.0**-4, abs=1e-6)
    u, sv, vh = torch.linalg.svd(w.double(), full_matrices=False)
    ref = (u[:, :4] * sv[:4]) @ vh[:4]
    torch.testing.assert_close(model.classifier[0].dense_weight().double(), ref, rtol=1e-5, atol=1e-6)

    # A random conv needs most of its rank for 99 % energy: its choice follows the reference spectrum.
    conv = _by_name(report)["conv2"]
    ref_sv = torch.linalg.svdvals(_model().conv2.weight.detach().reshape(16, -1).double())
    frac = torch.cumsum(ref_sv**2, 0) / (ref_sv**2).sum()
    assert conv.rank == int((frac < 0.99).sum()) + 1
    assert (conv.skipped == NO_SAVING) == (conv.rank * (16 + 150) >= 16 * 150)


def test_compress_ineligible_and_already_compressed():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("stem", nn.Conv2d(3, 8, 3))
    model.add_module("dw", nn.Conv2d(8, 8, 3, groups=8))
    model.add_module("proj", nn.Conv2d(8, 32, 3))
    report = compress(model, rank_ratio=0.25)
    layers = _by_name(report)
    assert "grouped" in layers["dw"].skipped and isinstance(model.dw, nn.Conv2d)
    assert isinstance(model.proj, LowRankConv2d) and model.proj.rank == 8

    again = compress(model, rank_ratio=0.25)
    layers = _by_name(again)
    assert layers["proj"].skipped == "already low-rank"
    assert "proj.first" not in layers and "proj.second" not in layers  # factors are not re-factorised
    assert model.proj.rank == 8


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(rank_ratio=0),
        dict(rank_ratio=1.5),
        dict(rank_ratio=-0.5),
        dict(energy=0),
        dict(energy=1.5),
        dict(rank_ratio=0.5, energy=0.9),
        dict(),
        dict(rank_ratio=0.5, min_saving=1.0),
    ],
)
def test_compress_rejects_bad_arguments(kwargs):
    model = _model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UserError):
        compress(model, **kwargs)
    assert model.state_dict().keys() == state.keys()  # untouched
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- structure round trip


def test_structure_round_trip_loads_strict_and_reproduces_outputs():
    model = _model(0)
    compress(model, rank_ratio=0.5, keep_first_conv=False)
    desc = structure.describe(model)
    assert set(desc) == {"conv1", "conv2", "classifier.0", "classifier.2"}
    assert desc["conv2"] == {
        "kind": "lowrank_conv2d",
        "rank": 8,
        "full_rank": 16,
        "in": 6,
        "out": 16,
        "kernel": [5, 5],
        "bias": True,
        "stride": [1, 1],
        "padding": [0, 0],
        "dilation": [1, 1],
    }
    assert desc["classifier.2"]["kind"] == "lowrank_linear" and desc["classifier.2"]["rank"] == 42
    desc = json.loads(json.dumps(desc))  # as stored in the manifest

    fresh = _model(123)
    with pytest.raises(RuntimeError):
        fresh.load_state_dict(model.state_dict(), strict=True)  # dense shape: does not load
    assert structure.apply(fresh, desc) is fresh
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(fresh(x), model(x))
    assert structure.describe(fresh) == desc


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.update({"nope.0": d.pop("conv2")}), "does not exist"),
        (lambda d: d["conv2"].update(kind="lowrank_magic"), "unknown layer kind"),
        (lambda d: d["conv2"].update(kind="lowrank_linear"), "manifest says"),
        (lambda d: d["conv2"].update(rank=17), "rank"),
        (lambda d: d["conv2"].update(rank="8"), "rank"),
        (lambda d: d["conv2"].update(out=32), "out"),
        (lambda d: d["classifier.0"].update({"in": 401}), "in"),
    ],
)
def test_structure_apply_rejects_mismatch(mutate, match):
    model = _model()
    compress(model, rank_ratio=0.5)
    desc = structure.describe(model)
    mutate(desc)
    with pytest.raises(UserError, match=match):
        structure.apply(_model(), desc)


def test_multihead_attention_projection_is_kept_dense_and_the_model_still_runs():
    """nn.MultiheadAttention hands out_proj.weight to the functional kernel; factorising out_proj broke the
    model (no .weight), so compress keeps it dense, says why, and still factorises the layers around it."""
    import torch
    from torch import nn

    from lrdeploy.compress import compress

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.ff = nn.Linear(64, 64)
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h, _ = self.attn(x, x, x)
            return self.head(self.ff(h).mean(1))

    torch.manual_seed(0)
    model = Block().eval()
    x = torch.randn(2, 5, 64)
    report = compress(model, rank_ratio=0.25)
    skipped = {layer.name: layer.skipped for layer in report.layers}
    assert "MultiheadAttention" in (skipped["attn.out_proj"] or "")
    assert skipped["ff"] is None  # the layers around it are still factorised
    assert model(x).shape == (2, 10)  # and the model still runs


def test_multihead_attention_in_proj_is_reported_and_the_model_compresses_exports_and_runs(tmp_path):
    """The fused in_proj_weight is a bare Parameter, not a Linear: compress reports it as skipped; the
    compressed model (out_proj dense, the layers around it factorised) exports to ONNX and matches PyTorch."""
    import numpy as np
    import onnxruntime as ort

    from lrdeploy.exporters.onnx import export_onnx
    from lrdeploy.methods.selection import MHA_IN_PROJ

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(16, 64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.ff = nn.Linear(64, 64)
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            a, _ = self.attn(h, h, h, need_weights=False)
            return self.head(torch.relu(self.ff(h + a)).mean(1))

    torch.manual_seed(0)
    model = Encoder().eval()
    x = torch.randn(3, 7, 16)
    report = compress(model, rank_ratio=0.25, activation_aware=True, calibration=x)
    rows = _by_name(report)
    assert list(rows) == ["embed", "attn.in_proj_weight", "attn.out_proj", "ff", "head"]
    assert rows["attn.in_proj_weight"].skipped == MHA_IN_PROJ
    fused = rows["attn.in_proj_weight"]
    assert fused.shape == (192, 64) and fused.params_before == fused.params_after == 192 * 65
    assert "MultiheadAttention" in rows["attn.out_proj"].skipped
    assert not isinstance(model.attn.out_proj, LowRankLinear)
    assert isinstance(model.embed, LowRankLinear) and isinstance(model.ff, LowRankLinear)
    assert "classifier" in rows["head"].skipped  # a user module: the last Linear outside the attention
    saved = sum(r.params_before - r.params_after for r in report.layers)
    assert report.model_params_before - report.model_params_after == saved  # in_proj rows count nothing twice

    result = export_onnx(model, tmp_path / "mha.onnx", input_shape=(7, 16), optimize=False)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    for batch in (1, 4):
        xb = torch.randn(batch, 7, 16)
        (got,) = session.run(None, {name: xb.numpy()})
        with torch.no_grad():
            ref = model(xb).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- one layer-selection policy


def test_selection_asks_the_model_spec_and_falls_back_to_first_conv_and_last_linear():
    from lrdeploy.methods.cuttlefish import select_layers as cuttlefish_layers
    from lrdeploy.methods.maestro import decompose
    from lrdeploy.methods.selection import FALLBACK_CLASSIFIER, FALLBACK_STEM, SPEC_STEM, select_layers
    from lrdeploy.models import ModelSpec, create_model
    from lrdeploy.models.registry import spec_of

    # a user module without a spec: first conv and last Linear
    selected, kept = select_layers(_model())
    assert selected == ["conv2", "classifier.0", "classifier.2"]
    assert kept == {"conv1": FALLBACK_STEM, "classifier.4": FALLBACK_CLASSIFIER}

    # a spec that names other modules is obeyed, patterns included, and nothing else is guessed
    spec = ModelSpec("tiny", TinyLeNet, (1, 28, 28), 10, "", stem=("conv*",), classifier=("classifier.[24]",))
    selected, kept = select_layers(_model(), spec=spec)
    assert selected == ["classifier.0"] and set(kept) == {"conv1", "conv2", "classifier.2", "classifier.4"}
    only_head = ModelSpec("tiny", TinyLeNet, (1, 28, 28), 10, "", classifier=("classifier.4",))
    assert select_layers(_model(), spec=only_head)[0] == ["conv1", "conv2", "classifier.0", "classifier.2"]
    assert select_layers(_model(), spec=spec, keep_stem=False)[0] == ["conv1", "conv2", "classifier.0"]

    # zoo models carry their spec from create_model (through deepcopy too); every method uses it
    lenet = create_model("lenet5")
    assert spec_of(lenet).name == "lenet5" and spec_of(copy.deepcopy(lenet)).name == "lenet5"
    assert select_layers(lenet)[1] == {"conv1": SPEC_STEM, "fc3": "classifier (named by the model spec)"}
    report = compress(copy.deepcopy(lenet), rank_ratio=0.5)
    assert [r.name for r in report.compressed] == ["conv2", "fc1", "fc2"]
    assert "first conv" in _by_name(report)["conv1"].skipped
    assert cuttlefish_layers(lenet)[0] == ["conv2", "fc1", "fc2"]
    assert decompose(copy.deepcopy(lenet)) == ["conv2", "fc1", "fc2"]


def test_a_layer_whose_weight_is_tied_stays_dense():
    """A Linear sharing its weight with an embedding (tied input/output projections) keeps the tie."""

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 32)
            self.mix = nn.Linear(32, 32)
            self.out = nn.Linear(32, 50, bias=False)
            self.out.weight = self.embed.weight
            self.head = nn.Linear(50, 2)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.out(self.mix(self.embed(ids))).mean(1))

    torch.manual_seed(0)
    model = Tied().eval()
    rows = _by_name(compress(model, rank_ratio=0.25))
    assert rows["out"].skipped == "weight tied to embed: factorising would untie them"
    assert model.out.weight is model.embed.weight and isinstance(model.mix, LowRankLinear)
    assert model(torch.randint(0, 50, (2, 5))).shape == (2, 2)
