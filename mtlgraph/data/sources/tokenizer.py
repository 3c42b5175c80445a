"""Text -> token ids: a word-level vocabulary built from a training split, or a subword
tokenizer (a model directory's own, or word-piece / BPE trained on the training split with
``tokenizers``); either is saved with the trained model and fingerprinted in its checkpoints
(ids, ties and truncation: docs/data-sources.md; subwords: docs/pretrained.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from mtlgraph._io import atomic_write_text, import_extra
from mtlgraph.exceptions import DataError
from mtlgraph.registry import Registry

PAD, UNK = "<pad>", "<unk>"
"""The two special tokens, ids 0 and 1."""

_WORD = re.compile(r"\w+|[^\w\s]")


class SavedTokenizer(ABC):
    """What a run saves of a tokenizer: :meth:`to_dict` (plain JSON-ready values), the file
    (:meth:`save`, read back by :func:`load_tokenizer`) and the :attr:`fingerprint` its
    checkpoints record; two are equal when their :meth:`to_dict` are.

    Example:
        >>> from mtlgraph.data.sources.tokenizer import SavedTokenizer, WordTokenizer
        >>> tok = WordTokenizer(["<pad>", "<unk>", "shoe"])
        >>> isinstance(tok, SavedTokenizer), len(tok.fingerprint)
        (True, 16)
    """

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The tokenizer as plain JSON-ready values (``from_dict`` reads it back)."""

    @property
    def fingerprint(self) -> str:
        """A short hash of the tokenizer and settings: equal fingerprints give equal ids."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the tokenizer as JSON, atomically."""
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=0))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class WordTokenizer(SavedTokenizer):
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

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WordTokenizer:
        """Read a vocabulary :meth:`save` wrote."""
        return cls.from_dict(_read_json(path), f"'{path}'")

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


SUBWORD_KINDS = ("wordpiece", "bpe")
"""Subword tokenizers :meth:`SubwordTokenizer.fit` trains."""

_SPECIALS = {
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
    "bpe": ("<pad>", "<unk>", "<s>", "</s>"),
}


class SubwordTokenizer(SavedTokenizer):
    """A ``tokenizers`` tokenizer: a model directory's own (:meth:`pretrained`), or word-piece
    or BPE trained on the training split (:meth:`fit`); texts become ids with the special
    tokens the model expects (``[CLS] ... [SEP]``), cut to ``max_length`` ids in all. Needs
    ``mtlgraph[hf]``.

    Args:
        tokenizer_json: The tokenizer as ``tokenizers`` serialises it (``Tokenizer.to_str()``).
        max_length: Most ids per text, special tokens included.
        kind: ``pretrained``, ``wordpiece`` or ``bpe`` (what it was made from; for messages).
        source: For a trained one, a hash of its training texts and settings: training is not
            reproducible bit for bit (``tokenizers`` breaks ties in any order), so a run
            rebuilding its tokenizer from the same texts reuses the saved one (see :meth:`fit`).

    Example:
        >>> from mtlgraph.data.sources.tokenizer import SubwordTokenizer
        >>> texts = ["great shoes", "great price", "bad shoes", "bad price"] * 5
        >>> tok = SubwordTokenizer.fit(texts, "wordpiece", vocab_size=40, max_length=4)
        >>> ids = tok.encode("great socks and shoes").tolist()
        >>> len(ids), ids[0] == tok.token_id("[CLS]"), ids[-1] == tok.token_id("[SEP]")
        (4, True, True)
    """

    def __init__(
        self,
        tokenizer_json: str,
        max_length: int = 128,
        kind: str = "pretrained",
        source: str | None = None,
    ) -> None:
        if max_length < 3:
            raise DataError(
                [f"max_length must be >= 3 (special tokens included), got {max_length}"]
            )
        tk = import_extra("a subword tokenizer", "hf", "tokenizers")[0]
        tok = tk.Tokenizer.from_str(tokenizer_json)
        tok.no_truncation()
        tok.no_padding()
        self.json: str = tok.to_str()  # without truncation or padding: the fingerprint's text
        tok.enable_truncation(max_length)
        self._tok = tok
        self.max_length = max_length
        self.kind = kind
        self.source = source  # a hash of the training texts and settings (trained kinds)

    @classmethod
    def pretrained(cls, path: str | os.PathLike[str], max_length: int = 128) -> SubwordTokenizer:
        """The tokenizer of a model directory (``AutoTokenizer``, a fast one).

        Raises:
            DataError: A directory without a tokenizer, or one ``tokenizers`` cannot run.
        """
        tf = import_extra("a model directory's tokenizer", "hf", "transformers")[0]
        if Path(path).is_file():
            raise DataError(
                [
                    f"'{path}' is a file, not a model directory: name the directory "
                    f"tokenizer.save_pretrained(directory) wrote (perhaps '{Path(path).parent}')"
                ]
            )
        try:
            auto = tf.AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError, TypeError) as e:
            raise DataError(
                [
                    f"'{path}' has no tokenizer AutoTokenizer can load ({type(e).__name__}: {e}); "
                    "save one beside the model with tokenizer.save_pretrained(directory)"
                ]
            ) from None
        backend = getattr(auto, "backend_tokenizer", None)
        if backend is None:
            raise DataError(
                [
                    f"the tokenizer of '{path}' ({type(auto).__name__}) is not a fast tokenizer; "
                    "save a tokenizer.json beside the model (a fast tokenizer's save_pretrained)"
                ]
            )
        return cls(backend.to_str(), max_length, "pretrained")

    @classmethod
    def fit(
        cls,
        texts: Iterable[str],
        kind: str = "wordpiece",
        vocab_size: int = 10000,
        min_count: int = 1,
        lowercase: bool = True,
        max_length: int = 128,
        reuse: Any = None,
    ) -> SubwordTokenizer:
        """Train a word-piece or BPE tokenizer on ``texts`` (the training split): id 0 pads,
        id 1 is the unknown token, then the start and end tokens.

        Args:
            texts: The training texts.
            kind: ``wordpiece`` (BERT-style, ``[CLS] ... [SEP]``) or ``bpe`` (``<s> ... </s>``).
            vocab_size: Most ids, special tokens included.
            min_count: Pieces seen fewer times are not merged into the vocabulary.
            lowercase: Lowercase texts first.
            max_length: Most ids per text, special tokens included.
            reuse: A tokenizer saved earlier: returned as it is when it was trained on the same
                texts with the same settings (its :attr:`source`), instead of training anew.
        """
        if kind not in SUBWORD_KINDS:
            raise DataError([f"kind must be one of {list(SUBWORD_KINDS)}, got {kind!r}"])
        texts = list(texts)
        settings = [kind, vocab_size, min_count, lowercase, max_length]
        source = hashlib.sha256(json.dumps([settings, texts]).encode()).hexdigest()[:16]
        if isinstance(reuse, SubwordTokenizer) and reuse.source == source:
            return reuse
        tk = import_extra("a subword tokenizer", "hf", "tokenizers")[0]
        specials = _SPECIALS[kind]
        if kind == "wordpiece":
            tok = tk.Tokenizer(tk.models.WordPiece(unk_token=specials[1]))
            tok.normalizer = tk.normalizers.BertNormalizer(lowercase=lowercase)
            tok.pre_tokenizer = tk.pre_tokenizers.BertPreTokenizer()
            trainer = tk.trainers.WordPieceTrainer(
                vocab_size=vocab_size, min_frequency=min_count, special_tokens=list(specials)
            )
        else:
            tok = tk.Tokenizer(tk.models.BPE(unk_token=specials[1]))
            if lowercase:
                tok.normalizer = tk.normalizers.Lowercase()
            tok.pre_tokenizer = tk.pre_tokenizers.Whitespace()
            trainer = tk.trainers.BpeTrainer(
                vocab_size=vocab_size, min_frequency=min_count, special_tokens=list(specials)
            )
        tok.train_from_iterator(texts, trainer)
        start, end = specials[2], specials[3]
        tok.post_processor = tk.processors.TemplateProcessing(
            single=f"{start} $A {end}",
            special_tokens=[(start, tok.token_to_id(start)), (end, tok.token_to_id(end))],
        )
        return cls(tok.to_str(), max_length, kind, source)

    def token_id(self, token: str) -> int | None:
        """The id of ``token`` (``None``: not in the vocabulary)."""
        found = self._tok.token_to_id(token)
        return None if found is None else int(found)

    def encode(self, text: str) -> torch.Tensor:
        """The ids of ``text``, special tokens included, at most ``max_length``."""
        return torch.tensor(self._tok.encode(text).ids, dtype=torch.long)

    __call__ = encode

    def __len__(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def to_dict(self) -> dict[str, Any]:
        """The tokenizer as plain JSON-ready values (:meth:`from_dict` reads it back)."""
        return {
            "type": "subword",
            "kind": self.kind,
            "max_length": self.max_length,
            "source": self.source,
            "tokenizer": json.loads(self.json),
        }

    @classmethod
    def from_dict(cls, data: Any, origin: str = "the tokenizer") -> SubwordTokenizer:
        """Read :meth:`to_dict`'s output back; a malformed mapping is a :class:`DataError`."""
        keys = {"type", "kind", "max_length", "source", "tokenizer"}
        if not isinstance(data, dict) or set(data) != keys or data["type"] != "subword":
            raise DataError(
                [f"{origin} is not a subword tokenizer (JSON object, keys {sorted(keys)})"]
            )
        source = None if data["source"] is None else str(data["source"])
        text = json.dumps(data["tokenizer"])
        return cls(text, int(data["max_length"]), str(data["kind"]), source)

    def __getstate__(self) -> dict[str, Any]:
        return {
            "json": self.json,
            "max_length": self.max_length,
            "kind": self.kind,
            "source": self.source,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["json"], state["max_length"], state["kind"], state["source"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (
            f"SubwordTokenizer(kind={self.kind!r}, size={len(self)}, max_length={self.max_length})"
        )


TextTokenizer = WordTokenizer | SubwordTokenizer
"""The tokenizers a run saves and fingerprints (the kinds of :class:`SavedTokenizer`)."""


def _read_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError([f"cannot read the vocabulary '{path}': {e}"]) from None


def load_tokenizer(path: str | os.PathLike[str]) -> TextTokenizer:
    """Read a tokenizer :meth:`WordTokenizer.save` or :meth:`SubwordTokenizer.save` wrote.

    Raises:
        DataError: An unreadable or malformed file, naming it.
    """
    data = _read_json(path)
    if isinstance(data, dict) and data.get("type") == "subword":
        return SubwordTokenizer.from_dict(data, f"'{path}'")
    return WordTokenizer.from_dict(data, f"'{path}'")


TOKENIZERS: Registry[Callable[..., Any]] = Registry("tokenizer", bind=True)
"""Your own ``str -> ids`` tokenizers by name (``TOKENIZERS.register(name, fn)``); a text column's
``tokenizer:`` takes a registered name, ``{name: ..., **kwargs}`` (bound to the function) or a
dotted import path. Without one, a column gets a :class:`WordTokenizer` built from the training
split."""
