"""A word-level tokenizer whose vocabulary is built from a training split, saved with the
trained model (ids, ties and truncation: docs/data-sources.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mtlgraph._io import atomic_write_text
from mtlgraph.exceptions import DataError
from mtlgraph.registry import Registry

PAD, UNK = "<pad>", "<unk>"
"""The two special tokens, ids 0 and 1."""

_WORD = re.compile(r"\w+|[^\w\s]")


class WordTokenizer:
    """Words -> ids with a fixed vocabulary (``0`` = padding, ``1`` = unknown word).

    Build one from training texts with :meth:`fit`; :meth:`encode` (or calling it) turns a text
    into a 1-D ``int64`` tensor of at most ``max_length`` ids.

    Args:
        tokens: The vocabulary, ``tokens[i]`` has id ``i``; it starts with ``<pad>``, ``<unk>``.
        lowercase: Lowercase texts before splitting them.
        max_length: Most ids per text (the rest is cut).

    Raises:
        DataError: A vocabulary that does not start with the special tokens, or repeats a word.

    Example:
        >>> from mtlgraph.data.sources import WordTokenizer
        >>> tok = WordTokenizer.fit(["Great shoes!", "great price", "bad shoes"], vocab_size=5)
        >>> tok.tokens
        ['<pad>', '<unk>', 'great', 'shoes', '!']
        >>> tok.encode("Great socks").tolist()
        [2, 1]
    """

    def __init__(self, tokens: list[str], lowercase: bool = True, max_length: int = 128) -> None:
        problems = []
        if tokens[:2] != [PAD, UNK]:
            problems.append(f"a vocabulary starts with {PAD!r}, {UNK!r}; got {tokens[:2]}")
        if len(set(tokens)) != len(tokens):
            repeated = sorted(t for t, n in Counter(tokens).items() if n > 1)
            problems.append(f"the vocabulary repeats {repeated[:5]}")
        if max_length < 1:
            problems.append(f"max_length must be >= 1, got {max_length}")
        if problems:
            raise DataError(problems)
        self.tokens: list[str] = list(tokens)
        self.lowercase = lowercase
        self.max_length = max_length
        self._ids = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def fit(
        cls,
        texts: Iterable[str],
        vocab_size: int = 10000,
        min_count: int = 1,
        lowercase: bool = True,
        max_length: int = 128,
    ) -> WordTokenizer:
        """Build the vocabulary from ``texts`` (the training split).

        Args:
            texts: The training texts.
            vocab_size: Most ids, the two special tokens included.
            min_count: Words seen fewer times are unknown (id 1).
            lowercase: Lowercase before counting and encoding.
            max_length: Most ids per encoded text.
        """
        if vocab_size < 3 or min_count < 1:
            raise DataError(
                [f"vocab_size must be >= 3 and min_count >= 1, got {vocab_size}, {min_count}"]
            )
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(_words(text, lowercase))
        kept = sorted(
            (w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w)
        )
        return cls([PAD, UNK, *kept[: vocab_size - 2]], lowercase, max_length)

    def words(self, text: str) -> list[str]:
        """The words of ``text`` (lowercased when the tokenizer lowercases), not cut."""
        return _words(text, self.lowercase)

    def encode(self, text: str) -> torch.Tensor:
        """The ids of ``text``'s first ``max_length`` words (unknown words are 1)."""
        ids = [self._ids.get(w, 1) for w in self.words(text)[: self.max_length]]
        return torch.tensor(ids, dtype=torch.long)

    __call__ = encode

    def __len__(self) -> int:
        return len(self.tokens)

    def to_dict(self) -> dict[str, Any]:
        """The tokenizer as plain JSON-ready values (:meth:`from_dict` reads it back)."""
        return {
            "type": "word",
            "lowercase": self.lowercase,
            "max_length": self.max_length,
            "tokens": self.tokens,
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "the vocabulary") -> WordTokenizer:
        """Read :meth:`to_dict`'s output back; a malformed mapping is a :class:`DataError`."""
        keys = {"type", "lowercase", "max_length", "tokens"}
        if not isinstance(data, dict) or set(data) != keys or data["type"] != "word":
            raise DataError(
                [f"{origin} is not a word-level vocabulary (JSON object, keys {sorted(keys)})"]
            )
        return cls(list(data["tokens"]), bool(data["lowercase"]), int(data["max_length"]))

    @property
    def fingerprint(self) -> str:
        """A short hash of the vocabulary and settings: equal fingerprints give equal ids."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the vocabulary as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=0))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WordTokenizer:
        """Read a vocabulary :meth:`save` wrote."""
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise DataError([f"cannot read the vocabulary '{path}': {e}"]) from None
        return cls.from_dict(data, f"'{path}'")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WordTokenizer) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return (
            f"WordTokenizer(size={len(self)}, lowercase={self.lowercase}, "
            f"max_length={self.max_length})"
        )


def verify_fingerprint(tokenizer: Any, expected: str, path: str | os.PathLike[str]) -> None:
    """Refuse a saved tokenizer whose ``fingerprint`` is not the one a checkpoint was trained
    with (``expected``).

    Raises:
        DataError: The file was edited or replaced since training, naming it, both
            fingerprints and the fix.
    """
    if tokenizer.fingerprint != expected:
        raise DataError(
            [
                f"the vocabulary '{path}' has fingerprint {tokenizer.fingerprint}, but the "
                f"checkpoint was trained with {expected}: the file was edited or replaced "
                "since training, and every id (so every prediction) would change. Restore the "
                "file the run wrote, or pass --checkpoint the run directory that trained this "
                "model"
            ]
        )


def _words(text: str, lowercase: bool) -> list[str]:
    return _WORD.findall(text.lower() if lowercase else text)


TOKENIZERS: Registry[Callable[..., Any]] = Registry("tokenizer", bind=True)
"""Your own ``str -> ids`` tokenizers by name (``TOKENIZERS.register(name, fn)``); a text column's
``tokenizer:`` takes a registered name, ``{name: ..., **kwargs}`` (bound to the function) or a
dotted import path. Without one, a column gets a :class:`WordTokenizer` built from the training
split."""
