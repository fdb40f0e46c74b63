"""Cuttlefish: stable rank, ξ, the detector, layer selection, the switch, FD, extra BN, K, end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from lrdeploy.data import load_dataset
from lrdeploy.errors import UserError
from lrdeploy.exporters.fold import fold_model
from lrdeploy.layers import LowRankConv2d, LowRankLayer, LowRankLinear
from lrdeploy.layers.lowrank_bn import LowRankConv2dBN
from lrdeploy.layers.structure import apply, describe
from lrdeploy.layers.svd import full_rank_of
from lrdeploy.methods import get_method, list_methods
from lrdeploy.methods.cuttlefish import (
    Cuttlefish,
    block_of,
    detect_switch,
    ema,
    factorise,
    frobenius_decay_,
    group_blocks,
    layer_is_stable,
    measure_k,
    relaxed_tau,
    scaled_rank,
    select_layers,
    stable_rank,
    update_stable,
)
from lrdeploy.models import create_model
from lrdeploy.train import TrainConfig, train

FAST = {"batch_size": 32, "progress": False, "num_threads": 1}


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    """On a shared 2-core box a busy neighbour makes 2-thread OpenMP kernels many times slower."""
    torch.set_num_threads(1)


class Block(nn.Module):
    """A CIFAR-ResNet BasicBlock in miniature: two 3×3 convs, a 1×1 conv shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = nn.Sequential(Block(width, width), Block(width, width))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2), Block(2 * width, 2 * width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer2(self.layer1(torch.relu(self.bn1(self.conv1(x)))))
        return self.linear(self.pool(out).flatten(1))


BLOCK_CONVS = [f"layer{s}.{b}.conv{c}" for s in (1, 2) for b in (0, 1) for c in (1, 2)]


# --- pure functions -------------------------------------------------------------------------------


def test_stable_rank_matches_the_formula():
    assert stable_rank(torch.diag(torch.tensor([3.0, 2.0, 1.0]))) == 1  # floor(14 / 9)
    assert stable_rank(torch.eye(7)) == 7
    assert stable_rank(nn.init.orthogonal_(torch.empty(64, 64))) == 64  # Σs²/max s² ≈ 64 − float noise
    assert stable_rank(torch.zeros(4, 5)) == 0
    torch.manual_seed(0)
    graded = torch.randn(16, 8, 3, 3) * torch.linspace(0.1, 3, 16)[:, None, None, None]
    for w in (torch.randn(30, 50), graded):
        s = np.linalg.svd(w.reshape(w.shape[0], -1).double().numpy(), compute_uv=False)
        assert stable_rank(w) == math.floor((s**2).sum() / s.max() ** 2)


def test_scaled_rank():
    assert scaled_rank(25, 120 / 50, 120) == 60  # 2.4·25 = 60.000000000000007 in floats; no spurious +1
    assert scaled_rank(50, 120 / 50, 120) == 120  # the initial stable rank maps to full rank
    assert scaled_rank(60, 2.4, 120) == 120  # capped
    assert scaled_rank(7, 1.1, 100) == 8
    assert scaled_rank(0, 2.0, 10) == 1


def test_ema_is_the_n_point_ema_seeded_with_the_first_value():
    assert ema([1, 2, 3], 3) == pytest.approx([1.0, 1.5, 2.25])  # α = 2/(3+1)
    assert ema([], 5) == []


SETTLE = [64, 50, 42, 38, 36, 35] + [35] * 34  # 40 epochs, flat after the sixth
MOVING = [64 - i for i in range(40)]  # keeps falling by one per epoch
RAMP = [50 - 0.3 * i for i in range(40)]  # EMA slope ≈ 0.3: stable only at τ ≥ 0.3


def test_detector_fires_when_ranks_settle_and_not_while_they_move():
    assert not layer_is_stable(SETTLE[:15], 15, 0.1)  # needs more than W points
    assert not layer_is_stable(SETTLE[:20], 15, 0.1)  # the EMA still lags the drop
    assert layer_is_stable(SETTLE, 15, 0.1)
    assert not layer_is_stable(MOVING, 15, 0.1)
    assert not layer_is_stable(MOVING, 15, 0.5)
    assert detect_switch({"a": SETTLE, "b": SETTLE})
    assert not detect_switch({"a": SETTLE[:30], "b": SETTLE[:30], "c": SETTLE[:30]})
    # With only two layers tracked, τ is relaxed (×2.5) from the start, as in the reference.
    assert detect_switch({"a": SETTLE[:30], "b": SETTLE[:30]})
    assert not detect_switch({"a": SETTLE, "b": MOVING})
    assert detect_switch({})
    # Short windows for CPU runs: a constant history is stable as soon as it has W + 1 points.
    assert layer_is_stable([9, 9, 9, 9], 3, 0.1) and not layer_is_stable([9, 9, 9], 3, 0.1)


def test_tau_relaxation_lets_the_last_layers_through():
    assert relaxed_tau(0.1, 5) == pytest.approx(0.1)
    assert relaxed_tau(0.1, 2) == pytest.approx(0.25)
    assert relaxed_tau(0.1, 1) == pytest.approx(0.5)
    assert relaxed_tau(0.33, 5, ((6, 2.5), (3, 5.0))) == pytest.approx(0.825)  # the ImageNet rule
    assert not layer_is_stable(RAMP, 15, 0.25) and layer_is_stable(RAMP, 15, 0.5)
    # a and b settle; then c is the only one left, τ becomes 0.5 and c passes.
    assert detect_switch({"a": SETTLE, "b": SETTLE, "c": RAMP})
    assert not detect_switch({"a": SETTLE, "b": SETTLE, "c": RAMP}, relax=())
    # two ramps left: τ = 0.25 is still too strict for them.
    assert not detect_switch({"a": SETTLE, "b": SETTLE, "c": RAMP, "d": RAMP})


def test_incremental_detector_agrees_with_the_replay():
    histories = {"a": SETTLE, "b": SETTLE[2:] + [35, 35], "c": RAMP}
    stable: set[str] = set()
    for n in range(1, 41):
        stable = update_stable({k: h[:n] for k, h in histories.items()}, stable, 15, 0.1)
        assert (len(stable) == 3) == detect_switch({k: h[:n] for k, h in histories.items()})


# --- the method object ----------------------------------------------------------------------------


def test_registry_and_settings():
    assert "cuttlefish" in list_methods()
    hook = get_method("cuttlefish", epochs=10, window=3)
    assert isinstance(hook, Cuttlefish)
    record = hook.manifest_record()
    assert record["name"] == "cuttlefish" and record["settings"]["window"] == 3
    assert record["settings"]["frob_decay"] is True and record["settings"]["extra_bn"] is False
    json.dumps(record)
    again = get_method("cuttlefish", **record["settings"])  # a manifest's settings rebuild the same hook
    assert again.manifest_record()["settings"] == record["settings"]
    with pytest.raises(UserError, match="unknown method"):
        get_method("cutlefish")
    with pytest.raises(UserError, match="no setting"):
        get_method("cuttlefish", windw=3)
    with pytest.raises(UserError, match="max_warmup_fraction"):
        get_method("cuttlefish", max_warmup_fraction=1.0)


def test_frobenius_decay_and_extra_bn_are_exclusive():
    with pytest.raises(UserError, match="mutually exclusive"):
        get_method("cuttlefish", frob_decay=True, extra_bn=True)
    hook = get_method("cuttlefish", extra_bn=True)  # asking for the BN turns FD off rather than failing
    assert hook.settings["frob_decay"] is False and hook.settings["extra_bn"] is True


def test_xi_is_fixed_at_initialisation():
    torch.manual_seed(0)
    model = TinyResNet()
    hook = get_method("cuttlefish", epochs=4)
    hook.on_train_start(model, None)
    layers = hook.manifest_record()["log"]["layers"]
    assert list(layers) == BLOCK_CONVS
    for name, entry in layers.items():
        w = model.get_submodule(name).weight
        s0 = stable_rank(w)
        assert entry["full_rank"] == full_rank_of(w)
        assert entry["xi"] == pytest.approx(entry["full_rank"] / s0)
        assert entry["stable_rank_history"] == [s0]
        assert scaled_rank(s0, entry["xi"], entry["full_rank"]) == entry["full_rank"]
    xi = {name: entry["xi"] for name, entry in layers.items()}
    with torch.no_grad():
        model.layer1[0].conv1.weight[0] *= 50  # one dominant direction: its stable rank drops to 1
    assert hook.on_epoch_end(0, model, {}) is None  # 1 of 4 epochs: too early to switch
    layers = hook.manifest_record()["log"]["layers"]
    assert {name: entry["xi"] for name, entry in layers.items()} == xi  # ξ stays as measured at init
    assert layers["layer1.0.conv1"]["stable_rank_history"][-1] == 1


# --- layer selection ------------------------------------------------------------------------------


def test_layer_selection_keeps_stem_classifier_and_shortcuts_dense():
    model = TinyResNet()
    candidates, kept = select_layers(model)
    assert candidates == BLOCK_CONVS
    assert kept == {
        "conv1": "stem (first conv)",
        "layer2.0.shortcut.0": "residual shortcut/downsample",
        "linear": "classifier (last Linear)",
    }
    assert list(group_blocks(model, candidates)) == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert select_layers(model, exclude=["layer2.*"])[0] == BLOCK_CONVS[:4]
    lenet = create_model("lenet5")
    assert select_layers(lenet)[0] == ["conv2", "fc1", "fc2"]
    assert [block_of(lenet, n) for n in ("conv2", "fc1")] == ["conv2", "fc1"]  # no blocks: each its own


def test_layer_selection_on_lrdeploy_models():
    pytest.importorskip("lrdeploy.models.resnet")
    pytest.importorskip("lrdeploy.models.vgg")
    resnet = create_model("resnet18", width=8)
    candidates, kept = select_layers(resnet)
    assert len(candidates) == 16 and all(n.startswith("layer") and ".shortcut" not in n for n in candidates)
    assert "conv1" in kept and sum("shortcut" in n for n in kept) == 3 and len(kept) == 5
    assert list(group_blocks(resnet, candidates))[:3] == ["layer1.0", "layer1.1", "layer2.0"]
    vgg = create_model("vgg19")
    candidates, kept = select_layers(vgg)
    assert len(candidates) == 15 and set(kept) == {"features.0.conv", "fc"}
    assert list(group_blocks(vgg, candidates))[:2] == ["features.1", "features.2"]


# --- the switch -----------------------------------------------------------------------------------


def test_factorised_model_is_exact_at_full_rank_and_within_svd_error_below():
    torch.manual_seed(0)
    model = TinyResNet().double().eval()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    full = {n: full_rank_of(model.get_submodule(n).weight) for n in BLOCK_CONVS}
    new = factorise(model, full)
    assert all(isinstance(new.get_submodule(n), LowRankConv2d) for n in BLOCK_CONVS)
    assert isinstance(model.layer1[0].conv1, nn.Conv2d)  # the original is untouched
    torch.testing.assert_close(new(x), model(x), rtol=1e-10, atol=1e-10)

    linear = nn.Sequential(nn.Linear(40, 30)).double()
    w = linear[0].weight.detach()
    s = torch.linalg.svdvals(w)
    for rank in (5, 12):
        low = factorise(linear, {"0": rank})
        xs = torch.randn(16, 40, dtype=torch.float64)
        err = (low(xs) - linear(xs)).norm(dim=1)
        assert (err <= s[rank] * xs.norm(dim=1) + 1e-10).all()  # ‖(W − W_r)x‖ ≤ s_{r+1}‖x‖
        residual = (w - low[0].dense_weight()).norm() ** 2
        assert residual.item() == pytest.approx((s[rank:] ** 2).sum().item(), rel=1e-9)


@pytest.mark.parametrize("layer", [LowRankConv2d(4, 6, 3, rank=3), LowRankLinear(20, 12, rank=5)])
def test_frobenius_decay_gradient_matches_autograd(layer):
    torch.manual_seed(0)
    layer = layer.double()
    lam = 0.01
    first, second = layer.first.weight, layer.second.weight
    product = second.reshape(second.shape[0], -1) @ first.reshape(first.shape[0], -1)
    (lam / 2 * (product**2).sum()).backward()
    expected = first.grad.clone(), second.grad.clone()
    first.grad, second.grad = torch.zeros_like(first), torch.zeros_like(second)
    frobenius_decay_(layer, lam)
    torch.testing.assert_close(first.grad, expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(second.grad, expected[1], rtol=1e-12, atol=1e-14)


def test_extra_bn_folds_exactly_into_the_first_factor():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=True).double()
    layer = LowRankConv2dBN.from_dense(conv, 3)
    with torch.no_grad():
        layer.bn.running_mean.uniform_(-1, 1)
        layer.bn.running_var.uniform_(0.5, 2)
        layer.bn.weight.uniform_(0.5, 1.5)
        layer.bn.bias.uniform_(-0.5, 0.5)
    layer.eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    for mode in ("factored", "dense"):
        folded = layer.fold(mode)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        torch.testing.assert_close(folded(x), layer(x), rtol=1e-10, atol=1e-12)

    # The manifest kind rebuilds the layer on a fresh dense model, and fold_model handles it.
    model = nn.Sequential(conv, nn.ReLU())
    model[0] = layer
    entry = describe(model)["0"]
    assert entry["kind"] == "lowrank_conv2d_bn" and entry["rank"] == 3
    fresh = apply(nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1).double(), nn.ReLU()), describe(model))
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.eval()
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    torch.testing.assert_close(fold_model(model)(x), model(x), rtol=1e-10, atol=1e-12)


# --- K --------------------------------------------------------------------------------------------


def test_measure_k_times_every_block_and_decides():
    torch.manual_seed(0)
    model = TinyResNet(width=16)
    ranks = {n: 4 for n in BLOCK_CONVS}
    ranks["layer1.0.conv2"] = None  # stays dense (no saving): its block is timed on conv1 only
    ranks["layer1.1.conv1"] = ranks["layer1.1.conv2"] = None  # nothing to factorise in this block
    result = measure_k(model, (3, 16, 16), ranks, batch_size=8, repeats=3, min_sample_s=0.0005)
    assert [b.block for b in result.blocks] == ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    assert 0 <= result.k <= 4 and result.batch_size == 8 and result.threads >= 1
    layer11 = result.blocks[1]
    assert layer11.dense_ms is None and layer11.decision.startswith("dense")
    for i, block in enumerate(result.blocks):
        if i != 1:
            assert block.dense_ms > 0 and block.factorised_ms > 0
            assert block.speedup == pytest.approx(block.dense_ms / block.factorised_ms)
        if i < result.k:
            assert block.decision.startswith("dense: leading")
        else:
            assert block.decision.startswith("dense: nothing" if i == 1 else "factorise")
    if result.k < 4:
        assert result.blocks[result.k].speedup >= 1.0
    json.dumps(result.to_dict())
    assert model.training  # modes restored


def test_k_counts_only_the_leading_blocks_that_do_not_pay(monkeypatch):
    import lrdeploy.methods.cuttlefish as cf

    timings = iter([(1.0, 2.0), (2.0, 1.0), (1.0, 2.0)])  # (dense, factorised) s for layer1.0, 2.0, 2.1
    monkeypatch.setattr(cf, "_interleaved_medians", lambda *args: next(timings))
    ranks = {n: 4 for n in BLOCK_CONVS}
    ranks["layer1.1.conv1"] = ranks["layer1.1.conv2"] = None
    result = measure_k(TinyResNet(), (3, 16, 16), ranks, batch_size=2)
    assert result.k == 2  # layer1.0 is slower factorised, layer1.1 has nothing to factorise
    assert [b.speedup for b in result.blocks] == [0.5, None, 2.0, 0.5]
    assert [b.decision.split(" ")[0] for b in result.blocks] == ["dense:", "dense:", "factorise", "factorise"]


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist_small(data_dir):
    train_set = load_dataset("mnist", "train", data_dir=data_dir, limit=2000)
    test_set = load_dataset("mnist", "test", data_dir=data_dir, limit=1000)
    return train_set, test_set


def _factorised(log: dict) -> dict[str, int]:
    return {n: e["rank"] for n, e in log["layers"].items() if e["decision"] == "factorised"}


def test_end_to_end_forced_switch_with_frobenius_decay(mnist_small):
    train_set, test_set = mnist_small
    torch.manual_seed(0)
    model = create_model("lenet5")
    hook = get_method("cuttlefish", fixed_k=0)
    config = TrainConfig(epochs=4, **FAST)
    result = train(model, train_set, test_set, config, hooks=[hook])
    record = hook.manifest_record()
    json.dumps(record)
    log = record["log"]
    assert record["settings"]["epochs"] == 4  # taken from the trainer
    assert log["switched"] and log["forced"] and log["switch_epoch"] == 2  # W = 15 cannot fire in 2 epochs
    assert set(log["kept_dense"]) == {"conv1", "fc3"}
    assert all(len(e["stable_rank_history"]) == 3 for e in log["layers"].values())  # init + 2 epochs
    factorised = _factorised(log)
    assert factorised, log["layers"]
    structure = describe(result.model)
    assert {n: e["rank"] for n, e in structure.items()} == factorised
    assert all(isinstance(result.model.get_submodule(n), LowRankLayer) for n in factorised)
    assert log["params_after"] < log["params_before"]
    assert result.test_accuracy > 0.6  # chance is 0.1
    # FD replaces the optimiser's decay on the factors; 1-D params get none either.
    groups = hook.param_groups(result.model, config)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    for name in factorised:
        layer = result.model.get_submodule(name)
        assert id(layer.first.weight) in no_decay and id(layer.second.weight) in no_decay
    assert id(result.model.conv1.weight) not in no_decay and id(result.model.conv1.bias) in no_decay


def test_end_to_end_detected_switch_with_extra_bn(mnist_small, tmp_path):
    from lrdeploy.bundle import load_bundle, save_bundle

    train_set, test_set = mnist_small
    torch.manual_seed(0)
    model = create_model("lenet5")
    hook = get_method("cuttlefish", window=1, tau=100.0, extra_bn=True, fixed_k=0)
    result = train(model, train_set, test_set, TrainConfig(epochs=3, **FAST), hooks=[hook])
    record = hook.manifest_record()
    log = record["log"]
    assert log["switched"] and not log["forced"] and log["switch_epoch"] == 1
    assert all(e["stable_after_epochs"] == 1 for e in log["layers"].values())
    structure = describe(result.model)
    assert {n: e["rank"] for n, e in structure.items()} == _factorised(log)
    assert structure["conv2"]["kind"] == "lowrank_conv2d_bn" and structure["fc1"]["kind"] == "lowrank_linear"
    assert result.test_accuracy > 0.5
    model = result.model.eval()
    x = test_set.x[:64]
    torch.testing.assert_close(fold_model(model)(x), model(x), rtol=1e-4, atol=1e-4)  # the BN folds away
    path = save_bundle(
        tmp_path / "b", model, model_name="lenet5", model_args={"num_classes": 10}, method=record,
        dataset={"name": "mnist"}, metrics={"test_accuracy": result.test_accuracy},
    )
    loaded = load_bundle(path)
    assert loaded.manifest["method"]["log"]["switch_epoch"] == 1
    torch.testing.assert_close(loaded.model(x), model(x), rtol=0, atol=0)


def test_end_to_end_measured_k(mnist_small):
    train_set, test_set = mnist_small
    torch.manual_seed(0)
    hook = get_method("cuttlefish", measure_repeats=3)
    config = TrainConfig(epochs=2, limit_train=500, **FAST)
    result = train(create_model("lenet5"), train_set, None, config, hooks=[hook])
    log = hook.manifest_record()["log"]
    assert log["switched"] and log["forced"] and log["switch_epoch"] == 1 and log["k_source"] == "measured"
    blocks = log["k_measurement"]["blocks"]
    assert [b["block"] for b in blocks] == ["conv2", "fc1", "fc2"] and all(b["decision"] for b in blocks)
    assert log["k"] == sum(b["decision"].startswith("dense: leading") for b in blocks)
    assert log["k_measurement"]["batch_size"] == 32  # the first training batch, as the trainer fed it
    for block in blocks[log["k"]:]:
        names = [n for n, r in block["ranks"].items() if r is not None]
        assert all(log["layers"][n]["decision"] == "factorised" for n in names)
    structure = describe(result.model)
    assert {n: e["rank"] for n, e in structure.items()} == _factorised(log)


def test_forced_switch_is_explained_and_the_learning_rate_rewarms(mnist_small):
    from lrdeploy.train import lr_at

    train_set, test_set = mnist_small
    torch.manual_seed(0)
    hook = get_method("cuttlefish", k=0, rewarm=0.25, min_rank_fraction=0.5)
    config = TrainConfig(epochs=4, limit_train=512, **FAST)
    train(create_model("lenet5"), train_set, None, config, hooks=[hook])
    log = hook.manifest_record()["log"]
    assert hook.settings["fixed_k"] == 0 and log["k_source"] == "fixed" and log["k"] == 0  # k= is fixed_k=
    assert log["detector_window"] == 2  # scaled to a 4-epoch run (the reference's 15 is for 300 epochs)
    assert log["forced"] and "before the stable ranks settled" in log["forced_note"]
    assert "max_warmup_fraction" in log["forced_note"]
    for name, entry in log["layers"].items():  # the rank floor: at least half the full rank
        assert entry["rank"] >= math.ceil(0.5 * entry["full_rank"]), name
    total = 4 * 512 // FAST["batch_size"]
    start = log["switch_step"]
    assert start == 2 * 512 // FAST["batch_size"]
    ramp = round(0.25 * total)
    assert hook.lr_scale(start - 1) is None and hook.lr_scale(start + ramp) is None
    assert hook.lr_scale(start) == pytest.approx(0.1)
    assert hook.lr_scale(start) < hook.lr_scale(start + ramp // 2) < 1.0
    assert lr_at(config, start, total) > 0  # the trainer multiplies the schedule by the factor
    with pytest.raises(UserError, match="k=1 and fixed_k=2"):
        get_method("cuttlefish", k=1, fixed_k=2)
    with pytest.raises(UserError, match="measure_runtime"):
        get_method("cuttlefish", measure_runtime="tvm")


def test_measure_k_in_onnx_runtime_records_the_runtime():
    torch.manual_seed(0)
    model = TinyResNet(width=16)
    ranks = {n: 4 for n in BLOCK_CONVS}
    result = measure_k(model, (3, 16, 16), ranks, batch_size=4, repeats=1, min_sample_s=0.0005,
                       runtime="onnxruntime")
    assert result.runtime == "onnxruntime"
    assert all(b.dense_ms > 0 and b.factorised_ms > 0 for b in result.blocks)
    eager = measure_k(model, (3, 16, 16), ranks, batch_size=4, repeats=1, min_sample_s=0.0005,
                      runtime="torch")
    assert eager.runtime == "torch"
