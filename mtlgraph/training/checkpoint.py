"""Checkpoints: atomic, ``weights_only``-loadable snapshots of a training run, and exact resume.

Written atomically (temporary file, ``os.replace``), read only with
``torch.load(weights_only=True)`` (a pickled object is refused with a
:class:`~mtlgraph.CheckpointError`). Contents (``version`` 3: one state dict per stateful piece
of the run, hook states under their names), older versions and exact resume:
``docs/checkpoints.md``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtlgraph._io import atomic_torch_save
from mtlgraph._suggest import did_you_mean
from mtlgraph.data.named import dataset_labels
from mtlgraph.exceptions import CheckpointError, ConfigError
from mtlgraph.graph.model_file import VERSION, read_checkpoint
from mtlgraph.graph.slices import SLICE_SEP
from mtlgraph.metrics import make_key

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
"""Sub-directory of a run directory that holds ``last.pt`` and ``best.pt``."""
LAST = "last.pt"
BEST = "best.pt"

_PLAIN = (str, int, float, bool, type(None))


# ---------------------------------------------------------------- files


def check_plain(value: Any, path: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming the first value ``weights_only`` could not load.

    Allowed: tensors, ``torch.Size``, ``str``/``int``/``float``/``bool``/``None`` (exact types:
    a numpy scalar is a ``float`` subclass but pickles as a numpy object), lists, tuples, dicts.
    """
    if type(value) in _PLAIN or isinstance(value, (torch.Tensor, torch.Size)):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_plain(v, f"{path}[{i}]")
        return
    if isinstance(value, dict):  # dict and OrderedDict (state dicts)
        for k, v in value.items():
            if type(k) not in _PLAIN:
                raise CheckpointError(f"{path} has a key of type {type(k).__name__}: {k!r}")
            check_plain(v, f"{path}.{k}")
        return
    raise CheckpointError(
        f"{path} is a {type(value).__module__}.{type(value).__qualname__}, which a weights_only "
        "load refuses; store tensors and plain values (cast numpy scalars with float())"
    )


def save_checkpoint(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Check that ``state`` holds only tensors and plain values, then write it atomically.

    Raises:
        CheckpointError: A value a ``weights_only`` load would refuse (named by its path).
    """
    check_plain(dict(state))
    return atomic_torch_save(dict(state), path)


def resolve_checkpoint(path: str | os.PathLike[str], names: Sequence[str] = (LAST,)) -> Path:
    """A file itself, or in a run directory the first of ``checkpoints/<name>``, ``<name>`` per
    ``names``.

    Raises:
        CheckpointError: Nothing there, naming the path and every file looked for.

    Example:
        >>> import tempfile, pathlib
        >>> run = pathlib.Path(tempfile.mkdtemp())
        >>> (run / "checkpoints").mkdir()
        >>> _ = (run / "checkpoints" / "last.pt").write_bytes(b"")
        >>> resolve_checkpoint(run, (BEST, LAST)).relative_to(run).as_posix()
        'checkpoints/last.pt'
    """
    p = Path(path)
    if p.is_dir():
        candidates = [c for name in names for c in (p / CHECKPOINT_DIR / name, p / name)]
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        looked = ", ".join(str(c) for c in candidates)
        raise CheckpointError(
            f"no checkpoint in directory '{p}': looked for {looked} (checkpoints are written "
            "when run_dir is set; see checkpoint_every)"
        )
    if not p.is_file():
        raise CheckpointError(
            f"checkpoint '{p}' does not exist: it is neither a checkpoint or model file nor a "
            "run directory"
        )
    return p


def run_directory(path: str | os.PathLike[str]) -> Path:
    """The run directory of a checkpoint file (or the directory itself)."""
    p = Path(path)
    if p.is_dir():
        return p
    return p.parent.parent if p.parent.name == CHECKPOINT_DIR else p.parent


def load_checkpoint(
    path: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> dict[str, Any]:
    """Load a checkpoint (a file, or a run directory's ``checkpoints/last.pt``), weights only.

    Raises:
        CheckpointError: Missing, pickled, torn or foreign file, or a newer format version.

    Example:
        >>> import tempfile, pathlib
        >>> from mtlgraph.graph.model_file import FORMAT
        >>> from mtlgraph.training.checkpoint import load_checkpoint, save_checkpoint
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "last.pt"
        >>> _ = save_checkpoint({"format": FORMAT, "version": 1, "progress": {}}, path)
        >>> load_checkpoint(path)["format"]
        'mtlgraph.checkpoint'
    """
    return read_checkpoint(resolve_checkpoint(path), map_location)


# ---------------------------------------------------------------- random states


def get_rng_state() -> dict[str, Any]:
    """Every random state training may use: torch CPU and CUDA, python ``random``, numpy."""
    np_state = dict(np.random.get_state(legacy=False))
    key, pos = np_state["state"]["key"], np_state["state"]["pos"]
    np_state["state"] = {"key": [int(k) for k in key], "pos": int(pos)}
    np_state["has_gauss"], np_state["gauss"] = int(np_state["has_gauss"]), float(np_state["gauss"])
    cuda_on = torch.cuda.is_available() and torch.cuda.is_initialized()
    return {
        "torch": torch.random.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if cuda_on else [],
        "python": random.getstate(),
        "numpy": np_state,
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore states saved by :func:`get_rng_state` (CUDA ones for the devices present)."""
    torch.random.set_rng_state(state["torch"].cpu())
    cuda = list(state.get("cuda", []))
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s.cpu(), i)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {
        "key": np.asarray(np_state["state"]["key"], dtype=np.uint32),
        "pos": np_state["state"]["pos"],
    }
    np.random.set_state(np_state)


@contextlib.contextmanager
def global_rng_preserved(cuda_devices: Sequence[int] = ()) -> Iterator[None]:
    """Leave torch's (CPU and the given CUDA devices'), python's and numpy's global random
    states as they were on entry, whatever the body draws or sets."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(cuda_devices)):
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


# ---------------------------------------------------------------- resume


def check_resume(
    state: Mapping[str, Any], batch_counts: Sequence[int], world_size: int = 1
) -> None:
    """Refuse to resume a checkpoint whose run does not match this one.

    Raises:
        CheckpointError: A checkpoint of an older format, another number of processes, or
            other batch counts.
    """
    version = int(state.get("version", 0))
    if version != VERSION:
        raise CheckpointError(
            f"cannot resume: the checkpoint has format version {version}, written by an older "
            f"mtlgraph; this one resumes version {VERSION} (each hook's state saved on its own). "
            "Finish that run with the mtlgraph that wrote it, or start afresh (its weights still "
            "load with model.load and mtlgraph predict)"
        )
    progress = state["run"]["progress"]
    saved_world = int(progress.get("world_size", 1))
    if saved_world != world_size:
        raise CheckpointError(
            f"cannot resume: the checkpoint was written by a run of {saved_world} process(es), "
            f"this one has {world_size}; resume with the same torchrun --nproc_per_node/--nnodes"
        )
    if list(progress["batch_counts"]) != list(batch_counts):
        raise CheckpointError(
            f"cannot resume: the checkpoint's training loaders had {progress['batch_counts']} "
            f"batches, these have {list(batch_counts)}; resume with the data, batch sizes and "
            "train_split of the interrupted run"
        )


@contextlib.contextmanager
def all_or_nothing(model: Any, what: str) -> Iterator[None]:
    """Restore ``model``'s parameters and buffers when the body fails; a failure that is not a
    :class:`CheckpointError` becomes one, naming ``what``."""
    backup = {  # extra states (a pretrained encoder's path and fingerprint) are plain values
        k: v.detach().clone() if isinstance(v, torch.Tensor) else v
        for k, v in model.state_dict().items()
    }
    try:
        yield
    except Exception as e:
        model.load_state_dict(backup)
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{what} does not fit this run: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------- best-by-metric


def metric_keys(
    model: Any, train: Iterable[Any], evals: Iterable[Any], slices: Iterable[str] = ()
) -> dict[str, bool]:
    """Keys a training run logs that can select ``best.pt`` (slice keys too), each with
    ``higher_is_better``."""
    keys: dict[str, bool] = {make_key("model", "all", "train", "loss"): False}
    for dl in train:
        for label in dataset_labels(dl.dataset) or ():
            keys[make_key(label, dl.dataset.name, "train", "loss")] = False
    parts = ["", *(f"{SLICE_SEP}{name}" for name in slices)]
    for dl in evals:
        ds = dl.dataset
        for label in dataset_labels(ds) or ():
            task = model.tasks.get(label)
            if task is None:
                continue
            for m in task.scorer.metric_keys:
                for part in parts:
                    key = make_key(label, f"{ds.name}{part}", ds.split, m)
                    keys[key] = task.scorer.higher_is_better(m)
    return keys


def metric_mode(
    key: str, mode: str | None, keys: Mapping[str, bool], setting: str = "checkpoint_metric"
) -> str:
    """``"max"`` or ``"min"`` for the metric ``key`` of ``setting``: ``mode`` if given, else
    the metric's direction.

    Raises:
        ConfigError: The key is not logged by this run (with the closest key and the choices).
    """
    if key not in keys:
        hint = f"{did_you_mean(key, keys)}; it logs {', '.join(sorted(keys))}"
        raise ConfigError([f"{setting}: '{key}' is not a key this training logs{hint}"])
    return mode if mode is not None else ("max" if keys[key] else "min")


class Checkpointer:
    """Writes ``last.pt`` and ``best.pt``, and tracks the best value of a metric.

    Args:
        directory: Where the files go (``<run_dir>/checkpoints``).
        metric: Flat key selecting ``best.pt``, or ``None``.
        mode: ``"max"`` or ``"min"`` (required with ``metric``).
        write: Whether this process writes files (under DDP only rank 0 does).

    Example:
        >>> import tempfile, pathlib
        >>> from mtlgraph.training.checkpoint import Checkpointer
        >>> ck = Checkpointer(pathlib.Path(tempfile.mkdtemp()), metric="t/d/valid/acc", mode="max")
        >>> records = [{"t/d/valid/acc": v, "step": s} for s, v in [(1, 0.5), (2, 0.4), (3, 0.7)]]
        >>> [ck.improved(r) for r in records]
        [True, False, True]
        >>> ck.best_state()
        {'metric': 't/d/valid/acc', 'mode': 'max', 'value': 0.7, 'step': 3}
    """

    def __init__(
        self,
        directory: Path,
        metric: str | None = None,
        mode: str | None = None,
        write: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.write = write
        if write:
            self.directory.mkdir(parents=True, exist_ok=True)
            for tmp in self.directory.glob(".*.pt.*.tmp"):  # left behind by a killed writer
                tmp.unlink(missing_ok=True)
        self.metric, self.mode = metric, mode
        self.best_value: float | None = None
        self.best_step: int | None = None

    def save(self, which: str, state: Mapping[str, Any]) -> Path:
        """Write ``last.pt`` (``which="last"``) or ``best.pt`` (``"best"``)."""
        path = save_checkpoint(state, self.directory / (BEST if which == "best" else LAST))
        if which == "best":
            logger.info("new best %s = %.6g: %s", self.metric, self.best_value, path)
        else:
            logger.debug("checkpoint %s (step %s)", path, state["run"]["progress"]["global_step"])
        return path

    def improved(self, record: Mapping[str, float]) -> bool:
        """Whether ``record`` holds a better value of the metric (then it is remembered)."""
        if self.metric is None or self.metric not in record:
            return False
        value = float(record[self.metric])
        if math.isnan(value):
            return False
        best = self.best_value
        if best is not None and not (value > best if self.mode == "max" else value < best):
            return False
        self.best_value = value
        self.best_step = int(record.get("step", 0))
        return True

    def best_state(self) -> dict[str, Any]:
        """The best-by-metric bookkeeping as plain values."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "value": None if self.best_value is None else float(self.best_value),
            "step": self.best_step,
        }

    def load_best_state(self, state: Mapping[str, Any] | None) -> None:
        """Continue best-tracking from a checkpoint (when it tracked the same metric)."""
        if state and state.get("metric") == self.metric and state.get("value") is not None:
            self.best_value = float(state["value"])
            self.best_step = state.get("step")
