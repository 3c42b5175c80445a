"""The ``imports:`` of a config: where user modules are looked up, how they are imported, and
the ``import_paths:`` a run directory's copy of the config keeps so it finds them again.

Example:
    >>> from pathlib import Path
    >>> from mtlgraph.experiment.imports import absolute
    >>> absolute(Path("/data/exp"), "blocks")
    '/data/exp/blocks'
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def absolute(base: Path, path: str) -> str:
    """``path`` resolved against ``base`` unless it is absolute already."""
    return path if Path(path).is_absolute() else str((base / path).resolve())


@contextmanager
def _import_path(directories: Sequence[Path]) -> Iterator[None]:
    """Make ``directories`` importable for the duration of the imports."""
    added = [str(d) for d in directories if str(d) not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for d in added:
            sys.path.remove(d)


def import_user_modules(
    names: object, problems: list[str], directories: Sequence[Path] = ()
) -> None:
    """Import the ``imports:`` list: the one way a config runs user code.

    A module that cannot be found is a config problem; an exception raised *by* the module
    propagates unchanged (with a note naming the config entry).
    """
    if not isinstance(names, list):
        return  # the schema reports the type
    with _import_path(directories):
        for i, name in enumerate(names):
            if not isinstance(name, str):
                continue
            path = _path_given(name)
            if path is not None:
                problems.append(f"imports[{i}]: '{name}' is a file path; {path}")
                continue
            try:
                importlib.import_module(name)
            except Exception as e:
                missing = getattr(e, "name", None) if isinstance(e, ModuleNotFoundError) else None
                if missing is None or not name.startswith(missing):  # raised by the module itself
                    e.add_note(f"mtlgraph: while importing '{name}' (imports[{i}] of the config)")
                    raise
                problems.append(
                    f"imports[{i}]: cannot import '{name}': no module named '{missing}' "
                    "(imports are looked up in the working directory, the config file's "
                    "directory and the installed packages)"
                )


def _path_given(name: str) -> str | None:
    """What to write instead when an ``imports:`` entry is a file path, not a module name."""
    if not (name.endswith(".py") or "/" in name or "\\" in name):
        return None
    path = Path(name)
    parts = [*path.parent.parts, path.stem if path.suffix == ".py" else path.name]
    parts = [p for p in parts if p not in (".", "")]
    module = ".".join(parts)
    if not module or not all(p.isidentifier() for p in parts):
        return (
            "imports take module names: put the file in the config file's directory (or list "
            "its directory under import_paths) and give its name without '.py'"
        )
    where = (
        f" (or list '{path.parent}' under import_paths and write '{parts[-1]}')"
        if len(parts) > 1
        else ""
    )
    return f"imports take module names, as Python's import does: write '{module}'{where}"


def import_dirs(raw: Mapping[str, Any], base_dir: str | Path) -> list[Path]:
    """Where ``imports:`` are looked up: the working directory, the config file's directory and
    the ``import_paths:`` (relative to the config file's directory)."""
    extra = raw.get("import_paths", [])
    extra = [p for p in extra if isinstance(p, str)] if isinstance(extra, list) else []
    return [Path.cwd(), Path(base_dir), *(Path(base_dir) / p for p in extra)]


def run_import_paths(imports: Sequence[str], import_paths: Sequence[str], base: Path) -> list[str]:
    """``import_paths`` made absolute (against ``base``), plus the directory each local module
    of ``imports`` (one found in the working directory or ``base``) was found in."""
    paths = [absolute(base, p) for p in import_paths]
    local = {Path.cwd().resolve(), base.resolve()}
    for name in imports:
        root = _module_root(name)
        if root is not None and root in local and str(root) not in paths:
            paths.append(str(root))
    return paths


def _module_root(name: str) -> Path | None:
    """The ``sys.path`` directory an imported module ``a.b.c`` was found under."""
    module = sys.modules.get(name)
    file = getattr(module, "__file__", None)
    if file is None:
        return None
    path = Path(file).resolve().parent
    if Path(file).name == "__init__.py":
        path = path.parent
    for _ in range(name.count(".")):
        path = path.parent
    return path
