"""``mtlgraph predict`` / ``mtlgraph export`` and the Python helpers behind them: every data
format through the one dispatch point, every output format, ids, the same numbers as
``model.predict``, the bad-input cases with their exit status, and no partial output file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from experiment_helpers import ROOT, tiny_config, write_config

from mtlgraph import DataError, DictDataLoader, DictDataset
from mtlgraph.experiment.cli import COMMANDS, main
from mtlgraph.experiment.config import load_config
from mtlgraph.experiment.inference_cli import load_model
from mtlgraph.experiment.predict import ID_FIELD, read_prediction_data
from mtlgraph.inference.predictions import read_predictions, write_predictions

TOL = 1e-6


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A fresh run directory of the tiny config (one epoch) and its config file."""
    root = tmp_path_factory.mktemp("predict")
    config = write_config(root / "tiny.yaml", tiny_config(n_epochs=1))
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={root / 'run'}"]) == 0
    return config, root / "run"


def _eager(config: Path, run_dir: Path, xy: np.ndarray) -> dict[str, np.ndarray]:
    """``model.predict`` on the same rows, unlabelled (the reference)."""
    model = load_model(load_config(config), run_dir)
    loader = DictDataLoader(DictDataset("new", "serve", {"xy": torch.tensor(xy)}, {}), 7)
    return model.predict(loader, task_names=["circle_task", "square_task"], return_preds=True)


def _check_rows(rows: list[dict], eager: dict, ids: list) -> None:
    assert [r["id"] for r in rows] == ids
    for task in ("circle_task", "square_task"):
        probs = np.array([r[f"{task}/probs"] for r in rows])
        np.testing.assert_allclose(probs, eager["probs"][task], atol=TOL)
        assert [r[f"{task}/pred"] for r in rows] == eager["preds"][task].tolist()


def test_predict_and_export_are_subcommands() -> None:
    assert {"predict", "export"} <= set(COMMANDS)


def test_predict_a_config_dataset_from_a_fresh_run_directory(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run_dir = run
    out = tmp_path / "p.jsonl"
    code, _, err = _run(
        capsys, "predict", str(config), "--checkpoint", str(run_dir), "--data", "circles:test",
        "--out", str(out), "--batch-size", "6",
    )  # fmt: skip
    assert code == 0, err
    assert "20 rows of circle_task, square_task written to" in err
    rows = read_predictions(out)
    cfg = load_config(config)
    from mtlgraph.experiment.build import load_datasets

    test = next(d for d in load_datasets(cfg)[0] if (d.name, d.split) == ("circles", "test"))
    _check_rows(rows, _eager(config, run_dir, test.X_dict["xy"].numpy()), list(range(20)))
    assert list(rows[0]) == [
        "id",
        "circle_task/pred",
        "circle_task/probs",
        "square_task/pred",
        "square_task/probs",
    ]


XY = np.array([[0.1, 0.2], [0.5, -0.3], [1.5, 0.0], [-0.9, 0.9], [0.0, 0.0]], dtype=np.float32)
NAMES = ["a", "b", "c", "d", "e"]


def _write_data(tmp_path: Path, fmt: str) -> Path:
    """The rows XY with ids NAMES; the field under the config's array name 'x' or its own 'xy'."""
    if fmt == "csv":
        path = tmp_path / "new.csv"
        lines = ["name,x"] + [
            f'{n},"[{a}, {b}]"' for n, (a, b) in zip(NAMES, XY.tolist(), strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "csv_columns":  # one column per feature, declared as a list in the config
        path = tmp_path / "cols.csv"
        lines = ["name,x0,x1"] + [
            f"{n},{a},{b}" for n, (a, b) in zip(NAMES, XY.tolist(), strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
    elif fmt == "jsonl":
        path = tmp_path / "new.jsonl"
        rows = [
            json.dumps({"name": n, "xy": list(r)}) for n, r in zip(NAMES, XY.tolist(), strict=True)
        ]
        path.write_text("\n".join(rows) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = tmp_path / "new.parquet"
        pq.write_table(pa.table({"name": NAMES, "xy": XY.tolist()}), path)
    elif fmt == "npz":
        path = tmp_path / "new.npz"
        np.savez(path, x=XY, name=np.array(NAMES))
    else:  # a directory of memory-mapped .npy arrays
        path = tmp_path / "arrays"
        path.mkdir()
        np.save(path / "xy.npy", XY)
        np.save(path / "name.npy", np.array(NAMES))
    return path


@pytest.mark.parametrize("fmt", ["csv", "csv_columns", "jsonl", "parquet", "npz", "npy"])
def test_every_data_format_gives_the_eager_predictions(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str
) -> None:
    config, run_dir = run
    if fmt == "csv_columns":
        cfg = tiny_config(n_epochs=1)
        cfg["data"]["datasets"]["circles"]["fields"]["xy"] = ["x0", "x1"]  # csv-style columns
        config = write_config(tmp_path / "columns.yaml", cfg)
    data = _write_data(tmp_path, fmt)
    out = tmp_path / "p.jsonl"
    code, _, err = _run(
        capsys, "predict", str(config), "--checkpoint", str(run_dir), "--data", str(data),
        "--id-column", "name", "--out", str(out), "--batch-size", "2",
    )  # fmt: skip
    assert code == 0, err
    _check_rows(read_predictions(out), _eager(config, run_dir, XY), NAMES)


def test_one_npy_file_is_the_one_field_and_rows_are_the_ids(
    run: tuple[Path, Path], tmp_path: Path
) -> None:
    config, _ = run
    np.save(tmp_path / "xy.npy", XY)
    data = read_prediction_data(load_config(config), tmp_path / "xy.npy", ["xy"])
    chunks = list(data.chunks(2))
    assert [ids for ids, _ in chunks] == [[0, 1], [2, 3], [4]]
    np.testing.assert_array_equal(np.concatenate([c["xy"] for _, c in chunks]), XY)
    batches = list(data.batches(2, num_workers=2))  # worker processes keep the order
    assert [X[ID_FIELD] for X, _ in batches] == [[0, 1], [2, 3], [4]]
    with pytest.raises(DataError, match=r"holds one array, but the tasks read the fields 'a', 'b'"):
        read_prediction_data(load_config(config), tmp_path / "xy.npy", ["a", "b"])


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_every_output_format_holds_the_same_values(
    run: tuple[Path, Path], tmp_path: Path, suffix: str
) -> None:
    config, run_dir = run
    model = load_model(load_config(config), run_dir)
    batches = [({"xy": torch.tensor(XY[:3]), "name": NAMES[:3]}, {}), ({"xy": torch.tensor(XY[3:]), "name": NAMES[3:]}, {})]  # fmt: skip
    out = tmp_path / f"p.{suffix}"
    assert write_predictions(model, batches, out, ["circle_task"], id_field="name") == 5
    eager = _eager(config, run_dir, XY)["probs"]["circle_task"]
    if suffix == "jsonl":
        probs = np.array([r["circle_task/probs"] for r in read_predictions(out)])
        ids = [r["id"] for r in read_predictions(out)]
    elif suffix == "csv":
        lines = out.read_text().splitlines()
        assert lines[0] == "id,circle_task/pred,circle_task/probs/0,circle_task/probs/1"
        ids = [ln.split(",")[0] for ln in lines[1:]]
        probs = np.array([[float(v) for v in ln.split(",")[2:]] for ln in lines[1:]])
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(out).to_pydict()
        ids = table["id"]
        probs = np.stack([table["circle_task/probs/0"], table["circle_task/probs/1"]], axis=1)
    assert ids == NAMES
    np.testing.assert_allclose(probs, eager, atol=TOL)


def test_columns_per_task_type(tmp_path: Path) -> None:
    from torch import nn

    from mtlgraph import MultitaskClassifier, Operation, Task

    def task(name: str, width: int, kind: str) -> Task:
        return Task(
            name, {name: nn.Linear(2, width)}, [Operation(name, [("_input_", "x")])], task_type=kind
        )  # type: ignore[arg-type]

    model = MultitaskClassifier(
        [task("b", 1, "binary"), task("m", 3, "multilabel"), task("r", 1, "regression")]
    )
    x = torch.randn(4, 2)
    out = tmp_path / "p.jsonl"
    write_predictions(model, [({"x": x}, {})], out)
    rows = read_predictions(out)
    assert list(rows[0]) == ["id", "b/pred", "b/prob", "m/preds", "m/probs", "r/value"]
    eager = model.predict([({"x": x}, {})], task_names=["b", "m", "r"], return_preds=True)
    np.testing.assert_allclose([r["b/prob"] for r in rows], eager["probs"]["b"], atol=TOL)
    assert [r["m/preds"] for r in rows] == eager["preds"]["m"].tolist()
    np.testing.assert_allclose([r["r/value"] for r in rows], eager["probs"]["r"], atol=TOL)


def _predict(capsys: pytest.CaptureFixture[str], run: tuple[Path, Path], *args: str) -> tuple:
    config, run_dir = run
    return _run(capsys, "predict", str(config), "--checkpoint", str(run_dir), *args)


def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_data(tmp_path, "jsonl")
    out = tmp_path / "p.jsonl"
    base = ("--data", str(data), "--out", str(out))
    code, _, err = _predict(capsys, run, *base, "--tasks", "circle_tsk")
    assert code == 2 and "unknown task 'circle_tsk' (did you mean 'circle_task'?)" in err
    code, _, err = _predict(capsys, run, "--data", str(data), "--out", str(tmp_path / "no/p.csv"))
    assert code == 2 and "directory '" in err and "no' does not exist" in err
    code, _, err = _predict(capsys, run, "--data", str(data), "--out", str(tmp_path))
    assert code == 2 and "it is a directory" in err
    code, _, err = _predict(capsys, run, "--data", str(data), "--out", str(tmp_path / "p.txt"))
    assert code == 2 and "cannot tell the format of" in err
    code, _, err = _predict(capsys, run, *base, "--id-column", "nam")
    assert code == 2 and "has no id column 'nam' (did you mean 'name'?)" in err
    code, _, err = _predict(capsys, run, "--data", "circls:test", "--out", str(out))
    assert code == 2 and "nor a dataset of the config (did you mean 'circles'?)" in err
    # a missing input field names the field and the file
    (tmp_path / "bad.csv").write_text("name,z\na,1\n")
    code, _, err = _predict(capsys, run, "--data", str(tmp_path / "bad.csv"), "--out", str(out))
    assert code == 2
    assert (
        f"'{tmp_path / 'bad.csv'}' has no column for input field 'xy' (looked for 'x', 'xy')" in err
    )
    # rows of different shapes in one field
    rows = [json.dumps({"xy": [0.1, 0.2]}), json.dumps({"xy": [0.1]})]
    (tmp_path / "ragged.jsonl").write_text("\n".join(rows) + "\n")
    code, _, err = _predict(
        capsys, run, "--data", str(tmp_path / "ragged.jsonl"), "--out", str(out)
    )
    assert code == 2
    assert (
        f"'{tmp_path / 'ragged.jsonl'}' line 2, column 'xy': 1 value(s), but "
        f"'{tmp_path / 'ragged.jsonl'}' line 1 has 2" in err
    )
    # a checkpoint of another model
    other = tiny_config(n_epochs=1)
    other["modules"]["trunk"]["hidden"] = [4]
    other["modules"]["circle_head"]["in_features"] = 4
    other["modules"]["square_head"]["in_features"] = 4
    other_cfg = write_config(tmp_path / "other.yaml", other)
    code = main(["predict", str(other_cfg), "--checkpoint", str(run[1]), *base])
    err = capsys.readouterr().err
    assert code == 2 and "is from another model" in err
    assert "'module_pool.trunk.0.weight' has shape" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.csv",
        "new.jsonl",
        "other.yaml",
        "ragged.jsonl",
    ]


def test_a_failure_mid_stream_exits_1_and_leaves_no_partial_file(
    run: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from mtlgraph.graph.modules import MLP

    calls = []

    def third_call_fails(self: MLP, x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        if len(calls) == 3:
            raise RuntimeError("the trunk failed on the third batch")
        return torch.nn.Sequential.forward(self, x)

    monkeypatch.setattr(MLP, "forward", third_call_fails)
    rows = [json.dumps({"xy": [0.1, 0.2]})] * 6
    (tmp_path / "new.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "p.jsonl"
    out.write_text("old predictions\n")
    args = ("--data", str(tmp_path / "new.jsonl"), "--out", str(out), "--batch-size", "2")
    code, _, err = _predict(capsys, run, *args)
    assert code == 1 and "the trunk failed on the third batch" in err
    assert "mtlgraph: raised by operation 'trunk'" in err
    assert out.read_text() == "old predictions\n"  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "p.jsonl"]  # no temp file


def test_a_wider_field_mid_stream_exits_2_before_the_model_and_leaves_no_partial_file(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [json.dumps({"xy": [0.1, 0.2]})] * 4 + [json.dumps({"xy": [0.1, 0.2, 0.3]})] * 2
    (tmp_path / "new.jsonl").write_text("\n".join(rows) + "\n")
    out = tmp_path / "p.jsonl"
    out.write_text("old predictions\n")
    args = ("--data", str(tmp_path / "new.jsonl"), "--out", str(out), "--batch-size", "2")
    code, _, err = _predict(capsys, run, *args)
    assert code == 2
    assert "input field 'xy' has 3 columns, but module 'trunk' was trained on 2" in err
    assert "RuntimeError" not in err
    assert out.read_text() == "old predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.jsonl", "p.jsonl"]


def test_missing_extras_name_them(
    run: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = _write_data(tmp_path, "npz")
    parquet = _write_data(tmp_path, "parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, _, err = _predict(capsys, run, "--data", str(data), "--out", str(tmp_path / "p.parquet"))
    assert code == 2 and "writing Parquet needs pyarrow: pip install 'mtlgraph[tables]'" in err
    code, _, err = _predict(capsys, run, "--data", str(parquet), "--out", str(tmp_path / "p.csv"))
    assert code == 2 and "needs pyarrow: pip install 'mtlgraph[tables]'" in err
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    config, run_dir = run
    code, _, err = _run(
        capsys,
        "export",
        str(config),
        "--checkpoint",
        str(run_dir),
        "--out",
        str(tmp_path / "m.onnx"),
    )
    assert code == 2 and "pip install 'mtlgraph[onnx]'" in err
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "m.onnx").exists()


def test_export_command_checks_the_program_against_eager(
    run: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run_dir = run
    out = tmp_path / "circle.pt2"
    code, stdout, err = _run(
        capsys, "export", str(config), "--checkpoint", str(run_dir), "--tasks", "circle_task",
        "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    summary = json.loads(stdout)
    assert summary["format"] == "torch_export" and summary["tasks"] == ["circle_task"]
    assert summary["max_abs_error"]["circle_task"] <= 1e-5
    program = torch.export.load(out)
    assert not any("square_head" in k for k in program.state_dict)
    meta = json.loads((tmp_path / "circle.pt2.json").read_text())
    assert [i["name"] for i in meta["inputs"]] == ["xy"]
    code, _, err = _run(
        capsys, "export", str(config), "--checkpoint", str(run_dir), "--tasks", "squar_task",
        "--out", str(out),
    )  # fmt: skip
    assert code == 2 and "did you mean 'square_task'" in err


@pytest.mark.slow
def test_predict_on_every_shipped_config_from_a_fresh_run_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mtlgraph.experiment.build import build_loaders, load_datasets

    for config in sorted((ROOT / "configs").glob("*.yaml")):
        run_dir = tmp_path / config.stem
        cfg = load_config(config)
        epoch = [f"trainer.run_dir={run_dir}", "trainer.n_epochs=1", "trainer.diagnostics=null"]
        assert main(["train", str(config), "--quiet", *epoch]) == 0, config
        datasets = load_datasets(cfg)[0]
        test = next(d for d in datasets if d.split == "test")
        tasks = list(test.Y_dict)
        out = tmp_path / f"{config.stem}.jsonl"
        code = main(
            [
                "predict",
                str(config),
                "--checkpoint",
                str(run_dir),
                "--quiet",
                "--data",
                f"{test.name}:test",
                "--out",
                str(out),
            ]
        )  # fmt: skip  (no --tasks: the tasks whose fields it has)
        assert code == 0, (config, capsys.readouterr().err)
        rows = read_predictions(out)
        assert len(rows) == len(test)
        model = load_model(cfg, run_dir)
        loader = next(dl for dl in build_loaders(cfg, [test]))
        eager = model.predict(loader, task_names=tasks, return_preds=True)
        for t in tasks:
            key = next(k for k in rows[0] if k.startswith(f"{t}/") and "pred" not in k)
            got = np.array([r[key] for r in rows], dtype=np.float64)
            np.testing.assert_allclose(got, eager["probs"][t], atol=TOL, err_msg=str(config))


def test_only_a_leading_linear_layer_sets_a_fields_trained_width() -> None:
    from torch import nn

    from mtlgraph import MultitaskClassifier, Operation, Task
    from mtlgraph.inference.predictions import trained_widths

    def task(name: str, module: nn.Module) -> Task:
        return Task(name, {name: module}, [Operation(name, [("_input_", name)])])

    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))  # reads (8, 8) images: width 8 is right
    mlp = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    model = MultitaskClassifier([task("img", flat), task("tab", mlp)])
    assert trained_widths(model, ["img", "tab"]) == {"tab": ("tab", 3)}
