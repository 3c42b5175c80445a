"""File sources: image folders, tables (CSV, JSON Lines, Parquet) and streamed shards.

Each source is usable from Python without a config (see ``docs/data-sources.md``):

- :func:`read_table` (whole) or :func:`iter_table` (chunks of rows): THE reader of CSV, JSON
  Lines, Parquet, ``.npz`` and ``.npy`` files, one parser each, the same rules for training and
  prediction (a bad row names the file, the line and the column);
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

from mtlgraph.data.sources.files import TABLE_FORMATS, Table, iter_table, read_table, table_format
from mtlgraph.data.sources.images import IMAGE_MODES, ImageDecoder, ImageFolder
from mtlgraph.data.sources.shards import ShardStream, shard_files
from mtlgraph.data.sources.table import split_table, table_dataset
from mtlgraph.data.sources.tokenizer import WordTokenizer

__all__ = [
    "IMAGE_MODES",
    "TABLE_FORMATS",
    "ImageDecoder",
    "ImageFolder",
    "ShardStream",
    "Table",
    "WordTokenizer",
    "iter_table",
    "read_table",
    "shard_files",
    "split_table",
    "table_dataset",
    "table_format",
]
