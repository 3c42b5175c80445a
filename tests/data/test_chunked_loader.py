"""The in-memory loader's chunked path: batches cut from a gathered chunk of rows are the
batches gathered one at a time, in the same order, for every start, size and drop_last."""

from __future__ import annotations

import pytest
import torch

import mtlgraph.data.datasets as datasets
from mtlgraph import DictDataLoader, DictDataset


def _dataset(n: int) -> DictDataset:
    g = torch.Generator().manual_seed(0)
    return DictDataset(
        "d",
        "train",
        {"x": torch.randn(n, 3, generator=g), "i": torch.arange(n)},
        {"t": torch.randint(0, 2, (n,), generator=g), "u": torch.rand(n, 2, generator=g)},
    )


def _one_at_a_time(loader: DictDataLoader, start: int) -> list[tuple[dict, dict]]:
    """The batches as the loader cut them before chunking: one gather per batch."""
    ds, bs = loader.dataset, int(loader.batch_size or 1)
    perm = loader.sampler.order()  # type: ignore[attr-defined]
    n = len(ds)
    stop = n - n % bs if loader.drop_last else n
    return [
        ds.batch(slice(b, min(b + bs, n)) if perm is None else perm[b : min(b + bs, n)])
        for b in range(start * bs, stop, bs)
    ]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("start", [0, 3])
@pytest.mark.parametrize("chunk_bytes", [1 << 20, 36 * 20])  # one chunk; 4 batches (36 B a row)
def test_chunked_batches_equal_batches_gathered_one_at_a_time(
    monkeypatch: pytest.MonkeyPatch, shuffle: bool, drop_last: bool, start: int, chunk_bytes: int
) -> None:
    monkeypatch.setattr(datasets, "CHUNK_BYTES", chunk_bytes)
    loader = DictDataLoader(_dataset(103), batch_size=5, shuffle=shuffle, drop_last=drop_last)
    loader.set_epoch(2)
    assert datasets._chunk_rows(loader.dataset, 5) == (20 if chunk_bytes < 1000 else 29125)
    got = list(loader.iterate(start=start))
    expected = _one_at_a_time(loader, start)
    assert len(got) == len(expected) == (20 if drop_last else 21) - start
    for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
        assert gx.keys() == ex.keys() and gy.keys() == ey.keys()
        for k in ex:
            assert torch.equal(gx[k], ex[k]) and gx[k].is_contiguous()
        for k in ey:
            assert torch.equal(gy[k], ey[k])
    if shuffle:
        rows = torch.cat([x["i"] for x, _ in got]).tolist()
        assert rows == loader.sampler.order()[start * 5 : len(rows) + start * 5].tolist()  # type: ignore[attr-defined]


def test_list_fields_are_not_chunked() -> None:
    ds = DictDataset("d", "train", {"s": [torch.arange(k + 1) for k in range(6)]}, {})
    assert datasets._chunk_rows(ds, 2) == 0
    batches = list(DictDataLoader(ds, batch_size=4))
    assert [x["s"].shape for x, _ in batches] == [(4, 4), (2, 6)]  # padded per batch


def test_a_dataset_without_labels_is_cut_into_input_batches() -> None:
    ds = DictDataset("d", "serve", {"x": torch.arange(7)}, {})
    batches = list(DictDataLoader(ds, batch_size=3, shuffle=True))
    assert [y for _, y in batches] == [{}, {}, {}]
    assert sorted(torch.cat([x["x"] for x, _ in batches]).tolist()) == list(range(7))


def test_in_order_batches_are_cut_once_and_follow_the_dataset() -> None:
    ds = _dataset(10)
    loader = DictDataLoader(ds, batch_size=4)
    first = list(loader)
    first[0][0]["extra"] = torch.zeros(1)  # a consumer's change to a batch dict stays its own
    again = list(loader)
    assert "extra" not in again[0][0]
    assert all(
        a[0]["x"].data_ptr() == b[0]["x"].data_ptr() for a, b in zip(first, again, strict=True)
    )
    ds.X_dict["x"] = ds.X_dict["x"] * 2  # a new tensor: the batches are cut anew
    doubled = list(loader)
    assert torch.equal(doubled[1][0]["x"], ds.X_dict["x"][4:8])
    ds.X_dict["x"].mul_(0)  # in place: the views see it, as slices of the dataset always did
    assert not list(loader)[2][0]["x"].any()
    assert [len(y["t"]) for _, y in loader.iterate(start=1)] == [4, 2]
