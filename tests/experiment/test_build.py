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
from mtlgraph.experiment.build import build_experiment, build_model
from mtlgraph.experiment.config import load_config, parse_config
from mtlgraph.experiment.sources import load_datasets


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


def test_a_dataset_block_shuffles_its_training_split_only(tmp_path: Path) -> None:
    from mtlgraph import ConfigError

    cfg = tiny_config()
    cfg["data"]["shuffle"] = True
    cfg["data"]["datasets"]["circles"]["shuffle_block"] = 4
    exp = _experiment(tmp_path, cfg)
    blocks = {(dl.dataset.name, dl.dataset.split): dl.sampler.block for dl in exp.loaders}
    assert blocks[("circles", "train")] == 4 and blocks[("squares", "train")] == 1
    assert all(block == 1 for (_, split), block in blocks.items() if split != "train")
    cfg["data"]["datasets"]["circles"]["shuffle_block"] = 0
    with pytest.raises(ConfigError, match=r"shuffle_block: must be >= 1"):
        _experiment(tmp_path, cfg)


# ---------------------------------------------------------------- files


def _file_config(path: str, fields: dict, labels: dict, **extra: object) -> dict:
    cfg = tiny_config()
    source = {"type": "table", "path": path, **extra}
    cfg["data"]["datasets"] = {"points": {"source": source, "fields": fields, "labels": labels}}
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
        split_column="split",
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
        "gone": {
            "source": {"type": "table", "path": "missing.npz"},
            "fields": {"xy": "x"},
            "labels": {"circle_task": "y"},
        },
        "csv": {
            "source": {"type": "table", "path": "pts.csv", "fractions": {"train": 1.0}},
            "fields": {"xy": ["x0", "x1"]},
            "labels": {"circle_task": "lable"},
        },
        "npz": {
            "source": {"type": "table", "path": "p.npz"},
            "fields": {"xy": "xs"},
            "labels": {"circle_task": "y"},
        },
    }
    with pytest.raises(DataError) as info:
        _experiment(tmp_path, cfg)
    problems = info.value.problems
    base = tmp_path.resolve()
    assert problems == [
        f"data.datasets.gone.source.path: file '{base / 'missing.npz'}' does not exist",
        f"data.datasets.csv.fields.xy: '{base / 'pts.csv'}' line 3, column 'x0': 'abc' is not "
        "a number; an input field needs numbers (declare the column under 'text' to tokenise it)",
        f"data.datasets.csv.labels.circle_task: '{base / 'pts.csv'}' has no column 'lable' "
        "(did you mean 'label'?); it has 'label', 'x0', 'x1'",
        f"data.datasets.npz.fields.xy: '{base / 'p.npz'}' has no column 'xs' (did you mean "
        "'x'?); it has 'x', 'y'",
    ]
    assert str(info.value).startswith("cannot load the data (4 problems)")


def test_unreadable_files_and_a_missing_split_column_are_named(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "pts.csv").write_text("x0,x1,label\n0.1,0.2,1\n")
    cfg = tiny_config()
    cfg["data"]["datasets"] = {
        "empty": {
            "source": {"type": "table", "path": "empty.csv"},
            "fields": {"xy": "x0"},
            "labels": {"circle_task": "y"},
        },
        "cut": {
            "source": {"type": "table", "path": "pts.csv", "split_column": "splt"},
            "fields": {"xy": ["x0", "x1"]},
            "labels": {"circle_task": "label"},
        },
    }
    with pytest.raises(DataError) as info:
        _experiment(tmp_path, cfg)
    base = tmp_path.resolve()
    assert info.value.problems == [
        f"data.datasets.empty.source.path: '{base / 'empty.csv'}' is empty; its first line must "
        "name the columns",
        f"data.datasets.cut.source.split_column: '{base / 'pts.csv'}' has no split column "
        "'splt'; it has 'label', 'x0', 'x1'",
    ]


def test_the_old_dataset_spelling_shows_the_source_to_write(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["data"]["datasets"]["circles"] = {
        "path": "pts.csv",
        "format": "csv",
        "split_field": "split",
        "fields": {"xy": ["x0", "x1"]},
        "labels": {"circle_task": "label"},
    }
    cfg["data"]["datasets"]["squares"] = {
        "generator": "square",
        "args": {"n": 20},
        "fields": {"xy": "x"},
        "labels": {"square_task": "y"},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    assert info.value.problems == [
        "<config>: data.datasets.circles: 'path', 'format', 'split_field': a dataset is declared by one "
        "'source:'; write source: {type: table, path: pts.csv, format: csv, split_column: split}",
        "<config>: data.datasets.squares: 'generator', 'args': a dataset is declared by one 'source:'; "
        "write source: {type: generator, name: square, args: {n: 20}}",
    ]


def test_out_of_range_labels_name_file_and_field(tmp_path: Path) -> None:
    _write_npz(tmp_path / "p.npz", y=np.array([0, 1, 2] * 16 + [0, 1]))
    cfg = _file_config("p.npz", {"xy": "x"}, {"circle_task": "y"}, fractions={"train": 1.0})
    with pytest.raises(DataError) as info:
        _experiment(tmp_path, cfg)
    assert info.value.problems == [
        "data.datasets.points.labels.circle_task: column 'y' of "
        f"'{tmp_path.resolve() / 'p.npz'}' (train split) for task "
        "'circle_task': label 2 (row 2; 15 more) is outside 0..1: the head outputs 2 classes; "
        "fix the label or the head's output size"
    ]


def test_binary_labels_must_be_zero_or_one(tmp_path: Path) -> None:
    _write_npz(tmp_path / "p.npz", y=np.array([0, 1, 3, 1, 0] * 10))
    cfg = _file_config("p.npz", {"xy": "x"}, {"circle_task": "y"}, fractions={"train": 1.0})
    cfg["tasks"]["circle_task"]["task_type"] = "binary"
    cfg["modules"]["circle_head"]["out_features"] = 1
    with pytest.raises(
        DataError, match=r"column 'y' of '.*p.npz' .*: label 3 \(row 2; 9 more\) is not 0 or 1"
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
    datasets = load_datasets(cfg).datasets
    loaders = [DictDataLoader(ds, batch_size=16) for ds in datasets]
    trainer = Trainer(n_epochs=2, lr=0.05, progress_bar=False)
    trainer.fit(model, loaders)
    exp = build_experiment(cfg)
    exp.trainer.fit(exp.model, exp.loaders)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), exp.model.parameters(), strict=True)
    )
    assert trainer.history == exp.trainer.history
