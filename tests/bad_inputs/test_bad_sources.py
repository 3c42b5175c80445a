"""Bad-input corpus, data sources: ``check``, ``train``'s set-up and the diagnostics on every
kind of dataset; files that are not what their name says; the vague errors made exact. Every
CLI case asserts the exit status of docs/cli.md (2: a config or data error) and that stderr names
the file with its line or column, or the config key, and the fix, without a traceback."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from experiment_helpers import ROOT, tiny_config, write_config

from mtlgraph import (
    DictDataLoader,
    DictDataset,
    Hook,
    MultitaskClassifier,
    NamedDataset,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.data.memmap import MapReader
from mtlgraph.exceptions import ConfigError, DataError
from mtlgraph.experiment.cli import main

N = 40


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*args, "--quiet"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    return code, out, err


def _rows(n: int = N) -> list[tuple[float, float, int, int]]:
    g = np.random.default_rng(0)
    x = g.uniform(-1, 1, size=(n, 2))
    return [(float(a), float(b), int(a > 0), int(b > 0)) for a, b in x]


def _csv(path: Path, lines: list[str] | None = None, header: str = "a,b,y,z") -> Path:
    body = lines if lines is not None else [f"{a},{b},{y},{z}" for a, b, y, z in _rows()]
    path.write_text("\n".join([header, *body]) + "\n")
    return path


def _config(
    tmp: Path, source: dict[str, Any], fields: Any = None, **dataset: Any
) -> dict[str, Any]:
    """The tiny two-task config on one dataset ``d`` read from ``source``."""
    cfg = tiny_config(n_epochs=1)
    cfg["runs_root"] = str(tmp / "runs")
    cfg["data"]["datasets"] = {
        "d": {
            "source": source,
            "fields": fields if fields is not None else {"xy": ["a", "b"]},
            "labels": {"circle_task": "y", "square_task": "z"},
            **dataset,
        }
    }
    return cfg


def _yaml(tmp: Path, cfg: dict[str, Any], name: str = "c.yaml") -> str:
    return str(write_config(tmp / name, cfg))


# ---------------------------------------------------------------- every kind of dataset


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small file of every kind: CSV, JSON Lines, Parquet, .npz, a .npy directory, an image
    folder with its table, JSON Lines and Parquet shards."""
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    image = pytest.importorskip("PIL.Image")
    tmp = tmp_path_factory.mktemp("kinds")
    rows = _rows()
    frame = pd.DataFrame(rows, columns=["a", "b", "y", "z"])
    _csv(tmp / "t.csv")
    frame.to_json(tmp / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp / "t.parquet")
    xy = frame[["a", "b"]].to_numpy(np.float32)
    np.savez(tmp / "t.npz", x=xy, y=frame["y"].to_numpy(), z=frame["z"].to_numpy())
    (tmp / "npy").mkdir()
    for name, array in (("x", xy), ("y", frame["y"].to_numpy()), ("z", frame["z"].to_numpy())):
        np.save(tmp / "npy" / f"{name}.npy", array)
    (tmp / "img").mkdir()
    for i in range(N):
        image.fromarray(np.full((4, 4), 6 * i, dtype=np.uint8)).save(tmp / "img" / f"{i}.png")
    frame.assign(file=[f"{i}.png" for i in range(N)]).to_csv(tmp / "images.csv", index=False)
    (tmp / "shards").mkdir()
    for part in range(2):
        chunk = frame.iloc[part * 20 : (part + 1) * 20]
        chunk.to_json(tmp / "shards" / f"p{part}.jsonl", orient="records", lines=True)
        chunk.to_parquet(tmp / "shards" / f"p{part}.parquet")
    return tmp


IMAGES = {"folder": "img", "mode": "L"}
SAMPLING = {"batch_scheduler": "uniform", "steps_per_epoch": 3}
KINDS: list[tuple[str, dict[str, Any], Any, dict[str, Any], str]] = [
    ("csv table", {"type": "table", "path": "t.csv"}, None, {}, "d: train 32, valid 4, test 4"),
    ("jsonl table", {"type": "table", "path": "t.jsonl"}, None, {}, "d: train 32, valid 4, test 4"),
    ("parquet table", {"type": "table", "path": "t.parquet"}, None, {}, "d: train 32, valid 4, test 4"),
    ("npz table", {"type": "table", "path": "t.npz"}, {"xy": "x"}, {}, "d: train 32, valid 4, test 4"),
    ("npy memmap", {"type": "npy", "path": "npy"}, {"xy": "x"}, {}, "d: train 32, valid 4, test 4"),
    ("images", {"type": "images", "path": "images.csv", "images": IMAGES}, {"img": "file", "xy": ["a", "b"]}, {}, "d: train 32, valid 4, test 4"),
    ("jsonl shards", {"type": "shards", "path": {"train": "shards/*.jsonl", "valid": "shards/p1.jsonl"}}, None, SAMPLING, "d: train stream, valid stream"),
    ("parquet shards", {"type": "shards", "path": {"train": "shards/*.parquet", "valid": "shards/p1.parquet"}}, None, SAMPLING, "d: train 40, valid 20"),
    ("generator", {"type": "generator", "name": "circle", "args": {"n": 40, "seed": 0}}, {"xy": "x"}, {}, "d: train 32, valid 4, test 4"),
]  # fmt: skip


@pytest.mark.parametrize(("source", "fields", "trainer", "sizes"), [k[1:] for k in KINDS], ids=[k[0] for k in KINDS])  # fmt: skip
def test_check_describes_every_kind_of_dataset(
    kinds: Path,
    capsys: pytest.CaptureFixture[str],
    source: dict[str, Any],
    fields: Any,
    trainer: dict[str, Any],
    sizes: str,
) -> None:
    cfg = _config(kinds, source, fields)
    if source["type"] == "generator":
        cfg["data"]["datasets"]["d"]["labels"] = {"circle_task": "y"}
    cfg["trainer"].update(trainer)
    code, out, err = _run(capsys, "check", _yaml(kinds, cfg, "kind.yaml"))
    assert code == 0, err
    assert out.startswith(f"{kinds / 'kind.yaml'}: valid\n")
    assert f"  {sizes}; labels circle_task" in out


SHIPPED = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=[c.stem for c in SHIPPED])
def test_check_accepts_every_shipped_config(
    capsys: pytest.CaptureFixture[str], config: Path
) -> None:
    code, out, err = _run(capsys, "check", str(config))
    assert code == 0, err
    assert f"{config}: valid" in out and "\ntasks (" in out and "\ndatasets (" in out


def test_diagnostics_probe_image_folders_and_streams(
    kinds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, source, fields in (
        ("images", {"type": "images", "path": "images.csv", "images": IMAGES}, {"img": "file", "xy": ["a", "b"]}),
        ("shards", {"type": "shards", "path": {"train": "shards/*.jsonl", "valid": "shards/p1.jsonl"}}, None),
    ):  # fmt: skip
        cfg = _config(kinds, source, fields)
        cfg["trainer"].update(
            SAMPLING, run_dir=str(kinds / f"run-{name}"), diagnostics={"every": 1}
        )
        code, _, err = _run(capsys, "train", _yaml(kinds, cfg, f"{name}.yaml"))
        assert code == 0, err
        report = json.loads((kinds / f"run-{name}" / "diagnostics.json").read_text())
        assert report["probes"] == 3 and report["tasks"] == ["circle_task", "square_task"]
        code, out, _ = _run(capsys, "diagnose", str(kinds / f"run-{name}"))
        assert code == 0 and out.startswith("Interference diagnostics: 3 probes")


# ---------------------------------------------------------------- check refuses what train refuses


def _mmoe(**changes: Any) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "mmoe.yaml").read_text())
    cfg["data"]["datasets"]["subsets"]["source"]["args"]["n"] = 40
    for key, value in changes.items():
        cfg["modules"][key].update(value)
    return cfg


def _stitch(**changes: Any) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "cross_stitch.yaml").read_text())
    cfg["data"]["datasets"]["subsets"]["source"]["args"]["n"] = 40
    for key, value in changes.items():
        cfg["modules"][key].update(value)
    return cfg


def _trainer(**settings: Any) -> dict[str, Any]:
    return tiny_config(n_epochs=1, **settings)


SETUP_CASES: list[tuple[str, Callable[[], dict[str, Any]], str]] = [
    ("steps_per_epoch without a sampling scheduler", lambda: _trainer(steps_per_epoch=5), r"steps_per_epoch is set but batch_scheduler is 'ShuffledScheduler'.*use a sampling scheduler or drop steps_per_epoch"),
    ("fp16 on the CPU", lambda: _trainer(amp="fp16"), r"amp: 'fp16' needs a CUDA device .* use amp='bf16'"),
    ("freeze of no module", lambda: _trainer(freeze=["trunc"]), r"freeze"),
    ("dselect_k k > n_experts", lambda: _mmoe(y0_gate={"kind": "dselect_k", "k": 5}), r"modules.y0_gate: gate: k=5 selectors for n_experts=4 experts: .*set k: 4 or fewer"),
    ("gate n_experts", lambda: _mmoe(y0_gate={"n_experts": 3}), r"gate has n_experts=3 but its expert stacks hold 4 experts .*set n_experts: 4.*\nmtlgraph: raised by operation 'y0_gate' \(module 'y0_gate'\)"),
    ("gate in_dim", lambda: _mmoe(y1_gate={"in_dim": 6}), r"(gate has in_dim=6|mat1 and mat2)"),
    ("cross-stitch dim", lambda: _stitch(stitch_2={"dim": 5}), r"cross_stitch has dim=5 but its columns have 4 features .*set dim: 4 .*\nmtlgraph: raised by operation 'stitch_2' \(module 'stitch_2'\)"),
    ("cross-stitch n_columns", lambda: _stitch(stitch_1={"n_columns": 2}), r"cross_stitch has n_columns=2 but got 3 inputs .*set n_columns: 3.*\nmtlgraph: raised by operation 'stitch_1'"),
    ("cross-stitch column widths", lambda: _stitch(y0_column_2={"hidden": [5]}), r"cross_stitch mixes columns of one shape, got shapes \[\(2, 5\), \(2, 4\), \(2, 4\)\]; give the modules that feed it the same output width"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in SETUP_CASES], ids=[c[0] for c in SETUP_CASES])  # fmt: skip
def test_check_refuses_what_train_refuses_at_set_up(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    build: Callable[[], dict[str, Any]],
    message: str,
) -> None:
    cfg = build()
    cfg["runs_root"] = str(tmp_path / "runs")
    config = _yaml(tmp_path, cfg)
    errors = []
    for command in ("check", "train"):
        code, _, err = _run(capsys, command, config)
        assert code == 2, err
        assert re.search(message, err), err
        errors.append(err.split("\nmtlgraph: the run directory")[0])
    assert errors[0].replace("\n(run with --debug for the traceback)\n", "") in errors[1]
    assert not any((tmp_path / "runs").rglob("*.pt"))


def test_streams_need_a_sampling_scheduler_in_check_too(
    kinds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = {"type": "shards", "path": {"train": "shards/*.jsonl", "valid": "shards/p1.jsonl"}}
    cfg = _config(kinds, source)
    code, _, err = _run(capsys, "check", _yaml(kinds, cfg, "stream.yaml"))
    assert code == 2
    assert "training dataset 'd' is a stream of unknown length; use a sampling batch_scheduler" in err  # fmt: skip
    cfg["trainer"]["batch_scheduler"] = "uniform"
    code, _, err = _run(capsys, "check", _yaml(kinds, cfg, "stream.yaml"))
    assert code == 2
    assert "steps_per_epoch: required with stream 'd' (training dataset of unknown length); set trainer steps_per_epoch: N" in err  # fmt: skip


def test_trainer_check_leaves_the_model_as_found() -> None:
    torch.manual_seed(0)
    trunk, head = torch.nn.Linear(2, 4), torch.nn.Linear(4, 2)
    task = Task(
        "t",
        {"trunk": trunk, "head": head},
        [Operation("trunk", [("_input_", "x")]), Operation("head", ["trunk"])],
    )
    model = MultitaskClassifier([task])
    x, y = torch.randn(16, 2), torch.randint(0, 2, (16,))
    loader = DictDataLoader(DictDataset("d", "train", {"x": x}, {"t": y}), batch_size=4)
    state = torch.random.get_rng_state()
    Trainer(freeze=["trunk"], progress_bar=False).check(model, [loader])
    assert all(p.requires_grad for p in model.parameters())  # frozen by set-up, then given back
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ConfigError, match="steps_per_epoch is set but batch_scheduler"):
        Trainer(steps_per_epoch=2).check(model, [loader])


# ---------------------------------------------------------------- files that say the wrong thing


def _quote_open(tmp: Path) -> None:
    lines = [f"{a},{b},{y},{z}" for a, b, y, z in _rows(10)]
    lines[4] = '0.1,"0.2,1,0'
    _csv(tmp / "t.csv", lines)


def _quote_paired(tmp: Path) -> None:
    lines = [f"{a},{b},{y},{z}" for a, b, y, z in _rows(10)]
    lines[2], lines[6] = '0.1,"0.2,1,0', '0.3,0.4",1,0'
    _csv(tmp / "t.csv", lines)


def _quote_short(tmp: Path) -> None:
    lines = [f"{a},{b},{y},{z}" for a, b, y, z in _rows(10)]
    lines[2], lines[6] = '0.1,"0.2,1,0', '0.3,0.4",1'
    _csv(tmp / "t.csv", lines)


def _quote_then_text(tmp: Path) -> None:
    _csv(tmp / "t.csv", ["0.1,0.2,1,0", '0.1,"0.2"5,1,0', "0.3,0.4,0,1"])


def _label(value: str) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        lines = [f"{a},{b},{y},{z}" for a, b, y, z in _rows(10)]
        lines[5] = f"0.1,0.2,{value},0"
        _csv(tmp / "t.csv", lines)

    return write


def _npy_dir(**arrays: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        (tmp / "npy").mkdir()
        base: dict[str, Any] = {
            "x": np.zeros((N, 2), np.float32),
            "y": np.arange(N) % 2,
            "z": np.arange(N) % 2,
        }
        for name, value in {**base, **arrays}.items():
            path = tmp / "npy" / f"{name}.npy"
            if isinstance(value, bytes):
                path.write_bytes(value)
            else:
                np.save(path, value, allow_pickle=True)

    return write


def _npz(**arrays: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        base = {"x": np.zeros((N, 2), np.float32), "y": np.arange(N) % 2, "z": np.arange(N) % 2}
        np.savez(tmp / "t.npz", **{**base, **arrays})

    return write


def _text(name: str, content: str | bytes) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        path = tmp / name
        path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return write


def _empty_parquet_rows(tmp: Path) -> None:
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({c: np.zeros(0) for c in "abyz"}).to_parquet(tmp / "t.parquet")


def _split_cells(tmp: Path, empty: str = "") -> None:
    lines = [
        f"{a},{b},{y},{z},{'train' if i % 5 else 'valid'}" for i, (a, b, y, z) in enumerate(_rows())
    ]
    lines[8] = "0.1,0.2,1,0," + empty
    _csv(tmp / "t.csv", lines, header="a,b,y,z,split")


def _null_split(tmp: Path) -> None:
    rows = [dict(zip("abyz", r, strict=True), split="train") for r in _rows()]
    rows[3]["split"] = None
    (tmp / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


CSV = {"type": "table", "path": "t.csv"}
NPY = ({"type": "npy", "path": "npy"}, {"xy": "x"})
NPZ = ({"type": "table", "path": "t.npz"}, {"xy": "x"})
NUMBERS = r"an input field is float32 \(features\) or int64 \(ids, e.g. for an embedding\): save it cast, x.astype\(np.float32\) for features or x.astype\(np.int64\) for ids"
FILE_CASES: list[tuple[str, Callable[[Path], None], dict[str, Any], Any, str]] = [
    ("csv quote never closed", _quote_open, CSV, None, r"data.datasets.d.source.path: '.*t.csv' line 6: a quote \(\"\) opened in this row is never closed, so the row runs to the end of the file \(line 11\); close it, or double a quote inside a quoted cell"),
    ("csv quote closed lines later", _quote_paired, CSV, None, r"data.datasets.d.fields.xy: '.*t.csv' line 4, column 'b': '0.2,1,0\\n.*\.\.\.' is not a number: the cell runs over 5 lines inside quotes, so a quote \(\"\) opened in it is probably unbalanced"),
    ("csv quote pairing a short row", _quote_short, CSV, None, r"'.*t.csv' line 4, column 'z': 3 cells, but the header names 4 columns; every row needs one cell per column; the row runs from line 4 to line 8 inside quotes: a quote \(\"\) opened on line 4 is probably unbalanced"),
    ("csv text after a closing quote", _quote_then_text, CSV, None, r"'.*t.csv' line 3: text follows a closing quote \(\"\) in a cell; quote the whole cell"),
    ("class label 1e20", _label("1e20"), CSV, None, r"data.datasets.d.labels.circle_task: '.*t.csv' line 7, column 'y': 1e\+20 is not a class id \(class ids count from 0 to the number of classes - 1\); fix the label, or set task_type: regression"),
    ("class label -1e20", _label("-1e20"), CSV, None, r"line 7, column 'y': -1e\+20 is not a class id"),
    ("class label 3e9", _label("3000000000"), CSV, None, r"line 7, column 'y': 3e\+09 is not a class id"),
    ("class label 1e20 in an npz", _npz(y=np.where(np.arange(N) == 3, 1e20, 1.0)), *NPZ, r"data.datasets.d.labels.circle_task: '.*t.npz' row 4, column 'y': 1e\+20 is not a class id"),
    ("text file named .npy", _npy_dir(x=b"x,y\n1,2\n"), *NPY, r"data.datasets.d.source.path: '.*npy/x.npy' is not a .npy file \(it starts with the text 'x,y\\n1,2\\n'; a .npy file starts with \\x93NUMPY\); save arrays with numpy.save"),
    ("empty .npy", _npy_dir(y=b""), *NPY, r"'.*npy/y.npy' is not a .npy file \(it is empty: 0 bytes;"),
    ("binary junk named .npy", _npy_dir(z=b"\x00\xff\x10junk"), *NPY, r"'.*npy/z.npy' is not a .npy file \(it starts with bytes b'\\x00\\xff\\x10junk'"),
    ("object array .npy", _npy_dir(z=np.array([{"a": 1}] * N, dtype=object)), *NPY, r"'.*npy/z.npy': an array of Python objects \(dtype object\), which is never unpickled; save numbers"),
    ("0-d .npy", _npy_dir(x=np.float32(3.0)), *NPY, r"data.datasets.d.source.path: '.*npy/x.npy': a 0-d array \(one value, shape \(\)\); a column needs a value per row: save an array of shape \(N,\) or \(N, k\)"),
    ("0-d array in an npz", _npz(y=np.int64(1)), *NPZ, r"'.*t.npz', column 'y': a 0-d array \(one value, shape \(\)\)"),
    ("npz that is a text file", _text("t.npz", "x,y\n1,2\n"), *NPZ, r"data.datasets.d.source.path: '.*t.npz' is not a .npz file \(it starts with the text 'x,y\\n1,2\\n'\); save arrays with numpy.savez"),
    ("int8 .npy features", _npy_dir(x=np.ones((N, 2), np.int8)), *NPY, r"data.datasets.d.fields.xy: directory '.*npy', column 'x': the array is int8; " + NUMBERS),
    ("uint8 npz features", _npz(x=np.ones((N, 2), np.uint8)), *NPZ, r"data.datasets.d.fields.xy: '.*t.npz', column 'x': the array is uint8; " + NUMBERS),
    ("int16 npz features", _npz(x=np.ones((N, 2), np.int16)), *NPZ, r"column 'x': the array is int16; "),
    ("bool npz features", _npz(x=np.ones((N, 2), bool)), *NPZ, r"column 'x': the array is bool; "),
    ("0-byte Parquet table", _text("t.parquet", b""), {"type": "table", "path": "t.parquet"}, None, r"data.datasets.d.source.path: '.*t.parquet' is empty \(0 bytes\), not a Parquet file; write it again"),
    ("0-row Parquet table", _empty_parquet_rows, {"type": "table", "path": "t.parquet"}, None, r"data.datasets.d.source.path: '.*t.parquet' has no rows; a dataset needs at least one row per split"),
    ("header-only CSV", _text("t.csv", "a,b,y,z\n"), CSV, None, r"data.datasets.d.source.path: '.*t.csv' has no rows \(only a header\); a dataset needs at least one row per split"),
    ("header-only CSV per split", _text("t.csv", "a,b,y,z\n"), {"type": "table", "path": {"train": "t.csv"}}, None, r"data.datasets.d.source.path.train: '.*t.csv' has no rows \(only a header\)"),
    ("0-row npz", _npz(x=np.zeros((0, 2), np.float32), y=np.zeros(0), z=np.zeros(0)), *NPZ, r"'.*t.npz' has no rows; a dataset needs"),
    ("a split with no rows", _text("t.csv", "a,b,y,z\n0.1,0.2,1,0\n0.3,0.4,0,1\n"), CSV, None, r"data.datasets.d: split 'valid' of '.*t.csv' has no rows; give it rows \(more rows, other fractions or split_column values\), or leave it out \(the dataset's splits: \[...\]\)"),
    ("empty CSV", _text("t.csv", ""), CSV, None, r"'.*t.csv' is empty; its first line must name the columns"),
    ("empty JSON Lines", _text("t.jsonl", ""), {"type": "table", "path": "t.jsonl"}, None, r"data.datasets.d.source.path: '.*t.jsonl' is empty; write one JSON object per line"),
    ("empty split cell", _split_cells, {"type": "table", "path": "t.csv", "split_column": "split"}, None, r"data.datasets.d.source.split_column: '.*t.csv' line 10, column 'split': an empty split name; every row needs its split \(e.g. train, valid, test\): fill the cell, or remove the row"),
    ("blank split cell", lambda t: _split_cells(t, "  "), {"type": "table", "path": "t.csv", "split_column": "split"}, None, r"'.*t.csv' line 10, column 'split': an empty split name"),
    ("null split in JSON Lines", _null_split, {"type": "table", "path": "t.jsonl", "split_column": "split"}, None, r"'.*t.jsonl' line 4, column 'split': an empty split name"),
]  # fmt: skip


@pytest.mark.parametrize(("write", "source", "fields", "message"), [c[1:] for c in FILE_CASES], ids=[c[0] for c in FILE_CASES])  # fmt: skip
def test_bad_files_exit_2_naming_file_place_and_fix(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    write: Callable[[Path], None],
    source: dict[str, Any],
    fields: Any,
    message: str,
) -> None:
    write(tmp_path)
    code, _, err = _run(capsys, "check", _yaml(tmp_path, _config(tmp_path, source, fields)))
    assert code == 2, err
    assert err.startswith("mtlgraph: error: ")
    assert re.search(message, err), err


def test_bad_file_in_train_leaves_no_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _label("1e20")(tmp_path)
    code, _, err = _run(capsys, "train", _yaml(tmp_path, _config(tmp_path, CSV)))
    assert code == 2 and "line 7, column 'y': 1e+20 is not a class id" in err
    assert not any((tmp_path / "runs").rglob("*.pt"))


def test_json_booleans_are_one_and_zero_with_or_without_missing_labels(tmp_path: Path) -> None:
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import parse_config

    rows = [{"a": 0.1 * i, "b": 0.2, "y": i % 3 == 0, "z": None if i == 4 else i % 2 == 0} for i in range(N)]  # fmt: skip
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = parse_config(_config(tmp_path, {"type": "table", "path": "t.jsonl"}), base_dir=tmp_path)
    train = build_experiment(cfg).datasets[0]
    assert train.Y_dict["circle_task"][:4].tolist() == [1, 0, 0, 1]
    assert train.Y_dict["square_task"][:6].tolist() == [1, 0, 1, 0, -1, 0]


def test_large_whole_numbers_stay_regression_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _label("3000000000")(tmp_path)
    cfg = _config(tmp_path, CSV)
    cfg["tasks"]["circle_task"]["task_type"] = "regression"
    cfg["modules"]["circle_head"]["out_features"] = 1
    code, out, err = _run(capsys, "check", _yaml(tmp_path, cfg))
    assert code == 0, err
    assert ": valid" in out


SHARD_CASES = [
    ("a shard without a column", "p1.csv", "a,c,y,z\n0.1,0.2,1,0\n", r"data.datasets.d.source.path: '.*p1.csv' has no column 'b'; it has 'a', 'c', 'y', 'z'"),
    ("an empty CSV shard", "p1.csv", "", r"data.datasets.d.source.path: '.*p1.csv' is empty; its first line must name the columns"),
    ("a shard of bad JSON", "p1.jsonl", '{"a": 0.1, "b": \n', r"data.datasets.d.source.path: '.*p1.jsonl' line 1: not valid JSON \(.*\); write one object per line"),
    ("an empty JSON Lines shard", "p1.jsonl", "", r"data.datasets.d.source.path: '.*p1.jsonl' is empty; write one JSON object per line"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "content", "message"), [c[1:] for c in SHARD_CASES], ids=[c[0] for c in SHARD_CASES])  # fmt: skip
def test_bad_shards_are_found_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, content: str, message: str
) -> None:
    (tmp_path / "shards").mkdir()
    _csv(tmp_path / "shards" / "p0.csv")
    (tmp_path / "shards" / name).write_text(content)
    cfg = _config(tmp_path, {"type": "shards", "path": ["shards/p0.csv", f"shards/{name}"]})
    cfg["trainer"].update(SAMPLING, eval_splits=[])
    for command in ("check", "train"):
        code, _, err = _run(capsys, command, _yaml(tmp_path, cfg))
        assert code == 2, err
        assert re.search(message, err), err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.pt"))


def test_empty_parquet_shard(kinds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "p0.parquet").write_bytes((kinds / "shards" / "p0.parquet").read_bytes())
    (tmp_path / "shards" / "p1.parquet").write_bytes(b"")
    cfg = _config(tmp_path, {"type": "shards", "path": "shards/*.parquet"})
    cfg["trainer"].update(SAMPLING, eval_splits=[])
    for command in ("check", "train"):
        code, _, err = _run(capsys, command, _yaml(tmp_path, cfg))
        assert code == 2, err
        assert re.search(r"data.datasets.d.source.path: '.*p1.parquet' is empty \(0 bytes\), not a Parquet file", err), err  # fmt: skip


# ---------------------------------------------------------------- soft labels, imports, --tasks


def _soft(tmp: Path, rows: np.ndarray) -> dict[str, Any]:
    x = np.random.default_rng(0).normal(size=(len(rows), 2)).astype(np.float32)
    np.savez(tmp / "soft.npz", x=x, y=rows, z=np.arange(len(rows)) % 2)
    cfg = _config(tmp, {"type": "table", "path": "soft.npz"}, {"xy": "x"})
    cfg["modules"]["circle_head"]["out_features"] = 7
    return cfg


def test_soft_labels_rounded_to_4_decimals_are_renormalised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config

    rows = np.random.default_rng(1).dirichlet(np.ones(7), size=N).round(4)
    rows[:4] = 0.1429  # 1/7 to 4 decimals: the row sums to 1.0003
    config = _yaml(tmp_path, _soft(tmp_path, rows))
    code, _, err = _run(capsys, "check", config)
    assert code == 0, err
    labels = build_experiment(load_config(config)).datasets[0].Y_dict["circle_task"]
    torch.testing.assert_close(labels.sum(1), torch.ones(len(labels)))
    torch.testing.assert_close(labels[0], torch.full((7,), 1 / 7))


def test_soft_labels_off_by_more_than_the_tolerance_say_how_to_normalise(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = np.full((N, 7), 1 / 7)
    rows[3] = 0.15
    code, _, err = _run(capsys, "check", _yaml(tmp_path, _soft(tmp_path, rows)))
    assert code == 2
    assert re.search(r"data.datasets.d.labels.circle_task: column 'y' of '.*soft.npz' \(train split\), task 'circle_task': soft label row 3 sums to 1.05, not 1 \(tolerance 0.001\): \[0.15, .*\]; normalise the rows: labels / labels.sum\(1, keepdims=True\)", err), err  # fmt: skip


IMPORT_CASES = [
    ("module.py", "mymod.py", r"imports\[0\]: 'mymod.py' is a file path; imports take module names, as Python's import does: write 'mymod'"),
    ("dir/module.py", "blocks/mymod.py", r"imports\[0\]: 'blocks/mymod.py' is a file path; .*write 'blocks.mymod' \(or list 'blocks' under import_paths and write 'mymod'\)"),
    ("absolute path", "/abs/my-mod.py", r"imports\[0\]: '/abs/my-mod.py' is a file path; imports take module names: put the file in the config file's directory \(or list its directory under import_paths\)"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "message"), [c[1:] for c in IMPORT_CASES], ids=[c[0] for c in IMPORT_CASES])  # fmt: skip
def test_imports_given_as_file_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, message: str
) -> None:
    cfg = tiny_config()
    cfg["imports"] = [name]
    code, _, err = _run(capsys, "check", _yaml(tmp_path, cfg))
    assert code == 2 and re.search(message, err), err
    assert re.search(r"c.yaml:\d+: imports\[0\]", err), err  # the config line


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("trained")
    cfg = tiny_config(n_epochs=1, run_dir=str(tmp / "run"))
    config = write_config(tmp / "tiny.yaml", cfg)
    assert main(["train", str(config), "--quiet"]) == 0
    np.savez(tmp / "new.npz", x=np.zeros((4, 2), np.float32))
    return config, tmp


@pytest.mark.parametrize("tasks", [",", "", " , ,"])
@pytest.mark.parametrize("command", ["predict", "export"])
def test_tasks_naming_no_task(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str], tasks: str, command: str
) -> None:
    config, tmp = trained
    where = ["--data", str(tmp / "new.npz")] if command == "predict" else []
    out = str(tmp / ("p.jsonl" if command == "predict" else "m.pt2"))
    run = str(tmp / "run")
    code, _, err = _run(capsys, command, str(config), "--checkpoint", run, *where, "--tasks", tasks, "--out", out)  # fmt: skip
    assert code == 2, err
    assert f"--tasks {tasks!r} names no task; give comma-separated task names (the model has circle_task, square_task), or leave --tasks out for every task" in err  # fmt: skip
    assert not Path(out).exists()


# ---------------------------------------------------------------- faults while reading


def test_worker_errors_are_the_original_message(
    kinds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "shards").mkdir()
    good = (kinds / "shards" / "p0.jsonl").read_text()
    (tmp_path / "shards" / "p0.jsonl").write_text(good)
    (tmp_path / "shards" / "p1.jsonl").write_text(good + '{"a": 0.1, "b": "zz", "y": 1, "z": 0}\n')
    source = {"type": "shards", "path": {"train": "shards/*.jsonl", "valid": "shards/p0.jsonl"}}
    cfg = _config(tmp_path, source, num_workers=1)
    cfg["trainer"].update(batch_scheduler="uniform", steps_per_epoch=8)
    code, _, err = _run(capsys, "train", _yaml(tmp_path, cfg))
    assert code == 2
    assert "Original Traceback" not in err and "DataLoader worker" not in err
    assert re.search(r"mtlgraph: error: cannot read shard '.*p1.jsonl':\n  - fields.xy: '.*p1.jsonl' line 21, column 'b': 'zz' is not a number", err), err  # fmt: skip


def test_worker_error_of_an_image_is_the_original_message(
    kinds: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "img").mkdir()
    for f in (kinds / "img").iterdir():
        (tmp_path / "img" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "img" / "5.png").write_bytes(b"not a png")
    (tmp_path / "images.csv").write_bytes((kinds / "images.csv").read_bytes())
    source = {"type": "images", "path": "images.csv", "images": IMAGES}
    cfg = _config(tmp_path, source, {"img": "file", "xy": ["a", "b"]}, num_workers=1)
    code, _, err = _run(capsys, "train", _yaml(tmp_path, cfg))
    assert code == 2
    assert "Original Traceback" not in err and "DataLoader worker" not in err
    assert re.search(r"mtlgraph: error: row 6: cannot decode image '.*5.png'", err), err


def test_worker_data_error_keeps_its_problems() -> None:
    text = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
        'call last):\n  File "x.py", line 1, in f\n    raise DataError(...)\n'
        "mtlgraph.exceptions.DataError: cannot read 'a.csv':\n  - line 2: bad\n  - line 3: worse\n"
    )
    error = DataError(text)
    assert error.header == "cannot read 'a.csv':" and error.problems == ["line 2: bad", "line 3: worse"]  # fmt: skip
    assert DataError("a plain message").problems == ["a plain message"]


class _Items(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """A map-style dataset of ``(x_dict, y_dict)`` items, without ``batch()``."""

    def __init__(self, x: torch.Tensor, labels: dict[str, torch.Tensor]) -> None:
        self.x, self.labels = x, labels

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {"x": self.x[i]}, {t: y[i] for t, y in self.labels.items()}


class _Stream(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    def __init__(self, items: _Items) -> None:
        self.items = items

    def __iter__(self) -> Any:
        return (self.items[i] for i in range(len(self.items)))


@pytest.mark.parametrize("kind", ["map-style", "stream"])
def test_diagnostics_on_named_datasets_from_python(kind: str) -> None:
    torch.manual_seed(0)
    trunk = torch.nn.Linear(2, 4)
    tasks = [
        Task(t, {"trunk": trunk, f"{t}_head": torch.nn.Linear(4, 2)},
             [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])])
        for t in ("a", "b")
    ]  # fmt: skip
    x = torch.randn(32, 2)
    items = _Items(x, {"a": (x[:, 0] > 0).long(), "b": (x[:, 1] > 0).long()})
    source: Any = items if kind == "map-style" else _Stream(items)
    data = NamedDataset("d", "train", source, labels=["a", "b"])
    settings: dict[str, Any] = {"batch_scheduler": "uniform", "steps_per_epoch": 4} if kind == "stream" else {}  # fmt: skip
    trainer = Trainer(n_epochs=1, progress_bar=False, diagnostics={"every": 2}, **settings)
    trainer.fit(MultitaskClassifier(tasks), [DictDataLoader(data, batch_size=8)])
    report = trainer.diagnostics
    assert report is not None and report.probes == 2 and report.tasks == ("a", "b")


class _TruncateAfterEpoch(Hook):
    def __init__(self, path: Path, size: int) -> None:
        self.path, self.size = path, size

    def on_epoch_end(self, run: Any) -> None:
        os.truncate(self.path, self.size)


@pytest.mark.parametrize("budget", [None, 16], ids=["small map (numpy indexing)", "large map (preadv)"])  # fmt: skip
@pytest.mark.parametrize("workers", [0, 1])
def test_map_truncated_between_epochs_is_a_data_error(
    tmp_path: Path, budget: int | None, workers: int
) -> None:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32))
    x = np.load(path, mmap_mode="r")
    ds = DictDataset("d", "train", {"x": x}, {"t": torch.arange(64) % 2})
    if budget is not None:
        ds._reader = MapReader(budget=budget)
    task = Task("t", {"m": torch.nn.Linear(2, 2)}, [Operation("m", [("_input_", "x")])])
    loader = DictDataLoader(ds, batch_size=16, shuffle=True, num_workers=workers)
    trainer = Trainer(n_epochs=3, progress_bar=False, hooks=[_TruncateAfterEpoch(path, 400)])
    with pytest.raises(DataError, match=r"'.*x.npy' (is 400 bytes, but its memory map needs 640: the file was truncated or replaced while it was read \(rows from 34 on are gone\)|ended before row \d+: the file was truncated or replaced)") as info:  # fmt: skip
        trainer.fit(MultitaskClassifier([task]), [loader])
    assert "Original Traceback" not in str(info.value)
    assert trainer.global_step == 4  # the first epoch ran; the second stopped at its first read
