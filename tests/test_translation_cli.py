"""The Transformer (Multi30k de→en) through the ordinary commands: train (dense, Cuttlefish, Maestro) → export
(two int64 inputs, dynamic batch and lengths, ORT matches PyTorch) → compare (perplexity, BLEU, token parity,
a golden set) → bench and check --golden (a multi-input model through both).

A tiny model (d_model 32, one encoder and one decoder layer) on the first 300 training pairs, so the whole
file stays well under a minute and a half on a 2-core box.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lrdeploy.cli import app

runner = CliRunner()
TINY = ("d_model=32", "nhead=2", "num_encoder_layers=1", "num_decoder_layers=1", "dim_feedforward=64",
        "max_len=32", "dropout=0.0")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def train(data_dir, out, *extra):
    model_args = [a for kv in TINY for a in ("--model-arg", kv)]
    r = invoke("train", "--model", "transformer", "--data", "multi30k", "--data-dir", data_dir, *model_args,
               "--limit-train", "300", "--limit-test", "50", "--batch-size", "64", "--out", out, *extra)
    assert r.exit_code == 0, r.output
    assert "perplexity" in r.output and "BLEU" in r.output
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_dir):
    """train dense + Cuttlefish, export both, compare the two ONNX files; one thread (shared CI box)."""
    root = tmp_path_factory.mktemp("translation")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {"root": root}
        out["dense"] = train(data_dir, root / "dense", "--epochs", "1")
        # two epochs: Cuttlefish switches after the first at the earliest (window=1 lets the detector fire)
        out["cuttlefish"] = train(data_dir, root / "cuttlefish", "--epochs", "2", "--method", "cuttlefish",
                                  "--method-opt", "window=1")
        for name in ("dense", "cuttlefish"):
            r = invoke("export", root / name, "--out", root / f"{name}.onnx")
            assert r.exit_code == 0, r.output
            out[f"export_{name}"] = r.output
        r = invoke("compare", root / "dense.onnx", root / "cuttlefish.onnx", "--data-dir", data_dir,
                   "--limit-test", "20", "--batch", "1,4", "--threads", "1", "--seconds", "0.05",
                   "--max-bleu-drop", "100", "--max-perplexity-increase", "10",
                   "--save-golden", root / "golden", "--golden-samples", "8", "--json", root / "report.json")
        assert r.exit_code == 0, r.output
        out["compare_output"] = r.output
        out["report"] = json.loads((root / "report.json").read_text())
        yield out
    finally:
        torch.set_num_threads(threads)


def test_train_writes_translation_bundles(pipeline):
    for name in ("dense", "cuttlefish"):
        m = pipeline[name]
        assert m["model"]["name"] == "transformer" and m["model"]["input_shape"] == [32]
        assert m["model"]["args"]["src_vocab"] > 1000 and m["model"]["args"]["d_model"] == 32
        assert m["dataset"]["name"] == "multi30k" and m["dataset"]["task"] == "translation"
        assert m["dataset"]["train_examples"] == 300
        assert set(m["tokenizers"]) == {"src", "tgt"}
        metrics = m["metrics"]
        assert metrics["test_samples"] == 50 and metrics["test_perplexity"] > 1
        assert 0 <= metrics["test_bleu"] <= 100 and 0 <= metrics["test_token_accuracy"] <= 1
        assert m["flops"] > 0 and m["params"] > 0
        assert m["method"]["train"]["optimizer"] == "adamw"  # translation defaults, not the SGD recipe
    cf = pipeline["cuttlefish"]["method"]
    assert cf["name"] == "cuttlefish" and cf["settings"]["window"] == 1 and cf["log"]["switched"]
    assert cf["train"]["epochs"] == 2


def test_export_has_two_int64_inputs_with_dynamic_axes_and_matches_torch(pipeline, data_dir):
    onnx = pytest.importorskip("onnx")
    from lrdeploy.bundle import load_bundle
    from lrdeploy.data.multi30k import load_translation, tokenizers_from_dict
    from lrdeploy.exporters.onnx import read_export_info
    from lrdeploy.serving.runtimes.ort_cpu import OrtCpuRuntime

    root = pipeline["root"]
    assert "parity rel-L2" in pipeline["export_dense"]
    proto = onnx.load(str(root / "dense.onnx"))
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in proto.graph.input}
    assert dims == {"src": ["batch", "src_len"], "tgt_in": ["batch", "tgt_len"]}
    assert all(v.type.tensor_type.elem_type == onnx.TensorProto.INT64 for v in proto.graph.input)
    assert [o.name for o in proto.graph.output] == ["logits"]
    info = read_export_info(root / "dense.onnx")
    assert [i["name"] for i in info["inputs"]] == ["src", "tgt_in"] and info["output_name"] == "logits"
    assert (root / "dense.ort.onnx").is_file()

    bundle = load_bundle(root / "cuttlefish")
    test = load_translation("multi30k", "test", data_dir, limit=5, max_len=32,
                            tokenizers=tokenizers_from_dict(bundle.manifest["tokenizers"]))
    with torch.inference_mode():
        ref = bundle.model(test.src, test.tgt_in).numpy()
    rt = OrtCpuRuntime(root / "cuttlefish.onnx", threads=1)
    assert [i.name for i in rt.inputs()] == ["src", "tgt_in"] and [o.name for o in rt.outputs()] == ["logits"]
    out = rt.run({"src": test.src.numpy(), "tgt_in": test.tgt_in.numpy()})["logits"]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


def test_compare_reports_perplexity_bleu_and_token_parity(pipeline):
    report = pipeline["report"]
    assert {"schema", "reference", "candidate", "ratios", "task", "parity", "latency", "environment",
            "budget", "verdict"} <= set(report)
    task = report["task"]
    assert task["task"] == "translation" and task["samples"] == 20 and task["split"] == "test"
    assert task["languages"] == "de-en" and "accuracy" not in report  # no metric called accuracy here
    for side in ("reference", "candidate"):
        assert set(task[side]) == {"loss", "perplexity", "token_accuracy", "bleu"}
        assert task[side]["perplexity"] > 1 and 0 <= task[side]["bleu"] <= 100
    headline = task["headline"]
    assert headline["key"] == "bleu" and headline["delta"] == pytest.approx(
        task["candidate"]["bleu"] - task["reference"]["bleu"])
    assert [m["key"] for m in task["metrics"]] == ["bleu", "perplexity", "token_accuracy"]
    assert report["reference"]["task"] == report["candidate"]["task"] == "translation"
    # ORT's teacher-forced numbers agree with the bundle's (PyTorch) on the same first sentences' prefix
    assert report["reference"]["method"] == "dense" and report["candidate"]["method"] == "cuttlefish"
    parity = report["parity"]
    assert parity["output"] == "logits"
    assert parity["shape"][1] == pipeline["dense"]["model"]["args"]["tgt_vocab"]
    assert 0 <= parity["top1_agreement"] <= 1 and parity["rel_l2"] >= 0
    assert set(report["latency"]) == {"1", "4"} and report["latency"]["4"]["speedup"] > 0
    assert report["environment"]["latency_inputs"]["4"]["src"][0] == 4
    assert parity["rows"] == "non-padding target tokens of the first 20 sentences (teacher-forced)"
    names = [c["name"] for c in report["budget"]["checks"]]
    assert names == ["BLEU drop (points)", "perplexity increase (relative)"] and report["budget"]["passed"]
    assert "perplexity" in pipeline["compare_output"] and "BLEU" in pipeline["compare_output"]


def test_maestro_trains_the_transformer(tmp_path, data_dir):
    torch.set_num_threads(1)
    m = train(data_dir, tmp_path / "maestro", "--epochs", "1", "--method", "maestro")
    assert m["method"]["name"] == "maestro" and m["method"]["final_ranks"]
    kinds = {layer["kind"] for layer in m["structure"].values()}
    assert "maestro_linear" in kinds
    assert "generator" not in m["structure"]  # the classifier stays dense


def test_task_mismatches_are_user_errors(tmp_path, data_dir, pipeline):
    r = invoke("train", "--model", "transformer", "--data", "mnist", "--out", tmp_path / "a")
    assert r.exit_code == 2 and "translation model" in r.output
    r = invoke("train", "--model", "lenet5", "--data", "multi30k", "--out", tmp_path / "b")
    assert r.exit_code == 2 and "translation dataset" in r.output
    r = invoke("init", "--model", "lenet5", "--out", tmp_path / "lenet")
    assert r.exit_code == 0, r.output
    r = invoke("compare", pipeline["root"] / "dense.onnx", tmp_path / "lenet", "--data-dir", data_dir,
               "--threads", "1")
    assert r.exit_code == 2 and "a translation model and the candidate a classification model" in r.output


def test_svd_compress_evaluates_and_fine_tunes_a_translation_bundle(tmp_path, data_dir, pipeline):
    torch.set_num_threads(1)
    out = tmp_path / "svd"
    r = invoke("compress", pipeline["root"] / "dense", "--rank-ratio", "0.5", "--finetune-epochs", "1",
               "--limit-train", "100", "--limit-test", "50", "--data-dir", data_dir, "--out", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    dense = pipeline["dense"]
    assert m["tokenizers"] == dense["tokenizers"]  # ids stay those the model was trained with
    assert m["method"]["name"] == "svd" and m["method"]["finetune"]["lr"] == pytest.approx(3e-4)
    metrics = m["metrics"]
    assert metrics["test_perplexity_before_finetune"] > 1 and metrics["test_perplexity"] > 1
    assert metrics["test_perplexity"] != metrics["test_perplexity_before_finetune"]  # it did train
    assert 0 <= metrics["test_bleu"] <= 100
    assert any(layer["kind"].startswith("lowrank") for layer in m["structure"].values())
    assert m["params"] < dense["params"]
    r = invoke("export", out, "--out", tmp_path / "svd.onnx")
    assert r.exit_code == 0, r.output


def test_int8_and_fp16_variants_are_judged_on_test_sentence_pairs(tmp_path, pipeline, data_dir):
    torch.set_num_threads(1)
    from lrdeploy.workflows import export_precision_variant

    fp32 = pipeline["root"] / "dense.onnx"
    for precision, method in (("int8", "int8-dynamic"), ("fp16", "fp16")):
        res = export_precision_variant(pipeline["root"] / "dense", fp32, precision, data_dir=data_dir,
                                       test_examples=40)
        assert res.dst.exists() and res.method == method
        acc = res.accuracy  # token accuracy over the non-padding target tokens of the 40 sentences
        assert 40 < acc["samples"] < 40 * 32 and 0 <= acc["fp32"] <= 1
        # judged per token: the verdict follows the preset. The one-epoch tiny model's logits are nearly
        # flat, so dynamic int8 flips many arg-maxes (agreement ~0.6 with onnxruntime 1.32); fp16 must pass.
        assert res.passed == (not res.failures) and (res.passed or precision == "int8"), res.failures
        assert res.parity["top1_agreement"] > (0.9 if precision == "fp16" else 0.3)


def test_bench_times_the_two_input_graphs_on_synthetic_token_ids(pipeline, tmp_path):
    root, out = pipeline["root"], tmp_path / "bench.json"
    args = ["bench", root / "dense.onnx", root / "cuttlefish.onnx", "--batch", "1,4", "--threads", "1",
            "--seconds", "0", "--min-runs", "3", "--warmup", "0", "--rounds", "3", "--time-limit", "0.2"]
    r = invoke(*args, "--json", out)
    assert r.exit_code == 2 and "dynamic dimension 'src_len'" in r.output and "--dim src_len=N" in r.output
    r = invoke(*args, "--dim", "src_len=12", "--dim", "tgt_len=9", "--profile", "--profile-runs", "2",
               "--json", out)
    assert r.exit_code == 0, r.output
    report = json.loads(out.read_text())
    fed = report["settings"]["inputs"]["4"]
    assert fed == {"src": {"shape": [4, 12], "dtype": "int64"}, "tgt_in": {"shape": [4, 9], "dtype": "int64"}}
    assert report["settings"]["dims"] == {"src_len": 12, "tgt_len": 9}
    assert report["settings"]["input_shape"] is None
    assert [i["name"] for i in report["models"]["dense"]["inputs"]] == ["src", "tgt_in"]
    assert report["batches"]["4"]["speedup"]["cuttlefish"] > 0
    assert report["profile"]["dense"]["4"]["by_op_type"]  # profiled on the same two inputs


def test_check_golden_of_a_two_input_model(pipeline, tmp_path):
    """The golden set `compare --save-golden` wrote holds both named inputs; its own graph (and bundle)
    passes, the compressed graph does not pass for the same model."""
    from lrdeploy.serving.golden import load_golden

    root = pipeline["root"]
    golden = load_golden(root / "golden")
    assert list(golden.inputs) == ["src", "tgt_in"] and golden.samples == 8
    assert golden.inputs["src"].dtype == np.int64 and golden.outputs["logits"].ndim == 3
    assert golden.labels is not None and golden.labels.shape == golden.inputs["tgt_in"].shape
    assert pipeline["report"]["golden"]["samples"] == 8
    out = tmp_path / "check.json"
    r = invoke("check", root / "dense.onnx", "--golden", root / "golden", "--json", out)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    assert result["passed"] and result["outputs"]["logits"]["rel_l2"] < 1e-5
    assert result["golden"]["inputs"]["src"][0] == 8
    r = invoke("check", root / "dense", "--golden", root / "golden")  # the bundle, exported on the fly
    assert r.exit_code == 0, r.output
    r = invoke("check", root / "cuttlefish.onnx", "--golden", root / "golden")
    assert r.exit_code == 1 and "golden check failed (fp32)" in r.output
