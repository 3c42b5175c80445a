"""TorchJD's aggregators as balancers: ``balancer: {type: torchjd.aggregation.UPGrad, ...}``.

A TorchJD ``Aggregator`` maps a Jacobian (one row per task) to one update vector. Given as a
dotted path, a class or an instance wherever a balancer is, it becomes an
:class:`AggregatorBalancer`: a gradient balancer whose shared update is the aggregator applied to
the step's per-task gradient rows of the shared parameters (the task-specific parameters get
their own task's gradient, as with every gradient balancer). Needs ``pip install
'mtlgraph[torchjd]'``; nothing here imports TorchJD until such a spec is built.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

import numpy as np
import torch
from torch import nn

from mtlgraph.balancing.gradient import GradientBalancer
from mtlgraph.exceptions import ConfigError
from mtlgraph.gradients import SharedLayout
from mtlgraph.registry import type_hints


def _aggregator_classes(obj: object) -> list[str]:
    """The TorchJD base classes of ``obj`` (a class or an instance), by name, without importing
    TorchJD: ``["Aggregator", ...]`` when ``obj`` is an aggregator, ``[]`` otherwise."""
    cls = obj if isinstance(obj, type) else type(obj)
    return [c.__name__ for c in cls.__mro__ if c.__module__.startswith("torchjd.")]


class AggregatorBalancer(GradientBalancer):
    """A TorchJD aggregator (``torchjd.aggregation``) as a gradient balancer.

    The shared parameters get ``aggregator(J)``, ``J`` the ``(tasks, shared parameters)`` matrix
    of the step's per-task gradients (``Task.weight`` applied, rank-averaged under DDP); the
    logged task weights are the aggregator's weights when it combines rows with weights (UPGrad,
    MGDA, IMTL-G, CAGrad, Aligned-MTL, DualProj, FairGrad, PCGrad, Mean, ...), and NaN when
    it does not (ConFIG, GradDrop). Aggregators that keep state between steps (TorchJD's
    ``Stateful`` ones: NashMTL, GradVac, ExcessMTL, SDMGrad, ...) are refused: their state could
    not be saved, so a resumed run would differ from an uninterrupted one; mtlgraph's own
    balancers of those names save theirs.

    Args:
        aggregator: A ``torchjd.aggregation.Aggregator`` instance.

    Raises:
        ConfigError: ``aggregator`` is not a TorchJD aggregator, or is a stateful one.

    Example:
        >>> from torchjd.aggregation import UPGrad
        >>> from mtlgraph.balancing import BALANCERS
        >>> balancer = BALANCERS.build({"type": "torchjd.aggregation.UPGrad"})
        >>> type(balancer).__name__, balancer.name
        ('AggregatorBalancer', 'UPGrad')
        >>> rows = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
        >>> d, weights = balancer.direction(rows, None)
        >>> torch.allclose(d, UPGrad()(rows))
        True
    """

    name = "aggregator"

    def __init__(self, aggregator: nn.Module) -> None:
        bases = _aggregator_classes(aggregator)
        if isinstance(aggregator, type) or "Aggregator" not in bases:
            raise ConfigError(
                [
                    f"balancer 'aggregator': expected a torchjd.aggregation Aggregator instance, "
                    f"got {aggregator!r}"
                ]
            )
        refuse_stateful(type(aggregator))
        super().__init__()
        self.aggregator = aggregator
        self.name = type(aggregator).__name__  # type: ignore[misc]  # in messages and logs

    def combine(self, gram: np.ndarray) -> np.ndarray:
        """The weights of an aggregator that reads only the Gram matrix (TorchJD's
        ``GramianWeightedAggregator``s)."""
        weighting = getattr(self.aggregator, "gramian_weighting", None)
        if weighting is None:
            raise NotImplementedError(f"{self.name} needs the gradient rows, not their Gram matrix")
        weights = weighting(torch.from_numpy(gram))
        return np.asarray(weights.detach().cpu().double().numpy())

    def direction(
        self, rows: torch.Tensor, layout: SharedLayout | None
    ) -> tuple[torch.Tensor, np.ndarray]:
        if "WeightedAggregator" not in _aggregator_classes(self.aggregator):
            return self.aggregator(rows), np.full(len(rows), np.nan)
        weighting = typing.cast(nn.Module, self.aggregator.weighting)
        weights = weighting(rows)
        return weights.to(rows) @ rows, weights.detach().cpu().double().numpy()


def refuse_stateful(cls: type) -> None:
    """Refuse a TorchJD aggregator class that keeps state between steps."""
    if "Stateful" in _aggregator_classes(cls):
        kind = cls.__name__
        raise ConfigError(
            [
                f"TorchJD's {kind} keeps state between steps that a checkpoint cannot hold, so a "
                "resumed run would not match; use mtlgraph's own balancer of that method (see "
                "docs/balancing.md)"
            ]
        )


def adapt_aggregator(obj: Any) -> Any:
    """A balancer spec's object as mtlgraph takes it: a TorchJD aggregator class becomes a
    factory of :class:`AggregatorBalancer` taking the aggregator's own arguments (checked against
    its signature; a list given for a tensor argument, such as ``pref_vector``, becomes a float
    tensor), an aggregator instance becomes the balancer; anything else is returned unchanged."""
    if not _aggregator_classes(obj):
        return obj
    if not isinstance(obj, type):
        return AggregatorBalancer(obj)
    hints = _tensor_hints_take_lists(obj)

    def make(**kwargs: Any) -> AggregatorBalancer:
        refuse_stateful(obj)  # before building it: it may need packages we will not use
        kwargs = {
            k: torch.tensor(v, dtype=torch.float32) if isinstance(v, list | tuple) else v
            for k, v in kwargs.items()
        }
        return AggregatorBalancer(obj(**kwargs))

    make.__signature__ = inspect.signature(obj)  # type: ignore[attr-defined]
    make.__annotations__ = hints
    make.__name__ = make.__qualname__ = obj.__name__
    return make


def _tensor_hints_take_lists(cls: type) -> dict[str, Any]:
    """The type hints of ``cls(...)``'s arguments, a tensor argument also taking a list of
    numbers (YAML has no tensors)."""
    out: dict[str, Any] = {}
    for name, hint in type_hints(cls).items():
        if name == "return":
            continue
        if hint is torch.Tensor or torch.Tensor in typing.get_args(hint):
            hint = hint | list[float]
        out[name] = hint
    return out
