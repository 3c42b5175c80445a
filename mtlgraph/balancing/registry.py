"""Balancers by name: the :data:`BALANCERS` registry (a :class:`~mtlgraph.registry.Registry`)."""

from __future__ import annotations

from mtlgraph.balancing import gradient, modern, weighting
from mtlgraph.balancing.aggregators import adapt_aggregator
from mtlgraph.balancing.base import Balancer
from mtlgraph.registry import Registry

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
            weighting.STCHBalancer,
            weighting.GO4AlignBalancer,
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
            modern.FairGradBalancer,
            modern.MoCoBalancer,
            modern.SDMGradBalancer,
            modern.ExcessMTLBalancer,
        )
    },
    base=Balancer,
    adapt=adapt_aggregator,
)
"""Every balancer class by name (built in: the twenty-two of ``docs/balancing.md``).

``Trainer(balancer=...)`` and ``trainer.balancer`` in YAML take what ``BALANCERS.build`` takes:
a name, ``{"name": ..., **kwargs}``, a class or dotted path, or a :class:`Balancer`; a TorchJD
aggregator (its dotted path, class or instance) becomes an
:class:`~mtlgraph.balancing.aggregators.AggregatorBalancer`.

Example:
    >>> from mtlgraph.balancing import BALANCERS, SumBalancer
    >>> BALANCERS.build({"name": "cagrad", "c": 0.25}).c
    0.25
    >>> BALANCERS.build({"name": "cagrad", "cc": 0.25})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    mtlgraph.exceptions.ConfigError: cc: balancer 'cagrad' takes no argument 'cc' (did you mean ...
    >>> @BALANCERS.register("halved_doc")
    ... class Halved(SumBalancer):
    ...     def backward(self, losses, ctx):
    ...         super().backward({t: 0.5 * v for t, v in losses.items()}, ctx)
    >>> type(BALANCERS.build("halved_doc")).__name__
    'Halved'
    >>> BALANCERS.unregister("halved_doc").__name__
    'Halved'
"""
