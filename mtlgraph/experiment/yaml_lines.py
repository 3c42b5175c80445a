"""YAML text with the line of every key, ``KEY=VALUE`` overrides, and where a problem came from
(``configs/quickstart.yaml:31: trainer.lr: ...``). Only plain YAML types are constructed.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from mtlgraph.exceptions import ConfigError

# ---------------------------------------------------------------- YAML with line numbers


class _Loader(yaml.SafeLoader):
    """``yaml.SafeLoader``: only plain YAML types are constructed, never Python objects."""


def _index(
    node: yaml.Node | None, path: str, lines: dict[str, int], problems: list[tuple[int, str]]
) -> None:
    """Record the line of every dotted path; report duplicate keys with both lines."""
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key == "<<":  # YAML merge key: PyYAML merges it
                _index(value_node, path, lines, problems)
                continue
            sub = f"{path}.{key}" if path else key
            line = key_node.start_mark.line + 1
            if key in first:
                problem = (
                    f"{sub}: duplicate key '{key}' on line {line} (first on line {first[key]}); "
                    "YAML would silently keep the last one: remove or rename one"
                )
                problems.append((line, problem))
            else:
                first[key] = line
                lines[sub] = line
            _index(value_node, sub, lines, problems)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            lines[sub] = item.start_mark.line + 1
            _index(item, sub, lines, problems)


def parse_yaml(text: str, source: str = "<string>") -> tuple[Any, dict[str, int], list[str]]:
    """Parse YAML safely; return ``(data, {dotted path: line}, duplicate-key problems)`` (the
    problems located already: ``"<source>:<line>: <key>: ..."``).

    Raises:
        ConfigError: A YAML syntax error (with its line and column).

    Example:
        >>> data, lines, problems = parse_yaml("trainer:\\n  lr: 0.1\\n  lr: 0.2\\n", "c.yaml")
        >>> data, lines
        ({'trainer': {'lr': 0.2}}, {'trainer': 1, 'trainer.lr': 2})
        >>> problems[0].split(";")[0]
        "c.yaml:3: trainer.lr: duplicate key 'lr' on line 3 (first on line 2)"
    """
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        lines: dict[str, int] = {}
        dupes: list[tuple[int, str]] = []
        _index(node, "", lines, dupes)
        problems = [f"{source}:{line}: {p}" for line, p in dupes]
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        what = " ".join(str(p) for p in (e.context, e.problem) if p)
        raise ConfigError([f"{where}: invalid YAML: {what}"]) from e
    except yaml.YAMLError as e:
        raise ConfigError([f"{source}: invalid YAML: {e}"]) from e
    finally:
        loader.dispose()
    return data, lines, problems


def _line_of(path: str, lines: Mapping[str, int]) -> int | None:
    """Line of ``path`` or of its closest enclosing key."""
    while path:
        if path in lines:
            return lines[path]
        cut = max(path.rfind("."), path.rfind("["), path.rfind(" "))
        path = path[:cut] if cut > 0 else ""
    return None


def locate(
    problem: str, source: str, lines: Mapping[str, int], overrides: Mapping[str, str]
) -> str:
    """Prefix ``"file:line: "`` (or the override that set the value) to a problem.

    Example:
        >>> locate("trainer.lr: expected a number", "c.yaml", {"trainer": 4}, {})
        'c.yaml:4: trainer.lr: expected a number'
        >>> locate("trainer.lr: bad", "c.yaml", {}, {"trainer.lr": "trainer.lr=x"})
        "c.yaml (override 'trainer.lr=x'): trainer.lr: bad"
    """
    path = problem.split(": ", 1)[0]
    for key, text in overrides.items():
        if path == key or path.startswith((f"{key}.", f"{key}[", f"{key} ")):
            return f"{source} (override '{text}'): {problem}"
    line = _line_of(path, lines)
    return f"{source}:{line}: {problem}" if line else f"{source}: {problem}"


# ---------------------------------------------------------------- overrides


_INDEX = re.compile(r"^(.*?)\[(\d+)\]$")


def _key_parts(key: str) -> list[str | int]:
    """``"tasks.t.ops[1].name"`` -> ``["tasks", "t", "ops", 1, "name"]`` (``ops.1`` works too)."""
    parts: list[str | int] = []
    for raw in key.split("."):
        indices: list[int] = []
        m = _INDEX.match(raw)
        while m:
            raw, idx = m.group(1), int(m.group(2))
            indices.insert(0, idx)
            m = _INDEX.match(raw)
        if raw:
            parts.append(int(raw) if raw.isdigit() else raw)
        parts += indices
    return parts


def apply_overrides(
    data: dict[str, Any], overrides: Sequence[str], problems: list[str]
) -> dict[str, str]:
    """Apply ``a.b.c=value`` overrides in place (values parsed as YAML: ``3``, ``0.1``,
    ``true``, ``null``, ``[8, 4]``, ``{name: adam}``); return ``{dotted path: override}``.

    Missing mappings on the way are created; list items are addressed as ``ops[1]`` or ``ops.1``.

    Example:
        >>> data = {"trainer": {"lr": 0.1}}
        >>> apply_overrides(data, ["trainer.lr=0.02", "trainer.optimizer={name: sgd}"], [])
        {'trainer.lr': 'trainer.lr=0.02', 'trainer.optimizer': 'trainer.optimizer={name: sgd}'}
        >>> data
        {'trainer': {'lr': 0.02, 'optimizer': {'name': 'sgd'}}}
    """
    applied: dict[str, str] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"override '{text}': expected KEY=VALUE, e.g. trainer.lr=0.01")
            continue
        try:
            value, _, dupes = parse_yaml(raw, f"override '{text}'")
        except ConfigError as e:
            problems += e.problems
            continue
        problems += [f"override '{text}': {d.split(': ', 1)[1]}" for d in dupes]
        dotted = _set_path(data, _key_parts(key), value, text, problems)
        if dotted is not None:
            applied[dotted] = text
    return applied


def _set_path(
    data: dict[str, Any], parts: Sequence[str | int], value: Any, text: str, problems: list[str]
) -> str | None:
    """Set ``value`` at ``parts`` inside ``data``; return the dotted path, or None (a problem)."""
    node: Any = data
    dotted = ""
    for i, part in enumerate(parts):
        here = dotted
        dotted = f"{dotted}[{part}]" if isinstance(part, int) else f"{dotted}.{part}".lstrip(".")
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not isinstance(part, int) or not 0 <= part < len(node):
                problems.append(
                    f"override '{text}': {here or 'the config'} is a list of {len(node)} "
                    f"items; address one as {here}[0]..{here}[{len(node) - 1}]"
                )
                return None
        elif isinstance(node, dict):
            part = str(part)
            if not last and not isinstance(node.get(part), (dict, list)):
                if part in node and node[part] is not None:
                    problems.append(f"override '{text}': {dotted} is {node[part]!r}, not a mapping")
                    return None
                node[part] = {}
        else:
            problems.append(f"override '{text}': {here} is {node!r}, not a mapping")
            return None
        if last:
            node[part] = value
        else:
            node = node[part]
    return dotted


__all__ = ["apply_overrides", "locate", "parse_yaml"]
