"""Collation: a worker's batch read in one call, and how it travels to the loader."""

from __future__ import annotations

import io
import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # registers the shared-memory reductions a worker uses

from mtlgraph import DictDataset
from mtlgraph.data.collate import BY_VALUE_BYTES, RowBatch, SmallBatch, collate_dicts


def _through_a_worker_queue(obj: object) -> object:
    """Pickled as a DataLoader worker sends its batches (tensors through shared memory)."""
    buf = io.BytesIO()
    ForkingPickler(buf, pickle.HIGHEST_PROTOCOL).dump(obj)
    return pickle.loads(buf.getvalue())


def test_a_small_batch_travels_by_value_and_arrives_as_plain_tensors() -> None:
    x = {"x": torch.arange(12.0).reshape(4, 3), "text": ["a", "b", "c", "d"]}
    y = {"t": torch.tensor([0, 1, -1, 1])}
    batch = SmallBatch.of((x, y))
    assert isinstance(batch, SmallBatch)
    blob = io.BytesIO()
    ForkingPickler(blob, pickle.HIGHEST_PROTOCOL).dump(batch)
    assert b"rebuild_storage" not in blob.getvalue()  # no shared-memory handle: the bytes
    got_x, got_y = _through_a_worker_queue(batch)  # type: ignore[misc]
    assert type(got_x["x"]) is torch.Tensor and torch.equal(got_x["x"], x["x"])
    assert got_x["text"] == ["a", "b", "c", "d"] and torch.equal(got_y["t"], y["t"])
    assert got_x["x"].dtype == torch.float32 and got_y["t"].dtype == torch.int64


def test_a_large_or_non_numpy_batch_keeps_shared_memory() -> None:
    rows = BY_VALUE_BYTES // (4 * 8) + 1
    large = ({"x": torch.zeros(rows, 8)}, {"t": torch.zeros(rows)})
    assert not isinstance(SmallBatch.of(large), SmallBatch)
    half = ({"x": torch.zeros(2, 2, dtype=torch.bfloat16)}, {})
    assert not isinstance(SmallBatch.of(half), SmallBatch)


def test_row_batch_is_read_whole_by_collate_dicts_in_the_given_order() -> None:
    ds = DictDataset(
        "d",
        "train",
        {"x": torch.arange(10.0)[:, None], "seq": [torch.arange(i % 3 + 1) for i in range(10)]},
        {"t": torch.arange(10)},
    )
    rows = ds.__getitems__([7, 2, 2, 9])
    assert isinstance(rows, RowBatch)
    x, y = collate_dicts(rows, pad_value=-1)
    assert y["t"].tolist() == [7, 2, 2, 9] and x["x"][:, 0].tolist() == [7.0, 2.0, 2.0, 9.0]
    assert x["seq"].tolist() == [[0, 1, -1], [0, 1, 2], [0, 1, 2], [0, -1, -1]]
    assert collate_dicts(rows[1:3])[1]["t"].tolist() == [2, 2]  # per-row samples collated
    x, y = collate_dicts(ds.__getitems__([3, 4, 5]))  # an ascending run: a slice
    assert y["t"].tolist() == [3, 4, 5]
