"""The ``data`` section of an experiment config: datasets, each declared by one ``source:``
(``docs/data-sources.md``); :mod:`mtlgraph.experiment.sources` loads them.
"""

from __future__ import annotations

import glob
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mtlgraph.data.sources.files import SUFFIXES
from mtlgraph.data.sources.tokenizer import TOKENIZERS


@dataclass
class TextConfig:
    """How a text column becomes token ids."""

    vocab_size: int = 10000  # most ids, <pad> (0) and <unk> (1) included
    min_count: int = 1  # words seen fewer times in the training split are <unk>
    lowercase: bool = True  # lowercase texts before counting and encoding
    max_length: int = 128  # most ids per text; longer texts are cut
    # a `str -> ids` callable: a name in TOKENIZERS, {name: ..., **kwargs} or a dotted import path;
    # null = a vocabulary built from the training split
    tokenizer: str | dict[str, Any] | None = None
    # the vocabulary built from the training split: words, or subwords trained with `tokenizers`
    # (wordpiece: [CLS] ... [SEP]; bpe: <s> ... </s>; mtlgraph[hf])
    kind: Literal["word", "wordpiece", "bpe"] = "word"
    # a model directory (relative to the config file) or hub id: its own tokenizer
    # (AutoTokenizer; max_length applies, vocab_size/min_count/lowercase/kind are the model's)
    pretrained: str | None = None

    def validate(self) -> list[str]:
        problems = []
        if self.vocab_size < 3:
            problems.append(f"vocab_size: must be >= 3 (2 special tokens), got {self.vocab_size}")
        if self.min_count < 1:
            problems.append(f"min_count: must be >= 1, got {self.min_count}")
        if self.max_length < 1:
            problems.append(f"max_length: must be >= 1, got {self.max_length}")
        if self.tokenizer is not None:
            problems += TOKENIZERS.problems(self.tokenizer, "tokenizer")
        if self.pretrained is not None or self.kind != "word":
            problems += self._subword_problems()
        return problems

    def _subword_problems(self) -> list[str]:
        problems = []
        if self.max_length < 3:
            problems.append(
                f"max_length: must be >= 3 (special tokens included), got {self.max_length}"
            )
        if self.tokenizer is not None:
            problems.append("tokenizer: give 'tokenizer' or 'pretrained'/'kind', not both")
        if self.pretrained is None:
            return problems
        defaults = TextConfig()
        problems += [
            f"{key}: the pretrained tokenizer's own applies; remove '{key}'"
            for key in ("vocab_size", "min_count", "lowercase", "kind")
            if getattr(self, key) != getattr(defaults, key)
        ]
        return problems


@dataclass
class NormalizeConfig:
    """Per-channel normalisation of pixels scaled to [0, 1]: (x - mean) / std."""

    mean: list[float]  # one value per channel
    std: list[float]  # one value per channel, > 0


@dataclass
class ImagesConfig:
    """Where the image files are and how they are decoded."""

    folder: str  # directory of the image files (relative to the config file)
    column: str = "file"  # table column naming each row's file (relative to `folder`)
    mode: Literal["L", "RGB", "RGBA"] = "RGB"  # Pillow mode: 1, 3 or 4 channels
    resize: list[int] | None = None  # [height, width] in pixels; null = keep the file's size
    normalize: NormalizeConfig | None = None  # per-channel mean/std; null = pixels in [0, 1]
    # a model directory (relative to the config file): its preprocessor_config.json gives
    # `normalize` (image_mean, image_std) and `resize` (size) where they are not declared
    processor: str | None = None

    def validate(self) -> list[str]:
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            return [f"resize: [height, width] of positive integers, got {self.resize}"]
        return []


@dataclass
class SourceConfig:
    """Where a dataset's rows come from: files (table, npy, images, shards) or a generator."""

    type: Literal["table", "npy", "images", "shards", "generator"]  # what the rows are
    path: str | list[str] | dict[str, str | list[str]] | None = None  # file | glob | {split: ..}
    format: Literal["csv", "jsonl", "parquet", "npz", "npy"] | None = None  # null = suffix
    name: str | None = None  # type generator: a name of mtlgraph.data.synthetic.GENERATORS
    args: dict[str, Any] = field(default_factory=dict)  # type generator: its keyword arguments
    images: ImagesConfig | None = None  # type images: the folder and the decoding
    text: dict[str, TextConfig] = field(default_factory=dict)  # text column -> tokenizer
    split_column: str | None = None  # column naming each row's split (a single file)
    fractions: dict[str, float] | None = None  # {split: fraction} cut in row order (one file)

    def validate(self) -> list[str]:
        problems = []
        generator = self.type == "generator"
        if generator != (self.name is not None) or (self.args and not generator):
            problems.append("name: 'name' and 'args' are for type 'generator' (and needed by it)")
        if generator == (self.path is not None):
            problems.append("path: needed by every type but 'generator' (and only by them)")
        if (self.type == "images") != (self.images is not None):
            problems.append("images: needed by type 'images' (and only by it)")
        single = isinstance(self.path, str) and not glob.has_magic(self.path)
        files_type = self.type not in ("shards", "generator")
        if files_type and not single and not isinstance(self.path, dict):
            problems.append(
                "path: a table, npy or image source reads one file, or {split: file}; "
                "use type 'shards' for lists and globs"
            )
        for key in ("split_column", "fractions"):
            if getattr(self, key) is not None and not (files_type and single):
                problems.append(f"{key}: only for a single file ('path: file.csv')")
        files = self.path.values() if isinstance(self.path, dict) else [self.path]
        listed = [p for f in files for p in ([f] if isinstance(f, str) else f or [])]
        if self.format is None and self.type in ("table", "images", "shards"):
            problems += [
                f"path: cannot tell the format of '{p}' from its suffix; use one of "
                f"{', '.join('.' + s for s in SUFFIXES)}, or set 'format'"
                for p in listed
                if Path(p).suffix.lstrip(".").lower() not in SUFFIXES
            ]
        if self.split_column is not None and self.fractions is not None:
            problems.append("fractions: give 'split_column' or 'fractions', not both")
        bad = [f"{k}={v}" for k, v in (self.fractions or {}).items() if not 0 < v <= 1]
        if bad or sum((self.fractions or {}).values()) > 1 + 1e-9:
            problems.append("fractions: each in (0, 1], summing to at most 1")
        return problems

    def file_format(self) -> str | None:
        """The declared file format (``npy`` for type ``npy``)."""
        return "npy" if self.type == "npy" else self.format


@dataclass
class DatasetConfig:
    """One dataset: its source, and which columns (or arrays) are input fields and labels."""

    source: SourceConfig  # where the rows come from (docs/data-sources.md)
    fields: dict[str, str | list[str]]  # X field -> column(s) or array
    labels: dict[str, str | list[str]]  # task name -> the column or array holding its labels
    splits: list[str] | None = None  # splits to load; null = all
    batch_size: int | None = None  # null = data.batch_size
    shuffle: bool | None = None  # reshuffle its training split each epoch; null = data.shuffle
    shuffle_block: int = 1  # rows per block of a block shuffle of its training split; 1 = exact
    num_workers: int | None = None  # DataLoader worker processes; null = data.num_workers

    def validate(self) -> list[str]:
        problems = []
        if not self.fields:
            problems.append("fields: empty; map at least one input field to an array or column")
        if not self.labels:
            problems.append("labels: empty; map at least one task to its label array or column")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.num_workers is not None and self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.shuffle_block < 1:
            problems.append(
                f"shuffle_block: must be >= 1 (rows per block), got {self.shuffle_block}"
            )
        return problems


@dataclass
class DataConfig:
    """The datasets and loader defaults."""

    datasets: dict[str, DatasetConfig]  # dataset name (the 2nd part of score keys) -> dataset
    batch_size: int = 32  # examples per batch (a dataset may override)
    shuffle: bool = False  # reshuffle training loaders every epoch (a dataset may override)
    seed: int = 0  # shuffling seed; dataset `name` uses seed + crc32(name)
    num_workers: int = 0  # DataLoader worker processes per loader (a dataset may override)
    persistent_workers: bool = False  # keep workers alive between passes (num_workers > 0)
    pin_memory: bool = False  # page-locked batches for faster copies to CUDA
    prefetch_factor: int | None = None  # batches each worker loads ahead; null = torch's 2

    def validate(self) -> list[str]:
        problems = []
        if self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1, got {self.batch_size}")
        if not self.datasets:
            problems.append("datasets: empty; declare at least one dataset")
        if self.num_workers < 0:
            problems.append(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.prefetch_factor is not None and self.prefetch_factor < 1:
            problems.append(f"prefetch_factor: must be >= 1 or null, got {self.prefetch_factor}")
        workers = [self.num_workers] + [d.num_workers or 0 for d in self.datasets.values()]
        if (self.prefetch_factor is not None or self.persistent_workers) and not any(workers):
            problems.append(
                "prefetch_factor and persistent_workers need worker processes; set num_workers"
            )
        return problems


_OLD_KEYS = ("generator", "args", "path", "format", "split_field", "fractions")
_OLD_ONLY = ("generator", "path", "format", "split_field")  # 'args' or 'fractions' alone: unknown


def old_spelling_problems(data: Any) -> list[str]:
    """Problems for datasets written in the old spelling (``generator:``, ``path:``, ...
    beside ``fields``), each showing the ``source:`` to write instead; the old keys are removed
    from ``data`` (the parsed ``data`` section) so that they are reported once."""
    datasets = data.get("datasets") if isinstance(data, Mapping) else None
    if not isinstance(datasets, Mapping):
        return []
    problems = []
    for name, ds in datasets.items():
        if not isinstance(ds, dict) or not any(k in ds for k in _OLD_ONLY):
            continue
        old = {k: ds.pop(k) for k in _OLD_KEYS if k in ds}
        source: dict[str, Any] = {}
        if "generator" in old:
            source = {"type": "generator", "name": old["generator"]}
            if old.get("args"):
                source["args"] = old["args"]
        else:
            fmt = old.get("format")
            source = {"type": "npy" if fmt == "npy" else "table", "path": old.get("path")}
            if fmt not in (None, "npy"):
                source["format"] = fmt
            if old.get("split_field") is not None:
                source["split_column"] = old["split_field"]
            if old.get("fractions") is not None:
                source["fractions"] = old["fractions"]
        ds.setdefault("source", source)  # checked as written: one problem per dataset
        written = yaml.safe_dump(source, default_flow_style=True, sort_keys=False).strip()
        keys = ", ".join(f"'{k}'" for k in old)
        problems.append(
            f"data.datasets.{name}: {keys}: a dataset is declared by one 'source:'; write "
            f"source: {written}"
        )
    return problems


__all__ = [
    "DataConfig",
    "DatasetConfig",
    "ImagesConfig",
    "NormalizeConfig",
    "SourceConfig",
    "TextConfig",
    "old_spelling_problems",
]
