"""One reader for training and prediction: a corpus of awkward files, read both ways.

Every valid file must give training (``source:`` datasets, split in two) and ``predict`` (read in
chunks of two rows) the same input tensor; every invalid file must give both the same
:class:`~mtlgraph.DataError`, naming the file, the line of the file (the row, for binary
formats) and the column.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from experiment_helpers import write_config

from mtlgraph.exceptions import DataError
from mtlgraph.experiment.cli import main
from mtlgraph.experiment.config import parse_config
from mtlgraph.experiment.predict import read_prediction_data
from mtlgraph.experiment.sources import load_datasets

EXPECTED = torch.tensor([[1.5, -2.0], [0.25, 300.0], [4.0, 5.0]])
"""The input field ``x`` (columns ``a``, ``b``) of every valid file."""

BIG = "x" * 2**20  # a 1 MiB cell (the csv module's own limit is 128 KiB)
ROWS = [
    {"a": 1.5, "b": -2, "y": 0, "note": "plain"},
    {"a": 0.25, "b": 300, "y": 1, "note": "naïve café, 日本語 🙂"},
    {"a": 4, "b": 5, "y": 1, "note": 'say "hi"'},
]


def _csv(*lines: str, end: str = "\n", bom: bool = False) -> bytes:
    return (("\ufeff" if bom else "") + end.join(lines) + end).encode()


PLAIN = ["a,b,y,note", "1.5,-2,0,plain", "0.25,300,1,two", "4,5,1,x"]

VALID: dict[str, tuple[str, bytes]] = {
    "plain": ("f.csv", _csv(*PLAIN)),
    "crlf": ("f.csv", _csv(*PLAIN, end="\r\n")),
    "bom": ("f.csv", _csv(*PLAIN, bom=True)),
    "bom and crlf": ("f.csv", _csv(*PLAIN, end="\r\n", bom=True)),
    "no final newline": ("f.csv", "\n".join(PLAIN).encode()),
    "spaces around numbers and names": (
        "f.csv",
        _csv(" a , b ,y,note", " 1.5 ,\t-2,0,p", "0.25 , 300 ,1,q", "  4,5  ,1,r"),
    ),
    "quoted numbers": (
        "f.csv",
        _csv("a,b,y,note", '"1.5","-2",0,p', '"0.25",300,1,q', '4,"5",1,r'),
    ),
    "exponents": ("f.csv", _csv("a,b,y,note", "15e-1,-2.0,0,p", "2.5E-1,3e2,1,q", "4.0,5,1,r")),
    "quoted multi-line cells": (
        "f.csv",
        _csv("a,b,y,note", '1.5,-2,0,"one\ntwo"', '0.25,300,1,"three\r\nfour\n"', "4,5,1,r"),
    ),
    "commas and quotes in cells": (
        "f.csv",
        _csv("a,b,y,note", '1.5,-2,0,"a, b, c"', '0.25,300,1,"say ""hi"""', "4,5,1,"),
    ),
    "a 1 MiB cell": ("f.csv", _csv("a,b,y,note", f"1.5,-2,0,{BIG}", "0.25,300,1,q", "4,5,1,r")),
    "unicode": (
        "f.csv",
        _csv("a,b,y,größe", "1.5,-2,0,naïve café", "0.25,300,1,日本語", "4,5,1,🙂"),
    ),
    "columns in another order": (
        "f.csv",
        _csv("note,b,y,a", "p,-2,0,1.5", "q,300,1,0.25", "r,5,1,4"),
    ),
    "an empty label is unlabelled": (
        "f.csv",
        _csv("a,b,y,note", "1.5,-2,0,p", "0.25,300,,q", "4,5,1,r"),
    ),
    "json lines": ("f.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS).encode()),
    "json lines with bom and crlf": (
        "f.jsonl",
        ("\ufeff" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in ROWS)).encode(),
    ),
    "json lines with list-free floats": (
        "f.jsonl",
        b'{"a": 1.5, "b": -2.0, "y": 0}\n{"a": 0.25, "b": 3e2, "y": 1}\n{"a": 4.0, "b": 5, "y": 1}',
    ),
}
"""name -> (file name, bytes): awkward but valid; every one holds the rows of ``EXPECTED``."""


def _parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def _npz(path: Path, **changes: Any) -> None:
    arrays = {k: np.asarray([r[k] for r in ROWS], dtype=np.float64) for k in "ab"}
    np.savez(path, **{**arrays, "y": np.asarray([0, 1, 1]), **changes})


def _npy(path: Path) -> None:
    path.mkdir()
    for k in "ab":
        np.save(path / f"{k}.npy", np.asarray([r[k] for r in ROWS], dtype=np.float32))
    np.save(path / "y.npy", np.asarray([0, 1, 1]))


WRITERS: dict[str, tuple[str, Callable[[Path], None]]] = {
    "parquet": ("f.parquet", lambda p: _parquet(p, ROWS)),
    "npz": ("f.npz", _npz),
    "directory of npy files": ("f_npy", _npy),
}
"""Binary formats, written by their libraries."""


def _write(tmp_path: Path, name: str, content: bytes | Callable[[Path], None]) -> Path:
    path = tmp_path / name
    if callable(content):
        content(path)
    else:
        path.write_bytes(content)
    return path


def _config_dict(path: Path) -> dict[str, Any]:
    source = {"type": "npy" if path.is_dir() else "table", "path": str(path)}
    return {
        "modules": {"head": {"type": "linear", "in_features": 2, "out_features": 2}},
        "tasks": {"t": {"ops": [{"module": "head", "inputs": [["_input_", "x"]]}]}},
        "data": {
            "datasets": {
                "rows": {
                    "source": {**source, "fractions": {"train": 0.5, "valid": 0.5}},
                    "fields": {"x": ["a", "b"]},
                    "labels": {"t": "y"},
                }
            }
        },
        "trainer": {"n_epochs": 1, "lr": 0.05, "progress_bar": False},
    }


def _config(path: Path) -> Any:
    return parse_config(_config_dict(path), base_dir=path.parent)


def _training(path: Path) -> torch.Tensor:
    datasets = load_datasets(_config(path)).datasets
    return torch.cat([d.X_dict["x"] for d in datasets])


def _prediction(path: Path) -> tuple[torch.Tensor, list[Any]]:
    data = read_prediction_data(_config(path), path, ["x"])
    batches = list(data.batches(2))
    ids = [i for X, _ in batches for i in X["__id__"]]
    return torch.cat([X["x"] for X, _ in batches]), ids


CASES = [pytest.param(n, c, id=k) for k, (n, c) in {**VALID, **WRITERS}.items()]


@pytest.mark.parametrize(("name", "content"), CASES)
def test_valid_files_give_training_and_predict_the_same_rows(
    tmp_path: Path, name: str, content: Any
) -> None:
    path = _write(tmp_path, name, content)
    training = _training(path)
    predicted, ids = _prediction(path)
    assert training.dtype == predicted.dtype == torch.float32
    assert torch.equal(training, EXPECTED)
    assert torch.equal(predicted, EXPECTED)
    assert ids == [0, 1, 2]  # one prediction per row, in order


INVALID: dict[str, tuple[str, bytes | Callable[[Path], None], str]] = {
    "a short row": ("f.csv", _csv(*PLAIN[:2], "0.25,300", PLAIN[3]), "line 3, column 'y': 2 cells"),
    "a long row": ("f.csv", _csv(*PLAIN[:3], "4,5,1,x,extra"), "line 4, column 5 (past the last"),
    "a duplicated column name": (
        "f.csv",
        _csv("a,b,a,y", "1,2,3,0"),
        "line 1, column 3: column name 'a' again",
    ),
    "an empty column name": (
        "f.csv",
        _csv("a,,b,y", "1,2,3,0"),
        "line 1, column 2: an empty column name",
    ),
    "a row of empty cells": (
        "f.csv",
        _csv(*PLAIN[:2], ",,,", PLAIN[3]),
        "line 3: every cell of the row is empty",
    ),
    "a blank line": (
        "f.csv",
        _csv(*PLAIN[:2], "", PLAIN[3]),
        "line 3: every cell of the row is empty",
    ),
    "an empty input cell": (
        "f.csv",
        _csv(*PLAIN[:3], "4,,1,x"),
        "line 4, column 'b': '' is not a finite number",
    ),
    "a NaN input cell": (
        "f.csv",
        _csv(*PLAIN[:2], "nan,300,1,q", PLAIN[3]),
        "line 3, column 'a': 'nan' is not a finite number",
    ),
    "an infinite input cell": (
        "f.csv",
        _csv(*PLAIN[:3], "4,-inf,1,x"),
        "line 4, column 'b': '-inf' is not a finite number",
    ),
    "text in a numeric cell": (
        "f.csv",
        _csv(*PLAIN[:3], "four,5,1,x"),
        "line 4, column 'a': 'four' is not a number",
    ),
    "a bad cell after a multi-line cell": (
        "f.csv",
        _csv("a,b,y,note", '1.5,-2,0,"one\ntwo"', '0.25,300,1,"three\nfour"', "4,x,1,r"),
        "line 6, column 'b': 'x' is not a number",
    ),
    "text that is not UTF-8": ("f.csv", b"a,b,y,note\n1.5,-2,0,caf\xe9\n", "not UTF-8 text"),
    "json lines without a key": (
        "f.jsonl",
        b'{"a": 1, "b": 2, "y": 0}\n{"a": 1, "y": 0}\n',
        "line 2, column 'b': missing",
    ),
    "json lines with an extra key": (
        "f.jsonl",
        b'{"a": 1, "b": 2, "y": 0}\n{"a": 1, "b": 2, "y": 0, "c": 3}\n',
        "line 2, column 'c': not in the first line",
    ),
    "json lines with a null input": (
        "f.jsonl",
        b'{"a": 1, "b": 2, "y": 0}\n{"a": 1, "b": null, "y": 0}\n',
        "line 2, column 'b': empty or NaN",
    ),
    "json lines with a duplicated key": (
        "f.jsonl",
        b'{"a": 1, "b": 2, "y": 0}\n{"a": 1, "a": 2, "b": 2, "y": 0}\n',
        "line 2, column 'a': the key appears twice",
    ),
    "json lines with a broken line": (
        "f.jsonl",
        b'{"a": 1, "b": 2, "y": 0}\n{"a": 1, "b": \n',
        "line 2: not valid JSON",
    ),
    "json lines with a blank line": (
        "f.jsonl",
        b'{"a": 1, "b": 2, "y": 0}\n\n{"a": 1, "b": 2, "y": 0}\n',
        "line 2: every cell of the row is empty",
    ),
    "parquet with a null input": (
        "f.parquet",
        lambda p: _parquet(p, [{"a": 1.0, "b": 2.0, "y": 0}, {"a": 1.0, "b": None, "y": 1}]),
        "row 2, column 'b': empty or NaN",
    ),
    "parquet with a row of nulls": (
        "f.parquet",
        lambda p: _parquet(p, [{"a": 1.0, "b": 2.0, "y": 0}, {"a": None, "b": None, "y": None}]),
        "row 2: every cell of the row is empty",
    ),
    "npz with an infinite input": (
        "f.npz",
        lambda p: _npz(p, a=np.asarray([1.0, 2.0, np.inf])),
        "row 3, column 'a': inf is not a finite number",
    ),
}
"""name -> (file name, content, where and what the error says after the file's name)."""


@pytest.mark.parametrize(("name", "content", "expected"), INVALID.values(), ids=list(INVALID))
def test_invalid_files_give_training_and_predict_the_same_error(
    tmp_path: Path, name: str, content: Any, expected: str
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError) as training:
        _training(path)
    with pytest.raises(DataError) as predicting:
        _prediction(path)
    (problem,) = predicting.value.problems
    assert problem.startswith(f"'{path}' ") and expected in problem
    assert any(p.endswith(problem) for p in training.value.problems), training.value.problems


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A run trained on the plain file: (config file, run directory)."""
    tmp = tmp_path_factory.mktemp("corpus")
    cfg = _config_dict(_write(tmp, "train.csv", VALID["plain"][1]))
    cfg["runs_root"] = str(tmp / "runs")
    config = write_config(tmp / "c.yaml", cfg)
    assert main(["train", str(config), "--quiet"]) == 0
    return config, next((tmp / "runs").glob("*/*"))


@pytest.mark.parametrize(
    "case", ["bom and crlf", "quoted multi-line cells", "a 1 MiB cell", "json lines"]
)
def test_predict_writes_one_row_per_input_row(
    tmp_path: Path, trained: tuple[Path, Path], case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = trained
    data = _write(tmp_path, *VALID[case])
    out = tmp_path / "p.jsonl"
    args = ["predict", str(config), "--checkpoint", str(run), "--data", str(data)]
    assert main([*args, "--out", str(out), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == [0, 1, 2]


@pytest.mark.parametrize("case", ["a row of empty cells", "an empty input cell", "a long row"])
def test_predict_refuses_a_bad_file_with_exit_2(
    tmp_path: Path, trained: tuple[Path, Path], case: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = trained
    name, content, expected = INVALID[case]
    data = _write(tmp_path, name, content)
    out = tmp_path / "p.jsonl"
    args = ["predict", str(config), "--checkpoint", str(run), "--data", str(data)]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"'{data}' " in err and expected in err and not out.exists()
