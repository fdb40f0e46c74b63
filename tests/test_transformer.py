"""Translation setting: tokenizer, Multi30k reader, Transformer model, ONNX export, BLEU, training."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lrdeploy.compress import NO_SAVING, compress
from lrdeploy.data import checksum
from lrdeploy.data.multi30k import (
    MULTI30K,
    build_tokenizers,
    download_translation,
    load_translation,
    read_sentences,
    tokenizers_from_dict,
)
from lrdeploy.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, WordTokenizer
from lrdeploy.errors import UserError
from lrdeploy.layers.lowrank import LowRankLinear
from lrdeploy.models import create_model, get_spec
from lrdeploy.seq2seq import (
    TranslationConfig,
    bleu_stats,
    corpus_bleu,
    evaluate_translation,
    greedy_decode,
    translate,
)
from lrdeploy.train import lr_at
from lrdeploy.train import train as run_training

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj", "ff1", "ff2")


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path_factory):
    """No test may see the developer's LRDEPLOY_DATA or ~/.cache, nor another test's verified-file cache."""
    monkeypatch.delenv("LRDEPLOY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    checksum.clear_cache()


@pytest.fixture(scope="module")
def tokenizers(data_dir):
    return build_tokenizers(data_dir=data_dir)


def _tiny(src_vocab: int = 60, tgt_vocab: int = 50, **kw) -> nn.Module:
    args = dict(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64, dropout=0.0
    )
    args.update(kw)
    torch.manual_seed(0)
    return create_model("transformer", src_vocab=src_vocab, tgt_vocab=tgt_vocab, **args).eval()


# --- tokenizer ------------------------------------------------------------------------------------------

TEXTS = ["Zwei Männer, ein Hund.", "Ein Hund läuft!", "Zwei Hunde laufen.", "ein Mann"]


def test_tokenizer_splits_lowercases_and_orders_deterministically():
    tok = WordTokenizer.build(TEXTS, min_freq=1)
    assert tok.tokens[:4] == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert (PAD_ID, UNK_ID, BOS_ID, EOS_ID) == (0, 1, 2, 3)
    # counts: ein 3, . 2, hund 2, zwei 2, then the singletons alphabetically
    assert tok.tokens[4:8] == ["ein", ".", "hund", "zwei"]
    assert tok.tokenize("Zwei Männer, ein Hund.") == ["zwei", "männer", ",", "ein", "hund", "."]
    assert WordTokenizer.build(list(reversed(TEXTS)), min_freq=1) == tok  # input order does not matter
    assert WordTokenizer.build(TEXTS, min_freq=2).tokens[4:] == ["ein", ".", "hund", "zwei"]
    assert len(WordTokenizer.build(TEXTS, min_freq=1, max_size=6)) == 6


def test_tokenizer_round_trip_and_unknown_words():
    tok = WordTokenizer.build(TEXTS, min_freq=1)
    ids = tok.encode("Ein Hund, zwei Katzen!", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and UNK_ID in ids
    assert tok.decode(ids) == "ein hund , zwei <unk> !"
    assert (
        tok.decode([*tok.encode("zwei hunde laufen ."), EOS_ID, tok.encode("hund")[0]])
        == "zwei hunde laufen ."
    )
    assert tok.decode_tokens([BOS_ID, PAD_ID, 4, PAD_ID]) == ["ein"]


def test_tokenizer_serialises_to_json():
    tok = WordTokenizer.build(TEXTS, min_freq=1)
    again = WordTokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))
    assert again == tok and again.encode("Zwei Hunde") == tok.encode("Zwei Hunde")
    with pytest.raises(UserError):
        WordTokenizer.from_dict({"tokens": tok.tokens})
    with pytest.raises(UserError):
        WordTokenizer.from_dict({**tok.to_dict(), "tokens": ["a", "b"]})


# --- Multi30k -------------------------------------------------------------------------------------------


def test_multi30k_counts_and_first_lines(data_dir):
    counts = {s: len(read_sentences("multi30k", s, "en", data_dir)) for s in ("train", "val", "test")}
    assert counts == {"train": 29000, "val": 1014, "test": 1000}
    assert len(read_sentences("multi30k", "test_2016_flickr", "de", data_dir)) == 1000
    de, en = (read_sentences("multi30k", "train", lang, data_dir)[0] for lang in ("de", "en"))
    assert de == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
    assert en == "Two young, White males are outside near many bushes."
    assert (
        read_sentences("multi30k", "val", "en", data_dir)[0]
        == "A group of men are loading cotton onto a truck"
    )
    assert (
        read_sentences("multi30k", "test", "en", data_dir)[0]
        == "A man in an orange hat starring at something."
    )


def test_load_translation_tensors(data_dir, tokenizers):
    src_tok, tgt_tok = tokenizers
    assert (len(src_tok), len(tgt_tok)) == (7882, 5898)  # min_freq 2 on the full training split
    val = load_translation("multi30k", "val", data_dir, tokenizers=tokenizers)
    assert len(val) == 1014 and val.src.dtype == torch.int64 and val.tgt.dtype == torch.int64
    assert (val.tgt[:, 0] == BOS_ID).all() and (val.src[:, 0] != PAD_ID).all()
    assert ((val.src == EOS_ID).sum(1) == 1).all() and ((val.tgt == EOS_ID).sum(1) == 1).all()
    assert val.truncated == 0 and val.limit is None
    assert tgt_tok.decode(val.tgt[0].tolist()) == "a group of men are loading cotton onto a truck"
    assert val.references()[0] == tgt_tok.tokenize(val.tgt_text[0])
    assert val.preprocess["src_vocab_size"] == 7882 and val.describe()["size"] == 1014
    assert tokenizers_from_dict(json.loads(json.dumps(val.tokenizers_dict()))) == tokenizers
    small = load_translation("multi30k", "test", data_dir, limit=5, tokenizers=tokenizers, max_len=6)
    assert small.src.shape == (5, 6) and small.tgt.shape[1] <= 6 and small.truncated == 5 and small.limit == 5
    assert (small.src[:, -1] == EOS_ID).all()
    head = val.head(3)
    assert len(head) == 3 and head.limit == 3 and head.tgt_text == val.tgt_text[:3]


def _copy_multi30k(data_dir, dest):
    dest.mkdir(parents=True, exist_ok=True)
    for f in MULTI30K.all_files():
        shutil.copyfile(data_dir / "multi30k" / f.filename, dest / f.filename)
    return dest


def test_checksum_failure_and_missing_files_are_user_errors(data_dir, tmp_path, tokenizers):
    folder = _copy_multi30k(data_dir, tmp_path / "data" / "multi30k")
    lines = gzip.decompress((folder / "val.en.gz").read_bytes()).decode().split("\n")
    lines[3] = lines[3].replace("a", "e")
    (folder / "val.en.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    with pytest.raises(UserError, match="fails its checksum"):
        load_translation("multi30k", "val", tmp_path / "data", tokenizers=tokenizers)
    (folder / "test_2016_flickr.de.gz").unlink()
    with pytest.raises(UserError, match="test files not found"):
        load_translation("multi30k", "test", tmp_path / "data", tokenizers=tokenizers)
    # the folder itself and extracted files are accepted
    (folder / "test_2016_flickr.de").write_bytes(
        gzip.decompress((data_dir / "multi30k/test_2016_flickr.de.gz").read_bytes())
    )
    assert len(load_translation("multi30k", "test", folder, tokenizers=tokenizers)) == 1000
    with pytest.raises(UserError, match="unknown split"):
        load_translation("multi30k", "dev2", data_dir, tokenizers=tokenizers)


def test_env_var_is_the_only_place_looked_at(data_dir, monkeypatch, tmp_path, tokenizers):
    monkeypatch.setenv("LRDEPLOY_DATA", str(data_dir))
    assert len(load_translation("multi30k", "val", tokenizers=tokenizers, limit=4)) == 4
    monkeypatch.setenv("LRDEPLOY_DATA", str(tmp_path))
    with pytest.raises(UserError, match="not found"):
        load_translation("multi30k", "val", tokenizers=tokenizers)


def test_download_from_file_mirror(data_dir, tmp_path, tokenizers):
    mirror = _copy_multi30k(data_dir, tmp_path / "mirror")
    dest = tmp_path / "cache"
    folder = download_translation(
        "multi30k", dest, mirrors=["file://nowhere.invalid/x/", mirror.as_uri() + "/"]
    )
    assert folder == dest / "multi30k"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.filename for f in MULTI30K.all_files())
    assert [p.name for p in dest.iterdir()] == ["multi30k"]  # no staging leftovers
    assert len(load_translation("multi30k", "test", dest, tokenizers=tokenizers)) == 1000
    assert download_translation("multi30k", dest, mirrors=[]) == folder  # complete: nothing fetched
    (mirror / "val.de.gz").write_bytes(gzip.compress(b"tampered\n"))
    with pytest.raises(UserError, match="could not download Multi30k val.de.gz"):
        download_translation("multi30k", tmp_path / "new" / "cache", mirrors=[mirror.as_uri()])
    assert not (tmp_path / "new").exists()


# --- model ----------------------------------------------------------------------------------------------


def test_registry_describes_two_inputs():
    spec = get_spec("transformer")
    assert [i.name for i in spec.input_specs] == ["src", "tgt_in"] and spec.multi_input
    assert all(i.dtype == "int64" for i in spec.inputs)
    lenet = get_spec("lenet5")
    assert not lenet.multi_input and lenet.input_specs[0].shape == (1, 28, 28)
    with pytest.raises(UserError, match="divisible"):
        create_model("transformer", src_vocab=10, tgt_vocab=10, d_model=30, nhead=4)
    with pytest.raises(UserError, match="activation"):
        create_model("transformer", src_vocab=10, tgt_vocab=10, activation="swish")


def test_shapes_names_and_masks_without_nan():
    model = _tiny()
    src, tgt = model.example_inputs(3, 11, 7)
    assert model(src, tgt).shape == (3, 7, 50)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert "encoder.layers.0.self_attn.q_proj" in names and "decoder.layers.1.cross_attn.v_proj" in names
    assert "decoder.layers.1.ff.ff2" in names and "generator" in names
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    assert "positions" not in model.state_dict()  # rebuilt from max_len, not stored
    assert torch.isfinite(
        model(torch.zeros(2, 5, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long))
    ).all()
    with pytest.raises(UserError, match="max_len"):
        model(torch.ones(1, model.max_len + 1, dtype=torch.long), tgt[:1])


def test_tied_embeddings_share_the_weight():
    model = _tiny(tgt_vocab=50, tie_embeddings=True)
    assert model.generator.weight is model.tgt_embed.weight
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in _tiny().parameters())


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    model = _tiny()
    src, tgt = model.example_inputs(2, 10, 8)
    tgt[:, 7] = 9  # row 1 is padded at 7; make both rows real there
    base = model(src, tgt)
    changed = tgt.clone()
    changed[:, 5] = 17
    out = model(src, changed)
    torch.testing.assert_close(out[:, :5], base[:, :5], rtol=0, atol=1e-6)
    assert (out[:, 5:] - base[:, 5:]).abs().max() > 1e-3


def test_padding_does_not_change_real_positions():
    model = _tiny()
    src, tgt = model.example_inputs(1, 9, 6)
    alone = model(src, tgt)
    padded_src = torch.cat([src, torch.zeros(1, 5, dtype=torch.long)], 1)
    padded_tgt = torch.cat([tgt, torch.zeros(1, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(model(padded_src, padded_tgt)[:, :6], alone, rtol=0, atol=1e-5)
    # and batched with a longer pair
    other_src, other_tgt = model.example_inputs(1, 14, 9, torch.Generator().manual_seed(3))
    batch = model(
        torch.cat([padded_src, other_src]),
        torch.cat([torch.cat([tgt, torch.zeros(1, 3, dtype=torch.long)], 1), other_tgt]),
    )
    torch.testing.assert_close(batch[:1, :6], alone, rtol=0, atol=1e-5)


def test_incremental_decoding_matches_full_decoding():
    model = _tiny()
    src, tgt = model.example_inputs(3, 10, 8)
    full = model(src, tgt)
    memory, src_mask = model.encode(src)
    states = model.start_decoding(memory)
    for pos in range(4):  # rows are unpadded up to position 6
        step = model.decode_step(tgt[:, pos : pos + 1], pos, states, src_mask)
        torch.testing.assert_close(step, full[:, pos], rtol=0, atol=1e-5)

    class Plain(nn.Module):  # no cache: greedy_decode falls back to re-running the whole prefix
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, s, t):
            return self.inner(s, t)

    assert greedy_decode(model, src, 12) == greedy_decode(Plain(model), src, 12)


def test_compress_factorises_projections_and_keeps_the_generator_dense():
    model = _tiny(d_model=32, dim_feedforward=128)
    src, tgt = model.example_inputs(2, 9, 7)
    report = compress(model, rank_ratio=0.5)
    by_name = {layer.name: layer for layer in report.layers}
    assert isinstance(model.generator, nn.Linear) and "classifier" in by_name["generator"].skipped
    ff = [n for n in by_name if n.endswith(("ff1", "ff2"))]
    assert len(ff) == 8 and all(isinstance(model.get_submodule(n), LowRankLinear) for n in ff)
    # square d×d projections break even at rank d/2 (r·2d = d²), so compress leaves them dense at 0.5
    square = [n for n in by_name if n.endswith(("q_proj", "k_proj", "v_proj", "out_proj"))]
    assert len(square) == 24 and all(by_name[n].skipped == NO_SAVING for n in square)
    model = _tiny(d_model=32, dim_feedforward=128)
    compress(model, rank_ratio=0.25)
    lowrank = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank == set(PROJECTIONS) and isinstance(model.generator, nn.Linear)
    assert model(src, tgt).shape == (2, 7, 50)


def test_onnx_export_of_compressed_model_matches_ort():
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from lrdeploy.exporters.fold import fold_model

    model = _tiny()
    compress(model, rank_ratio=0.25)
    folded = fold_model(model)
    example = folded.example_inputs(2, 12, 9)
    dims = {name: torch.export.Dim(name, min=1, max=folded.max_len) for name in ("src_len", "tgt_len")}
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            folded, example, None, dynamo=True, opset_version=20, input_names=list(folded.input_names),
            output_names=list(folded.output_names), verbose=False,
            dynamic_shapes=({0: batch, 1: dims["src_len"]}, {0: batch, 1: dims["tgt_len"]}),
        )  # fmt: skip
    proto = program.model_proto
    onnx.checker.check_model(proto, full_check=True)
    dims_of = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input
    }
    assert dims_of == {"src": ["batch", "src_len"], "tgt_in": ["batch", "tgt_len"]}
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(1)
    for b, s, t in ((1, 5, 17), (3, 23, 4)):
        src, tgt = folded.example_inputs(b, s, t, gen)
        with torch.no_grad():
            ref = model(src, tgt).numpy()
        out = session.run(None, {"src": src.numpy(), "tgt_in": tgt.numpy()})[0]
        assert out.shape == (b, t, 50)
        assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 1e-5


# --- BLEU -----------------------------------------------------------------------------------------------


def test_bleu_hand_computed_cases():
    hyp, ref = ["a", "b", "c", "d", "e", "f"], ["a", "b", "c", "d", "x", "f", "g"]
    # 1-grams 5/6, 2-grams 3/5 (ab bc cd), 3-grams 2/4 (abc bcd), 4-grams 1/3 (abcd); c = 6, r = 7
    stats = bleu_stats([hyp], [ref])
    assert stats["matches"] == [5, 3, 2, 1] and stats["totals"] == [6, 5, 4, 3]
    assert stats["bleu"] == pytest.approx(100 * math.exp(1 - 7 / 6) * (1 / 12) ** 0.25)
    # corpus level: counts are summed before dividing, not averaged per sentence
    perfect = ["the", "cat", "sat", "down"]
    expected = 100 * math.exp(1 - 11 / 10) * ((9 / 10) * (6 / 8) * (4 / 6) * (2 / 4)) ** 0.25
    assert corpus_bleu([perfect, hyp], [perfect, ref]) == pytest.approx(expected)
    assert corpus_bleu([perfect], [perfect]) == pytest.approx(100.0)
    # clipping: "the" counts at most twice; no bigram match → 0 without smoothing
    clipped = bleu_stats([["the"] * 7], [["the", "cat", "is", "on", "the", "mat"]])
    assert clipped["precisions"][0] == pytest.approx(2 / 7) and clipped["bleu"] == 0.0
    assert corpus_bleu([[]], [ref]) == 0.0
    # several references: e (and its n-grams) match the second; length: 5 and 7 tie at distance 1, take 5
    multi = bleu_stats([hyp], [[ref, ["a", "b", "c", "d", "e"]]])
    assert multi["matches"] == [6, 4, 3, 2] and multi["ref_len"] == 5 and multi["brevity_penalty"] == 1.0


# --- training -------------------------------------------------------------------------------------------


def test_config_and_schedule():
    cfg = TranslationConfig(lr=1e-3, warmup_steps=10)
    assert lr_at(cfg, 9, 100) == pytest.approx(1e-3)
    assert lr_at(cfg, 39, 100) == pytest.approx(5e-4)
    assert lr_at(TranslationConfig(schedule="cosine", warmup_steps=0), 100, 100) == pytest.approx(
        0
    )
    with pytest.raises(UserError, match="schedule"):
        TranslationConfig(schedule="linear")
    with pytest.raises(UserError, match="epochs"):
        TranslationConfig(epochs=0)


def test_one_epoch_lowers_validation_perplexity(data_dir, tokenizers):
    train = load_translation("multi30k", "train", data_dir, limit=1000, tokenizers=tokenizers)
    # max_len 40 caps greedy decoding (an undertrained model rarely emits <eos>); few val sentences are cut
    val = load_translation("multi30k", "val", data_dir, limit=100, tokenizers=tokenizers, max_len=40)
    torch.manual_seed(0)
    model = create_model(
        "transformer", src_vocab=len(tokenizers[0]), tgt_vocab=len(tokenizers[1]), d_model=64, nhead=4,
        num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=128,
    )  # fmt: skip
    before = evaluate_translation(model, val, bleu=False)
    calls = []

    class Spy:
        def on_train_start(self, model, optimizer):
            calls.append("start")

        def training_loss(self, model, xb, yb):
            assert isinstance(xb, tuple) and xb[1].shape == yb.shape
            calls.append("loss")

        def before_evaluate(self, model, train_inputs):
            calls.append("eval")

    config = TranslationConfig(epochs=1, batch_size=64, lr=2e-3, warmup_steps=4, progress=False)
    result = run_training(model, train, val, config, hooks=[Spy()], task="translation")
    after = result.metrics
    assert after["perplexity"] < before["perplexity"] / 4
    assert after["token_accuracy"] > before["token_accuracy"]
    assert 0.0 <= after["bleu"] <= 100.0 and result.history[0]["test_perplexity"] == after["perplexity"]
    assert calls[0] == "start" and calls.count("loss") == 16 and calls[-1] == "eval"
    out = translate(result.model, ["Ein Hund läuft."], *tokenizers, max_len=8)
    assert isinstance(out[0], str)
