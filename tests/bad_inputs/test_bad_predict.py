"""Bad inputs and faults against ``mtlgraph predict`` / ``export`` / ``evaluate``: non-finite
rows (an error, or null and flagged with ``--allow-missing``), edited vocabularies, images of
other bit depths, sizes and bombs, signals (SIGTERM, SIGINT, SIGKILL) and full disks. Every CLI
case asserts the exit status docs/cli.md promises and the message."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from experiment_helpers import cli_env, tiny_config, write_config

from mtlgraph.experiment.cli import main
from mtlgraph.experiment.sources import VOCAB_DIR
from mtlgraph.inference.predictions import read_predictions

pytest.importorskip("pyarrow")

SLOW_HEAD = """
import os
import time

import torch


class SlowLinear(torch.nn.Linear):
    \"\"\"A linear head that sleeps in forward when MTLGRAPH_TEST_SLOW is set.\"\"\"

    def forward(self, x):
        if os.environ.get("MTLGRAPH_TEST_SLOW"):
            time.sleep(0.05)
        return super().forward(x)
"""


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main([*args, "--quiet"])
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny two-task config (its circle head sleeps when told to) and a trained run."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "slow_head.py").write_text(SLOW_HEAD)
    cfg = tiny_config(n_epochs=1)
    cfg["imports"] = ["slow_head"]
    cfg["modules"]["circle_head"]["type"] = "slow_head.SlowLinear"
    config = write_config(root / "tiny.yaml", cfg)
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={root / 'run'}"]) == 0
    return config, root / "run"


# ---------------------------------------------------------------- non-finite inputs


def _npy(path: Path, rows: list[list[float]]) -> Path:
    np.save(path, np.asarray(rows, dtype=np.float32))
    return path


def _npz(path: Path, rows: list[list[float]]) -> Path:
    np.savez(path, xy=np.asarray(rows, dtype=np.float32))
    return path


def _npy_dir(path: Path, rows: list[list[float]]) -> Path:
    path.mkdir()
    np.save(path / "xy.npy", np.asarray(rows, dtype=np.float32))
    return path


def _parquet(path: Path, rows: list[list[float]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"xy": [list(map(float, r)) for r in rows]}), path)
    return path


def _text(content: str) -> Callable[[Path], Path]:
    def write(path: Path) -> Path:
        path.write_text(content)
        return path

    return write


NAN, INF = float("nan"), float("inf")
# (id, file name, writer, message without --allow-missing, reason with it, bad rows)
NONFINITE: list[tuple[str, str, Callable[[Path], Path], str, str, list[int]]] = [
    (
        "csv-nan",
        "n.csv",
        _text('xy\n"[0.1, 0.2]"\n"[NaN, 0.2]"\n'),
        "line 3, column 'xy'",
        "NaN",
        [1],
    ),
    (
        "csv-inf",
        "n.csv",
        _text('xy\n"[Infinity, 0.2]"\n"[0, 1]"\n'),
        "line 2, column 'xy'",
        "inf",
        [0],
    ),
    (
        "csv-minus-inf",
        "n.csv",
        _text('xy\n"[0, 1]"\n"[-Infinity, 1]"\n'),
        "line 3, column 'xy'",
        "-inf",
        [1],
    ),
    (
        "jsonl-nan",
        "n.jsonl",
        _text('{"xy": [0.1, 0.2]}\n{"xy": [NaN, 0.2]}\n'),
        "line 2, column 'xy'",
        "NaN",
        [1],
    ),
    (
        "jsonl-inf",
        "n.jsonl",
        _text('{"xy": [Infinity, 0.2]}\n{"xy": [1, 2]}\n'),
        "line 1, column 'xy'",
        "inf",
        [0],
    ),
    (
        "jsonl-minus-inf",
        "n.jsonl",
        _text('{"xy": [1, 2]}\n{"xy": [1, -Infinity]}\n'),
        "line 2, column 'xy'",
        "-inf",
        [1],
    ),
    (
        "npy-nan",
        "n.npy",
        lambda p: _npy(p, [[0, 1], [NAN, 1], [2, 2]]),
        "row 2, column 'n'",
        "NaN",
        [1],
    ),
    (
        "npy-inf",
        "n.npy",
        lambda p: _npy(p, [[INF, 1], [0, 1]]),
        "row 1, column 'n'",
        "inf",
        [0],
    ),
    (
        "npz-nan",
        "n.npz",
        lambda p: _npz(p, [[0, 1], [1, NAN]]),
        "row 2, column 'xy'",
        "NaN",
        [1],
    ),
    (
        "npy-dir-nan",
        "arrays",
        lambda p: _npy_dir(p, [[NAN, NAN], [0, 1], [1, 1]]),
        "row 1, column 'xy'",
        "NaN",
        [0],
    ),
    (
        "parquet-nan",
        "n.parquet",
        lambda p: _parquet(p, [[0, 1], [NAN, 0]]),
        "row 2, column 'xy'",
        "NaN",
        [1],
    ),
    (
        "parquet-inf",
        "n.parquet",
        lambda p: _parquet(p, [[0, INF], [0, 0], [1, 1]]),
        "row 1, column 'xy'",
        "inf",
        [0],
    ),
]


@pytest.mark.parametrize(
    ("name", "write", "message"),
    [c[1:4] for c in NONFINITE],
    ids=[c[0] for c in NONFINITE],
)
def test_a_nonfinite_input_exits_2_naming_row_and_field(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    write: Callable[[Path], Path],
    message: str,
) -> None:
    config, run = tiny
    data, out = write(tmp_path / name), tmp_path / "p.jsonl"
    code, err = _cli(
        capsys, "predict", str(config), "--checkpoint", str(run), "--data", str(data),
        "--out", str(out),
    )  # fmt: skip
    assert code == 2
    assert message in err and "not a finite number" in err
    assert not out.exists() and not list(tmp_path.glob(".p.jsonl.*"))


@pytest.mark.parametrize(
    ("name", "write", "reason", "bad"),
    [(c[1], c[2], c[4], c[5]) for c in NONFINITE],
    ids=[c[0] for c in NONFINITE],
)
def test_allow_missing_writes_null_flagged_rows_never_a_class(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    write: Callable[[Path], Path],
    reason: str,
    bad: list[int],
) -> None:
    _check_allow_missing(tiny, tmp_path, capsys, write(tmp_path / name), ".jsonl", reason, bad)


@pytest.mark.parametrize("out_suffix", [".csv", ".parquet"])
def test_allow_missing_in_every_output_format(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], out_suffix: str
) -> None:
    data = _npy(tmp_path / "n.npy", [[0, 1], [NAN, 1], [2, 2], [1, INF]])
    _check_allow_missing(tiny, tmp_path, capsys, data, out_suffix, "NaN", [1])


def _check_allow_missing(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    data: Path,
    out_suffix: str,
    reason: str,
    bad: list[int],
) -> None:
    config, run = tiny
    out = tmp_path / f"p{out_suffix}"
    code, err = _cli(
        capsys, "predict", str(config), "--checkpoint", str(run), "--data", str(data),
        "--out", str(out), "--allow-missing",
    )  # fmt: skip
    assert code == 0, err
    for i, row in enumerate(_rows(out)):
        flagged = i in bad or (out_suffix != ".jsonl" and i == 3)
        why = "inf" if i == 3 and out_suffix != ".jsonl" else reason
        assert row["missing"] == (f"input field 'xy' is {why}" if flagged else None)
        values = [v for k, v in row.items() if k not in ("id", "missing")]
        assert all(v is None for v in values) if flagged else all(v is not None for v in values)


def _rows(out: Path) -> list[dict[str, Any]]:
    """A prediction file's rows (empty CSV cells as None)."""
    if out.suffix == ".jsonl":
        return read_predictions(out)
    if out.suffix == ".parquet":
        import pyarrow.parquet as pq

        return list(pq.read_table(out).to_pylist())
    import csv

    with open(out, newline="") as fh:
        return [{k: v if v != "" else None for k, v in r.items()} for r in csv.DictReader(fh)]


def test_an_empty_cell_of_a_multi_column_field(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = tiny
    cfg = tiny_config(n_epochs=1)
    cfg["imports"] = ["slow_head"]
    cfg["modules"]["circle_head"]["type"] = "slow_head.SlowLinear"
    cfg["data"]["datasets"]["circles"]["fields"]["xy"] = ["a", "b"]
    two = write_config(config.parent / "two_columns.yaml", cfg)
    data, out = tmp_path / "n.csv", tmp_path / "p.jsonl"
    data.write_text("a,b\n0.1,0.2\n,0.5\n")
    args = ["predict", str(two), "--checkpoint", str(run), "--data", str(data), "--out", str(out)]
    code, err = _cli(capsys, *args)
    assert code == 2 and "line 3, column 'a': '' is not a finite number" in err
    code, err = _cli(capsys, *args, "--allow-missing")
    assert code == 0, err
    assert [r["missing"] for r in read_predictions(out)] == [None, "input field 'xy' is NaN"]


def test_write_predictions_refuses_a_nonfinite_batch_naming_row_id_and_field(
    tmp_path: Path,
) -> None:
    import torch
    from corpus_helpers import tiny_model

    from mtlgraph import DataError
    from mtlgraph.inference import write_predictions

    model = tiny_model()
    x = torch.tensor([[0.0, 1.0], [1.0, 1.0], [torch.nan, 0.0]])
    batches = [({"x": x[:2], "name": ["a", "b"]}, {}), ({"x": x[2:], "name": ["c"]}, {})]
    with pytest.raises(DataError, match=r"row 3 \(id 'c'\), input field 'x': NaN.*--allow-missing"):
        write_predictions(model, batches, tmp_path / "p.jsonl", id_field="name")
    assert not (tmp_path / "p.jsonl").exists()
    n = write_predictions(model, batches, tmp_path / "p.jsonl", id_field="name", allow_missing=True)
    rows = read_predictions(tmp_path / "p.jsonl")
    assert n == 3 and [r["missing"] for r in rows] == [None, None, "input field 'x' is NaN"]
    assert rows[2]["t/pred"] is None and rows[2]["t/probs"] is None
    assert rows[0]["t/pred"] is not None


# ---------------------------------------------------------------- vocabularies


def _reviews_config(vocab_size: int = 20) -> dict[str, Any]:
    return {
        "modules": {
            "bag": {"type": "embedding_bag", "num_embeddings": 20, "embedding_dim": 4},
            "head": {"type": "linear", "in_features": 4, "out_features": 2},
        },
        "tasks": {
            "sentiment": {
                "ops": [
                    {"module": "bag", "inputs": [["_input_", "text"]]},
                    {"module": "head", "inputs": ["bag"]},
                ]
            }
        },
        "data": {
            "batch_size": 8,
            "datasets": {
                "reviews": {
                    "source": {
                        "type": "table",
                        "path": "reviews.csv",
                        "split_column": "split",
                        "text": {"text": {"vocab_size": vocab_size, "max_length": 8}},
                    },
                    "fields": {"text": "text"},
                    "labels": {"sentiment": "label"},
                }
            },
        },
        "trainer": {"n_epochs": 1, "progress_bar": False},
    }


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reviews")
    lines = ["text,label,split"]
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    for i in range(24):
        label = i % 2
        lines.append(f"{words[3 * label + i % 3]} {words[3 * label]},{label},{'train' if i < 20 else 'valid'}")  # fmt: skip
    (root / "reviews.csv").write_text("\n".join(lines) + "\n")
    config = write_config(root / "reviews.yaml", _reviews_config())
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={root / 'run'}"]) == 0
    return config, root / "run"


def _swap_first_two_words(data: dict[str, Any]) -> None:
    data["tokens"][2], data["tokens"][3] = data["tokens"][3], data["tokens"][2]


def _longer(data: dict[str, Any]) -> None:
    data["max_length"] = 64


def _uppercase(data: dict[str, Any]) -> None:
    data["lowercase"] = False


def _one_more_word(data: dict[str, Any]) -> None:
    data["tokens"].append("brilliant")


VOCAB_EDITS = [
    ("swapped-words", _swap_first_two_words),
    ("max-length", _longer),
    ("lowercase", _uppercase),
    ("added-word", _one_more_word),
]


@pytest.mark.parametrize("edit", [e[1] for e in VOCAB_EDITS], ids=[e[0] for e in VOCAB_EDITS])
def test_an_edited_vocabulary_is_refused_naming_the_file_and_the_fix(
    reviews: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    edit: Callable[[dict[str, Any]], None],
) -> None:
    config, run = reviews
    edited = tmp_path / "run"
    shutil.copytree(run, edited)
    file = edited / VOCAB_DIR / "reviews.text.json"
    data = json.loads(file.read_text())
    edit(data)
    file.write_text(json.dumps(data))
    new, out = tmp_path / "new.csv", tmp_path / "p.jsonl"
    new.write_text("text\ngood fine\nawful\n")
    for data_arg in (str(new), "reviews:valid"):
        code, err = _cli(
            capsys, "predict", str(config), "--checkpoint", str(edited), "--data", data_arg,
            "--out", str(out),
        )  # fmt: skip
        assert code == 2, err
        assert f"the vocabulary '{file}' has fingerprint" in err and "Restore the file" in err
        assert not out.exists()
    program = tmp_path / "m.pt2"  # nor is it embedded in an export
    code, err = _cli(
        capsys, "export", str(config), "--checkpoint", str(edited), "--out", str(program)
    )
    assert code == 2 and f"the vocabulary '{file}' has fingerprint" in err
    assert not program.exists()


def test_a_corrupt_vocabulary_file_exits_2_naming_it(
    reviews: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = reviews
    edited = tmp_path / "run"
    shutil.copytree(run, edited)
    file = edited / VOCAB_DIR / "reviews.text.json"
    file.write_text('{"tokens": ["<pad>"')
    new = tmp_path / "new.csv"
    new.write_text("text\ngood\n")
    code, err = _cli(
        capsys, "predict", str(config), "--checkpoint", str(edited), "--data", str(new),
        "--out", str(tmp_path / "p.jsonl"),
    )  # fmt: skip
    assert code == 2 and f"cannot read the vocabulary '{file}'" in err


def test_evaluate_refuses_a_vocabulary_that_changed_since_training(
    reviews: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = reviews
    smaller = write_config(config.parent / "smaller.yaml", _reviews_config(vocab_size=5))
    code, err = _cli(capsys, "evaluate", str(smaller), "--checkpoint", str(run))
    assert code == 2
    assert "vocabulary 'reviews.text': this config builds" in err
    assert "the training data or the tokenizer settings changed since training" in err
    code, err = _cli(
        capsys, "evaluate", str(config), "--checkpoint", str(run),
        "--output", str(tmp_path / "s.json"),
    )  # fmt: skip
    assert code == 0, err


# ---------------------------------------------------------------- images


def _images_config(resize: list[int] | None = (4, 4)) -> dict[str, Any]:  # type: ignore[assignment]
    images: dict[str, Any] = {"folder": "img", "mode": "L"}
    if resize is not None:
        images["resize"] = list(resize)
    return {
        "modules": {
            "cnn": {"type": "conv2d_stack", "in_channels": 1, "channels": [2]},
            "head": {"type": "linear", "in_features": 2, "out_features": 2},
        },
        "tasks": {
            "digit_task": {
                "ops": [
                    {"module": "cnn", "inputs": [["_input_", "image"]]},
                    {"module": "head", "inputs": ["cnn"]},
                ]
            }
        },
        "data": {
            "batch_size": 4,
            "datasets": {
                "digits": {
                    "source": {
                        "type": "images",
                        "path": "digits.csv",
                        "fractions": {"train": 0.75, "test": 0.25},
                        "images": images,
                    },
                    "fields": {"image": "file"},
                    "labels": {"digit_task": "digit"},
                }
            },
        },
        "trainer": {"n_epochs": 1, "progress_bar": False},
    }


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from PIL import Image

    root = tmp_path_factory.mktemp("digits")
    (root / "img").mkdir()
    lines = ["file,digit"]
    for i in range(8):
        Image.fromarray(np.full((8, 8), 30 * i, dtype=np.uint8)).save(root / "img" / f"{i}.png")
        lines.append(f"{i}.png,{i % 2}")
    (root / "digits.csv").write_text("\n".join(lines) + "\n")
    write_config(root / "same_size.yaml", _images_config(resize=None))
    config = write_config(root / "digits.yaml", _images_config())
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={root / 'run'}"]) == 0
    return config, root / "run"


def _image(folder: Path, name: str, array: np.ndarray, mode: str | None = None) -> None:
    from PIL import Image

    folder.mkdir(exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array).convert(mode)
    image.save(folder / name)


def test_a_16_bit_png_is_scaled_by_65535_like_its_8_bit_twin(
    digits: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = digits
    grey = np.random.default_rng(0).integers(0, 256, (8, 8)).astype(np.uint8)
    _image(tmp_path / "new", "a8.png", grey)
    _image(tmp_path / "new", "b16.png", grey.astype(np.uint16) * 257)  # the same picture
    out = tmp_path / "p.jsonl"
    code, err = _cli(
        capsys, "predict", str(config), "--checkpoint", str(run), "--data",
        str(tmp_path / "new"), "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    a8, b16 = read_predictions(out)
    assert (a8["id"], b16["id"]) == ("a8.png", "b16.png")
    np.testing.assert_allclose(a8["digit_task/probs"], b16["digit_task/probs"], atol=1e-6)


def _bomb(folder: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    from PIL import Image

    _image(folder, "bomb.png", np.zeros((8, 8), dtype=np.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)  # 64 pixels: over it, or over twice it


IMAGE_CASES: list[tuple[str, Callable[[Path, pytest.MonkeyPatch], None], str]] = [
    (
        "int32-tiff",
        lambda d, m: _image(d, "x.tif", np.ones((8, 8), np.int32) * 70000),
        "has 32-bit integer pixels (Pillow mode 'I')",
    ),
    (
        "float-tiff",
        lambda d, m: _image(d, "x.tif", np.ones((8, 8), np.float32)),
        "has 32-bit float pixels (Pillow mode 'F')",
    ),
    (
        "bomb-warning",
        lambda d, m: _bomb(d, m, 40),
        "is refused as a possible decompression bomb",
    ),
    (
        "bomb-error",
        lambda d, m: _bomb(d, m, 20),
        "is refused as a possible decompression bomb",
    ),
    (
        "not-an-image",
        lambda d, m: (d.mkdir(), (d / "x.png").write_text("text")),
        "cannot decode image",
    ),
    (
        "truncated-png",
        lambda d, m: (
            _image(d, "y.png", np.ones((8, 8), np.uint8)),
            (d / "x.png").write_bytes((d / "y.png").read_bytes()[:40]),
        ),
        "cannot decode image",
    ),
    ("empty-folder", lambda d, m: d.mkdir(), "no image files"),
]


@pytest.mark.parametrize(("make", "expected"), [c[1:] for c in IMAGE_CASES], ids=[c[0] for c in IMAGE_CASES])  # fmt: skip
def test_a_bad_image_exits_2_naming_the_file(
    digits: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    make: Callable[[Path, pytest.MonkeyPatch], None],
    expected: str,
) -> None:
    config, run = digits
    folder = tmp_path / "new"
    make(folder, monkeypatch)
    out = tmp_path / "p.jsonl"
    code, err = _cli(
        capsys, "predict", str(config), "--checkpoint", str(run), "--data", str(folder),
        "--out", str(out),
    )  # fmt: skip
    assert code == 2, err
    assert expected in err and (expected == "no image files" or str(folder) in err)
    assert "Traceback" not in err and not out.exists()


def test_images_of_different_sizes_without_resize_name_the_file_and_the_key(
    digits: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = digits
    _image(tmp_path / "new", "a.png", np.zeros((8, 8), np.uint8))
    _image(tmp_path / "new", "b.png", np.zeros((6, 10), np.uint8))
    code, err = _cli(
        capsys, "predict", str(config.parent / "same_size.yaml"), "--checkpoint", str(run),
        "--data", str(tmp_path / "new"), "--out", str(tmp_path / "p.jsonl"),
    )  # fmt: skip
    assert code == 2
    assert f"image '{tmp_path / 'new' / 'b.png'}' is 6x10 pixels" in err
    assert "'a.png' (row 1) is 8x8" in err and "images.resize: [height, width]" in err


def test_the_export_metadata_holds_the_image_decoding(
    digits: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtlgraph.inference.export import load_metadata

    config, run = digits
    out = tmp_path / "m.pt2"
    code, err = _cli(capsys, "export", str(config), "--checkpoint", str(run), "--out", str(out))
    assert code == 0, err
    (image,) = load_metadata(out)["inputs"]
    assert image["shape"] == ["batch", 1, 4, 4] and image["vocabulary"] is None
    assert image["image"]["mode"] == "L" and image["image"]["resize"] == [4, 4]
    assert image["image"]["normalize"] is None and image["image"]["layout"] == "CHW"


# ---------------------------------------------------------------- arguments and outputs

ARG_CASES: list[tuple[str, list[str], str]] = [
    ("batch-size-0", ["--batch-size", "0"], "--batch-size must be >= 1"),
    ("num-workers-negative", ["--num-workers", "-1"], "--num-workers >= 0"),
    (
        "out-in-missing-dir",
        ["--out", "{tmp}/nope/p.jsonl"],
        "directory '{tmp}/nope' does not exist",
    ),
    ("out-is-a-directory", ["--out", "{tmp}"], "it is a directory; name a file"),
    ("out-unknown-suffix", ["--out", "{tmp}/p.txt"], "cannot tell the format of '{tmp}/p.txt'"),
    ("unknown-id-column", ["--id-column", "nam"], "has no id column 'nam'"),
    ("unknown-format", ["--format", "xlsx"], "xlsx"),
    ("unknown-task", ["--tasks", "circle_tsk"], "did you mean 'circle_task'"),
    ("unknown-dataset", ["--data", "circels:test"], "(did you mean 'circles'?)"),
    ("unknown-split", ["--data", "circles:tset"], "has no split 'tset'"),
    ("missing-column", ["--data", "{tmp}/other.csv"], "has no column for input field 'xy'"),
]


@pytest.mark.parametrize(("args", "message"), [c[1:] for c in ARG_CASES], ids=[c[0] for c in ARG_CASES])  # fmt: skip
def test_bad_predict_arguments_exit_2(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    config, run = tiny
    data = tmp_path / "new.csv"
    data.write_text('name,xy\na,"[0.1, 0.2]"\n')
    (tmp_path / "other.csv").write_text("name,z\na,1\n")
    given = [a.replace("{tmp}", str(tmp_path)) for a in args]
    base = {"--data": str(data), "--out": str(tmp_path / "p.jsonl")}
    for flag in list(base):
        if flag in given:
            del base[flag]
    rest = [x for kv in base.items() for x in kv]
    code, err = _cli(capsys, "predict", str(config), "--checkpoint", str(run), *rest, *given)
    assert code == 2, err
    assert message.replace("{tmp}", str(tmp_path)) in err


# ---------------------------------------------------------------- signals


def _slow_predict(
    tiny: tuple[Path, Path], tmp_path: Path, workers: int = 0
) -> tuple[subprocess.Popen[str], Path]:
    """``mtlgraph predict`` in a subprocess (its own process group), slowed to ~50 ms a row,
    once its temporary output file exists (SIGINT restored: a background shell's children
    ignore it)."""
    config, run = tiny
    np.save(tmp_path / "x.npy", np.zeros((600, 2), np.float32))
    out = tmp_path / "p.jsonl"
    argv = ["predict", str(config), "--checkpoint", str(run), "--data", str(tmp_path / "x.npy"),
            "--out", str(out), "--batch-size", "1", "--num-workers", str(workers), "--quiet"]  # fmt: skip
    code = (
        "import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from mtlgraph.experiment.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    env = {**cli_env(), "MTLGRAPH_TEST_SLOW": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".p.jsonl.*.tmp")):
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "predict never started writing"
        time.sleep(0.05)
    time.sleep(0.3)  # a few rows in
    return proc, out


@pytest.mark.parametrize(
    ("sig", "status", "said", "workers"),
    [
        (signal.SIGTERM, 143, "terminated (SIGTERM)", 0),
        (signal.SIGINT, 130, "interrupted (Ctrl-C)", 0),
        (signal.SIGTERM, 143, "terminated (SIGTERM)", 2),  # the whole group, readers too
    ],
    ids=["SIGTERM", "SIGINT", "SIGTERM-to-the-group-with-reader-processes"],
)
def test_a_signal_removes_the_temporary_and_keeps_the_older_output(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    sig: signal.Signals,
    status: int,
    said: str,
    workers: int,
) -> None:
    (tmp_path / "p.jsonl").write_text("older predictions\n")
    proc, out = _slow_predict(tiny, tmp_path, workers)
    if workers:
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C or a job scheduler does
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == status, err
    assert f"mtlgraph: {said}; no predictions written, '{out}' keeps its older content" in err
    assert "Traceback" not in err and "Exception ignored" not in err
    assert out.read_text() == "older predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "x.npy"]


def test_a_temporary_left_by_sigkill_is_removed_by_the_next_write(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    proc, out = _slow_predict(tiny, tmp_path)
    proc.kill()
    proc.communicate(timeout=60)
    (left,) = tmp_path.glob(".p.jsonl.*.tmp")
    assert f".p.jsonl.{proc.pid}@" in left.name
    config, run = tiny
    code, err = _cli(
        capsys, "predict", str(config), "--checkpoint", str(run), "--data",
        str(tmp_path / "x.npy"), "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert len(read_predictions(out)) == 600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.jsonl", "x.npy"]


# ---------------------------------------------------------------- export faults


def _full_disk_on_call(monkeypatch: pytest.MonkeyPatch, failing: int) -> None:
    """``os.fsync`` in the atomic writer fails with ENOSPC on its ``failing``-th call."""
    from mtlgraph import _io

    calls = {"n": 0}
    real = os.fsync

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == failing:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(_io.os, "fsync", fsync)


@pytest.mark.parametrize("suffix", [".pt2"])  # torch.export.save wrote from C++: it aborted
def test_a_full_disk_during_export_is_a_clean_error_and_the_older_file_stays(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    suffix: str,
) -> None:
    config, run = tiny
    out = tmp_path / f"m{suffix}"
    out.write_bytes(b"the older program")
    _full_disk_on_call(monkeypatch, 1)
    code, err = _cli(
        capsys, "export", str(config), "--checkpoint", str(run), "--out", str(out), "--no-check"
    )
    assert code == 1
    assert (
        f"cannot write '{out}': No space left on device (an older file there is unchanged)" in err
    )
    assert "Traceback" not in err and out.read_bytes() == b"the older program"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_a_full_disk_writing_the_sidecar_leaves_a_complete_program_and_no_stale_sidecar(
    tiny: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mtlgraph.inference.export import load_metadata

    config, run = tiny
    out = tmp_path / "m.pt2"
    stale = tmp_path / "m.pt2.json"
    stale.write_text('{"tasks": [{"name": "another_task"}]}')
    _full_disk_on_call(monkeypatch, 2)  # the program is written, its sidecar is not
    code, err = _cli(
        capsys, "export", str(config), "--checkpoint", str(run), "--out", str(out),
        "--tasks", "square_task", "--no-check",
    )  # fmt: skip
    assert code == 1
    assert f"cannot write '{stale}': No space left on device ('{out}' is complete" in err
    assert not stale.exists()
    assert [t["name"] for t in load_metadata(out)["tasks"]] == ["square_task"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_export_into_a_missing_directory_exits_2(
    tiny: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = tiny
    out = tmp_path / "nope" / "m.pt2"
    code, err = _cli(capsys, "export", str(config), "--checkpoint", str(run), "--out", str(out))
    assert code == 2 and f"directory '{tmp_path / 'nope'}' does not exist" in err
