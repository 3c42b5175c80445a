"""Streams: split over ranks x workers without overlap or loss, exact resume from a cursor."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import pytest
import torch
from torch.utils.data import Dataset, IterableDataset

from mtlgraph import DictDataLoader, NamedDataset
from mtlgraph.data.streams import ExampleStream, Position, StreamCursor
from mtlgraph.exceptions import CheckpointError, DataError


class Shards(ExampleStream):
    """``units`` shards of ``rows`` examples each; example id = 100 * unit + row."""

    def __init__(self, units: int = 5, rows: int = 7) -> None:
        self.units, self.rows = units, rows
        self.labels = ("t",)

    def num_units(self) -> int:
        return self.units

    def iter_unit(self, unit: int, start: int, seed: int) -> Iterator[tuple[dict, dict]]:
        for row in range(start, self.rows):
            ident = 100 * unit + row
            yield {"x": torch.tensor([float(ident)])}, {"t": torch.tensor(ident % 2)}

    def num_examples(self) -> int:
        return self.units * self.rows


class Plain(IterableDataset):
    def __iter__(self):  # type: ignore[no-untyped-def]
        for i in range(11):
            yield {"x": torch.tensor([float(i)])}, {"t": i % 2}


class Pairs(Dataset):
    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        return {"x": torch.tensor([float(i)]), "seq": torch.arange(i % 3 + 1)}, {"t": i % 2}


def ids(batches) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(v) for x, _ in batches for v in x["x"][:, 0].tolist()]


def all_ids(units: int = 5, rows: int = 7) -> list[int]:
    return sorted(100 * u + r for u in range(units) for r in range(rows))


@pytest.mark.parametrize("units", [5, 1])
@pytest.mark.parametrize("workers", [0, 2])
def test_one_pass_over_ranks_and_workers_has_no_overlap_or_loss(units: int, workers: int) -> None:
    seen: list[int] = []
    for rank in range(2):
        dl = DictDataLoader(
            NamedDataset("s", "valid", Shards(units)), batch_size=3, num_workers=workers
        )
        dl.dataset.feed.rank, dl.dataset.feed.world_size = rank, 2
        seen += ids(dl)
    assert sorted(seen) == all_ids(units)


def test_map_style_named_dataset_collates_pads_and_masks() -> None:
    ds = NamedDataset("pairs", "train", Pairs())
    assert ds.labels == ("t",)
    for workers in (0, 2):
        x, y = next(iter(DictDataLoader(ds, batch_size=3, num_workers=workers)))
        assert x["seq"].tolist() == [[0, 0, 0], [0, 1, 0], [0, 1, 2]]
        assert x["seq_mask"].tolist() == [[True, False, False], [True, True, False], [True] * 3]
        assert y["t"].tolist() == [0, 1, 0]


def test_map_style_iterate_skips_batches_without_loading_them() -> None:
    dl = DictDataLoader(NamedDataset("pairs", "train", Pairs()), batch_size=2, shuffle=True)
    dl.set_epoch(3)
    full = ids(dl.iterate())
    assert ids(dl.iterate(start=1)) == full[2:]


def test_a_plain_iterable_dataset_is_split_by_example() -> None:
    ds = NamedDataset("plain", "valid", Plain())
    assert ids(DictDataLoader(ds, batch_size=4, num_workers=2)) == [
        0,
        2,
        4,
        6,
        1,
        3,
        5,
        7,
        8,
        10,
        9,
    ]
    assert sorted(ids(DictDataLoader(ds, batch_size=4, num_workers=2))) == list(range(11))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_repeating_stream_resumes_exactly_from_its_cursor(workers: int) -> None:
    def loader() -> DictDataLoader:
        return DictDataLoader(
            NamedDataset("s", "train", Shards()),
            batch_size=4,
            shuffle=True,
            seed=3,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    whole = ids(islice(loader().iterate(repeat=True), 40))  # several passes
    assert sorted(whole[: 35 - 35 % 4]) != whole[: 35 - 35 % 4]  # shuffled units
    first = loader()
    head = ids(islice(first.iterate(repeat=True), 13))
    state = first.cursor.state_dict()
    second = loader()
    second.cursor = StreamCursor.from_state(state, workers=max(workers, 1))
    tail = ids(islice(second.iterate(repeat=True), 27))
    assert head + tail == whole


def test_cursor_refuses_another_number_of_workers() -> None:
    state = StreamCursor(workers=2).state_dict()
    with pytest.raises(CheckpointError, match="num_workers of the interrupted run"):
        StreamCursor.from_state(state, workers=1)


def test_stream_errors_name_the_dataset() -> None:
    with pytest.raises(DataError, match="stream 's' \\(train\\) is batched by its workers"):
        DictDataLoader(NamedDataset("s", "train", Shards()), sampler=[0])
    with pytest.raises(DataError, match="is a int; NamedDataset needs a torch Dataset"):
        NamedDataset("s", "train", 3)
    with pytest.raises(DataError, match="wrap a torch dataset as NamedDataset"):
        DictDataLoader(Pairs())  # type: ignore[arg-type]

    class Bad(IterableDataset):
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield torch.zeros(2)

    with pytest.raises(DataError, match="stream 'b' \\(train\\) gave a Tensor"):
        list(DictDataLoader(NamedDataset("b", "train", Bad())))


def test_an_empty_consumer_of_a_repeating_stream_is_an_error() -> None:
    dl = DictDataLoader(NamedDataset("s", "train", Shards(units=1, rows=1)), num_workers=0)
    dl.dataset.feed.world_size = 2
    dl.dataset.feed.rank = 1
    with pytest.raises(DataError, match="read a whole pass without an example"):
        next(dl.iterate(repeat=True))


def test_positions_are_plain() -> None:
    assert list(Position(1, 2, 3, 4)) == [1, 2, 3, 4]
