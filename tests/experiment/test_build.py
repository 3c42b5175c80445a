"""Config -> objects: modules shared by name, tasks, files (.npz/.csv), splits, label checks."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from experiment_helpers import ROOT, tiny_config, write_config

from mtlgraph import ConfigError, DataError, DictDataLoader, MultitaskClassifier, Trainer
from mtlgraph.data.datasets import EpochSampler
from mtlgraph.experiment.build import build_experiment, build_model, load_datasets
from mtlgraph.experiment.config import load_config, parse_config


def _experiment(tmp_path: Path, cfg: dict, overrides: tuple[str, ...] = ()):  # type: ignore[no-untyped-def]
    return build_experiment(load_config(write_config(tmp_path / "c.yaml", cfg), overrides))


def test_model_shares_modules_by_name_and_seeds_init(tmp_path: Path) -> None:
    exp = _experiment(tmp_path, tiny_config())
    model = exp.model
    assert isinstance(model, MultitaskClassifier)
    assert sorted(model.module_pool) == ["circle_head", "square_head", "trunk"]
    trunk = model.tasks["circle_task"].module_pool["trunk"]
    assert trunk is model.tasks["square_task"].module_pool["trunk"]
    again = _experiment(tmp_path, tiny_config()).model
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters(), strict=True)
    )
    other = _experiment(tmp_path, tiny_config(), ("seed=1",)).model
    assert not torch.equal(next(model.parameters()), next(other.parameters()))


def test_quickstart_config_builds_the_tutorial_exactly() -> None:
    """Same names, same init order and seeds, same data: the config IS the tutorial."""
    spec = importlib.util.spec_from_file_location("tut01", ROOT / "tutorials" / "01_mtl_basics.py")
    assert spec is not None and spec.loader is not None
    tutorial = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tutorial)
    torch.manual_seed(0)
    exp = build_experiment(load_config(ROOT / "configs" / "quickstart.yaml"))
    torch.manual_seed(0)
    base = torch.nn.Sequential(
        torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4), torch.nn.ReLU()
    )
    heads = [torch.nn.Linear(4, 2) for _ in range(3)]
    ours = exp.model.module_pool
    assert all(
        torch.equal(a, b)
        for a, b in zip(ours["base_mlp"].parameters(), base.parameters(), strict=True)
    )
    for name, head in zip(("circle_head", "square_head", "inv_circle_head"), heads, strict=True):
        assert torch.equal(ours[name].weight, head.weight)
    loaders = tutorial.make_loaders(
        "circle", tutorial.make_circle_dataset(1000, 1, seed=0), "circleDataset"
    )
    ds = next(dl.dataset for dl in exp.loaders if dl.dataset.name == "circleDataset")
    assert torch.equal(ds.X_dict["circle_data"], loaders[0].dataset.X_dict["circle_data"])
    assert torch.equal(ds.Y_dict["circle_task"], loaders[0].dataset.Y_dict["circle_task"])
    assert [(dl.dataset.name, dl.dataset.split) for dl in exp.loaders][:3] == [
        ("circleDataset", "train"),
        ("circleDataset", "valid"),
        ("circleDataset", "test"),
    ]


def test_detached_inputs_and_key_inputs(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["modules"]["join"] = {"type": "concat"}
    cfg["modules"]["square_head"]["in_features"] = 10
    cfg["tasks"]["square_task"]["ops"] = [
        {"module": "trunk", "inputs": [["_input_", "xy"]]},
        {"module": "circle_head", "inputs": ["trunk"]},
        {"module": "join", "inputs": ["trunk", {"source": "circle_head", "detach": True}]},
        {"module": "square_head", "inputs": ["join"]},
    ]
    exp = _experiment(tmp_path, cfg)
    op = exp.model.tasks["square_task"].op_sequence[2]
    assert [(i.source, i.key, i.detach) for i in op.inputs] == [
        ("trunk", None, False),
        ("circle_head", None, True),
    ]
    # the square loss sends no gradient into circle_head (stop-gradient edge)
    X, Y = exp.datasets[0].batch(slice(0, 8))
    losses, _ = exp.model.calculate_loss(X, {"square_task": Y["circle_task"]})
    losses["square_task"].backward()
    assert exp.model.module_pool["circle_head"].weight.grad is None
    assert exp.model.module_pool["trunk"][0].weight.grad is not None


def test_task_options_reach_the_task(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["tasks"]["circle_task"].update(
        {
            "loss": "cross_entropy",
            "metrics": ["accuracy", {"name": "fbeta", "beta": 2, "key": "f2"}],
            "weight": 0.5,
            "ignore_value": -7,
        }
    )
    task = _experiment(tmp_path, cfg).model.tasks["circle_task"]
    assert task.scorer.metric_keys == ["accuracy", "f2"]
    assert (task.weight, task.ignore_value) == (0.5, -7)


def test_loaders_batch_size_and_shuffle_only_train(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["data"]["shuffle"] = True
    cfg["data"]["datasets"]["squares"]["batch_size"] = 40
    exp = _experiment(tmp_path, cfg)
    by = {(dl.dataset.name, dl.dataset.split): dl for dl in exp.loaders}
    assert by[("circles", "train")].batch_size == 16 and by[("squares", "train")].batch_size == 40
    for (_, split), dl in by.items():
        assert isinstance(dl.sampler, EpochSampler)
        assert dl.sampler.shuffle == (split == "train")
    assert by[("circles", "train")].sampler.seed != by[("squares", "train")].sampler.seed


# ---------------------------------------------------------------- files


def _file_config(path: str, fields: dict, labels: dict, **extra: object) -> dict:
    cfg = tiny_config()
    cfg["data"]["datasets"] = {
        "points": {"path": path, "fields": fields, "labels": labels, **extra}
    }
    return cfg


def _write_npz(path: Path, n: int = 50, **arrays: np.ndarray) -> None:
    g = np.random.default_rng(0)
    x = g.uniform(-1.5, 1.5, size=(n, 2))
    base = {"x": x, "y": (np.linalg.norm(x, axis=1) < 1).astype(np.int64)}
    np.savez(path, **{**base, **arrays})


def test_npz_file_with_fraction_splits(tmp_path: Path) -> None:
    _write_npz(tmp_path / "points.npz")
    cfg = _file_config(
        "points.npz", {"xy": "x"}, {"circle_task": "y"}, fractions={"train": 0.6, "valid": 0.4}
    )
    exp = _experiment(tmp_path, cfg)
    sizes = {ds.split: len(ds) for ds in exp.datasets}
    assert sizes == {"train": 30, "valid": 20}
    train = exp.datasets[0]
    assert train.X_dict["xy"].dtype == torch.float32  # float64 arrays become float32
    assert train.Y_dict["circle_task"].dtype == torch.int64
    data = np.load(tmp_path / "points.npz")
    assert np.allclose(train.X_dict["xy"].numpy(), data["x"][:30])


def test_csv_file_with_split_column_and_missing_labels(tmp_path: Path) -> None:
    rows = ["x0,x1,circle,square,split"]
    rows += ["0.1,0.2,1,,train", "1.4,1.4,0,0,train", "0.0,0.9,1,1,valid", "2,2,,0,valid"]
    (tmp_path / "pts.csv").write_text("\n".join(rows) + "\n")
    cfg = _file_config(
        "pts.csv",
        {"xy": ["x0", "x1"], "x0_only": "x0"},
        {"circle_task": "circle", "square_task": "square"},
        split_field="split",
    )
    exp = _experiment(tmp_path, cfg)
    train, valid = exp.datasets
    assert (train.split, valid.split) == ("train", "valid")
    assert torch.allclose(train.X_dict["xy"], torch.tensor([[0.1, 0.2], [1.4, 1.4]]))
    assert train.X_dict["x0_only"].shape == (2, 1)
    assert train.Y_dict["square_task"].tolist() == [-1, 0]  # empty cell -> ignore value
    assert valid.Y_dict["circle_task"].tolist() == [1, -1]


def test_per_split_files(tmp_path: Path) -> None:
    _write_npz(tmp_path / "a.npz", n=30)
    _write_npz(tmp_path / "b.npz", n=10)
    cfg = _file_config(
        {"train": "a.npz", "test": "b.npz"},
        {"xy": "x"},
        {"circle_task": "y"},  # type: ignore[arg-type]
    )
    exp = _experiment(tmp_path, cfg)
    assert [(ds.split, len(ds)) for ds in exp.datasets] == [("train", 30), ("test", 10)]


def test_missing_file_absent_column_and_bad_cell_are_named(tmp_path: Path) -> None:
    (tmp_path / "pts.csv").write_text("x0,x1,label\n0.1,0.2,1\nabc,0.3,0\n")
    _write_npz(tmp_path / "p.npz")
    cfg = tiny_config()
    cfg["data"]["datasets"] = {
        "gone": {"path": "missing.npz", "fields": {"xy": "x"}, "labels": {"circle_task": "y"}},
        "csv": {
            "path": "pts.csv",
            "fields": {"xy": ["x0", "x1"]},
            "labels": {"circle_task": "lable"},
            "fractions": {"train": 1.0},
        },
        "npz": {"path": "p.npz", "fields": {"xy": "xs"}, "labels": {"circle_task": "y"}},
    }
    with pytest.raises(DataError) as info:
        _experiment(tmp_path, cfg)
    problems = info.value.problems
    joined = "\n".join(problems)
    assert (
        f"data.datasets.gone.path: file 'missing.npz' does not exist (looked for "
        f"{tmp_path.resolve() / 'missing.npz'})"
    ) in joined
    assert (
        "data.datasets.csv.fields.xy: column 'x0' of 'pts.csv' holds 'abc' in data row 2" in joined
    )
    assert (
        "data.datasets.csv.labels.circle_task: 'pts.csv' has no column 'lable' (did you mean "
        "'label'?)"
    ) in joined
    assert "data.datasets.npz.fields.xy: 'p.npz' has no array 'xs' (did you mean 'x'?)" in joined
    assert len(problems) == 4  # each once, not once per split
    assert str(info.value).startswith("cannot load the data (")


def test_unreadable_files_and_a_missing_split_field_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "pts.csv").write_text("x0,x1,label\n0.1,0.2,1\n")
    cfg = tiny_config()
    cfg["data"]["datasets"] = {
        "empty": {"path": "empty.csv", "fields": {"xy": "x0"}, "labels": {"circle_task": "y"}},
        "cut": {
            "path": "pts.csv",
            "split_field": "splt",
            "fields": {"xy": ["x0", "x1"]},
            "labels": {"circle_task": "label"},
        },
    }
    with pytest.raises(DataError) as info:
        _experiment(tmp_path, cfg)
    assert info.value.problems == [
        "data.datasets.empty.path: cannot read 'empty.csv' as csv: the file is empty; the first "
        "row must name the columns",
        "data.datasets.cut.split_field: 'pts.csv' has no column or array 'splt'; it has "
        "'label', 'x0', 'x1'",
    ]


def test_out_of_range_labels_name_file_and_field(tmp_path: Path) -> None:
    _write_npz(tmp_path / "p.npz", y=np.array([0, 1, 2] * 16 + [0, 1]))
    cfg = _file_config("p.npz", {"xy": "x"}, {"circle_task": "y"}, fractions={"train": 1.0})
    with pytest.raises(DataError) as info:
        _experiment(tmp_path, cfg)
    assert info.value.problems == [
        "data.datasets.points.labels.circle_task: array 'y' of 'p.npz' (train split) for task "
        "'circle_task': label 2 (row 2; 15 more) is outside 0..1: the head outputs 2 classes; "
        "fix the label or the head's output size"
    ]


def test_binary_labels_must_be_zero_or_one(tmp_path: Path) -> None:
    _write_npz(tmp_path / "p.npz", y=np.array([0, 1, 3, 1, 0] * 10))
    cfg = _file_config("p.npz", {"xy": "x"}, {"circle_task": "y"}, fractions={"train": 1.0})
    cfg["tasks"]["circle_task"]["task_type"] = "binary"
    cfg["modules"]["circle_head"]["out_features"] = 1
    with pytest.raises(
        DataError, match=r"array 'y' of 'p.npz' .*: label 3 \(row 2; 9 more\) is not 0 or 1"
    ):
        _experiment(tmp_path, cfg)


def test_checkpoint_metric_must_be_logged(tmp_path: Path) -> None:
    cfg = tiny_config(checkpoint_metric="circle_task/circles/valid/acuracy")
    with pytest.raises(
        ConfigError,
        match=r"trainer.checkpoint_metric: 'circle_task/circles/valid/"
        r"acuracy' is not a key this training logs \(did you mean 'circle_task/"
        r"circles/valid/accuracy'\?\)",
    ):
        _experiment(tmp_path, cfg)


def test_python_api_builds_the_same_objects(tmp_path: Path) -> None:
    """Everything the YAML says, Python says: a mapping builds the same experiment."""
    cfg = parse_config(tiny_config())
    model = build_model(cfg)
    datasets, _ = load_datasets(cfg)
    loaders = [DictDataLoader(ds, batch_size=16) for ds in datasets]
    trainer = Trainer(n_epochs=2, lr=0.05, progress_bar=False)
    trainer.fit(model, loaders)
    exp = build_experiment(cfg)
    exp.trainer.fit(exp.model, exp.loaders)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), exp.model.parameters(), strict=True)
    )
    assert trainer.history == exp.trainer.history
