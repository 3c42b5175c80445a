"""``mtlgraph report``: the HTML has every section, embeds its figures, names no URL; the
graph picture, draw counts, gate usage and TensorBoard images."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from report_helpers import train_gated

from mtlgraph.experiment.cli import main
from mtlgraph.experiment.run_report import SECTIONS, build_run_experiment, gate_usage
from mtlgraph.experiment.runs import RunRecord

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def gated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_gated(tmp_path_factory.mktemp("gated"))


@pytest.fixture(scope="module")
def report_html(gated_run: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("report") / "r.html"
    assert main(["report", str(gated_run), "--out", str(out), "--quiet"]) == 0
    return out.read_text()


def section(page: str, sid: str) -> str:
    match = re.search(rf'<section id="{sid}">(.*?)</section>', page, re.S)
    assert match, f"no section {sid}"
    return match.group(1)


def test_every_section_is_present_in_order(report_html: str) -> None:
    found = re.findall(r'<section id="([^"]+)">', report_html)
    assert found == list(SECTIONS)


def test_figures_are_embedded_and_no_url_is_named(report_html: str) -> None:
    assert not re.search(r"https?://", report_html)
    assert not re.search(r'src="(?!data:image/png;base64,)', report_html)
    for sid in ("curves", "lr-weights", "draws", "diagnostics", "gates"):
        assert 'src="data:image/png;base64,' in section(report_html, sid), sid
    graph = section(report_html, "graph")
    assert "<svg" in graph and "shared: y0, y1" in graph  # the experts, drawn once, shared


def test_scores_table_and_best_checkpoint(report_html: str, gated_run: Path) -> None:
    run = RunRecord.load(gated_run)
    assert run.best is not None and run.best["metric"] == "y0/subsets/valid/accuracy"
    assert f"at step {run.best['step']}" in report_html
    scores = section(report_html, "scores")
    value = run.scores["y1/subsets/test/accuracy"]
    assert "<td>y1</td><td>subsets</td><td>(all)</td><td>accuracy</td>" in scores
    assert f"{value:.4g}" in scores
    groups = section(report_html, "diagnostics")
    assert "Suggested grouping" in groups and "trunk 1:" in groups


def test_draw_counts_are_logged_per_epoch(gated_run: Path) -> None:
    from mtlgraph.experiment.figures import draws_per_epoch

    draws = draws_per_epoch(RunRecord.load(gated_run))
    assert draws == {1: {"subsets": 5.0}, 2: {"subsets": 5.0}}  # 160 rows, batches of 32


def test_gate_usage_rows_sum_to_one(gated_run: Path) -> None:
    usage = gate_usage(build_run_experiment(RunRecord.load(gated_run)))
    assert sorted(usage) == ["y0_gate (y0)", "y1_gate (y1)"]
    for weights in usage.values():
        assert len(weights) == 3 and sum(weights) == pytest.approx(1.0, abs=1e-5)


def test_report_figures_go_to_tensorboard(gated_run: Path, report_html: str) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in gated_run.glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        tags |= set(acc.Tags()["images"])
    assert {"report/curves", "report/gates", "report/diagnostics"} <= tags


def test_sections_without_data_say_why(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1, "step": 2, "t/d/valid/f1": 0.5}\n')
    assert main(["report", str(tmp_path), "--quiet"]) == 0
    page = (tmp_path / "report.html").read_text()
    assert "no config.yaml" in section(page, "graph")
    assert "Diagnostics did not run" in section(page, "diagnostics")
    assert "no scores.json" in section(page, "scores")


def test_score_table_has_a_row_per_slice() -> None:
    from mtlgraph.experiment.run_report import score_table_html

    table = score_table_html({"t/d/valid/f1": 0.5, "t/d:far/valid/f1": 0.25})
    assert '<td>t</td><td>d</td><td>(all)</td><td>f1</td><td class="num">0.5</td>' in table
    assert '<td>t</td><td>d</td><td>far</td><td>f1</td><td class="num">0.25</td>' in table
