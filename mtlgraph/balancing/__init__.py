"""How a step's per-task losses become one update of the parameters.

A :class:`Balancer` turns the step's per-task losses into ``.grad``: loss-based balancers (``sum``,
``uncertainty``, ``dwa``, ``gradnorm``, ``inverse_metric``, ``rlw``, ``famo``, ``stch``,
``go4align``) weight the losses; gradient-based ones (``pcgrad``, ``cagrad``, ``mgda``, ``imtl``,
``aligned_mtl``, ``upgrad``, ``nash_mtl``, ``gradvac``, ``db_mtl``, ``fairgrad``, ``moco``,
``sdmgrad``, ``excess_mtl``, and TorchJD's aggregators through ``AggregatorBalancer``) combine
per-task gradients of the shared parameters. Life cycle, state and formulas:
``docs/balancing.md``.
"""

from __future__ import annotations

from mtlgraph.balancing.aggregators import AggregatorBalancer
from mtlgraph.balancing.base import Balancer, StepContext
from mtlgraph.balancing.gradient import (
    CAGradBalancer,
    GradientBalancer,
    MGDABalancer,
    PCGradBalancer,
)
from mtlgraph.balancing.modern import (
    AlignedMTLBalancer,
    DBMTLBalancer,
    ExcessMTLBalancer,
    FairGradBalancer,
    FAMOBalancer,
    GradVacBalancer,
    IMTLBalancer,
    MoCoBalancer,
    NashMTLBalancer,
    SDMGradBalancer,
    UPGradBalancer,
)
from mtlgraph.balancing.registry import BALANCERS
from mtlgraph.balancing.weighting import (
    DWABalancer,
    GO4AlignBalancer,
    GradNormBalancer,
    InverseMetricBalancer,
    RLWBalancer,
    STCHBalancer,
    SumBalancer,
    UncertaintyBalancer,
)
from mtlgraph.gradients import SharedGradients, SharedLayout

__all__ = [
    "BALANCERS",
    "AggregatorBalancer",
    "AlignedMTLBalancer",
    "Balancer",
    "CAGradBalancer",
    "DBMTLBalancer",
    "DWABalancer",
    "ExcessMTLBalancer",
    "FAMOBalancer",
    "FairGradBalancer",
    "GO4AlignBalancer",
    "GradNormBalancer",
    "GradVacBalancer",
    "GradientBalancer",
    "IMTLBalancer",
    "InverseMetricBalancer",
    "MGDABalancer",
    "MoCoBalancer",
    "NashMTLBalancer",
    "PCGradBalancer",
    "RLWBalancer",
    "SDMGradBalancer",
    "STCHBalancer",
    "SharedGradients",
    "SharedLayout",
    "StepContext",
    "SumBalancer",
    "UPGradBalancer",
    "UncertaintyBalancer",
]
