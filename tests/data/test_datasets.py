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
