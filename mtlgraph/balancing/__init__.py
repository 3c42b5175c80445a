"""How a step's per-task losses become one update of the parameters.

A :class:`Balancer` receives the step's per-task losses and is responsible for putting gradients
into ``.grad`` (it calls ``ctx.backward``, or writes ``.grad`` itself). Two families:

- **Loss-based** (one backward pass): ``sum``, ``uncertainty``, ``dwa``, ``gradnorm``,
  ``inverse_metric``, ``rlw``, ``famo`` combine the losses into one weighted scalar.
- **Gradient-based** (one gradient per task on the shared parameters): ``pcgrad``, ``cagrad``,
  ``mgda``, ``imtl``, ``aligned_mtl``, ``upgrad``, ``nash_mtl``, ``gradvac``, ``db_mtl`` combine
  per-task gradients of the shared parameters into one direction; parameters that only one task
  of the step uses get that task's own gradient.

Every balancer applies the static ``Task.weight`` first (it multiplies the task's loss). Balancers
are ``nn.Module`` objects: learned weights are parameters (optimised by the Trainer, in their own
optimizer group), and all other state (loss histories, initial losses, metric weights, random
generators) travels in ``state_dict()`` as tensors and plain values, so a checkpoint loads with
``torch.load(weights_only=True)`` and a resumed run continues bit-exactly.

Life cycle, driven by the :class:`~mtlgraph.Trainer`: ``setup(model.tasks)`` (before the optimizer
is built; call it before ``load_state_dict`` too), then per step ``backward(losses, ctx)``,
``on_epoch_end`` after each epoch and ``on_evaluation`` after each evaluation. The formulas are in
``docs/balancing.md``.

Where the code lives: :mod:`.base` (``Balancer``, ``StepContext``, shared helpers),
:mod:`.weighting` (loss-weighting methods), :mod:`.gradient` (gradient methods),
:mod:`.modern` (FAMO, IMTL-G, Aligned-MTL, UPGrad, Nash-MTL, GradVac, DB-MTL),
:mod:`.solvers` (their numeric solvers on the Gram matrix), :mod:`.registry` (``BALANCERS``);
the per-task shared-parameter gradients are :mod:`mtlgraph.gradients`.
Every name below is importable from ``mtlgraph.balancing``.
"""

from __future__ import annotations

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
    FAMOBalancer,
    GradVacBalancer,
    IMTLBalancer,
    NashMTLBalancer,
    UPGradBalancer,
)
from mtlgraph.balancing.registry import BALANCERS
from mtlgraph.balancing.weighting import (
    DWABalancer,
    GradNormBalancer,
    InverseMetricBalancer,
    RLWBalancer,
    SumBalancer,
    UncertaintyBalancer,
)
from mtlgraph.gradients import SharedGradients, SharedLayout

__all__ = [
    "BALANCERS",
    "AlignedMTLBalancer",
    "Balancer",
    "CAGradBalancer",
    "DBMTLBalancer",
    "DWABalancer",
    "FAMOBalancer",
    "GradNormBalancer",
    "GradVacBalancer",
    "GradientBalancer",
    "IMTLBalancer",
    "InverseMetricBalancer",
    "MGDABalancer",
    "NashMTLBalancer",
    "PCGradBalancer",
    "RLWBalancer",
    "SharedGradients",
    "SharedLayout",
    "StepContext",
    "SumBalancer",
    "UPGradBalancer",
    "UncertaintyBalancer",
]
