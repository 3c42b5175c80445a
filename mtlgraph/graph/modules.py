"""Building blocks a config can name, and the module registry :data:`MODULES`.

Built in: ``linear``, ``mlp``, ``embedding_bag``, ``conv2d_stack``, ``identity``, ``concat``,
``sum``, ``dropout``, ``activation``, the architectures of :mod:`mtlgraph.graph.experts`, and
pretrained encoders with their adapters (``hf_encoder``, ``lora``); see
``docs/architectures.md`` and ``docs/concepts.md``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from mtlgraph.graph.activations import ACTIVATIONS as ACTIVATIONS  # its documented path too
from mtlgraph.graph.experts import CrossStitch, Experts, Gate, MTANAttention
from mtlgraph.graph.lora import LoRA
from mtlgraph.graph.pretrained import HFEncoder
from mtlgraph.registry import Registry

ModuleFactory = Callable[..., nn.Module]
"""A class or function that returns an ``nn.Module`` from keyword arguments."""


class MLP(nn.Sequential):
    """Linear layers, each followed by an activation (and dropout); an optional plain output layer.

    Args:
        in_dim: Input features.
        hidden: Width of each hidden layer; every one is ``Linear`` + activation (+ dropout).
        out_dim: When given, a final ``Linear`` to ``out_dim`` without activation.
        activation: One of :data:`ACTIVATIONS` (``relu``, ``gelu``, ``tanh``, ``sigmoid``...).
        dropout: Dropout probability after each hidden activation (0 = none).

    Example:
        >>> import torch
        >>> from mtlgraph.graph.modules import MLP
        >>> mlp = MLP(in_dim=2, hidden=[8, 4])  # the Snorkel tutorial's base_mlp
        >>> [type(m).__name__ for m in mlp]
        ['Linear', 'ReLU', 'Linear', 'ReLU']
        >>> mlp(torch.zeros(3, 2)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self,
        in_dim: int,
        hidden: list[int],
        out_dim: int | None = None,
        activation: str = "relu",
        dropout: float = 0.0,
    ) -> None:
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), ACTIVATIONS.build(activation, "activation")]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
        super().__init__(*layers)


class EmbeddingBag(nn.Module):
    """Token ids ``(B, L)`` (padded with ``padding_idx``) -> one vector ``(B, embedding_dim)``.

    Args:
        num_embeddings: Vocabulary size (ids are ``0..num_embeddings-1``).
        embedding_dim: Size of the output vector.
        mode: ``"mean"``, ``"sum"`` or ``"max"`` over the non-padding tokens of a row.
        padding_idx: Id of the padding token, excluded from the bag (``None``: no padding).

    Example:
        >>> import torch
        >>> from mtlgraph.graph.modules import EmbeddingBag
        >>> bag = EmbeddingBag(num_embeddings=10, embedding_dim=4)
        >>> bag(torch.tensor([[3, 4, 0], [5, 0, 0]])).shape
        torch.Size([2, 4])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        mode: str = "mean",
        padding_idx: int | None = 0,
    ) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(
            num_embeddings, embedding_dim, mode=mode, padding_idx=padding_idx
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.bag(tokens.long())


class Conv2dStack(nn.Module):
    """Small images ``(B, C, H, W)`` -> one vector ``(B, channels[-1])``, or a feature map.

    Each layer is a ``kernel_size`` convolution (same padding) (+ batch norm) + activation + 2x2
    max pool; a global average pool ends the stack. With ``global_pool=False`` the stack returns
    its last map ``(B, channels[-1], H', W')``: a stage of a shared trunk, or MTAN's 3x3
    convolution between attention modules (``docs/architectures.md``).

    Args:
        in_channels: Channels of the input images.
        channels: Output channels of each convolution layer.
        kernel_size: Odd convolution kernel size.
        activation: One of :data:`ACTIVATIONS`.
        batch_norm: Batch norm between each convolution and its activation.
        pool: A 2x2 max pool after each layer (halves height and width, rounding up).
        global_pool: Average over height and width at the end: ``(B, channels[-1])``.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.modules import Conv2dStack
        >>> Conv2dStack(in_channels=3, channels=[8, 16])(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 16])
        >>> stage = Conv2dStack(3, [8], batch_norm=True, pool=False, global_pool=False)
        >>> stage(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 8, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        channels: list[int],
        kernel_size: int = 3,
        activation: str = "relu",
        batch_norm: bool = False,
        pool: bool = True,
        global_pool: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for c in channels:
            layers.append(nn.Conv2d(width, c, kernel_size, padding=kernel_size // 2))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(ACTIVATIONS.build(activation, "activation"))
            if pool:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            width = c
        self.layers = nn.Sequential(*layers)
        self.global_pool = global_pool

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.layers(images)
        return maps.mean(dim=(2, 3)) if self.global_pool else maps


class Concat(nn.Module):
    """Concatenate several inputs along ``dim`` (the feature dimension by default).

    Example:
        >>> import torch
        >>> from mtlgraph.graph.modules import Concat
        >>> Concat()(torch.zeros(2, 3), torch.zeros(2, 1)).shape
        torch.Size([2, 4])
    """

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return torch.cat(inputs, dim=self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class Sum(nn.Module):
    """Element-wise sum of several inputs of one shape.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.modules import Sum
        >>> Sum()(torch.ones(2), torch.ones(2)).tolist()
        [2.0, 2.0]
    """

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        total = inputs[0]
        for x in inputs[1:]:
            total = total + x
        return total


class Activation(nn.Module):
    """An activation by name (``relu``, ``gelu``, ``tanh``, ``sigmoid``, ``silu``, ``leaky_relu``).

    Example:
        >>> import torch
        >>> from mtlgraph.graph.modules import Activation
        >>> Activation("relu")(torch.tensor([-1.0, 2.0])).tolist()
        [0.0, 2.0]
    """

    def __init__(self, name: str = "relu") -> None:
        super().__init__()
        self.fn = ACTIVATIONS.build(name, "activation")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def _linear(in_features: int, out_features: int, bias: bool = True) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)  # no device/dtype: the model's


def _identity() -> nn.Module:
    return nn.Identity()


MODULES: Registry[ModuleFactory] = Registry(
    "module type",
    {
        "linear": _linear,
        "mlp": MLP,
        "embedding_bag": EmbeddingBag,
        "conv2d_stack": Conv2dStack,
        "identity": _identity,
        "concat": Concat,
        "sum": Sum,
        "dropout": nn.Dropout,
        "activation": Activation,
        "mmoe_experts": Experts,  # MMoE, CGC / PLE, DSelect-k: docs/architectures.md
        "mmoe_gate": Gate,
        "cgc_experts": Experts,
        "cgc_gate": Gate,
        "cross_stitch": CrossStitch,
        "mtan_attention": MTANAttention,
        "hf_encoder": HFEncoder,  # pretrained encoders and adapters: docs/architectures.md
        "lora": LoRA,
    },
    base=nn.Module,
    keys=("type",),
)
"""Module types by name: a class or a function returning an ``nn.Module`` from keyword
arguments (the YAML keys next to ``type:``, checked against its signature and annotations).
``MODULES.register(name, factory)`` adds one, ``MODULES.unregister`` removes one.

Example:
    >>> from torch import nn
    >>> from mtlgraph.graph.modules import MODULES
    >>> @MODULES.register("scale_doc")
    ... class Scale(nn.Module):
    ...     def __init__(self, factor: float = 2.0):
    ...         super().__init__()
    ...         self.factor = factor
    >>> MODULES.build({"type": "scale_doc", "factor": 3}).factor
    3.0
    >>> MODULES.problems({"type": "scale_doc", "factor": "x"}, "modules.s")
    ["modules.s.factor: expected a number, got the string 'x'"]
    >>> MODULES.unregister("scale_doc") is Scale
    True
"""
