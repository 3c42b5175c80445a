"""The ``mtlgraph`` command line: ``train``, ``evaluate``, ``check``, ``diagnose`` (docs/cli.md).

Exit status: 0 on success, 1 when training or evaluation fails at run time, 2 for a usage or
configuration error (one clean message on stderr; the traceback only with ``--debug``).

Subcommands live in :data:`COMMANDS` (added with :func:`command`). Building the parser imports
neither torch, numpy nor yaml; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import shlex
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mtlgraph._suggest import first_few
from mtlgraph.exceptions import (
    CheckpointError,
    MtlGraphError,
    TrainingError,
    TrainingInterrupted,
)
from mtlgraph.experiment import inference_cli, report_cli
from mtlgraph.experiment.run_dir import (
    RunDirectory,
    clear_run,
    new_run_dir,
    refuse_used,
)
from mtlgraph.experiment.runs import CONFIG_FILE, SCORES_FILE

if TYPE_CHECKING:
    from torch import nn

    from mtlgraph.experiment.config import ExperimentConfig
    from mtlgraph.training.distributed import DistEnv

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class UsageError(MtlGraphError):
    """A command line that cannot run (exit status 2)."""


@dataclass(frozen=True)
class Command:
    """A subcommand: its name, one-line help, how it adds arguments and what it runs."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
"""Subcommands by name, in the order ``--help`` lists them."""


def command(
    name: str, help: str, arguments: Callable[[argparse.ArgumentParser], None]
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``run(args) -> exit status`` as subcommand ``name``."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, arguments, run)
        return run

    return register


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the YAML experiment config")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. trainer.lr=0.01"
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its checkpoints/last.pt (exactly, mid-epoch too)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in a trainer.run_dir that holds a run: delete its checkpoints, "
        "metrics, events and vocabularies first",
    )


def _seed_process(seed: int) -> None:
    """The CLI owns its process: seed python's and numpy's global generators for user code."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


RESUME_REFUSED_SECTIONS = ("modules", "tasks", "data", "seed")
"""Top-level config keys a resume refuses to change: the model, the data and the model's seed."""
RESUME_APPLIED_DATA = ("num_workers", "pin_memory", "persistent_workers", "prefetch_factor")
"""``data`` keys (and ``data.datasets.<name>.num_workers``) a resume applies: loading speed."""


def _refused_key(key: str) -> bool:
    section, _, rest = key.partition(".")
    if section not in RESUME_REFUSED_SECTIONS:
        return False
    loading = key.rsplit(".", 1)[-1] in RESUME_APPLIED_DATA and rest.count(".") in (0, 2)
    return not (section == "data" and loading)


def resume_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """The keys that differ between a run's saved config ``old`` and the resume's ``new``, as
    ``(applied keys, refusals)``. Trainer settings follow
    :data:`~mtlgraph.training.config.RESUME_REFUSED`; the model, the data (but its loading
    options) and ``seed`` are refused; the rest is applied.

    Example:
        >>> old = {"seed": 0, "trainer": {"lr": 0.1, "optimizer": "adam"}}
        >>> resume_changes(old, {"seed": 1, "trainer": {"lr": 0.2, "optimizer": "adam"}})
        (['trainer.lr'], ['seed: the run has 0, this config 1'])
    """
    from mtlgraph.training.config import TrainerConfig, resume_conflicts
    from mtlgraph.training.writers import flatten

    a, b = flatten(old), flatten(new)
    ignored = {"trainer.run_dir", "trainer.progress_bar"}
    ignored |= {k for k in a if k.startswith("vocabularies.")}  # checked by experiment.sources
    changed = sorted(k for k in set(a) | set(b) if k not in ignored and a.get(k) != b.get(k))
    refused = [
        f"{k}: the run has {a.get(k, '(not set)')!r}, this config {b.get(k, '(not set)')!r}"
        for k in changed
        if _refused_key(k)
    ]
    trainer = TrainerConfig(**dict(new.get("trainer") or {}))
    refused += resume_conflicts(old.get("trainer") or {}, trainer, "trainer.")
    return [k for k in changed if not _refused_key(k)], refused


@command("train", "train a config; writes a run directory", _train_args)
def train(args: argparse.Namespace) -> int:
    import torch

    from mtlgraph.experiment.config import load_config
    from mtlgraph.training.distributed import DistEnv, device_for, process_group

    if args.resume is not None and args.overwrite:
        raise UsageError(
            "--resume and --overwrite exclude each other: --resume continues the run, "
            "--overwrite deletes it and starts afresh"
        )
    cfg = load_config(args.config, args.overrides)
    if args.quiet:
        cfg.trainer.progress_bar = False
    # under torchrun the process group spans the command: rank 0 picks the run directory
    env = DistEnv.from_env() if cfg.trainer.distributed == "auto" else DistEnv()
    device = device_for(env, torch.device(cfg.device))
    with process_group(env, device, cfg.trainer.distributed_timeout):
        return _train(args, cfg, env)


def _claim(args: argparse.Namespace, cfg: ExperimentConfig) -> RunDirectory:
    """Rank 0's run directory, locked: the ``--resume`` one, or a new one for a new run (a
    fixed ``trainer.run_dir`` must hold no run, unless ``--overwrite`` clears it)."""
    if args.resume is not None:
        directory = RunDirectory(Path(args.resume), created=False)
        if not directory.path.is_dir():
            raise UsageError(f"--resume {args.resume}: no such run directory")
    elif cfg.trainer.run_dir is not None:
        directory = RunDirectory.fixed(Path(cfg.trainer.run_dir))
    else:
        directory = RunDirectory(new_run_dir(cfg.runs_root, cfg.experiment), created=True)
    try:
        directory.lock.acquire()
        if args.resume is None and args.overwrite:
            clear_run(directory.path)
        elif args.resume is None:
            refuse_used(directory.path, args.config)
    except BaseException:
        if directory.created:
            directory.roll_back()
        directory.lock.release()
        raise
    return directory


def _claim_everywhere(
    args: argparse.Namespace, cfg: ExperimentConfig, env: DistEnv
) -> tuple[Path, RunDirectory | None]:
    """The run directory on every rank (rank 0 claims it; a refusal stops every rank)."""
    from mtlgraph.training.distributed import broadcast_object

    directory: RunDirectory | None = None
    failure: MtlGraphError | None = None
    if env.is_main:
        try:
            directory = _claim(args, cfg)
        except MtlGraphError as e:
            failure = e
    shared = broadcast_object(
        (str(directory.path), None) if directory is not None else (None, str(failure))
    )
    if failure is not None:
        raise failure
    if shared[1] is not None:
        raise UsageError(shared[1])
    return Path(shared[0]), directory


def _train(args: argparse.Namespace, cfg: ExperimentConfig, env: DistEnv) -> int:
    run_dir, directory = _claim_everywhere(args, cfg, env)
    try:
        try:  # --- set-up: any problem here is a usage/config error (exit 2)
            experiment, checkpoint = _set_up(args, cfg, env, run_dir)
        except BaseException as e:
            if directory is not None and args.resume is None:
                directory.roll_back()  # a refused new run leaves nothing behind
            if isinstance(e, KeyboardInterrupt):
                from mtlgraph.signals import interrupted

                raise interrupted(e, "training had not started") from None
            raise
        if experiment is None:  # a finished run
            return EXIT_OK
        return _run(args, experiment, checkpoint, env, run_dir)
    finally:
        if directory is not None:
            directory.lock.release()


def _set_up(
    args: argparse.Namespace, cfg: ExperimentConfig, env: DistEnv, run_dir: Path
) -> tuple[Any, Path | None]:
    """The experiment (``None``: a finished run, nothing to resume) and the checkpoint resumed.

    Raises:
        ConfigError: A resume that changes keys a run cannot change (all named).
    """
    from mtlgraph._io import atomic_write_text
    from mtlgraph.exceptions import ConfigError
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import config_to_dict, dump_run_config
    from mtlgraph.training.checkpoint import load_checkpoint, resolve_checkpoint

    checkpoint, state, applied = None, {}, list[str]()
    if args.resume is not None:
        checkpoint = resolve_checkpoint(run_dir)
        state = load_checkpoint(checkpoint)
        saved = (state.get("config") or {}).get("experiment") or {}
        applied, refused = resume_changes(saved, config_to_dict(cfg))
        if refused:
            raise ConfigError(
                [*refused, "resume with these keys as the run had them, or start a new run"],
                header=f"cannot resume {run_dir}: the config changes what a run cannot change:",
            )
    experiment = build_experiment(cfg, run_dir)
    if checkpoint is not None and not _resumable(experiment, state, checkpoint, applied, env):
        return None, None
    if checkpoint is None and env.is_main:
        atomic_write_text(run_dir / CONFIG_FILE, dump_run_config(cfg))
    if env.is_main:
        logger.info("run directory: %s", run_dir)
    _seed_process(cfg.seed)
    return experiment, checkpoint


def _run(
    args: argparse.Namespace, experiment: Any, checkpoint: Path | None, env: DistEnv, run_dir: Path
) -> int:
    """Train, then score and write the results (rank 0). A failure here is a run-time
    failure (exit 1); an interruption exits 130 / 143 naming the command that resumes."""
    from mtlgraph._io import write_json
    from mtlgraph.training.checkpoint import CHECKPOINT_DIR, LAST

    try:
        experiment.trainer.fit(experiment.model, experiment.loaders, resume_from=checkpoint)
        if not env.is_main:  # rank 0 alone scores and writes the results
            return EXIT_OK
        scores = experiment.model.score(experiment.loaders)
    except BaseException as e:
        e.add_note(f"mtlgraph: the run directory is {run_dir}")
        failure = _RunFailure()
        if isinstance(e, KeyboardInterrupt) and (run_dir / CHECKPOINT_DIR / LAST).is_file():
            command = ["mtlgraph", "train", args.config, *args.overrides, "--resume", str(run_dir)]
            failure.resume_hint = shlex.join(command)
        raise failure from e
    write_json(run_dir / SCORES_FILE, scores)
    print(json.dumps(dict(sorted(scores.items())), indent=2))
    logger.info("scores: %s", run_dir / SCORES_FILE)
    return EXIT_OK


class _RunFailure(MtlGraphError):
    """Marks an exception raised after set-up (exit status 1); ``__cause__`` is the real one."""

    resume_hint: str | None = None  # the command that resumes an interrupted run


def _resumable(
    experiment: Any,
    state: Mapping[str, Any],
    checkpoint: Path,
    changed: Sequence[str],
    env: DistEnv,
) -> bool:
    """Whether to resume: ``False`` for a finished run (its scores printed); logs the changed
    config keys the resumed run applies.

    Raises:
        CheckpointError: The checkpoint holds another model's weights.
    """
    from mtlgraph.exceptions import CheckpointError
    from mtlgraph.graph.model_file import state_problems

    problems = state_problems(experiment.model, state.get("model"), state.get("task_names"))
    if problems:
        raise CheckpointError(
            f"cannot resume from {checkpoint}: it is from another model: {'; '.join(problems)}"
        )
    progress, n_epochs = state["run"]["progress"], experiment.config.trainer.n_epochs
    run_dir = checkpoint.parent.parent
    if int(progress["epoch"]) >= n_epochs:
        print(
            f"mtlgraph: {run_dir} is a finished run ({progress['epoch']} of {n_epochs} epochs): "
            f"nothing to resume; raise trainer.n_epochs (e.g. trainer.n_epochs={n_epochs * 2}) "
            "to train longer",
            file=sys.stderr,
        )
        if env.is_main and (run_dir / SCORES_FILE).is_file():  # the finished run's scores
            print((run_dir / SCORES_FILE).read_text().strip())
        return False
    if changed and env.is_main:
        logger.info("resuming with new values of %s (applied from now on)", first_few(changed))
    return True


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    inference_cli.checkpoint_args(p)
    p.add_argument(
        "--split", action="append", metavar="SPLIT", help="only these splits (repeatable)"
    )
    p.add_argument(
        "--remap",
        action="append",
        default=[],
        metavar="LABEL=TASK",
        help="score label LABEL with task TASK's head (cross-task evaluation; TASK=null drops it)",
    )
    p.add_argument("--output", metavar="JSON", help="where to write the scores as JSON")


def _remaps(items: Sequence[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for item in items:
        label, sep, task = item.partition("=")
        if not sep or not label:
            raise UsageError(f"--remap {item}: expected LABEL=TASK, e.g. imdb_task=yelp_task")
        out[label] = None if task in ("", "null", "None") else task
    return out


def _default_output(checkpoint: Path) -> Path:
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / f"evaluation-{checkpoint.stem}.json"
    return checkpoint.with_name(f"{checkpoint.stem}.evaluation.json")


def score_table(scores: Mapping[str, float]) -> str:
    """Scores as a table: a row per task, dataset and metric; a column per split.

    Example:
        >>> print(score_table({"t/d/valid/accuracy": 0.5, "t/d/test/mse": 4.7e-05}))
        task  dataset  metric    valid  test
        t     d        accuracy  0.5    -
        t     d        mse       -      4.7e-05
    """
    from mtlgraph.metrics import split_key

    rows: dict[tuple[str, str, str], dict[str, float]] = {}
    splits: list[str] = []
    for key, value in scores.items():
        task, dataset, split, metric = split_key(key)
        rows.setdefault((task, dataset, metric), {})[split] = value
        if split not in splits:
            splits.append(split)
    order = {"train": 0, "valid": 1, "test": 2}
    splits.sort(key=lambda s: order.get(s, 3))
    header = ["task", "dataset", "metric", *splits]
    body = [
        [t, d, m, *(f"{r[s]:.4g}" if s in r else "-" for s in splits)]
        for (t, d, m), r in sorted(rows.items())
    ]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *body]
    )


@command("evaluate", "score a trained checkpoint on the config's data", _evaluate_args)
def evaluate(args: argparse.Namespace) -> int:
    from mtlgraph._io import write_json
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config
    from mtlgraph.experiment.predict import verify_vocabularies
    from mtlgraph.inference.predictions import check_output_path

    cfg = load_config(args.config, args.overrides)
    remap = _remaps(args.remap)
    if args.output:
        check_output_path(args.output, create_parents=True)  # before the work
    path = inference_cli.checkpoint_file(args.checkpoint)
    experiment = build_experiment(cfg)
    experiment.model.load(path)
    built = (experiment.trainer.experiment_config or {}).get("vocabularies") or {}
    verify_vocabularies(path, built)  # the ids must be the ones the model was trained on
    loaders = experiment.loaders
    if args.split:
        have = sorted({dl.dataset.split for dl in loaders})
        unknown = [s for s in args.split if s not in have]
        if unknown:
            raise UsageError(f"--split {unknown[0]}: the config has splits {', '.join(have)}")
        loaders = [dl for dl in loaders if dl.dataset.split in args.split]
    try:
        scores = experiment.model.score(loaders, remap_labels=remap)
    except MtlGraphError as e:  # a bad --remap names an unknown task
        raise UsageError(str(e)) from e
    output = Path(args.output) if args.output else _default_output(path)
    write_json(output, scores)
    print(score_table(scores))
    print(f"\nscores written to {output}", file=sys.stderr)
    return EXIT_OK


def _check_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the YAML experiment config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--graph",
        metavar="FILE",
        help="also write the merged graph as a picture: FILE.svg, FILE.mmd (Mermaid) or FILE.dot",
    )


def describe(experiment: Any) -> str:
    """The merged graph of an experiment: modules (and which tasks share them), tasks, data."""
    cfg, model = experiment.config, experiment.model
    users: dict[str, list[str]] = {m: [] for m in model.module_pool}
    for task in model.tasks.values():
        for m in task.module_pool:
            users[m].append(task.name)
    lines = _describe_modules(cfg, model, users)
    lines.append(f"tasks ({len(model.tasks)}):")
    for task in model.tasks.values():
        metrics = ", ".join(task.scorer.metric_keys)
        lines.append(f"  {task.name}: {task.task_type}, weight {task.weight:g}, metrics {metrics}")
        for op in task.op_sequence:
            ins = ", ".join(
                (f"detach({i.source}" if i.detach else i.source)
                + (f"[{i.key!r}]" if i.key is not None else "")
                + (")" if i.detach else "")
                for i in op.inputs
            )
            lines.append(f"    {op.name} = {op.module_name}({ins})")
    lines += _describe_datasets(experiment.datasets, len(cfg.data.datasets))
    t = cfg.trainer
    lines.append(
        f"trainer: {t.n_epochs} epochs, lr {t.lr:g}, optimizer {t.optimizer}, batch_scheduler "
        f"{t.batch_scheduler}, balancer {t.balancer}"
    )
    return "\n".join(lines)


def _describe_modules(cfg: Any, model: Any, users: Mapping[str, list[str]]) -> list[str]:
    """A line per module with its parameters, each counted once; a ``lora`` adapter's base
    (in the pool only inside its adapters) gets a line of its own, above them."""
    from mtlgraph.training.optim import resolve_modules

    def used(m: str) -> str:
        return f"{'shared by' if len(users[m]) > 1 else 'used by'} {', '.join(users[m])}"

    rows: dict[str, tuple[nn.Module, str]] = {}  # bases first: their parameters count there
    for m in users:
        spec = cfg.modules.get(m, {})
        base = spec.get("base") if spec.get("type") == "lora" else None
        if isinstance(base, str) and base not in rows:
            adapters = [a for a in users if cfg.modules.get(a, {}).get("base") == base]
            module, via = model.module_pool[m].base, f"base of {', '.join(adapters)}"
            rows[base] = (model.module_pool[base], used(base)) if base in users else (module, via)
    for m in users:
        rows.setdefault(m, (model.module_pool[m], used(m)))
    frozen = resolve_modules(model, "freeze", cfg.trainer.freeze)[0]
    counts = parameter_counts({m: module for m, (module, _) in rows.items()}, frozen)
    lines = [f"modules ({len(rows)}; shared = used by several tasks):"]
    width = max(map(len, rows), default=0)
    for m, (_, by) in rows.items():
        kind = cfg.modules.get(m, {}).get("type", "?")
        n, trained = counts[m]
        lines.append(f"  {m.ljust(width)}  {kind:<13} {n:>9,} params {trained:>9,} trainable  {by}")
    total, trained = (sum(c[i] for c in counts.values()) for i in (0, 1))
    lines.append(
        f"parameters: {total:,} ({trained:,} trainable, {total - trained:,} frozen; "
        "a parameter several modules hold is counted once)"
    )
    return lines


def parameter_counts(
    modules: Mapping[str, nn.Module], frozen: Sequence[str] = ()
) -> dict[str, tuple[int, int]]:
    """Module name -> ``(parameters, trainable parameters)``, each parameter counted once, by
    the first module holding it (a base listed before its adapters). Frozen: ``requires_grad``
    off, or held by a module named in ``frozen``.

    Example:
        >>> from torch import nn
        >>> trunk = nn.Linear(2, 2)
        >>> parameter_counts({"trunk": trunk, "both": nn.Sequential(trunk, nn.Linear(2, 1))})
        {'trunk': (6, 6), 'both': (3, 3)}
    """
    off = {id(p) for m in frozen for p in modules[m].parameters()}
    counted: set[int] = set()
    out: dict[str, tuple[int, int]] = {}
    for name, module in modules.items():
        own = [p for p in module.parameters() if id(p) not in counted]
        counted |= {id(p) for p in own}
        trained = [p for p in own if p.requires_grad and id(p) not in off]
        out[name] = (sum(p.numel() for p in own), sum(p.numel() for p in trained))
    return out


def _describe_datasets(datasets: Sequence[Any], n: int) -> list[str]:
    """A line per dataset: its splits with their sizes (``stream`` when a stream does not
    know its length) and the tasks it labels; any kind of dataset."""
    from mtlgraph.data.named import dataset_labels, dataset_size

    lines = [f"datasets ({n}):"]
    by_name: dict[str, list[str]] = {}
    labels: dict[str, tuple[str, ...]] = {}
    for ds in datasets:
        size = dataset_size(ds)
        by_name.setdefault(ds.name, []).append(f"{ds.split} {'stream' if size is None else size}")
        labels[ds.name] = dataset_labels(ds) or ()
    for name, splits in by_name.items():
        lines.append(f"  {name}: {', '.join(splits)}; labels {', '.join(labels[name]) or '?'}")
    return lines


@command("check", "validate a config and print its merged graph", _check_args)
def check(args: argparse.Namespace) -> int:
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.graph:
        from mtlgraph.graph.drawing import graph_format
        from mtlgraph.inference.predictions import check_output_path

        graph_format(args.graph)  # a bad extension or path fails before any work
        check_output_path(args.graph, create_parents=True)
    experiment = build_experiment(cfg)
    # train's own set-up, without training: whatever train refuses before its first step
    experiment.trainer.check(experiment.model, experiment.loaders)
    print(f"{args.config}: valid")
    print(describe(experiment))
    if args.graph:
        from mtlgraph.graph.drawing import write_graph

        print(f"graph written to {write_graph(experiment.model.tasks.values(), args.graph)}")
    return EXIT_OK


def _diagnose_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory trained with diagnostics")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


@command(
    "diagnose",
    "print a run's interference report: conflicting task pairs, task affinity, suggested trunks",
    _diagnose_args,
)
def diagnose(args: argparse.Namespace) -> int:
    from mtlgraph._io import json_value
    from mtlgraph.diagnostics import load_report

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"{args.run_dir}: no such run directory")
    report = load_report(run_dir)
    if args.json:
        print(json.dumps(json_value(report.to_dict()), indent=2))
    else:
        print(report.to_text())
    return EXIT_OK


command(
    "predict",
    "predict new data with a trained checkpoint: one row per example (docs/inference.md)",
    inference_cli.predict_args,
)(inference_cli.predict)
command(
    "export",
    "export tasks of a trained checkpoint to torch.export (.pt2) or ONNX, with a sidecar JSON",
    inference_cli.export_args,
)(inference_cli.export)

command(
    "report",
    "write a run's self-contained HTML report: graph, curves, weights, scores, diagnostics",
    report_cli.report_args,
)(report_cli.report)
command(
    "compare",
    "compare runs' final scores: mean ± std over seeds, Δm%% against single-task baselines",
    report_cli.compare_args,
)(report_cli.compare)
command(
    "baselines",
    "train each task of a config alone (same data, trainer settings and seeds)",
    report_cli.baselines_args,
)(report_cli.baselines)
command(
    "sweep",
    "train a grid of config values × seeds in parallel processes, then compare them",
    report_cli.sweep_args,
)(report_cli.sweep_command)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    from mtlgraph import __version__

    parser = argparse.ArgumentParser(
        prog="mtlgraph",
        description="Declarative multi-task learning: train, evaluate, check and diagnose YAML "
        "experiments.",
    )
    parser.add_argument("--version", action="version", version=f"mtlgraph {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--quiet", action="store_true", help="no progress bars or info logs, only results"
    )
    common.add_argument("--debug", action="store_true", help="debug logs, and tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help, parents=[common])
        cmd.arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def _configure_logging(quiet: bool, debug: bool) -> logging.Handler:
    """Log mtlgraph's messages to stderr for this command (the library never configures logs)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("mtlgraph")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO)
    return handler


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 run-time failure, 2 usage, 130
    SIGINT, 143 SIGTERM: every command, docs/cli.md#signals)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        # KEY=VALUE overrides may follow options (train cfg.yaml --quiet trainer.lr=0.1)
        unknown = [a for a in extra if a.startswith("-") or "=" not in a]
        if unknown or (extra and not hasattr(args, "overrides")):
            parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
        if extra:
            args.overrides = [*args.overrides, *extra]
    except SystemExit as e:  # --help, --version, usage errors
        return int(e.code) if isinstance(e.code, int) else EXIT_USAGE
    handler = _configure_logging(args.quiet, args.debug)
    from mtlgraph.signals import RaiseOnSignals, interrupted

    try:
        with RaiseOnSignals():  # SIGINT and SIGTERM raise: what is being written is cleaned up
            return int(args.run(args))
    except (KeyboardInterrupt, Exception) as caught:
        error: BaseException = caught
        hint = None
        if isinstance(caught, _RunFailure):  # raised after set-up: report the real error
            assert caught.__cause__ is not None
            error, hint = caught.__cause__, caught.resume_hint
        if isinstance(error, KeyboardInterrupt):
            if args.debug:
                traceback.print_exception(error, file=sys.stderr)
            print(interrupted_message(error, hint), file=sys.stderr)
            _release_frames(caught)
            return interrupted(error).exit_status
        if isinstance(error, BrokenPipeError):  # mtlgraph ... | head: the reader left; end quietly
            return _quiet_broken_pipe()
        _report(error, args.debug)
        # mtlgraph's own errors are usage errors even after set-up; anything else is exit 1
        return EXIT_USAGE if _is_usage_error(error) else EXIT_FAILURE
    finally:
        logging.getLogger("mtlgraph").removeHandler(handler)


def _release_frames(error: BaseException | None) -> None:
    """Clear the frames an interruption's tracebacks hold (its whole chain), so what the
    command had open (reader processes, files) closes now, not in the interpreter's shutdown,
    where stopping reader processes can hang."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def interrupted_message(error: KeyboardInterrupt, hint: str | None) -> str:
    """What ``main`` prints for an interrupted command: the signal, the step, the checkpoint
    and the command that resumes (when there is a checkpoint).

    Example:
        >>> import signal
        >>> from pathlib import Path
        >>> from mtlgraph.exceptions import TrainingInterrupted
        >>> e = TrainingInterrupted(signal.SIGTERM, 7, Path("r/checkpoints/last.pt"))
        >>> print(interrupted_message(e, "mtlgraph train c.yaml --resume r"))
        ... # doctest: +NORMALIZE_WHITESPACE
        mtlgraph: stopped by SIGTERM after step 7; checkpoint written: r/checkpoints/last.pt;
        resume with: mtlgraph train c.yaml --resume r
        >>> print(interrupted_message(KeyboardInterrupt(), None))
        mtlgraph: interrupted (Ctrl-C)
    """
    from mtlgraph.signals import interrupted

    stop = interrupted(error)
    head = stop.stopped
    if isinstance(stop, TrainingInterrupted):
        head = f"stopped by {stop.signal_name} "
        head += f"after step {stop.step}" if stop.step is not None else "inside a step"
        if stop.checkpoint is not None:
            head += f"; checkpoint written: {stop.checkpoint}"
    head = "; ".join([head, *stop.details])
    if hint is None:
        return f"mtlgraph: {head}"
    if isinstance(error, TrainingInterrupted):
        return f"mtlgraph: {head}; resume with: {hint}"
    return f"mtlgraph: {head}; resume from the last checkpoint with: {hint}"


def _quiet_broken_pipe() -> int:
    """Point stdout at /dev/null so the interpreter's final flush cannot complain either."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout)
        pass
    return EXIT_OK


def _is_usage_error(error: BaseException) -> bool:
    """mtlgraph's own errors, YAML errors and missing files are usage errors (exit status 2)."""
    if isinstance(error, TrainingError):  # a NaN guard: a run-time failure (exit status 1)
        return False
    if isinstance(error, CheckpointError) and isinstance(error.__cause__, OSError):
        return False  # a checkpoint that cannot be written (a full disk): exit status 1
    if isinstance(error, (MtlGraphError, FileNotFoundError)):
        return True
    yaml = sys.modules.get("yaml")  # only a command that imported yaml can raise its errors
    return yaml is not None and isinstance(error, yaml.YAMLError)


def _report(error: BaseException, debug: bool) -> None:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
        return
    named = isinstance(error, MtlGraphError)  # mtlgraph's messages stand alone
    message = str(error) if named else f"{type(error).__name__}: {error}"
    notes = [n for n in getattr(error, "__notes__", []) if n]
    text = "\n".join([message, *notes])
    print(f"mtlgraph: error: {text}", file=sys.stderr)
    print("(run with --debug for the traceback)", file=sys.stderr)
