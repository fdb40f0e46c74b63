"""Multi30k (Task 1, German–English) as padded id tensors for sequence-to-sequence training.

Files are found with the same rules as the image datasets (see :mod:`lrdeploy.data.datasets`):
``data_dir`` (``--data-dir``), else ``LRDEPLOY_DATA`` — when given, the only place looked at — otherwise the
user cache (where ``--download`` puts files). A data directory may hold ``multi30k/`` or be that folder; a
clone of the official repository (``data/task1/raw``) works too. Each file may be ``.gz`` or extracted, and
is verified against the sha256 of its decompressed text (the ``.gz`` digests in ``shared/data/README.md``
describe the same official files; the content digest also accepts a user's extracted copy).

The usual split is train / val / test_2016_flickr (29000 / 1014 / 1000 pairs); ``test`` names the last.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrdeploy.data.checksum import read_verified
from lrdeploy.data.datasets import FileSpec, default_cache_dir, download_wanted, where_not
from lrdeploy.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, WordTokenizer
from lrdeploy.errors import UserError

SPLITS = ("train", "val", "test")
_SPLIT_ALIASES = {
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test_2016_flickr": "test",
    "test2016": "test",
}


@dataclass(frozen=True)
class TranslationSpec:
    name: str
    title: str
    folder: str
    languages: tuple[str, ...]
    files: Mapping[str, Mapping[str, FileSpec]]  # split -> language -> file
    counts: Mapping[str, int]
    mirrors: tuple[str, ...]
    alt_folders: tuple[str, ...] = ()

    def all_files(self) -> list[FileSpec]:
        return [f for split in SPLITS for f in self.files[split].values()]


def _f(name: str, sha256: str, size: int) -> FileSpec:
    return FileSpec(name, sha256, size)


_SHA = {  # content sha256 of the decompressed text, keyed by file stem
    "train.de": "2c2b73fd2b548fbcde3a875e0a78d6ee94d498bfdee6bd3eae3945779e9ddf72",
    "train.en": "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
    "val.de": "660e09eb7e1da2f856ea13ee5ad3cf6d36b3d5b0b733c857e94c5747a3dfc660",
    "val.en": "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
    "test_2016_flickr.de": "4be6b5b3236b79c25475c6bb829800a7ce559e9ba7a1f6c2394fe4d40be46d16",
    "test_2016_flickr.en": "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
}
_SIZE = {  # bytes of decompressed text
    "train.de": 2110398,
    "train.en": 1801238,
    "val.de": 75981,
    "val.en": 63297,
    "test_2016_flickr.de": 70649,
    "test_2016_flickr.en": 62076,
}
_STEMS = {"train": "train", "val": "val", "test": "test_2016_flickr"}


# Content digests (sha256 and size of the decompressed UTF-8 text) of the official data/task1/raw files,
# computed from the copies in shared/data/multi30k, whose .gz sha256s are listed in its README.
MULTI30K = TranslationSpec(
    name="multi30k",
    title="Multi30k",
    folder="multi30k",
    languages=("de", "en"),
    files={
        split: {
            lang: _f(f"{stem}.{lang}.gz", _SHA[f"{stem}.{lang}"], _SIZE[f"{stem}.{lang}"])
            for lang in ("de", "en")
        }
        for split, stem in _STEMS.items()
    },
    counts={"train": 29000, "val": 1014, "test": 1000},
    mirrors=(
        "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/",
        "https://github.com/multi30k/dataset/raw/master/data/task1/raw/",
    ),
    alt_folders=("multi30k/data/task1/raw", "data/task1/raw"),
)

TRANSLATION_DATASETS: dict[str, TranslationSpec] = {MULTI30K.name: MULTI30K}


def get_translation_spec(name: str) -> TranslationSpec:
    key = name.strip().lower().replace("_", "-")
    if key not in TRANSLATION_DATASETS:
        known = ", ".join(TRANSLATION_DATASETS)
        raise UserError(f"unknown translation dataset '{name}'", hint=f"known translation datasets: {known}")
    return TRANSLATION_DATASETS[key]


def canonical_split(split: str) -> str:
    key = split.strip().lower()
    key = _SPLIT_ALIASES.get(key, key)
    if key not in SPLITS:
        raise UserError(f"unknown split '{split}'", hint=f"use one of: {', '.join(SPLITS)}")
    return key


# --- finding files ---


def _locate(folder: Path, f: FileSpec) -> Path | None:
    for candidate in (folder / f.filename, folder / f.raw_name):
        if candidate.is_file():
            return candidate
    return None


def _candidates(spec: TranslationSpec, root: Path) -> list[Path]:
    return [root / spec.folder, *(root / alt for alt in spec.alt_folders), root]


def _find(spec: TranslationSpec, root: Path, split: str) -> Path | None:
    for folder in _candidates(spec, root):
        if all(_locate(folder, f) for f in spec.files[split].values()):
            return folder
    return None


def _missing_error(spec: TranslationSpec, root: Path, split: str) -> UserError:
    names = ", ".join(f.filename for f in spec.files[split].values())
    if root.is_dir():
        looked = ", ".join(str(c) for c in _candidates(spec, root) if c.is_dir())
    else:
        looked = f"{root} ({where_not(root)})"
    return UserError(
        f"{spec.title} {split} files not found in {looked}: expected {names} (.gz or extracted)",
        hint=f"pass --data-dir DIR (a folder holding {spec.folder}/ or the files themselves) or set "
        "LRDEPLOY_DATA, or add --download where there is a network",
    )


def resolve_translation_dir(
    name: str = "multi30k",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> Path:
    """The folder holding ``split``'s files: ``data_dir``, else ``LRDEPLOY_DATA``, else the user cache."""
    spec = get_translation_spec(name)
    split = canonical_split(split)
    explicit = data_dir if data_dir is not None else os.environ.get("LRDEPLOY_DATA") or None
    root = Path(explicit).expanduser() if explicit is not None else default_cache_dir()
    found = _find(spec, root, split)
    if found is None and download_wanted(download):
        return download_translation(spec.name, root)
    if found is None:
        raise _missing_error(spec, root, split)
    return found


# --- download ---


def download_translation(
    name: str = "multi30k",
    dest: str | os.PathLike | None = None,
    *,
    mirrors: Sequence[str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Fetch every split's files into ``dest/<folder>`` (default: the user cache); return that folder.

    Same contract as :func:`lrdeploy.data.download.download_dataset`: files already valid are kept, each
    missing file is tried on each mirror (any urllib scheme; tests use ``file://``), verified in a staging
    folder and only then moved into place, so a failed download leaves nothing behind.
    """
    from lrdeploy.data.download import fetch_files

    spec = get_translation_spec(name)
    root = Path(dest).expanduser() if dest is not None else default_cache_dir()
    target = root / spec.folder

    def valid(f: FileSpec) -> bool:
        path = _locate(target, f) if target.is_dir() else None
        if path is None:
            return False
        try:
            read_verified(path, f.sha256, f.size)
        except UserError:
            return False
        return True

    needed = [f for f in spec.all_files() if not valid(f)]
    if not needed:
        return target
    bases = list(mirrors) if mirrors is not None else list(spec.mirrors)
    return fetch_files(needed, bases, root, target, title=spec.title, timeout=timeout)


# --- reading ---


def read_sentences(
    name: str = "multi30k",
    split: str = "train",
    lang: str = "de",
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
) -> list[str]:
    """The verified sentences of one side of a split, one per line, in file order."""
    spec = get_translation_spec(name)
    split = canonical_split(split)
    if lang not in spec.languages:
        raise UserError(
            f"{spec.title} has no language '{lang}'", hint=f"use one of: {', '.join(spec.languages)}"
        )
    folder = resolve_translation_dir(spec.name, split, data_dir, download)
    f = spec.files[split][lang]
    path = _locate(folder, f)
    if path is None:  # only after a download that did not deliver
        raise _missing_error(spec, folder, split)
    data = read_verified(path, f.sha256, f.size, what=f"{spec.title} {split}.{lang}")
    # split("\n"), not splitlines(): the latter also breaks on U+2028 and friends inside a sentence.
    lines = data.decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) != spec.counts[split]:  # cannot happen for a file that passed its checksum
        raise UserError(f"{path} has {len(lines)} lines, expected {spec.counts[split]}")
    return lines


def build_tokenizers(
    name: str = "multi30k",
    data_dir: str | os.PathLike | None = None,
    *,
    src_lang: str = "de",
    tgt_lang: str = "en",
    min_freq: int = 2,
    download: bool = False,
) -> tuple[WordTokenizer, WordTokenizer]:
    """Source and target tokenizers from the whole training split.

    Always the whole split, whatever ``limit`` a run uses, so that limited and full runs share ids and their
    bundles are comparable.
    """
    return tuple(  # type: ignore[return-value]
        WordTokenizer.build(read_sentences(name, "train", lang, data_dir, download), min_freq=min_freq)
        for lang in (src_lang, tgt_lang)
    )


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max((len(r) for r in rows), default=1)
    out = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out)


@dataclass
class TranslationDataset:
    """A whole split in memory as padded id tensors, with the tokenizers that give the ids their meaning.

    ``src`` is N×S: source ids then ``<eos>``. ``tgt`` is N×T: ``<bos>``, target ids, ``<eos>``. Both are
    padded with ``<pad>`` = 0 to the longest sequence of the split; training trims each batch further.
    ``tgt_in``/``tgt_out`` are the teacher-forcing input and the labels. The raw sentences are kept for
    BLEU references (unknown words count as misses, as they should).
    """

    src: torch.Tensor
    tgt: torch.Tensor
    src_tokenizer: WordTokenizer
    tgt_tokenizer: WordTokenizer
    name: str
    split: str
    src_lang: str
    tgt_lang: str
    src_text: list[str]
    tgt_text: list[str]
    max_len: int
    truncated: int = 0  # pairs with a side cut to max_len
    source: Path | None = None
    limit: int | None = field(default=None)

    def __len__(self) -> int:
        return int(self.src.shape[0])

    @property
    def tgt_in(self) -> torch.Tensor:
        return self.tgt[:, :-1]

    @property
    def tgt_out(self) -> torch.Tensor:
        return self.tgt[:, 1:]

    @property
    def tokenizers(self) -> tuple[WordTokenizer, WordTokenizer]:
        return self.src_tokenizer, self.tgt_tokenizer

    @property
    def preprocess(self) -> dict[str, Any]:
        """What a deployment must do to raw text (the vocabularies themselves: :meth:`tokenizers_dict`)."""
        return {
            "tokenizer": "word",
            "lowercase": self.src_tokenizer.lowercase,
            "src_lang": self.src_lang,
            "tgt_lang": self.tgt_lang,
            "max_len": self.max_len,
            "pad_id": PAD_ID,
            "bos_id": BOS_ID,
            "eos_id": EOS_ID,
            "src_vocab_size": self.src_tokenizer.vocab_size,
            "tgt_vocab_size": self.tgt_tokenizer.vocab_size,
        }

    def tokenizers_dict(self) -> dict[str, Any]:
        """Both vocabularies, JSON-ready, for a bundle manifest (see :func:`tokenizers_from_dict`)."""
        return {"src": self.src_tokenizer.to_dict(), "tgt": self.tgt_tokenizer.to_dict()}

    def references(self) -> list[list[str]]:
        """Tokenised target sentences (untruncated) — the BLEU references."""
        return [self.tgt_tokenizer.tokenize(t) for t in self.tgt_text]

    def head(self, n: int) -> TranslationDataset:
        """The first ``n`` pairs (views, no copy)."""
        if n < 1:
            raise UserError(f"a dataset limit must be at least 1, got {n}")
        return TranslationDataset(
            self.src[:n], self.tgt[:n], self.src_tokenizer, self.tgt_tokenizer, self.name, self.split,
            self.src_lang, self.tgt_lang, self.src_text[:n], self.tgt_text[:n], self.max_len,
            self.truncated, self.source, n if n < len(self) else self.limit,
        )  # fmt: skip

    def describe(self) -> dict[str, Any]:
        """What a bundle manifest or report records about the data used."""
        return {
            "name": self.name,
            "split": self.split,
            "size": len(self),
            "limit": self.limit,
            "task": "translation",
            "input_shape": [int(self.src.shape[1])],
            "preprocess": self.preprocess,
        }


def tokenizers_from_dict(data: Mapping[str, Any]) -> tuple[WordTokenizer, WordTokenizer]:
    """Inverse of :meth:`TranslationDataset.tokenizers_dict` (e.g. from a bundle manifest)."""
    if not isinstance(data, Mapping) or "src" not in data or "tgt" not in data:
        raise UserError("tokenizer entry must hold 'src' and 'tgt'", hint="the bundle manifest is damaged")
    return WordTokenizer.from_dict(data["src"]), WordTokenizer.from_dict(data["tgt"])


def load_translation(
    name: str = "multi30k",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    limit: int | None = None,
    tokenizers: tuple[WordTokenizer, WordTokenizer] | None = None,
    max_len: int = 64,
    *,
    src_lang: str = "de",
    tgt_lang: str = "en",
    min_freq: int = 2,
    download: bool = False,
) -> TranslationDataset:
    """Load a verified split as id tensors; ``limit`` keeps the first N pairs in file order.

    ``tokenizers`` (source, target) default to ones built from the whole training split; pass the training
    set's ``.tokenizers`` (or a bundle's) when loading val/test so ids agree. ``max_len`` bounds each
    sequence including ``<bos>``/``<eos>`` (no Multi30k sentence is cut at the default 64: the longest is 46).
    """
    spec = get_translation_spec(name)
    split = canonical_split(split)
    if src_lang == tgt_lang or {src_lang, tgt_lang} - set(spec.languages):
        raise UserError(
            f"cannot translate {src_lang}→{tgt_lang} with {spec.title}",
            hint=f"pick two different languages among {', '.join(spec.languages)}",
        )
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if max_len < 3:
        raise UserError(f"max_len must be at least 3 (<bos>, one token, <eos>), got {max_len}")
    if tokenizers is None:
        tokenizers = build_tokenizers(
            spec.name, data_dir, src_lang=src_lang, tgt_lang=tgt_lang, min_freq=min_freq, download=download
        )
    src_tok, tgt_tok = tokenizers
    src_text = read_sentences(spec.name, split, src_lang, data_dir, download)
    tgt_text = read_sentences(spec.name, split, tgt_lang, data_dir, download)
    total = len(src_text)
    n = total if limit is None else min(limit, total)
    src_text, tgt_text = src_text[:n], tgt_text[:n]
    src_rows, tgt_rows, truncated = [], [], 0
    for s, t in zip(src_text, tgt_text, strict=True):
        s_ids, t_ids = src_tok.encode(s), tgt_tok.encode(t)
        truncated += len(s_ids) > max_len - 1 or len(t_ids) > max_len - 2
        src_rows.append(s_ids[: max_len - 1] + [EOS_ID])
        tgt_rows.append([BOS_ID] + t_ids[: max_len - 2] + [EOS_ID])
    return TranslationDataset(
        src=_pad(src_rows),
        tgt=_pad(tgt_rows),
        src_tokenizer=src_tok,
        tgt_tokenizer=tgt_tok,
        name=spec.name,
        split=split,
        src_lang=src_lang,
        tgt_lang=tgt_lang,
        src_text=src_text,
        tgt_text=tgt_text,
        max_len=max_len,
        truncated=truncated,
        source=resolve_translation_dir(spec.name, split, data_dir, False),
        limit=n if n < total else None,
    )
