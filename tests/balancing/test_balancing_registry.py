"""The balancer registry: a mtlgraph.registry.Registry (register, build, problems)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import mtlgraph
from mtlgraph import ConfigError, MtlGraphError
from mtlgraph.balancing import BALANCERS, Balancer, SumBalancer
from mtlgraph.registry import Registry


class Louder(SumBalancer):
    """A sum of the losses, doubled."""

    def backward(self, losses, ctx):  # type: ignore[no-untyped-def]
        super().backward({t: 2 * v for t, v in losses.items()}, ctx)


class Softer(SumBalancer):
    """A sum of the losses, halved."""

    def backward(self, losses, ctx):  # type: ignore[no-untyped-def]
        super().backward({t: 0.5 * v for t, v in losses.items()}, ctx)


class NeedsScale(Balancer):
    """A balancer with a required argument."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def backward(self, losses, ctx):  # type: ignore[no-untyped-def]
        ctx.backward(self.scale * torch.stack(list(losses.values())).sum())


@pytest.fixture
def clean() -> Iterator[list[str]]:
    """Names a test registers; removed afterwards so no registration outlives the test."""
    names: list[str] = []
    yield names
    for name in names:
        if name in BALANCERS:
            BALANCERS.unregister(name)


def test_the_registry_is_a_registry_of_the_nine_methods() -> None:
    assert isinstance(BALANCERS, Registry)
    assert BALANCERS.names() == BALANCERS.names() == sorted(BALANCERS.names())
    assert {"sum", "uncertainty", "dwa", "gradnorm", "inverse_metric", "rlw"} <= set(BALANCERS)
    assert {"pcgrad", "cagrad", "mgda"} <= set(BALANCERS)
    assert not hasattr(mtlgraph, "register_balancer")  # BALANCERS.register is the one way


def test_registering_the_same_class_again_is_a_no_op(clean: list[str]) -> None:
    clean.append("louder")
    BALANCERS.register("louder", Louder)
    BALANCERS.register("louder", Louder)  # a re-run notebook cell
    assert type(BALANCERS.build("louder")) is Louder


def test_another_class_needs_override(clean: list[str]) -> None:
    clean.append("louder")
    BALANCERS.register("louder", Louder)
    with pytest.raises(
        ConfigError, match=r"balancer 'louder' is already registered .*override=True"
    ):
        BALANCERS.register("louder", Softer)
    assert type(BALANCERS.build("louder")) is Louder  # unchanged
    BALANCERS.register("louder", Softer, override=True)
    assert type(BALANCERS.build("louder")) is Softer


def test_built_in_names_are_protected_too() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        BALANCERS.register("sum", Louder)
    assert BALANCERS.get("sum") is SumBalancer


def test_unregister_removes_and_returns_the_class(clean: list[str]) -> None:
    BALANCERS.register("louder", Louder)
    assert BALANCERS.unregister("louder") is Louder
    assert "louder" not in BALANCERS.names()
    with pytest.raises(ConfigError, match=r"unknown balancer 'louder'"):
        BALANCERS.build("louder")
    with pytest.raises(ConfigError, match=r"unknown balancer 'pcgard' \(did you mean 'pcgrad'\?\)"):
        BALANCERS.unregister("pcgard")


def test_bad_names_and_non_balancers_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"is not callable \(a class or factory\)"):
        BALANCERS.register("not_one", SumBalancer())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"must not contain '/'"):
        BALANCERS.register("a/b", Louder)
    assert "not_one" not in BALANCERS and "a/b" not in BALANCERS


def test_make_balancer_checks_arguments_against_the_signature(clean: list[str]) -> None:
    clean.append("needs_scale")
    BALANCERS.register("needs_scale", NeedsScale)
    assert BALANCERS.build({"name": "needs_scale", "scale": 3.0}).scale == 3.0  # type: ignore[attr-defined]
    with pytest.raises(ConfigError) as info:
        BALANCERS.build({"name": "needs_scale", "scael": 3.0}, "balancer")
    assert info.value.problems == [
        "balancer.scael: balancer 'needs_scale' takes no argument 'scael' (did you mean "
        "'scale'?); it takes 'scale'",
        "balancer.scale: missing (required by balancer 'needs_scale')",
    ]
    with pytest.raises(ConfigError, match=r"balancer.scale: expected a number, got the string"):
        BALANCERS.build({"name": "needs_scale", "scale": "big"}, "balancer")
    with pytest.raises(ConfigError, match=r"balancer 'sum' takes no argument 'x'; it takes none"):
        BALANCERS.build({"name": "sum", "x": 1})


def test_errors_are_mtlgraph_errors_and_value_errors() -> None:
    for spec in ("nope", {"name": "cagrad", "cc": 1}, {"name": "cagrad", "c": 2.0}, 3):
        with pytest.raises(MtlGraphError) as info:
            BALANCERS.build(spec)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)
