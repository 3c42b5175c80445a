"""``mtlgraph report RUN_DIR``: one self-contained HTML file that shows a run (docs/report.md).

Sections, in order (:data:`SECTIONS`): the merged task graph (inline SVG), learning curves with the
best checkpoint marked, learning rate and balancer weights, the final score table (a row per
slice), batches drawn per dataset and epoch, the interference heatmaps and suggested grouping
(when diagnostics ran), and expert gate usage (for models with MMoE/CGC/DSelect-k gates). Every
figure is embedded (base64 PNG or inline SVG); the file references no URL. A section the run has
nothing for says why. The same figures go to the run's TensorBoard events as images when the
TensorBoard writer wrote there.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mtlgraph.experiment import figures
from mtlgraph.experiment.runs import CONFIG_FILE, RunRecord

logger = logging.getLogger(__name__)

REPORT_FILE = "report.html"
"""The report's default name in the run directory."""
SECTIONS = {
    "graph": "Task graph",
    "curves": "Learning curves",
    "lr-weights": "Learning rate and balancer task weights",
    "scores": "Final scores",
    "draws": "Batches drawn per dataset and epoch",
    "diagnostics": "Interference diagnostics",
    "gates": "Expert gate usage",
}
"""Section ids (HTML ``id``) and titles, in report order."""

_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px; color: #222 }
h1 { font-size: 1.6em } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em }
table { border-collapse: collapse; font-size: .9em } td, th { padding: .25em .7em;
border-bottom: 1px solid #eee; text-align: left } td.num { text-align: right;
font-variant-numeric: tabular-nums } img { max-width: 100% } .note { color: #777 }
pre { background: #f7f7f7; padding: .8em; overflow-x: auto; font-size: .8em }
"""


def build_html(run: RunRecord, experiment: Any | None = None) -> tuple[str, dict[str, Any]]:
    """The report's HTML and its matplotlib figures by section id.

    Args:
        run: The run directory's record.
        experiment: The run's config built (``build_experiment``), for the graph and gates;
            ``None`` builds it from ``config.yaml`` when there is one.
    """
    if experiment is None and run.config:
        experiment = build_run_experiment(run)
    figs: dict[str, Any] = {}
    body: dict[str, str] = {}
    body["graph"] = _graph_section(experiment)
    for sid, make, why in (
        ("curves", figures.learning_curves, "metrics.jsonl holds no task losses or scores"),
        ("lr-weights", figures.lr_and_weights, "metrics.jsonl logs no learning rate or weights"),
        ("draws", figures.draws_figure, "metrics.jsonl logs no draw counts (an older run)"),
    ):
        body[sid] = _figure_section(sid, make(run), why, figs)
    body["scores"] = score_table_html(run.scores)
    body["diagnostics"] = _diagnostics_section(run, figs)
    body["gates"] = _gates_section(run, experiment, figs)
    best = run.best
    best_text = (
        f"best checkpoint: {html.escape(str(best['metric']))} = {best['value']:.4g} at step "
        f"{best['step']}"
        if best
        else "no best checkpoint (trainer.checkpoint_metric unset)"
    )
    sections = "\n".join(
        f'<section id="{sid}">\n<h2>{title}</h2>\n{body[sid]}\n</section>'
        for sid, title in SECTIONS.items()
    )
    name = html.escape(str(run.config.get("experiment", run.path.name)))
    page = (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>mtlgraph report: {name}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
        f'<h1>mtlgraph report: {name}</h1>\n<p class="note">run directory '
        f"{html.escape(str(run.path))}; {len(run.history)} logged records; {best_text}; made "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}</p>\n{sections}\n</body>\n</html>\n"
    )
    return page, figs


def build_run_experiment(run: RunRecord) -> Any:
    """The run's ``config.yaml`` built (model, data), with the run's best (else last) weights."""
    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config
    from mtlgraph.training.checkpoint import BEST, CHECKPOINT_DIR, LAST

    experiment = build_experiment(load_config(run.path / CONFIG_FILE))
    for name in (BEST, LAST):
        if (run.path / CHECKPOINT_DIR / name).is_file():
            experiment.model.load(run.path / CHECKPOINT_DIR / name)
            break
    return experiment


def _img(fig: Any) -> str:
    data = base64.b64encode(figures.png(fig)).decode("ascii")
    return f'<img alt="figure" src="data:image/png;base64,{data}">'


def _note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def _figure_section(sid: str, fig: Any | None, why: str, figs: dict[str, Any]) -> str:
    if fig is None:
        return _note(f"Nothing to show: {why}.")
    figs[sid] = fig
    return _img(fig)


def _graph_section(experiment: Any | None) -> str:
    from mtlgraph.graph.drawing import GraphPicture

    if experiment is None:
        return _note("Nothing to show: the run directory has no config.yaml.")
    picture = GraphPicture.of(experiment.model.tasks.values())
    return _note(
        "Shared modules (read by several tasks) are filled orange; dashed edges detach."
    ) + picture.to_svg(standalone=False)


def score_table_html(scores: Mapping[str, float]) -> str:
    """The final scores: a row per task, dataset, slice and metric; a column per split."""
    from mtlgraph.graph.slices import SLICE_SEP
    from mtlgraph.metrics import split_key

    if not scores:
        return _note("Nothing to show: no scores.json (the run did not finish).")
    rows: dict[tuple[str, str, str, str], dict[str, float]] = {}
    splits: list[str] = []
    for key, value in scores.items():
        task, dataset, split, metric = split_key(key)
        ds, _, slice_name = dataset.partition(SLICE_SEP)
        rows.setdefault((task, ds, slice_name or "(all)", metric), {})[split] = value
        splits += [split] if split not in splits else []
    order = {"train": 0, "valid": 1, "test": 2}
    splits.sort(key=lambda s: order.get(s, 3))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ("task", "dataset", "slice", "metric"))
    head += "".join(f"<th>{html.escape(s)}</th>" for s in splits)
    lines = [f'<table class="scores">\n<tr>{head}</tr>']
    for parts, values in sorted(rows.items()):
        cells = "".join(f"<td>{html.escape(p)}</td>" for p in parts)
        cells += "".join(
            f'<td class="num">{values[s]:.4g}</td>' if s in values else "<td>-</td>" for s in splits
        )
        lines.append(f"<tr>{cells}</tr>")
    return "\n".join([*lines, "</table>"])


def _diagnostics_section(run: RunRecord, figs: dict[str, Any]) -> str:
    from mtlgraph.diagnostics.report import REPORT_JSON, load_report

    if not (run.path / REPORT_JSON).is_file():
        return _note(
            "Diagnostics did not run: train with trainer.diagnostics (docs/diagnostics.md)."
        )
    report = load_report(run.path)
    if not report.probes:
        return _note("Diagnostics ran but took no probe (the run was shorter than its every).")
    fig = figs["diagnostics"] = figures.interference_figure(report)
    groups = "".join(
        f"<li>trunk {i}: {html.escape(', '.join(g))}</li>" for i, g in enumerate(report.grouping, 1)
    )
    return (
        f"{_img(fig)}\n<h3>Suggested grouping</h3>\n<ol>{groups}</ol>\n<details><summary>the "
        f"full interference report</summary><pre>{html.escape(report.to_text())}</pre></details>"
    )


def _gates_section(run: RunRecord, experiment: Any | None, figs: dict[str, Any]) -> str:
    usage = gate_usage(experiment) if experiment is not None else {}
    if not usage:
        return _note("Nothing to show: the model has no MMoE/CGC/DSelect-k gates.")
    fig = figs["gates"] = figures.gates_figure(usage)
    return _note("Mean mixture weight over the evaluation data, best (else last) checkpoint.") + (
        _img(fig)
    )


def gate_usage(experiment: Any) -> dict[str, list[float]]:
    """Mean mixture weights of every gate module over the evaluation split (else the training
    split), keyed ``"<gate> (<tasks>)"``; empty without gates."""
    import torch

    from mtlgraph.graph.experts import Gate

    model = experiment.model
    gates = {n: m for n, m in model.module_pool.items() if isinstance(m, Gate)}
    if not gates:
        return {}
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(gates, 0)

    def capture(name: str) -> Callable[..., None]:
        def hook(module: Any, inputs: tuple[Any, ...]) -> None:
            w = module.weights(inputs[0]).detach()
            sums[name] = sums.get(name, 0) + w.sum(dim=0)
            counts[name] += int(w.shape[0])

        return hook

    splits = experiment.config.trainer.eval_splits or []
    loaders = [dl for dl in experiment.loaders if dl.dataset.split in splits] or [
        dl for dl in experiment.loaders if dl.dataset.split == experiment.config.trainer.train_split
    ]
    handles = [g.register_forward_pre_hook(capture(n)) for n, g in gates.items()]
    try:
        for loader in loaders:
            model.predict(loader)
    finally:
        for h in handles:
            h.remove()
    users = {n: [t.name for t in model.tasks.values() if n in t.module_pool] for n in gates}
    return {
        f"{n} ({', '.join(users[n])})": (sums[n] / counts[n]).tolist() for n in gates if counts[n]
    }


def to_tensorboard(run: RunRecord, figs: Mapping[str, Any]) -> bool:
    """Add the figures as images to the run's TensorBoard events (when it has any) at the run's
    last step, tagged ``report/<section>``; whether it did."""
    if not any(run.path.glob("events.out.tfevents.*")):
        return False
    from torch.utils.tensorboard import SummaryWriter

    step = int(run.history[-1].get("step", 0)) if run.history else 0
    writer = SummaryWriter(str(run.path))
    try:
        for sid, fig in figs.items():
            writer.add_image(f"report/{sid}", figures.rgb(fig), global_step=step, dataformats="HWC")
    finally:
        writer.close()
    return True


def write_html_report(
    run_dir: str | Path, out: str | Path | None = None, tensorboard: bool = True
) -> Path:
    """Write the report of ``run_dir`` (default ``RUN_DIR/report.html``); with ``tensorboard``,
    its figures go to the run's TensorBoard events too.

    Raises:
        ConfigError: Not a run directory (no metrics.jsonl), naming it.
    """
    from mtlgraph._io import atomic_write_text

    run = RunRecord.load(run_dir)
    page, figs = build_html(run)
    path = Path(out) if out is not None else run.path / REPORT_FILE
    atomic_write_text(path, page)
    if tensorboard and to_tensorboard(run, figs):
        logger.info("report figures added to TensorBoard in %s", run.path)
    return path
