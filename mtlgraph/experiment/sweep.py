"""Many training runs of one config: a grid of overrides × seeds (``mtlgraph sweep``), each task
alone (``mtlgraph baselines``), or an Optuna search (``sweep --optuna``). docs/report.md.

Every run is its own ``mtlgraph train`` process writing its own run directory under one output
directory, with ``OMP_NUM_THREADS`` (torch's intra-op threads) set to ``cores // jobs`` so that
parallel jobs do not fight over cores. A run directory with ``scores.json`` is finished and
skipped; one with ``checkpoints/last.pt`` is resumed (``--resume``); so a killed sweep, run again,
continues where it stopped. All grid points are validated (as ``mtlgraph train`` would) before
any run starts.
"""

from __future__ import annotations

import itertools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtlgraph.exceptions import ConfigError, TrainingError
from mtlgraph.experiment.runs import SCORES_FILE

logger = logging.getLogger(__name__)

LOG_FILE = "train.log"
"""Each run's stdout and stderr, in its run directory."""


@dataclass(frozen=True)
class RunSpec:
    """One run of a sweep: its directory, config file and overrides."""

    run_dir: Path
    config: Path
    overrides: tuple[str, ...]

    @property
    def finished(self) -> bool:
        """Whether the run wrote its scores."""
        return (self.run_dir / SCORES_FILE).is_file()

    def conflicts(self) -> list[str]:
        """Why the run directory cannot be continued or skipped: it holds a run of another
        config (a finished one would be reported as this one's result), every key named."""
        import yaml

        from mtlgraph.experiment.config import dump_run_config, load_config
        from mtlgraph.experiment.runs import CONFIG_FILE, config_setting, read_run_config

        if not (self.run_dir / CONFIG_FILE).is_file():
            return []
        old = config_setting(read_run_config(self.run_dir / CONFIG_FILE))
        cfg = load_config(self.config, [*self.overrides, f"trainer.run_dir={self.run_dir}"])
        new = config_setting(yaml.safe_load(dump_run_config(cfg)))
        keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if not keys:
            return []
        diff = ", ".join(
            f"{k}: the run has {old.get(k, '(not set)')!r}, now {new.get(k, '(not set)')!r}"
            for k in keys[:5]
        )
        more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
        return [
            f"{self.run_dir}: holds a run of another config ({diff}{more}): choose another "
            "--out, or delete that run directory to train it again"
        ]

    def command(self) -> list[str]:
        """The ``mtlgraph train`` command line: ``--resume`` when a checkpoint exists, else
        ``--overwrite`` when an earlier attempt left files (it was killed before its first
        checkpoint, so nothing of it can be kept)."""
        from mtlgraph.training.checkpoint import CHECKPOINT_DIR, LAST

        cmd = [sys.executable, "-m", "mtlgraph", "train", str(self.config), *self.overrides]
        cmd += [f"trainer.run_dir={self.run_dir}", "--quiet"]
        if (self.run_dir / CHECKPOINT_DIR / LAST).is_file():
            cmd += ["--resume", str(self.run_dir)]
        elif self.run_dir.is_dir():
            cmd += ["--overwrite"]
        return cmd


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["trainer.lr=0.1,0.01"]`` -> ``{"trainer.lr": ["0.1", "0.01"]}``.

    Example:
        >>> parse_grid(["trainer.balancer=sum,mgda", "trainer.lr=0.01"])
        {'trainer.balancer': ['sum', 'mgda'], 'trainer.lr': ['0.01']}

    Raises:
        ConfigError: An item that is not ``KEY=V1,V2,...``, or a key given twice.
    """
    grid: dict[str, list[str]] = {}
    problems = []
    for item in items:
        key, sep, values = item.partition("=")
        parts = [v.strip() for v in values.split(",")]
        if not sep or not key or not all(parts):
            problems.append(f"--grid {item}: expected KEY=V1,V2,... (e.g. trainer.lr=0.1,0.01)")
        elif key in grid:
            problems.append(f"--grid {item}: key '{key}' is given twice; list its values once")
        else:
            grid[key] = parts
    if problems:
        raise ConfigError(problems)
    return grid


def run_name(point: Mapping[str, str], seed: int | None) -> str:
    """The run directory's name: ``trainer.balancer=mgda_seed=0`` (file-name safe)."""
    from mtlgraph.training.writers import safe_filename

    parts = [f"{k}={v}" for k, v in point.items()]
    if seed is not None:
        parts.append(f"seed={seed}")
    return safe_filename("_".join(parts) or "run")


def seed_overrides(seed: int | None) -> list[str]:
    """A seed for module initialisation and for the trainer (the data stay the same)."""
    return [] if seed is None else [f"seed={seed}", f"trainer.seed={seed}"]


def grid_specs(
    config: str | Path,
    overrides: Sequence[str],
    grid: Mapping[str, Sequence[str]],
    seeds: Sequence[int] | None,
    out: Path,
) -> list[RunSpec]:
    """Every grid point × seed, each config validated first.

    Raises:
        ConfigError: Every grid point's problems at once (unknown keys, wrong value types).
    """
    specs, problems = [], []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        point_overrides = [*overrides, *(f"{k}={v}" for k, v in point.items())]
        found = validate_runs(config, point_overrides, seeds)
        problems += [p for p in found if p not in problems]
        if found:
            continue
        for seed in seeds if seeds else [None]:
            specs.append(
                RunSpec(
                    out / run_name(point, seed),
                    Path(config),
                    (*point_overrides, *seed_overrides(seed)),
                )
            )
    if problems:
        raise ConfigError(problems, header=f"invalid sweep of {config}:")
    return specs


def validate_runs(
    config: str | Path, overrides: Sequence[str], seeds: Sequence[int] | None
) -> list[str]:
    """The problems of ``config`` with ``overrides`` and each seed's overrides (a negative
    ``--seeds`` value is named like any override), as ``mtlgraph train`` would find them."""
    from mtlgraph.experiment.config import load_config

    problems: list[str] = []
    for seed in seeds if seeds else [None]:
        try:
            load_config(config, [*overrides, *seed_overrides(seed)])
        except ConfigError as e:
            problems += [p for p in e.problems if p not in problems]
    return problems


def shard(specs: Sequence[RunSpec], spec: str | None) -> list[RunSpec]:
    """The runs of shard ``i/n`` (every n-th run from the i-th; 0-based ``i``).

    Raises:
        ConfigError: Not ``i/n`` with ``0 <= i < n``.
    """
    if spec is None:
        return list(specs)
    i, sep, n = spec.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise ConfigError([f"--shard {spec}: expected i/n with 0 <= i < n, e.g. 0/2"])
    return list(specs)[int(i) :: int(n)]


def thread_env(jobs: int) -> dict[str, str]:
    """The environment of a job: intra-op threads limited to ``cores // jobs``."""
    threads = str(max(1, (os.cpu_count() or 1) // max(1, jobs)))
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}


def run_all(specs: Sequence[RunSpec], jobs: int = 1) -> list[RunSpec]:
    """Train every unfinished run, ``jobs`` at a time; return the runs that failed.

    Each run logs to ``<run_dir>/train.log``. Finished runs are skipped. The runs are processes
    of their own session, stopped only by the sweep: interrupted (SIGINT or SIGTERM), it sends
    each running run one SIGTERM (the run finishes its step and writes ``last.pt``), waits for
    them and raises :class:`~mtlgraph.exceptions.Interrupted`; killed outright (SIGKILL), its
    runs get SIGTERM from the system (Linux), so none is left training on its own.
    """
    from mtlgraph.signals import interrupted

    problems = [p for s in specs for p in s.conflicts()]
    if problems:
        raise ConfigError(problems, header="the output directory holds other runs:")
    todo = [s for s in specs if not s.finished]
    for s in specs:
        if s.finished:
            print(f"skip {s.run_dir} (finished)", file=sys.stderr)
    running: list[tuple[RunSpec, subprocess.Popen[bytes], Any]] = []
    failed: list[RunSpec] = []
    try:
        while todo or running:
            while todo and len(running) < max(1, jobs):
                running.append(_start(todo.pop(0), thread_env(jobs)))
            time.sleep(0.2)
            failed += _reap(running)
    except KeyboardInterrupt as e:
        stopped = _stop(running)
        raise interrupted(
            e,
            f"{stopped} running run(s) stopped after their step with a checkpoint; run the same "
            "command again to continue",
        ) from None
    return failed


def _start(spec: RunSpec, env: Mapping[str, str]) -> tuple[RunSpec, subprocess.Popen[bytes], Any]:
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    log = (spec.run_dir / LOG_FILE).open("ab")
    verb = "resume" if "--resume" in spec.command() else "train"
    print(f"{verb} {spec.run_dir}", file=sys.stderr)
    proc = subprocess.Popen(
        spec.command(),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(env),
        start_new_session=True,  # a terminal's Ctrl-C reaches the sweep, which stops the runs once
        preexec_fn=_term_with_parent if sys.platform.startswith("linux") else None,
    )
    return spec, proc, log


def _term_with_parent() -> None:
    """In a run's process: SIGTERM when the sweep dies (``PR_SET_PDEATHSIG``)."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)


def _reap(running: list[tuple[RunSpec, subprocess.Popen[bytes], Any]]) -> list[RunSpec]:
    """Remove the runs that ended from ``running``; return those that failed."""
    failed = []
    for item in list(running):
        spec, proc, log = item
        if proc.poll() is None:
            continue
        running.remove(item)
        log.close()
        if proc.returncode != 0:
            failed.append(spec)
            log_file = spec.run_dir / LOG_FILE
            print(
                f"failed {spec.run_dir} (exit {proc.returncode}; see {log_file})", file=sys.stderr
            )
    return failed


def _stop(running: list[tuple[RunSpec, subprocess.Popen[bytes], Any]]) -> int:
    """SIGTERM each running run once, wait for it; the number stopped."""
    import signal

    for _, proc, _ in running:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for spec, proc, log in running:
        proc.wait()
        log.close()
        print(f"stopped {spec.run_dir} (exit {proc.returncode})", file=sys.stderr)
    return len(running)


def check_failed(failed: Sequence[RunSpec]) -> None:
    """Raise when runs failed, naming each with its log.

    Raises:
        TrainingError: Some runs failed.
    """
    if failed:
        lines = "; ".join(f"{s.run_dir} (log {s.run_dir / LOG_FILE})" for s in failed)
        raise TrainingError(f"{len(failed)} run(s) failed: {lines}")


# ---------------------------------------------------------------- baselines


def single_task_config(config: Mapping[str, Any], task: str) -> dict[str, Any]:
    """The config with only ``task``: its modules (and the modules they name), the datasets that
    label it (their other labels dropped), the same trainer settings and seed.

    Example:
        >>> cfg = {"experiment": "e", "modules": {"m": {"type": "linear"}, "h": {"type": "linear"},
        ...        "g": {"type": "linear"}},
        ...        "tasks": {"a": {"ops": [{"module": "m"}, {"module": "h"}]},
        ...                  "b": {"ops": [{"module": "m"}, {"module": "g"}]}},
        ...        "data": {"datasets": {"d": {"labels": {"a": "y", "b": "z"}}}},
        ...        "trainer": {"checkpoint_metric": "b/d/valid/accuracy"}}
        >>> one = single_task_config(cfg, "a")
        >>> sorted(one["modules"]), one["data"]["datasets"]["d"]["labels"], one["experiment"]
        (['h', 'm'], {'a': 'y'}, 'e-a')
        >>> one["trainer"]["checkpoint_metric"] is None
        True
    """
    import copy

    out = copy.deepcopy(dict(config))
    tasks = out["tasks"]
    out["tasks"] = {task: tasks[task]}
    modules = out.get("modules") or {}
    keep = {op["module"] for op in tasks[task].get("ops", [])}
    while True:  # modules a kept module names (an adapter's base)
        named = {
            v for m in keep for v in (modules.get(m) or {}).values() if isinstance(v, str)
        } & set(modules)
        if named <= keep:
            break
        keep |= named
    out["modules"] = {m: spec for m, spec in modules.items() if m in keep}
    datasets = out["data"]["datasets"]
    out["data"]["datasets"] = {
        name: {**ds, "labels": {task: ds["labels"][task]}}
        for name, ds in datasets.items()
        if task in (ds.get("labels") or {})
    }
    trainer = out.setdefault("trainer", {})
    metric = trainer.get("checkpoint_metric")
    if isinstance(metric, str) and metric.split("/")[0] != task:
        trainer["checkpoint_metric"] = None  # another task's metric is not logged alone
    out["experiment"] = f"{out.get('experiment', 'experiment')}-{task}"
    return out


def baseline_specs(
    config: str | Path, overrides: Sequence[str], seeds: Sequence[int] | None, out: Path
) -> list[RunSpec]:
    """A run per task (× seed) of :func:`single_task_config`; the configs are written to
    ``<out>/configs/<task>.yaml``."""
    import yaml

    from mtlgraph._io import atomic_write_text
    from mtlgraph.experiment.config import dump_run_config, load_config

    cfg = load_config(config, overrides)
    resolved = yaml.safe_load(dump_run_config(cfg))
    specs = []
    for task in cfg.tasks:
        path = out / "configs" / f"{task}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(single_task_config(resolved, task), sort_keys=False)
        atomic_write_text(path, text)
        problems = validate_runs(path, (), seeds)  # valid before any run starts
        if problems:
            raise ConfigError(problems)
        for seed in seeds if seeds else [None]:
            name = run_name({"task": task}, seed)
            specs.append(RunSpec(out / name, path, tuple(seed_overrides(seed))))
    return specs


# ---------------------------------------------------------------- Optuna


def optuna_search(
    config: str | Path,
    overrides: Sequence[str],
    grid: Mapping[str, Sequence[str]],
    trials: int,
    objective: str,
    out: Path,
    jobs: int = 1,
) -> Any:
    """An Optuna study over the grid's values (categorical per key), ``trials`` in all; each
    trial is a run ``<out>/trial-<n>``; the study lives in ``<out>/optuna.journal`` so a second
    call continues it. The objective's direction is its metric's.

    Raises:
        ConfigError: An objective that the runs do not log.
    """
    from mtlgraph._io import import_extra
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config
    from mtlgraph.training.checkpoint import metric_keys

    (optuna,) = import_extra("sweep --optuna", "sweep", "optuna")
    grid_specs(config, overrides, grid, None, out)  # every value valid first
    exp = build_experiment(load_config(config, overrides))
    tc = exp.trainer.config
    keys = metric_keys(
        exp.model,
        [dl for dl in exp.loaders if dl.dataset.split == tc.train_split],
        [dl for dl in exp.loaders if dl.dataset.split in tc.eval_splits],
    )
    if objective not in keys:
        from mtlgraph._suggest import did_you_mean

        raise ConfigError(
            [f"--objective {objective}: not a key the runs log{did_you_mean(objective, keys)}"]
        )
    out.mkdir(parents=True, exist_ok=True)
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(out / "optuna.journal"))
    )
    study = optuna.create_study(
        study_name="mtlgraph",
        storage=storage,
        load_if_exists=True,
        direction="maximize" if keys[objective] else "minimize",
    )

    def run_trial(trial: Any) -> float:
        point = {k: str(trial.suggest_categorical(k, list(v))) for k, v in grid.items()}
        spec = RunSpec(
            out / f"trial-{trial.number}",
            Path(config),
            (*overrides, *(f"{k}={v}" for k, v in point.items())),
        )
        check_failed(run_all([spec], jobs=jobs))
        from mtlgraph.experiment.runs import RunRecord

        return RunRecord.load(spec.run_dir, need_scores=True).scores[objective]

    done = sum(t.state.name == "COMPLETE" for t in study.trials)
    if trials > done:
        study.optimize(run_trial, n_trials=trials - done, n_jobs=jobs)
    return study
