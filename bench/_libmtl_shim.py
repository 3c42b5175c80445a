"""Load LibMTL 1.1.5's weighting classes without its package ``__init__``, and host them.

LibMTL (``pip install --no-deps LibMTL==1.1.5``) cannot be imported whole here: its package
``__init__`` imports ``LibMTL.model.resnet``, which imports ``torchvision.models.utils`` (gone from
torchvision, and torchvision's wheel does not import against torch 2.13 CPU anyway). Its
``LibMTL/weighting/*.py`` files only need torch, numpy and scipy. :func:`weighting_class`
registers an empty ``LibMTL`` package object (same search path, ``__init__`` not run) in
``sys.modules`` and imports ``LibMTL.weighting.<Name>`` through it. Bench-only: nothing in
``mtlgraph/`` imports LibMTL.

LibMTL's weighting classes are mixins of its ``Trainer``'s model: they call
``self.get_share_params()``, ``self.zero_grad_share_params()`` and read ``self.task_num``,
``self.device``, ``self.rep_grad``, ``self.epoch``, ``self.train_loss_buffer``.
:func:`host` builds the minimal model class around an encoder and heads that provides them,
the way ``LibMTL.Trainer`` does (``init_param()`` at construction, the optimizer over all the
host's parameters, ``train_loss_buffer[:, epoch]`` = the epoch's mean losses).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

INSTALL_HINT = "pip install --no-deps LibMTL==1.1.5"


class PeerMissingError(ImportError):
    """A peer library (or one of its optional dependencies) is not installed."""


def weighting_class(name: str) -> type[nn.Module]:
    """LibMTL's weighting class ``name`` (e.g. ``"PCGrad"``), loaded without ``LibMTL/__init__``.

    Raises:
        PeerMissingError: LibMTL is not installed.
    """
    if "LibMTL" in sys.modules and sys.modules["LibMTL"] is None:  # blocked (as in the tests)
        raise PeerMissingError(f"LibMTL is not installed: {INSTALL_HINT}")
    pkg = sys.modules.get("LibMTL")
    if pkg is None:
        spec = importlib.util.find_spec("LibMTL")  # finds the package, does not run __init__
        if spec is None or not spec.submodule_search_locations:
            raise PeerMissingError(f"LibMTL is not installed: {INSTALL_HINT}")
        pkg = types.ModuleType("LibMTL")
        pkg.__path__ = list(spec.submodule_search_locations)
        pkg.__file__ = spec.origin
        pkg.__spec__ = spec  # importlib.util.find_spec("LibMTL") keeps working once it is here
        pkg.__doc__ = "LibMTL without its __init__ (bench/_libmtl_shim.py)"
        sys.modules["LibMTL"] = pkg
    module = importlib.import_module(f"LibMTL.weighting.{name}")
    cls: type[nn.Module] = getattr(module, name)
    return cls


def host(
    weighting: type[nn.Module],
    encoder: nn.Module,
    heads: Mapping[str, nn.Module],
    epochs: int,
    rep_grad: bool = False,
) -> nn.Module:
    """A LibMTL-style model: ``weighting`` mixed into a module holding ``encoder`` and ``heads``.

    ``forward(x)`` returns ``{task: logits}``; ``backward(losses, **kwargs)`` is LibMTL's.
    ``rep_grad``: LibMTL's representation-gradient mode, as its ``AbsArchitecture.forward`` does
    it: the encoder's output is kept as ``self.rep`` and each head reads its own detached copy
    (``self.rep_tasks[task]``), whose gradient is the task's row.
    """

    class Host(weighting):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.heads = nn.ModuleDict(dict(heads))
            self.task_name = list(heads)
            self.task_num = len(heads)
            self.device = torch.device("cpu")
            self.rep_grad = rep_grad  # False: of the shared parameters (LibMTL's default)
            self.rep: torch.Tensor | None = None
            self.rep_tasks: dict[str, torch.Tensor] = {}
            self.epoch = 0
            self.train_loss_buffer = np.zeros([self.task_num, epochs])
            self.init_param()

        def get_share_params(self):  # type: ignore[no-untyped-def]
            return self.encoder.parameters()

        def zero_grad_share_params(self) -> None:
            # LibMTL calls encoder.zero_grad(), written when that zeroed in place (torch 1.x);
            # torch 2's set-to-None breaks its _reset_grad (``param.grad.data = ...``).
            for p in self.encoder.parameters():
                if p.grad is not None:
                    p.grad.zero_()

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            rep = self.encoder(x)
            if not self.rep_grad:
                return {t: h(rep) for t, h in self.heads.items()}
            self.rep = rep
            self.rep_tasks = {t: rep.detach().clone().requires_grad_() for t in self.heads}
            return {t: h(self.rep_tasks[t]) for t, h in self.heads.items()}

    Host.__name__ = f"LibMTL{weighting.__name__}Host"
    return Host()
