"""LoRA adapters as graph nodes (``lora``): one shared base, a low-rank delta per adapter.

An adapter holds, for each ``Linear`` layer of its base whose name matches ``target_modules``
(or ``Conv2d``: ``in`` is then channels x kernel height x kernel width, the delta a convolution
of its own), two small matrices ``A`` (``r x in``) and ``B`` (``out x r``, zero at the start).
Running the adapter runs the base with ``y = W x + b + (alpha / r) * B A dropout(x)`` in those
layers: forward hooks on the base's layers, present only while the adapter runs
(:meth:`LoRA.enabled`). The base exists once, however many adapters use it; each adapter's
operation runs it once per batch, and two tasks share an adapter by naming the same module.
Gradients are exact: the delta is part of the graph, the base's weights get their own gradient
where they train.

The base is a submodule of each adapter: its parameters are one set of tensors (optimisers see
them once, a checkpoint file stores them once though the state dict names them under the base's
and each adapter's name); :func:`merged` gives a plain copy of the base with the deltas added to
its weights, which ``export`` uses (no hooks in an exported program).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.pretrained import HFEncoder


class LoRA(nn.Module):
    """A LoRA adapter on a shared base module: the base, run with this adapter's deltas.

    Args:
        base: The encoder (an ``hf_encoder``; in YAML its module name).
        r: Rank of each delta.
        alpha: Scale numerator: the delta is multiplied by ``alpha / r``.
        dropout: Dropout on a layer's input before the delta (0 = none).
        target_modules: Regular expressions; a ``Linear`` (or single-group ``Conv2d``) layer of
            the base whose dotted name (below the base) matches one with ``re.search`` gets a
            delta (``query``, ``value``: BERT's attention projections; ``convolution``: a
            ResNet's). ``None``: every such layer.

    Raises:
        ConfigError: ``r`` < 1, a negative ``alpha`` or ``dropout`` outside [0, 1), a base that
            is no module, or ``target_modules`` that match no ``Linear`` layer (with the names
            it has).

    Example:
        >>> import torch
        >>> from mtlgraph.graph.lora import LoRA
        >>> from mtlgraph.graph.pretrained import HFEncoder
        >>> enc = HFEncoder(config={"model_type": "bert", "vocab_size": 50, "hidden_size": 8,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16},
        ...     freeze=True)
        >>> adapter = LoRA(enc, r=2, target_modules=["query", "value"])
        >>> sorted(adapter.layers)
        ['encoder.layer.0.attention.self.query', 'encoder.layer.0.attention.self.value']
        >>> ids = torch.tensor([[2, 7, 3]])
        >>> _ = adapter.eval()  # no dropout in the base
        >>> torch.equal(adapter(ids), enc(ids))  # B starts at zero: the base's own output
        True
    """

    def __init__(
        self,
        base: HFEncoder,
        r: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: list[str] | None = None,
    ) -> None:
        super().__init__()
        problems = []
        if not isinstance(base, nn.Module):
            problems.append(f"base must be a module, got {type(base).__name__}")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            problems.append(f"r must be an integer >= 1, got {r!r}")
        if not alpha >= 0:
            problems.append(f"alpha must be >= 0, got {alpha!r}")
        if not 0 <= dropout < 1:
            problems.append(f"dropout must be in [0, 1), got {dropout!r}")
        if problems:
            raise ConfigError([f"lora: {p}" for p in problems])
        self.base = base
        self.r, self.alpha, self.scale = r, float(alpha), float(alpha) / r
        self.target_modules = list(target_modules) if target_modules is not None else None
        inner = base.model if isinstance(base, HFEncoder) else base
        self._inner = [inner]  # a list: not a second registration of the base's modules
        layers = {n: m for n, m in inner.named_modules() if _adaptable(m)}
        chosen = {n: m for n, m in layers.items() if _matches(n, self.target_modules)}
        if not chosen:
            shown = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ConfigError(
                [
                    f"lora: target_modules {self.target_modules} match no Linear or Conv2d layer "
                    f"of the base; its layers end in {shown}"
                ]
            )
        self.layers = list(chosen)
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for i, layer in enumerate(chosen.values()):
            out_size, *in_shape = layer.weight.shape  # Linear (out, in); Conv2d (out, in, kh, kw)
            a = torch.empty(r, math.prod(in_shape))
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.A[str(i)] = nn.Parameter(a)
            self.B[str(i)] = nn.Parameter(torch.zeros(out_size, r))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def width(self) -> int:
        """The base's output width."""
        return int(self.base.width)

    def _targets(self) -> dict[str, nn.Module]:
        modules = dict(self._inner[0].named_modules())
        return {name: modules[name] for name in self.layers}

    @contextlib.contextmanager
    def enabled(self) -> Iterator[None]:
        """While inside, the base runs with this adapter's deltas (forward hooks on its layers).

        Also the recompute context of gradient checkpointing inside the base:
        :func:`checkpoint_context` gives ``torch.utils.checkpoint`` this context, so that a
        layer recomputed in the backward pass sees the adapter it ran with.
        """
        handles = []
        try:
            for i, layer in enumerate(self._targets().values()):
                handles.append(layer.register_forward_hook(self._hook(str(i))))
            token = _ACTIVE.set((*_ACTIVE.get(), self))
            try:
                yield
            finally:
                _ACTIVE.reset(token)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, key: str) -> Callable[..., torch.Tensor]:
        a, b, drop, scale = self.A[key], self.B[key], self.drop, self.scale

        def add_delta(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> Any:
            x = drop(inputs[0])
            if isinstance(module, nn.Conv2d):  # the delta as a convolution of its own
                w = (b @ a).view(module.weight.shape).to(x.dtype) * scale
                conv = F.conv2d(x, w, None, module.stride, module.padding, module.dilation)
                return output + conv.to(output.dtype)
            return output + (x.to(a.dtype) @ a.t() @ b.t()).to(output.dtype) * scale

        return add_delta

    def forward(self, *inputs: Any) -> Any:
        with self.enabled():
            return self.base(*inputs)

    def delta(self, index: int) -> torch.Tensor:
        """The weight delta ``(alpha / r) * B A`` of the ``index``-th adapted layer."""
        return (self.B[str(index)] @ self.A[str(index)]) * self.scale

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, layers={len(self.layers)}"


def _adaptable(module: nn.Module) -> bool:
    """A ``Linear`` layer, or a plain ``Conv2d`` (one group, zero padding)."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


def _matches(name: str, patterns: list[str] | None) -> bool:
    if patterns is None:
        return True
    return any(re.search(p, name) for p in patterns)


_ACTIVE: contextvars.ContextVar[tuple[LoRA, ...]] = contextvars.ContextVar(
    "mtlgraph_active_adapters", default=()
)
"""The adapters running now (innermost last): what a checkpointed layer re-enables."""


def checkpoint_context() -> tuple[contextlib.AbstractContextManager[None], Any]:
    """A ``context_fn`` for ``torch.utils.checkpoint`` (non-reentrant) inside a base that
    adapters run: the recomputation in the backward pass runs with the adapter that was active
    in the forward pass (none: a plain recomputation).

    Example:
        >>> from mtlgraph.graph.lora import checkpoint_context
        >>> forward, recompute = checkpoint_context()  # outside any adapter
        >>> with forward, recompute:
        ...     pass
    """
    running = _ACTIVE.get()
    active = running[-1] if running else None
    recompute = active.enabled() if active is not None else contextlib.nullcontext()
    return contextlib.nullcontext(), recompute


def merged(adapter: LoRA) -> nn.Module:
    """A copy of the adapter's base with its deltas added to the weights: the same outputs
    (up to rounding) as the adapter in eval mode, with no hooks (for ``export``)."""
    base = copy.deepcopy(adapter.base)
    inner = base.model if isinstance(base, HFEncoder) else base
    modules = dict(inner.named_modules())
    with torch.no_grad():
        for i, name in enumerate(adapter.layers):
            weight = modules[name].weight
            assert isinstance(weight, torch.Tensor)
            weight.add_(adapter.delta(i).view(weight.shape).to(weight.dtype))
    return base


def merge_adapters(graph: Any) -> None:
    """Replace, in an export's task graph (its ``plan`` and ``modules_by_name``), every
    :class:`LoRA` by its :func:`merged` base: the exported program holds plain weights, one
    merged copy of the base per adapter it runs."""
    copies: dict[int, nn.Module] = {}
    steps = []
    for node_id, module, srcs in graph.plan.steps:
        if isinstance(module, LoRA) and id(module) not in copies:
            copies[id(module)] = merged(module)
        steps.append((node_id, copies.get(id(module), module), srcs))
    if not copies:
        return
    graph.plan = dataclasses.replace(graph.plan, steps=tuple(steps))
    for name, module in list(graph.modules_by_name.items()):
        if id(module) in copies:
            graph.modules_by_name[name] = copies[id(module)]


__all__ = ["LoRA", "checkpoint_context", "merge_adapters", "merged"]
