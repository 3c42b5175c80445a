"""The package layout is the architecture (docs/architecture.md): lower layers never import
higher ones, no two modules import each other (directly or around a cycle), no module takes
another's private names, each package's ``__all__`` is its contract (docs/api.md names nothing
else), and functions stay short enough to read.

Every module under ``mtlgraph/`` is parsed with :mod:`ast`; every import counts, at module level,
inside functions and under ``TYPE_CHECKING`` (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "mtlgraph"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("_suggest", "_io", "_schema", "exceptions", "registry", "signals"),  # 0: shared foundations
    ("metrics",),  # 1: metric registry, Scorer, score keys
    ("data",),  # 2: datasets, loaders, batch schedulers, synthetic data
    ("graph", "inference"),  # 3: tasks, losses, module types, the model; predict, score, export
    ("gradients",),  # 4: per-task shared-module gradients
    ("balancing",),  # 5: how per-task losses become one update
    ("diagnostics",),  # 6: interference statistics, report, monitor
    ("training",),  # 7: the loop, its config, step, checkpoints, writers, distributed
    ("experiment",),  # 8: YAML schema, build, CLI
    ("compat",),  # 9: other libraries' APIs on top of mtlgraph (Snorkel)
]
FACADES = {"mtlgraph/__init__.py", "mtlgraph/__main__.py"}  # re-export or run the layers above
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}

# Known layering violations; an entry that no longer occurs fails
# test_known_violations_still_exist, so the list only shrinks.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

LONG_MODULE_NOTE = 600  # longer modules are listed after the tests run (never split a concept)


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _component(dotted: str) -> str | None:
    """The top-level component of an ``mtlgraph.X...`` module name (``X``), else None."""
    parts = dotted.split(".")
    return parts[1] if parts[0] == "mtlgraph" and len(parts) > 1 else None


def _own_module(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(path: Path) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every mtlgraph import in a file, at any depth."""
    return [(line, module) for line, module, _ in _imports_of(path)]


def _imports_of(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, dotted module, name)`` of every mtlgraph import in a file (``name``: the name a
    ``from`` import takes, ``None`` for a whole module)."""
    own = _own_module(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    return _imports_with_names(path.read_text(), package)


def _imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every mtlgraph import in ``source``, which lives in
    ``package`` (relative imports resolve against it)."""
    return [(line, module) for line, module, _ in _imports_with_names(source, package)]


def _imports_with_names(source: str, package: str) -> list[tuple[int, str, str | None]]:
    """Every mtlgraph import in ``source``, at any depth (in functions, under TYPE_CHECKING).

    ``from P import X`` counts as importing the submodule ``P.X`` when there is one, else the
    module a package ``P`` re-exports ``X`` from (its ``__init__`` imports it), else ``P``.
    """
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = package.split(".")
                module = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [module])])
            for alias in node.names:
                source_module = _source_of(module, alias.name)
                name = None if source_module == f"{module}.{alias.name}" else alias.name
                found.append((node.lineno, source_module, name))
    return [(line, m, name) for line, m, name in found if m.split(".")[0] == "mtlgraph"]


def _file_of(module: str) -> Path | None:
    """The source file of an mtlgraph module (a package's ``__init__.py``), if there is one."""
    base = PACKAGE.parent / module.replace(".", "/")
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.exists():
            return path
    return None


@functools.cache
def _reexports(package: str) -> dict[str, str]:
    """Name -> defining module of what a package's ``__init__`` imports (also under
    TYPE_CHECKING, which is how ``mtlgraph`` itself declares its lazy names)."""
    path = _file_of(package)
    out: dict[str, str] = {}
    if path is None or path.name != "__init__.py":
        return out
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                out[alias.asname or alias.name] = _source_of(node.module, alias.name)
    return out


def _source_of(module: str, name: str) -> str:
    """The module ``from module import name`` depends on: a submodule, a re-export, or module."""
    if _file_of(f"{module}.{name}") is not None:
        return f"{module}.{name}"
    return _reexports(module).get(name, module) if module.startswith("mtlgraph") else module


def _violations() -> dict[tuple[str, str], str]:
    """``{(file, imported module): message}`` of every import of a higher layer."""
    out = {}
    for path in _modules():
        rel = _rel(path)
        own = _component(_own_module(path))
        if rel in FACADES or own is None:
            continue
        assert own in LAYER_OF, f"{rel}: component '{own}' is in no layer; add it to LAYERS"
        for line, module in _imported(path):
            target = _component(module)
            if target is None or target == own:
                continue
            assert target in LAYER_OF, f"{rel}:{line}: imports '{module}', in no layer"
            if LAYER_OF[target] > LAYER_OF[own]:
                out[(rel, module)] = (
                    f"{rel}:{line}: '{own}' (layer {LAYER_OF[own]}) imports '{module}' "
                    f"(layer {LAYER_OF[target]})"
                )
    return out


def test_every_component_has_a_layer() -> None:
    components = {_component(_own_module(p)) for p in _modules() if _rel(p) not in FACADES}
    components.discard(None)
    assert components <= set(LAYER_OF), sorted(components - set(LAYER_OF))


def test_lower_layers_never_import_higher_ones() -> None:
    new = [message for key, message in _violations().items() if key not in KNOWN_VIOLATIONS]
    assert not new, "layering violations (move the code, or the import, down):\n" + "\n".join(new)


def test_known_violations_still_exist() -> None:
    fixed = sorted(set(KNOWN_VIOLATIONS) - set(_violations()))
    assert not fixed, f"fixed: remove {fixed} from KNOWN_VIOLATIONS"


def test_import_scanner_sees_function_level_relative_and_facade_imports() -> None:
    source = (
        "from . import graph\n"
        "from .graph.task import Task\n"
        "from mtlgraph import Trainer, __version__\n"
        "def f():\n"
        "    import mtlgraph.experiment.cli\n"
    )
    assert _imports_in(source, "mtlgraph") == [
        (1, "mtlgraph.graph"),
        (2, "mtlgraph.graph.task"),
        (3, "mtlgraph.training.trainer"),
        (3, "mtlgraph"),
        (5, "mtlgraph.experiment.cli"),
    ]


def _edges() -> dict[str, set[str]]:
    """Module -> the mtlgraph modules it imports (a package's ``__init__`` importing its own
    submodules is how a facade works, not a dependency of the package on them)."""
    edges: dict[str, set[str]] = {}
    for path in _modules():
        own = _own_module(path)
        targets = edges.setdefault(own, set())
        for _, module, _ in _imports_of(path):
            while module and _file_of(module) is None:
                module = module.rpartition(".")[0]
            facade = path.name == "__init__.py" and module.startswith(own + ".")
            if module and module != own and not facade:
                targets.add(module)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[frozenset[str]]:
    """The import cycles: groups of modules that each reach all the others (more than one)."""

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for target in edges.get(todo.pop(), ()):
                if target not in seen:
                    seen.add(target)
                    todo.append(target)
        return seen

    reachable = {module: reach(module) for module in edges}
    groups = {
        frozenset({m, *(o for o in reachable[m] if m in reachable[o])})
        for m in edges
        if m in reachable[m]
    }
    return sorted(groups, key=sorted)


def _private_imports() -> set[tuple[str, str, str]]:
    """``(file, name, module)``: a private name (``_x``) one module takes from another."""
    found = set()
    for path in _modules():
        for _, module, name in _imports_of(path):
            private = bool(name) and name.startswith("_") and not name.startswith("__")
            if private and module != _own_module(path):
                found.add((_rel(path), name, module))
    return found


# Cycles and private imports in code that other changes are reshaping at the same time; each
# entry is tolerated only while it still occurs (a cycle: while one of its parts is still a
# cycle), so the lists only shrink, to empty.
KNOWN_CYCLES: list[frozenset[str]] = []
KNOWN_PRIVATE_IMPORTS: set[tuple[str, str, str]] = set()


def test_no_import_cycles() -> None:
    new = [c for c in _cycles(_edges()) if not any(c <= known for known in KNOWN_CYCLES)]
    assert not new, "import cycles (move the shared code down, or the import up):\n" + "\n".join(
        " <-> ".join(sorted(c)) for c in new
    )


def test_no_private_names_imported_across_modules() -> None:
    new = sorted(_private_imports() - KNOWN_PRIVATE_IMPORTS)
    assert not new, "private names taken from another module (make them public API):\n" + (
        "\n".join(f"{file}: '{name}' from {module}" for file, name, module in new)
    )


def test_known_cycles_and_private_imports_still_occur() -> None:
    cycles = _cycles(_edges())
    fixed = [sorted(k) for k in KNOWN_CYCLES if not any(c <= k for c in cycles)]
    fixed += sorted(KNOWN_PRIVATE_IMPORTS - _private_imports())
    assert not fixed, f"fixed: remove {fixed} from KNOWN_CYCLES / KNOWN_PRIVATE_IMPORTS"


def test_cycle_finder_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from mtlgraph.graph.model import MultitaskClassifier\n"
        "def f():\n"
        "    from mtlgraph.graph import _private\n"
    )
    imports = _imports_with_names(source, "mtlgraph.graph")
    assert imports == [
        (3, "mtlgraph.graph.model", "MultitaskClassifier"),
        (5, "mtlgraph.graph", "_private"),
    ]
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert _cycles(edges) == [frozenset({"a", "b", "c"})]


def _long_modules() -> list[str]:
    return [
        f"{_rel(path)}: {n} lines"
        for path in _modules()
        if (n := len(path.read_text().splitlines())) > LONG_MODULE_NOTE
    ]


class _LongModulesNote:
    """A pytest plugin that lists the long modules in the terminal summary."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.section(f"modules over {LONG_MODULE_NOTE} lines (a note, not a failure)")
        for line in self.lines:
            terminalreporter.write_line(line)


@pytest.fixture(autouse=True, scope="module")
def _note_long_modules(request: pytest.FixtureRequest) -> None:
    """Long modules are worth a look, never a reason to split a concept: a note, not a test."""
    plugins = request.config.pluginmanager
    long = _long_modules()
    if long and not plugins.has_plugin("mtlgraph-long-modules"):
        plugins.register(_LongModulesNote(long), "mtlgraph-long-modules")


MAX_FUNCTION_LINES = 80
# "module:function" -> why it may be longer (none yet)
LONG_FUNCTIONS: dict[str, str] = {}


def test_no_function_is_longer_than_80_lines() -> None:
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                where = f"{_rel(path)}:{node.name}"
                if n > MAX_FUNCTION_LINES and where not in LONG_FUNCTIONS:
                    long.append(f"{where}: {n} lines")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them):\n" + "\n".join(long)


def test_architecture_page_names_every_layer() -> None:
    text = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    present = [
        n
        for names in LAYERS
        for n in names
        if (PACKAGE / n).exists() or (PACKAGE / f"{n}.py").exists()
    ]
    missing = [n for n in present if f"`{n}`" not in text and f"`{n}/`" not in text]
    assert not missing, f"docs/architecture.md does not name the layer(s) {missing}"


def _contract_modules() -> list[str]:
    """``mtlgraph``, every subpackage and every public top-level module: each has an ``__all__``."""
    return [
        _own_module(path)
        for path in _modules()
        if path.name == "__init__.py" or (path.parent == PACKAGE and not path.stem.startswith("_"))
    ]


def _exports(module: str) -> list[str]:
    return list(getattr(importlib.import_module(module), "__all__", []))


def test_every_package_declares_its_contract_and_every_name_in_it_exists() -> None:
    problems = []
    for name in _contract_modules():
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "__all__", None), list):
            problems.append(f"{name} has no __all__ list")
            continue
        for export in module.__all__:
            if not hasattr(module, export) and _file_of(f"{name}.{export}") is None:
                problems.append(f"{name}.__all__ names '{export}', which {name} does not have")
    assert not problems, "\n".join(problems)


def _unlisted_paths(text: str) -> list[str]:
    """The ``mtlgraph.…`` paths of ``text`` that are not a contract module or a name in one's
    ``__all__`` (the longest contract module the path starts with)."""
    contracts = set(_contract_modules())
    out = []
    for path in sorted(set(re.findall(r"\bmtlgraph(?:\.\w+)+", text))):
        parts = path.split(".")
        k = max(i for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in contracts)
        rest = parts[k:]
        listed = not rest or (
            len(rest) == 1
            and (rest[0].startswith("__") or rest[0] in _exports(".".join(parts[:k])))
        )
        if not listed:
            out.append(path)
    return out


def test_api_page_names_only_public_paths() -> None:
    text = (PACKAGE.parent / "docs" / "api.md").read_text()
    unlisted = _unlisted_paths(text)
    assert not unlisted, (
        "docs/api.md names paths outside the packages' __all__ (list the name in the package's "
        "__all__, or name the public path):\n" + "\n".join(unlisted)
    )


def test_public_path_check_follows_the_contracts() -> None:
    assert _unlisted_paths("`mtlgraph.Trainer`, `mtlgraph.balancing.BALANCERS`") == []
    assert _unlisted_paths("`mtlgraph.__version__`, `mtlgraph.data`") == []
    assert _unlisted_paths("`mtlgraph.balancing.base.Balancer`, `mtlgraph.nothing`") == [
        "mtlgraph.balancing.base.Balancer",
        "mtlgraph.nothing",
    ]
