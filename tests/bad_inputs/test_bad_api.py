"""Bad-input corpus, Python API: labels, non-finite values, dtypes, splits, prediction, scorers,
trainer settings, tasks and datasets. Each case asserts the exception type AND that the message
names the culprit (dataset, split, task, field, key, value)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from corpus_helpers import N, class_labels, loaders, params_of, tiny_model, tiny_task
from torch import nn

from mtlgraph import (
    ConfigError,
    DataError,
    DictDataLoader,
    DictDataset,
    GraphError,
    MultitaskClassifier,
    Operation,
    Scorer,
    Task,
    TaskDefinitionError,
    Trainer,
    TrainingError,
)
from mtlgraph.training.labels import batch_label_problems, head_widths


def _fit(model: MultitaskClassifier, dls: list[DictDataLoader], **cfg: Any) -> Trainer:
    trainer = Trainer(**{"n_epochs": 1, "progress_bar": False, **cfg})
    trainer.fit(model, dls)
    return trainer


# ---------------------------------------------------------------- labels

_nan = float("nan")
LABEL_CASES: list[tuple[str, dict[str, Any], Any, str]] = [
    ("class id >= n_classes", {}, torch.tensor([0, 1, 2, 3] * 8), r"label 3 \(row 3; 7 more\) is outside 0\.\.2: the head outputs 3 classes"),
    ("-100 with ignore -1", {}, torch.tensor([0, 1, 2, -100] * 8), r"label -100 .* not the task's ignore value \(-1\); set Task\(ignore_value=-100\)"),
    ("negative class id, ignore None", {"ignore_value": None}, torch.tensor([0, -1] * 16), r"label -1 .* is negative and not the task's ignore value \(None\)"),
    ("fractional multiclass", {}, torch.tensor([0.0, 1.5] * 16), r"label 1\.5 \(row 1; 15 more\) is fractional; a multiclass task takes class ids 0\.\.2"),
    ("NaN class label", {}, torch.tensor([0.0, _nan] * 16), r"label nan .* is not a finite number; mark missing labels with the task's ignore value \(-1\)"),
    ("multiclass (N, 2) integer labels", {}, torch.zeros(N, 2, dtype=torch.long), r"labels of shape \(32, 2\); a multiclass task takes class ids of shape \(N,\)"),
    ("binary head with 2 outputs", {"task_type": "binary", "outputs": 2}, torch.tensor([0, 1] * 16), r"the head of binary task 't' outputs 2 values; a binary task needs one logit"),
    ("binary label 2", {"task_type": "binary", "outputs": 1}, torch.tensor([0, 1, 2, 1] * 8), r"label 2 \(row 2; 7 more\) is not 0 or 1; binary labels are 0 or 1"),
    ("binary -100", {"task_type": "binary", "outputs": 1}, torch.tensor([0, -100] * 16), r"label -100 .* not the task's ignore value"),
    ("binary (N, 3) labels", {"task_type": "binary", "outputs": 1}, torch.zeros(N, 3), r"labels of shape \(32, 3\); a binary task takes 0/1 labels of shape \(N,\) or \(N, 1\)"),
    ("binary float 0/2", {"task_type": "binary", "outputs": 1}, torch.tensor([0.0, 2.0] * 16), r"label 2 .* is not 0 or 1"),
    ("multilabel width", {"task_type": "multilabel", "outputs": 3}, torch.zeros(N, 2), r"labels have 2 columns, the head outputs 3 logits"),
    ("multilabel 1-D", {"task_type": "multilabel", "outputs": 3}, torch.zeros(N), r"labels of shape \(32,\); a multilabel task takes 0/1 labels of shape \(N, L\)"),
    ("multilabel value 3", {"task_type": "multilabel", "outputs": 2}, torch.tensor([[0, 3]] * N), r"label 3 \(row 0, column 1; 31 more\) is not 0 or 1"),
    ("regression inf", {"task_type": "regression", "outputs": 1}, torch.tensor([1.0, math.inf] * 16), r"label inf .* is infinite; mark missing labels with the task's ignore value \(nan\)"),
    ("regression columns", {"task_type": "regression", "outputs": 2}, torch.zeros(N, 3), r"labels have 3 columns, the head outputs 2 values"),
    ("all training labels ignored", {}, torch.full((N,), -1), r"dataset 'd' \(train\), task 't': every training label equals the ignore value \(-1\)"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("model_kwargs", "y", "message"),
    [c[1:] for c in LABEL_CASES],
    ids=[c[0] for c in LABEL_CASES],
)
def test_bad_labels_are_refused_before_training(
    model_kwargs: dict[str, Any],
    y: torch.Tensor,
    message: str,
) -> None:
    model = tiny_model(**model_kwargs)
    before = params_of(model)
    with pytest.raises(DataError, match=message) as info:
        _fit(model, loaders(y, splits=("train",)))
    assert "dataset 'd' (train), task 't'" in str(info.value)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))


def test_every_label_problem_is_reported_at_once() -> None:
    model = MultitaskClassifier([tiny_task("a"), tiny_task("b", task_type="binary", outputs=1)])
    x = torch.randn(N, 2)
    dls = [
        DictDataLoader(DictDataset("d", "train", {"x": x}, {"a": class_labels(), "b": class_labels()})),
        DictDataLoader(DictDataset("e", "valid", {"x": x}, {"a": class_labels(classes=5)})),
    ]  # fmt: skip
    with pytest.raises(DataError) as info:
        _fit(model, dls)
    assert len(info.value.problems) == 2  # b: not 0/1 in d; a: outside 0..2 in e
    text = str(info.value)
    assert "dataset 'd' (train), task 'b'" in text and "dataset 'e' (valid), task 'a'" in text


def test_ignore_value_minus_100_is_ignored_by_loss_and_metrics_alike() -> None:
    y = class_labels()
    y[::4] = -100
    model = tiny_model(ignore_value=-100)
    dls = loaders(y)
    _fit(model, dls)
    result = model.predict(dls[1], return_preds=True)
    active = result["golds"]["t"] != -100
    expected = float((result["preds"]["t"][active] == result["golds"]["t"][active]).mean())
    assert model.score(dls[1])["t/d/valid/accuracy"] == pytest.approx(expected)


def test_soft_labels_are_not_rejected_by_the_label_checks() -> None:
    model = tiny_model()
    soft = torch.softmax(torch.randn(N, 3), dim=1)
    assert batch_label_problems(model, {"t": soft}, "batch 0", {"t": 3}) == []
    binary = tiny_model(task_type="binary", outputs=1)
    assert batch_label_problems(binary, {"t": torch.rand(N)}, "batch 0", {"t": 1}) == []


def test_batch_label_problems_name_the_batch() -> None:
    model = tiny_model()
    widths = head_widths(model, {"x": torch.randn(2, 2)}, ["t"])
    assert widths == {"t": 3}
    problems = batch_label_problems(
        model, {"t": torch.tensor([0, 7])}, "dataset 's' (train), batch 4", widths
    )
    assert problems == [
        "dataset 's' (train), batch 4, task 't': label 7 (row 1) is outside 0..2: the head "
        "outputs 3 classes; fix the label or the head's output size"
    ]  # fmt: skip


# ---------------------------------------------------------------- non-finite values (part 1)


def _nan_features() -> torch.Tensor:
    x = torch.randn(N, 2, generator=torch.Generator().manual_seed(0))
    x[13, 0] = math.nan
    return x


def test_nan_feature_stops_training_naming_task_dataset_epoch_and_step() -> None:
    model = tiny_model()
    before = params_of(model)
    dls = loaders(class_labels(), x=_nan_features(), splits=("train",))
    with pytest.raises(
        TrainingError,
        match=r"non-finite loss at epoch 1, step 2: task 't' on dataset 'd' has loss nan",
    ):
        _fit(model, dls, n_epochs=2)
    # the first step (rows 0-7) trained; the bad one (rows 8-15) did not touch the weights
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert not all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))  # fmt: skip


def test_inf_label_of_regression_is_caught_before_the_guard() -> None:
    model = tiny_model(task_type="regression", outputs=1)
    with pytest.raises(DataError, match="task 't': label inf"):
        _fit(model, loaders(torch.tensor([0.5, math.inf] * 16), splits=("train",)))


def test_skip_batch_drops_the_update_and_counts_skips() -> None:
    model = tiny_model()
    dls = loaders(class_labels(), x=_nan_features())
    trainer = _fit(model, dls, n_epochs=2, nonfinite="skip_batch")
    assert trainer.history[-1]["model/all/train/skipped_batches"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert math.isfinite(trainer.history[-1]["t/d/train/loss"])  # skipped losses not logged
    assert math.isnan(trainer.history[-1]["t/d/valid/accuracy"])  # a NaN input row: NaN score


def test_warn_mode_logs_and_applies(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_model()
    with caplog.at_level(logging.WARNING, logger="mtlgraph"):
        _fit(model, loaders(class_labels(), x=_nan_features(), splits=("train",)), nonfinite="warn")
    assert "non-finite loss at epoch 1, step 2: task 't' on dataset 'd' has loss nan; update applied" in caplog.text  # fmt: skip
    assert not all(torch.isfinite(p).all() for p in model.parameters())


class _NanGrad(nn.Module):
    """Finite forward, NaN gradient (sqrt at 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + torch.sqrt(self.lin.weight.sum() * 0.0)


def test_nonfinite_gradient_norm_is_caught_when_clipping() -> None:
    task = Task("t", {"h": _NanGrad()}, [Operation("h", [("_input_", "x")])])
    model = MultitaskClassifier([task])
    with pytest.raises(
        TrainingError, match=r"non-finite gradient norm \(nan\) at epoch 1, step 1, tasks 't'"
    ):
        _fit(model, loaders(class_labels(), splits=("train",)), grad_clip=1.0)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_scores_of_nonfinite_outputs_are_nan() -> None:
    scorer = Scorer(["accuracy", "f1"])
    golds = np.array([0, 1, 1])
    probs = np.array([[0.9, 0.1], [np.nan, np.nan], [0.2, 0.8]])
    scores = scorer.score(golds, np.array([0, 0, 1]), probs)
    assert all(math.isnan(v) for v in scores.values())


def test_invalid_nonfinite_mode() -> None:
    with pytest.raises(ConfigError, match="nonfinite"):
        Trainer(nonfinite="ignore")


# ---------------------------------------------------------------- dtypes (part 3)


def test_float64_numpy_features_are_converted_at_the_dataset() -> None:
    x = np.random.default_rng(0).normal(size=(N, 2))
    ds = DictDataset("d", "train", {"x": x}, {"t": class_labels()})
    assert ds.X_dict["x"].dtype == torch.float32
    _fit(tiny_model(), [DictDataLoader(ds, batch_size=8)])


def test_float64_tensor_features_name_the_field() -> None:
    dls = loaders(class_labels(), x=torch.randn(N, 2, dtype=torch.float64), splits=("train",))
    with pytest.raises(
        DataError,
        match=r"dataset 'd' \(train\): input field 'x' is torch.float64, the model's parameters are torch.float32",
    ):
        _fit(tiny_model(), dls)


# ---------------------------------------------------------------- splits and no-ops (part 6)


def test_loader_of_an_unused_split_is_named(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mtlgraph"):
        _fit(tiny_model(), loaders(class_labels(), splits=("train", "validation")), eval_splits=["validation", "test"][:1])  # fmt: skip
    assert "split 'validation'" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="mtlgraph"), pytest.raises(ConfigError):
        _fit(tiny_model(), loaders(class_labels(), splits=("train", "validation")))
    assert "dataset 'd' split 'validation' is neither train_split 'train' nor in eval_splits ['valid']: it is not used during training (did you mean 'valid'?)" in caplog.text  # fmt: skip


def test_eval_splits_matching_no_loader() -> None:
    with pytest.raises(
        ConfigError, match=r"eval_splits: no loader has split 'tset' \(did you mean 'test'\?\)"
    ):
        _fit(tiny_model(), loaders(class_labels(), splits=("train", "test")), eval_splits=["tset"])  # fmt: skip


def test_train_split_matching_no_loader() -> None:
    with pytest.raises(DataError, match=r"no loader has split 'train' \(found 'training'\)"):
        _fit(tiny_model(), loaders(class_labels(), splits=("training",)))


@pytest.mark.parametrize("method", ["predict", "score"])
def test_unlabelled_loader_needs_task_names(method: str) -> None:
    model = tiny_model()
    dl = DictDataLoader(DictDataset("u", "test", {"x": torch.randn(4, 2)}, {}))
    with pytest.raises(
        GraphError, match=r"dataset 'u' \(test\) has no labels.*pass task_names=\[...\]"
    ):
        getattr(model, method)(dl)
    assert model.predict(dl, task_names=["t"])["probs"]["t"].shape == (4, 3)


def test_predict_unknown_task_name() -> None:
    dl = DictDataLoader(DictDataset("u", "test", {"x": torch.randn(4, 2)}, {}))
    with pytest.raises(GraphError, match=r"unknown task 'tt' \(did you mean 't'\?\)"):
        tiny_model().predict(dl, task_names=["tt"])


def test_score_a_label_of_no_task() -> None:
    dl = DictDataLoader(DictDataset("u", "test", {"x": torch.randn(4, 2)}, {"s": torch.zeros(4)}))
    with pytest.raises(GraphError, match=r"label 's' names no task of the model.*remap_labels"):
        tiny_model().score(dl)


def test_labels_of_a_task_the_model_lacks_at_fit() -> None:
    with pytest.raises(
        DataError,
        match=r"dataset 'd' \(train\) labels 'tt', which is no task of the model \(did you mean 't'\?\)",
    ):
        _fit(tiny_model(), loaders(class_labels(), task="tt", splits=("train",)))


def test_two_loaders_with_one_key() -> None:
    dls = loaders(class_labels(), splits=("train", "train"))
    with pytest.raises(
        DataError, match=r"dataloaders\[0\] and dataloaders\[1\] are both dataset 'd' split 'train'"
    ):
        _fit(tiny_model(), dls)


def test_a_torch_dataloader_is_refused() -> None:
    dl = torch.utils.data.DataLoader([1, 2, 3])
    with pytest.raises(DataError, match=r"dataloaders\[0\] is a DataLoader, not a DictDataLoader"):
        _fit(tiny_model(), [dl])  # type: ignore[list-item]


# ---------------------------------------------------------------- datasets


DATASET_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("lengths differ", lambda: DictDataset("d", "train", {"x": torch.zeros(4, 2)}, {"t": torch.zeros(5)}), r"fields have different lengths \(X_dict\['x'\]: 4, Y_dict\['t'\]: 5\)"),
    ("slash in name", lambda: DictDataset("a/b", "train", {"x": torch.zeros(4, 2)}, {}), r"dataset name 'a/b' must be a non-empty string without '/'"),
    ("empty split", lambda: DictDataset("d", "", {"x": torch.zeros(4, 2)}, {}), r"dataset split '' must be a non-empty string"),
    ("scalar field", lambda: DictDataset("d", "train", {"x": torch.tensor(1.0)}, {}), r"X_dict\['x'\] is a scalar"),
    ("dict field", lambda: DictDataset("d", "train", {"x": {"a": 1}}, {}), r"X_dict\['x'\] is a dict; use a tensor, numpy array or list"),
    ("empty X", lambda: DictDataset("d", "train", {}, {}), r"X_dict must be a non-empty mapping"),
    ("scalar label", lambda: DictDataset("d", "train", {"x": torch.zeros(4, 2)}, {"t": torch.tensor(1)}), r"Y_dict\['t'\] must be a tensor with a row per example"),
    ("label name with slash", lambda: DictDataset("d", "train", {"x": torch.zeros(4, 2)}, {"a/b": torch.zeros(4)}), r"label name 'a/b' must be a non-empty string without '/'"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in DATASET_CASES], ids=[c[0] for c in DATASET_CASES])  # fmt: skip
def test_bad_datasets(build: Callable[[], object], message: str) -> None:
    with pytest.raises(DataError, match=message):
        build()


# ---------------------------------------------------------------- trainer settings (part 4)


TRAINER_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("lr negative", {"lr": -1.0}, r"lr: must be a positive number, got -1\.0"),
    ("lr nan", {"lr": math.nan}, r"lr: must be a positive number, got nan"),
    ("unknown key", {"n_epoch": 2}, r"n_epoch.*did you mean 'n_epochs'"),
    ("wrong type", {"n_epochs": "ten"}, r"n_epochs"),
    ("optimizer kwarg", {"optimizer": {"name": "sgd", "momentun": 0.9}}, r"optimizer 'sgd' takes no argument 'momentun' \(did you mean 'momentum'\?\)"),
    ("unknown optimizer", {"optimizer": "adamm"}, r"adamm.*did you mean 'adam'"),
    ("optimizer bool", {"optimizer": {"name": "adamw", "amsgrad": "maybe"}}, r"optimizer.amsgrad: expected true or false, got the string 'maybe'"),
    ("optimizer pair", {"optimizer": {"name": "adamw", "betas": 0.9}}, r"optimizer.betas: expected a list of 2, got float 0\.9"),
    ("optimizer lr", {"optimizer": {"name": "adamw", "lr": 0.1}}, r"optimizer.lr: optimizer 'adamw' gets 'lr' from mtlgraph; set it once, as trainer.lr"),
    ("optimizer weight_decay", {"optimizer": {"name": "sgd", "weight_decay": 5.0}}, r"optimizer.weight_decay: optimizer 'sgd' gets 'weight_decay' from mtlgraph; set it once, as trainer.weight_decay"),
    ("scheduler weights", {"batch_scheduler": {"name": "weighted", "weights": [1, 2]}}, r"batch_scheduler.weights: expected a mapping, got list \[1, 2\]"),
    ("scheduler kwarg", {"batch_scheduler": {"name": "shuffled", "sed": 1}}, r"batch scheduler 'shuffled' takes no argument 'sed' \(did you mean 'seed'\?\)"),
    ("unknown scheduler", {"batch_scheduler": "shuffeld"}, r"shuffeld.*did you mean 'shuffled'"),
    ("lr schedule kwarg", {"lr_scheduler": {"name": "cosine", "min_factr": 0.1}}, r"LR schedule 'cosine' takes no argument 'min_factr' \(did you mean 'min_factor'\?\)"),
    ("balancer kwarg", {"balancer": {"name": "uncertainty", "lrr": 0.1}}, r"balancer 'uncertainty' takes no argument 'lrr' \(did you mean 'lr'\?\)"),
    ("unknown balancer", {"balancer": "uncertainy"}, r"uncertainy.*did you mean 'uncertainty'"),
    ("writer name", {"writers": ["jsonl", "tensorbord"]}, r"writers\[1\]: unknown writer 'tensorbord' \(did you mean 'tensorboard'\?\)"),
    ("diagnostics key", {"diagnostics": {"evry": 5}}, r"diagnostics\.evry: unknown key \(did you mean 'every'\?\)"),
    ("grad_clip zero", {"grad_clip": 0.0}, r"grad_clip: must be > 0 or null, got 0\.0"),
    ("accumulation zero", {"grad_accumulation_steps": 0}, r"grad_accumulation_steps: must be >= 1, got 0"),
    ("mode without metric", {"checkpoint_mode": "max"}, r"checkpoint_mode: set checkpoint_metric too"),
    ("amp value", {"amp": "fp8"}, r"amp"),
]  # fmt: skip


@pytest.mark.parametrize(("kwargs", "message"), [c[1:] for c in TRAINER_CASES], ids=[c[0] for c in TRAINER_CASES])  # fmt: skip
def test_bad_trainer_settings_fail_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(**kwargs)


def test_freeze_pattern_matching_no_module_fails_at_fit() -> None:
    with pytest.raises(ConfigError, match=r"freeze.*'trunkk'"):
        _fit(tiny_model(), loaders(class_labels(), splits=("train",)), freeze=["trunkk"])


def test_checkpoint_metric_never_logged(tmp_path: Any) -> None:
    with pytest.raises(
        ConfigError,
        match=r"checkpoint_metric: 't/d/valid/acuracy' is not a key this training logs \(did you mean 't/d/valid/accuracy'\?\)",
    ):
        _fit(tiny_model(), loaders(class_labels()), run_dir=str(tmp_path), checkpoint_metric="t/d/valid/acuracy")  # fmt: skip


# ---------------------------------------------------------------- scorers and metrics (part 4)


SCORER_CASES: list[tuple[str, Callable[[], object], str]] = [
    ("metric kwarg", lambda: Scorer([{"name": "fbeta", "betta": 2}]), r"metric 'fbeta' takes no argument 'betta' \(did you mean 'beta'\?\)"),
    ("unknown metric", lambda: Scorer(["acuracy"]), r"acuracy.*did you mean 'accuracy'"),
    ("duplicate key", lambda: Scorer(["f1", {"name": "f1", "average": "macro"}]), r"metric key 'f1' is listed twice; give one a 'key'"),
    ("key with slash", lambda: Scorer([{"name": "f1", "key": "f/1"}]), r"metric key 'f/1'"),
    ("custom not callable", lambda: Scorer([], {"m": 3}), r"custom metric 'm' is not callable"),
    ("custom wrong signature", lambda: Scorer([], {"m": lambda golds: 0.0}), r"custom metric 'm' must take \(golds, preds, probs\)"),
    ("bad spec", lambda: Scorer([{"nam": "f1"}]), r"metric spec \{'nam': 'f1'\} must be a name or a mapping with 'name'"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "message"), [c[1:] for c in SCORER_CASES], ids=[c[0] for c in SCORER_CASES])  # fmt: skip
def test_bad_scorers_fail_at_construction(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build()


# ---------------------------------------------------------------- tasks and models


def _op_task(ops: list[Operation], **kwargs: Any) -> Task:
    return Task("t", {"h": nn.Linear(2, 2)}, ops, **kwargs)


TASK_CASES: list[tuple[str, Callable[[], object], type[Exception], str]] = [
    ("unknown task type", lambda: _op_task([Operation("h", [("_input_", "x")])], task_type="multiclas"), TaskDefinitionError, r"unknown task_type 'multiclas' \(did you mean 'multiclass'\?\)"),
    ("op of an unknown module", lambda: _op_task([Operation("hh", [("_input_", "x")])]), TaskDefinitionError, r"'hh'"),
    ("op input of no earlier op", lambda: _op_task([Operation("h", ["trunk"])]), TaskDefinitionError, r"'trunk'"),
    ("two tasks, one name", lambda: MultitaskClassifier([tiny_task("t"), tiny_task("t")]), GraphError, r"'t'"),
]  # fmt: skip


@pytest.mark.parametrize(("build", "error", "message"), [c[1:] for c in TASK_CASES], ids=[c[0] for c in TASK_CASES])  # fmt: skip
def test_bad_tasks_and_models(build: Callable[[], object], error: type[Exception], message: str) -> None:  # fmt: skip
    with pytest.raises(error, match=message):
        build()


def test_same_module_name_two_modules() -> None:
    a = Task("a", {"h": nn.Linear(2, 2)}, [Operation("h", [("_input_", "x")])])
    b = Task("b", {"h": nn.Linear(2, 3)}, [Operation("h", [("_input_", "x")])])
    with pytest.raises(GraphError, match=r"'h'"):
        MultitaskClassifier([a, b])


def test_missing_input_field_names_it() -> None:
    dls = [DictDataLoader(DictDataset("d", "train", {"xx": torch.randn(N, 2)}, {"t": class_labels()}))]  # fmt: skip
    with pytest.raises(Exception, match=r"'x'"):
        _fit(tiny_model(), dls)


# ---------------------------------------------------------------- loss scales (part 9)


def _scaled_tasks() -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    head = nn.Linear(8, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    pool = {"trunk": trunk}
    cls = Task("cls", {**pool, "c": nn.Linear(8, 10)}, [Operation("trunk", [("_input_", "x")]), Operation("c", ["trunk"])])  # fmt: skip
    reg = Task("reg", {**pool, "r": head}, [Operation("trunk", [("_input_", "x")]), Operation("r", ["trunk"])], task_type="regression")  # fmt: skip
    x = torch.randn(N, 2)
    ds = DictDataset("d", "train", {"x": x}, {"cls": torch.randint(0, 10, (N,)), "reg": 1e-3 * x[:, 0]})  # fmt: skip
    return MultitaskClassifier([cls, reg]), [DictDataLoader(ds, batch_size=8)]


def test_task_losses_100x_apart_warn_once(caplog: pytest.LogCaptureFixture) -> None:
    model, dls = _scaled_tasks()
    with caplog.at_level(logging.WARNING, logger="mtlgraph"):
        _fit(model, dls, n_epochs=2)
    warnings = [r for r in caplog.records if "the task losses differ by" in r.getMessage()]
    assert len(warnings) == 1
    text = warnings[0].getMessage()
    assert "task 'cls'" in text and "task 'reg'" in text and "'reg' barely trains" in text
    assert "weight" in text and "'uncertainty', 'lr': 0.1" in text


def test_no_loss_scale_warning_when_a_classification_task_is_solved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two classification tasks, one solved at once (one class: its loss falls 100x below the
    other's, whose labels are random): the gap means 'solved', not 'mis-scaled'; no advice."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    ops = [Operation("trunk", [("_input_", "x")])]
    easy = Task("easy", {"trunk": trunk, "e": nn.Linear(8, 2)}, [*ops, Operation("e", ["trunk"])])
    hard = Task("hard", {"trunk": trunk, "h": nn.Linear(8, 2)}, [*ops, Operation("h", ["trunk"])])
    x = torch.randn(512, 2)
    labels = {"easy": torch.zeros(512, dtype=torch.long), "hard": torch.randint(0, 2, (512,))}
    dls = [DictDataLoader(DictDataset("d", "train", {"x": x}, labels), batch_size=16)]
    with caplog.at_level(logging.WARNING, logger="mtlgraph"):
        trainer = _fit(MultitaskClassifier([easy, hard]), dls, n_epochs=3, lr=0.05)
    last = trainer.history[-1]
    assert last["hard/d/train/loss"] / last["easy/d/train/loss"] > 100  # far apart
    assert "the task losses differ by" not in caplog.text


def test_no_loss_scale_warning_with_a_learned_balancer(caplog: pytest.LogCaptureFixture) -> None:
    model, dls = _scaled_tasks()
    with caplog.at_level(logging.WARNING, logger="mtlgraph"):
        _fit(model, dls, balancer="uncertainty")
    assert "the task losses differ by" not in caplog.text


def test_a_module_named_like_an_nn_module_attribute_is_named_with_the_fix() -> None:
    """'double' (or 'train', 'eval', ...) would reach torch's bare KeyError from add_module."""
    from torch import nn

    from mtlgraph import Operation, Task, TaskDefinitionError

    with pytest.raises(
        TaskDefinitionError, match=r"module name 'double' is an attribute of .*'double_module'"
    ):
        Task("t", {"double": nn.Linear(2, 2)}, [Operation("double", [("_input_", "x")])])
