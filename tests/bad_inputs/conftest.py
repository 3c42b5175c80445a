"""Fixtures of the bad-input corpus (helpers in corpus_helpers.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn


@pytest.fixture
def params_of() -> Callable[[nn.Module], list[torch.Tensor]]:
    """Copies of a module's parameters (to assert a refused operation changed nothing)."""
    return lambda m: [p.detach().clone() for p in m.parameters()]
