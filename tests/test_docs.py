"""Every code block marked ``python runnable`` in README.md and docs/ runs."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```python runnable\n(.*?)^```", re.S | re.M)


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        for m in FENCE.finditer(text):
            line = text[: m.start()].count("\n") + 1
            out.append((path.name, line, m.group(1)))
    return out


BLOCKS = _blocks()


def test_docs_have_runnable_blocks() -> None:
    assert BLOCKS, "no ```python runnable blocks found"


@pytest.mark.parametrize(("name", "line", "code"), BLOCKS, ids=[f"{n}:{ln}" for n, ln, _ in BLOCKS])
def test_block_runs(
    name: str, line: int, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{name}:{line}", "exec"), {"__name__": "__docs__"})


def test_api_reference_names_every_public_name() -> None:
    import mtlgraph

    text = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in mtlgraph.__all__ if f"`{name}" not in text]
    assert not missing, f"docs/api.md does not mention {missing}"


def test_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text()
    pages = sorted(p.name for p in (ROOT / "docs").glob("*.md"))
    missing = [p for p in pages if f"docs/{p}" not in readme]
    assert not missing, f"README.md does not link {missing}"


DOTTED = re.compile(r"(?<![\"'\w/.])mtlgraph(?:\.\w+)+")
FILE = re.compile(r"(?<![\w/.])mtlgraph/[\w/]+\.py")


def _resolves(dotted: str) -> bool:
    """``mtlgraph.a.b.C.d``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_module_paths_named_in_docs_exist() -> None:
    missing = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        missing += [f"{path.name}: {d}" for d in set(DOTTED.findall(text)) if not _resolves(d)]
        missing += [
            f"{path.name}: {f}" for f in set(FILE.findall(text)) if not (ROOT / f).is_file()
        ]
    assert not missing, f"docs name modules or files that do not exist: {sorted(missing)}"
