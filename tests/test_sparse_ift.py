"""Sparse-IFT: iso-FLOP families, exact folding, dynamic sparse training, bundles and resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.exporters.fold import fold_model
from lrdeploy.flops import count_flops
from lrdeploy.layers import sparse_ift as blocks
from lrdeploy.layers.masked import MaskedConv2d, MaskedLinear, masked_layers
from lrdeploy.methods import get_method
from lrdeploy.methods.dst import MaskUpdater, random_mask
from lrdeploy.models import create_model, get_spec
from lrdeploy.train import TrainConfig, train

SHAPE = (3, 32, 32)


def _sparse_resnet(family: str, sparsity: float, width: int = 8, **settings):
    """What ``lrdeploy train --method sparse-ift`` builds: the dense FLOP budget, then the sparse model."""
    torch.manual_seed(0)
    hook = get_method("sparse-ift", family=family, sparsity=sparsity, **settings)
    args = {"num_classes": 10, "in_channels": 3, "width": width}
    dense = create_model("resnet18", **args)
    wider = hook.model_args_for(dense, args, SHAPE, get_spec("resnet18").builder)
    model = create_model("resnet18", **(wider or args))
    return hook, hook.prepare(model), count_flops(dense, SHAPE)


@pytest.mark.parametrize("family", ["wide", "parallel", "factorized", "doped"])
@pytest.mark.parametrize("sparsity", [0.5, 0.75, 0.9])
def test_every_family_matches_the_dense_flops_within_a_tenth_of_a_percent(family, sparsity):
    hook, model, dense_flops = _sparse_resnet(family, sparsity)
    sparse_flops = count_flops(model, SHAPE, sparse=True)
    assert abs(sparse_flops / dense_flops - 1) < 1e-3, (family, sparsity, sparse_flops, dense_flops)
    assert hook.log["dense_flops"] == dense_flops and hook.log["sparse_flops"] == sparse_flops
    # every sparsified layer really holds fewer weights than it stores, at about the nominal density
    densities = [layer.density for _, layer in masked_layers(model)]
    assert densities and max(densities) < 1.0
    assert count_flops(model, SHAPE) > dense_flops  # what a dense runtime executes: more than the original
    if family == "wide":
        assert model.conv1.out_channels == blocks_width(8, sparsity)


def blocks_width(width: int, sparsity: float) -> int:
    from lrdeploy.methods.sparse_ift import wide_width

    return wide_width(width, sparsity)


def test_closed_form_sizes_are_the_papers():
    # methods.md §3.2: 64→64 3×3 conv; Factorized d = 116/231/577, Doped d = 28/43/51; Parallel 2/4/10.
    # At s = 0.9 the exact value is 36864/64 = 576; the reference's 577 is ceil() of 576.0000000000001 from
    # 1 - 0.9 = 0.09999999999999998 in floating point
    assert [blocks.factorized_rank(9, 64, 64, s) for s in (0.5, 0.75, 0.9)] == [116, 231, 576]
    assert [blocks.doped_rank(9, 64, 64, s) for s in (0.5, 0.75, 0.9)] == [28, 43, 51]
    assert [blocks.parallel_branches(s) for s in (0.5, 0.75, 0.9)] == [2, 4, 10]


def _randomise_bn(module: nn.Module) -> None:
    gen = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=gen))


@pytest.mark.parametrize("cls, dense, x", [
    (blocks.ParallelConv2d, nn.Conv2d(6, 8, 3, padding=1, stride=2), torch.randn(3, 6, 9, 9)),
    (blocks.ParallelLinear, nn.Linear(12, 7), torch.randn(5, 12)),
    (blocks.FactorizedConv2d, nn.Conv2d(6, 8, 3, padding=1), torch.randn(3, 6, 9, 9)),
    (blocks.FactorizedLinear, nn.Linear(12, 7), torch.randn(5, 12)),
    (blocks.DopedConv2d, nn.Conv2d(6, 8, 3, padding=1, bias=True), torch.randn(3, 6, 9, 9)),
    (blocks.DopedLinear, nn.Linear(12, 7), torch.randn(5, 12)),
])
def test_each_block_folds_exactly(cls, dense, x):
    torch.manual_seed(0)
    block = cls(dense, 3)
    _randomise_bn(block)
    gen = torch.Generator().manual_seed(2)
    for _, layer in masked_layers(block):
        layer.set_mask(random_mask(layer.weight.shape, 0.4, gen))
    if hasattr(block, "v"):
        block.v.weight.data.normal_()  # a trained low-rank part, not the zero it starts from
    block.eval()
    folded = block.fold()
    torch.testing.assert_close(folded(x), block(x), rtol=1e-5, atol=1e-5)
    if cls in (blocks.ParallelConv2d, blocks.DopedConv2d, blocks.ParallelLinear, blocks.DopedLinear):
        assert type(folded) is type(dense) and folded.weight.shape == dense.weight.shape  # the dense layer


def test_masked_layers_compute_with_the_mask_and_fold_to_plain_layers():
    torch.manual_seed(0)
    conv = MaskedConv2d.from_dense(nn.Conv2d(4, 6, 3))
    lin = MaskedLinear.from_dense(nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(0)
    for layer in (conv, lin):
        layer.set_mask(random_mask(layer.weight.shape, 0.5, gen))
        with torch.no_grad():
            layer.weight.add_(1.0)  # something wrote into masked positions: the forward still ignores them
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, conv.weight * conv.mask, conv.bias))
    assert type(conv.fold()) is nn.Conv2d and torch.equal(conv.fold()(x), conv(x))
    assert abs(conv.density - 0.5) < 0.01


def test_dst_keeps_density_moves_masks_and_masks_optimiser_state():
    torch.manual_seed(0)
    model = nn.Sequential(MaskedLinear.from_dense(nn.Linear(20, 30)), nn.ReLU(),
                          MaskedLinear.from_dense(nn.Linear(30, 4)))
    layers = masked_layers(model)
    updater = MaskUpdater(layers, "rigl", drop_fraction=0.3, delta_t=2)
    updater.init_masks({name: 0.25 for name, _ in layers})
    counts = [int(layer.mask.sum()) for _, layer in layers]
    assert counts == [150, 30]  # exact: round(0.25 · numel)
    updater.schedule(40)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [layer.mask.clone() for _, layer in layers]
    for _ in range(10):
        loss = model(torch.randn(8, 20)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        updater.mask_gradients()
        opt.step()
        updater.step(opt)
    assert [int(layer.mask.sum()) for _, layer in layers] == counts, "updates keep the density"
    assert any(not torch.equal(b, layer.mask) for b, (_, layer) in zip(before, layers, strict=True))
    assert [u["step"] for u in updater.log] == [2, 4, 6, 8, 10]  # every ΔT = 2 steps, before 75 % of 40
    for _, layer in layers:
        assert torch.all(layer.weight[~layer.mask] == 0)
        momentum = opt.state[layer.weight]["momentum_buffer"]
        assert torch.all(momentum[~layer.mask] == 0)


def test_static_never_changes_the_mask():
    layer = MaskedLinear.from_dense(nn.Linear(10, 10))
    updater = MaskUpdater([("l", layer)], "static")
    updater.init_masks({"l": 0.5})
    mask = layer.mask.clone()
    updater.schedule(100)
    for _ in range(50):
        updater.step(None)
    assert torch.equal(mask, layer.mask) and updater.log == []


def test_wide_needs_a_width_and_settings_are_checked():
    hook = get_method("sparse-ift", family="wide", sparsity=0.5)
    lenet = create_model("lenet5")
    with pytest.raises(UserError, match="width"):
        hook.model_args_for(lenet, {}, (1, 28, 28), get_spec("lenet5").builder)
    with pytest.raises(UserError, match="sparsity must be in"):
        get_method("sparse-ift", sparsity=1.5)
    with pytest.raises(UserError, match="unknown sparse-ift family"):
        get_method("sparse-ift", family="tall")
    with pytest.raises(UserError, match="dynamic sparse training"):
        get_method("sparse-ift", dst="magic")


@pytest.fixture(scope="module")
def fmnist(data_dir):
    from lrdeploy.data import load_dataset

    return (load_dataset("fashion-mnist", "train", data_dir=data_dir, limit=1024),
            load_dataset("fashion-mnist", "test", data_dir=data_dir, limit=300))


def test_rigl_parallel_trains_saves_and_reloads(fmnist, tmp_path):
    """A Sparse Parallel LeNet-5 trains with RigL updates, the bundle keeps its masks, and its fold is the
    dense LeNet-5 computing the same function."""
    from lrdeploy.bundle import load_bundle, save_bundle
    from lrdeploy.layers.structure import describe

    train_set, test_set = fmnist
    torch.manual_seed(0)
    model = create_model("lenet5")
    hook = get_method("sparse-ift", family="parallel", sparsity=0.5)
    hook.model_args_for(model, {}, (1, 28, 28))
    hook.prepare(model)
    config = TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False)
    result = train(model, train_set, test_set, config, hooks=[hook])
    assert result.metrics["accuracy"] > 0.5
    record = hook.manifest_record()
    assert record["log"]["updates"] and record["log"]["flops_ratio"] == pytest.approx(1.0, abs=1e-3)
    for _, layer in masked_layers(result.model):
        assert abs(layer.density - 0.5) < 0.01
    save_bundle(tmp_path / "b", result.model, model_name="lenet5", model_args={"num_classes": 10},
                input_shape=(1, 28, 28), method=record, dataset={}, metrics={}, task="classification")
    loaded = load_bundle(tmp_path / "b").model.eval()
    x = test_set.x[:16]
    torch.testing.assert_close(loaded(x), result.model.eval()(x))
    assert describe(loaded) == describe(result.model)
    folded = fold_model(loaded, "factored")
    assert sorted(n for n, _ in folded.named_modules() if isinstance(_, (nn.Conv2d, nn.Linear))) == \
        sorted(n for n, m in create_model("lenet5").named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    torch.testing.assert_close(folded(x), loaded(x), rtol=1e-4, atol=1e-5)


def test_rigl_resumes_bitwise(fmnist, tmp_path):
    from .test_resume import _Stop, _StopAt

    train_set, test_set = fmnist

    def run(stop_at=None, resume=False):
        torch.manual_seed(0)
        model = create_model("lenet5")
        hook = get_method("sparse-ift", family="doped", sparsity=0.75)
        hook.model_args_for(model, {}, (1, 28, 28))
        if not resume:
            hook.prepare(model)
        where = tmp_path / ("full" if stop_at is None and not resume else "c")
        config = TrainConfig(epochs=3, batch_size=64, lr=0.05, progress=False, seed=3,
                             checkpoint_dir=str(where), resume=resume)
        return train(model, train_set, test_set, config, hooks=[hook, _StopAt(stop_at)]), hook

    full, hook = run()
    assert len(hook.updater.log) >= 3
    with pytest.raises(_Stop):
        run(stop_at=1)
    resumed, resumed_hook = run(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed_hook.updater.log == hook.updater.log
