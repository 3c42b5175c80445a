"""mtlgraph.compat.snorkel: the seed tutorial with only its import lines changed, Snorkel's
argument names translated, and Snorkel's silent behaviours still refused with an explanation."""

from __future__ import annotations

import logging
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mtlgraph
from mtlgraph import ConfigError, GraphError
from mtlgraph.compat import snorkel
from mtlgraph.compat.snorkel import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Scorer,
    SnorkelCompatNote,
    Task,
    Trainer,
    cross_entropy_with_probs,
    snorkel_to_mtlgraph,
)

HERE = Path(__file__).resolve().parent
SEED = HERE / "snorkel_seed_tutorial.py"


@pytest.mark.slow
def test_seed_tutorial_runs_with_only_its_imports_changed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code = [ln for ln in SEED.read_text().splitlines() if not ln.startswith("#")]
    assert not any("snorkel." in ln.replace("mtlgraph.compat.snorkel", "") for ln in code)
    imports = [ln for ln in code if "mtlgraph" in ln]
    assert all(ln.startswith("from mtlgraph.compat.snorkel import ") for ln in imports)
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.delitem(sys.modules, "utils", raising=False)
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the tutorial draws from the global generator: whatever ran before
    try:
        ns = runpy.run_path(str(SEED), run_name="seed_tutorial")
    finally:
        sys.modules.pop("utils", None)
        torch.set_num_threads(threads)
        torch.set_rng_state(rng)
    scores, all_scores = ns["scores"], ns["all_scores"]
    assert sorted(scores) == sorted(
        f"{t}_task/{t}Dataset/{s}/accuracy"
        for t in ("circle", "square")
        for s in ("train", "valid", "test")
    )
    assert "inv_circle_task/InvCircleDataset/train/accuracy" in all_scores
    assert min(all_scores.values()) >= 0.9, all_scores
    assert isinstance(ns["model"], mtlgraph.MultitaskClassifier)
    assert "Training data shape: (800, 2)" in capsys.readouterr().out


def test_names_are_mtlgraph_objects() -> None:
    assert issubclass(DictDataset, mtlgraph.DictDataset)
    assert issubclass(MultitaskClassifier, mtlgraph.MultitaskClassifier)
    assert issubclass(Trainer, mtlgraph.Trainer) and issubclass(Scorer, mtlgraph.Scorer)
    assert issubclass(Operation, mtlgraph.Operation) and issubclass(Task, mtlgraph.Task)
    from mtlgraph.graph.losses import cross_entropy_with_probs as ours

    assert cross_entropy_with_probs is ours
    assert set(snorkel.__all__) >= {"DictDataset", "Trainer", "Scorer", "cross_entropy_with_probs"}


def test_from_tensors_both_spellings() -> None:
    X, Y = torch.zeros(4, 2), torch.tensor([0, 1, 1, 0])
    ds = DictDataset.from_tensors(X, Y, "valid")
    assert (ds.name, ds.split, list(ds.X_dict), list(ds.Y_dict)) == (
        "SnorkelDataset",
        "valid",
        ["input_data"],
        ["task"],
    )
    ours = mtlgraph.DictDataset.from_tensors(X, Y, name="pts", input_field="xy", task_name="t")
    assert (ours.name, ours.split, list(ours.X_dict), list(ours.Y_dict)) == (
        "pts",
        "train",
        ["xy"],
        ["t"],
    )
    with pytest.raises(mtlgraph.DataError, match="fields have different lengths"):
        mtlgraph.DictDataset.from_tensors(X, Y[:3], name="pts")


def test_trainer_arguments_are_translated() -> None:
    cfg = snorkel_to_mtlgraph(
        {
            "n_epochs": 2,
            "l2": 0.1,
            "valid_split": "dev",
            "optimizer": "sgd",
            "lr_scheduler": "linear",
            "lr_scheduler_config": {"warmup_steps": 2, "warmup_unit": "epochs", "min_lr": 0.001},
            "logging": True,
            "log_writer": "json",
            "log_writer_config": {"log_dir": "logs", "run_name": "r1"},
            "log_manager_config": {"counter_unit": "batches", "evaluation_freq": 10},
            "checkpointing": True,
            "checkpointer_config": {"checkpoint_metric": "task/ds/dev/accuracy:max"},
        }
    )
    assert cfg["weight_decay"] == 0.1 and cfg["eval_splits"] == ["dev"]
    assert cfg["optimizer"] == {"name": "sgd", "momentum": 0.9}  # Snorkel's sgd default
    assert cfg["lr_scheduler"] == {"name": "linear", "min_factor": pytest.approx(0.1)}
    assert cfg["warmup_epochs"] == 2.0 and cfg["grad_clip"] == 1.0
    assert cfg["run_dir"] == "checkpoints"  # Snorkel's default checkpoint_dir
    (writer,) = cfg["writers"]  # the logs stay in log_dir/run_name
    assert (writer.name, writer.directory) == ("jsonl", Path("logs") / "r1")
    logs_only = snorkel_to_mtlgraph({"logging": True, "log_writer_config": {"run_name": "r"}})
    assert (logs_only["run_dir"], logs_only["writers"]) == (
        str(Path("logs") / "r"),
        ["tensorboard"],
    )
    assert snorkel_to_mtlgraph({"lr_scheduler": "step"})["lr_scheduler"] == {
        "name": "step",
        "unit": "steps",
        "gamma": 0.9,
        "step_size": 5,
    }  # Snorkel's StepLR defaults, stepped per batch
    assert (cfg["evaluation_unit"], cfg["evaluation_freq"], cfg["checkpoint_every"]) == (
        "steps",
        10,
        10,
    )
    assert (cfg["checkpoint_metric"], cfg["checkpoint_mode"]) == ("task/ds/dev/accuracy", "max")
    assert snorkel_to_mtlgraph({})["writers"] == []  # logging off: no files
    trainer = Trainer(
        name="t", optimizer="adamax", optimizer_config={"adamax_config": {"eps": 1e-6}}
    )
    assert trainer.config.optimizer == {"name": "adamax", "betas": (0.9, 0.999), "eps": 1e-6}


def test_untranslatable_settings_say_how_snorkel_differed() -> None:
    with pytest.raises(ConfigError) as info:
        Trainer(
            n_epoch=3,
            lr_scheduler="exponential",
            lr_scheduler_config={"exponential_config": {"gama": 0.5}},
            log_manager_config={"counter_unit": "points"},
            checkpointing=True,
            checkpointer_config={"checkpoint_runway": 2},
        )
    text = str(info.value)
    assert "Trainer: unknown key 'n_epoch' (did you mean 'n_epochs'?)" in text
    assert (
        "lr_scheduler_config.exponential_config.gama: LR schedule 'exponential' takes no "
        "argument 'gama' (did you mean 'gamma'?)"
    ) in text
    assert "counter_unit: 'points' has no mtlgraph equivalent" in text
    assert "checkpoint_runway: not supported" in text
    with pytest.raises(ConfigError, match="collate_fn is not supported"):
        DictDataLoader(
            DictDataset.from_tensors(torch.zeros(2, 1), torch.zeros(2), "train"), collate_fn=list
        )


def _pool_task(name: str, head: nn.Module, base: nn.Module) -> Task:
    return Task(
        name=name,
        module_pool=nn.ModuleDict({"base": base, f"{name}_head": head}),
        op_sequence=[Operation("base", [("_input_", "x")]), Operation(f"{name}_head", ["base"])],
    )


def test_model_arguments_and_refused_conflicts(caplog: pytest.LogCaptureFixture) -> None:
    t1 = _pool_task("a", nn.Linear(4, 2), nn.Linear(2, 4))
    t2 = _pool_task("b", nn.Linear(4, 2), nn.Linear(2, 4))  # another module named "base"
    with pytest.raises(GraphError) as info:
        MultitaskClassifier([t1, t2], device=-1)
    assert "Snorkel kept the first module of a name silently" in str(info.value.__notes__)
    with pytest.warns(SnorkelCompatNote, match="dataparallel=True is ignored"):
        model = MultitaskClassifier([t1], device=-1, dataparallel=True)
    assert model.device == torch.device("cpu")
    if not torch.cuda.is_available():
        with caplog.at_level(logging.WARNING, logger="mtlgraph.compat.snorkel"):
            assert MultitaskClassifier([t1]).device == torch.device("cpu")
        assert "no CUDA device is available; using the CPU" in caplog.text
    with pytest.raises(ConfigError, match="takes no argument 'devise' \\(did you mean 'device'"):
        MultitaskClassifier([t1], devise=-1)


def test_scorer_with_abstains_and_probs_only() -> None:
    golds = np.array([0, 1, 1, -1])
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    assert Scorer(metrics=["accuracy"]).score(golds, probs=probs) == {
        "accuracy": pytest.approx(2 / 3)
    }
    assert Scorer(metrics=["accuracy"], abstain_label=None).score(golds, probs.argmax(1)) == {
        "accuracy": 0.5
    }
    assert Scorer().metric_keys == []  # Snorkel's Scorer() has no metrics
    soft = torch.tensor([[0.3, 0.7]])
    assert torch.allclose(
        cross_entropy_with_probs(torch.zeros(1, 2), soft), F.cross_entropy(torch.zeros(1, 2), soft)
    )
