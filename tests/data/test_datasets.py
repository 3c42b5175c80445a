"""DictDataset, DictDataLoader and collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtlgraph import DataError, DictDataLoader, DictDataset
from mtlgraph.data.collate import collate_dicts, pad_sequences


def _ds(n: int = 10, split: str = "train") -> DictDataset:
    return DictDataset(
        "d", split, {"x": torch.arange(n * 2.0).reshape(n, 2)}, {"t": torch.arange(n) % 2}
    )


def test_length_checks_report_every_field() -> None:
    with pytest.raises(
        DataError,
        match=r"fields have different lengths \(X_dict\['a'\]: 3, X_dict\['b'\]: 2, Y_dict\['t'\]: 3\)",
    ):
        DictDataset(
            "d", "train", {"a": torch.zeros(3, 1), "b": torch.zeros(2, 1)}, {"t": torch.zeros(3)}
        )


def test_names_are_validated_all_at_once() -> None:
    with pytest.raises(DataError) as info:
        DictDataset("a/b", "", {"x": torch.zeros(2, 1)}, {"t/1": torch.zeros(2)})
    text = str(info.value)
    assert (
        "dataset name 'a/b'" in text and "dataset split ''" in text and "label name 't/1'" in text
    )


def test_bad_field_types_are_named() -> None:
    with pytest.raises(
        DataError, match=r"X_dict\['x'\] is a int; use a tensor, numpy array or list"
    ):
        DictDataset("d", "train", {"x": 3}, {})
    with pytest.raises(DataError, match=r"Y_dict\['t'\] must be a tensor with a row per example"):
        DictDataset("d", "train", {"x": torch.zeros(2, 1)}, {"t": torch.tensor(1)})


def test_numpy_inputs_keep_their_dtype() -> None:
    ds = DictDataset(
        "d", "train", {"x": np.zeros((3, 2), dtype=np.float32)}, {"t": np.array([0, 1, 0])}
    )
    assert ds.X_dict["x"].dtype == torch.float32 and ds.Y_dict["t"].dtype == torch.int64


def test_loader_batches_in_order_and_last_partial() -> None:
    loader = DictDataLoader(_ds(10), batch_size=4)
    batches = list(loader)
    assert [len(y["t"]) for _, y in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([x["x"] for x, _ in batches]), _ds(10).X_dict["x"])
    assert len(loader) == 3
    assert len(list(DictDataLoader(_ds(10), batch_size=4, drop_last=True))) == 2


def test_shuffle_is_a_function_of_seed_and_epoch() -> None:
    def order(seed: int, epoch: int) -> list[int]:
        loader = DictDataLoader(_ds(10), batch_size=3, shuffle=True, seed=seed)
        loader.set_epoch(epoch)
        return torch.cat([x["x"][:, 0] for x, _ in loader]).div(2).long().tolist()

    assert sorted(order(0, 0)) == list(range(10))
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 1) != order(1, 1)


def test_iterate_from_a_batch_skips_exactly() -> None:
    loader = DictDataLoader(_ds(10), batch_size=3, shuffle=True, seed=4)
    full = [y["t"].tolist() for _, y in loader]
    assert [y["t"].tolist() for _, y in loader.iterate(start=2)] == full[2:]


def test_worker_path_gives_the_same_batches() -> None:
    fast = [x["x"] for x, _ in DictDataLoader(_ds(9), batch_size=4)]
    slow = [x["x"] for x, _ in DictDataLoader(_ds(9), batch_size=4, collate_fn=collate_dicts)]
    assert all(torch.equal(a, b) for a, b in zip(fast, slow, strict=True))


def test_sequences_are_padded_with_a_mask_and_lists_kept() -> None:
    seqs = [torch.tensor([1, 2, 3]), torch.tensor([4]), torch.tensor([5, 6])]
    ds = DictDataset(
        "d", "train", {"tokens": seqs, "text": ["a", "b", "c"]}, {"t": torch.tensor([0, 1, 0])}
    )
    ((x, _),) = list(DictDataLoader(ds, batch_size=3))
    assert x["tokens"].tolist() == [[1, 2, 3], [4, 0, 0], [5, 6, 0]]
    assert x["tokens_mask"].tolist() == [
        [True, True, True],
        [True, False, False],
        [True, True, False],
    ]
    assert x["text"] == ["a", "b", "c"]
    # per-sample collation agrees
    x2, _ = collate_dicts([ds[i] for i in range(3)])
    assert torch.equal(x2["tokens"], x["tokens"]) and x2["text"] == ["a", "b", "c"]


def test_mask_field_collision_is_an_error() -> None:
    with pytest.raises(
        DataError, match="'tokens' is padded with a 'tokens_mask' field, which X_dict already holds"
    ):
        DictDataset("d", "train", {"tokens": [torch.tensor([1])], "tokens_mask": [1]}, {})


def test_pad_sequences_custom_value() -> None:
    padded, mask = pad_sequences([torch.tensor([1.0]), torch.tensor([2.0, 3.0])], pad_value=-9)
    assert padded.tolist() == [[1.0, -9.0], [2.0, 3.0]] and mask.sum().item() == 3


def test_loader_needs_a_dict_dataset() -> None:
    with pytest.raises(DataError, match="DictDataLoader needs a DictDataset"):
        DictDataLoader([1, 2, 3])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("n", "block", "window"), [(40, 4, 8), (43, 4, 8), (43, 5, 7), (10, 16, 4), (9, 2, 32)]
)
def test_a_block_order_is_a_permutation_fixed_by_its_generator(
    n: int, block: int, window: int
) -> None:
    from mtlgraph.data.datasets import block_order

    def order(seed: int) -> list[int]:
        return block_order(n, block, window, torch.Generator().manual_seed(seed)).tolist()

    assert sorted(order(0)) == list(range(n))  # every row once: none dropped or repeated
    assert order(0) == order(0) and order(0) != order(1)
    if window % block == 0 and n % block == 0:  # a window holds whole blocks
        for first in range(0, n, window):
            blocks = {r // block for r in order(0)[first : first + window]}
            assert len(blocks) == min(window, n - first) // block


@pytest.mark.parametrize("workers", [0, 2])
def test_a_block_shuffled_loader_yields_whole_blocks_every_row_once_and_resumes_exactly(
    workers: int,
) -> None:
    def loader(seed: int = 3) -> DictDataLoader:
        return DictDataLoader(
            _ds(64),
            batch_size=8,
            shuffle=True,
            seed=seed,
            shuffle_block=4,
            num_workers=workers,
        )

    def rows(batches: list) -> list[list[int]]:  # type: ignore[type-arg]
        return [x["x"][:, 0].div(2).long().tolist() for x, _ in batches]

    one = loader()
    one.set_epoch(1)
    epoch = rows(list(one))
    assert sorted(r for batch in epoch for r in batch) == list(range(64))
    assert all(len({r // 4 for r in batch}) == 2 for batch in epoch)  # two whole blocks each
    assert epoch != [list(range(i, i + 8)) for i in range(0, 64, 8)]  # shuffled
    again = loader()
    again.set_epoch(1)
    assert rows(list(again.iterate(start=3))) == epoch[3:]  # a resumed epoch
    again.set_epoch(2)
    assert rows(list(again)) != epoch
    assert rows(list(loader(seed=4))) != rows(list(loader()))


def test_a_block_shuffle_the_loader_would_not_apply_is_refused() -> None:
    from mtlgraph import NamedDataset
    from mtlgraph.data.datasets import EpochSampler

    with pytest.raises(DataError, match=r"shuffle_block must be an integer >= 1.*got 0"):
        DictDataLoader(_ds(), batch_size=2, shuffle=True, shuffle_block=0)
    with pytest.raises(DataError, match=r"got True"):
        DictDataLoader(_ds(), batch_size=2, shuffle=True, shuffle_block=True)
    with pytest.raises(DataError, match=r"shuffle_block=4 needs shuffle=True") as info:
        DictDataLoader(_ds(), batch_size=2, shuffle_block=4, sampler=EpochSampler(10, False))
    assert "cannot be combined with a custom sampler" in str(info.value)

    class Rows(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield from [({"x": torch.zeros(1)}, {"t": torch.tensor(0)})] * 3

    with pytest.raises(DataError, match="stream is read in order"):
        DictDataLoader(
            NamedDataset("s", "train", Rows()), batch_size=2, shuffle=True, shuffle_block=4
        )
