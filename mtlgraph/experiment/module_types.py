"""Modules from their specs: nested module arguments (a mapping with a ``type:`` key),
references to other declared modules, and ``init_from`` (a state dict loaded with
``weights_only=True``); see ``docs/config.md``.

A reference names another module of the ``modules`` section:

- an argument annotated with a module class takes that module itself (``lora``'s
  ``base: enc``): the two share it;
- ``{width_of: enc}`` in place of a number is that module's output width (its ``width``
  attribute, or a ``Linear``'s ``out_features``): a head declared without copying numbers.

Modules are built in an order where every referenced module comes first.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError
from mtlgraph.experiment.imports import absolute
from mtlgraph.graph.modules import MODULES
from mtlgraph.registry import type_hints

WIDTH_OF = "width_of"
"""The key of a width reference: ``in_features: {width_of: <module>}``."""


def _is_spec(value: object) -> bool:
    return isinstance(value, Mapping) and "type" in value


def _is_width_ref(value: object) -> bool:
    return isinstance(value, Mapping) and set(value) == {WIDTH_OF}


def _parts(spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A module spec as (itself without ``init_from`` and nested modules, the nested modules)."""
    own = {k: v for k, v in spec.items() if k != "init_from" and not _is_spec(v)}
    return own, {k: v for k, v in spec.items() if _is_spec(v)}


def _module_class(hint: Any) -> type | None:
    """The ``nn.Module`` subclass an annotation asks for (``X`` or ``X | None``), else None."""
    args = (
        typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else ()
    )
    for tp in args or (hint,):
        if inspect.isclass(tp) and issubclass(tp, nn.Module):
            return tp
    return None


def _factory(own: Mapping[str, Any], path: str) -> Any:
    try:
        return MODULES.resolve(own, path)[0]
    except ConfigError:
        return None  # reported by MODULES.problems


def references(spec: Mapping[str, Any], path: str = "") -> dict[str, tuple[str, type | None]]:
    """``{argument: (module name, wanted class or None for a width)}`` of a spec's references."""
    own, _ = _parts(spec)
    factory = _factory(own, path)
    hints = type_hints(factory) if factory is not None else {}
    out: dict[str, tuple[str, type | None]] = {}
    for key, value in own.items():
        if _is_width_ref(value) and isinstance(value[WIDTH_OF], str):
            out[key] = (value[WIDTH_OF], None)
        elif isinstance(value, str) and key in hints:
            wanted = _module_class(hints[key])
            if wanted is not None:
                out[key] = (value, wanted)
    return out


def check_module_spec(
    spec: Mapping[str, Any], path: str, declared: Mapping[str, Mapping[str, Any]] | None = None
) -> list[str]:
    """Every problem of a module spec ``{type, init_from?, **kwargs}``: an unknown type,
    arguments its signature does not take, missing or mistyped ones, nested module specs
    (checked the same way), references to modules ``declared`` lacks or of the wrong type,
    an ``init_from`` that is not a string."""
    own, nested = _parts(spec)
    refs = references(spec, path)
    plain = {k: v for k, v in own.items() if k not in refs and not _is_width_ref(v)}
    given = [*nested, *refs, *(k for k, v in own.items() if _is_width_ref(v))]
    problems = MODULES.problems(plain, path, given=given)
    problems += [
        f"{path}.{k}.{WIDTH_OF}: the name of a declared module, got {v[WIDTH_OF]!r}"
        for k, v in own.items()
        if _is_width_ref(v) and not isinstance(v[WIDTH_OF], str)
    ]
    if declared is not None:
        problems += _reference_problems(refs, path, declared)
    for key, sub in nested.items():
        problems += check_module_spec(sub, f"{path}.{key}", declared)
    init = spec.get("init_from")
    if init is not None and not isinstance(init, str):
        problems.append(f"{path}.init_from: expected a file path (a string), got {init!r}")
    elif init is not None:
        problems += init_from_problems(spec, path)
    return problems


def init_from_problems(spec: Mapping[str, Any], path: str) -> list[str]:
    """``init_from`` on a module type that loads its own weights from one of its arguments
    (its factory's ``weights_argument``: ``hf_encoder``'s ``path``), which it refuses, naming
    that argument."""
    if spec.get("init_from") is None:
        return []
    source = getattr(_factory(_parts(spec)[0], path), "weights_argument", None)
    if source is None:
        return []
    return [
        f"{path}.init_from: module type '{spec.get('type')}' takes its weights from "
        f"'{source}:', not from init_from; save your weights with "
        f"model.save_pretrained(directory) and declare '{source}: directory' instead"
    ]


def _reference_problems(
    refs: Mapping[str, tuple[str, type | None]],
    path: str,
    declared: Mapping[str, Mapping[str, Any]],
) -> list[str]:
    problems = []
    for key, (name, wanted) in refs.items():
        where = f"{path}.{key}" + (f".{WIDTH_OF}" if wanted is None else "")
        if name not in declared:
            problems.append(
                f"{where}: no module '{name}'{did_you_mean(name, declared)}; the config declares "
                f"{quoted(declared) or 'no modules'}"
            )
            continue
        if f"modules.{name}" == path:
            problems.append(f"{where}: a module cannot refer to itself")
            continue
        target = declared[name]
        factory = _factory(target, f"modules.{name}") if isinstance(target, Mapping) else None
        fits = inspect.isclass(factory) and wanted is not None and issubclass(factory, wanted)
        if wanted is not None and factory is not None and not fits:
            kinds = [n for n in MODULES.names() if MODULES.get(n) is wanted]
            problems.append(
                f"{where}: '{name}' is a module of type '{target.get('type')}'; it must be "
                f"{' or '.join(repr(k) for k in kinds) or wanted.__name__}"
            )
    return problems


def module_order(specs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Module names in declaration order, moved so that referenced modules come first.

    Raises:
        ConfigError: References that go round in a circle.
    """
    deps = {
        name: [n for n, _ in references(spec, f"modules.{name}").values() if n in specs]
        for name, spec in specs.items()
    }
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise ConfigError([f"modules: the modules refer to each other in a circle: {cycle}"])
        visiting.append(name)
        for dep in deps[name]:
            visit(dep)
        visiting.pop()
        order.append(name)

    for name in specs:
        visit(name)
    return order


def module_width(module: nn.Module, where: str, name: str) -> int:
    """A module's output width: its ``width`` attribute, or a ``Linear``'s ``out_features``.

    Raises:
        ConfigError: A module that does not say its width.
    """
    width = getattr(module, "width", None)
    if width is None and isinstance(module, nn.Linear):
        width = module.out_features
    if not isinstance(width, int):
        raise ConfigError(
            [
                f"{where}: module '{name}' ({type(module).__name__}) does not say its output width "
                "(an hf_encoder, lora or linear does); write the number"
            ]
        )
    return width


def build_modules(
    specs: Mapping[str, Mapping[str, Any]], base_dir: str | Path = "."
) -> dict[str, nn.Module]:
    """Every module of a ``modules`` section, referenced ones first; in declaration order."""
    built: dict[str, nn.Module] = {}
    for name in module_order(specs):
        built[name] = build_module(specs[name], f"modules.{name}", base_dir, built)
    return {name: built[name] for name in specs}


def build_module(
    spec: Mapping[str, Any],
    path: str,
    base_dir: str | Path = ".",
    built: Mapping[str, nn.Module] | None = None,
) -> nn.Module:
    """Build a module from its spec (nested module arguments first, references to ``built``
    modules resolved), then load ``init_from``.

    Raises:
        ConfigError: An unknown type, a factory that returns no ``nn.Module``, an ``init_from``
            file that is missing, unreadable or does not fit the module.
    """
    own, nested = _parts(spec)
    built = built or {}
    given: dict[str, Any] = {
        k: build_module(v, f"{path}.{k}", base_dir, built) for k, v in nested.items()
    }
    for key, (name, wanted) in references(spec, path).items():
        if name not in built:
            raise ConfigError([f"{path}.{key}: no module '{name}' is built before this one"])
        if wanted is None:
            given[key] = module_width(built[name], f"{path}.{key}", name)
        else:
            given[key] = built[name]
        own.pop(key)
    refused = init_from_problems(spec, path)
    if refused:
        raise ConfigError(refused)
    factory = _factory(own, path)
    for key in getattr(factory, "path_arguments", ()):
        value = own.get(key)
        if isinstance(value, str) and (Path(base_dir) / value).exists():
            own[key] = str(Path(base_dir) / value)  # an absolute path stays itself
    try:
        module: nn.Module = MODULES.build(own, path, **given)
    except ImportError as e:  # a missing extra (hf_encoder: mtlgraph[hf]): a config problem
        if "pip install 'mtlgraph[" not in str(e):
            raise
        raise ConfigError([f"{path}: {e}"]) from e
    init = spec.get("init_from")
    if init is not None:
        load_init(module, Path(base_dir) / str(init), f"{path}.init_from")
    return module


def absolute_paths(specs: Mapping[str, Any], base_dir: str | Path) -> dict[str, Any]:
    """The ``modules`` section with path arguments (``hf_encoder``'s ``path``) that name
    something under ``base_dir`` made absolute (a run directory's config re-runs anywhere)."""
    out: dict[str, Any] = {}
    for name, spec in specs.items():
        spec = dict(spec)
        factory = _factory({k: v for k, v in spec.items() if k != "init_from"}, name)
        for key in getattr(factory, "path_arguments", ()):
            value = spec.get(key)
            if isinstance(value, str) and (Path(base_dir) / value).exists():
                spec[key] = absolute(Path(base_dir), value)
        out[name] = spec
    return out


def encoder_input_problems(cfg: Any, model: Any, tokenizers: Mapping[Any, Any]) -> list[str]:
    """What the data feeds a pretrained encoder (directly or through an adapter) that it
    cannot read: a tokenizer with more ids than the model embeds, images of a size or a
    number of channels the model refuses. ``cfg``: the experiment config; ``tokenizers``:
    ``{(dataset, column): tokenizer}``."""
    from mtlgraph.graph.lora import LoRA
    from mtlgraph.graph.pretrained import HFEncoder

    problems: list[str] = []
    for task, tc in cfg.tasks.items():
        for op in tc.ops:
            module = model.module_pool[op.module]
            enc = module.base if isinstance(module, LoRA) else module
            first = op.inputs[0] if op.inputs else None
            if not isinstance(enc, HFEncoder) or not (isinstance(first, list) and len(first) == 2):
                continue
            for name, ds in cfg.data.datasets.items():
                column = ds.fields.get(str(first[1]))
                if task not in ds.labels or not isinstance(column, str):
                    continue
                what = f"module '{op.module}' of task '{task}'"
                problems += _encoder_fit(enc, what, f"data.datasets.{name}.source", ds.source,
                                         column, tokenizers.get((name, column)))  # fmt: skip
    return list(dict.fromkeys(problems))


def _encoder_fit(enc: Any, what: str, where: str, src: Any, column: str, tok: Any) -> list[str]:
    if enc.text:
        size = len(tok) if hasattr(tok, "__len__") else None
        if size is not None and size > enc.vocab_size:
            return [
                f"{where}.text.{column}: the tokenizer has {size} ids, and {what} embeds "
                f"{enc.vocab_size}: use the model directory's own tokenizer (pretrained: DIR)"
            ]
        return []
    ic = src.images
    if ic is None:
        return []
    problems = []
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[ic.mode]
    if channels != enc.num_channels:
        problems.append(
            f"{where}.images.mode: '{ic.mode}' gives {channels} channel(s), and {what} reads "
            f"{enc.num_channels}"
        )
    side = enc.image_size
    size = ic.resize
    if side is not None and size is None and ic.processor is None:
        problems.append(
            f"{where}.images.resize: {what} takes only {side}x{side} images, and the images keep "
            f"their files' sizes: declare resize: [{side}, {side}] (or processor: <model dir>)"
        )
    elif side is not None and size is not None and list(size) != [side, side]:
        problems.append(
            f"{where}.images.resize: {what} takes only {side}x{side} images, not "
            f"{size[0]}x{size[1]}: declare resize: [{side}, {side}]"
        )
    return problems


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
