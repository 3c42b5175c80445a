"""mtlgraph.compat.snorkel scoring as Snorkel 0.10 scored: the scorer's abstain rules, labels
that name no task, remapped labels keyed by their own name, DataFrames."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score
from torch import nn

import mtlgraph
from mtlgraph import ConfigError, DataError, GraphError
from mtlgraph.compat.snorkel import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Scorer,
    SnorkelCompatNote,
    Task,
)

from .conftest import loaders, snorkel_model, snorkel_task

GOLDS = np.array([0, 1, 1, -1, 0, 1])
PREDS = np.array([0, -1, 1, 1, 1, 0])  # -1: the label model abstained


def test_rows_abstained_in_gold_or_prediction_are_left_out() -> None:
    keep = (GOLDS != -1) & (PREDS != -1)
    expected = accuracy_score(GOLDS[keep], PREDS[keep])
    assert Scorer(metrics=["accuracy"]).score(GOLDS, PREDS) == {"accuracy": expected}
    assert expected == 0.5
    everything = accuracy_score(GOLDS, PREDS)  # abstain_label=None: every row counts
    assert Scorer(metrics=["accuracy"], abstain_label=None).score(GOLDS, PREDS) == {
        "accuracy": everything
    }
    shifted = np.where(PREDS == -1, 7, PREDS)  # another abstain value
    assert Scorer(metrics=["accuracy"], abstain_label=7).score(
        np.where(GOLDS == -1, 7, GOLDS), shifted
    ) == {"accuracy": 0.5}


def test_coverage_counts_every_prediction_but_minus_one() -> None:
    scores = Scorer(metrics=["coverage", "accuracy"]).score(GOLDS, PREDS)
    assert scores == {"coverage": 5 / 6, "accuracy": 0.5}
    assert list(scores) == ["coverage", "accuracy"]  # the order they were listed in


def test_custom_metrics_see_every_row_and_dicts_are_merged() -> None:
    def counts(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> dict[str, int]:
        return {"rows": len(golds), "abstains": int((preds == -1).sum())}

    def ones(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> float:
        return float((preds == 1).sum())

    scorer = Scorer(metrics=["accuracy"], custom_metric_funcs={"counts": counts, "ones": ones})
    assert scorer.score(GOLDS, PREDS) == {"accuracy": 0.5, "rows": 6, "abstains": 1, "ones": 3}
    assert Scorer(custom_metric_funcs={"counts": counts}).score(GOLDS, PREDS) == {
        "rows": 6,
        "abstains": 1,
    }


def test_scorer_errors_name_the_culprit() -> None:
    with pytest.raises(ConfigError, match=r"Unrecognized metric: 'acuracy' \(did you mean"):
        Scorer(metrics=["acuracy"])
    with pytest.raises(DataError, match="Cannot score empty labels"):
        Scorer(metrics=["accuracy"]).score(np.array([]), np.array([]))
    with pytest.raises(ConfigError, match="needs preds or probs"):
        Scorer().score(GOLDS)


def test_a_model_scores_with_the_task_scorer_rules() -> None:
    torch.manual_seed(0)
    task = Task(
        "t",
        nn.ModuleDict({"m": nn.Linear(2, 2)}),
        [Operation("m", [("_input_", "x")])],
        scorer=Scorer(metrics=["accuracy", "coverage"]),
    )
    model = MultitaskClassifier([task], device=-1)
    loader = loaders()[1]
    scores = model.score([loader])
    result = model.predict(loader, return_preds=True)
    assert scores["t/d/valid/coverage"] == 1.0  # a head never abstains
    assert scores["t/d/valid/accuracy"] == accuracy_score(
        result["golds"]["t"], result["preds"]["t"]
    )


def test_a_label_naming_no_task_is_ignored_with_one_note() -> None:
    model = snorkel_model()
    loader = loaders(labels=("t", "extra"))[1]
    X, Y = loader.dataset.X_dict, loader.dataset.Y_dict
    with pytest.warns(SnorkelCompatNote, match=r"labels 'extra' name no task") as notes:
        losses, counts = model.calculate_loss(X, Y)
        model.calculate_loss(X, Y)
        result = model.predict(loader)
        scores = model.score([loader])
    assert len([n for n in notes if issubclass(n.category, SnorkelCompatNote)]) == 1
    assert list(losses) == ["t"] and counts == {"t": 32}
    assert list(result["golds"]) == ["t"] and sorted(scores) == ["t/d/valid/accuracy"]
    core = mtlgraph.MultitaskClassifier(list(model.tasks.values()))
    with pytest.raises(GraphError, match="label 'extra' names no task"):  # the core stays strict
        core.calculate_loss(X, Y)


def test_a_label_and_its_remap_onto_the_same_task_keep_their_own_keys() -> None:
    model = snorkel_model()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 2, generator=g)
    y_t, y_other = (x[:, 0] > 0).long(), (x[:, 1] > 0).long()
    ds = DictDataset("d", "test", {"x": x}, {"t": y_t, "other": y_other})
    loader = DictDataLoader(ds, batch_size=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # remapped: no note
        scores = model.score([loader], remap_labels={"other": "t"})
        result = model.predict(loader, return_preds=True, remap_labels={"other": "t"})
    assert sorted(scores) == ["other/d/test/accuracy", "t/d/test/accuracy"]
    assert np.array_equal(result["golds"]["other"], y_other.numpy())
    assert np.array_equal(result["probs"]["other"], result["probs"]["t"])  # one head
    preds = result["preds"]["t"]
    assert scores["other/d/test/accuracy"] == accuracy_score(y_other.numpy(), preds)
    assert scores["t/d/test/accuracy"] == accuracy_score(y_t.numpy(), preds)
    assert sorted(model.score([loader], remap_labels={"other": None})) == ["t/d/test/accuracy"]
    with pytest.raises(GraphError, match="remap_labels maps 'other' to unknown task 'tt'"):
        model.score([loader], remap_labels={"other": "tt"})


def test_score_as_dataframe() -> None:
    pd = pytest.importorskip("pandas")
    model = snorkel_model()
    frame = model.score(loaders(), as_dataframe=True)
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["label", "dataset", "split", "metric", "score"]
    scores = model.score(loaders())
    assert sorted(frame.itertuples(index=False, name=None)) == sorted(
        (*key.split("/"), value) for key, value in scores.items()
    )


def test_score_as_dataframe_without_pandas_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def rows(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> float:
        return float(len(golds))

    task = Task(
        "t",
        nn.ModuleDict({"m": nn.Linear(2, 2)}),
        [Operation("m", [("_input_", "x")])],
        scorer=Scorer(custom_metric_funcs={"rows": rows}),  # sklearn looks for pandas too
    )
    model = MultitaskClassifier([task], device=-1)
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'mtlgraph\[snorkel\]'"):
        model.score(loaders(), as_dataframe=True)
    assert model.score(loaders()) == {"t/d/train/rows": 32.0, "t/d/valid/rows": 32.0}


class Doubled(nn.Module):
    """Reads the whole outputs dict, as Snorkel's slice combiner does."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def forward(self, outputs: dict[str, object]) -> object:
        self.seen = sorted(outputs)
        return outputs["enc"] * 2  # type: ignore[operator]


def test_an_operation_without_inputs_gets_the_outputs_dict() -> None:
    torch.manual_seed(0)
    enc, twice = nn.Linear(2, 2), Doubled()
    task = Task(
        "t",
        nn.ModuleDict({"enc": enc, "twice": twice}),
        [Operation("enc", [("_input_", "x")]), Operation("twice", [])],
    )
    model = MultitaskClassifier([task], device=-1)
    x = torch.randn(5, 2)
    outputs = model.forward({"x": x}, ["t"])
    assert twice.seen == ["_input_", "enc"]
    assert torch.allclose(outputs["twice"], 2 * enc(x))
    assert outputs["_input_"]["x"] is x  # Snorkel's forward returns the input too
    losses, _ = model.calculate_loss({"x": x}, {"t": torch.tensor([0, 1, 0, 1, 1])})
    losses["t"].backward()
    assert enc.weight.grad is not None
    assert sorted(model.state_dict()) == [
        "module_pool.enc.bias",
        "module_pool.enc.weight",
    ]  # the dict adapter holds no weights of its own


def test_snorkel_task_attributes() -> None:
    model = MultitaskClassifier(
        [snorkel_task("a", "a_base"), snorkel_task("b", "b_base")], device=-1
    )
    assert list(model.op_sequences) == ["a", "b"]
    assert [op.name for op in model.op_sequences["a"]] == ["a_base", "a_head"]
    assert model.scorers["a"].metric_keys == ["accuracy"]
    assert set(model.loss_funcs) == set(model.output_funcs) == {"a", "b"}


class Rows(torch.utils.data.Dataset[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]):
    """Six labelled rows of a plain torch dataset."""

    def __len__(self) -> int:
        return 6

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        return {"x": torch.full((2,), float(i) - 2.5)}, {"t": torch.tensor(int(i >= 3))}


def test_named_datasets_and_slices_score_by_mtlgraph_rules() -> None:
    model = snorkel_model()
    named = DictDataLoader(mtlgraph.NamedDataset("n", "valid", Rows()), batch_size=4)
    dict_loader = DictDataLoader(DictDataset("m", "valid", *_rows()), batch_size=4)
    assert (
        model.score([named])["t/n/valid/accuracy"]
        == model.score([dict_loader])["t/m/valid/accuracy"]
    )
    sliced = model.score([dict_loader], slices={"pos": lambda X: X["x"][:, 0] > 0})
    assert sorted(sliced) == ["t/m/valid/accuracy", "t/m:pos/valid/accuracy"]


def _rows() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    rows = [Rows()[i] for i in range(6)]
    return (
        {"x": torch.stack([x["x"] for x, _ in rows])},
        {"t": torch.stack([y["t"] for _, y in rows])},
    )


def test_an_outputs_dict_module_serves_one_operation() -> None:
    pool = nn.ModuleDict({"enc": nn.Linear(2, 2), "twice": Doubled()})
    ops = [Operation("twice", []), Operation("twice", ["twice"], name="again")]
    with pytest.raises(ConfigError, match="'again' also use it: give them their own module"):
        Task("t", pool, ops)
    with pytest.raises(ConfigError, match="its module 'gone' is not in the pool"):
        Task("t", pool, [Operation("gone", [])])
