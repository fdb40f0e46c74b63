"""Pre-LN Transformer encoder–decoder for translation (Multi30k de→en), built from named nn.Linear layers.

Why not ``nn.Transformer``/``nn.MultiheadAttention``: their Q/K/V projections live in one fused
``in_proj_weight`` parameter, which compression cannot address by module type and name. Here every
projection is its own ``nn.Linear`` — ``self_attn.{q,k,v,out}_proj``, ``cross_attn.{q,k,v,out}_proj``,
``ff1``/``ff2`` — so ``compress``, Cuttlefish and Maestro factorise them like any other layer, and the
classifier ``generator`` (the last Linear) stays dense by the usual rule.

Choices:

- Pre-LN (LayerNorm before each sub-layer, one final LayerNorm per stack): trains stably with Adam without
  the long warm-up post-LN needs, which matters for short CPU runs.
- Fixed sinusoidal positions (a non-persistent buffer: not in the weights file, rebuilt from ``max_len``).
- Embeddings scaled by √d_model; source and target embeddings are separate (two vocabularies). The
  generator is untied by default; ``tie_embeddings=True`` shares it with the target embedding (the bundle
  stores the weight under both names; loading restores the tie because the model is rebuilt first).
- Masks use a large finite negative (the dtype's minimum) through ``masked_fill`` rather than ``-inf``: a
  fully masked row (e.g. an all-padding sample) then gives uniform attention instead of NaN.
- The causal mask is built inside ``forward`` from ``arange`` comparisons, so the exported graph has
  ``Range``/``Greater`` nodes sized by the actual target length: batch, source and target length are all
  dynamic in ONNX.

Two inputs, so the single-tensor conventions (``input_shape``) describe only the source; see
``ModelSpec.inputs`` and the model's ``input_names``/``dynamic_axes``/``example_inputs``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.models.registry import InputSpec, register_model

PAD_ID, BOS_ID, EOS_ID = 0, 2, 3  # must agree with lrdeploy.data.tokenizer
ACTIVATIONS = ("relu", "gelu")


def _neg(x: torch.Tensor) -> float:
    return torch.finfo(x.dtype).min


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention over ``nhead`` heads with separate, named projections."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nhead = nhead
        self.head_dim = d_model // nhead
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # unflatten instead of view(N, T, h, d): no symbolic batch/length needed, so export stays dynamic
        return x.unflatten(-1, (self.nhead, self.head_dim)).transpose(1, 2)

    def project_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values per head (N×h×S×d_head): computed once per sequence when decoding step by step."""
        return self._heads(self.k_proj(memory)), self._heads(self.v_proj(memory))

    def attend(
        self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """``mask`` is boolean, True where attention is forbidden, broadcastable to N×h×Tq×Tk (None: none)."""
        q = self._heads(self.q_proj(query))
        scores = torch.matmul(q * self.scale, k.transpose(-2, -1))
        if mask is not None:
            scores = scores.masked_fill(mask, _neg(scores))
        weights = self.dropout(torch.softmax(scores, dim=-1))
        return self.out_proj(torch.matmul(weights, v).transpose(1, 2).flatten(2))

    def forward(self, query: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        k, v = self.project_kv(memory)
        return self.attend(query, k, v, mask)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.ff1 = nn.Linear(d_model, dim_feedforward)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.ff2 = nn.Linear(dim_feedforward, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ff2(self.dropout(self.act(self.ff1(x))))


class EncoderLayer(nn.Module):
    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, src_mask))
        return x + self.dropout(self.ff(self.norm2(x)))


class DecoderLayer(nn.Module):
    def __init__(
        self, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = MultiHeadAttention(d_model, nhead, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.cross_attn = MultiHeadAttention(d_model, nhead, dropout)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, dim_feedforward, dropout, activation)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor, src_mask: torch.Tensor
    ) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.dropout(self.self_attn(h, h, tgt_mask))
        x = x + self.dropout(self.cross_attn(self.norm2(x), memory, src_mask))
        return x + self.dropout(self.ff(self.norm3(x)))

    def step(self, x: torch.Tensor, state: LayerState, src_mask: torch.Tensor) -> torch.Tensor:
        """One new position (N×1×d) given the cached keys/values of earlier ones; updates ``state``."""
        h = self.norm1(x)
        k, v = self.self_attn.project_kv(h)
        if state.self_k is not None:
            k, v = torch.cat((state.self_k, k), dim=2), torch.cat((state.self_v, v), dim=2)
        state.self_k, state.self_v = k, v
        x = x + self.self_attn.attend(h, k, v, None)  # earlier positions only: nothing to mask
        x = x + self.cross_attn.attend(self.norm2(x), state.mem_k, state.mem_v, src_mask)
        return x + self.ff(self.norm3(x))


@dataclass
class LayerState:
    """Per-decoder-layer cache for step-by-step (greedy) decoding."""

    mem_k: torch.Tensor
    mem_v: torch.Tensor
    self_k: torch.Tensor | None = None
    self_v: torch.Tensor | None = None


class Encoder(nn.Module):
    def __init__(
        self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, nhead, dim_feedforward, dropout, activation) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, src_mask)
        return self.norm(x)


class Decoder(nn.Module):
    def __init__(
        self, num_layers: int, d_model: int, nhead: int, dim_feedforward: int, dropout: float, activation: str
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(d_model, nhead, dim_feedforward, dropout, activation) for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor, src_mask: torch.Tensor
    ) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, memory, tgt_mask, src_mask)
        return self.norm(x)


def sinusoidal_positions(max_len: int, d_model: int) -> torch.Tensor:
    """The fixed encoding of Vaswani et al.: sin on even channels, cos on odd ones (max_len × d_model)."""
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    pe = torch.zeros(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)
    return pe.float()


class Seq2SeqTransformer(nn.Module):
    """``forward(src, tgt_in) -> logits`` (N×T×tgt_vocab); ids are int64 with ``<pad>`` = 0."""

    input_names = ("src", "tgt_in")
    output_names = ("logits",)

    def __init__(
        self,
        src_vocab: int,
        tgt_vocab: int,
        d_model: int = 256,
        nhead: int = 4,
        num_encoder_layers: int = 3,
        num_decoder_layers: int = 3,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        max_len: int = 128,
        activation: str = "relu",
        tie_embeddings: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.max_len = max_len
        self.src_vocab = src_vocab
        self.tgt_vocab = tgt_vocab
        self.embed_scale = math.sqrt(d_model)
        self.src_embed = nn.Embedding(src_vocab, d_model, padding_idx=PAD_ID)
        self.tgt_embed = nn.Embedding(tgt_vocab, d_model, padding_idx=PAD_ID)
        self.register_buffer("positions", sinusoidal_positions(max_len, d_model), persistent=False)
        self.embed_dropout = nn.Dropout(dropout)
        layer_args = (d_model, nhead, dim_feedforward, dropout, activation)
        self.encoder = Encoder(num_encoder_layers, *layer_args)
        self.decoder = Decoder(num_decoder_layers, *layer_args)
        # registered last: compress keeps the last Linear (the classifier) dense
        self.generator = nn.Linear(d_model, tgt_vocab)
        self._reset_parameters()
        if tie_embeddings:
            self.generator.weight = self.tgt_embed.weight

    def _reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            if name.endswith("embed.weight"):
                nn.init.normal_(p, std=self.d_model**-0.5)  # × √d in forward: unit scale, like positions
                with torch.no_grad():
                    p[PAD_ID].zero_()
            elif p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith(".bias") and "norm" not in name:
                nn.init.zeros_(p)

    def _embed(self, ids: torch.Tensor, table: nn.Embedding) -> torch.Tensor:
        x = table(ids) * self.embed_scale + self.positions[: ids.shape[1]]
        return self.embed_dropout(x)

    def _check_length(self, ids: torch.Tensor, what: str) -> None:
        if not torch.compiler.is_compiling() and ids.shape[1] > self.max_len:
            raise UserError(
                f"{what} length {ids.shape[1]} exceeds the model's max_len {self.max_len}",
                hint="load the data with a smaller max_len or build the model with a larger one",
            )

    def encode(self, src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (N×S×d) and the source padding mask (N×1×1×S, True at ``<pad>``)."""
        self._check_length(src, "source")
        src_mask = (src == PAD_ID).unsqueeze(1).unsqueeze(2)
        return self.encoder(self._embed(src, self.src_embed), src_mask), src_mask

    def decode(self, tgt_in: torch.Tensor, memory: torch.Tensor, src_mask: torch.Tensor) -> torch.Tensor:
        """Logits for every target position given the encoder output (teacher forcing or greedy steps)."""
        self._check_length(tgt_in, "target")
        steps = torch.arange(tgt_in.shape[1], device=tgt_in.device)
        future = steps.unsqueeze(0) > steps.unsqueeze(1)  # T×T, True above the diagonal
        tgt_mask = future | (tgt_in == PAD_ID).unsqueeze(1).unsqueeze(2)  # N×1×T×T
        x = self.decoder(self._embed(tgt_in, self.tgt_embed), memory, tgt_mask, src_mask)
        return self.generator(x)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        memory, src_mask = self.encode(src)
        return self.decode(tgt_in, memory, src_mask)

    # --- incremental decoding (eager only; the exported graph is the teacher-forced forward) ---

    def start_decoding(self, memory: torch.Tensor) -> list[LayerState]:
        """Per-layer caches holding the cross-attention keys/values of ``memory``."""
        return [LayerState(*layer.cross_attn.project_kv(memory)) for layer in self.decoder.layers]

    def decode_step(
        self, token: torch.Tensor, position: int, states: list[LayerState], src_mask: torch.Tensor
    ) -> torch.Tensor:
        """Logits (N×V) for the next token after ``token`` (N×1) at ``position``; O(T) per step, not O(T²).

        Gives the same logits as ``decode`` on the whole prefix (a test holds it to that), in eval mode.
        """
        if position >= self.max_len:
            raise UserError(f"cannot decode beyond the model's max_len {self.max_len}")
        x = self.tgt_embed(token) * self.embed_scale + self.positions[position : position + 1]
        for layer, state in zip(self.decoder.layers, states, strict=True):
            x = layer.step(x, state, src_mask)
        return self.generator(self.decoder.norm(x))[:, -1]

    # --- what exporters, benchmarks and FLOP counters need for a two-input model ---

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Named dynamic axes per input/output (legacy exporter format; dynamo: one ``Dim`` per name)."""
        return {
            "src": {0: "batch", 1: "src_len"},
            "tgt_in": {0: "batch", 1: "tgt_len"},
            "logits": {0: "batch", 1: "tgt_len"},
        }

    def example_inputs(
        self,
        batch_size: int = 2,
        src_len: int = 12,
        tgt_len: int = 9,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid random inputs: ordinary tokens, ``<eos>``/``<bos>`` in place, and padding in all but row 0.

        The padding exercises the masks; distinct default lengths keep torch.export from tying the source
        and target dimensions together (and neither is 1, which it would specialise).
        """
        device = self.generator.weight.device
        src = torch.randint(4, self.src_vocab, (batch_size, src_len), generator=generator)
        tgt = torch.randint(4, self.tgt_vocab, (batch_size, tgt_len), generator=generator)
        tgt[:, 0] = BOS_ID
        for i in range(batch_size):
            s = src_len - (i % 3) if src_len > 3 else src_len
            t = tgt_len - (i % 2) if tgt_len > 2 else tgt_len
            src[i, s - 1], src[i, s:] = EOS_ID, PAD_ID
            tgt[i, t:] = PAD_ID
        return src.to(device), tgt.to(device)


def _positive(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"transformer: {name} must be a positive integer, got {value!r}")
    return value


@register_model(
    "transformer",
    input_shape=(32,),
    num_classes=0,
    description="Pre-LN Transformer encoder-decoder for translation (two int64 inputs: src, tgt_in)",
    task="translation",
    inputs=(
        InputSpec("src", (32,), "int64", ("src_len",)),
        InputSpec("tgt_in", (32,), "int64", ("tgt_len",)),
    ),
    classifier=("generator",),  # the output projection; embeddings are not Linear layers, so no stem
)
def transformer(
    src_vocab: int = 8000,
    tgt_vocab: int = 6000,
    d_model: int = 256,
    nhead: int = 4,
    num_encoder_layers: int = 3,
    num_decoder_layers: int = 3,
    dim_feedforward: int = 1024,
    dropout: float = 0.1,
    max_len: int = 128,
    activation: str = "relu",
    tie_embeddings: bool = False,
) -> nn.Module:
    """Transformer for sequence-to-sequence tasks; vocab sizes come from the dataset's tokenizers.

    ``input_shape`` (32,) is the source length used for a nominal FLOP count; the real model takes
    ``(src, tgt_in)``, both N×length int64 with dynamic lengths up to ``max_len``.
    """
    for name, value in (
        ("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("d_model", d_model), ("nhead", nhead),
        ("num_encoder_layers", num_encoder_layers), ("num_decoder_layers", num_decoder_layers),
        ("dim_feedforward", dim_feedforward), ("max_len", max_len),
    ):  # fmt: skip
        _positive(name, value)
    if min(src_vocab, tgt_vocab) <= EOS_ID + 1:
        raise UserError(
            f"transformer: vocabularies need more than the 4 special tokens, got {src_vocab}/{tgt_vocab}"
        )
    if d_model % nhead:
        raise UserError(f"transformer: d_model ({d_model}) must be divisible by nhead ({nhead})")
    if d_model % 2:
        raise UserError(f"transformer: d_model must be even for sinusoidal positions, got {d_model}")
    if not 0.0 <= float(dropout) < 1.0:
        raise UserError(f"transformer: dropout must be in [0, 1), got {dropout!r}")
    if activation not in ACTIVATIONS:
        raise UserError(
            f"transformer: unknown activation {activation!r}", hint=f"use {' or '.join(ACTIVATIONS)}"
        )
    return Seq2SeqTransformer(
        src_vocab, tgt_vocab, d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward,
        float(dropout), max_len, activation, bool(tie_embeddings),
    )  # fmt: skip
