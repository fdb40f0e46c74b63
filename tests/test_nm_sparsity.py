"""2:4 structured sparsity: masks, post-training pruning with masked fine-tuning, export and the TRT lint."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.methods.nm import is_nm, nm_eligible, nm_mask, parse_nm

from .adversarial.conftest import assert_refused, lrdeploy


def test_nm_mask_keeps_the_two_largest_of_every_four_inputs():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, -1.0, 0.0]])
    assert nm_mask(w).tolist() == [[False, True, True, False, True, True, False, False]]  # ties: earlier
    conv = nn.Conv2d(4, 6, 3)
    mask = nm_mask(conv.weight)
    assert (mask.reshape(6, -1, 4).sum(-1) == 2).all()
    assert is_nm(conv.weight * mask) and not is_nm(conv.weight)
    assert nm_eligible(nn.Conv2d(6, 8, 5), 4) is not None  # 150 inputs: not a multiple of 4
    assert nm_eligible(nn.Linear(400, 120), 4) is None
    assert parse_nm("2:4") == (2, 4)
    for bad in ("4:2", "2-4", "0:4"):
        with pytest.raises(UserError, match="not an N:M"):
            parse_nm(bad)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("nm")
    env = {"LRDEPLOY_DATA": str(data_dir)}
    assert lrdeploy("train", "--model", "lenet5", "--data", "fashion-mnist", "--epochs", "3",
                    "--limit-train", "4096", "--limit-test", "300", "--out", root / "dense",
                    env_extra=env).returncode == 0
    proc = lrdeploy("compress", root / "dense", "--sparsity", "2:4", "--finetune-epochs", "1",
                    "--limit-train", "4096", "--limit-test", "300", "--out", root / "nm", env_extra=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root, proc


def test_pruning_keeps_the_pattern_through_fine_tuning_and_export(pruned):
    from lrdeploy.bundle import load_bundle
    from lrdeploy.exporters.lint import nm_weights
    from lrdeploy.layers.masked import masked_layers

    root, proc = pruned
    assert "test before fine-tuning accuracy" in proc.stdout
    assert "test after fine-tuning accuracy" in proc.stdout
    assert "input size 150 is not a multiple of 4" in proc.stdout  # conv2 stays dense, and says so
    bundle = load_bundle(root / "nm")
    layers = dict(masked_layers(bundle.model))
    assert sorted(layers) == ["fc1", "fc2"]
    for layer in layers.values():
        assert layer.pattern == "2:4" and is_nm(layer.weight)  # fine-tuning kept the zeros
    assert bundle.manifest["structure"]["fc1"]["density"] == 0.5
    metrics = bundle.manifest["metrics"]
    assert metrics["test_accuracy"] > 0.6 and "test_accuracy_before_finetune" in metrics
    out = lrdeploy("export", root / "nm", "--out", root / "nm.onnx", "--fold", "factored")
    assert out.returncode == 0, out.stderr[-2000:]
    sparse, weights = nm_weights(root / "nm.onnx")
    assert sorted(sparse) == ["fc1.weight", "fc2.weight"] and len(weights) == 5


def test_sparse_weights_needs_a_2_4_graph_before_tensorrt_is_even_looked_for(pruned):
    from lrdeploy.exporters.tensorrt import build_engine

    root, _ = pruned
    exported = lrdeploy("export", root / "dense", "--out", root / "dense.onnx", "--fold", "factored")
    assert exported.returncode == 0
    with pytest.raises(UserError, match="none of the 5 weights .* has the 2:4 pattern"):
        build_engine(root / "dense.onnx", root / "dense.plan", sparse_weights=True)
    with pytest.raises(UserError) as err:  # the 2:4 graph passes the lint; TensorRT is what is missing here
        build_engine(root / "nm.onnx", root / "nm.plan", sparse_weights=True)
    assert "2:4" not in str(err.value)


def test_bad_sparsity_options_are_one_line_errors(pruned, tmp_path):
    root, _ = pruned
    assert_refused(lrdeploy("compress", root / "dense", "--sparsity", "2:4", "--rank-ratio", "0.5", "--out",
                            tmp_path / "x"), "--sparsity prunes")
    assert_refused(lrdeploy("compress", root / "dense", "--sparsity", "4:2", "--out", tmp_path / "x"),
                   "not an N:M sparsity pattern")


@pytest.mark.slow
def test_sparse_wide_with_2_4_trains_a_wider_2_4_model(data_dir):
    from lrdeploy.data import load_dataset
    from lrdeploy.layers.masked import masked_layers
    from lrdeploy.methods import get_method
    from lrdeploy.models import create_model, get_spec
    from lrdeploy.train import TrainConfig, train

    hook = get_method("sparse-ift", family="wide", nm="2:4")
    assert hook.settings["sparsity"] == 0.5 and hook.settings["dst"] == "static"
    args = {"num_classes": 10, "in_channels": 1, "width": 8}
    torch.manual_seed(0)
    wide_args = hook.model_args_for(create_model("resnet18", **args), args, (1, 28, 28),
                                    get_spec("resnet18").builder)
    assert wide_args["width"] == 12  # 8·√2 = 11.3, to a multiple of 4
    model = hook.prepare(create_model("resnet18", **wide_args))
    train_set = load_dataset("fashion-mnist", "train", data_dir=data_dir, limit=256)
    result = train(model, train_set, None, TrainConfig(epochs=1, batch_size=64, progress=False), hooks=[hook])
    layers = masked_layers(result.model)
    assert layers and all(layer.pattern == "2:4" and is_nm(layer.weight) for _, layer in layers)
    with pytest.raises(UserError, match="static is implied"):
        get_method("sparse-ift", family="wide", nm="2:4", dst="rigl")


def test_compare_and_export_say_what_sparsity_buys_on_this_cpu(pruned, tmp_path, data_dir):
    import json

    root, _ = pruned
    proc = lrdeploy("compare", root / "dense", root / "nm", "--limit-test", "100", "--batch", "1",
                    "--seconds", "0.2", "--json", tmp_path / "r.json",
                    env_extra={"LRDEPLOY_DATA": str(data_dir)})
    assert proc.returncode in (0, 1), proc.stderr[-2000:]  # a missed budget is exit 1, still reported
    report = json.loads((tmp_path / "r.json").read_text())
    note = report["sparsity"]
    assert "2 sparse layers (mean density 0.50, pattern 2:4)" in note and "every zero is multiplied" in note
    assert "measured speed vs the dense original: b1" in note and note in report["notes"]
    assert "sparsity:" in proc.stdout
    exported = lrdeploy("export", root / "nm", "--out", tmp_path / "nm.onnx", "--fold", "factored")
    assert exported.returncode == 0 and "the graph executes" not in exported.stdout  # no sparse FLOPs logged
    assert "deployed as dense weights" in exported.stdout
