"""Bad-input corpus, files: model files, checkpoints and resumes that do not fit. Every refused
load leaves every parameter unchanged and names the file and the reason."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from corpus_helpers import class_labels, loaders, params_of, tiny_model
from torch import nn

from mtlgraph import CheckpointError, MultitaskClassifier, Operation, Task, Trainer
from mtlgraph.training.checkpoint import load_checkpoint


def _unchanged(model: nn.Module, before: list[torch.Tensor]) -> bool:
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def _two_head_model(names: tuple[str, str] = ("a", "b"), width: int = 3) -> MultitaskClassifier:
    torch.manual_seed(1)
    trunk = nn.Linear(2, 4)
    return MultitaskClassifier(
        [
            Task(
                n,
                {"trunk": trunk, f"head{i}": nn.Linear(4, width)},
                [Operation("trunk", [("_input_", "x")]), Operation(f"head{i}", ["trunk"])],
            )
            for i, n in enumerate(names)
        ]
    )


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "m.pt"
    _two_head_model().save(path)
    return path


# ---------------------------------------------------------------- model.load (all or nothing)


LOAD_CASES: list[tuple[str, Callable[[], MultitaskClassifier], str]] = [
    ("other shapes", lambda: _two_head_model(width=5), r"'module_pool.head0.weight' has shape \(3, 4\) in the file, \(5, 4\) in the model"),
    ("renamed tasks, same modules", lambda: _two_head_model(("a", "c")), r"it holds the weights of tasks \['a', 'b'\], the model has \['a', 'c'\] \(not in the model: 'b'\)"),
    ("fewer tasks", lambda: MultitaskClassifier([_two_head_model().tasks["a"]]), r"unexpected 'module_pool.head1.weight', 'module_pool.head1.bias'"),
    ("another model entirely", lambda: tiny_model(), r"'.*m.pt' is from another model: it holds the weights of tasks \['a', 'b'\], the model has \['t'\]"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES])  # fmt: skip
def test_model_load_of_another_model_changes_nothing(
    saved: Path, build: Callable[[], MultitaskClassifier], message: str
) -> None:
    model = build()
    before = params_of(model)
    with pytest.raises(CheckpointError, match=message):
        model.load(saved)
    assert _unchanged(model, before)


def test_model_load_of_a_pickled_object_is_refused_like_checkpoints(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"format": "mtlgraph.model", "state_dict": Path("x")}, path)  # any object
    with pytest.raises(CheckpointError, match=r"refusing to load checkpoint '.*evil.pt': it holds a pickled Python object"):  # fmt: skip
        _two_head_model().load(path)
    with pytest.raises(CheckpointError, match=r"it holds a pickled Python object"):
        load_checkpoint(path)


def test_model_load_of_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        _two_head_model().load(tmp_path / "nope.pt")


CORRUPT: list[tuple[str, Callable[[Path, Path], None]]] = [
    ("empty file", lambda src, dst: dst.write_bytes(b"")),
    ("truncated", lambda src, dst: dst.write_bytes(src.read_bytes()[: len(src.read_bytes()) // 2])),
    ("text", lambda src, dst: dst.write_text("hello")),
    ("zip header only", lambda src, dst: dst.write_bytes(b"PK\x03\x04 not a zip")),
    ("pickle of a list", lambda src, dst: dst.write_bytes(pickle.dumps([1, 2, 3], protocol=2))),
    ("random bytes", lambda src, dst: dst.write_bytes(bytes(range(256)) * 4)),
]  # fmt: skip


@pytest.mark.parametrize("corrupt", [c[1] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
@pytest.mark.parametrize("reader", ["model.load", "load_checkpoint"])
def test_corrupt_files_say_so(
    saved: Path, tmp_path: Path, corrupt: Callable[[Path, Path], None], reader: str
) -> None:  # fmt: skip
    bad = tmp_path / "bad.pt"
    corrupt(saved, bad)
    model = _two_head_model()
    before = params_of(model)
    read: dict[str, Callable[[], Any]] = {
        "model.load": lambda: model.load(bad),
        "load_checkpoint": lambda: load_checkpoint(bad),
    }
    with pytest.raises(CheckpointError) as info:
        read[reader]()
    text = str(info.value)
    assert "bad.pt" in text
    assert "not an mtlgraph checkpoint, or a truncated or corrupt file" in text or "is not" in text
    for useless in ("Errno", "pop from empty list", ": \n", "PytorchStreamReader"):
        assert useless not in text
    assert _unchanged(model, before)


# ---------------------------------------------------------------- resume


def _run(tmp_path: Path, model: MultitaskClassifier, **cfg: Any) -> Trainer:
    trainer = Trainer(n_epochs=1, progress_bar=False, run_dir=str(tmp_path), **cfg)
    y = class_labels()
    dls = [dl for name in model.task_names for dl in loaders(y, task=name)]
    for i, dl in enumerate(dls):  # distinct dataset names per task
        dl.dataset.name = f"d{i // 2}"
    trainer.fit(model, dls)
    return trainer


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (
            lambda: _two_head_model(width=5),
            r"has shape \(3, 4\) in the file, \(5, 4\) in the model",
        ),
        (lambda: _two_head_model(("a", "c")), r"tasks \['a', 'b'\], the model has \['a', 'c'\]"),
    ],
    ids=["other shapes", "renamed task"],
)
def test_resume_of_another_model_changes_nothing(
    tmp_path: Path, other: Callable[[], MultitaskClassifier], message: str
) -> None:
    _run(tmp_path, _two_head_model())
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    model = other()
    before = params_of(model)
    trainer = Trainer(n_epochs=2, progress_bar=False, run_dir=str(tmp_path))
    y = class_labels()
    dls = [dl for name in model.task_names for dl in loaders(y, task=name)]
    for i, dl in enumerate(dls):
        dl.dataset.name = f"d{i // 2}"
    with pytest.raises(CheckpointError, match=message):
        trainer.fit(model, dls, resume_from=tmp_path)
    assert _unchanged(model, before)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files


def test_resume_with_other_batch_counts(tmp_path: Path) -> None:
    _run(tmp_path, _two_head_model(), checkpoint_every=1)
    model = _two_head_model()
    trainer = Trainer(n_epochs=2, progress_bar=False, run_dir=str(tmp_path))
    y = class_labels()
    dls = [dl for name in model.task_names for dl in loaders(y, task=name, batch_size=4)]
    for i, dl in enumerate(dls):
        dl.dataset.name = f"d{i // 2}"
    with pytest.raises(CheckpointError, match=r"cannot resume: the checkpoint's training loaders had \[4, 4\] batches, these have \[8, 8\]"):  # fmt: skip
        trainer.fit(model, dls, resume_from=tmp_path)


def test_resume_from_nothing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"no checkpoint in directory"):
        Trainer(progress_bar=False).fit(tiny_model(), loaders(class_labels()), resume_from=tmp_path)


def test_resume_of_a_finished_run_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    trainer = _run(tmp_path, tiny_model())
    rows = (tmp_path / "metrics.jsonl").read_text()
    model = tiny_model()
    with caplog.at_level("INFO", logger="mtlgraph"):
        Trainer(n_epochs=1, progress_bar=False, run_dir=str(tmp_path)).fit(
            model, loaders(class_labels(), task="t"), resume_from=tmp_path
        )
    assert "the checkpoint's run is finished (1 of 1 epochs)" in caplog.text
    assert "resuming at epoch 2" not in caplog.text
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    assert trainer.history


def test_resume_right_after_an_epoch_end_evaluation_logs_it_once(tmp_path: Path) -> None:
    # checkpoint at each step (the last step of an epoch included), evaluation at epoch ends:
    # the epoch-end evaluation comes after the step's checkpoint
    import json

    cfg = {"checkpoint_every": 4, "checkpoint_unit": "steps", "writers": ["jsonl"]}
    _run(tmp_path, tiny_model(), **cfg)  # 4 steps, 1 epoch: checkpoint at step 4, then eval
    model = tiny_model()
    Trainer(n_epochs=1, progress_bar=False, run_dir=str(tmp_path), **cfg).fit(
        model, loaders(class_labels(), task="t"), resume_from=tmp_path
    )
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
    assert steps == [4]
