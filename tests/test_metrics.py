"""Metrics equal scikit-learn's; the Scorer masks ignored labels; keys split correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn import metrics as skm

from mtlgraph import ConfigError, MtlGraphError, Scorer, register_metric
from mtlgraph.metrics import (
    METRICS,
    active_mask,
    active_rows,
    make_key,
    metric_spec_problems,
    split_key,
)

rng = np.random.default_rng(0)
GOLDS = rng.integers(0, 2, 50)
PROBS1 = rng.random(50)
PROBS = np.stack([1 - PROBS1, PROBS1], axis=1)
PREDS = PROBS.argmax(1)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("accuracy", skm.accuracy_score(GOLDS, PREDS)),
        ("precision", skm.precision_score(GOLDS, PREDS)),
        ("recall", skm.recall_score(GOLDS, PREDS)),
        ("f1", skm.f1_score(GOLDS, PREDS)),
        ("matthews_corrcoef", skm.matthews_corrcoef(GOLDS, PREDS)),
        ("roc_auc", skm.roc_auc_score(GOLDS, PROBS1)),
    ],
)
def test_binary_metrics_equal_sklearn(name: str, expected: float) -> None:
    assert Scorer([name]).score(GOLDS, PREDS, PROBS)[name] == expected


def test_multiclass_defaults_to_macro_and_ovr() -> None:
    golds = rng.integers(0, 3, 60)
    probs = rng.dirichlet(np.ones(3), 60)
    preds = probs.argmax(1)
    got = Scorer(["f1", "precision", "recall", "roc_auc"]).score(golds, preds, probs)
    assert got["f1"] == skm.f1_score(golds, preds, average="macro")
    assert got["precision"] == skm.precision_score(golds, preds, average="macro")
    assert got["recall"] == skm.recall_score(golds, preds, average="macro")
    assert got["roc_auc"] == skm.roc_auc_score(golds, probs, multi_class="ovr")


def test_metric_specs_take_kwargs_and_rename() -> None:
    s = Scorer([{"name": "fbeta", "beta": 2.0, "key": "f2"}, {"name": "f1", "average": "micro"}])
    got = s.score(GOLDS, PREDS, PROBS)
    assert got == {
        "f2": skm.fbeta_score(GOLDS, PREDS, beta=2.0),
        "f1": skm.f1_score(GOLDS, PREDS, average="micro"),
    }


def test_regression_metrics_equal_sklearn_and_scipy() -> None:
    y = rng.normal(size=40)
    p = y + rng.normal(scale=0.3, size=40)
    got = Scorer(["mse", "mae", "r2", "pearson", "spearman"]).score(y, p, p, ignore_value=math.nan)
    assert got["mse"] == skm.mean_squared_error(y, p)
    assert got["mae"] == skm.mean_absolute_error(y, p)
    assert got["r2"] == skm.r2_score(y, p)
    assert got["pearson"] == pytest.approx(stats.pearsonr(y, p)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(y, p)[0], abs=1e-12)
    assert all(type(v) is float for v in got.values())


def test_ignored_labels_are_masked_rows_and_elements() -> None:
    golds = np.array([0, 1, -1, 1])
    preds = np.array([0, 0, 1, 1])
    assert Scorer(["accuracy"]).score(golds, preds, np.eye(2)[preds])["accuracy"] == pytest.approx(
        2 / 3
    )
    ml_golds = np.array([[1, -1], [0, 1]])
    ml_preds = np.array([[1, 0], [1, 1]])
    assert Scorer(["accuracy"]).score(ml_golds, ml_preds, ml_preds.astype(float))[
        "accuracy"
    ] == pytest.approx(2 / 3)
    nan_golds = np.array([1.0, np.nan, 3.0])
    got = Scorer(["mae"]).score(
        nan_golds, np.array([1.0, 100.0, 2.0]), np.zeros(3), ignore_value=math.nan
    )
    assert got["mae"] == 0.5


def test_all_ignored_gives_nan() -> None:
    assert math.isnan(
        Scorer(["accuracy"]).score(np.array([-1, -1]), np.array([0, 1]), np.zeros((2, 2)))[
            "accuracy"
        ]
    )


def test_custom_metric_funcs_and_direction() -> None:
    def error_count(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> float:
        return float((golds != preds).sum())

    error_count.higher_is_better = False  # type: ignore[attr-defined]
    s = Scorer(["accuracy"], custom_metric_funcs={"errors": error_count})
    assert s.score(np.array([0, 1]), np.array([1, 1]), np.zeros((2, 2))) == {
        "accuracy": 0.5,
        "errors": 1.0,
    }
    assert s.higher_is_better("accuracy") and not s.higher_is_better("errors")


def test_scorer_validation_reports_everything() -> None:
    with pytest.raises(ConfigError) as info:
        Scorer(["acuracy", "f1", "f1", {"name": "mse", "key": "a/b"}], custom_metric_funcs={"c": 3})  # type: ignore[dict-item]
    text = str(info.value)
    assert "unknown metric 'acuracy' (did you mean 'accuracy'?)" in text
    assert "metric key 'f1' is listed twice" in text
    assert "metric key 'a/b' must be a non-empty string without '/'" in text
    assert "custom metric 'c' is not callable" in text


def test_registry_directions() -> None:
    assert {"accuracy", "mse", "spearman"} <= set(METRICS.names())
    assert METRICS.get("accuracy").higher_is_better and not METRICS.get("mse").higher_is_better
    with pytest.raises(ConfigError, match="did you mean 'mae'"):
        METRICS.get("maee")


def test_keys_round_trip() -> None:
    key = make_key("circle_task", "circleDataset", "valid", "accuracy")
    assert key == "circle_task/circleDataset/valid/accuracy"
    assert split_key(key) == ("circle_task", "circleDataset", "valid", "accuracy")
    assert split_key("model/all/train/weight/a") == ("model", "all", "train", "weight/a")


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(-1, 2), st.integers(0, 2)), min_size=1, max_size=30))
def test_masked_accuracy_property(pairs: list[tuple[int, int]]) -> None:
    golds = np.array([g for g, _ in pairs])
    preds = np.array([p for _, p in pairs])
    got = Scorer(["accuracy"]).score(golds, preds, np.eye(3)[preds])["accuracy"]
    keep = golds != -1
    if keep.any():
        assert got == skm.accuracy_score(golds[keep], preds[keep])
    else:
        assert math.isnan(got)


def test_metric_kwargs_are_checked_when_the_scorer_is_built() -> None:
    with pytest.raises(
        ConfigError, match=r"metric 'fbeta' takes no argument 'betta' \(did you mean 'beta'\?\)"
    ) as info:
        Scorer([{"name": "fbeta", "betta": 2}])
    assert isinstance(info.value, MtlGraphError)
    with pytest.raises(ConfigError, match=r"metric 'accuracy' takes no argument 'average'"):
        Scorer([{"name": "accuracy", "average": "macro"}])
    with pytest.raises(
        ConfigError, match=r"golds: metric 'f1' gets 'golds' from mtlgraph; remove it"
    ):
        Scorer([{"name": "f1", "golds": [1]}])
    assert metric_spec_problems({"name": "fbeta", "beta": 2, "key": "f2"}) == []
    assert metric_spec_problems({"name": "f1", "averag": "micro"}, "tasks.t.metrics[0]") == [
        "tasks.t.metrics[0].averag: metric 'f1' takes no argument 'averag' (did you mean "
        "'average'?); it takes 'average', 'labels', 'pos_label', 'zero_division'"
    ]
    assert metric_spec_problems({"name": "fbeta", "beta": "two"}, "m") == [
        "m.beta: expected a number, got the string 'two'"
    ]
    assert metric_spec_problems("acuracy")[0].startswith(
        "unknown metric 'acuracy' (did you mean 'accuracy'?)"
    )


def test_custom_metric_arguments_are_checked_against_its_own_signature() -> None:
    def within(g: np.ndarray, p: np.ndarray, pr: np.ndarray, tol: float) -> float:
        return float((np.abs(g - p) <= tol).mean())

    register_metric("within_for_test_metrics", within, higher_is_better=True)
    try:
        assert register_metric("within_for_test_metrics", within, True).func is within  # no-op
        with pytest.raises(
            ConfigError, match=r"tol: missing \(required by metric 'within_for_test_metrics'\)"
        ):
            Scorer(["within_for_test_metrics"])
        with pytest.raises(ConfigError, match=r"takes no argument 'tl' \(did you mean 'tol'\?\)"):
            Scorer([{"name": "within_for_test_metrics", "tl": 1}])
        s = Scorer([{"name": "within_for_test_metrics", "tol": 1.0}])
        assert s.score(np.array([0.0, 5.0]), np.array([0.5, 0.0]), np.zeros(2)) == {
            "within_for_test_metrics": 0.5
        }
        with pytest.raises(ConfigError, match="already registered"):
            register_metric("within_for_test_metrics", within, higher_is_better=False)
        register_metric("within_for_test_metrics", within, False, override=True)
        assert not METRICS.get("within_for_test_metrics").higher_is_better
    finally:
        METRICS.unregister("within_for_test_metrics")
    assert "within_for_test_metrics" not in METRICS.names()
    with pytest.raises(ConfigError, match=r"takes no argument 'tl'.*\(in its defaults\)"):
        register_metric("within_for_test_metrics", within, True, tl=1)
    assert "within_for_test_metrics" not in METRICS.names()


def test_one_ignore_mask_for_tensors_and_arrays() -> None:
    labels = [[1.0, math.nan], [-1.0, 2.0]]
    for ignore in (-1, math.nan, None):
        t = active_mask(torch.tensor(labels), ignore)
        a = active_mask(np.array(labels), ignore)
        assert t.tolist() == a.tolist()
        assert active_rows(torch.tensor(labels), ignore).tolist() == (
            active_rows(np.array(labels), ignore).tolist()
        )
    assert active_mask(torch.tensor([1, -1]), math.nan).tolist() == [True, True]  # ints: no NaN
    assert active_rows(np.array([[-1, -1], [0, -1]]), -1).tolist() == [False, True]


def test_lookup_errors_are_mtlgraph_errors() -> None:
    with pytest.raises(KeyError, match="scorer has no metric 'acc'") as info:
        Scorer(["accuracy"]).higher_is_better("acc")
    assert isinstance(info.value, MtlGraphError)
    with pytest.raises(ValueError, match="is not a task/dataset/split/metric key") as bad:
        split_key("a/b")
    assert isinstance(bad.value, MtlGraphError)
