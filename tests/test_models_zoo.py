"""CIFAR ResNet-18 and VGG-19: sizes, shapes for CIFAR and Fashion-MNIST, names, ONNX export, compress."""

from __future__ import annotations

import copy
import operator
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lrdeploy.compress import NO_SAVING, compress
from lrdeploy.errors import UserError
from lrdeploy.flops import count_params
from lrdeploy.layers.lowrank import LowRankConv2d
from lrdeploy.models import create_model, get_spec

ZOO = ("resnet18", "vgg19")


def _calibrated(model: nn.Module, in_channels: int = 3, size: int = 32) -> nn.Module:
    """Give BatchNorm real running statistics, then eval: with the fresh (0, 1) statistics a deep net's
    eval-mode signal all but vanishes, and an export check on near-constant logits would prove nothing."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        model(torch.randn(8, in_channels, size, size))
    return model.eval()


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_registry_specs():
    for name in ZOO:
        spec = get_spec(name)
        assert spec.input_shape == (3, 32, 32) and spec.num_classes == 10 and spec.description
        assert spec.default_args == {"num_classes": 10, "in_channels": 3, "width": 64}


def test_parameter_counts():
    # ResNet-18 (CIFAR form) matches Cuttlefish's resnet_cifar10.py / the usual 11.17M; VGG-19-BN has
    # bias-free convs (a bias before BatchNorm is redundant), one FC 512→10.
    assert count_params(create_model("resnet18")) == 11_173_962
    assert count_params(create_model("vgg19")) == 20_035_018
    assert count_params(create_model("resnet18", num_classes=100)) == 11_173_962 + 90 * 513
    small = count_params(create_model("resnet18", width=16))
    assert 11_173_962 / 20 < small < 11_173_962 / 12  # parameters scale with width²


@pytest.mark.parametrize("name", ZOO)
def test_output_shapes_for_cifar_and_fashion_mnist(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
        gray = create_model(name, in_channels=1, num_classes=7).eval()
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 7)


def test_stage_shapes():
    """CIFAR stem keeps 32×32 (no max-pool); stages halve from layer2; VGG pools reach 1×1 from 28×28 too."""
    resnet = create_model("resnet18", width=8).eval()
    seen: dict[str, tuple[int, ...]] = {}
    for n in ("conv1", "layer1", "layer2", "layer3", "layer4", "layer2.0.shortcut", "fc"):
        resnet.get_submodule(n).register_forward_hook(
            lambda m, i, o, n=n: seen.__setitem__(n, tuple(o.shape))
        )
    resnet(torch.zeros(1, 3, 32, 32))
    assert seen == {
        "conv1": (1, 8, 32, 32), "layer1": (1, 8, 32, 32), "layer2": (1, 16, 16, 16),
        "layer2.0.shortcut": (1, 16, 16, 16), "layer3": (1, 32, 8, 8), "layer4": (1, 64, 4, 4), "fc": (1, 10),
    }  # fmt: skip
    vgg = create_model("vgg19", width=8, in_channels=1).eval()
    assert vgg.features(torch.zeros(1, 1, 28, 28)).shape == (1, 64, 1, 1)  # 28→14→7→4→2→1 (ceil mode)
    assert vgg.features.get_submodule("15.conv").out_channels == 64


def test_bad_builder_arguments_are_user_errors():
    for name in ZOO:
        with pytest.raises(UserError, match="width"):
            create_model(name, width=0)
        with pytest.raises(UserError, match="num_classes"):
            create_model(name, num_classes=True)


@pytest.mark.parametrize("name", ZOO)
def test_every_layer_has_a_readable_dotted_name(name):
    model = create_model(name, width=8)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert all(model.get_submodule(n) is m for n, m in layers.items())
    if name == "resnet18":
        assert len(layers) == 1 + 16 + 3 + 1  # stem, 8 blocks × 2, three 1×1 shortcuts, classifier
        assert {"conv1", "layer1.0.conv1", "layer4.1.conv2", "layer2.0.shortcut.conv", "fc"} <= set(layers)
        assert isinstance(model.get_submodule("layer2.0.shortcut.bn"), nn.BatchNorm2d)
    else:
        assert list(layers) == [f"features.{i}.conv" for i in range(16)] + ["fc"]
        assert isinstance(model.get_submodule("features.pool5"), nn.MaxPool2d)
    # nothing hides in forward: the only non-module operation is the residual addition
    graph = torch.fx.symbolic_trace(model).graph
    functions = {node.target for node in graph.nodes if node.op == "call_function"}
    assert functions <= {operator.add}
    assert {node.op for node in graph.nodes} <= {"placeholder", "call_module", "call_function", "output"}


@pytest.mark.parametrize(
    ("name", "dynamo"),
    [("resnet18", True), ("vgg19", True), ("resnet18", False)],
    ids=["resnet18-dynamo", "vgg19-dynamo", "resnet18-legacy"],
)
def test_onnx_export_with_dynamic_batch_matches_onnxruntime(name, dynamo, tmp_path):
    """The dynamo exporter is the project's default (docs/exporter-choice.md); the legacy one its fallback."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = _calibrated(create_model(name, width=16))
    path = tmp_path / f"{name}.onnx"
    if dynamo:
        dynamic = {"dynamic_shapes": {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}}
    else:
        dynamic = {"dynamic_axes": {"x": {0: "batch"}, "logits": {0: "batch"}}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=dynamo, opset_version=20,
            input_names=["x"], output_names=["logits"], verbose=False, **dynamic,
        )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic batch dimension
    exact = copy.deepcopy(model).double()
    for batch in (1, 5):
        x = torch.randn(batch, 3, 32, 32)
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            ref, ref64 = model(x).numpy(), exact(x.double()).numpy()
        assert ref.std(axis=0).mean() > 1e-3 * np.abs(ref).mean() or batch == 1  # logits depend on the input
        # 1e-5, or 3× PyTorch's own fp32 rounding error where that is larger: through 16 conv-BN layers
        # VGG-19's fp32 logits are ~5e-6 (rel L2) from exact, so two correct fp32 engines may differ by ~1e-5.
        tolerance = max(1e-5, 3 * _rel_l2(ref, ref64))
        assert _rel_l2(got, ref) < tolerance


def test_compress_resnet18_keeps_stem_classifier_and_skips_shortcuts_without_saving():
    torch.manual_seed(0)
    model = _calibrated(create_model("resnet18", width=8))
    x = torch.randn(2, 3, 32, 32)
    report = compress(model, rank_ratio=0.25)
    by_name = {layer.name: layer for layer in report.layers}
    assert "first conv" in by_name["conv1"].skipped and "classifier" in by_name["fc"].skipped
    assert isinstance(model.conv1, nn.Conv2d) and isinstance(model.fc, nn.Linear)
    three_by_three = [n for n in by_name if n.startswith("layer") and "shortcut" not in n]
    assert len(three_by_three) == 16 and all(by_name[n].compressed for n in three_by_three)
    assert isinstance(model.get_submodule("layer3.1.conv2"), LowRankConv2d)
    assert report.param_ratio < 0.5
    assert model.eval()(x).shape == (2, 10)
    # At ratio 0.25 a 1×1 shortcut still saves parameters (r·(m+n) < m·n) and is factorised; at 0.75 it
    # would not, so it is skipped while every 3×3 conv still is factorised.
    shortcuts = [n for n in by_name if n.endswith("shortcut.conv")]
    assert len(shortcuts) == 3 and all(by_name[n].compressed for n in shortcuts)
    fresh = create_model("resnet18", width=8)
    high = {layer.name: layer for layer in compress(fresh, rank_ratio=0.75).layers}
    assert all(high[n].skipped == NO_SAVING for n in shortcuts)
    assert all(high[n].compressed for n in three_by_three)
    assert isinstance(fresh.get_submodule("layer2.0.shortcut.conv"), nn.Conv2d)
    # Cuttlefish never factorises shortcuts: an exclude pattern by name does that at any ratio.
    other = create_model("resnet18", width=8)
    excl = {layer.name: layer for layer in compress(other, rank_ratio=0.25, exclude="*.shortcut.*").layers}
    assert all(excl[n].skipped == "matched an exclude pattern" for n in shortcuts)


def test_compress_vgg19_keeps_first_conv_and_classifier():
    torch.manual_seed(0)
    model = _calibrated(create_model("vgg19", width=8))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
    report = compress(model, rank_ratio=0.25)
    assert [layer.name for layer in report.skipped] == ["features.0.conv", "fc"]
    assert len(report.compressed) == 15
    assert isinstance(model.features.get_submodule("0.conv"), nn.Conv2d) and isinstance(model.fc, nn.Linear)
    with torch.no_grad():
        after = model(x)
    assert after.shape == before.shape and torch.isfinite(after).all()
    # full rank is exact: a ratio of 1 only skips (no saving), leaving the function unchanged
    same = _calibrated(create_model("vgg19", width=8))
    assert all(not layer.compressed for layer in compress(same, rank_ratio=1.0).layers)
