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
)
"""Activations by name; each entry builds a fresh module."""


def activation_module(name: str) -> nn.Module:
    """A fresh activation module of the registered ``name``.

    Raises:
        UnknownNameError: ``name`` is not registered (with a suggestion).

    Example:
        >>> from mtlgraph.graph.activations import activation_module
        >>> activation_module("gelu")
        GELU(approximate='none')
    """
    return ACTIVATIONS.get(name)()
