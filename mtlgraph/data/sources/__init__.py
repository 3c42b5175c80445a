"""File sources: image folders, tables (CSV, JSON Lines, Parquet) and streamed shards.

Each source is usable from Python without a config (see ``docs/data-sources.md``):

- :func:`read_table` + :func:`split_table` + :func:`table_dataset`: a table's columns as an
  in-memory :class:`~mtlgraph.DictDataset` (numeric columns as fields or labels, ``text``
  columns tokenised by a :class:`WordTokenizer` or any ``str -> ids`` callable);
- :class:`ImageFolder` with an :class:`ImageDecoder`: image files named by a table column,
  decoded lazily with Pillow;
- :class:`ShardStream` with :func:`shard_files`: table files streamed one at a time (an
  :class:`~mtlgraph.data.streams.ExampleStream`, one unit per file).

Optional extras are imported only when used: Pillow (``mtlgraph[images]``) and pyarrow
(``mtlgraph[tables]``).
"""

from mtlgraph.data.sources.images import IMAGE_MODES, ImageDecoder, ImageFolder
from mtlgraph.data.sources.shards import ShardStream, shard_files
from mtlgraph.data.sources.table import (
    TABLE_FORMATS,
    read_table,
    split_table,
    table_dataset,
    table_format,
)
from mtlgraph.data.sources.tokenizer import WordTokenizer

__all__ = [
    "IMAGE_MODES",
    "TABLE_FORMATS",
    "ImageDecoder",
    "ImageFolder",
    "ShardStream",
    "WordTokenizer",
    "read_table",
    "shard_files",
    "split_table",
    "table_dataset",
    "table_format",
]
