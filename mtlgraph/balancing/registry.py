"""Balancers by name: the :data:`BALANCERS` registry and :func:`make_balancer`.

``Trainer(balancer=...)`` and the YAML ``trainer.balancer`` key take a registered name, a
``{"name": ..., **kwargs}`` mapping or a :class:`~mtlgraph.balancing.Balancer` object;
:func:`make_balancer` turns each into a balancer, checking the keyword arguments against the
class's signature first. :data:`BALANCERS` is a :class:`~mtlgraph.registry.Registry`:
registering the same class again is a no-op, another class under a taken name needs
``override=True``, and ``BALANCERS.unregister(name)`` removes a name.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mtlgraph.balancing import gradient, modern, weighting
from mtlgraph.balancing.base import Balancer
from mtlgraph.exceptions import ConfigError
from mtlgraph.registry import Registry, must_subclass, split_spec

BALANCERS: Registry[type[Balancer]] = Registry(
    "balancer",
    {
        cls.name: cls  # each class names itself (its ``name``)
        for cls in (
            weighting.SumBalancer,
            weighting.UncertaintyBalancer,
            weighting.DWABalancer,
            weighting.GradNormBalancer,
            weighting.InverseMetricBalancer,
            weighting.RLWBalancer,
            gradient.PCGradBalancer,
            gradient.CAGradBalancer,
            gradient.MGDABalancer,
            modern.FAMOBalancer,
            modern.NashMTLBalancer,
            modern.IMTLBalancer,
            modern.AlignedMTLBalancer,
            modern.UPGradBalancer,
            modern.DBMTLBalancer,
            modern.GradVacBalancer,
        )
    },
    check=must_subclass(Balancer, "balancer"),
)
"""Every balancer class by name (built in: the sixteen of ``docs/balancing.md``)."""


def register_balancer(name: str, cls: type[Balancer], *, override: bool = False) -> None:
    """Register a balancer class under ``name`` (usable as ``Trainer(balancer=name)``).

    Registering the same class again is a no-op (a re-run notebook cell is fine).

    Args:
        name: The registry name (no ``/``).
        cls: A :class:`Balancer` subclass.
        override: Replace another class already registered under ``name``.

    Raises:
        ConfigError: ``cls`` is not a Balancer subclass, or ``name`` holds another class and
            ``override`` is false.

    Example:
        >>> from mtlgraph.balancing import SumBalancer, make_balancer
        >>> from mtlgraph.balancing import BALANCERS, register_balancer
        >>> class Halved(SumBalancer):
        ...     def backward(self, losses, ctx):
        ...         super().backward({t: 0.5 * v for t, v in losses.items()}, ctx)
        >>> register_balancer("halved_doc", Halved)
        >>> type(make_balancer("halved_doc")).__name__
        'Halved'
        >>> BALANCERS.unregister("halved_doc").__name__
        'Halved'
    """
    BALANCERS.register(name, cls, override=override)


def balancer_names() -> list[str]:
    """Registered balancer names, sorted."""
    return BALANCERS.names()


def make_balancer(spec: str | Mapping[str, Any] | Balancer) -> Balancer:
    """Build a balancer from a name, ``{"name": ..., **kwargs}``, or return an instance.

    Raises:
        ConfigError: Unknown names (with a suggestion), unknown or missing arguments (naming
            the ones the balancer takes) or bad values, all reported at once.

    Example:
        >>> from mtlgraph.balancing import make_balancer
        >>> make_balancer({"name": "cagrad", "c": 0.25}).c
        0.25
        >>> make_balancer({"name": "cagrad", "cc": 0.25})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.ConfigError: balancer 'cagrad' takes no argument 'cc' (did you mean ...
    """
    if isinstance(spec, Balancer):
        return spec
    if not isinstance(spec, (str, Mapping)):
        raise ConfigError(
            [f"balancer must be a name, a {{'name': ...}} mapping or a Balancer, got {spec!r}"]
        )
    name, kwargs = split_spec(spec)
    cls = BALANCERS.get(name)
    problems = BALANCERS.check_kwargs(name, kwargs)
    if problems:
        raise ConfigError(problems)
    return cls(**kwargs)
