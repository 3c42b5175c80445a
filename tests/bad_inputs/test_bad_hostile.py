"""Bad-input corpus of a hostile user's second pass over run directories, report, compare, sweep,
check --graph, predict, export and the pretrained module types: each CLI case exits with the
status docs/cli.md promises and names the culprit and the fix in one message."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from experiment_helpers import TINY, tiny_config, write_config

from mtlgraph.experiment.cli import main
from mtlgraph.experiment.config import dump_run_config, load_config


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main([*args, "--quiet"])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _run_dir(path: Path) -> Path:
    """A finished run directory as training leaves it (config, metrics, scores), no training."""
    path.mkdir(parents=True)
    config = write_config(path / "config.yaml", TINY)
    config.write_text(dump_run_config(load_config(config, [f"trainer.run_dir={path}"])))
    scores = {"circle_task/circles/test/accuracy": 0.5}
    (path / "metrics.jsonl").write_text(json.dumps({"step": 1, **scores}) + "\n")
    (path / "scores.json").write_text(json.dumps(scores))
    return path


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("config.yaml", "garbage\n", "config.yaml: expected the run's config (a YAML mapping)"),
        ("config.yaml", "tasks: [\n", "config.yaml:2:1: invalid YAML"),
        ("metrics.jsonl", "[1, 2]\n{}\n", "metrics.jsonl:1: expected a JSON object of numbers"),
        ("metrics.jsonl", '{"a": "x"}\n{}\n', "metrics.jsonl:1: 'a' is 'x', not a number"),
    ],
)
def test_report_of_a_run_with_a_damaged_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, text: str, message: str
) -> None:
    run = _run_dir(tmp_path / "run")
    (run / name).write_text(text)
    code, err = _run(capsys, "report", str(run), "--no-tensorboard")
    assert code == 2
    assert f"{run / name.split(':')[0]}" in err and message in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", "expected a JSON object of numbers, got list"),
        ('{"a": "b"}', "'a' is 'b', not a number"),
    ],
)
def test_compare_a_run_with_damaged_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, message: str
) -> None:
    run = _run_dir(tmp_path / "run")
    (run / "scores.json").write_text(text)
    code, err = _run(capsys, "compare", str(run))
    assert code == 2
    assert f"{run / 'scores.json'}: {message}" in err


@pytest.fixture
def tiny_yaml(tmp_path: Path) -> Path:
    return write_config(tmp_path / "tiny.yaml", TINY)


def test_sweep_grid_given_twice_for_one_key(
    tmp_path: Path, tiny_yaml: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sweep"
    grid = ("--grid", "trainer.lr=0.1", "--grid", "trainer.lr=0.2")
    code, err = _run(capsys, "sweep", str(tiny_yaml), *grid, "--out", str(out))
    assert code == 2
    assert "--grid trainer.lr=0.2: key 'trainer.lr' is given twice" in err
    assert not out.exists()


@pytest.mark.parametrize("command", ["sweep", "baselines"])
def test_a_negative_seed_is_refused_before_any_run(
    tmp_path: Path, tiny_yaml: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    out = tmp_path / "out"
    grid = ("--grid", "trainer.lr=0.1") if command == "sweep" else ()
    code, err = _run(
        capsys, command, str(tiny_yaml), *grid, "--seeds", "0", "-1", "--out", str(out)
    )
    assert code == 2
    assert "trainer.seed: must be >= 0, got -1" in err
    assert not any(p.name.startswith(("trainer", "task")) for p in out.glob("*"))


def test_check_a_negative_trainer_seed(tiny_yaml: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _run(capsys, "check", str(tiny_yaml), "trainer.seed=-1")
    assert code == 2 and "trainer.seed: must be >= 0, got -1" in err


@pytest.mark.parametrize("finished", [True, False])
def test_sweep_into_a_directory_with_runs_of_another_config(
    tmp_path: Path, tiny_yaml: Path, capsys: pytest.CaptureFixture[str], finished: bool
) -> None:
    out = tmp_path / "sweep"
    old = _run_dir(out / "trainer.lr=0.1")  # trained with n_epochs 2, lr 0.05
    if not finished:
        (old / "scores.json").unlink()
    args = ("sweep", str(tiny_yaml), "trainer.n_epochs=1", "--grid", "trainer.lr=0.1")
    code, err = _run(capsys, *args, "--out", str(out))
    assert code == 2
    assert f"{old}: holds a run of another config (" in err
    assert "trainer.lr: the run has 0.05, now 0.1" in err
    assert "trainer.n_epochs: the run has 2, now 1" in err
    assert "choose another --out, or delete that run directory" in err


@pytest.mark.parametrize(
    ("command", "option", "message"),
    [
        ("check", "--graph", "cannot write '{out}': '{file}' is a file, not a directory"),
        ("report", "--out", "cannot write '{out}': '{file}' is a file, not a directory"),
        ("compare", "--out", "cannot write '{out}': '{file}' is a file, not a directory"),
        ("compare", "--plot", "cannot write '{out}': '{file}' is a file, not a directory"),
        ("evaluate", "--output", "cannot write '{out}': '{file}' is a file, not a directory"),
        ("sweep", "--out", "--out {out}: '{file}' is a file, not a directory"),
        ("baselines", "--out", "--out {out}: '{file}' is a file, not a directory"),
        ("train", "trainer.run_dir=", "run directory '{out}' is under a file ('{file}')"),
    ],
)
def test_an_output_path_under_a_file(
    tmp_path: Path,
    tiny_yaml: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    option: str,
    message: str,
) -> None:
    run = _run_dir(tmp_path / "run")
    out = tiny_yaml / "sub" / "out.svg"
    where = {"report": [str(run)], "compare": [str(run)]}.get(command, [str(tiny_yaml)])
    extra = {"sweep": ["--grid", "trainer.lr=0.1"], "evaluate": ["--checkpoint", str(run)]}
    target = [f"{option}{out}"] if option.endswith("=") else [option, str(out)]
    code, err = _run(capsys, command, *where, *extra.get(command, []), *target)
    assert code == 2
    assert message.format(out=out, file=tiny_yaml) in err


@pytest.mark.parametrize("command", ["report", "compare"])
def test_an_output_path_that_is_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    run = _run_dir(tmp_path / "run")
    code, err = _run(capsys, command, str(run), "--out", str(tmp_path))
    assert code == 2
    assert f"cannot write '{tmp_path}': it is a directory; name a file" in err


def test_hf_encoder_path_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "bert").mkdir()
    weights = tmp_path / "bert" / "config.json"
    weights.write_text("{}")
    cfg = {
        **TINY,
        "modules": {**TINY["modules"], "enc": {"type": "hf_encoder", "path": str(weights)}},
    }
    code, err = _run(capsys, "check", str(write_config(tmp_path / "c.yaml", cfg)))
    assert code == 2
    assert f"modules.enc: hf_encoder: path '{weights}' is a file, not a model directory" in err
    assert f"('{weights.parent}', which holds config.json)" in err


def test_pretrained_tokenizer_path_that_is_a_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    (tmp_path / "r.csv").write_text("review,label\ngood,1\nbad,0\n" * 5)
    (tmp_path / "config.json").write_text("{}")
    text = {"pretrained": "config.json", "max_length": 8}
    source = {"type": "table", "path": "r.csv", "text": {"review": text}}
    data = {
        "datasets": {
            "d": {"source": source, "fields": {"xy": "review"}, "labels": {"circle_task": "label"}}
        }
    }
    cfg = {**TINY, "data": data}
    code, err = _run(capsys, "check", str(write_config(tmp_path / "c.yaml", cfg)))
    assert code == 2
    assert "data.datasets.d.source.text.review.pretrained: " in err
    assert f"'{tmp_path / 'config.json'}' is a file, not a model directory" in err


@pytest.mark.parametrize(
    ("name", "fmt", "message"),
    [
        ("m.txt", None, "format torch_export writes a .pt2 file; name it m.pt2 (or give --format"),
        ("m.onnx", "torch_export", "format torch_export writes a .pt2 file; name it m.pt2"),
        ("m", "onnx", "format onnx writes a .onnx file; name it m.onnx"),
    ],
)
def test_export_out_whose_suffix_is_not_its_format(
    tmp_path: Path,
    tiny_yaml: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    fmt: str | None,
    message: str,
) -> None:
    if fmt == "onnx":
        pytest.importorskip("onnxscript")
    run = _run_dir(tmp_path / "run")
    fmt_args = ["--format", fmt] if fmt else []
    out = tmp_path / name
    code, err = _run(
        capsys, "export", str(tiny_yaml), "--checkpoint", str(run), "--out", str(out), *fmt_args
    )
    assert code == 2
    assert f"--out {out}: {message}" in err
    assert not out.exists()


def test_compare_plot_that_is_not_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_dir(tmp_path / "run")
    code, err = _run(capsys, "compare", str(run), "--plot", str(tmp_path / "bars.txt"))
    assert code == 2
    assert f"--plot {tmp_path / 'bars.txt'}: the plot is a PNG image; name it bars.png" in err
    assert not (tmp_path / "bars.txt").exists()


@pytest.mark.parametrize("command", ["report", "compare"])
def test_a_config_file_given_as_the_run_directory(
    tiny_yaml: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, err = _run(capsys, command, str(tiny_yaml))
    assert code == 2
    assert f"{tiny_yaml}: a file, not a run directory: give the directory mtlgraph train" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--grid", "trainer.lr=0.1", "--optuna", "0"],
            "--optuna 0: the number of trials must be >= 1",
        ),
        (["--optuna", "2"], "--optuna searches the --grid values: give --grid KEY=V1,V2"),
    ],
)
def test_sweep_optuna_with_nothing_to_search(
    tmp_path: Path,
    tiny_yaml: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    pytest.importorskip("optuna")
    out = tmp_path / "sweep"
    objective = ["--objective", "circle_task/circles/valid/accuracy"]
    code, err = _run(capsys, "sweep", str(tiny_yaml), *args, *objective, "--out", str(out))
    assert code == 2 and message in err
    assert not out.exists()


@pytest.mark.parametrize("folder", ["table.csv", "nodir"])
def test_image_folder_that_is_a_file_or_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], folder: str
) -> None:
    pytest.importorskip("PIL")
    (tmp_path / "table.csv").write_text("file,y\n0.png,0\n1.png,1\n")
    images = {"folder": folder, "mode": "L", "resize": [4, 4]}
    source = {"type": "images", "path": "table.csv", "images": images}
    dataset = {"source": source, "fields": {"xy": "file"}, "labels": {"circle_task": "y"}}
    cfg = {**TINY, "data": {"datasets": {"d": dataset}}}
    code, err = _run(capsys, "check", str(write_config(tmp_path / "c.yaml", cfg)))
    assert code == 2
    what = "is a file" if folder == "table.csv" else "does not exist"
    assert f"data.datasets.d: image folder '{tmp_path / folder}' {what}: name the directory" in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny config (its trunk reads field 'xy' with in_dim 2) and a run trained one epoch."""
    root = tmp_path_factory.mktemp("tiny_run")
    config = write_config(root / "tiny.yaml", tiny_config(n_epochs=1))
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={root / 'run'}"]) == 0
    return config, root / "run"


def _predict(
    capsys: pytest.CaptureFixture[str],
    tiny_run: tuple[Path, Path],
    data: Path,
    out: Path,
    *overrides: str,
) -> tuple[int, str]:
    config, run = tiny_run
    args = ("--checkpoint", str(run), "--data", str(data), "--out", str(out))
    return _run(capsys, "predict", str(config), *args, *overrides)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv"])
def test_predict_on_a_field_of_another_width_names_both_widths(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_run: tuple[Path, Path],
    suffix: str,
) -> None:
    rows = np.ones((4, 3), dtype=np.float32)
    data = tmp_path / f"wide{suffix}"
    if suffix == ".npy":
        np.save(data, rows)
    elif suffix == ".npz":
        np.savez(data, xy=rows)
    else:
        data.write_text("a,b,c\n" + "1,2,3\n" * 4)
    out = tmp_path / "p.csv"
    columns = "data.datasets.circles.fields.xy=[a,b,c]"  # the CSV's columns for the field
    code, err = _predict(capsys, tiny_run, data, out, *([columns] if suffix == ".csv" else []))
    assert code == 2
    assert "input field 'xy' has 3 columns, but module 'trunk' was trained on 2" in err
    assert "mat1 and mat2" not in err and not out.exists()


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty.npy", "'{data}' has no rows: nothing to predict"),
        ("empty.npz", "'{data}' has no rows: nothing to predict"),
        ("header.csv", "'{data}' has a header ('x0', 'x1') and no rows: nothing to predict"),
        ("blank.csv", "'{data}' is empty; its first line must name the columns"),
    ],
)
def test_predict_on_data_without_rows_is_refused_like_an_empty_csv(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tiny_run: tuple[Path, Path],
    name: str,
    message: str,
) -> None:
    data = tmp_path / name
    empty = np.zeros((0, 2), dtype=np.float32)
    if name.endswith(".npy"):
        np.save(data, empty)
    elif name.endswith(".npz"):
        np.savez(data, xy=empty)
    else:
        data.write_text("x0,x1\n" if name == "header.csv" else "")
    out = tmp_path / "p.csv"
    code, err = _predict(capsys, tiny_run, data, out)
    assert code == 2
    assert message.format(data=data) in err
    assert not out.exists()
