"""``mtlgraph predict`` and ``mtlgraph export`` (docs/inference.md, docs/cli.md).

Registered in :mod:`mtlgraph.experiment.cli`; exit status as for ``evaluate``. Torch, numpy and
the readers are imported when a command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mtlgraph.experiment.config import ExperimentConfig
    from mtlgraph.graph.model import MultitaskClassifier


def checkpoint_args(p: argparse.ArgumentParser) -> None:
    """Config, overrides and ``--checkpoint`` (shared by evaluate, predict and export)."""
    p.add_argument("config", help="the YAML experiment config the checkpoint was trained with")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="RUN_DIR_OR_FILE",
        help="a run directory (its best.pt, else last.pt), a checkpoint or a model file",
    )


def _common(p: argparse.ArgumentParser) -> None:
    checkpoint_args(p)
    p.add_argument(
        "--tasks",
        metavar="A,B",
        help="comma-separated tasks (default: every task of the model; for --data NAME[:SPLIT], "
        "every task whose input fields that dataset has)",
    )


def predict_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``mtlgraph predict``."""
    _common(p)
    p.add_argument(
        "--data",
        required=True,
        metavar="PATH",
        help="new data: a .csv, .jsonl, .parquet, .npz or .npy file, a directory of "
        "<field>.npy files, or NAME[:SPLIT], a dataset of the config; with a declared source, "
        "also a folder of images or a glob of shards",
    )
    p.add_argument(
        "--out",
        default="predictions.jsonl",
        metavar="FILE",
        help="where to write one row per example: .jsonl (default predictions.jsonl), .csv or "
        ".parquet",
    )
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="rows per batch")
    p.add_argument(
        "--num-workers", type=int, default=0, metavar="N", help="reader processes (0 = inline)"
    )
    p.add_argument(
        "--id-column", metavar="NAME", help="column holding each row's id (default: row number)"
    )
    p.add_argument("--format", metavar="FORMAT", help="the data's format (default: from PATH)")
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="a row with a NaN or infinite input gets null predictions and its reason in a "
        "'missing' column (default: an error naming the row and field, exit 2)",
    )


def predict(args: argparse.Namespace) -> int:
    """Run ``mtlgraph predict``; returns the exit status. An interruption (SIGINT or SIGTERM,
    raised by ``main``'s :class:`~mtlgraph.signals.RaiseOnSignals`) leaves no temporary
    file and an older ``--out`` intact, and says so."""
    from mtlgraph.signals import interrupted

    before = _stat(args.out)
    try:
        return _predict(args)
    except KeyboardInterrupt as e:
        left = _left_at(args.out, before, "predictions", unchanged="no predictions written, ")
        raise interrupted(e, left) from None


def _predict(args: argparse.Namespace) -> int:
    from mtlgraph.exceptions import ConfigError
    from mtlgraph.experiment.config import load_config
    from mtlgraph.experiment.predict import (
        ID_FIELD,
        checkpoint_vocabularies,
        read_prediction_data,
        vocabulary_files,
    )
    from mtlgraph.inference.export import input_fields
    from mtlgraph.inference.predictions import (
        check_output_path,
        import_pyarrow,
        prediction_format,
        write_predictions,
    )
    from mtlgraph.training.checkpoint import run_directory

    if args.batch_size < 1 or args.num_workers < 0:
        raise ConfigError(["--batch-size must be >= 1 and --num-workers >= 0"])
    check_output_path(args.out)  # usage errors first, before any work
    out_format = prediction_format(args.out)
    if out_format == "parquet":
        with _extras_are_usage():
            import_pyarrow()
    cfg = load_config(args.config, args.overrides)
    model = load_model(cfg, args.checkpoint)
    given = args.tasks is not None
    tasks = parse_tasks(model, args.tasks) if given else labelled_tasks(cfg, model, args.data)
    fields = input_fields(model, tasks, config_fields(cfg))
    trained = checkpoint_vocabularies(checkpoint_file(args.checkpoint))
    if trained is None and vocabulary_files(cfg, run_directory(args.checkpoint), fields):
        logging.getLogger(__name__).warning(
            "'%s' records no vocabulary fingerprints (a model file): the run's vocabularies "
            "cannot be checked against it",
            checkpoint_file(args.checkpoint),
        )
    with _extras_are_usage():
        data = read_prediction_data(
            cfg,
            args.data,
            fields,
            args.id_column,
            args.format,
            run_directory(args.checkpoint),
            args.allow_missing,
            trained,
        )
    rows = write_predictions(
        model,
        data.batches(args.batch_size, args.num_workers),
        args.out,
        tasks,
        id_field=ID_FIELD,
        file_format=out_format,
        progress=not args.quiet,
        total=data.rows,
        allow_missing=args.allow_missing,
    )
    print(f"{rows} rows of {', '.join(tasks)} written to {args.out}", file=sys.stderr)
    return 0


@contextmanager
def _extras_are_usage() -> Iterator[None]:
    """An absent optional extra (pyarrow, onnx) is a usage error (exit 2)."""
    from mtlgraph.exceptions import ConfigError

    try:
        yield
    except ImportError as e:
        if "pip install 'mtlgraph[" not in str(e):
            raise
        raise ConfigError([str(e)]) from e


def export_args(p: argparse.ArgumentParser) -> None:
    """The arguments of ``mtlgraph export``."""
    _common(p)
    p.add_argument(
        "--out", required=True, metavar="FILE", help="the program: model.pt2 or model.onnx"
    )
    p.add_argument(
        "--format",
        choices=["torch_export", "onnx"],
        help="default: onnx for a .onnx file, else torch_export",
    )
    p.add_argument(
        "--no-check",
        action="store_true",
        help="skip running the exported file against the eager model on example rows",
    )


def export(args: argparse.Namespace) -> int:
    """Run ``mtlgraph export``; returns the exit status. An interruption (SIGINT or SIGTERM,
    raised by ``main``'s :class:`~mtlgraph.signals.RaiseOnSignals`) says whether
    ``--out`` was replaced; an interrupted write leaves no temporary file and the older file
    intact."""
    from mtlgraph.signals import interrupted

    before = _stat(args.out)
    try:
        return _export(args)
    except KeyboardInterrupt as e:
        raise interrupted(e, _left_at(args.out, before, "program")) from None


def _left_at(path: str, before: tuple[int, int] | None, what: str, unchanged: str = "") -> str:
    """What an interrupted command left at ``path`` (its :func:`_stat` ``before`` it began):
    nothing or the older file (after ``unchanged``), or the new ``what`` (the atomic rename had
    happened)."""
    after = _stat(path)
    if after is None:
        return f"{unchanged}nothing was written"
    if after == before:
        return f"{unchanged}'{path}' keeps its older content"
    return f"'{path}' holds the new {what}"


def _stat(path: str) -> tuple[int, int] | None:
    """``path``'s inode and modification time (``None``: no such file); an atomic write
    changes the inode."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _export(args: argparse.Namespace) -> int:
    """The export :func:`export` runs."""
    from mtlgraph.exceptions import ConfigError
    from mtlgraph.experiment.config import load_config
    from mtlgraph.experiment.predict import (
        checkpoint_vocabularies,
        export_declarations,
        vocabulary_files,
    )
    from mtlgraph.inference.export import input_fields, max_export_error, require_onnx, sidecar_path
    from mtlgraph.inference.predictions import check_output_path
    from mtlgraph.training.checkpoint import run_directory

    suffixes = {"onnx": ".onnx", "torch_export": ".pt2"}
    suffix = Path(args.out).suffix.lower()
    fmt = args.format or ("onnx" if suffix == ".onnx" else "torch_export")
    if suffix != suffixes.get(fmt, suffix):  # a server tells the format by the file's name
        raise ConfigError(
            [
                f"--out {args.out}: format {fmt} writes a {suffixes[fmt]} file; name it "
                f"{Path(args.out).with_suffix(suffixes[fmt]).name}"
                + ("" if args.format else " (or give --format onnx for ONNX)")
            ]
        )
    if fmt == "onnx":
        with _extras_are_usage():
            require_onnx()
    check_output_path(args.out)
    cfg = load_config(args.config, args.overrides)
    model = load_model(cfg, args.checkpoint)
    tasks = parse_tasks(model, args.tasks)
    fields = input_fields(model, tasks, config_fields(cfg))
    run_dir = run_directory(args.checkpoint)
    trained = checkpoint_vocabularies(checkpoint_file(args.checkpoint))
    example = example_batch(cfg, fields, run_dir=run_dir, fingerprints=trained)
    sequences, preprocessing = export_declarations(cfg, fields)
    path = model.export(
        args.out,
        tasks,
        fmt,
        example,
        vocabularies=vocabulary_files(cfg, run_dir, fields),
        preprocessing=preprocessing,
        sequences=sequences,
    )
    summary = {"program": str(path), "sidecar": str(sidecar_path(path)), "format": fmt}
    summary["tasks"] = tasks
    if not args.no_check:
        summary["max_abs_error"] = max_export_error(model, path, example)
    print(json.dumps(summary, indent=2))
    return 0


def checkpoint_file(path: str | Path) -> Path:
    """The file ``--checkpoint`` names: a run directory's ``best.pt``, else ``last.pt``, or the
    file itself.

    Raises:
        CheckpointError: Nothing there.
    """
    from mtlgraph.exceptions import CheckpointError
    from mtlgraph.training.checkpoint import BEST, LAST, resolve_checkpoint

    try:
        return resolve_checkpoint(path, (BEST, LAST))
    except CheckpointError as e:
        e.add_note(f"given as --checkpoint {path}")
        raise


def load_model(cfg: ExperimentConfig, checkpoint: str | Path) -> MultitaskClassifier:
    """The config's model with the checkpoint's weights (another model's: ``CheckpointError``)."""
    from mtlgraph.experiment.build import build_model

    model = build_model(cfg)
    model.load(checkpoint_file(checkpoint))
    model.eval()
    return model


def labelled_tasks(cfg: ExperimentConfig, model: MultitaskClassifier, data: str) -> list[str]:
    """``predict``'s default tasks: for ``--data NAME[:SPLIT]`` those whose input fields that
    dataset declares; else every task."""
    name = str(data).split(":", 1)[0]
    dataset = cfg.data.datasets.get(name)
    if dataset is None or Path(data).exists():
        return model.task_names
    from mtlgraph.inference.export import input_fields

    have = set(dataset.fields)
    fits = [t for t in model.task_names if set(input_fields(model, [t], sorted(have))) <= have]
    return fits or model.task_names


def parse_tasks(model: MultitaskClassifier, text: str | None) -> list[str]:
    """``a,b`` -> task names (``None``: every task); unknown names get a did-you-mean, and a
    ``--tasks`` that names none (``","``, ``""``) is refused rather than predicting nothing."""
    from mtlgraph.exceptions import ConfigError
    from mtlgraph.graph.task import unknown_tasks_error

    if text is None:
        return model.task_names
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError(
            [
                f"--tasks {text!r} names no task; give comma-separated task names (the model "
                f"has {', '.join(model.task_names)}), or leave --tasks out for every task"
            ]
        )
    unknown = [t for t in names if t not in model.tasks]
    if unknown:
        raise unknown_tasks_error(unknown, model.tasks)
    return list(dict.fromkeys(names))


def config_fields(cfg: ExperimentConfig) -> list[str]:
    """Every input field the config's datasets declare."""
    return list(dict.fromkeys(f for ds in cfg.data.datasets.values() for f in ds.fields))


def example_batch(
    cfg: ExperimentConfig,
    fields: Sequence[str],
    rows: int = 8,
    run_dir: Path | None = None,
    fingerprints: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The first ``rows`` rows of each field, from the config's datasets (to trace an export);
    a padded text field's ``<field>_mask`` comes with the field."""
    from mtlgraph.data.collate import MASK_SUFFIX
    from mtlgraph.experiment.predict import chunk_batch, read_config_dataset

    def column(f: str) -> str:  # the field a dataset declares: a mask's text field
        return f.removesuffix(MASK_SUFFIX) if f.endswith(MASK_SUFFIX) else f

    example: dict[str, Any] = {}
    for name, ds in cfg.data.datasets.items():
        wanted = [f for f in fields if column(f) in ds.fields and f not in example]
        if wanted:
            read = list(dict.fromkeys(column(f) for f in wanted))
            data = read_config_dataset(cfg, name, read, run_dir, fingerprints)
            X, _ = chunk_batch(next(iter(data.chunks(rows))))
            example.update({k: v for k, v in X.items() if k in wanted})
    n = min((len(v) for v in example.values()), default=0)
    return {f: v[:n] for f, v in example.items()}
