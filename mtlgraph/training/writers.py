"""Log writers: where the Trainer's evaluation records go besides ``Trainer.history``.

The run's ``writers`` hook (:class:`~mtlgraph.training.hooks.LogWriters`) calls
:meth:`Writer.write` with every history record and :meth:`Writer.close` once at the end of
``fit``. Built in: ``jsonl`` (``metrics.jsonl``), ``tensorboard`` and ``mlflow``; named writers
live in :data:`WRITERS`, and a factory takes a :class:`WriterContext`. See ``docs/training.md``.
"""

from __future__ import annotations

import json
import logging
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtlgraph._io import atomic_write_text, json_value
from mtlgraph.exceptions import ConfigError
from mtlgraph.metrics import SEP
from mtlgraph.registry import Registry

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
"""Name of the JSON-lines log in a run directory."""


class Writer(ABC):
    """Receives every evaluation record of a training run.

    Example:
        >>> from mtlgraph import Trainer
        >>> from mtlgraph.training.writers import Writer
        >>> class PrintLoss(Writer):
        ...     def write(self, record):
        ...         print(record["step"], round(record["model/all/train/loss"], 1))
        >>> trainer = Trainer(writers=[PrintLoss()], progress_bar=False)
    """

    @abstractmethod
    def write(self, record: Mapping[str, float]) -> None:
        """Handle one record: ``"epoch"``, ``"step"`` and ``task/dataset/split/metric`` keys."""

    def close(self, final: Mapping[str, float] | None = None) -> None:  # noqa: B027
        """Flush and release resources. ``final`` is the last record when training succeeded."""


@dataclass(frozen=True)
class WriterContext:
    """What a built-in writer needs to open its files.

    Attributes:
        run_dir: The run directory.
        resume_step: Global step of the checkpoint a run resumes from; ``None`` for a fresh run.
        hparams: The flattened config (``{"trainer.lr": 0.02, ...}``) for TensorBoard's hparams.
    """

    run_dir: Path
    resume_step: int | None = None
    hparams: Mapping[str, Any] = field(default_factory=dict)


def safe_filename(name: str) -> str:
    """A key or experiment name as one file-name component (unsafe characters become ``_``).

    Example:
        >>> safe_filename("circle_task/circleDataset/valid/accuracy")
        'circle_task_circleDataset_valid_accuracy'
    """
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name).strip(".") or "_"


class JsonlWriter(Writer):
    """Appends each record as one JSON object per line to ``path`` (flushed every line).

    Non-finite values are written as ``null``. With ``resume_step``, lines of later steps are
    dropped first; without it, an existing file is replaced (both atomically).

    Example:
        >>> import json, tempfile, pathlib
        >>> from mtlgraph.training.writers import JsonlWriter
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "metrics.jsonl"
        >>> w = JsonlWriter(path)
        >>> w.write({"epoch": 1.0, "step": 10.0, "model/all/train/loss": 0.5}); w.close()
        >>> json.loads(path.read_text())["model/all/train/loss"]
        0.5
    """

    def __init__(self, path: str | Path, resume_step: int | None = None) -> None:
        self.path = Path(path)
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            steps = [(line, _step_of(line)) for line in lines]
            kept = [line for line, step in steps if step is not None and step <= resume_step]
        elif self.path.exists():
            logger.warning("%s already exists: a new run replaces it", self.path)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))
        self._fh = self.path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, float]) -> None:
        self._fh.write(json.dumps(json_value(dict(record))) + "\n")  # one whole line per write
        self._fh.flush()

    def close(self, final: Mapping[str, float] | None = None) -> None:
        if not self._fh.closed:
            self._fh.close()


class TensorBoardWriter(Writer):
    """TensorBoard event files in ``log_dir``: every flat key as a scalar at the record's step.

    At a successful end, ``add_hparams`` records the flattened config next to the final scores
    (as ``hparams/<key>``) in the same run. With ``resume_step``, later events are purged; a new
    run in a directory with events purges all of them.
    """

    def __init__(
        self,
        log_dir: str | Path,
        hparams: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imported only when used (slow)

        purge = None if resume_step is None else resume_step + 1
        if resume_step is None and any(Path(log_dir).glob("events.out.tfevents.*")):
            purge = 0  # a new run in a used directory: hide the old run's points
        self._writer = SummaryWriter(str(log_dir), purge_step=purge)
        self.hparams = dict(hparams or {})

    def write(self, record: Mapping[str, float]) -> None:
        step = int(record.get("step", 0))
        for key, value in record.items():
            if SEP in key:  # a flat score key, not "epoch" or "step"
                self._writer.add_scalar(key, value, global_step=step)

    def close(self, final: Mapping[str, float] | None = None) -> None:
        if final is not None and self.hparams:
            metrics = {
                f"hparams/{k}": float(v)
                for k, v in final.items()
                if SEP in k and math.isfinite(float(v))
            }
            self._writer.add_hparams(hparam_values(self.hparams), metrics, run_name=".")
        self._writer.close()


MLFLOW_RUN_FILE = "mlflow.json"
"""Where the ``mlflow`` writer notes its tracking URI and run id in the run directory."""


class MlflowWriter(Writer):
    """An MLflow run: the flattened config as parameters, every flat key as a metric at the
    record's step, and at the end the run directory's ``config.yaml``, ``metrics.jsonl`` and
    ``diagnostics.json`` as artifacts (``mtlgraph report`` adds ``scores.json`` and the report).

    The tracking store is MLflow's own setting (``MLFLOW_TRACKING_URI``, e.g.
    ``sqlite:///mlflow.db`` or ``file:./mlruns``) unless ``tracking_uri`` is given; the MLflow
    experiment is the config's ``experiment``. A resumed run continues the same MLflow run
    (its id is kept in ``RUN_DIR/mlflow.json``). No global MLflow state is touched: everything
    goes through an ``MlflowClient``.
    """

    def __init__(
        self,
        run_dir: str | Path,
        hparams: Mapping[str, Any] | None = None,
        resume_step: int | None = None,
        tracking_uri: str | None = None,
    ) -> None:
        from mtlgraph._io import import_extra

        (tracking,) = import_extra("the mlflow writer", "mlflow", "mlflow.tracking")
        self.run_dir = Path(run_dir)
        hparams = dict(hparams or {})
        self.client = tracking.MlflowClient(tracking_uri)
        noted = self.run_dir / MLFLOW_RUN_FILE
        if resume_step is not None and noted.is_file():
            self.run_id = str(json.loads(noted.read_text())["run_id"])
            return
        name = str(hparams.get("experiment") or "mtlgraph")
        found = self.client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else self.client.create_experiment(name)
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name)
        self.run_id = run.info.run_id
        atomic_write_text(
            noted,
            json.dumps({"tracking_uri": self.client.tracking_uri, "run_id": self.run_id}) + "\n",
        )
        from mlflow.entities import Param

        params = [Param(k, _param_text(v)) for k, v in sorted(hparams.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def write(self, record: Mapping[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        step, now = int(record.get("step", 0)), int(time.time() * 1000)
        metrics = [Metric(k, float(v), now, step) for k, v in record.items() if SEP in k]
        for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])

    def close(self, final: Mapping[str, float] | None = None) -> None:
        files = ["config.yaml", METRICS_FILE, "diagnostics.json"]
        for name in files:
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, "FINISHED" if final is not None else "FAILED")


def _param_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(json_value(value))
    return text[:6000]  # MLflow's limit on a parameter's value


def attach_mlflow_artifacts(run_dir: str | Path, files: Sequence[str | Path]) -> None:
    """Log ``files`` as artifacts of the MLflow run the ``mlflow`` writer made for ``run_dir``
    (``scores.json`` too when it exists)."""
    from mtlgraph._io import import_extra

    (tracking,) = import_extra("the mlflow writer", "mlflow", "mlflow.tracking")
    noted = json.loads((Path(run_dir) / MLFLOW_RUN_FILE).read_text())
    client = tracking.MlflowClient(noted["tracking_uri"])
    scores = Path(run_dir) / "scores.json"
    for path in [*([scores] if scores.is_file() else []), *map(Path, files)]:
        client.log_artifact(noted["run_id"], str(path))


def hparam_values(flat: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """TensorBoard-acceptable hparams: numbers, strings and booleans kept, the rest as text."""
    keep = (bool, int, float, str)
    return {k: v if isinstance(v, keep) else json.dumps(json_value(v)) for k, v in flat.items()}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings into dotted keys; lists and scalars are leaves.

    Example:
        >>> flatten({"trainer": {"lr": 0.1, "optimizer": {"name": "adam"}}, "seed": 0})
        {'trainer.lr': 0.1, 'trainer.optimizer.name': 'adam', 'seed': 0}
    """
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


WriterFactory = Callable[[WriterContext], Writer]
"""Builds a named writer from the run's :class:`WriterContext`."""


def _jsonl(ctx: WriterContext) -> Writer:
    return JsonlWriter(ctx.run_dir / METRICS_FILE, ctx.resume_step)


def _tensorboard(ctx: WriterContext) -> Writer:
    return TensorBoardWriter(ctx.run_dir, ctx.hparams, ctx.resume_step)


def _mlflow(ctx: WriterContext) -> Writer:
    return MlflowWriter(ctx.run_dir, ctx.hparams, ctx.resume_step)


WRITERS: Registry[WriterFactory] = Registry(
    "writer", {"jsonl": _jsonl, "tensorboard": _tensorboard, "mlflow": _mlflow}, base=Writer
)
"""Writers by name (``TrainerConfig.writers``); ``WRITERS.register(name, factory)`` adds one."""

DEFAULT_WRITERS = ("jsonl", "tensorboard")
"""Writers used when ``run_dir`` is set and ``writers`` is left at ``None``."""


def open_writers(specs: Sequence[str | Writer] | None, ctx: WriterContext | None) -> list[Writer]:
    """Instantiate the configured writers: names need a context (a run directory), objects are
    used as given; ``None`` means :data:`DEFAULT_WRITERS` with a run directory, none without.

    Raises:
        ConfigError: A named writer without a run directory, or an unknown name.
    """
    if specs is None:
        specs = list(DEFAULT_WRITERS) if ctx is not None else []
    out: list[Writer] = []
    for spec in specs:
        if isinstance(spec, Writer):
            out.append(spec)
        elif ctx is None:
            raise ConfigError([f"writer '{spec}' needs a run directory (set run_dir)"])
        else:
            out.append(WRITERS.build(spec, "writers", ctx=ctx))
    return out


def _step_of(line: str) -> float | None:
    """The ``step`` of one JSON line; ``None`` for a blank or torn line (a killed run's last)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return float(record.get("step", 0)) if isinstance(record, dict) else None
