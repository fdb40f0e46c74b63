"""Hugging Face encoders as sentence-embedding models: ``--model hf:PATH`` (``pip install lrdeploy[hf]``).

PATH is a local directory in the Hugging Face layout (``config.json``, weights, ``tokenizer.json``), usually a
sentence-transformers folder such as all-MiniLM-L6-v2's; a user with a network may give a hub name instead.
The encoder (``transformers.AutoModel``) is wrapped in :class:`SentenceEncoder`, which adds the pooling that
sentence-transformers applies on top of it, read from the folder (``modules.json``,
``1_Pooling/config.json``; mean pooling, L2-normalised when the folder lists a ``Normalize`` module; a plain
Hugging Face folder gets mean pooling and normalisation). So ``(input_ids, attention_mask) ->
sentence_embedding`` is the whole deployed computation, and the exported graph needs no Python beside it, only
the tokenizer that ships with it.

A bundle records ``hf:PATH`` and the absolute path in its arguments; loading it builds the encoder from that
folder again (``from_pretrained`` skips the random initialisation ``from_config`` pays for, so it is the
cheaper way to get the architecture) and then overwrites every weight with the bundle's (``strict=True``).
Factorised layers inside the encoder are addressed by module name like any other (``lrdeploy.layers.
structure``). Building on the ``meta`` device (memory estimates, the bundle loader's dry run) reads only
``config.json``.

The word embeddings (52 % of MiniLM's parameters) are the model's *stem*: kept dense by compression.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lrdeploy.errors import UserError
from lrdeploy.models.registry import InputSpec, ModelSource, ModelSpec, register_model_source

PREFIX = "hf:"
INSTALL_HINT = "pip install lrdeploy[hf]"
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len")
NOMINAL_SEQ = 32  # sequence length of the nominal FLOP count
DEFAULT_MAX_LEN = 512  # position table of a BERT-family encoder, when the folder says nothing else
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


def _import_transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise UserError("--model hf:... needs the Hugging Face extra (transformers is not installed)",
                        INSTALL_HINT) from None
    return transformers


@contextlib.contextmanager
def _quiet_transformers(transformers: Any) -> Iterator[None]:
    """No "Loading weights" progress bar or unused-weight notices (the pooler is dropped on purpose)."""
    logging = transformers.utils.logging
    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def location(where: str) -> tuple[str, bool]:
    """(what to hand ``from_pretrained``, whether it is a local folder): an existing directory becomes its
    absolute path; anything else must look like a hub name (``org/name``), else a one-line UserError."""
    where = str(where).strip()
    if not where:
        raise UserError("--model hf: needs a path",
                        "e.g. --model hf:./all-MiniLM-L6-v2 (a Hugging Face folder)")
    path = Path(where).expanduser()
    if path.is_dir():
        return str(path.resolve()), True
    if path.exists():
        raise UserError(f"hf:{where} is a file, not a Hugging Face model folder",
                        "pass the folder that holds config.json and the weights")
    local_parent = path.parent != Path(".") and path.parent.is_dir()  # "models/minilm" where models/ exists
    if where.startswith((".", "/", "~")) or local_parent or not _HUB_NAME.fullmatch(where):
        raise UserError(f"hf:{where}: no such directory", "pass a folder in the Hugging Face layout "
                        "(config.json, model.safetensors, tokenizer.json)")
    return where, False  # a hub name: only a user with a network gets further


def _first_line(exc: BaseException, limit: int = 200) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


def read_file(where: str, local: bool, name: str) -> str | None:
    """Text of ``name`` inside the model folder (or hub repository), None when it has none."""
    if local:
        path = Path(where) / name
        return path.read_text(encoding="utf-8") if path.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(where, name)).read_text(encoding="utf-8")
    except Exception:  # noqa: BLE001 - absent file, no network: the defaults apply
        return None


def _read_json(where: str, local: bool, name: str) -> dict[str, Any] | None:
    text = read_file(where, local, name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"hf:{where}: {name} is not valid JSON ({exc})",
                        "re-download the model folder") from None
    return value if isinstance(value, (dict, list)) else None


def read_pooling(where: str, local: bool) -> tuple[str, bool, int | None]:
    """(pooling mode, L2-normalise?, max sequence length) as sentence-transformers would apply them."""
    modules = _read_json(where, local, "modules.json")
    pooling_dir, normalize = "1_Pooling", modules is None
    if isinstance(modules, list):
        for module in modules:
            kind = str((module or {}).get("type", "")) if isinstance(module, dict) else ""
            if kind.endswith(".Pooling"):
                pooling_dir = str(module.get("path") or pooling_dir)
            elif kind.endswith(".Normalize"):
                normalize = True
    config = _read_json(where, local, f"{pooling_dir}/config.json") or {}
    modes = [m for m in POOLING_MODES if config.get(f"pooling_mode_{m}_tokens" if m != "cls" else
                                                    "pooling_mode_cls_token")]
    if len(modes) > 1:
        raise UserError(f"hf:{where}: pooling combines {', '.join(modes)}; lrdeploy supports one mode",
                        f"use a model with one of: {', '.join(POOLING_MODES)}")
    st = _read_json(where, local, "sentence_bert_config.json") or {}
    max_len = st.get("max_seq_length")
    return (modes[0] if modes else "mean"), normalize, max_len if isinstance(max_len, int) else None


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder plus sentence-transformers' pooling: token ids and mask → one unit vector per
    sentence (see the module docstring). Follows :mod:`lrdeploy.models.inputs` (names, dynamic batch and
    sequence axes, valid example inputs)."""

    input_names = ("input_ids", "attention_mask")
    # not "embedding": the dynamo exporter names nn.Embedding's output that way (a clash fails the checker)
    output_names = ("sentence_embedding",)

    def __init__(self, model: nn.Module, pooling: str = "mean", normalize: bool = True,
                 max_len: int = DEFAULT_MAX_LEN, source: str = "") -> None:
        super().__init__()
        if pooling not in POOLING_MODES:
            raise UserError(f"unknown pooling {pooling!r}", f"use one of: {', '.join(POOLING_MODES)}")
        self.model = model
        self.pooling = pooling
        self.normalize = normalize
        self.max_len = int(max_len)
        self.vocab_size = int(model.config.vocab_size)
        self.source = source  # where the encoder came from (its tokenizer lives there)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.pooling == "max":
            pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            summed = (hidden * mask).sum(dim=1)
            count = mask.sum(dim=1).clamp(min=1e-9)
            pooled = summed / (count.sqrt() if self.pooling == "mean_sqrt_len" else count)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {"input_ids": {0: "batch", 1: "seq_len"}, "attention_mask": {0: "batch", 1: "seq_len"},
                "sentence_embedding": {0: "batch"}}

    def example_inputs(self, batch_size: int = 2, seq_len: int = 12,
                       generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random valid ids; every row but the first ends in padding (the mask must matter)."""
        device = next(self.parameters()).device
        ids = torch.randint(1, self.vocab_size, (batch_size, seq_len), generator=generator)
        mask = torch.ones((batch_size, seq_len), dtype=torch.int64)
        for i in range(1, batch_size):
            keep = max(1, seq_len - (i % 3))
            mask[i, keep:] = 0
            ids[i, keep:] = 0
        return ids.to(device), mask.to(device)

    def export_assets(self) -> dict[str, bytes]:
        """Files that ship beside the exported graph (suffix → content): the tokenizer, set to truncate at
        the model's length and to pad a batch to its longest sentence, so the artefact is usable alone."""
        tokenizer = load_tokenizer(self.source, self.max_len)
        tokenizer.enable_padding(pad_id=pad_id(tokenizer), pad_token=pad_token(tokenizer))
        return {".tokenizer.json": tokenizer.to_str(pretty=True).encode("utf-8")}


def build_encoder(path: str) -> SentenceEncoder:
    """The encoder at ``path`` (a folder, or a hub name) with its pooling; only the architecture on the
    ``meta`` device."""
    where, local = location(path)
    transformers = _import_transformers()
    kwargs: dict[str, Any] = {"local_files_only": True} if local else {}
    meta = torch.get_default_device().type == "meta"
    try:
        with _quiet_transformers(transformers):
            if meta:
                config = transformers.AutoConfig.from_pretrained(where, **kwargs)
                model = transformers.AutoModel.from_config(config)
            else:
                model = transformers.AutoModel.from_pretrained(where, **kwargs)
    except UserError:
        raise
    except Exception as exc:  # OSError (missing files), ValueError (unknown model type), network errors …
        raise UserError(f"hf:{path} cannot be loaded as a Hugging Face encoder ({type(exc).__name__}: "
                        f"{_first_line(exc)})", "pass a folder in the Hugging Face layout (config.json, "
                        "model.safetensors), or a hub name with a network") from None
    config = model.config
    if getattr(config, "is_encoder_decoder", False) or getattr(config, "is_decoder", False):
        raise UserError(f"hf:{path} is a {config.model_type} decoder model, not an encoder",
                        "use a BERT-family encoder (e.g. a sentence-transformers model)")
    if getattr(model, "pooler", None) is not None:
        # BERT's [CLS] pooler is unused by sentence embeddings: it is neither compressed nor exported
        model.pooler = None
    pooling, normalize, st_max = read_pooling(where, local)
    positions = int(getattr(config, "max_position_embeddings", DEFAULT_MAX_LEN) or DEFAULT_MAX_LEN)
    max_len = min(st_max or positions, positions, DEFAULT_MAX_LEN)
    encoder = SentenceEncoder(model, pooling, normalize, max_len, source=where)
    return encoder.train(False)


def load_tokenizer(where: str, max_len: int) -> Any:
    """The fast tokenizer of the model (``tokenizers.Tokenizer``), truncating at ``max_len``, unpadded."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UserError("the embedding task needs the Hugging Face tokenizers package",
                        INSTALL_HINT) from None
    place, local = location(where)
    text = read_file(place, local, "tokenizer.json")
    if text is not None:
        tokenizer = Tokenizer.from_str(text)
    else:  # no tokenizer.json (an older folder): transformers converts the slow tokenizer's files
        transformers = _import_transformers()
        try:
            with _quiet_transformers(transformers):
                tokenizer = transformers.AutoTokenizer.from_pretrained(
                    place, use_fast=True, **({"local_files_only": True} if local else {})).backend_tokenizer
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"hf:{where} has no usable tokenizer ({type(exc).__name__}: {_first_line(exc)})",
                            "the folder needs tokenizer.json (or the files of a fast tokenizer)") from None
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=int(max_len))
    return tokenizer


def pad_token(tokenizer: Any) -> str:
    padding = tokenizer.padding
    if padding and padding.get("pad_token"):
        return str(padding["pad_token"])
    for candidate in ("[PAD]", "<pad>"):
        if tokenizer.token_to_id(candidate) is not None:
            return candidate
    return "[PAD]"


def pad_id(tokenizer: Any) -> int:
    token = tokenizer.token_to_id(pad_token(tokenizer))
    return int(token) if token is not None else 0


def claims(name: str) -> bool:
    return str(name).strip().lower().startswith(PREFIX)


def spec(name: str) -> ModelSpec:
    """The spec of ``hf:PATH``; the folder is only checked to exist here (the builder reads it)."""
    name = str(name).strip()
    where = name[len(PREFIX):].strip()
    try:
        default = location(where)[0]
    except UserError:  # e.g. a bundle's relative hf:./x read from another folder: its args hold the path
        default = where
    seq = (NOMINAL_SEQ,)

    def builder(path: str = default) -> nn.Module:
        return build_encoder(path)

    return ModelSpec(
        name=name,
        builder=builder,
        input_shape=seq,
        num_classes=0,
        description=f"Hugging Face encoder at {default} → mean-pooled sentence embeddings",
        default_args={"path": default},
        inputs=(InputSpec("input_ids", seq, "int64", ("seq_len",)),
                InputSpec("attention_mask", seq, "int64", ("seq_len",))),
        task="embedding",
        stem=("model.embeddings", "model.embeddings.*"),  # word/position embeddings: kept dense
        classifier=(),
        source="hf",
        trusted=True,  # transformers with trust_remote_code off: reading a folder runs no code of its own
    )


SOURCE = register_model_source(ModelSource(
    kind="hf", claims=claims, spec=spec,
    describe="hf:PATH for a Hugging Face BERT-family encoder (pip install lrdeploy[hf])",
))
