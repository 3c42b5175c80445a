"""Modules from their specs: nested module arguments (a mapping with a ``type:`` key) and
``init_from`` (a state dict loaded with ``weights_only=True``); see ``docs/config.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.modules import MODULES


def _is_spec(value: object) -> bool:
    return isinstance(value, Mapping) and "type" in value


def _parts(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A module spec as (itself without ``init_from`` and nested modules, the nested modules)."""
    own = {k: v for k, v in spec.items() if k != "init_from" and not _is_spec(v)}
    return own, {k: v for k, v in spec.items() if _is_spec(v)}


def check_module_spec(spec: Mapping[str, Any], path: str) -> list[str]:
    """Every problem of a module spec ``{type, init_from?, **kwargs}``: an unknown type,
    arguments its signature does not take, missing or mistyped ones, nested module specs
    (checked the same way), an ``init_from`` that is not a string."""
    own, nested = _parts(spec)
    problems = MODULES.problems(own, path, given=nested)
    for key, sub in nested.items():
        problems += check_module_spec(sub, f"{path}.{key}")
    init = spec.get("init_from")
    if init is not None and not isinstance(init, str):
        problems.append(f"{path}.init_from: expected a file path (a string), got {init!r}")
    return problems


def build_module(spec: Mapping[str, Any], path: str, base_dir: str | Path = ".") -> nn.Module:
    """Build a module from its spec (nested module arguments first), then load ``init_from``.

    Raises:
        ConfigError: An unknown type, a factory that returns no ``nn.Module``, an ``init_from``
            file that is missing, unreadable or does not fit the module.
    """
    own, nested = _parts(spec)
    built = {k: build_module(v, f"{path}.{k}", base_dir) for k, v in nested.items()}
    module: nn.Module = MODULES.build(own, path, **built)
    init = spec.get("init_from")
    if init is not None:
        load_init(module, Path(base_dir) / str(init), f"{path}.init_from")
    return module


def load_init(module: nn.Module, file: Path, where: str) -> None:
    """Load a state dict (``torch.save(module.state_dict(), file)``) into ``module``.

    Raises:
        ConfigError: A missing or unreadable file, or one whose keys or shapes do not fit.
    """
    if not file.is_file():
        raise ConfigError([f"{where}: file '{file}' does not exist"])
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's refusal (a pickled object, not a torch file)
        raise ConfigError(
            [f"{where}: cannot read '{file}' with weights_only=True ({type(e).__name__}: {e})"]
        ) from None
    tensors = isinstance(state, Mapping) and all(
        isinstance(v, torch.Tensor) for v in state.values()
    )
    if not tensors:
        raise ConfigError(
            [f"{where}: '{file}' holds no state dict; save one with torch.save(m.state_dict(), f)"]
        )
    own = module.state_dict()
    problems = [f"{where}: '{file}' lacks '{k}'" for k in own if k not in state]
    problems += [
        f"{where}: '{file}' has '{k}', which the module lacks" for k in state if k not in own
    ]
    problems += [
        f"{where}: '{k}' has shape {list(state[k].shape)} in '{file}', the module's is "
        f"{list(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if problems:
        raise ConfigError(problems, header=f"{where}: the weights do not fit the module:")
    module.load_state_dict(state)
