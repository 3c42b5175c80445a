"""Module types given as dotted import paths, nested module arguments, and ``init_from``.

Besides registry names, a module's ``type:`` may be the dotted path of an ``nn.Module`` class or
of a function returning one (``torch.nn.LSTM``, ``torch.nn.TransformerEncoder``, a class in a
module listed under ``imports:``). Its arguments are checked against its signature like a
registered type's; a class whose ``__init__`` takes only ``*args, **kwargs`` (``torch.nn.LSTM``)
is checked against the first base class that names its arguments (unknown names only). An
argument written as a mapping with a ``type:`` key is itself a module, built first
(``encoder_layer: {type: torch.nn.TransformerEncoderLayer, d_model: 32, nhead: 4}``).

``init_from: path.pt`` (any module) loads a state dict saved with
``torch.save(module.state_dict(), path)``, with ``weights_only=True``, after the module is built.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlgraph._suggest import did_you_mean
from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.modules import get_module_factory

NOT_ARGUMENTS = ("type", "init_from")
"""Keys of a module spec that are not arguments of its type."""

Factory = Callable[..., Any]


def is_dotted(kind: object) -> bool:
    """Whether a module ``type`` is a dotted import path rather than a registry name."""
    return isinstance(kind, str) and "." in kind


def import_factory(path: str) -> Factory:
    """The class or function a dotted path names.

    Raises:
        ConfigError: The module does not import, has no such attribute (with a suggestion), or
            the object is neither an ``nn.Module`` class nor a function.
    """
    parts = path.split(".")
    obj: Any = None
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is not None and module_name.startswith(e.name) and cut > 1:
                continue
            if e.name is not None and module_name.startswith(e.name):
                raise ConfigError(
                    [f"cannot import '{path}': no module named '{e.name}' (is it installed?)"]
                ) from None
            raise
        for i, attr in enumerate(parts[cut:], cut):
            if not hasattr(obj, attr):
                owner = ".".join(parts[:i])
                names = [n for n in dir(obj) if not n.startswith("_")]
                raise ConfigError(
                    [
                        f"cannot import '{path}': '{owner}' has no '{attr}'"
                        + did_you_mean(attr, names)
                    ]
                )
            obj = getattr(obj, attr)
        break
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    if inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.ismethod(obj):
        return obj
    raise ConfigError(
        [f"'{path}' is a {type(obj).__name__}, not an nn.Module class or a function returning one"]
    )


def resolve_type(kind: str) -> Factory | None:
    """A registered type, else an importable dotted path; ``None`` for an unknown name."""
    factory = get_module_factory(kind)
    if factory is None and is_dotted(kind):
        return import_factory(kind)
    return factory


def _is_spec(value: object) -> bool:
    return isinstance(value, Mapping) and "type" in value


def _signature_source(factory: Factory) -> Factory:
    """``factory``, or for a class taking only ``*args, **kwargs`` the first base class that
    names its arguments."""
    if not isinstance(factory, type):
        return factory
    for cls in factory.__mro__:
        if cls is nn.Module or cls is object:
            break
        params = inspect.signature(cls).parameters.values()
        if any(
            p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self" for p in params
        ):
            return cls
    return factory


def check_module_spec(spec: Mapping[str, Any], path: str) -> list[str]:
    """Problems of a module spec ``{type, init_from?, **kwargs}``: an unknown type, arguments
    its signature does not take or that are missing or mistyped, nested module specs (checked
    the same way), an ``init_from`` that is not a string."""
    from mtlgraph.experiment.config import check_kwargs

    kind = str(spec.get("type"))
    try:
        factory = resolve_type(kind)
    except ConfigError as e:
        return [f"{path}.type: {p}" for p in e.problems]
    if factory is None:
        return []  # an unknown registry name: the caller reports it with the known names
    problems: list[str] = []
    init = spec.get("init_from")
    if init is not None and not isinstance(init, str):
        problems.append(f"{path}.init_from: expected a file path (a string), got {init!r}")
    kwargs = {k: v for k, v in spec.items() if k not in NOT_ARGUMENTS}
    nested = [k for k, v in kwargs.items() if _is_spec(v)]
    for key in nested:
        problems += check_module_spec(kwargs[key], f"{path}.{key}")
    plain = {k: v for k, v in kwargs.items() if k not in nested}
    source = _signature_source(factory)
    found = check_kwargs(f"module type '{kind}'", source, plain, path)
    nested_missing = tuple(f"{path}.{k}: missing" for k in nested)
    for p in found:
        if p.startswith(nested_missing) if nested_missing else False:
            continue  # a nested module: given, as a spec
        if source is not factory and ": missing (" in p:
            continue  # a base class's required argument: the class itself may set it
        problems.append(p)
    return problems


def build_module(spec: Mapping[str, Any], path: str, base_dir: str | Path = ".") -> nn.Module:
    """Build a module from its spec (nested module arguments first), then load ``init_from``.

    Raises:
        ConfigError: An unknown type, a factory that returns no ``nn.Module``, an ``init_from``
            file that is missing, unreadable or does not fit the module.
    """
    kind = str(spec["type"])
    factory = resolve_type(kind)
    if factory is None:  # validated already; a registry changed since
        raise ConfigError([f"{path}.type: unknown module type '{kind}'"])
    kwargs = {
        k: build_module(v, f"{path}.{k}", base_dir) if _is_spec(v) else v
        for k, v in spec.items()
        if k not in NOT_ARGUMENTS
    }
    try:
        module = factory(**kwargs)
    except Exception as e:
        e.add_note(f"mtlgraph: while building {path} (type '{kind}')")
        raise
    if not isinstance(module, nn.Module):
        raise ConfigError(
            [f"{path}: type '{kind}' returned a {type(module).__name__}, not an nn.Module"]
        )
    init = spec.get("init_from")
    if init is not None:
        load_init(module, Path(base_dir) / str(init), f"{path}.init_from")
    return module


def load_init(module: nn.Module, file: Path, where: str) -> None:
    """Load a state dict (``torch.save(module.state_dict(), file)``) into ``module``, reading
    it with ``weights_only=True``.

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
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
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
