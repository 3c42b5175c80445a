"""Data: datasets, loaders, collation and padding, batch schedulers, synthetic data.

Knows nothing of models or training: a batch is an ``(X_dict, Y_dict)`` pair.
"""

from mtlgraph.data.datasets import Batch, DictDataLoader, DictDataset, collate_dicts, pad_sequences
from mtlgraph.data.named import NamedDataset, NamedStream
from mtlgraph.data.schedulers import BatchScheduler, register_scheduler
from mtlgraph.data.streams import ExampleStream

__all__ = [
    "Batch",
    "BatchScheduler",
    "DictDataLoader",
    "DictDataset",
    "ExampleStream",
    "NamedDataset",
    "NamedStream",
    "collate_dicts",
    "pad_sequences",
    "register_scheduler",
]
