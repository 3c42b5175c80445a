"""Run directories of ``mtlgraph train``: a new one per run (timestamped, or a fixed
``trainer.run_dir`` that holds no run yet), one process at a time (:class:`RunLock`), and
nothing left behind by a run refused at set-up (:class:`RunDirectory`). Rules: docs/cli.md.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import os
import shutil
import socket
from pathlib import Path

from mtlgraph.exceptions import MtlGraphError
from mtlgraph.experiment.runs import (
    CONFIG_FILE,
    METRICS_FILE,
    MLFLOW_RUN_FILE,
    REPORT_FILE,
    SCORES_FILE,
)

LOCK_FILE = ".mtlgraph.lock"
"""The lock file a ``train`` holds in its run directory (it names the holder's pid)."""

RUN_FILES = (
    CONFIG_FILE,
    SCORES_FILE,
    METRICS_FILE,
    REPORT_FILE,
    MLFLOW_RUN_FILE,
    "diagnostics.json",
    "diagnostics.txt",
)
RUN_DIRS = ("checkpoints", "vocab")
RUN_GLOBS = ("events.out.tfevents.*", "evaluation-*.json")
"""What a run writes into its directory: files, folders, and file-name patterns (TensorBoard
events, ``mtlgraph evaluate`` results). ``--overwrite`` deletes exactly these."""


class RunDirError(MtlGraphError):
    """A run directory cannot be used (exit status 2): in use, or it holds another run."""


def new_run_dir(root: str | Path, experiment: str, now: datetime.datetime | None = None) -> Path:
    """Create ``<root>/<experiment>/<YYYYmmdd-HHMMSS>`` (``-1``, ``-2``... if taken; the
    experiment name made file-name safe).

    Example:
        >>> import tempfile
        >>> root = tempfile.mkdtemp()
        >>> when = datetime.datetime(2025, 1, 2, 3, 4, 5)
        >>> new_run_dir(root, "a/b", when).name, new_run_dir(root, "a/b", when).name
        ('20250102-030405', '20250102-030405-1')
    """
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
    raise RunDirError(f"cannot create a new run directory under '{parent}'")


def run_files(run_dir: Path) -> list[Path]:
    """The files and folders of a run in ``run_dir`` (:data:`RUN_FILES`, ...), sorted."""
    found = [run_dir / n for n in (*RUN_FILES, *RUN_DIRS) if (run_dir / n).exists()]
    found += [p for pattern in RUN_GLOBS for p in run_dir.glob(pattern)]
    return sorted(found)


def clear_run(run_dir: Path) -> None:
    """Delete what a run wrote into ``run_dir`` (:func:`run_files`); other files stay."""
    for path in run_files(run_dir):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def refuse_used(run_dir: Path, config: str) -> None:
    """Refuse a new run into a directory that holds a run.

    Raises:
        RunDirError: Naming what is there, ``--resume`` and ``--overwrite``.
    """
    found = run_files(run_dir)
    if not found:
        return
    names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found[:4])
    more = f" and {len(found) - 4} more" if len(found) > 4 else ""
    raise RunDirError(
        f"run directory '{run_dir}' already holds a run ({names}{more}): continue it with "
        f"'mtlgraph train {config} --resume {run_dir}', or start afresh with --overwrite "
        "(deletes its checkpoints, metrics, events and vocabularies), or set another "
        "trainer.run_dir"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """An exclusive lock on a run directory for the life of a ``train``: the file
    :data:`LOCK_FILE`, holding ``pid host``, locked with ``flock`` where there is one (a
    killed holder's lock is then free: the kernel drops it), else by the holder's pid being
    alive. A stale lock file is taken over; the file is removed on release.

    Args:
        run_dir: The directory (it must exist).

    Example:
        >>> import tempfile
        >>> from mtlgraph.experiment.run_dir import RunLock, RunDirError
        >>> run = Path(tempfile.mkdtemp())
        >>> with RunLock(run):
        ...     try:
        ...         RunLock(run).acquire()
        ...     except RunDirError as e:
        ...         print(str(e).split(":")[0])  # doctest: +ELLIPSIS
        run directory '...' is in use by process ...
        >>> (run / LOCK_FILE).exists()
        False
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, or raise.

        Raises:
            RunDirError: Another live process holds it (named by its pid).
        """
        for _ in range(10):  # the file may be replaced under us: try again
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._locked(fd):
                    holder = self._holder()
                    raise RunDirError(self._in_use(holder))
                if os.fstat(fd).st_ino != os.stat(self.path).st_ino:
                    raise FileNotFoundError  # released and removed meanwhile
            except FileNotFoundError:
                os.close(fd)
                continue
            except BaseException:
                os.close(fd)
                raise
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            os.fsync(fd)
            self._fd = fd
            return
        raise RunDirError(f"cannot lock run directory '{self.run_dir}' ({self.path})")

    def _locked(self, fd: int) -> bool:
        """Lock ``fd`` without waiting; ``False`` when another process holds it."""
        try:
            import fcntl
        except ImportError:  # no flock: the recorded holder's pid decides
            holder = self._holder()
            return holder is None or holder[0] == os.getpid() or not _alive(holder[0])
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True

    def _holder(self) -> tuple[int, str] | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid, host = self.path.read_text().split()[:2]
            return int(pid), host
        return None

    def _in_use(self, holder: tuple[int, str] | None) -> str:
        who = f"process {holder[0]} on {holder[1]}" if holder else "another process"
        return (
            f"run directory '{self.run_dir}' is in use by {who} (its lock file {self.path}): "
            "one train or --resume at a time; wait for it to finish or stop it (Ctrl-C writes "
            "a checkpoint), then resume"
        )

    def release(self) -> None:
        """Remove the lock file and unlock (nothing when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


class RunDirectory:
    """The run directory of one ``train``: locked for the run's life; when set-up fails,
    whatever set-up wrote is removed (the directory too when this run made it).

    Args:
        path: The directory.
        created: Whether this run made it (a timestamped one, or a new fixed one).
    """

    def __init__(self, path: Path, created: bool) -> None:
        self.path, self.created = path, created
        self.lock = RunLock(path)

    @classmethod
    def fixed(cls, path: Path) -> RunDirectory:
        """A given directory, made when missing (with its parents).

        Raises:
            RunDirError: ``path`` is a file.
        """
        above = path
        while not above.exists() and above != above.parent:
            above = above.parent  # the nearest existing path: a file there blocks mkdir
        if not above.is_dir():
            what = "a file" if above == path else f"under a file ('{above}')"
            raise RunDirError(
                f"run directory '{path}' is {what}, not a directory: set trainer.run_dir to a "
                "directory (it is made when missing)"
            )
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        return cls(path, created)

    def roll_back(self) -> None:
        """Undo set-up: delete the run files written (the directory when this run made it),
        then release the lock."""
        try:
            if self.created:
                shutil.rmtree(self.path, ignore_errors=True)
                with contextlib.suppress(OSError):  # the experiment folder, when now empty
                    self.path.parent.rmdir()
            else:
                clear_run(self.path)
        finally:
            self.lock.release()
