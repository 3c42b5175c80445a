"""Activations by name: the :data:`ACTIVATIONS` registry (``activation: gelu`` in a config).

Every module that takes an ``activation`` argument (``mlp``, ``activation``, the architectures'
experts) builds it here, so a name registered once works in all of them.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from mtlgraph.registry import Registry

ACTIVATIONS: Registry[Callable[[], nn.Module]] = Registry(
    "activation",
    {
        "relu": nn.ReLU,
        "gelu": nn.GELU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "silu": nn.SiLU,
        "leaky_relu": nn.LeakyReLU,
    },
    base=nn.Module,
)
"""Activations by name; ``ACTIVATIONS.build(spec)`` makes a fresh module.

Example:
    >>> from mtlgraph.graph.activations import ACTIVATIONS
    >>> ACTIVATIONS.build("gelu"), ACTIVATIONS.build({"name": "leaky_relu", "negative_slope": 0.2})
    (GELU(approximate='none'), LeakyReLU(negative_slope=0.2))
"""
