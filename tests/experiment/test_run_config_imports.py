"""A run directory's config.yaml finds the `imports:` modules that sat beside the original config
when it is re-run from another working directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml
from experiment_helpers import cli_command, cli_env, tiny_config, write_config

from mtlgraph.experiment.config import dump_run_config, load_config
from mtlgraph.graph.modules import MODULES

BLOCKS = """
from torch import nn
from mtlgraph.graph import MODULES

class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x

MODULES.register("doubler_{tag}", Doubler)
"""


def _project(root: Path, tag: str, module_dir: str = ".") -> Path:
    """A config beside (or above ``module_dir`` of) a local module registering a module type."""
    (root / module_dir).mkdir(parents=True, exist_ok=True)
    (root / module_dir / f"blocks_{tag}.py").write_text(BLOCKS.format(tag=tag))
    cfg = tiny_config(n_epochs=1)
    cfg["imports"] = [f"blocks_{tag}"]
    if module_dir != ".":
        cfg["import_paths"] = [module_dir]
    cfg["modules"]["doubling"] = {"type": f"doubler_{tag}"}
    for task in cfg["tasks"].values():
        task["ops"].insert(1, {"module": "doubling", "inputs": ["trunk"]})
        task["ops"][2]["inputs"] = ["doubling"]
    cfg["runs_root"] = str(root / "runs")
    return write_config(root / "config.yaml", cfg)


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_command(*args), cwd=cwd, env=cli_env(), capture_output=True, text=True, timeout=300
    )


def test_a_run_dirs_config_finds_a_local_imports_module_from_another_directory(
    tmp_path: Path,
) -> None:
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    elsewhere.mkdir()
    project.mkdir()
    config = _project(project, "rr1")
    run = tmp_path / "run"
    done = _cli(project, "train", "config.yaml", f"trainer.run_dir={run}", "--quiet")
    assert done.returncode == 0, done.stderr
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["imports"] == ["blocks_rr1"]
    assert stored["import_paths"] == [str(config.parent.resolve())]

    again = tmp_path / "again"
    rerun = _cli(
        elsewhere, "train", str(run / "config.yaml"), f"trainer.run_dir={again}", "--quiet"
    )
    assert rerun.returncode == 0, rerun.stderr
    assert (again / "checkpoints" / "last.pt").is_file()


def test_import_paths_are_relative_to_the_config_and_stored_absolute(tmp_path: Path) -> None:
    config = _project(tmp_path, "rr2", module_dir="lib")
    try:
        cfg = load_config(config)  # found through import_paths: [lib], from any directory
        stored = yaml.safe_load(dump_run_config(cfg))
    finally:  # leave no registration or module behind
        MODULES.unregister("doubler_rr2")
        sys.modules.pop("blocks_rr2", None)
    assert cfg.import_paths == ["lib"]
    assert stored["import_paths"] == [str((tmp_path / "lib").resolve())]
