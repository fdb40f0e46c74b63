"""Model registry and LeNet-5."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.models import LeNet5, create_model, get_spec, list_models, register_model


def test_registry_lists_lenet5_with_its_spec():
    assert "lenet5" in [s.name for s in list_models()]
    spec = get_spec("LeNet5")  # case-insensitive
    assert spec.name == "lenet5"
    assert spec.input_shape == (1, 28, 28)
    assert spec.num_classes == 10
    assert spec.default_args == {"num_classes": 10, "in_channels": 1}
    assert spec.description


def test_unknown_model_is_a_user_error_listing_known_names():
    with pytest.raises(UserError) as err:
        create_model("lenet")
    assert "unknown model 'lenet'" in err.value.message
    assert "lenet5" in err.value.hint


def test_bad_kwargs_are_user_errors():
    with pytest.raises(UserError, match="no argument"):
        create_model("lenet5", width=2)
    with pytest.raises(UserError, match="num_classes"):
        create_model("lenet5", num_classes=0)


def test_duplicate_registration_is_a_programming_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model("lenet5")(lambda: nn.Identity())


def test_lenet5_shapes_and_parameter_count():
    model = create_model("lenet5")
    assert isinstance(model, LeNet5)
    # conv1 156 + conv2 2416 + fc1 48120 + fc2 10164 + fc3 850
    assert sum(p.numel() for p in model.parameters()) == 61_706
    shapes = {}

    def record(name):
        return lambda module, inputs, output: shapes.__setitem__(name, output.shape)

    for name in ("conv1", "pool1", "conv2", "pool2", "flatten", "fc1", "fc2", "fc3"):
        getattr(model, name).register_forward_hook(record(name))
    out = model(torch.zeros(4, 1, 28, 28))
    assert out.shape == (4, 10)
    assert shapes == {
        "conv1": (4, 6, 28, 28),
        "pool1": (4, 6, 14, 14),
        "conv2": (4, 16, 10, 10),
        "pool2": (4, 16, 5, 5),
        "flatten": (4, 400),
        "fc1": (4, 120),
        "fc2": (4, 84),
        "fc3": (4, 10),
    }
    assert create_model("lenet5", num_classes=3, in_channels=2)(torch.zeros(1, 2, 28, 28)).shape == (1, 3)


def test_every_operation_is_a_named_module():
    """Compression and hooks find layers through named_modules; nothing may hide in forward as a function."""
    model = create_model("lenet5")
    names = dict(model.named_children())
    assert [n for n, m in names.items() if isinstance(m, (nn.Conv2d, nn.Linear))] == [
        "conv1", "conv2", "fc1", "fc2", "fc3",
    ]  # fmt: skip
    graph = torch.fx.symbolic_trace(model).graph
    ops = {node.op for node in graph.nodes}
    assert ops == {"placeholder", "call_module", "output"}


def test_lenet5_exports_to_onnx_with_dynamic_batch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = create_model("lenet5").eval()
    path = tmp_path / "lenet5.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (torch.zeros(2, 1, 28, 28),), str(path), dynamo=False,
            input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}},
        )  # fmt: skip
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.randn(batch, 1, 28, 28)
        (got,) = session.run(None, {"x": x.numpy()})
        np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_mlp_shapes_parameter_count_and_kept_dense_head():
    from lrdeploy.methods.selection import select_layers

    model = create_model("mlp")
    # fc1 784·1024 + 1024, fc2 1024·1024 + 1024, head 1024·10 + 10
    assert sum(p.numel() for p in model.parameters()) == 785 * 1024 + 1025 * 1024 + 1025 * 10
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    small = create_model("mlp", width=16, depth=3, num_classes=4, in_channels=2)
    assert [n for n, m in small.named_modules() if isinstance(m, nn.Linear)] == ["fc1", "fc2", "fc3", "head"]
    assert small(torch.zeros(2, 2, 28, 28)).shape == (2, 4)
    chosen, _ = select_layers(model)
    assert chosen == ["fc1", "fc2"]  # the head is the classifier the spec names: kept dense
    with pytest.raises(UserError, match="width"):
        create_model("mlp", width=0)
