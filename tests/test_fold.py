"""fold_model / LowRank*.fold: plain torch modules, same outputs, original untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrdeploy.compress import compress
from lrdeploy.errors import UserError
from lrdeploy.exporters.fold import fold_model
from lrdeploy.layers import LOWRANK_TYPES, LowRankConv2d, LowRankLinear


class TinyLeNet(nn.Module):
    """LeNet-5-shaped test model; independent of lrdeploy.models."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout(0.5)
        self.classifier = nn.Sequential(
            nn.Linear(400, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.act(self.conv1(x)))
        x = self.pool(self.act(self.conv2(x)))
        return self.classifier(self.drop(x.flatten(1)))


@pytest.fixture
def compressed() -> TinyLeNet:
    torch.manual_seed(0)
    model = TinyLeNet()
    compress(model, rank_ratio=0.5, keep_first_conv=False)
    return model.train()  # training mode on purpose: fold_model must switch the copy to eval


def _lowrank(model: nn.Module) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, LOWRANK_TYPES)]


@pytest.mark.parametrize("mode", ["factored", "dense"])
def test_fold_model_same_outputs_plain_modules_original_untouched(compressed, mode):
    state = {k: v.clone() for k, v in compressed.state_dict().items()}
    x = torch.randn(4, 1, 28, 28)
    folded = fold_model(compressed, mode)

    assert _lowrank(folded) == []
    assert not folded.training and all(not m.training for m in folded.modules())
    compressed.eval()
    with torch.no_grad():
        expected = compressed(x)
        got = folded(x)
    if mode == "factored":
        assert torch.equal(got, expected)  # same ops on the same weights
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()

    # The original is untouched: still low-rank, same weights, parameters not shared with the copy.
    assert _lowrank(compressed) == ["conv1", "conv2", "classifier.0", "classifier.2"]
    assert all(torch.equal(v, state[k]) for k, v in compressed.state_dict().items())
    folded_ptrs = {p.data_ptr() for p in folded.parameters()}
    assert folded_ptrs.isdisjoint(p.data_ptr() for p in compressed.parameters())


def test_fold_shapes_per_mode(compressed):
    factored = fold_model(compressed, "factored")
    assert isinstance(factored.conv2, nn.Sequential)
    first, second = factored.conv2
    assert type(first) is nn.Conv2d and first.out_channels == 8 and first.kernel_size == (5, 5)
    assert type(second) is nn.Conv2d and second.kernel_size == (1, 1) and second.out_channels == 16
    assert type(factored.classifier[0][0]) is nn.Linear and factored.classifier[0][0].out_features == 60

    dense = fold_model(compressed, "dense")
    assert type(dense.conv2) is nn.Conv2d and dense.conv2.weight.shape == (16, 6, 5, 5)
    assert type(dense.classifier[0]) is nn.Linear and dense.classifier[0].weight.shape == (120, 400)
    assert type(dense.conv1) is nn.Conv2d and dense.conv1.padding == (2, 2)
    # The dense fold is a rank-r matrix: exactly the rank the layer was compressed to.
    assert torch.linalg.matrix_rank(dense.classifier[0].weight.detach(), rtol=1e-5) == 60


@pytest.mark.parametrize("mode", ["factored", "dense"])
def test_layer_fold_float64_exact_with_geometry(mode):
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 8, (3, 5), stride=2, padding=(1, 2), dilation=(2, 1), dtype=torch.float64)
    low = LowRankConv2d.from_dense(conv, 4)
    folded = low.fold(mode)
    assert not isinstance(folded, LOWRANK_TYPES) and next(folded.parameters()).dtype == torch.float64
    x = torch.randn(2, 3, 13, 12, dtype=torch.float64)
    torch.testing.assert_close(folded(x), low(x), rtol=0, atol=1e-12)

    lin = LowRankLinear.from_dense(nn.Linear(9, 7, bias=False, dtype=torch.float64), 3)
    folded = lin.fold(mode)
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(folded(x), lin(x), rtol=0, atol=1e-12)


def test_fold_model_on_a_bare_layer_and_dense_model():
    low = LowRankLinear(6, 4, 2)
    folded = fold_model(low, "dense")
    assert type(folded) is nn.Linear and not folded.training
    plain = nn.Sequential(nn.Linear(3, 2))
    copy = fold_model(plain)
    assert copy is not plain and torch.equal(copy[0].weight, plain[0].weight)


def test_fold_bad_mode(compressed):
    with pytest.raises(UserError, match="fold mode"):
        fold_model(compressed, "sparse")
    with pytest.raises(UserError):
        compressed.conv2.fold("nope")
