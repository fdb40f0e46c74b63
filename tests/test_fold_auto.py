"""fold_model(mode="auto") / fold_with_report: measured per-layer choice, exact outputs, cached costs.

Micro-benchmarks are shrunk to a few runs (shared CI cores); nothing here asserts on timings.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from lrdeploy.compress import compress
from lrdeploy.errors import UserError
from lrdeploy.exporters import fold_cost
from lrdeploy.exporters.fold import fold_model, fold_with_report
from lrdeploy.exporters.fold_cost import CostCache, MeasureConfig
from lrdeploy.layers import LOWRANK_TYPES, LowRankLinear
from lrdeploy.models import create_model

TINY = MeasureConfig(warmup=1, min_rounds=3, budget_s=0.0)


def _lenet() -> nn.Module:
    torch.manual_seed(0)
    model = create_model("lenet5")
    compress(model, rank_ratio=0.25, keep_first_conv=False, keep_classifier=False)
    return model.eval()


def _count_measure(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = fold_cost.measure

    def counting(shape, *args, **kwargs):
        calls.append(shape.key())
        return real(shape, *args, **kwargs)

    monkeypatch.setattr(fold_cost, "measure", counting)
    return calls


def _no_measure(monkeypatch) -> None:
    def fail(*_a, **_k):
        raise AssertionError("measure() must not be called")

    monkeypatch.setattr(fold_cost, "measure", fail)


def _assert_exact(folded: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    assert not any(isinstance(m, LOWRANK_TYPES) for m in folded.modules())
    with torch.no_grad():
        expected, got = model(x), folded(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_auto_lenet_exact_report_and_cache_hit(tmp_path, monkeypatch):
    model = _lenet()
    x = torch.randn(3, 1, 28, 28)
    calls = _count_measure(monkeypatch)
    folded, report = fold_with_report(model, example_input=x, batch_size=2, cache_dir=tmp_path, threads=1,
                                      measure_config=TINY)
    _assert_exact(folded, model, x)
    assert [lf.name for lf in report.layers] == ["conv1", "conv2", "fc1", "fc2", "fc3"]
    assert len(calls) == report.measured_shapes == 5 and report.cached_shapes == 0
    for lf in report.layers:
        assert lf.input_shape[0] == 2  # batch replaced by the target batch size
        assert lf.factored_ms > 0 and lf.dense_ms > 0 and not lf.cached
        assert lf.decision in ("factored", "dense") and lf.break_even_source in ("measured", "flops")
        assert 1 <= lf.break_even_rank <= lf.full_rank
    assert report.layers[0].input_shape == [2, 1, 28, 28] and report.layers[2].input_shape == [2, 400]
    d = report.to_dict()
    json.dumps(d)
    assert d["summary"]["layers"] == 5 and d["summary"]["predicted_chosen_ms"] > 0
    assert (tmp_path / "fold-cost.json").is_file()

    # Second export of the same architecture: answered from the cache, same decisions, nothing measured.
    folded2, report2 = fold_with_report(model, example_input=x, batch_size=2, cache_dir=tmp_path, threads=1,
                                        measure_config=TINY)
    assert len(calls) == 5 and report2.measured_shapes == 0 and report2.cached_shapes == 5
    assert [lf.decision for lf in report2.layers] == [lf.decision for lf in report.layers]
    assert all(lf.cached for lf in report2.layers)
    _assert_exact(folded2, model, x)

    # Another batch size is another cache key.
    _, report3 = fold_with_report(model, example_input=x, batch_size=1, cache_dir=tmp_path, threads=1,
                                  measure_config=TINY)
    assert report3.measured_shapes == 5 and len(calls) == 10


def test_auto_resnet18_width8_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model("resnet18", width=8)
    compress(model, rank_ratio=0.25)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    folded = fold_model(model, "auto", example_input=x, cache_dir=tmp_path, threads=1, measure_config=TINY)
    _assert_exact(folded, model, x)


def test_forced_decisions_from_injected_cost_table(tmp_path, monkeypatch):
    model = _lenet()
    x = torch.randn(1, 1, 28, 28)
    _no_measure(monkeypatch)
    input_shapes = {"conv1": (1, 1, 28, 28), "conv2": (1, 6, 14, 14), "fc1": (1, 400), "fc2": (1, 120),
                    "fc3": (1, 84)}
    cache = CostCache(fold_cost.cache_path(tmp_path))
    for name, in_shape in input_shapes.items():
        shape = fold_cost.layer_shape(model.get_submodule(name), in_shape)
        dense_faster = name == "fc1"
        cache.put(fold_cost.cache_key(shape.key(), "ort-cpu", 1, 1),
                  {"dense_ms": 1.0 if dense_faster else 3.0, "factored_ms": {str(shape.rank): 2.0}})
    cache.save()

    folded, report = fold_with_report(model, example_input=x, cache_dir=tmp_path, threads=1)
    assert type(folded.fc1) is nn.Linear  # dense
    assert isinstance(folded.fc2, nn.Sequential) and [type(m) for m in folded.fc2] == [nn.Linear, nn.Linear]
    assert isinstance(folded.conv2, nn.Sequential) and type(folded.conv2[0]) is nn.Conv2d
    by_name = {lf.name: lf for lf in report.layers}
    assert by_name["fc1"].decision == "dense" and by_name["fc2"].decision == "factored"
    assert by_name["fc1"].predicted_ms == 1.0 and by_name["fc2"].predicted_ms == 2.0
    assert by_name["fc1"].break_even_source == "flops"  # no reference-rank timing in the injected table
    assert report.measured_shapes == 0 and report.cached_shapes == 5
    _assert_exact(folded, model, x)


def test_no_saving_layers_fold_dense_without_measuring(tmp_path, monkeypatch):
    _no_measure(monkeypatch)
    torch.manual_seed(0)
    model = nn.Sequential(LowRankLinear(8, 8, 8), nn.ReLU(), LowRankLinear(8, 6, 5)).eval()  # 5·14 ≥ 48
    x = torch.randn(4, 8)
    folded, report = fold_with_report(model, example_input=x, cache_dir=tmp_path, threads=1)
    assert type(folded[0]) is nn.Linear and type(folded[2]) is nn.Linear
    assert all(lf.decision == "dense" and "no parameters" in lf.reason for lf in report.layers)
    assert all(lf.factored_ms is None and lf.break_even_source == "flops" for lf in report.layers)
    assert not (tmp_path / "fold-cost.json").exists()
    _assert_exact(folded, model, x)


def test_auto_without_example_input_keeps_factors_by_flop_rule(tmp_path, monkeypatch):
    _no_measure(monkeypatch)
    model = _lenet()
    folded, report = fold_with_report(model, cache_dir=tmp_path, threads=1)
    assert all(lf.decision == "factored" and "FLOP rule" in lf.reason for lf in report.layers)
    assert isinstance(folded.fc1, nn.Sequential)


def test_fixed_modes_report_and_validation(tmp_path, monkeypatch):
    _no_measure(monkeypatch)
    model = _lenet()
    folded, report = fold_with_report(model, "dense")
    assert type(folded.fc1) is nn.Linear and all(lf.decision == "dense" for lf in report.layers)
    lf = report.layers[2]
    assert lf.break_even_rank == pytest.approx(400 * 120 / 520, abs=0.05) and lf.break_even_source == "flops"
    assert lf.params_dense == 400 * 120 + 120
    with pytest.raises(UserError, match="fold mode"):
        fold_model(model, "sometimes")
    with pytest.raises(UserError, match="batch size"):
        fold_model(model, "auto", batch_size=0)
    with pytest.raises(UserError, match="backend"):
        fold_model(model, "auto", backend="tensorrt", cache_dir=tmp_path)


def test_interpolated_break_even_and_reference_rank():
    # factored t = 1 + 0.1·r, dense 5 → break-even at r = 40.
    assert fold_cost.interpolate_break_even(10, 30, 2.0, 4.0, 5.0, 64) == pytest.approx(40.0)
    assert fold_cost.interpolate_break_even(10, 30, 2.0, 4.0, 50.0, 64) == 64.0  # clamped to full rank
    assert fold_cost.interpolate_break_even(10, 30, 4.0, 2.0, 5.0, 64) is None  # noise: no estimate
    shape = fold_cost.layer_shape(LowRankLinear(1024, 4096, 256), (1, 1024))
    assert shape.flop_break_even == pytest.approx(819.2) and fold_cost.reference_rank(shape) == 819


def test_corrupt_cache_is_ignored_and_rewritten(tmp_path):
    path = fold_cost.cache_path(tmp_path)
    path.write_text("{not json")
    cache = CostCache(path)
    assert cache.entries == {}
    cache.put("k", {"dense_ms": 1.0, "factored_ms": {"2": 1.0}})
    cache.save()
    assert json.loads(path.read_text())["entries"]["k"]["dense_ms"] == 1.0


def test_rich_table_renders():
    from rich.console import Console

    _, report = fold_with_report(_lenet(), "factored")
    console = Console(record=True, width=160)
    report.render(console)
    text = console.export_text()
    assert "fc1" in text and "factored" in text and "Conv 6→16 k5x5 s1" in text


def test_batchnorm_after_conv_folds_offline_exactly():
    """Conv→BN pairs (plain and factorised) become single convs with the same output; no BN is left."""
    from lrdeploy.compress import compress
    from lrdeploy.exporters.fold import fold_batchnorm, fold_model
    from lrdeploy.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet18", width=8)
    compress(model, rank_ratio=0.5)
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(8, 3, 32, 32))
    model.eval()
    folded, note = fold_batchnorm(fold_model(model, "factored"))
    assert note == "folded offline"
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)


def test_batchnorm_fold_leaves_untraceable_models_alone():
    from lrdeploy.exporters.fold import fold_batchnorm

    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: not fx-traceable
                return self.bn(self.conv(x))
            return self.bn(self.conv(-x))

    model = Branchy().eval()
    same, note = fold_batchnorm(model)
    assert same is model and "not fx-traceable" in note
