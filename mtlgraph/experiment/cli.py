"""The ``mtlgraph`` command line: ``train``, ``evaluate``, ``check``, ``diagnose`` (docs/cli.md).

Exit status: 0 on success, 1 when training or evaluation fails at run time, 2 for a usage or
configuration error (one clean message on stderr; the traceback only with ``--debug``).

Subcommands live in :data:`COMMANDS` (added with :func:`command`). Building the parser imports
neither torch, numpy nor yaml; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import datetime
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
from mtlgraph.exceptions import MtlGraphError, TrainingError
from mtlgraph.experiment import inference_cli, report_cli
from mtlgraph.experiment.runs import CONFIG_FILE, SCORES_FILE

if TYPE_CHECKING:
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


def new_run_dir(root: str | Path, experiment: str, now: datetime.datetime | None = None) -> Path:
    """Create ``<root>/<experiment>/<YYYYmmdd-HHMMSS>`` (``-1``, ``-2``... if taken; the
    experiment name made file-name safe)."""
    from mtlgraph.training.writers import safe_filename

    stamp = (now or datetime.datetime.now()).strftime("%Y%m%d-%H%M%S")
    parent = Path(root) / safe_filename(experiment)
    parent.mkdir(parents=True, exist_ok=True)
    for i in range(1000):
        candidate = parent / (stamp if i == 0 else f"{stamp}-{i}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise UsageError(f"cannot create a new run directory under '{parent}'")


def _seed_process(seed: int) -> None:
    """The CLI owns its process: seed python's and numpy's global generators for user code."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)


def _config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    from mtlgraph.training.writers import flatten

    a, b = flatten(old), flatten(new)
    ignored = {"trainer.run_dir", "trainer.progress_bar"}
    ignored |= {k for k in a if k.startswith("vocabularies.")}  # checked by experiment.sources
    return sorted(k for k in set(a) | set(b) if k not in ignored and a.get(k) != b.get(k))


@command("train", "train a config; writes a run directory", _train_args)
def train(args: argparse.Namespace) -> int:
    import torch

    from mtlgraph.experiment.config import load_config
    from mtlgraph.training.distributed import DistEnv, device_for, process_group

    cfg = load_config(args.config, args.overrides)
    if args.quiet:
        cfg.trainer.progress_bar = False
    # under torchrun the process group spans the command: rank 0 picks the run directory
    env = DistEnv.from_env() if cfg.trainer.distributed == "auto" else DistEnv()
    device = device_for(env, torch.device(cfg.device))
    with process_group(env, device, cfg.trainer.distributed_timeout):
        return _train(args, cfg, env)


def _train(args: argparse.Namespace, cfg: ExperimentConfig, env: DistEnv) -> int:
    from mtlgraph._io import atomic_write_text, write_json
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import config_to_dict, dump_run_config
    from mtlgraph.training.checkpoint import load_checkpoint, resolve_checkpoint
    from mtlgraph.training.distributed import broadcast_object

    # --- set-up: any problem here is a usage/config error (exit 2)
    checkpoint = None
    if args.resume is not None:
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise UsageError(f"--resume {args.resume}: no such run directory")
        checkpoint = resolve_checkpoint(run_dir)
        state = load_checkpoint(checkpoint)
        saved = (state.get("config") or {}).get("experiment")
        changed = _config_differences(saved, config_to_dict(cfg)) if saved else []
    elif cfg.trainer.run_dir is not None:
        run_dir = Path(cfg.trainer.run_dir)
    else:
        made = new_run_dir(cfg.runs_root, cfg.experiment) if env.is_main else None
        run_dir = Path(broadcast_object(str(made) if made is not None else None))
    experiment = build_experiment(cfg, run_dir)
    # refused or finished: the run directory is left as it is
    if checkpoint is not None and not _resumable(experiment, state, checkpoint, changed, env):
        return EXIT_OK
    if checkpoint is None and env.is_main:
        atomic_write_text(run_dir / CONFIG_FILE, dump_run_config(cfg))
    if env.is_main:
        logger.info("run directory: %s", run_dir)
    _seed_process(cfg.seed)

    # --- the run: a failure here is a runtime failure (exit 1)
    try:
        experiment.trainer.fit(experiment.model, experiment.loaders, resume_from=checkpoint)
        if not env.is_main:  # rank 0 alone scores and writes the results
            return EXIT_OK
        scores = experiment.model.score(experiment.loaders)
    except BaseException as e:
        e.add_note(f"mtlgraph: the run directory is {run_dir}")
        failure = _RunFailure()
        if isinstance(e, KeyboardInterrupt) and args.resume is None:
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
    """Whether to resume: ``False`` for a finished run (its scores printed); warns about
    config keys that differ from the checkpoint's.

    Raises:
        CheckpointError: The checkpoint holds another model's weights.
    """
    from mtlgraph.exceptions import CheckpointError
    from mtlgraph.graph.model_file import state_problems

    problems = state_problems(experiment.model, state.get("model"), state.get("task_names"))
    if problems:
        error = CheckpointError(
            f"cannot resume from {checkpoint}: it is from another model: {'; '.join(problems)}"
        )
        if changed:
            error.add_note(f"the config differs from the checkpoint's in {first_few(changed)}")
        raise error
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
        logger.warning(
            "the config differs from the checkpoint's in %s: the resumed run will not match an "
            "uninterrupted one",
            first_few(changed),
        )
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

    cfg = load_config(args.config, args.overrides)
    remap = _remaps(args.remap)
    path = inference_cli.checkpoint_file(args.checkpoint)
    experiment = build_experiment(cfg)
    experiment.model.load(path)
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
    lines = [f"modules ({len(users)}; shared = used by several tasks):"]
    width = max(map(len, users), default=0)
    for m, tasks in users.items():
        kind = cfg.modules.get(m, {}).get("type", "?")
        n = sum(p.numel() for p in model.module_pool[m].parameters())
        shared = "shared by" if len(tasks) > 1 else "used by"
        lines.append(f"  {m.ljust(width)}  {kind:<13} {n:>9,} params  {shared} {', '.join(tasks)}")
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
    lines.append(f"datasets ({len(cfg.data.datasets)}):")
    by_name: dict[str, list[str]] = {}
    labels: dict[str, list[str]] = {}
    for ds in experiment.datasets:
        by_name.setdefault(ds.name, []).append(f"{ds.split} {len(ds)}")
        labels[ds.name] = list(ds.Y_dict)
    for name, splits in by_name.items():
        lines.append(f"  {name}: {', '.join(splits)}; labels {', '.join(labels[name])}")
    t = cfg.trainer
    lines.append(
        f"trainer: {t.n_epochs} epochs, lr {t.lr:g}, optimizer {t.optimizer}, batch_scheduler "
        f"{t.batch_scheduler}, balancer {t.balancer}"
    )
    return "\n".join(lines)


@command("check", "validate a config and print its merged graph", _check_args)
def check(args: argparse.Namespace) -> int:
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.graph:
        from mtlgraph.graph.drawing import graph_format

        graph_format(args.graph)  # a bad extension fails before any work
    experiment = build_experiment(cfg)
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
    """Run the command line; return the exit status (0 ok, 1 run-time failure, 2 usage)."""
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
    try:
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
            print(
                f"mtlgraph: interrupted (Ctrl-C){f'; resume with: {hint}' if hint else ''}",
                file=sys.stderr,
            )
            return 130
        if isinstance(error, BrokenPipeError):  # mtlgraph ... | head: the reader left; end quietly
            return _quiet_broken_pipe()
        _report(error, args.debug)
        # mtlgraph's own errors are usage errors even after set-up; anything else is exit 1
        return EXIT_USAGE if _is_usage_error(error) else EXIT_FAILURE
    finally:
        logging.getLogger("mtlgraph").removeHandler(handler)


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
