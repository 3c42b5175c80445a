"""Tables on disk (CSV, JSON Lines, Parquet) and the word-level tokenizer."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlgraph import DictDataLoader, DictDataset
from mtlgraph.data.sources import (
    WordTokenizer,
    iter_table,
    read_table,
    split_table,
    table_dataset,
)
from mtlgraph.exceptions import DataError

ROWS = [
    {"desc": "Red shoe, red laces", "price": 9.5, "clicked": 1},
    {"desc": "blue hat", "price": 20.0, "clicked": 0},
    {"desc": "red hat", "price": 12.25, "clicked": 1},
    {"desc": "green sock", "price": 3.0, "clicked": 0},
]


def write(tmp: Path, fmt: str) -> Path:
    if fmt == "csv":
        f = tmp / "t.csv"
        lines = ["desc,price,clicked"] + [
            f'"{r["desc"]}",{r["price"]},{r["clicked"]}' for r in ROWS
        ]
        f.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        f = tmp / "t.jsonl"
        f.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        f = tmp / "t.parquet"
        pq.write_table(pa.Table.from_pylist(ROWS), f)
    return f


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_every_format_gives_the_same_dataset(tmp_path: Path, fmt: str) -> None:
    table = read_table(write(tmp_path, fmt))
    assert list(table) == ["desc", "price", "clicked"]
    tok = WordTokenizer.fit(table["desc"], vocab_size=6, min_count=1)
    assert tok.tokens == ["<pad>", "<unk>", "red", "hat", ",", "blue"]
    ds = table_dataset(
        "products",
        "train",
        table,
        {"desc": "desc", "price": "price"},
        {"click_task": "clicked"},
        text={"desc": tok},
    )
    assert isinstance(ds, DictDataset)
    x, y = next(iter(DictDataLoader(ds, batch_size=4)))
    assert x["price"].dtype == torch.float32 and x["price"].shape == (4, 1)
    assert x["price"][:, 0].tolist() == [9.5, 20.0, 12.25, 3.0]
    assert y["click_task"].dtype == torch.int64 and y["click_task"].tolist() == [1, 0, 1, 0]
    # "red shoe, red laces": shoe and laces are unknown (vocabulary of 6), padded per batch
    assert x["desc"][0].tolist() == [2, 1, 4, 2, 1]
    assert x["desc_mask"].sum(1).tolist() == [5, 2, 2, 2]


def test_tokenizer_settings_and_round_trip(tmp_path: Path) -> None:
    texts = ["a a a b b c", "A B d"]
    tok = WordTokenizer.fit(texts, vocab_size=10, min_count=2, lowercase=False, max_length=3)
    assert tok.tokens == ["<pad>", "<unk>", "a", "b"]  # c, d, A, B seen once
    assert tok.encode("a A b c a").tolist() == [2, 1, 3]  # cut at max_length
    assert WordTokenizer.fit(texts, min_count=2).tokens == ["<pad>", "<unk>", "a", "b"]
    saved = WordTokenizer.load(tok.save(tmp_path / "v" / "vocab.json"))
    assert saved == tok and saved.fingerprint == tok.fingerprint
    other = WordTokenizer.fit(texts, vocab_size=10, min_count=1, lowercase=False, max_length=3)
    assert other.fingerprint != tok.fingerprint
    (tmp_path / "bad.json").write_text('{"tokens": ["x"]}')
    with pytest.raises(DataError, match="is not a word-level vocabulary"):
        WordTokenizer.load(tmp_path / "bad.json")


def test_split_table_by_column_and_fractions() -> None:
    table = {"s": np.array(["train", "test", "train"], dtype=object), "v": np.arange(3)}
    parts = split_table(table, split_column="s")
    assert {k: v["v"].tolist() for k, v in parts.items()} == {"train": [0, 2], "test": [1]}
    table = {"v": np.arange(10)}
    parts = split_table(table, fractions={"train": 0.7, "valid": 0.3})
    assert [len(p["v"]) for p in parts.values()] == [7, 3]
    with pytest.raises(DataError, match="no split column 'split'.*it has 'v'"):
        split_table(table, split_column="split")


def test_bad_tables_name_file_row_and_column(tmp_path: Path) -> None:
    f = tmp_path / "t.csv"
    f.write_text("desc,price,clicked\nred,9.5,1\nblue,cheap,yes\n")
    table = read_table(f)
    with pytest.raises(DataError) as info:
        table_dataset(
            "p",
            "train",
            table,
            {"price": "price", "size": "sizee"},
            {"click_task": "clicked"},
            origin="'t.csv'",
        )
    message = str(info.value)
    assert f"cannot read dataset 'p' (train) from '{f}'" in message
    assert f"'{f}' line 3, column 'price': 'cheap' is not a number" in message
    assert f"'{f}' has no column 'sizee'" in message
    assert "line 3, column 'clicked': 'yes' is not a number" in message  # every problem at once
    with pytest.raises(DataError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    with pytest.raises(DataError, match=r"cannot tell the format of .*x\.txt"):
        read_table(tmp_path / "x.txt")
    (tmp_path / "b.jsonl").write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(DataError, match=r"b\.jsonl' line 2: not valid JSON"):
        read_table(tmp_path / "b.jsonl")
    with pytest.raises(DataError, match="has no column 'nope'"):
        read_table(f, columns=["nope"])


def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = write(tmp_path, "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"needs pyarrow: pip install 'mtlgraph\[tables\]'"):
        read_table(f)


def test_floats_and_missing_labels_stay_float(tmp_path: Path) -> None:
    f = tmp_path / "t.jsonl"
    f.write_text('{"x": 1, "y": 0.5}\n{"x": 2, "y": null}\n')
    ds = table_dataset("d", "train", read_table(f), {"x": "x"}, {"t": "y"})
    y = ds.Y_dict["t"]
    assert y.dtype == torch.float32 and y[0] == 0.5 and torch.isnan(y[1])


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
@pytest.mark.parametrize("rows", [1, 2, 4, 5])
def test_chunks_are_the_whole_file_cut_in_order(tmp_path: Path, fmt: str, rows: int) -> None:
    f = write(tmp_path, fmt)
    whole = read_table(f)
    chunks = list(iter_table(f, rows=rows))
    assert [len(c["price"]) for c in chunks] == [min(rows, 4 - i) for i in range(0, 4, rows)]
    for column in whole:
        assert np.concatenate([c[column] for c in chunks]).tolist() == whole[column].tolist()
    first = 2 if fmt == "csv" else 1  # a CSV's first line is its header
    unit = "row" if fmt == "parquet" else "line"
    assert [c.place(0) for c in chunks] == [f"'{f}' {unit} {first + i}" for i in range(0, 4, rows)]
