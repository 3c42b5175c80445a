"""The one atomic file writer, the one container walker and the one importer of optional extras.

Every file mtlgraph writes (model files, checkpoints, vocabularies, reports, scores, configs) goes
through :func:`atomic_write`: a temporary file in the target's directory, flushed and fsynced,
then ``os.replace``-d into place. A reader, or a run killed mid-write, sees either the old file or
the complete new one, never half of one. The temporary file is named
``.<name>.<pid>@<host>.<random>.tmp``: one left by a writer that was killed (SIGKILL, a power
cut) is removed by the next write to the same path, once no live process on this host owns it.
JSON files (scores, reports) go through
:func:`write_json`, which also turns non-finite floats into ``null``.
"""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
import pickle
import re
import socket
import tempfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from mtlgraph.exceptions import CheckpointError

EXTRAS = {
    "PIL": "images",
    "pyarrow": "tables",
    "onnx": "onnx",
    "onnxscript": "onnx",
    "onnxruntime": "onnx",
    "torchjd": "torchjd",
    "transformers": "hf",
    "tokenizers": "hf",
    "peft": "hf",
    "safetensors": "hf",
    "matplotlib": "report",
    "mlflow": "mlflow",
    "optuna": "sweep",
    "pandas": "snorkel",
}
"""Top-level modules of optional dependencies -> the mtlgraph extra that installs them."""


def import_extra(what: str, extra: str, *modules: str, needs: str = "") -> list[Any]:
    """The ``modules``, imported, or an ImportError naming the extra that provides them.

    The message reads ``"<what> needs <needs>: pip install 'mtlgraph[<extra>]'"``; ``needs``
    defaults to the first module's name.
    """
    try:
        return [importlib.import_module(m) for m in modules]
    except ImportError as e:
        raise ImportError(
            f"{what} needs {needs or modules[0]}: pip install 'mtlgraph[{extra}]'"
        ) from e


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(fh)`` on a temporary binary file, fsync it, then move it onto ``path``.

    Parent directories are created. On any error the temporary file is removed and the
    exception propagates unchanged; an existing file at ``path`` is left as it was.

    Example:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "out.txt"
        >>> atomic_write(target, lambda fh: fh.write(b"done")).read_text()
        'done'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}@{_HOST}.", suffix=".tmp", dir=target.parent
    )
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode(target))  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


_HOST = f"{zlib.crc32(socket.gethostname().encode()):08x}"
"""This host, in temporary names: a pid is checked only on the host that owns it (a shared
file system may hold other hosts' writers' files)."""


def remove_stale_temporaries(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left beside ``target`` when it was killed.

    Only files named as :func:`atomic_write` names them for this very target
    (``.<name>.<pid>@<host>.<random>.tmp``), written on this host, by a process that no longer
    runs, are removed; anything else (another target's, another host's, a live writer's, a
    file of another name) is left alone. A reused pid keeps a stale file until that process
    ends: safe, never wrong.

    Returns:
        The files removed.
    """
    t = Path(target)
    pattern = re.compile(
        rf"\.{re.escape(t.name)}\.(\d+)@{_HOST}\.[A-Za-z0-9_]+\.tmp", flags=re.ASCII
    )
    removed = []
    try:
        candidates = list(t.parent.glob(f".{glob.escape(t.name)}.*@{_HOST}.*.tmp"))
    except OSError:  # an unreadable directory: the write itself will say why
        return []
    for file in candidates:
        m = pattern.fullmatch(file.name)
        if m is None or _alive(int(m.group(1))):
            continue
        try:
            file.unlink()
        except OSError:  # another writer removed it first, or it is not ours to remove
            continue
        removed.append(file)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (ours, or another user's)."""
    if pid == os.getpid():
        return True  # another thread of this process may be writing the same target
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):
        return True  # exists, owned by another user (or unknowable): keep its file
    return True


def _file_mode(target: Path) -> int:
    """The mode a new file gets from ``open()`` (``0o666`` less the umask, read from
    ``/proc/self/status`` where it is), or the existing ``target``'s mode when it is replaced."""
    if target.exists():
        return target.stat().st_mode & 0o7777
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            umask = next(int(line.split()[1], 8) for line in fh if line.startswith("Umask:"))
    except (OSError, StopIteration):  # not Linux (or an old kernel): the common default
        umask = 0o022
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_write`)."""
    data = text.encode("utf-8")
    return atomic_write(path, lambda fh: fh.write(data))


def json_value(value: Any) -> Any:
    """A JSON-safe copy: non-finite floats become ``null`` (standard JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return value


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`atomic_write`).

    Non-finite floats become ``null``.
    """
    return atomic_write_text(path, json.dumps(json_value(obj), indent=2, sort_keys=True) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` with ``torch.save`` to ``path`` atomically (see :func:`atomic_write`)."""
    return atomic_write(path, lambda fh: torch.save(obj, fh))


def map_structure(fn: Callable[[Any], Any], value: Any) -> Any:
    """Apply ``fn`` to every leaf inside nested dicts, lists and tuples; containers are rebuilt.

    Named tuples keep their type. This is the one walker over nested containers: moving batches
    to a device, detaching outputs, selecting rows.

    Example:
        >>> map_structure(lambda x: x * 2, {"a": [1, (2, 3)]})
        {'a': [2, (4, 6)]}
    """
    if isinstance(value, dict):
        return {k: map_structure(fn, v) for k, v in value.items()}
    if isinstance(value, list):
        return [map_structure(fn, v) for v in value]
    if isinstance(value, tuple):
        items = [map_structure(fn, v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    return fn(value)


def tensor_leaves(value: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples, in order."""
    found: list[torch.Tensor] = []

    def visit(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        return leaf

    map_structure(visit, value)
    return found


def move_to_device(value: Any, device: torch.device) -> Any:
    """Move tensors inside dicts, lists and tuples to ``device``; other values are kept."""
    if isinstance(value, torch.Tensor):  # the common cases first: a batch field, a batch dict
        return value if value.device == device else value.to(device, non_blocking=True)
    if type(value) is dict and all(
        isinstance(v, torch.Tensor) and v.device == device for v in value.values()
    ):
        return dict(value)  # nothing to move (the step's hot path on one device)

    def move(leaf: Any) -> Any:
        if isinstance(leaf, torch.Tensor) and leaf.device != device:
            return leaf.to(device, non_blocking=True)
        return leaf

    return map_structure(move, value)


def load_weights_only(
    file: str | os.PathLike[str], map_location: str | torch.device = "cpu"
) -> Any:
    """``torch.load(file, weights_only=True)``: tensors and plain values load, code never runs.

    The one safe reader of the files mtlgraph writes with :func:`atomic_torch_save`.

    Raises:
        CheckpointError: A file holding a pickled Python object (refused), a torn or foreign
            file; the message names the file.
    """
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" not in str(e):  # not a pickle at all: text, another format
            raise CheckpointError(_unreadable(file)) from e
        raise CheckpointError(
            f"refusing to load checkpoint '{file}': it holds a pickled Python object, and "
            "mtlgraph loads checkpoints only with torch.load(weights_only=True) (tensors and "
            "plain values). Re-save it without objects, e.g. with state_dict()s."
        ) from e
    except Exception as e:  # torch's reasons ("pop from empty list", "[Errno 22]") say nothing
        raise CheckpointError(_unreadable(file)) from e


def _unreadable(file: str | os.PathLike[str]) -> str:
    try:
        size = f"{os.path.getsize(file)} bytes"
    except OSError:
        size = "size unknown"
    return (
        f"cannot read checkpoint '{file}': not an mtlgraph checkpoint, or a truncated or corrupt "
        f"file ({size}); it is not a file torch.save wrote"
    )
