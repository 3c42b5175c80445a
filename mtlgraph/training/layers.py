"""The layers of a module, bottom to top: what layer-wise learning-rate decay
(``layer_lr_decay``), gradual unfreezing (the ``gradual_unfreezing`` hook) and gradient
checkpointing (``gradient_checkpointing``) act on. One resolver for all three, so they always
agree on which parameters a layer holds (docs/training.md § Fine-tuning pretrained modules).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mtlgraph._suggest import did_you_mean, first_few
from mtlgraph.graph.lora import checkpoint_context


@dataclass
class LayerDecay:
    """``layer_lr_decay`` of one module: the top layer trains at the module's learning rate,
    each layer below at ``decay`` times the one above it.

    Example:
        >>> from mtlgraph.training.layers import LayerDecay
        >>> LayerDecay(decay=1.5).problems()
        ['decay: must be in (0, 1], got 1.5']
    """

    decay: float  # lr factor between a layer and the layer above it, in (0, 1]
    # submodule names or patterns bottom to top (e.g. ["embeddings", "encoder.layer.*"]);
    # None = found: the outermost ModuleList's items, with what comes before it as the bottom
    layers: list[str] | None = None

    def problems(self) -> list[str]:
        """Value checks (``TrainerConfig.validate`` runs them); one sentence per problem."""
        if not (0 < self.decay <= 1 and math.isfinite(self.decay)):
            return [f"decay: must be in (0, 1], got {self.decay}"]
        return [
            f"layers: entries must be non-empty strings, got {n!r}"
            for n in self.layers or []
            if not n
        ]


def as_layer_decay(value: float | LayerDecay) -> LayerDecay:
    """A ``layer_lr_decay`` entry as a :class:`LayerDecay` (a number is its ``decay``)."""
    return value if isinstance(value, LayerDecay) else LayerDecay(decay=float(value))


@dataclass(frozen=True)
class Layer:
    """One layer of a module: its name (a submodule path, or several joined by ``+``), the
    submodules it consists of, and its parameters (each parameter in one layer only)."""

    name: str
    modules: tuple[nn.Module, ...]
    params: tuple[nn.Parameter, ...] = field(repr=False)


def module_layers(
    module: nn.Module, layers: Sequence[str] | None = None, where: str = "layers"
) -> tuple[list[Layer], list[str]]:
    """The layers of ``module`` bottom to top, and one sentence per problem.

    Given ``layers``, each entry names submodules (``fnmatch`` patterns matched against the
    dotted names of the same depth: ``encoder.layer.*`` is ``encoder.layer.0``,
    ``encoder.layer.1``, ... in registration order); each match is a layer. Without them: an
    ``nn.Sequential``/``nn.ModuleList`` module's items; else the items of the outermost
    ``nn.ModuleList`` with two or more (a transformer's blocks, a vision model's stages; an
    ``nn.Sequential`` when there is none), below them one layer of everything registered before
    it (the embeddings). Parameters in no layer (a pooler, a final norm) are above the top.

    Example:
        >>> from torch import nn
        >>> from mtlgraph.training.layers import module_layers
        >>> class Encoder(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.embeddings = nn.Embedding(10, 4)
        ...         self.blocks = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
        ...         self.pooler = nn.Linear(4, 4)
        >>> [layer.name for layer in module_layers(Encoder())[0]]
        ['embeddings', 'blocks.0', 'blocks.1', 'blocks.2']
        >>> print(module_layers(Encoder(), ["embedings", "blocks.*"])[1][0])
        ... # doctest: +NORMALIZE_WHITESPACE
        layers[0]: 'embedings' names no submodule (did you mean 'embeddings'?); at that depth:
        'blocks', 'embeddings', 'pooler'
    """
    if layers is not None:
        found, problems = _named_layers(module, layers, where)
    else:
        found, problems = _found_layers(module), []
    seen: set[int] = set()
    out = []
    for name, modules, params in found:
        own = tuple(p for p in params if id(p) not in seen)
        seen.update(id(p) for p in own)
        out.append(Layer(name, tuple(modules), own))
    return out, problems


def _named_layers(
    module: nn.Module, patterns: Sequence[str], where: str
) -> tuple[list[tuple[str, list[nn.Module], list[nn.Parameter]]], list[str]]:
    named = [(n, m) for n, m in module.named_modules() if n]
    found: list[tuple[str, list[nn.Module], list[nn.Parameter]]] = []
    problems: list[str] = []
    taken: dict[str, str] = {}
    for i, pattern in enumerate(patterns):
        depth = pattern.count(".")
        level = [n for n, _ in named if n.count(".") == depth]
        hits = [(n, m) for n, m in named if n in level and fnmatch.fnmatchcase(n, pattern)]
        if not hits:
            problems.append(
                f"{where}[{i}]: '{pattern}' names no submodule{did_you_mean(pattern, level)}; "
                f"at that depth: {first_few([repr(n) for n in sorted(level)], 8)}"
            )
        for n, m in hits:
            if n in taken:
                problems.append(f"{where}[{i}]: '{n}' is already a layer (from '{taken[n]}')")
                continue
            taken[n] = pattern
            found.append((n, [m], list(m.parameters())))
    return found, problems


def _stack(module: nn.Module) -> tuple[str, nn.Module] | None:
    """The module's layer stack: itself when it is a list or sequence, else the outermost
    ``ModuleList`` (then ``Sequential``) of two or more items."""
    if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) >= 2:
        return "", module
    for kind in (nn.ModuleList, nn.Sequential):
        stacks = [(n, m) for n, m in module.named_modules() if isinstance(m, kind) and len(m) >= 2]
        if stacks:
            return min(stacks, key=lambda nm: nm[0].count("."))  # first of the outermost
    return None


def _found_layers(module: nn.Module) -> list[tuple[str, list[nn.Module], list[nn.Parameter]]]:
    stack = _stack(module)
    if stack is None:
        return []
    path, items = stack
    prefix = f"{path}." if path else ""
    blocks = [(f"{prefix}{n}", [m], list(m.parameters())) for n, m in items.named_children()]
    first = next((p for _, _, ps in blocks for p in ps), None)
    if first is None or not path:
        return blocks
    below: dict[str, list[nn.Parameter]] = {}  # sibling subtree along the path -> parameters
    steps = path.split(".")
    for name, p in module.named_parameters():
        if p is first:
            break
        parts = name.split(".")
        k = next((i for i, (a, b) in enumerate(zip(parts, steps, strict=False)) if a != b), 0)
        below.setdefault(".".join(parts[: k + 1]), []).append(p)
    if not below:
        return blocks
    modules = [module.get_submodule(n) for n in below if _is_submodule(module, n)]
    bottom = ("+".join(below), modules, [p for ps in below.values() for p in ps])
    return [bottom, *blocks]


def _is_submodule(module: nn.Module, name: str) -> bool:
    try:
        module.get_submodule(name)
    except AttributeError:
        return False
    return True


BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
"""Layers whose forward updates running statistics (refused under generic checkpointing)."""


class CheckpointedForward:
    """A module's ``forward`` that recomputes its activations in the backward pass
    (``torch.utils.checkpoint``, non-reentrant, under the LoRA adapter that ran it: see
    :func:`~mtlgraph.graph.lora.checkpoint_context`) while the module trains with gradients on;
    otherwise the plain forward. Set as the instance's ``forward`` by
    :func:`enable_checkpointing`; picklable and copied with the module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module
        forward = type(module).forward
        if module.training and torch.is_grad_enabled():
            return checkpoint(
                forward,
                module,
                *args,
                use_reentrant=False,
                context_fn=checkpoint_context,  # the recomputation runs with the active adapter
                **kwargs,
            )
        return forward(module, *args, **kwargs)


HF_CHECKPOINTING = (
    ("activation_checkpointing_enable", "activation_checkpointing_kwargs"),
    ("gradient_checkpointing_enable", "gradient_checkpointing_kwargs"),  # transformers < 5
)
"""A Hugging Face model's own checkpointing switches, and the name of their torch keywords."""


def _checkpoint_targets(
    module: nn.Module,
) -> tuple[tuple[Callable[..., Any], str] | None, list[nn.Module]]:
    """The switch (and its keyword) of the Hugging Face model in ``module`` that checkpoints
    itself (:data:`HF_CHECKPOINTING`), else the submodules whose forward
    :func:`enable_checkpointing` wraps (its layers' modules, or itself)."""
    for m in module.modules():
        if getattr(m, "supports_gradient_checkpointing", False):
            for attr, keyword in HF_CHECKPOINTING:
                enable = getattr(m, attr, None)
                if callable(enable):
                    return (enable, keyword), []
    layers, _ = module_layers(module)
    return None, [m for layer in layers for m in layer.modules] or [module]


def checkpointing_problems(module: nn.Module, name: str) -> list[str]:
    """Why ``module`` cannot take :func:`enable_checkpointing` (``[]``: it can): a layer that
    holds batch norm, whose running statistics a recomputed forward would update twice a step.
    """
    hf, targets = _checkpoint_targets(module)
    norms = [
        type(sub).__name__ for m in targets for sub in m.modules() if isinstance(sub, BATCH_NORMS)
    ]
    if hf is not None or not norms:
        return []
    return [
        f"gradient_checkpointing: module '{name}' holds {norms[0]}, whose running statistics "
        "would be updated twice a step when its forward is recomputed; remove the module from "
        "gradient_checkpointing (or use GroupNorm/LayerNorm in it)"
    ]


def enable_checkpointing(module: nn.Module) -> str:
    """Turn on gradient checkpointing for ``module`` (check :func:`checkpointing_problems`
    first): through the Hugging Face model's own ``gradient_checkpointing_enable`` (non-reentrant)
    when it holds one that supports it, else by recomputing each layer
    (:func:`module_layers`), or the whole module when it has no layers.

    Returns:
        How: ``"hf"``, ``"layers"`` or ``"module"``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph.training.layers import enable_checkpointing
        >>> mlp = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
        >>> enable_checkpointing(mlp)
        'layers'
        >>> mlp(torch.ones(1, 3)).sum().backward()  # the layers' forwards run twice
    """
    hf, targets = _checkpoint_targets(module)
    if hf is not None:
        # non-reentrant: a reentrant checkpoint gives no gradient to layers after frozen
        # embeddings; the context: recomputed layers run with the LoRA adapter that ran them
        enable, keyword = hf
        enable(**{keyword: {"use_reentrant": False, "context_fn": checkpoint_context}})
        return "hf"
    for m in targets:
        if not isinstance(m.__dict__.get("forward"), CheckpointedForward):
            m.forward = CheckpointedForward(m)
    return "module" if targets == [module] else "layers"
