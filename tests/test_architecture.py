"""The package layout is the architecture (docs/architecture.md): lower layers never import
higher ones, and modules stay small enough to read.

Every module under ``mtlgraph/`` is parsed with :mod:`ast`; every import counts, at module level
and inside functions (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import mtlgraph

PACKAGE = Path(__file__).resolve().parents[1] / "mtlgraph"

# Bottom to top. A module may import its own layer and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("_suggest", "_io", "_schema", "exceptions", "registry"),  # 0: shared foundations
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

# Known violations, each to be removed by the change named (issue 10); an entry that no longer
# occurs fails test_known_violations_still_exist, so the list only shrinks.
KNOWN_VIOLATIONS: dict[tuple[str, str], str] = {}

MAX_MODULE_LINES = 600
# module -> why it may be longer (none yet)
LONG_MODULES: dict[str, str] = {}


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
    own = _own_module(path)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    return _imports_in(path.read_text(), package)


def _imports_in(source: str, package: str) -> list[tuple[int, str]]:
    """``(line, dotted module)`` of every mtlgraph import in ``source``, which lives in
    ``package`` (relative imports resolve against it).

    ``from mtlgraph import X`` counts as importing the module that defines ``X`` (the facade
    re-exports it: see ``mtlgraph._WHERE``), or the submodule ``X``.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolve against the package
                parts = package.split(".")
                module = ".".join([*parts[: len(parts) - node.level + 1], *filter(None, [module])])
            found += [(node.lineno, _source_of(module, alias.name)) for alias in node.names]
    return [(line, m) for line, m in found if m.split(".")[0] == "mtlgraph"]


def _source_of(module: str, name: str) -> str:
    """The module ``from module import name`` depends on: a submodule, a re-export, or module."""
    if (PACKAGE.parent / module.replace(".", "/") / name).exists() or (
        PACKAGE.parent / module.replace(".", "/") / f"{name}.py"
    ).exists():
        return f"{module}.{name}"
    if module == "mtlgraph":
        return mtlgraph._WHERE.get(name, module)
    return module


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


def _long_modules() -> list[str]:
    out = []
    for path in _modules():
        n = len(path.read_text().splitlines())
        if n > MAX_MODULE_LINES and _rel(path) not in LONG_MODULES:
            out.append(f"{_rel(path)}: {n} lines")
    return out


def test_no_module_is_longer_than_600_lines() -> None:
    long = _long_modules()
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them):\n" + "\n".join(long)


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
