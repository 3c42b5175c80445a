"""File sources: THE readers of tables (CSV, JSON Lines, Parquet, ``.npz``, ``.npy``), image
folders and streamed shards, for training and prediction alike (``docs/data-sources.md``).

:func:`read_table` / :func:`iter_table` read a file whole or in chunks; :func:`split_table` and
:func:`table_dataset` make a :class:`~mtlgraph.DictDataset` of it; :class:`ImageFolder` decodes
images lazily; :class:`ShardStream` streams files one at a time. Pillow (``mtlgraph[images]``)
and pyarrow (``mtlgraph[tables]``) are imported only when used.
"""

from mtlgraph.data.sources.files import TABLE_FORMATS, Table, iter_table, read_table, table_format
from mtlgraph.data.sources.images import IMAGE_MODES, ImageDecoder, ImageFolder
from mtlgraph.data.sources.shards import ShardStream, shard_files
from mtlgraph.data.sources.table import split_table, table_dataset
from mtlgraph.data.sources.tokenizer import SubwordTokenizer, WordTokenizer, load_tokenizer

__all__ = [
    "IMAGE_MODES",
    "TABLE_FORMATS",
    "ImageDecoder",
    "ImageFolder",
    "ShardStream",
    "SubwordTokenizer",
    "Table",
    "WordTokenizer",
    "iter_table",
    "load_tokenizer",
    "read_table",
    "shard_files",
    "split_table",
    "table_dataset",
    "table_format",
]
