"""The ``report``, ``compare``, ``baselines`` and ``sweep`` subcommands (docs/report.md); the
command line (``mtlgraph.experiment.cli``) registers them. Each imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mtlgraph.exceptions import ConfigError


def report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", metavar="FILE.html", help="where to write it (RUN_DIR/report.html)")
    p.add_argument(
        "--no-tensorboard",
        action="store_true",
        help="do not add the figures to the run's TensorBoard events",
    )


def report(args: argparse.Namespace) -> int:
    from mtlgraph.experiment.run_report import write_html_report
    from mtlgraph.inference.predictions import check_output_path

    if args.out:
        check_output_path(args.out, create_parents=True)  # before the work
    path = write_html_report(args.run_dir, args.out, tensorboard=not args.no_tensorboard)
    print(f"report written to {path}")
    _mlflow_artifacts(Path(args.run_dir), [path])
    return 0


def _mlflow_artifacts(run_dir: Path, files: list[Path]) -> None:
    """Attach ``files`` to the run's MLflow run when the MLflow writer logged it."""
    from mtlgraph.training.writers import MLFLOW_RUN_FILE, attach_mlflow_artifacts

    if (run_dir / MLFLOW_RUN_FILE).is_file():
        attach_mlflow_artifacts(run_dir, files)


def _baseline_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--baseline",
        nargs="+",
        action="extend",
        default=[],
        metavar="RUN_OR_GLOB",
        help="single-task runs (mtlgraph baselines) for Δm%% (repeatable)",
    )


def compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", metavar="RUN_OR_GLOB", help="run directories or globs")
    _baseline_arg(p)
    p.add_argument("--split", help="the split compared (default: test, else valid)")
    p.add_argument(
        "--format", choices=("markdown", "csv", "html"), help="default: by --out's extension"
    )
    p.add_argument("--out", metavar="FILE", help="write the tables there (.md, .csv or .html)")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the comparison as bar charts")


def compare(args: argparse.Namespace) -> int:
    from mtlgraph.inference.predictions import check_output_path

    for out in (args.out, args.plot):
        if out:
            check_output_path(out, create_parents=True)
    if args.plot and Path(args.plot).suffix.lower() != ".png":
        name = Path(args.plot).with_suffix(".png").name
        raise ConfigError([f"--plot {args.plot}: the plot is a PNG image; name it {name}"])
    print(compare_runs(args.runs, args.baseline, args.split, args.format, args.out, args.plot))
    return 0


def compare_runs(
    runs: list[str],
    baselines: list[str],
    split: str | None = None,
    fmt: str | None = None,
    out: str | None = None,
    plot: str | None = None,
) -> str:
    """Compare the finished runs named by ``runs`` (paths or globs) against ``baselines``; the
    rendered text (also written to ``out``)."""
    from mtlgraph._io import atomic_write_text
    from mtlgraph.experiment import compare as cmp
    from mtlgraph.experiment.runs import RunRecord, expand_runs

    main = [RunRecord.load(p, need_scores=True) for p in expand_runs(runs)]
    base = [RunRecord.load(p, need_scores=True) for p in expand_runs(baselines, "baseline")]
    result = cmp.compare(main, base, split)
    if fmt is None:
        suffix = Path(out).suffix.lower() if out else ""
        fmt = {".csv": "csv", ".html": "html", ".htm": "html"}.get(suffix, "markdown")
    text = cmp.render(result, fmt)
    if out:
        atomic_write_text(Path(out), text)
    if plot:
        cmp.plot(result, plot)
    return text


def _seed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the YAML experiment config")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--seeds", nargs="+", action="extend", type=int, metavar="SEED", help="one run per seed"
    )
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (separate processes)")
    p.add_argument("--out", metavar="DIR", help="where the run directories go")


def baselines_args(p: argparse.ArgumentParser) -> None:
    _seed_args(p)


def baselines(args: argparse.Namespace) -> int:
    from mtlgraph.experiment import sweep

    out = _out_dir(args, "baselines")
    specs = sweep.baseline_specs(args.config, args.overrides, args.seeds, out)
    sweep.check_failed(sweep.run_all(specs, args.jobs))
    for spec in specs:
        print(spec.run_dir)
    return 0


def sweep_args(p: argparse.ArgumentParser) -> None:
    _seed_args(p)
    p.add_argument(
        "--grid",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=V1,V2",
        help="config keys and the values to try (every combination)",
    )
    p.add_argument("--shard", metavar="i/n", help="run only every n-th run from the i-th")
    _baseline_arg(p)
    p.add_argument("--optuna", type=int, metavar="TRIALS", help="search with Optuna instead")
    p.add_argument("--objective", metavar="KEY", help="the score key Optuna optimises")


def sweep_command(args: argparse.Namespace) -> int:
    from mtlgraph.experiment import sweep

    if args.jobs < 1:
        raise ConfigError([f"--jobs {args.jobs}: must be >= 1"])
    grid = sweep.parse_grid(args.grid)
    out = _out_dir(args, "sweep")
    if args.optuna is not None:
        problems = []
        if not args.objective:
            problems.append("--optuna needs --objective KEY (e.g. t/d/valid/accuracy)")
        if args.optuna < 1:
            problems.append(f"--optuna {args.optuna}: the number of trials must be >= 1")
        if not grid:
            problems.append("--optuna searches the --grid values: give --grid KEY=V1,V2 ...")
        if problems:
            raise ConfigError(problems)
        study = sweep.optuna_search(
            args.config, args.overrides, grid, args.optuna, args.objective, out, args.jobs
        )
        print(f"best trial {study.best_trial.number}: {study.best_value:.4g} {study.best_params}")
        return 0
    specs = sweep.grid_specs(args.config, args.overrides, grid, args.seeds, out)
    mine = sweep.shard(specs, args.shard)
    sweep.check_failed(sweep.run_all(mine, args.jobs))
    done = [str(s.run_dir) for s in specs if s.finished]
    if len(done) < len(specs):
        print(f"{len(done)} of {len(specs)} runs finished (other shards?)", file=sys.stderr)
    print(compare_runs(done, args.baseline))
    return 0


def _out_dir(args: argparse.Namespace, kind: str) -> Path:
    """``--out``, else ``<runs_root>/<experiment>-<kind>``.

    Raises:
        ConfigError: ``--out`` names a file (or a path under one).
    """
    if args.out:
        out = Path(args.out)
        above = out
        while not above.exists() and above != above.parent:
            above = above.parent
        if not above.is_dir():
            raise ConfigError(
                [f"--out {out}: '{above}' is a file, not a directory; name a directory"]
            )
        return out
    from mtlgraph.experiment.config import load_config

    cfg = load_config(args.config, args.overrides)
    return Path(cfg.runs_root) / f"{cfg.experiment}-{kind}"
