"""Reading run directories back: :class:`RunRecord` (config, logged history, final scores, the
best checkpoint's step) and :func:`expand_runs` (run directories named by paths or globs).

The one reader of a finished or interrupted run for ``report``, ``compare`` and ``sweep``.
"""

from __future__ import annotations

import glob
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlgraph.exceptions import ConfigError

# light at import (the command line's parser reads CONFIG_FILE and SCORES_FILE from here)
METRICS_FILE = "metrics.jsonl"  # = mtlgraph.training.writers.METRICS_FILE (checked by a test)

CONFIG_FILE = "config.yaml"
"""The resolved config of a run directory."""
SCORES_FILE = "scores.json"
"""The final scores of a run directory; its presence marks a finished run."""
REPORT_FILE = "report.html"
"""The run report ``mtlgraph report`` writes by default."""
MLFLOW_RUN_FILE = "mlflow.json"  # = mtlgraph.training.writers.MLFLOW_RUN_FILE (checked by a test)
SEED_KEYS = ("seed", "trainer.seed")
"""Config keys that make runs replicates of one another (grouped as mean ± std)."""
_IGNORED = ("trainer.run_dir", "trainer.progress_bar", "runs_root", "import_paths")


@dataclass
class RunRecord:
    """What one run directory holds.

    Attributes:
        path: The run directory.
        config: The resolved config (``config.yaml``) as plain values.
        history: The records of ``metrics.jsonl`` in order (``null`` read as NaN).
        scores: ``scores.json`` (empty for a run that did not finish).
        best: The best checkpoint's bookkeeping (``metric``, ``mode``, ``value``, ``step``), or
            ``None`` without ``checkpoint_metric`` or checkpoints.

    Example:
        >>> import tempfile, pathlib
        >>> from mtlgraph.experiment.runs import RunRecord
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> line = '{"epoch": 1, "step": 5, "t/d/valid/f1": 0.5}'
        >>> _ = (run / "metrics.jsonl").write_text(line + "\\n")
        >>> _ = (run / "config.yaml").write_text("seed: 3\\n")
        >>> RunRecord.load(run).history[0]["t/d/valid/f1"], RunRecord.load(run).finished
        (0.5, False)
    """

    path: Path
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    scores: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None

    @classmethod
    def load(cls, path: str | Path, need_scores: bool = False) -> RunRecord:
        """Read a run directory.

        Raises:
            ConfigError: No such directory, no ``metrics.jsonl`` (or, with ``need_scores``, no
                ``scores.json``), or a file that is not what training writes: naming the file.
        """
        run = Path(path)
        if run.is_file():
            raise ConfigError(
                [
                    f"{path}: a file, not a run directory: give the directory mtlgraph train "
                    "wrote (trainer.run_dir, or runs/<experiment>/<timestamp>)"
                ]
            )
        if not run.is_dir():
            raise ConfigError([f"{path}: no such run directory"])
        wanted = [METRICS_FILE, SCORES_FILE] if need_scores else [METRICS_FILE]
        missing = [name for name in wanted if not (run / name).is_file()]
        if missing:
            raise ConfigError(
                [
                    f"{path}: not a {'finished ' if need_scores else ''}run directory: no "
                    f"{' or '.join(missing)} (train it with mtlgraph train CONFIG "
                    f"trainer.run_dir={path})"
                ]
            )
        record = cls(run, history=_read_history(run / METRICS_FILE))
        if (run / CONFIG_FILE).is_file():
            record.config = read_run_config(run / CONFIG_FILE)
        if (run / SCORES_FILE).is_file():
            record.scores = _read_scores(run / SCORES_FILE)
        record.best = _best(run)
        return record

    @property
    def finished(self) -> bool:
        """Whether training ended and wrote ``scores.json``."""
        return (self.path / SCORES_FILE).is_file()

    @property
    def tasks(self) -> list[str]:
        """Task names of the run's config (else of its score keys), sorted."""
        from mtlgraph.metrics import split_key

        tasks = self.config.get("tasks")
        if isinstance(tasks, Mapping) and tasks:
            return sorted(tasks)
        return sorted({split_key(k)[0] for k in self.scores if split_key(k)[0] != "model"})

    @property
    def seed(self) -> int | None:
        """The config's ``seed``."""
        seed = self.config.get("seed")
        return int(seed) if isinstance(seed, int) else None

    def setting(self) -> dict[str, Any]:
        """The flattened config without seeds and paths: runs with equal settings are seeds
        of one experiment."""
        return {k: v for k, v in config_setting(self.config).items() if k not in SEED_KEYS}

    def series(self, key: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of ``key`` over the history (records without it skipped)."""
        steps, values = [], []
        for rec in self.history:
            if key in rec:
                steps.append(float(rec.get("step", math.nan)))
                values.append(float(rec[key]))
        return steps, values


def config_setting(config: Mapping[str, Any]) -> dict[str, Any]:
    """A config flattened without its paths and vocabularies: what makes two runs the same
    experiment (seeds included).

    Example:
        >>> config_setting({"seed": 1, "trainer": {"lr": 0.1, "run_dir": "runs/a"}})
        {'seed': 1, 'trainer.lr': 0.1}
    """
    from mtlgraph.training.writers import flatten

    return {
        k: v
        for k, v in flatten(config).items()
        if not k.startswith(_IGNORED) and not k.startswith("vocab")
    }


def _read_history(path: Path) -> list[dict[str, float]]:
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                break  # a killed run's torn last line
            raise ConfigError([f"{path}:{n}: not a JSON line"]) from None
        out.append(_numbers(rec, f"{path}:{n}"))
    return out


def _numbers(data: Any, where: str) -> dict[str, float]:
    """A JSON object of numbers (``null`` read as NaN), else a ``ConfigError`` naming ``where``
    and the first key whose value is not a number."""
    if not isinstance(data, dict):
        raise ConfigError(
            [f"{where}: expected a JSON object of numbers, got {type(data).__name__}"]
        )
    for key, value in data.items():
        if value is not None and not isinstance(value, int | float):
            raise ConfigError(
                [
                    f"{where}: {key!r} is {value!r}, not a number (this file is written by "
                    "mtlgraph train; restore it or train the run again)"
                ]
            )
    return {k: math.nan if v is None else float(v) for k, v in data.items()}


def _read_scores(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError([f"{path}: not JSON ({e})"]) from e
    return _numbers(data, str(path))


def read_run_config(path: Path) -> dict[str, Any]:
    """A run directory's ``config.yaml`` as plain values (``{}`` for an empty file).

    Raises:
        ConfigError: Invalid YAML or not a mapping, naming the file.
    """
    from mtlgraph.experiment.yaml_lines import parse_yaml

    data, _, _ = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            [
                f"{path}: expected the run's config (a YAML mapping), got "
                f"{type(data).__name__} (restore it from the config the run was trained with)"
            ]
        )
    return dict(data)


def _best(run: Path) -> dict[str, Any] | None:
    """The checkpoint hook's bookkeeping in ``checkpoints/last.pt`` (``None``: none)."""
    from mtlgraph.exceptions import CheckpointError
    from mtlgraph.training.checkpoint import CHECKPOINT_DIR, LAST, load_checkpoint

    last = run / CHECKPOINT_DIR / LAST
    if not last.is_file():
        return None
    try:
        state = load_checkpoint(last)
    except CheckpointError:
        return None  # a torn checkpoint: the report still shows the curves
    best = (state.get("hooks") or {}).get("checkpoint") or {}
    return dict(best) if best.get("step") is not None else None


def expand_runs(patterns: Sequence[str], what: str = "run") -> list[Path]:
    """Run directories named by paths or globs, in the order given (each glob sorted). A glob
    keeps only the directories that hold ``metrics.jsonl``; a plain path is kept as given (and
    :meth:`RunRecord.load` says what it lacks).

    Raises:
        ConfigError: A pattern that matches no (run) directory, each one named.
    """
    out: list[Path] = []
    problems = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            found = sorted(
                Path(p) for p in glob.glob(pattern) if (Path(p) / METRICS_FILE).is_file()
            )
        else:
            found = [Path(pattern)] if Path(pattern).exists() else []
        if not found:
            problems.append(f"{pattern}: no {what} directory matches")
        out += [p for p in found if p not in out]
    if problems:
        raise ConfigError(problems)
    return out
