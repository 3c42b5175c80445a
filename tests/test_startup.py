"""Start-up stays light: what ``mtlgraph --help``/``--version`` and ``import mtlgraph`` import.

No timings here (a shared machine is noisy; ``bench/startup.py`` measures): each test runs a
fresh interpreter and asserts which heavy modules it imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mtlgraph

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "numpy", "yaml", "scipy", "sklearn", "tensorboard")

# Runs `python -m mtlgraph ARGS` in this interpreter, then prints which heavy modules it loaded.
_RUN_CLI = """
import json, runpy, sys
sys.argv = ["mtlgraph", *sys.argv[1:]]
try:
    runpy.run_module("mtlgraph", run_name="__main__", alter_sys=True)
except SystemExit as e:
    code = e.code
heavy = {heavy!r}
print(json.dumps({{"code": code, "loaded": sorted(m for m in heavy if m in sys.modules)}}))
"""

_IMPORT = """
import json, sys
{statement}
heavy = {heavy!r}
print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
"""


def _python(code: str, *args: str) -> str:
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", ["--version", "--help"])
def test_cli_help_and_version_import_no_heavy_module(flag: str) -> None:
    result = json.loads(_python(_RUN_CLI.format(heavy=HEAVY), flag))
    assert result == {"code": 0, "loaded": []}


def test_subcommand_help_imports_no_heavy_module() -> None:
    result = json.loads(_python(_RUN_CLI.format(heavy=HEAVY), "train", "--help"))
    assert result == {"code": 0, "loaded": []}


def test_import_mtlgraph_imports_nothing_heavy() -> None:
    loaded = json.loads(_python(_IMPORT.format(statement="import mtlgraph", heavy=HEAVY)))
    assert loaded == []


def test_the_signal_handlers_every_command_installs_import_nothing_heavy() -> None:
    code = _IMPORT.format(statement="import mtlgraph.signals", heavy=HEAVY)
    assert json.loads(_python(code)) == []


def test_public_names_import_no_optional_heavy_module() -> None:
    code = _IMPORT.format(
        statement="from mtlgraph import *", heavy=("scipy", "sklearn", "tensorboard")
    )
    assert json.loads(_python(code)) == []


def test_every_public_name_resolves_lazily() -> None:
    for name in mtlgraph.__all__:
        assert getattr(mtlgraph, name) is not None, name
    assert set(mtlgraph.__all__) <= set(dir(mtlgraph))
    from mtlgraph import Trainer
    from mtlgraph.training.trainer import Trainer as Defined

    assert Trainer is Defined is mtlgraph.Trainer


def test_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="module 'mtlgraph' has no attribute 'Trainr'"):
        mtlgraph.Trainr  # noqa: B018
