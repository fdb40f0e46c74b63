"""Word-level tokenizer built from the training text: no download, deterministic, stored in the bundle.

Why word-level and home-made: the reference translation setups (torchtext + spaCy, as in Maestro's
requirements) need models and data fetched at run time, and a BPE learner is more code than this project
needs for Multi30k's small, clean vocabulary. Lower-casing plus splitting punctuation off words, then keeping
every token seen at least ``min_freq`` times, gives about 7.9k German and 5.9k English tokens at
``min_freq=2`` — the sizes the spaCy-tokenised torchtext recipes report.

The vocabulary is ordered by descending count, ties broken by the token itself, so the same text always
gives the same ids. ``to_dict``/``from_dict`` round-trip through JSON, which is how a bundle records the
tokenizers its model was trained with (ids are meaningless without them).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from lrdeploy.errors import UserError

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
FORMAT = "lrdeploy-word-tokenizer"
FORMAT_VERSION = 1

# A word is a run of letters/digits (Unicode-aware, so "Männer" stays whole); every other non-space
# character is a token of its own ("bushes." -> "bushes", ".").
_TOKEN = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Lower-cased words and single punctuation marks; ids 0–3 are ``<pad> <unk> <bos> <eos>``."""

    def __init__(self, tokens: Sequence[str], *, lowercase: bool = True, min_freq: int = 1) -> None:
        tokens = list(tokens)
        if tokens[: len(SPECIALS)] != list(SPECIALS):
            raise UserError(f"tokenizer vocabulary must start with {', '.join(SPECIALS)}")
        if len(set(tokens)) != len(tokens):
            raise UserError("tokenizer vocabulary has duplicate tokens")
        self.tokens = tokens
        self.lowercase = bool(lowercase)
        self.min_freq = int(min_freq)
        self._ids = {t: i for i, t in enumerate(tokens)}

    # --- building ---

    @classmethod
    def build(
        cls,
        texts: Iterable[str],
        *,
        min_freq: int = 2,
        max_size: int | None = None,
        lowercase: bool = True,
    ) -> WordTokenizer:
        """Vocabulary of every token seen at least ``min_freq`` times (at most ``max_size`` tokens in all)."""
        if min_freq < 1:
            raise UserError(f"min_freq must be at least 1, got {min_freq}")
        if max_size is not None and max_size <= len(SPECIALS):
            raise UserError(f"max vocabulary size must exceed {len(SPECIALS)}, got {max_size}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(split_words(text, lowercase=lowercase))
        for special in SPECIALS:  # a literal "<unk>" in the text cannot become a second id
            counts.pop(special, None)
        kept = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[: max_size - len(SPECIALS)]
        return cls([*SPECIALS, *kept], lowercase=lowercase, min_freq=min_freq)

    # --- using ---

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def tokenize(self, text: str) -> list[str]:
        """The token strings of ``text`` (unknown words kept as they are; used for BLEU references)."""
        return split_words(text, lowercase=self.lowercase)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        ids = [self._ids.get(t, UNK_ID) for t in self.tokenize(text)]
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def id_to_token(self, i: int) -> str:
        return self.tokens[i] if 0 <= i < len(self.tokens) else UNK

    def decode_tokens(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to the first ``<eos>``, with ``<pad>``/``<bos>`` dropped (``<unk>`` is kept)."""
        out = []
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            out.append(self.id_to_token(i))
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """Space-joined tokens: readable, and exactly what BLEU is computed on (no detokenisation)."""
        return " ".join(self.decode_tokens(ids))

    # --- serialisation ---

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "lowercase": self.lowercase,
            "min_freq": self.min_freq,
            "tokens": list(self.tokens),
        }

    @classmethod
    def from_dict(cls, data: Any) -> WordTokenizer:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError("not an lrdeploy word tokenizer", hint="the bundle's tokenizer entry is damaged")
        if data.get("format_version") != FORMAT_VERSION:
            raise UserError(
                f"tokenizer format version {data.get('format_version')!r} is not supported",
                hint=f"this lrdeploy reads version {FORMAT_VERSION}; upgrade lrdeploy",
            )
        tokens = data.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise UserError("tokenizer tokens must be a list of strings")
        return cls(tokens, lowercase=bool(data.get("lowercase", True)), min_freq=int(data.get("min_freq", 1)))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and (self.tokens, self.lowercase) == (
            other.tokens,
            other.lowercase,
        )

    def __hash__(self) -> int:
        return hash((tuple(self.tokens), self.lowercase))

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={len(self)}, lowercase={self.lowercase}, min_freq={self.min_freq})"


def split_words(text: str, *, lowercase: bool = True) -> list[str]:
    """Lower-case (optionally) and split into words and single punctuation marks."""
    return _TOKEN.findall(text.lower() if lowercase else text)
