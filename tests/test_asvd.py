"""Activation-aware SVD: the math against the exact optimum, compress() on calibration data (Linear, im2col
Conv2d, a real translation model), post-training SVD as a registered method, and the CLI flags."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lrdeploy.compress import collect_input_stats, compress
from lrdeploy.errors import UserError
from lrdeploy.layers import LowRankConv2d, LowRankLinear
from lrdeploy.layers.svd import (
    output_error,
    scaled_svd,
    svd_2d,
    truncation,
    whitened_svd,
)
from lrdeploy.methods import get_method, list_methods


def _anisotropic_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Correlated inputs whose channel scales span three orders of magnitude (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    scales = torch.logspace(-1.5, 1.5, dim, dtype=torch.float64)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) @ mix * scales


def _weight(out: int, dim: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(out, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------------------ the math


@pytest.mark.parametrize("rank", [1, 4, 11])
def test_whitened_truncation_is_the_exact_optimum_of_the_output_error(rank):
    w, x = _weight(16, 24), _anisotropic_inputs(300, 24)
    gram = x.T @ x
    approx = truncation(whitened_svd(w, gram), rank)
    # Independent optimum: the best rank-r approximation of the outputs Y = W·Xᵀ (Eckart–Young on Y).
    sv = torch.linalg.svdvals(w @ x.T)
    optimum = float((sv[rank:] ** 2).sum() / (sv**2).sum())
    measured = float(((w - approx) @ x.T).square().sum() / (w @ x.T).square().sum())
    assert measured == pytest.approx(optimum, rel=1e-4, abs=1e-12)
    assert output_error(w, approx, gram) == pytest.approx(measured, rel=1e-9, abs=1e-14)
    plain = output_error(w, truncation(svd_2d(w), rank), gram)
    assert output_error(w, approx, gram) < 0.9 * plain  # these inputs are far from white: a real gain


def test_whitened_equals_plain_svd_on_white_inputs_and_is_exact_at_full_rank():
    w = _weight(12, 20)
    q, _ = torch.linalg.qr(torch.randn(200, 20, dtype=torch.float64))  # orthonormal columns: XᵀX = 9·I
    x = 3.0 * q
    aware, plain = whitened_svd(w, x.T @ x), svd_2d(w)
    for rank in (1, 5, 12):
        torch.testing.assert_close(truncation(aware, rank), truncation(plain, rank), atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(truncation(aware, 12), w, atol=1e-10, rtol=1e-10)
    ours = whitened_svd(w, _anisotropic_inputs(100, 20).T @ _anisotropic_inputs(100, 20))
    torch.testing.assert_close(truncation(ours, 12), w, atol=1e-9, rtol=1e-9)  # U·S·Vh = W at full rank


def test_whitening_survives_a_singular_gram_and_balances_the_factors():
    w = _weight(10, 30)
    x = _anisotropic_inputs(20, 30)  # 20 rows < 30 features: XᵀX is singular
    x[:, 3] = 0.0  # and one channel is dead (a ReLU that never fires)
    gram = x.T @ x
    svd = whitened_svd(w, gram)
    assert all(torch.isfinite(t).all() for t in svd)
    approx = truncation(svd, 4)
    assert output_error(w, approx, gram) <= output_error(w, truncation(svd_2d(w), 4), gram) + 1e-12
    # balanced factors: each component's left column and right row have the same norm
    layer = nn.Linear(30, 10).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    low = LowRankLinear.from_dense(layer, 4, svd=svd)
    torch.testing.assert_close(low.second.weight.norm(dim=0), low.first.weight.norm(dim=1), rtol=1e-9, atol=0)
    assert float(whitened_svd(w, torch.zeros(30, 30)).S[0]) == pytest.approx(float(svd_2d(w).S[0]))


def test_asvd_scaling_reduces_to_plain_svd_for_equal_channels_and_helps_for_unequal_ones():
    w = _weight(12, 16)
    plain, same = svd_2d(w), scaled_svd(w, torch.full((16,), 0.7))
    torch.testing.assert_close(truncation(same, 5), truncation(plain, 5), atol=1e-10, rtol=1e-9)
    x = _anisotropic_inputs(400, 16)
    gram, scaled = x.T @ x, scaled_svd(w, x.abs().mean(0))
    torch.testing.assert_close(truncation(scaled, 12), w, atol=1e-10, rtol=1e-10)
    assert output_error(w, truncation(scaled, 5), gram) < output_error(w, truncation(plain, 5), gram)


# ------------------------------------------------------------------------------------- compress()


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(24, 48), nn.Linear(48, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def test_compress_activation_aware_lowers_the_output_error_and_reports_it_exactly():
    torch.manual_seed(0)
    dense = _Mlp().eval()
    x = _anisotropic_inputs(256, 24).float()
    plain, aware = copy.deepcopy(dense), copy.deepcopy(dense)
    compress(plain, rank_ratio=0.25)
    report = compress(aware, rank_ratio=0.25, activation_aware=True, calibration=x)
    assert report.activation_aware == "whiten" and report.calibration_samples == 256
    rows = {layer.name: layer for layer in report.layers}
    assert [n for n, r in rows.items() if r.compressed] == ["fc1", "fc2"]
    assert rows["head"].skipped and rows["head"].output_error is None
    with torch.no_grad():
        h = torch.relu(dense.fc1(x))  # fc2's real inputs
        dense_out = h @ dense.fc2.weight.T
        err = ((aware.fc2(h) - dense.fc2(h)).square().sum() / dense_out.square().sum()).item()
        err_plain = ((plain.fc2(h) - dense.fc2(h)).square().sum() / dense_out.square().sum()).item()
    assert rows["fc2"].output_error == pytest.approx(err, rel=1e-3)
    assert rows["fc2"].output_error_svd == pytest.approx(err_plain, rel=1e-3)
    assert all(r.output_error < r.output_error_svd for r in report.compressed)
    assert all(r.error_reduction > 1.0 and r.svd == "whiten" for r in report.compressed)
    with torch.no_grad():  # and the whole model follows the dense one more closely
        assert (aware(x) - dense(x)).norm() < (plain(x) - dense(x)).norm()
    json.dumps(report.to_dict())


def test_calibration_forms_give_the_same_statistics():
    torch.manual_seed(0)
    model = _Mlp().eval()
    x = torch.randn(70, 24)
    ref, n = collect_input_stats(model, ["fc1", "fc2"], x, batch_size=32)
    assert n == 70 and ref["fc1"].rows == 70
    torch.testing.assert_close(ref["fc1"].gram, x.double().T @ x.double())
    for form in ((x,), [x[:50], (x[50:],)], lambda m: (m(x[:10]), m(x[10:]))):
        stats, count = collect_input_stats(model, ["fc1", "fc2"], form)
        assert count == 70
        for name in ("fc1", "fc2"):
            torch.testing.assert_close(stats[name].gram, ref[name].gram)
            torch.testing.assert_close(stats[name].abs_sum, ref[name].abs_sum)
    assert not model.fc1._forward_pre_hooks and not model._forward_pre_hooks  # hooks removed
    with pytest.raises(UserError, match="calibration"):
        compress(copy.deepcopy(model), rank_ratio=0.5, activation_aware=True)
    with pytest.raises(UserError, match="no samples"):
        compress(copy.deepcopy(model), rank_ratio=0.5, activation_aware=True, calibration=[])
    with pytest.raises(UserError, match="activation_aware"):
        compress(copy.deepcopy(model), rank_ratio=0.5, activation_aware="fancy", calibration=x)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
def test_conv_statistics_are_taken_on_unfolded_patches(data_dir, padding_mode):
    """A Conv2d's whitening uses its im2col rows: the reported output error equals the error of the
    factorised conv's real outputs on the calibration images (stride, padding and its mode included)."""
    from lrdeploy.data import load_dataset

    images = load_dataset("mnist", "train", data_dir=data_dir, limit=64).x
    torch.manual_seed(0)
    target = nn.Conv2d(8, 16, 3, stride=2, padding=1, padding_mode=padding_mode, bias=False)
    dense = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), target).eval()
    with torch.no_grad():
        feats = dense[1](dense[0](images))
        ref = dense[2](feats)
    plain, aware = copy.deepcopy(dense), copy.deepcopy(dense)
    compress(plain, rank_ratio=0.25, keep_first_conv=False, keep_classifier=False, include="2")
    report = compress(aware, rank_ratio=0.25, keep_first_conv=False, keep_classifier=False, include="2",
                      activation_aware=True, calibration=images)
    row = next(r for r in report.layers if r.name == "2")
    assert isinstance(aware[2], LowRankConv2d) and row.rank == 4
    with torch.no_grad():
        err = ((aware[2](feats) - ref).square().sum() / ref.square().sum()).item()
        err_plain = ((plain[2](feats) - ref).square().sum() / ref.square().sum()).item()
    assert row.output_error == pytest.approx(err, rel=1e-3)
    assert row.output_error_svd == pytest.approx(err_plain, rel=1e-3)
    assert err < err_plain


def test_translation_model_calibrates_from_its_task_feeds(data_dir):
    """Any task: calibration inputs come from the task's feeds, in the model's input order (src, tgt_in)."""
    from lrdeploy.models import create_model, get_spec
    from lrdeploy.tasks import get_task
    from lrdeploy.workflows import calibration_inputs

    task = get_task("translation")
    train_set = task.load("multi30k", "train", data_dir=data_dir, limit=64)
    small = {"d_model": 32, "nhead": 2, "dim_feedforward": 64, "num_encoder_layers": 1,
             "num_decoder_layers": 1}
    args = task.model_args(get_spec("transformer"), train_set, small)
    torch.manual_seed(0)
    model = create_model("transformer", **args).eval()
    manifest = {"model": {"name": "transformer", "args": args}}
    inputs, record = calibration_inputs(task, manifest, model, "multi30k", data_dir=data_dir, samples=48)
    assert record == {"samples": 48, "dataset": "multi30k", "split": "train", "inputs": ["src", "tgt_in"]}
    assert [t.dtype for t in inputs] == [torch.int64, torch.int64] and inputs[0].shape[0] == 48
    with torch.no_grad():
        ref = model(*inputs)
    report = compress(model, rank_ratio=0.25, activation_aware=True, calibration=inputs)
    # every Linear but the output projection: 3 attention blocks × 4 projections + 2 feed-forwards × 2
    assert report.calibration_samples == 48 and len(report.compressed) == 16
    assert "generator" in {r.name for r in report.skipped}  # the spec's classifier stays dense
    assert all(r.output_error <= r.output_error_svd * (1 + 1e-9) for r in report.compressed)
    with torch.no_grad():
        assert torch.isfinite(model(*inputs)).all() and model(*inputs).shape == ref.shape


# ------------------------------------------------------------------- the registered method and the CLI


def test_post_training_svd_is_a_registered_method():
    assert "svd" in list_methods() and list_methods("post-training") == ["svd"]
    training = set(list_methods("training"))
    assert "svd" not in training and {"cuttlefish", "maestro"} <= training
    with pytest.raises(UserError, match="post-training") as info:
        get_method("svd", rank_ratio=0.5)  # what `train --method svd` asks for: a trainer hook
    assert "lrdeploy compress" in (info.value.hint or "")
    with pytest.raises(UserError, match="exactly one"):
        get_method("svd", stage="post-training")
    torch.manual_seed(0)
    a = _Mlp().eval()
    b = copy.deepcopy(a)
    method = get_method("svd", stage=None, rank_ratio=0.5)
    report = method.apply(a)
    ref = compress(b, rank_ratio=0.5)
    assert [(r.name, r.rank, r.skipped) for r in report.layers] == [
        (r.name, r.rank, r.skipped) for r in ref.layers]
    record = json.loads(json.dumps(method.manifest_record()))
    assert record["name"] == "svd" and record["rank_ratio"] == 0.5 and record["activation_aware"] is False
    assert set(record["log"]["layers"]) == {"fc1", "fc2"} and record["log"]["kept_dense"]["head"]
    again = get_method("svd", stage="post-training", **record["settings"])  # a manifest rebuilds it
    assert again.settings == method.settings


def test_cli_compress_activation_aware_records_calibration(tmp_path, data_dir):
    from lrdeploy.cli import app

    runner = CliRunner()
    dense, out = tmp_path / "dense", tmp_path / "aware"
    torch.manual_seed(0)
    assert runner.invoke(app, ["init", "--model", "lenet5", "--out", str(dense)]).exit_code == 0
    r = runner.invoke(app, ["compress", str(dense), "--rank-ratio", "0.25", "--activation-aware",
                            "--calib-samples", "96", "--data", "mnist", "--data-dir", str(data_dir),
                            "--out", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "activation-aware" in r.output and "reduction" in r.output
    method = json.loads((out / "manifest.json").read_text())["method"]
    assert method["name"] == "svd" and method["activation_aware"] is True and method["rank_ratio"] == 0.25
    assert method["calibration"] == {"samples": 96, "dataset": "mnist", "split": "train", "inputs": ["input"]}
    assert method["log"]["calibration_samples"] == 96
    layers = method["log"]["layers"]
    assert set(layers) == {"conv2", "fc1", "fc2"}
    assert all(e["output_error"] <= e["output_error_svd"] * (1 + 1e-9) for e in layers.values())
    r = runner.invoke(app, ["compress", str(dense), "--rank-ratio", "0.25", "--calib-samples", "0",
                            "--out", str(tmp_path / "bad")])
    assert r.exit_code == 2
