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
from mtlgraph.registry import Registry, accepted_parameters, argument_problems, import_object
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


def test_problems_unknown_misspelled_missing_reserved_and_mistyped() -> None:
    reg: Registry[Any] = Registry(
        "thing", {"fbeta": fbeta, "tempered": Tempered}, supplied={"golds": "", "preds": ""}
    )
    assert reg.problems({"name": "fbeta", "beta": 2}) == []
    assert reg.problems({"name": "fbeta", "betta": 2, "zzz": 1}, "m") == [
        "m.betta: thing 'fbeta' takes no argument 'betta' (did you mean 'beta'?); it takes "
        "'average', 'beta'",
        "m.zzz: thing 'fbeta' takes no argument 'zzz'; it takes 'average', 'beta'",
    ]
    assert reg.problems({"name": "fbeta", "golds": 1}, "m") == [
        "m.golds: thing 'fbeta' gets 'golds' from mtlgraph; remove it"
    ]
    assert reg.problems({"type": "tempered"}, "t") == [
        "t.temperature: missing (required by thing 'tempered')"
    ]
    assert reg.problems({"name": "tempered", "temperature": "hot", "seed": 2.5}, "t") == [
        "t.temperature: expected a number, got the string 'hot'",
        "t.seed: expected an integer, got float 2.5",
    ]
    assert reg.problems("tempred", "t") == [
        "t: unknown thing 'tempred' (did you mean 'tempered'?); known: 'fbeta', 'tempered', "
        "or a dotted import path (register more in a module listed under 'imports:')"
    ]
    assert reg.problems({"name": "fbeta", "type": "fbeta"}, "m") == [
        "m: give one of 'name', 'type', not both"
    ]
    assert reg.problems({"beta": 1}, "m") == [
        "m.name: missing; say which thing to build: one of 'fbeta', 'tempered' or a dotted "
        "import path"
    ]


def test_build_takes_names_mappings_paths_classes_and_instances() -> None:
    reg: Registry[Any] = Registry("thing", {"tempered": Tempered}, base=Tempered)
    built = reg.build({"name": "tempered", "temperature": 2}, "t", seed=5)
    assert (built.temperature, built.seed) == (2.0, 5)  # converted to the annotation: a float
    assert isinstance(built.temperature, float)
    assert reg.build({"name": "tempered", "temperature": 1.0, "seed": 7}, seed=5).seed == 7
    assert type(reg.build({"name": Tempered, "temperature": 1.0})) is Tempered  # a class
    assert reg.build(built) is built  # an instance, as it is
    mixed = SCHEDULERS.build("mtlgraph.data.schedulers.MixedScheduler", "s", seed=1)
    assert type(mixed).__name__ == "MixedScheduler" and mixed.seed == 1
    with pytest.raises(ConfigError, match=r"^t: cannot import 'tests.test_registry.Tempred': "):
        reg.build("tests.test_registry.Tempred", "t")
    with pytest.raises(ConfigError, match=r"t: thing 'fbeta' made a float, not a Tempered"):
        reg.build({"name": fbeta, "golds": 0, "preds": 0}, "t")
    with pytest.raises(ConfigError, match=r"t: a thing is a Tempered, a registered name"):
        reg.build(3, "t")


def test_bound_functions_get_their_arguments_bound_not_called() -> None:
    reg: Registry[Any] = Registry(
        "loss", {"fbeta": fbeta}, supplied={"golds": "", "preds": ""}, bind=True
    )
    assert reg.build("fbeta") is fbeta
    bound = reg.build({"name": "fbeta", "beta": 2})
    assert bound.func is fbeta and bound.keywords == {"beta": 2.0}
    with pytest.raises(ConfigError, match="takes no argument 'gamma'"):
        reg.build({"name": "fbeta", "gamma": 2})


def test_kwargs_factories_and_uninspectable_ones_accept_anything() -> None:
    def anything(**kwargs: Any) -> None: ...

    assert accepted_parameters(anything) is None
    assert argument_problems(anything, {"whatever": 1}, "f") == []
    assert argument_problems(print, {"sep": ""}, "print") == []  # a builtin with a signature
    assert accepted_parameters(len) == set()


def test_partial_kwargs_do_not_report_missing_arguments() -> None:
    assert argument_problems(Tempered, {"seed": 1}, "t", partial=True) == []
    assert argument_problems(Tempered, {"seed": 1}, "t") == ["temperature: missing (required by t)"]


def test_import_object_names_the_missing_module_or_attribute() -> None:
    assert import_object("torch.optim.SGD").__name__ == "SGD"
    with pytest.raises(ConfigError, match=r"^k: cannot import 'no_such_pkg.x': no module named"):
        import_object("no_such_pkg.x", "k")
    with pytest.raises(ConfigError, match=r"'torch.optim' has no 'SDG' \(did you mean 'SGD'\?\)"):
        import_object("torch.optim.SDG")


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
