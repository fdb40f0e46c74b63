"""exporters.graph_stats: parameters, weight bytes and FLOPs counted from the ONNX graph as deployed.

Real exported graphs of the registry models (``workflows.export_bundle``, the CLI's path), a hand-built graph
with known counts, and property tests against torch's own FlopCounterMode (the convention of
``lrdeploy.flops``).
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from torch.utils.flop_counter import FlopCounterMode

from lrdeploy.bundle import load_bundle, save_bundle
from lrdeploy.compress import compress
from lrdeploy.exporters.graph_stats import COUNTED_OPS, graph_stats
from lrdeploy.flops import count_flops, count_params
from lrdeploy.models import create_model

# small members of every registry family: the export path is the same, the exports take seconds
REGISTRY = {
    "lenet5": {},
    "resnet18": {"width": 8},
    "vgg19": {"width": 8},
    "transformer": {"src_vocab": 120, "tgt_vocab": 90, "d_model": 32, "nhead": 4, "num_encoder_layers": 1,
                    "num_decoder_layers": 1, "dim_feedforward": 64, "max_len": 40},
}


def _randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Distinct values in every parameter: the dynamo exporter stores identical tensors once (a fresh
    model's LayerNorm weights are all ones), which would make the graph smaller than the module."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def _bundle(root: Path, name: str, args: dict, rank_ratio: float | None) -> Path:
    torch.manual_seed(0)
    model = _randomise(create_model(name, **args))
    if rank_ratio is not None:
        compress(model, rank_ratio=rank_ratio)
        _randomise(model)
    path = root / f"{name}-{rank_ratio}"
    save_bundle(path, model.eval(), model_name=name, model_args=args, method={"name": "svd"},
                dataset={"name": "mnist"}, metrics={})
    return path


def _export(bundle: Path, out: Path, fold: str) -> Path:
    from lrdeploy.workflows import export_bundle

    export_bundle(bundle, out, fold=fold, optimize=False)
    return out


@pytest.fixture(scope="module")
def factored(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Each registry family, factorised, exported with --fold factored: name -> (bundle, .onnx)."""
    root = tmp_path_factory.mktemp("graph-stats")
    out = {}
    for name, args in REGISTRY.items():
        bundle = _bundle(root, name, args, rank_ratio=0.25)
        out[name] = (bundle, _export(bundle, root / f"{name}.onnx", "factored"))
    return out


@pytest.fixture(scope="module")
def lenet_dense(factored, tmp_path_factory) -> Path:
    """The factorised LeNet bundle exported with --fold dense (every factor pair re-multiplied)."""
    return _export(factored["lenet5"][0], tmp_path_factory.mktemp("dense") / "dense.onnx", "dense")


def _exported_module(bundle_path: Path) -> torch.nn.Module:
    """The module ``export_bundle --fold factored`` hands to the exporter (BatchNorm folded into convs)."""
    from lrdeploy.exporters.fold import fold_batchnorm, fold_model

    folded = fold_model(load_bundle(bundle_path).model.eval(), mode="factored")
    return fold_batchnorm(folded)[0]


@pytest.mark.parametrize("name", list(REGISTRY))
def test_factored_export_agrees_with_the_pytorch_counters(factored, name):
    bundle_path, onnx_path = factored[name]
    bundle = load_bundle(bundle_path)
    stats = graph_stats(onnx_path)

    # FLOPs: the same 2·MAC convention as lrdeploy.flops (torch's FlopCounterMode), to the FLOP
    assert stats.missing == [] and stats.unknown_ops == {}
    assert stats.flops == count_flops(bundle.model, bundle.input_shape) == bundle.manifest["flops"]
    assert stats.flops == 2 * stats.macs == sum(stats.by_op_type().values())
    # parameters: those of the exported module, plus the float buffers the graph stores (a positional
    # table); BatchNorm folded into the convolutions leaves its affine parameters out of the graph
    exported = _exported_module(bundle_path)
    buffers = sum(b.numel() for b in exported.buffers() if b.is_floating_point())
    assert stats.params == count_params(exported) + buffers
    assert stats.weights_bytes == 4 * stats.params  # fp32, no quantisation parameters
    if name == "lenet5":  # nothing folded, nothing buffered: the manifest's count exactly
        assert stats.params == bundle.manifest["params"] == count_params(bundle.model)
    if name in ("resnet18", "vgg19"):
        assert stats.params < bundle.manifest["params"]  # BN scale/shift gone, one bias per conv instead
    if name == "transformer":  # src/tgt at the nominal 32 tokens, the length count_flops uses
        assert stats.input_shapes == {"src": [1, 32], "tgt_in": [1, 32]}
        assert stats.by_op_type().keys() == {"MatMul"}  # projections, attention scores, attention × V


def test_folded_dense_counts_the_dense_layers(factored, lenet_dense, tmp_path):
    """``--fold dense`` re-multiplies every factor pair: the graph holds (and computes) the dense LeNet,
    whatever the manifest of the factorised bundle says."""
    bundle_path, factored_path = factored["lenet5"]
    dense_path = lenet_dense
    lowrank, folded = graph_stats(factored_path), graph_stats(dense_path)
    dense = create_model("lenet5")
    assert folded.params == count_params(dense) == 61_706
    assert folded.flops == count_flops(dense, (1, 28, 28))
    assert lowrank.params == load_bundle(bundle_path).manifest["params"] < folded.params
    assert lowrank.flops < folded.flops
    # the file's manifest is the factorised bundle's: a report keeps it only as the trained structure
    from lrdeploy.artifacts import resolve_artifact

    art = resolve_artifact("candidate", dense_path, tmp_path)
    summary = art.summary()
    assert (summary["params"], summary["flops"]) == (folded.params, folded.flops)
    assert summary["trained"]["params"] == lowrank.params
    assert summary["graph"]["flops_by_op_type"] == folded.by_op_type()


def test_report_shows_deployed_figures_and_trained_structure_where_it_differs(factored, lenet_dense,
                                                                               tmp_path):
    from lrdeploy.artifacts import resolve_artifact
    from lrdeploy.serving.report import render_markdown

    factored_path, dense_path = factored["lenet5"][1], lenet_dense
    ref = resolve_artifact("dense", factored_path, tmp_path).summary()
    cand = resolve_artifact("candidate", dense_path, tmp_path).summary()
    md = render_markdown({"reference": ref, "candidate": cand})
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert f"{cand['params']:,}" in rows["parameters"]  # the graph's 61,706
    trained = rows["parameters (trained structure)"]
    assert f"{cand['trained']['params']:,}" in trained and "same" in trained  # only the candidate differs
    assert "counted from the deployed ONNX graph" in md
    same = render_markdown({"reference": ref, "candidate": ref})
    assert "trained structure)" not in same  # nothing differs: no trained rows
    # `lrdeploy report`: the deployed count in "params", the trained one in its own column where it differs
    from lrdeploy.serving.report import merge_reports, render_summary_markdown

    summary = merge_reports([{"schema": "lrdeploy.compare/1", "reference": ref, "candidate": cand}])
    table = [line for line in render_summary_markdown(summary).splitlines() if line.startswith("| ")]
    header = [c.strip() for c in table[0].strip("|").split("|")]
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in table[1:]}
    params, trained_col = header.index("params"), header.index("params (trained structure)")
    assert rows[cand["name"]][params] == f"{cand['params']:,}"
    assert rows[cand["name"]][trained_col] == f"{cand['trained']['params']:,}"
    assert rows[ref["name"]][trained_col] == "same"


def test_ort_optimised_graph_counts_the_same(factored, tmp_path):
    """ONNX Runtime's offline-optimised graph (what ``export`` writes as ``.ort.onnx``: FusedConv, FusedGemm
    of com.microsoft) holds and computes the same."""
    from lrdeploy.exporters.onnx import ort_session

    onnx_path = factored["resnet18"][1]
    ort_path = tmp_path / "r.ort.onnx"
    ort_session(onnx_path.read_bytes(), "ORT_ENABLE_EXTENDED", optimized_model_filepath=str(ort_path))
    fused = onnx.load(str(ort_path))
    assert {n.op_type for n in fused.graph.node} & {"FusedConv", "FusedGemm"}
    plain, opt = graph_stats(onnx_path), graph_stats(fused)
    assert (opt.params, opt.flops) == (plain.params, plain.flops)


# ------------------------------------------------------------------------------------- hand-built graph
def _init(name: str, shape: tuple[int, ...], dtype=np.float32, seed: int = 0) -> onnx.TensorProto:
    arr = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    return numpy_helper.from_array(arr, name)


def _hand_graph(extra_nodes: list | None = None) -> onnx.ModelProto:
    """Every counted op kind, a weight shared by two nodes, a weight in a Constant node, an int8 weight
    behind DequantizeLinear, shape/axes constants, a scalar constant and an unused initialiser."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["x", "w_conv"], ["c"], group=2, pads=[1, 1, 1, 1]),  # [1,8,8,8]
        helper.make_node("ConvTranspose", ["c", "w_convt"], ["ct"], strides=[2, 2]),  # [1,4,16,16]
        helper.make_node("Reshape", ["ct", "shape"], ["r"]),  # [1,64,16]
        helper.make_node("MatMul", ["r", "w_shared"], ["m1"]),  # [1,64,10]: 640 × 16 MACs
        helper.make_node("Relu", ["r"], ["r2"]),
        helper.make_node("MatMul", ["r2", "w_shared"], ["m2"]),  # the same weight again
        helper.make_node("Add", ["m1", "m2"], ["m"]),
        helper.make_node("Transpose", ["m"], ["mt"], perm=[0, 2, 1]),  # [1,10,64]
        helper.make_node("MatMul", ["m", "mt"], ["scores"]),  # batched, attention-like: [1,64,64]
        helper.make_node("Einsum", ["m", "mt"], ["e"], equation="bij,bjk->bik"),  # the same, as an Einsum
        helper.make_node("Mul", ["scores", "half"], ["scaled"]),
        helper.make_node("Flatten", ["m"], ["flat"]),  # [1,640]
        helper.make_node("Constant", [], ["w_gemm"], value=_init("w_gemm", (10, 640), seed=3)),
        helper.make_node("Constant", [], ["b_gemm"], value=_init("b_gemm", (10,), seed=4)),
        helper.make_node("Gemm", ["flat", "w_gemm", "b_gemm"], ["g"], transB=1),  # [1,10]
        helper.make_node("DequantizeLinear", ["w_q", "w_q_scale", "w_q_zp"], ["w_dq"]),
        helper.make_node("Transpose", ["flat"], ["flat_t"], perm=[1, 0]),  # [640,1]
        helper.make_node("Gemm", ["flat_t", "w_dq"], ["gq"], transA=1, transB=1),  # [1,6]
        helper.make_node("Unsqueeze", ["g", "axes"], ["gu"]),
        *(extra_nodes or []),
    ]
    initializers = [
        _init("w_conv", (8, 2, 3, 3), seed=1), _init("w_convt", (8, 4, 2, 2), seed=2),
        _init("w_shared", (16, 10), seed=5),
        numpy_helper.from_array(np.array([1, 64, 16], dtype=np.int64), "shape"),
        numpy_helper.from_array(np.array([0], dtype=np.int64), "axes"),
        numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
        numpy_helper.from_array(np.arange(6 * 640, dtype=np.int64).reshape(6, 640).astype(np.int8), "w_q"),
        numpy_helper.from_array(np.array(0.02, dtype=np.float32), "w_q_scale"),
        numpy_helper.from_array(np.array(0, dtype=np.int8), "w_q_zp"),
        _init("never_read", (100,), seed=6),
    ]
    shapes = {"ct": [1, 4, 16, 16], "scaled": [1, 64, 64], "e": [1, 64, 64], "gu": [1, 1, 10], "gq": [1, 6]}
    outputs = [helper.make_tensor_value_info(n, f, shape) for n, shape in shapes.items()]
    outputs += [helper.make_tensor_value_info(n.output[0], f, None) for n in extra_nodes or []]
    graph = helper.make_graph(nodes, "hand", [helper.make_tensor_value_info("x", f, ["batch", 4, 8, 8])],
                              outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


HAND_MACS = {
    "Conv": 8 * 8 * 8 * (2 * 3 * 3),  # output elements × (in channels / groups × kernel)
    "ConvTranspose": (8 * 8 * 8) * (4 * 2 * 2),  # input elements × (out channels / groups × kernel)
    "MatMul": 2 * (64 * 10 * 16) + 64 * 64 * 10,
    "Einsum": 64 * 64 * 10,
    "Gemm": 10 * 640 + 6 * 640,
}
HAND_PARAMS = 8 * 2 * 9 + 8 * 4 * 4 + 16 * 10 + (10 * 640 + 10) + 6 * 640  # w_shared once, int8 weight


def test_hand_built_graph_known_counts():
    model = _hand_graph()
    onnx.checker.check_model(model, full_check=True)
    stats = graph_stats(model)
    assert stats.input_shapes == {"x": [1, 4, 8, 8]}  # dynamic batch -> 1
    assert stats.missing == [] and stats.unknown_ops == {}
    assert stats.by_op_type() == {op: 2 * macs for op, macs in HAND_MACS.items()}
    assert stats.flops == 2 * sum(HAND_MACS.values())
    assert stats.params == HAND_PARAMS
    kinds = {t.name: t.kind for t in stats.tensors}
    assert kinds["shape"] == kinds["axes"] == kinds["half"] == "constant"
    assert kinds["w_q_scale"] == kinds["w_q_zp"] == "quantization"
    assert kinds["never_read"] == "unused" and kinds["w_q"] == kinds["w_gemm"] == "weight"
    fp32 = HAND_PARAMS - 6 * 640
    assert stats.weights_bytes == 4 * fp32 + 6 * 640 + 4 + 1  # int8 weight, its fp32 scale, int8 zero point
    assert stats.not_counted == {"Add": 1, "Constant": 2, "DequantizeLinear": 1, "Flatten": 1, "Mul": 1,
                                 "Relu": 1, "Reshape": 1, "Transpose": 2, "Unsqueeze": 1}
    assert sum(n.macs for n in stats.nodes if n.status == "counted") == sum(HAND_MACS.values())
    assert all(n.macs is None for n in stats.nodes if n.status != "counted")
    # ONNX Runtime runs it, so the graph is a real one
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"x": np.zeros((1, 4, 8, 8), np.float32)})
    assert outs[0].shape == (1, 4, 16, 16)


def test_an_op_without_a_cost_model_makes_flops_unknown_not_smaller():
    lstm = helper.make_node("LSTM", ["m", "lstm_w", "lstm_r"], ["lstm_y"], hidden_size=3)
    model = _hand_graph([lstm])
    model.graph.initializer.extend([_init("lstm_w", (1, 12, 10), seed=7),
                                    _init("lstm_r", (1, 12, 3), seed=8)])
    stats = graph_stats(model)
    assert stats.flops is None and stats.macs is None
    assert stats.unknown_ops == {"LSTM": 1} and "LSTM" in stats.missing[0]
    assert stats.params == HAND_PARAMS + 12 * 10 + 12 * 3  # parameters are still counted
    assert stats.by_op_type() == {op: 2 * macs for op, macs in HAND_MACS.items()}  # per node, still there


def test_a_counted_op_with_underivable_shapes_makes_flops_unknown():
    custom = helper.make_node("Mystery", ["m"], ["mystery"], domain="example.custom")
    matmul = helper.make_node("MatMul", ["mystery", "w_extra"], ["after"], name="after_mystery")
    model = _hand_graph([custom, matmul])
    model.graph.initializer.append(_init("w_extra", (10, 3), seed=9))
    model.opset_import.append(helper.make_opsetid("example.custom", 1))
    stats = graph_stats(model)
    assert stats.flops is None
    status = {n.name: n.status for n in stats.nodes}
    assert status["after_mystery"] == "shape unknown" and "Mystery" in stats.unknown_ops
    assert any("shapes not inferred for 1 node(s), e.g. after_mystery" in m for m in stats.missing)


def test_report_shows_unknown_flops_as_a_dash():
    from lrdeploy.serving.report import render_markdown

    summary = {"params": 10, "flops": None, "trained": {"params": 10, "flops": 999}}
    md = render_markdown({"reference": summary, "candidate": summary})
    flops_row = next(line for line in md.splitlines() if line.startswith("| FLOPs / sample |"))
    assert "—" in flops_row and "-" not in flops_row.replace("—", "")
    assert "FLOPs / sample (trained structure)" in md and "999" in md


# ------------------------------------------------------------------------- against torch's FlopCounterMode
def _torch_flops(fn, *tensors) -> int:
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        fn(*tensors)
    return int(counter.get_total_flops())


def _single_node_model(node, inputs: dict[str, list[int]], weights: dict[str, tuple[int, ...]]):
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info(n, f, s) for n, s in inputs.items()],
        [helper.make_tensor_value_info(node.output[0], f, None)],
        [_init(n, s) for n, s in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


@settings(max_examples=30, deadline=None)
@given(groups=st.integers(1, 3), cin_per=st.integers(1, 3), cout_per=st.integers(1, 3), k=st.integers(1, 3),
       stride=st.integers(1, 2), pad=st.integers(0, 1), dilation=st.integers(1, 2), size=st.integers(5, 9),
       transposed=st.booleans())
def test_conv_flops_match_torch(groups, cin_per, cout_per, k, stride, pad, dilation, size, transposed):
    cin, cout = groups * cin_per, groups * cout_per
    x = torch.zeros(1, cin, size, size)
    attrs = {"group": groups, "strides": [stride] * 2, "pads": [pad] * 4, "dilations": [dilation] * 2}
    if transposed:
        w_shape = (cin, cout_per, k, k)
        expected = _torch_flops(lambda t, w: torch.nn.functional.conv_transpose2d(
            t, w, stride=stride, padding=pad, dilation=dilation, groups=groups), x, torch.zeros(w_shape))
        node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)
    else:
        w_shape = (cout, cin_per, k, k)
        expected = _torch_flops(lambda t, w: torch.nn.functional.conv2d(
            t, w, stride=stride, padding=pad, dilation=dilation, groups=groups), x, torch.zeros(w_shape))
        node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    stats = graph_stats(_single_node_model(node, {"x": ["batch", cin, size, size]}, {"w": w_shape}))
    assert stats.flops == expected


@settings(max_examples=30, deadline=None)
@given(a_batch=st.lists(st.integers(1, 3), max_size=2), b_batch=st.lists(st.integers(1, 3), max_size=2),
       m=st.integers(1, 5), k=st.integers(1, 5), n=st.integers(1, 5), a_vector=st.booleans())
def test_matmul_flops_match_torch(a_batch, b_batch, m, k, n, a_vector):
    # broadcast-compatible batch dims: where both have an axis, one of them is 1 or they are equal
    width = min(len(a_batch), len(b_batch))
    for i in range(1, width + 1):
        if a_batch[-i] != b_batch[-i] and 1 not in (a_batch[-i], b_batch[-i]):
            b_batch[-i] = 1
    a_shape = [k] if a_vector else [*a_batch, m, k]
    b_shape = [*b_batch, k, n]
    node = helper.make_node("MatMul", ["a", "b"], ["y"])
    stats = graph_stats(_single_node_model(node, {"a": a_shape, "b": b_shape}, {}))
    batch = np.broadcast_shapes(tuple(b_batch), () if a_vector else tuple(a_batch))
    assert stats.flops == 2 * math.prod(batch) * (1 if a_vector else m) * k * n
    if not a_vector:  # torch runs a vector × matrix product as mul + sum, which its counter does not count
        assert stats.flops == _torch_flops(torch.matmul, torch.zeros(a_shape), torch.zeros(b_shape))


def test_counted_ops_are_the_heavy_ones_and_exporters_never_import_serving():
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"} <= COUNTED_OPS
    source = Path(__file__).parents[1] / "exporters" / "graph_stats.py"
    tree = ast.parse(source.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in imported if "serving" in m]
