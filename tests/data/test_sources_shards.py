"""Table shards streamed one file at a time: every row once per pass, workers, bad shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from mtlgraph import DictDataLoader, NamedDataset
from mtlgraph.data.sources import ShardStream, Table, WordTokenizer, shard_files
from mtlgraph.exceptions import DataError


def write_shards(tmp: Path, n_files: int = 4, rows: int = 5) -> list[Path]:
    for f in range(n_files):
        lines = [
            json.dumps({"id": 100 * f + r, "text": f"w{r} w{f}", "y": r % 2}) for r in range(rows)
        ]
        (tmp / f"part-{f:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return shard_files("part-*.jsonl", tmp)


def ids(loader: DictDataLoader) -> list[int]:
    return sorted(int(v) for x, _ in loader for v in x["id"][:, 0])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_every_row_once_per_pass(tmp_path: Path, num_workers: int) -> None:
    files = write_shards(tmp_path)
    assert [f.name for f in files] == [f"part-{i:02d}.jsonl" for i in range(4)]
    tok = WordTokenizer.fit(["w0 w1 w2 w3 w4"])
    stream = ShardStream(files, {"id": "id", "text": "text"}, {"t": "y"}, {"text": tok})
    assert stream.num_units() == 4 and stream.num_examples() is None
    loader = DictDataLoader(
        NamedDataset("d", "valid", stream), batch_size=3, num_workers=num_workers
    )
    assert ids(loader) == [100 * f + r for f in range(4) for r in range(5)]
    x, y = next(iter(loader))
    assert x["text"].dtype == torch.int64 and x["text"].shape == (3, 2)
    assert y["t"].dtype == torch.int64


def test_shuffled_rows_follow_the_seed(tmp_path: Path) -> None:
    stream = ShardStream(write_shards(tmp_path, 1, 20), {"id": "id"}, {"t": "y"}, shuffle=True)
    first = [int(x["id"]) for x, _ in stream.iter_unit(0, 0, seed=3)]
    assert sorted(first) == list(range(20)) and first != list(range(20))
    assert [int(x["id"]) for x, _ in stream.iter_unit(0, 5, seed=3)] == first[5:]  # resume
    assert [int(x["id"]) for x, _ in stream.iter_unit(0, 0, seed=4)] != first


def test_parquet_shards_know_their_size(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for i in range(3):
        pq.write_table(pa.table({"x": [1.0 * i] * 4, "y": [i] * 4}), tmp_path / f"s{i}.parquet")
    stream = ShardStream(shard_files("*.parquet", tmp_path), {"x": "x"}, {"t": "y"})
    assert stream.num_examples() == 12
    assert [int(y["t"]) for _, y in stream] == [0] * 4 + [1] * 4 + [2] * 4


def test_bad_shards_are_named(tmp_path: Path) -> None:
    files = write_shards(tmp_path, 2)
    with pytest.raises(DataError) as info:
        shard_files(["part-00.jsonl", "gone.jsonl", "x-*.csv"], tmp_path)
    assert "shard 'gone.jsonl' does not exist" in str(info.value)
    assert "no file matches 'x-*.csv'" in str(info.value)
    stream = ShardStream(files, {"id": "id"}, {"t": "y"})
    files[1].unlink()  # disappears mid-run
    with pytest.raises(DataError, match=r"shard '.*part-01.jsonl' \(unit 1 of 2\) disappeared"):
        list(stream)
    (tmp_path / "bad.jsonl").write_text('{"id": 1, "y": "yes"}\n')
    bad = ShardStream([tmp_path / "bad.jsonl"], {"id": "id", "z": "zz"}, {"t": "y"})
    with pytest.raises(DataError) as info:
        list(bad)
    message = str(info.value)
    assert "cannot read shard '" in message
    assert "bad.jsonl' line 1, column 'y': 'yes' is not a number" in message
    assert "has no column 'zz'" in message


def test_missing_labels_become_the_ignore_value(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"x": 1, "y": 1}\n{"x": 2, "y": null}\n')

    def as_class_ids(task: str, labels: torch.Tensor, table: Table) -> torch.Tensor:
        assert table.place(1).endswith("a.jsonl' line 2")  # the rows know their lines
        return torch.nan_to_num(labels, nan=-1.0).long()

    stream = ShardStream([tmp_path / "a.jsonl"], {"x": "x"}, {"t": "y"}, labels_as=as_class_ids)
    assert [int(y["t"]) for _, y in stream] == [1, -1]
    as_read = ShardStream([tmp_path / "a.jsonl"], {"x": "x"}, {"t": "y"})
    first, second = (float(y["t"]) for _, y in as_read)
    assert first == 1.0 and math.isnan(second)
