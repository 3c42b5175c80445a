"""Loss functions by task type, and the loss registry :data:`LOSSES`: a loss is
``loss(output, target) -> scalar tensor``, called on a task's active rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mtlgraph.exceptions import DataError
from mtlgraph.metrics import active_mask
from mtlgraph.registry import Registry

LossFunc = Callable[[Any, torch.Tensor], torch.Tensor]
"""``loss(output, target) -> scalar tensor``."""


def _rows_match(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Reshape ``(N, 1)`` outputs to ``(N,)`` targets (and similar) when element counts agree."""
    if output.shape != target.shape and output.numel() == target.numel():
        return output.reshape(target.shape)
    return output


def multiclass_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on logits ``(N, C)`` and class ids ``(N,)`` (mean over rows); float
    targets ``(N, C)`` are soft labels: :func:`cross_entropy_with_probs`."""
    if target.ndim == 2 and target.is_floating_point():
        return cross_entropy_with_probs(output, target)
    return F.cross_entropy(output, target.long())


def cross_entropy_with_probs(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy between logits ``(N, C)`` and target distributions ``(N, C)`` (soft labels).

    Row ``i`` costs ``-sum_c target[i, c] * weight[c] * log_softmax(input)[i, c]``: with one-hot
    targets (and no weight) it equals :func:`torch.nn.functional.cross_entropy` on the class
    ids; with class weights, each class's term is weighted (Snorkel's definition, which does not
    renormalise the mean by the weights as torch's hard-label cross-entropy does).

    Args:
        input: Logits ``(N, C)``.
        target: Probabilities ``(N, C)``, each row summing to 1 (checked before training, see
            :mod:`mtlgraph.graph.soft_labels`).
        weight: Optional per-class weights ``(C,)``.
        reduction: ``"mean"`` (over rows), ``"sum"`` or ``"none"`` (one value per row).

    Raises:
        DataError: ``target`` does not have the shape of ``input``.
        ValueError: An unknown ``reduction``.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from mtlgraph.graph.losses import cross_entropy_with_probs
        >>> logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
        >>> hard = cross_entropy_with_probs(logits, torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        >>> torch.allclose(hard, F.cross_entropy(logits, torch.tensor([0, 1])))
        True
        >>> round(cross_entropy_with_probs(logits, torch.tensor([[0.5, 0.5]] * 2)).item(), 4)
        0.9701
    """
    if input.shape != target.shape:
        raise DataError(
            f"soft labels of shape {tuple(target.shape)} for outputs of shape "
            f"{tuple(input.shape)}; give one probability per class of the head"
        )
    logp = F.log_softmax(input, dim=1)
    terms = target.to(logp.dtype) * logp
    if weight is not None:
        terms = terms * weight.to(logp.dtype)
    per_row = -terms.sum(dim=1)
    if reduction in ("none", "sum", "mean"):
        return per_row if reduction == "none" else getattr(per_row, reduction)()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def binary_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits on one logit per row and 0/1 targets (or soft labels:
    probabilities of the positive class).

    Raises:
        DataError: The output does not hold one logit per label.
    """
    output = _rows_match(output, target)
    if output.shape != target.shape:
        raise DataError(
            f"a binary task needs one logit per label: output of shape "
            f"{tuple(output.shape)} for labels of shape {tuple(target.shape)}; give the head "
            "one output unit, or use task_type='multiclass' for one logit per class"
        )
    return F.binary_cross_entropy_with_logits(output, target.to(output.dtype))


def regression_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error; ``(N, 1)`` outputs are matched to ``(N,)`` targets."""
    return F.mse_loss(_rows_match(output, target), target.to(output.dtype))


@dataclass(frozen=True)
class MaskedMultilabelLoss:
    """BCE with logits over ``(N, L)`` targets, ignoring elements equal to ``ignore_value``."""

    ignore_value: float | int | None = -1

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        active = active_mask(target, self.ignore_value)
        t = torch.where(active, target, torch.zeros_like(target)).to(output.dtype)
        loss = F.binary_cross_entropy_with_logits(output, t, reduction="none")
        return (loss * active).sum() / active.sum().clamp_min(1)


@dataclass(frozen=True)
class MaskedRegressionLoss:
    """MSE over multi-output targets ``(N, D)``, ignoring elements equal to ``ignore_value``."""

    ignore_value: float | int | None = math.nan

    def __call__(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        output = _rows_match(output, target)
        active = active_mask(target, self.ignore_value)
        if bool(active.all()):
            return F.mse_loss(output, target.to(output.dtype))
        t = torch.where(active, target, torch.zeros_like(target)).to(output.dtype)
        return (((output - t) ** 2) * active).sum() / active.sum().clamp_min(1)


def l1_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error; ``(N, 1)`` outputs are matched to ``(N,)`` targets."""
    return F.l1_loss(_rows_match(output, target), target.to(output.dtype))


def smooth_l1_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber-like smooth L1 loss (beta 1); ``(N, 1)`` outputs are matched to ``(N,)`` targets."""
    return F.smooth_l1_loss(_rows_match(output, target), target.to(output.dtype))


LOSSES: Registry[LossFunc] = Registry(
    "loss",
    {
        "cross_entropy": multiclass_loss,
        "cross_entropy_with_probs": cross_entropy_with_probs,
        "binary_cross_entropy": binary_loss,
        "mse": regression_loss,
        "l1": l1_loss,
        "smooth_l1": smooth_l1_loss,
    },
    supplied={"output": "remove it", "target": "remove it"},
    bind=True,
)
"""Losses by name; ``LOSSES.register(name, func)`` adds ``func(output, target) -> scalar tensor``
(called on a task's active rows), ``LOSSES.build(spec)`` returns it (a spec's arguments bound).

Example:
    >>> import torch.nn.functional as F
    >>> from mtlgraph.graph.losses import LOSSES
    >>> @LOSSES.register("nll_doc")
    ... def nll(out, y, reduction: str = "mean"):
    ...     return F.nll_loss(out, y.long(), reduction=reduction)
    >>> LOSSES.build({"name": "nll_doc", "reduction": "sum"}).keywords
    {'reduction': 'sum'}
    >>> LOSSES.unregister("nll_doc") is nll
    True
"""
