"""Log writers: where the Trainer's evaluation records go besides ``Trainer.history``.

The Trainer calls :meth:`Writer.write` with every history record (``{"epoch", "step",
"task/dataset/split/metric": value, ...}``) and :meth:`Writer.close` once at the end of ``fit``.
With no writer configured nothing is called, so the default loop pays nothing.

Built in (``TrainerConfig.writers``, both on by default when ``run_dir`` is set):

- ``jsonl``: ``<run_dir>/metrics.jsonl``, one JSON object per evaluation;
- ``tensorboard``: TensorBoard event files in ``<run_dir>``: one ``add_scalar`` per flat key at the
  record's step, and at the end ``add_hparams(..., run_name=".")`` with the flattened config in the
  same run.

On resume both drop what was logged after the checkpoint's step, so the logs of an interrupted and
resumed run read like those of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
        """Handle one record: ``"epoch"``, ``"step"`` and flat ``task/dataset/split/metric``
        keys."""

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
    """Turn a key or experiment name into one file-name component (``/`` and unsafe characters
    become ``_``).

    Example:
        >>> safe_filename("circle_task/circleDataset/valid/accuracy")
        'circle_task_circleDataset_valid_accuracy'
    """
    out = re.sub(r"[^A-Za-z0-9._=+-]", "_", name).strip(".")
    return out or "_"


def json_value(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats become ``null`` (standard JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


class JsonlWriter(Writer):
    """Appends each record as one JSON object per line to ``path`` (flushed every line).

    Non-finite values are written as ``null``. With ``resume_step``, lines of steps after it
    (logged after the checkpoint an interrupted run resumes from) are dropped first; without
    it, an existing file is replaced (one run per file).

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and self.path.exists():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
        elif self.path.exists():
            logger.warning("%s already exists: a new run replaces it", self.path)
        self.path.write_text("".join(f"{line}\n" for line in kept))
        self._fh = self.path.open("a")

    def write(self, record: Mapping[str, float]) -> None:
        self._fh.write(json.dumps(json_value(dict(record))) + "\n")
        self._fh.flush()

    def close(self, final: Mapping[str, float] | None = None) -> None:
        if not self._fh.closed:
            self._fh.close()


class TensorBoardWriter(Writer):
    """TensorBoard event files in ``log_dir``: every flat key as a scalar at the record's step.

    At a successful end, ``add_hparams(hparams, {"hparams/<key>": final value}, run_name=".")``
    records the flattened config next to the final scores, in the same run (the ``hparams/``
    prefix keeps those points apart from the per-step curves). With ``resume_step``, events after
    that step are purged (TensorBoard's ``purge_step``); a new run in a directory that already
    has events purges all of them.
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
            if "/" in key:
                self._writer.add_scalar(key, value, global_step=step)

    def close(self, final: Mapping[str, float] | None = None) -> None:
        if final is not None and self.hparams:
            metrics = {
                f"hparams/{k}": float(v)
                for k, v in final.items()
                if "/" in k and math.isfinite(float(v))
            }
            self._writer.add_hparams(hparam_values(self.hparams), metrics, run_name=".")
        self._writer.close()


def hparam_values(flat: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """TensorBoard-acceptable hparams: numbers, strings and booleans kept, the rest as text."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in flat.items():
        out[k] = v if isinstance(v, (bool, int, float, str)) else json.dumps(json_value(v))
    return out


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


WRITERS: dict[str, Callable[[WriterContext], Writer]] = {
    "jsonl": lambda ctx: JsonlWriter(ctx.run_dir / METRICS_FILE, ctx.resume_step),
    "tensorboard": lambda ctx: TensorBoardWriter(ctx.run_dir, ctx.hparams, ctx.resume_step),
}
"""Built-in writers by name (``TrainerConfig.writers``)."""

DEFAULT_WRITERS = ("jsonl", "tensorboard")
"""Writers used when ``run_dir`` is set and ``writers`` is left at ``None``."""


def open_writers(specs: Sequence[str | Writer] | None, ctx: WriterContext | None) -> list[Writer]:
    """Instantiate the configured writers: names need a context (a run directory), objects are
    used as given; ``None`` means :data:`DEFAULT_WRITERS` with a run directory, none without."""
    if specs is None:
        specs = list(DEFAULT_WRITERS) if ctx is not None else []
    out: list[Writer] = []
    for spec in specs:
        if isinstance(spec, Writer):
            out.append(spec)
        elif ctx is None:
            raise ValueError(f"writer '{spec}' needs a run directory (set run_dir)")
        else:
            out.append(WRITERS[spec](ctx))
    return out


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (temporary file, then ``os.replace``).

    Non-finite floats become ``null``.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(json.dumps(json_value(obj), indent=2, sort_keys=True) + "\n")
    os.replace(tmp, target)
    return target
