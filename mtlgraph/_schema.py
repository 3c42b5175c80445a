"""Strict validation of plain mappings into typed dataclasses.

Used by ``Trainer(**config)`` and by the YAML loader, so both report errors the same way: every
problem at once, each naming its dotted key, unknown keys with a did-you-mean, and a hint when
YAML 1.1 has read a number such as ``1e-3`` as a string.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from mtlgraph._suggest import did_you_mean

T = TypeVar("T")


class Problems(list[str]):
    """A problem list that also counts *value* problems (from ``validate()``): with it,
    :func:`build` still returns a well-typed dataclass whose values are wrong, so the enclosing
    dataclass runs its cross-checks too (with a plain list any problem discards the object)."""

    soft: int = 0


# what YAML 1.1 reads as a string but a reader means as a number: an exponent, inf, nan
_FLOAT_STRING = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$|^[+-]?(inf|nan)$", re.I)


_SIMPLE_NAMES: dict[Any, str] = {
    Any: "anything",
    type(None): "null",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    str: "a string",
}


def _is_list_type(tp: Any) -> bool:
    return get_origin(tp) in (list, Sequence, tuple) or tp in (list, tuple)


def _is_mapping_type(tp: Any) -> bool:
    return get_origin(tp) in (dict, Mapping) or tp is dict


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if tp in _SIMPLE_NAMES:
        return _SIMPLE_NAMES[tp]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if _is_list_type(tp):
        return "a list"
    if _is_mapping_type(tp) or dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is Callable or tp is Callable:
        return "a callable"
    return f"a {getattr(tp, '__name__', str(tp))}"


def _got(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def convert(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (nested dataclasses built).
    Problems are appended as ``"<path>: <sentence>"``."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        return _convert_union(value, tp, path, problems)
    if origin is Literal:
        if value not in get_args(tp):
            choices = [str(a) for a in get_args(tp)]
            problems.append(
                f"{path}: expected {_describe(tp)}, got {_got(value)}"
                f"{did_you_mean(str(value), choices)}"
            )
        return value
    if tp in _SCALARS:
        return _convert_scalar(value, tp, path, problems)
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        return _convert_dataclass(value, tp, path, problems)
    if _is_list_type(tp):
        return _convert_list(value, tp, path, problems)
    if _is_mapping_type(tp):
        return _convert_mapping(value, tp, path, problems)
    if origin is Callable or tp is Callable or origin is typing.Callable:
        if not callable(value):
            problems.append(f"{path}: expected a callable, got {_got(value)}")
        return value
    if isinstance(tp, type) and not _instance(value, tp):
        problems.append(f"{path}: expected {_describe(tp)}, got {_got(value)}")
    return value


def _instance(value: Any, tp: type) -> bool:
    try:
        return isinstance(value, tp)
    except TypeError:  # a Protocol that is not runtime-checkable: not checked
        return True


def _convert_union(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    args = get_args(tp)
    for arg in args:
        trial: list[str] = []
        out = convert(value, arg, path, trial)
        if not trial:
            return out
    # Report the closest branch when only one branch has the right container shape.
    matching = [a for a in args if _shape_matches(value, a)]
    if len(matching) == 1:
        return convert(value, matching[0], path, problems)
    problems.append(f"{path}: expected {_describe(tp)}, got {_got(value)}{_hint(value, tp)}")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# scalar annotation -> (does a value fit?, may a wrong value get the YAML 1.1 number hint?)
_SCALARS: dict[Any, tuple[Callable[[Any], bool], bool]] = {
    type(None): (lambda v: v is None, False),
    bool: (lambda v: isinstance(v, bool), False),
    int: (_is_int, True),
    float: (lambda v: _is_int(v) or isinstance(v, float), True),
    str: (lambda v: isinstance(v, str), False),
}


def _convert_scalar(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    fits, hint = _SCALARS[tp]
    if not fits(value):
        extra = _hint(value, tp) if hint else ""
        problems.append(f"{path}: expected {_describe(tp)}, got {_got(value)}{extra}")
        return value
    return float(value) if tp is float else value


def _convert_dataclass(value: Any, tp: type[Any], path: str, problems: list[str]) -> Any:
    if isinstance(value, tp):  # an instance built in Python: only its own value checks
        validate = getattr(value, "validate", None)
        problems.extend(f"{path}.{p}" for p in (validate() if validate else []))
        return value
    if not isinstance(value, Mapping):
        problems.append(f"{path}: expected a mapping, got {_got(value)}")
        return value
    return build(tp, value, path, problems)


def _convert_list(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    args = get_args(tp)
    fixed = get_origin(tp) is tuple and args and args[-1] is not Ellipsis  # tuple[float, float]
    wrong = isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple))
    if wrong or (fixed and len(value) != len(args)):
        size = f" of {len(args)}" if fixed else ""
        problems.append(f"{path}: expected a list{size}, got {_got(value)}")
        return value
    if fixed:
        pairs = enumerate(zip(value, args, strict=True))
        return tuple(convert(v, a, f"{path}[{i}]", problems) for i, (v, a) in pairs)
    item_tp = args[0] if args else Any
    return [convert(v, item_tp, f"{path}[{i}]", problems) for i, v in enumerate(value)]


def _convert_mapping(value: Any, tp: Any, path: str, problems: list[str]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(f"{path}: expected a mapping, got {_got(value)}")
        return value
    args = get_args(tp)
    key_tp, val_tp = (args[0], args[1]) if args else (Any, Any)
    out = {}
    for k, v in value.items():
        convert(k, key_tp, f"{path} key {k!r}", problems)
        out[k] = convert(v, val_tp, f"{path}.{k}", problems)
    return out


def _shape_matches(value: Any, tp: Any) -> bool:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return isinstance(tp, type) and isinstance(value, tp)
    if isinstance(value, Mapping):
        return _is_mapping_type(tp) or dataclasses.is_dataclass(tp)
    if isinstance(value, (list, tuple)):
        return _is_list_type(tp)
    return False


def _hint(value: Any, tp: Any) -> str:
    if isinstance(value, str) and _FLOAT_STRING.match(value.strip()):
        return (
            f" (YAML 1.1 reads {value!r} as a string: write it with a dot and a signed exponent,"
            " e.g. 1.0e-3, or as a plain decimal such as 0.001)"
        )
    return ""


def build(cls: type[T], data: Mapping[str, Any], path: str, problems: list[str]) -> T:
    """Validate ``data`` against dataclass ``cls`` and construct it; ``None`` when anything is
    wrong (see :class:`Problems`). Missing and unknown keys, type errors and the dataclass's own
    ``validate()`` sentences (each starting with the field name) are appended to ``problems``."""
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    prefix = f"{path}." if path else ""
    start, start_soft = len(problems), getattr(problems, "soft", 0)
    values: dict[str, Any] = {}
    bad: set[str] = set()
    for key, value in data.items():
        if key not in fields:
            problems.append(
                f"{prefix}{key}: unknown key{did_you_mean(str(key), fields)}; "
                f"valid keys: {', '.join(sorted(fields))}"
            )
            continue
        before, soft_before = len(problems), getattr(problems, "soft", 0)
        converted = convert(value, hints[key], f"{prefix}{key}", problems)
        soft_added = getattr(problems, "soft", 0) - soft_before
        if len(problems) - before > soft_added:
            bad.add(key)
        else:
            values[key] = converted
    required = [
        name
        for name, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in data:
            problems.append(f"{prefix}{name}: missing (required)")
    if any(name not in values for name in required):
        return None  # type: ignore[return-value]
    # value checks run on the well-typed keys too (wrong ones keep their defaults)
    obj = cls(**values)
    hard = len(problems) - start - (getattr(problems, "soft", 0) - start_soft)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        found = [f"{prefix}{p}" for p in validate() if p.split(":")[0].split(".")[0] not in bad]
        problems.extend(found)
        if isinstance(problems, Problems):
            problems.soft += len(found)
    if isinstance(problems, Problems):
        return obj if hard == 0 else None  # type: ignore[return-value]
    return obj if len(problems) == start else None  # type: ignore[return-value]


_PLAIN = (str, int, float, bool, type(None))


def plain_config(value: Any) -> Any:
    """A checkpoint- and YAML-safe copy of a config value: dataclasses and mappings become
    dicts, tuples lists, and objects (a scheduler instance, a writer) their ``repr``.

    Example:
        >>> import dataclasses
        >>> @dataclasses.dataclass
        ... class Opt:
        ...     name: str = "adam"
        ...     betas: tuple[float, float] = (0.9, 0.999)
        >>> plain_config({"optimizer": Opt(), "lr": 0.1})
        {'optimizer': {'name': 'adam', 'betas': [0.9, 0.999]}, 'lr': 0.1}
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_config(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): plain_config(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config(v) for v in value]
    if type(value) in _PLAIN:
        return value
    if isinstance(value, (int, float)):  # numpy scalars and other number subclasses
        return float(value) if isinstance(value, float) else int(value)
    return repr(value)
