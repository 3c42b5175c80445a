"""The model file is a checkpoint holding the model: written by ``model.save``, read by
``model.load`` and ``load_checkpoint``; one resolver finds a run directory's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_loader, make_task
from torch import nn

from mtlgraph import MultitaskClassifier, Trainer
from mtlgraph.exceptions import CheckpointError
from mtlgraph.graph.model_file import FORMAT, VERSION, load_model_state
from mtlgraph.training.checkpoint import (
    BEST,
    LAST,
    load_checkpoint,
    resolve_checkpoint,
    run_directory,
)


def _model(seed: int = 0) -> MultitaskClassifier:
    torch.manual_seed(seed)
    trunk = nn.Linear(2, 4)
    return MultitaskClassifier([make_task("a", trunk), make_task("b", trunk)])


def _same(m1: nn.Module, m2: nn.Module) -> bool:
    s1, s2 = m1.state_dict(), m2.state_dict()
    return list(s1) == list(s2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_a_model_file_is_a_checkpoint_that_the_resume_path_reads(tmp_path: Path) -> None:
    model = _model(0)
    model.save(tmp_path / "model.pt")
    state = load_checkpoint(tmp_path / "model.pt")
    assert sorted(state) == ["format", "model", "task_names", "version"]
    assert (state["format"], state["version"], state["task_names"]) == (FORMAT, VERSION, ["a", "b"])
    fresh = _model(1)
    assert not _same(model, fresh)
    load_model_state(fresh, state, "the model file")  # what Trainer.fit(resume_from=...) calls
    assert _same(model, fresh)


def test_model_load_reads_a_training_checkpoint(tmp_path: Path) -> None:
    model = _model(0)
    X = torch.randn(16, 2)
    loaders = [make_loader("d", "train", {"x": X}, {"a": (X[:, 0] > 0).long()}, 8)]
    Trainer(n_epochs=1, lr=0.1, progress_bar=False, run_dir=str(tmp_path)).fit(model, loaders)
    checkpoint = tmp_path / "checkpoints" / LAST
    assert load_checkpoint(checkpoint)["run"]  # a training checkpoint, not a model file
    fresh = _model(1)
    fresh.load(checkpoint)
    assert _same(model, fresh)
    fresh.save(tmp_path / "model.pt")  # and back: the model part of the checkpoint, no more
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    trained = torch.load(checkpoint, weights_only=True)
    assert {k: saved[k] for k in ("format", "version", "task_names")} == {
        k: trained[k] for k in ("format", "version", "task_names")
    }


def test_a_model_file_of_an_older_release_is_read(tmp_path: Path) -> None:
    model = _model(0)
    old = {"format": "mtlgraph.model", "version": 1, "task_names": ["a", "b"]}
    torch.save({**old, "state_dict": model.state_dict()}, tmp_path / "old.pt")
    fresh = _model(1)
    fresh.load(tmp_path / "old.pt")
    assert _same(model, fresh)
    assert load_checkpoint(tmp_path / "old.pt")["format"] == FORMAT


def test_a_refused_load_names_the_file_and_changes_nothing(tmp_path: Path) -> None:
    _model(0).save(tmp_path / "m.pt")
    other = MultitaskClassifier([make_task("c", nn.Linear(2, 4))])
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'.*m\.pt' is from another model: it holds"):
        other.load(tmp_path / "m.pt")
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_the_resolver_finds_best_then_last_in_a_run_directory(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    for name in (LAST, BEST):
        _model().save(tmp_path / "checkpoints" / name)
    assert resolve_checkpoint(tmp_path) == tmp_path / "checkpoints" / LAST
    assert resolve_checkpoint(tmp_path, (BEST, LAST)) == tmp_path / "checkpoints" / BEST
    (tmp_path / "checkpoints" / BEST).unlink()
    assert resolve_checkpoint(tmp_path, (BEST, LAST)) == tmp_path / "checkpoints" / LAST
    file = tmp_path / "checkpoints" / LAST
    assert resolve_checkpoint(file, (BEST, LAST)) == file  # a file is itself
    assert run_directory(file) == run_directory(tmp_path) == tmp_path
    assert run_directory(tmp_path / "elsewhere.pt") == tmp_path


def test_the_resolver_names_the_path_and_what_it_looked_for(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint '.*nope\.pt' does not exist"):
        resolve_checkpoint(tmp_path / "nope.pt")
    looked = f"{tmp_path}/checkpoints/best.pt, {tmp_path}/best.pt, {tmp_path}/checkpoints/last.pt"
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(tmp_path, (BEST, LAST))
    assert f"no checkpoint in directory '{tmp_path}': looked for {looked}" in str(info.value)
