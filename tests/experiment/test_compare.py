"""``mtlgraph compare``: seeds grouped as mean ± std, Δm% against baselines (checked by hand),
best values marked, Markdown, CSV and HTML output."""

from __future__ import annotations

import copy
import csv
import io
import json
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml
from experiment_helpers import TINY

from mtlgraph.experiment.cli import main
from mtlgraph.experiment.compare import compare, delta_m, to_csv, to_markdown
from mtlgraph.experiment.runs import RunRecord


def fake_run(path: Path, scores: dict[str, float], **config: Any) -> Path:
    """A finished run directory: TINY's config (changed by ``config``) and ``scores``."""
    cfg = copy.deepcopy(TINY)
    for key, value in config.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "step": 10, **scores}) + "\n")
    (path / "scores.json").write_text(json.dumps(scores))
    return path


def two_task(c: float, s: float) -> dict[str, float]:
    return {"circle_task/circles/test/accuracy": c, "square_task/squares/test/accuracy": s}


@pytest.fixture
def runs(tmp_path: Path) -> dict[str, list[Path]]:
    """Two balancers × two seeds, and single-task baselines of two seeds."""
    out: dict[str, list[Path]] = {"sum": [], "mgda": [], "base": []}
    values = {"sum": [(0.9, 0.8), (0.8, 0.6)], "mgda": [(0.85, 0.75), (0.95, 0.85)]}
    for balancer, pairs in values.items():
        for seed, (c, s) in enumerate(pairs):
            out[balancer].append(
                fake_run(
                    tmp_path / f"{balancer}{seed}",
                    two_task(c, s),
                    seed=seed,
                    **{"trainer.balancer": balancer, "trainer.seed": seed},
                )
            )
    for seed, (c, s) in enumerate([(0.8, 0.7), (0.6, 0.5)]):
        tasks = {"circle_task": c, "square_task": s}
        for task, value in tasks.items():
            ds = "circles" if task == "circle_task" else "squares"
            cfg = copy.deepcopy(TINY)
            cfg["tasks"] = {task: cfg["tasks"][task]}
            run = tmp_path / f"base-{task}-{seed}"
            run.mkdir()
            (run / "config.yaml").write_text(yaml.safe_dump({**cfg, "seed": seed}))
            score = {f"{task}/{ds}/test/accuracy": value}
            (run / "metrics.jsonl").write_text(json.dumps(score) + "\n")
            (run / "scores.json").write_text(json.dumps(score))
            out["base"].append(run)
    return out


def load(paths: list[Path]) -> list[RunRecord]:
    return [RunRecord.load(p, need_scores=True) for p in paths]


def test_seeds_are_grouped_as_mean_and_std(runs: dict[str, list[Path]]) -> None:
    result = compare(load(runs["sum"] + runs["mgda"]))
    assert [g.label for g in result.groups] == ["trainer.balancer=sum", "trainer.balancer=mgda"]
    circle = next(t for t in result.tables if t.task == "circle_task")
    stat = circle.cells["trainer.balancer=sum"]["circles"]
    assert stat.mean == pytest.approx(0.85) and stat.n == 2
    assert stat.std == pytest.approx(statistics.stdev([0.9, 0.8]))
    assert circle.best["circles"] == "trainer.balancer=mgda"  # 0.9 > 0.85


def test_delta_m_by_hand(runs: dict[str, list[Path]]) -> None:
    result = compare(load(runs["sum"] + runs["mgda"]), load(runs["base"]))
    # baseline means: circle (0.8 + 0.6) / 2 = 0.7, square (0.7 + 0.5) / 2 = 0.6
    by_hand = {
        "trainer.balancer=sum": [
            100 * ((0.9 - 0.7) / 0.7 + (0.8 - 0.6) / 0.6) / 2,
            100 * ((0.8 - 0.7) / 0.7 + (0.6 - 0.6) / 0.6) / 2,
        ],
        "trainer.balancer=mgda": [
            100 * ((0.85 - 0.7) / 0.7 + (0.75 - 0.6) / 0.6) / 2,
            100 * ((0.95 - 0.7) / 0.7 + (0.85 - 0.6) / 0.6) / 2,
        ],
    }
    for label, values in by_hand.items():
        assert result.delta_m[label].mean == pytest.approx(statistics.fmean(values))
        assert result.delta_m[label].std == pytest.approx(statistics.stdev(values))
    text = to_markdown(result)
    mgda = statistics.fmean(by_hand["trainer.balancer=mgda"])
    assert f"| trainer.balancer=mgda | **{mgda:+.2f} ± " in text
    assert "| single-task baseline | 0.7 ± 0.14 |" in text


def test_delta_m_respects_lower_is_better() -> None:
    scores = {("a", "d", "acc"): 0.9, ("b", "d", "mse"): 0.5}
    base = {("a", "d", "acc"): 0.8, ("b", "d", "mse"): 0.4}
    value = delta_m(scores, base, {("a", "acc"): True, ("b", "mse"): False})
    assert value == pytest.approx(100 * ((0.9 - 0.8) / 0.8 - (0.5 - 0.4) / 0.4) / 2)


def test_csv_marks_the_best_row(runs: dict[str, list[Path]]) -> None:
    rows = list(csv.DictReader(io.StringIO(to_csv(compare(load(runs["sum"] + runs["mgda"]))))))
    best = [r for r in rows if r["task"] == "square_task" and r["best"] == "1"]
    assert [(r["run"], float(r["mean"])) for r in best] == [("trainer.balancer=mgda", 0.8)]


def test_compare_command_writes_html_and_a_plot(
    runs: dict[str, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("matplotlib")
    out, plot = tmp_path / "c.html", tmp_path / "c.png"
    pattern = str(runs["sum"][0].parent / "sum*")
    args = ["compare", pattern, str(runs["mgda"][0]), "--baseline", str(tmp_path / "base-*")]
    assert main([*args, "--out", str(out), "--plot", str(plot), "--quiet"]) == 0
    assert "<table>" in out.read_text() and "Δm%" in out.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<b>" in capsys.readouterr().out
