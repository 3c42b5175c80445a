"""`torchrun` launches: the CLI and a user script calling Trainer.fit, on 2 CPU ranks (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    env["OMP_NUM_THREADS"] = "1"
    return env


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_port()}",
        *args,
    ]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.timeout(320)
def test_torchrun_cli_train(tmp_path: Path) -> None:
    result = _torchrun(
        "-m",
        "mtlgraph",
        "train",
        str(ROOT / "configs" / "quickstart.yaml"),
        "trainer.n_epochs=2",
        "--quiet",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs" / "quickstart").iterdir())
    assert len(runs) == 1  # one run directory, chosen by rank 0 for both ranks
    scores = json.loads((runs[0] / "scores.json").read_text())
    assert scores["square_task/squareDataset/test/accuracy"] > 0.6
    printed = [line for line in result.stdout.splitlines() if '"circle_task/' in line]
    assert len(printed) == 3  # rank 0 alone printed the score dictionary
    lines = (runs[0] / "metrics.jsonl").read_text().splitlines()
    # 800 rows a dataset: 400 a rank, 13 batches of 32, 3 datasets: 39 steps an epoch
    assert [json.loads(x)["step"] for x in lines] == [39, 78]


SCRIPT = """
    import json, os, sys, torch
    from torch import nn
    from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer

    torch.manual_seed(int(os.environ["RANK"]))  # different weights per rank: DDP broadcasts
    trunk = nn.Linear(4, 8)
    tasks = [Task(t, {"trunk": trunk, f"{t}_h": nn.Linear(8, 2)},
                  [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_h", ["trunk"])])
             for t in ("a", "b")]
    model = MultitaskClassifier(tasks)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(101, 4, generator=g)
    loaders = [DictDataLoader(DictDataset(t, "train", {"x": x}, {t: (x[:, i] > 0).long()}),
                              batch_size=10, shuffle=True) for i, t in enumerate(("a", "b"))]
    trainer = Trainer(n_epochs=3, lr=0.05, progress_bar=False, batch_scheduler="mixed")
    trainer.fit(model, loaders)
    total = sum(float(p.double().sum()) for p in model.parameters())
    row = {"rank": int(os.environ["RANK"]), "checksum": total, "steps": trainer.global_step}
    # one write per line: both ranks share torchrun's stdout, and print() writes the text and
    # its newline separately, so two ranks' lines could interleave
    sys.stdout.write(json.dumps(row) + "\\n")
    sys.stdout.flush()
"""


@pytest.mark.slow
@pytest.mark.timeout(320)
def test_torchrun_user_script(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent(SCRIPT))
    result = _torchrun(str(script), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    assert rows[0]["checksum"] == rows[1]["checksum"]  # identical weights on both ranks
    assert rows[0]["steps"] == rows[1]["steps"] == 3 * 6  # ceil(ceil(101 / 2) / 10) a loader
