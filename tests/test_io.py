"""Atomic writes (mtlgraph._io): outputs get the mode any new file gets, not mkstemp's 0600."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtlgraph._io import atomic_write_text, write_json


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
