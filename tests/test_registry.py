"""The one Registry type: lookup, re-registration, override, unregister, kwargs checks."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from mtlgraph import ConfigError, MtlGraphError
from mtlgraph.data.schedulers import SCHEDULERS
from mtlgraph.data.synthetic import GENERATORS
from mtlgraph.exceptions import UnknownNameError
from mtlgraph.graph.losses import LOSSES
from mtlgraph.graph.modules import ACTIVATIONS, MODULES
from mtlgraph.metrics import METRICS
from mtlgraph.registry import Registry, accepted_parameters, signature_problems
from mtlgraph.training.writers import WRITERS


def make() -> Registry[int]:
    return Registry[int]("colour", {"red": 1, "blue": 2})


def test_lookup_of_an_unknown_name_raises_with_did_you_mean() -> None:
    reg = make()
    assert reg.get("red") == 1
    with pytest.raises(
        ConfigError, match=r"unknown colour 'bleu' \(did you mean 'blue'\?\); known: 'blue', 'red'"
    ) as info:
        reg.get("bleu")
    assert isinstance(info.value, MtlGraphError)
    assert isinstance(info.value, KeyError)  # code written for the old dicts still catches it
    assert str(info.value).startswith("unknown colour")  # not KeyError's quoted repr
    with pytest.raises(UnknownNameError, match="unknown colour \\['x'\\]"):
        reg.get(["x"])  # type: ignore[arg-type]  # unhashable: still a ConfigError


def test_reregistering_the_same_object_is_a_noop() -> None:
    reg = make()
    assert reg.register("red", 1) == 1
    assert reg.names() == ["blue", "red"]


def test_an_equal_value_again_is_a_noop_that_returns_the_registered_one() -> None:
    @dataclasses.dataclass
    class Spec:
        size: int

    reg = Registry[Spec]("spec", {"small": Spec(1)})
    held = reg.get("small")
    assert reg.register("small", Spec(1)) is held  # a rebuilt equal value: nothing changes
    with pytest.raises(ConfigError, match="spec 'small' is already registered"):
        reg.register("small", Spec(2))


def test_another_object_needs_override() -> None:
    reg = make()
    with pytest.raises(
        ConfigError, match=r"colour 'red' is already registered \(as 1\); pass override=True"
    ):
        reg.register("red", 5)
    assert reg.get("red") == 1
    assert reg.register("red", 5, override=True) == 5
    assert reg.get("red") == 5


def test_unregister_returns_the_object_and_unknown_names_raise() -> None:
    reg = make()
    assert reg.unregister("red") == 1
    assert "red" not in reg and len(reg) == 1 and list(reg) == ["blue"]
    with pytest.raises(UnknownNameError, match="unknown colour 'red'"):
        reg.unregister("red")


def test_decorator_form() -> None:
    reg: Registry[Any] = Registry("handler")

    @reg.register("double")
    def double(x: int) -> int:
        return 2 * x

    assert reg.get("double") is double and double(2) == 4
    with pytest.raises(ConfigError, match="already registered"):

        @reg.register("double")
        def other(x: int) -> int:
            return x

    @reg.register("double", override=True)
    def triple(x: int) -> int:
        return 3 * x

    assert reg.get("double")(2) == 6


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("a/b", r"colour name 'a/b' must not contain '/' \(it is a score-key separator\)"),
        ("", "colour name '' must be a non-empty string"),
        (3, "colour name 3 must be a non-empty string"),
    ],
)
def test_malformed_names_are_refused(name: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make().register(name, 3)  # type: ignore[arg-type]


def test_check_runs_on_every_registration() -> None:
    reg = Registry[int]("even", check=lambda n, v: [] if v % 2 == 0 else [f"'{n}': {v} is odd"])
    reg.register("two", 2)
    with pytest.raises(ConfigError, match="'three': 3 is odd"):
        reg.register("three", 3)
    with pytest.raises(ConfigError, match="'one': 1 is odd"):
        Registry[int]("even", {"one": 1}, check=lambda n, v: [f"'{n}': {v} is odd"])


def fbeta(golds: Any, preds: Any, beta: float = 1.0, *, average: str = "binary") -> float:
    return 0.0


class Tempered:
    def __init__(self, temperature: float, seed: int = 0) -> None:
        self.temperature, self.seed = temperature, seed


def test_check_kwargs_unknown_misspelled_missing_and_reserved() -> None:
    reg: Registry[Any] = Registry("thing", {"fbeta": fbeta, "tempered": Tempered})
    assert reg.check_kwargs("fbeta", {"beta": 2}, supplied=("golds", "preds")) == []
    assert reg.check_kwargs("fbeta", {"betta": 2, "zzz": 1}, supplied=("golds", "preds")) == [
        "thing 'fbeta' takes no argument 'betta' (did you mean 'beta'?); its arguments: "
        "'average', 'beta'",
        "thing 'fbeta' takes no argument 'zzz'; its arguments: 'average', 'beta'",
    ]
    assert reg.check_kwargs("fbeta", {"golds": 1}, supplied=("golds", "preds")) == [
        "thing 'fbeta': 'golds' is set by mtlgraph; remove it"
    ]
    assert reg.check_kwargs("tempered", {}) == ["thing 'tempered' needs the argument 'temperature'"]
    assert reg.check_kwargs("tempered", {"temperature": 1.0, "seed": 2}) == []
    assert reg.check_kwargs("tempred", {}) == [
        "unknown thing 'tempred' (did you mean 'tempered'?); known: 'fbeta', 'tempered'"
    ]


def test_kwargs_factories_and_uninspectable_ones_accept_anything() -> None:
    def anything(**kwargs: Any) -> None: ...

    assert accepted_parameters(anything) is None
    assert signature_problems(anything, {"whatever": 1}, "f") == []
    assert signature_problems(print, {"sep": ""}, "print") == []  # a builtin with a signature
    assert accepted_parameters(len) == {}
    reg: Registry[Any] = Registry("value", {"three": 3})
    assert reg.check_kwargs("three", {"x": 1}) == []  # not callable: nothing to check


def test_partial_kwargs_do_not_report_missing_arguments() -> None:
    assert signature_problems(Tempered, {"seed": 1}, "t", partial=True) == []
    assert signature_problems(Tempered, {"seed": 1}, "t") == ["t needs the argument 'temperature'"]


@pytest.mark.parametrize(
    ("registry", "known", "kind"),
    [
        (MODULES, "mlp", "module type"),
        (ACTIVATIONS, "relu", "activation"),
        (LOSSES, "mse", "loss"),
        (METRICS, "accuracy", "metric"),
        (SCHEDULERS, "mixed", "batch scheduler"),
        (WRITERS, "jsonl", "writer"),
        (GENERATORS, "circle", "generator"),
    ],
)
def test_every_named_component_is_a_registry(
    registry: Registry[Any], known: str, kind: str
) -> None:
    assert isinstance(registry, Registry) and known in registry and registry.kind == kind
    with pytest.raises(UnknownNameError, match=f"unknown {kind} '{known}x'"):
        registry.get(f"{known}x")
    same = registry.get(known)
    assert registry.register(known, same) is same  # a re-run cell
