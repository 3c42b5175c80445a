"""Atomic writes (mtlgraph._io): outputs get the mode any new file gets, not mkstemp's 0600."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mtlgraph import _io
from mtlgraph._io import atomic_write, atomic_write_text, remove_stale_temporaries, write_json


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_a_new_file_gets_the_umask_mode_and_a_replaced_file_keeps_its_mode(
    tmp_path: Path,
) -> None:
    old = os.umask(0o027)
    try:
        made = write_json(tmp_path / "scores.json", {"a": 1.0})
        assert made.stat().st_mode & 0o777 == 0o640  # 0666 less the umask, like open()
    finally:
        os.umask(old)
    kept = tmp_path / "private.txt"
    kept.write_text("x")
    kept.chmod(0o600)
    atomic_write_text(kept, "y")
    assert kept.read_text() == "y" and kept.stat().st_mode & 0o777 == 0o600


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_killed_writers_temporary_is_removed_by_the_next_write_and_nothing_else(
    tmp_path: Path,
) -> None:
    target = tmp_path / "p[1].jsonl"  # glob characters in the name are taken literally
    target.write_text("old")
    host = _io._HOST
    dead, live = _dead_pid(), os.getppid()
    stale = tmp_path / f".{target.name}.{dead}@{host}.abc_12.tmp"
    kept = [
        tmp_path / f".{target.name}.{live}@{host}.abc_12.tmp",  # a live writer's
        tmp_path / f".{target.name}.{dead}@0badc0de.abc_12.tmp",  # another host's
        tmp_path / f".other.jsonl.{dead}@{host}.abc_12.tmp",  # another target's
        tmp_path / f".{target.name}.abc_12.tmp",  # not named by atomic_write
        tmp_path / f"{target.name}.{dead}@{host}.abc_12.tmp",  # not hidden: not ours
    ]
    for f in [stale, *kept]:
        f.write_text("half")
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and not stale.exists()
    assert all(f.read_text() == "half" for f in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [target.name, *(f.name for f in kept)]
    )


def test_the_temporary_name_carries_the_writers_pid(tmp_path: Path) -> None:
    seen: list[str] = []

    def write(fh: Any) -> None:
        seen.extend(p.name for p in tmp_path.iterdir())
        fh.write(b"x")

    atomic_write(tmp_path / "a.txt", write)
    assert len(seen) == 1 and seen[0].startswith(f".a.txt.{os.getpid()}@{_io._HOST}.")
    assert remove_stale_temporaries(tmp_path / "a.txt") == []
