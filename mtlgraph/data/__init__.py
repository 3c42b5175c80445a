"""Data: datasets (in memory, memory-mapped, any torch dataset, streams), loaders, collation and
padding, batch schedulers (including sampling), synthetic data.

Knows nothing of models or training: a batch is an ``(X_dict, Y_dict)`` pair.
"""

from mtlgraph.data.collate import Batch, collate_dicts, pad_sequences
from mtlgraph.data.datasets import DictDataLoader, DictDataset
from mtlgraph.data.named import NamedDataset, NamedStream
from mtlgraph.data.schedulers import SCHEDULERS, BatchScheduler
from mtlgraph.data.streams import ExampleStream

__all__ = [
    "SCHEDULERS",
    "Batch",
    "BatchScheduler",
    "DictDataLoader",
    "DictDataset",
    "ExampleStream",
    "NamedDataset",
    "NamedStream",
    "collate_dicts",
    "pad_sequences",
    "synthetic",
]
