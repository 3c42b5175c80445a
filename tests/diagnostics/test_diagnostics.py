"""Interference diagnostics: the math on hand-built gradients and a linear model, the probe's
guarantees (training untouched, off costs nothing, exact resume), conflicting vs agreeing tasks
end to end, the report, its files and ``mtlgraph diagnose``."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Interrupt, make_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import mtlgraph.training.trainer as trainer_module
from mtlgraph import (
    CheckpointError,
    ConfigError,
    DictDataLoader,
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.diagnostics import (
    REPORT_JSON,
    REPORT_TEXT,
    DiagnosticsConfig,
    DiagnosticsReport,
    InterferenceMonitor,
    load_report,
    lookahead_affinity,
    mean_and_error,
    pair_statistics,
    remove_report,
    suggest_groups,
    write_report,
)
from mtlgraph.diagnostics.stats import _partitions
from mtlgraph.experiment.cli import main as cli_main
from mtlgraph.experiment.config import parse_config
from mtlgraph.training.checkpoint import load_checkpoint


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Small models: one thread is faster and steadier on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


NAN = math.nan

# ---------------------------------------------------------------- the math


def test_cosine_and_norm_ratio_of_hand_built_gradients() -> None:
    g = torch.tensor([[3.0, 4.0, 0.0], [-6.0, -8.0, 0.0], [0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
    cosine, ratio = pair_statistics(g @ g.T)
    assert cosine[0, 1] == pytest.approx(-1.0)  # opposite directions
    assert cosine[0, 2] == pytest.approx(0.0)  # orthogonal
    assert ratio[0, 1] == pytest.approx(0.5) and ratio[1, 0] == pytest.approx(2.0)  # 5 vs 10
    assert ratio[2, 0] == pytest.approx(0.4)
    assert torch.isnan(cosine[3]).all() and torch.isnan(ratio[:, 3]).all()  # zero gradient
    rng = np.random.default_rng(0)
    h = rng.normal(size=(4, 7))
    cosine, ratio = pair_statistics(torch.from_numpy(h @ h.T))
    norms = np.linalg.norm(h, axis=1)
    np.testing.assert_allclose(cosine.numpy(), (h @ h.T) / np.outer(norms, norms), rtol=1e-12)
    np.testing.assert_allclose(ratio.numpy(), norms[:, None] / norms[None, :], rtol=1e-12)


def test_lookahead_affinity_and_mean_and_error() -> None:
    assert lookahead_affinity(4.0, 3.0) == 0.25
    assert lookahead_affinity(4.0, 5.0) == -0.25
    assert math.isnan(lookahead_affinity(0.0, 1.0)) and math.isnan(lookahead_affinity(1.0, NAN))
    values = np.array([0.3, -0.1, 0.5, 0.2, 0.0])
    mean, error = mean_and_error(len(values), float(values.sum()), float((values**2).sum()))
    assert mean == pytest.approx(values.mean())
    assert error == pytest.approx(values.std(ddof=1) / math.sqrt(len(values)))
    assert mean_and_error(1, 2.0, 4.0) == (2.0, math.inf)


def _linear_tasks(dtype: torch.dtype = torch.float64) -> tuple[MultitaskClassifier, nn.Linear]:
    """Two regression tasks whose prediction is the shared linear trunk's output itself."""
    torch.manual_seed(0)
    trunk = nn.Linear(3, 1, bias=False).to(dtype)
    tasks = [
        Task(t, {"trunk": trunk}, [Operation("trunk", [("_input_", "x")])], task_type="regression")
        for t in ("a", "b")
    ]
    return MultitaskClassifier(tasks), trunk


def test_gradient_statistics_and_affinity_of_a_linear_model_match_the_formulas() -> None:
    """Z_{i→j} = 1 − L_j(w − η∇L_i) / L_j(w), hand-computed for f(x) = x·w and squared loss."""
    model, trunk = _linear_tasks()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    targets = {"a": x @ torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64), "b": -x[:, 0]}
    loaders = [
        make_loader(f"d{t}", "train", {"x": x}, {t: y}, batch_size=64) for t, y in targets.items()
    ]
    eta = 0.05
    monitor = InterferenceMonitor(DiagnosticsConfig(every=1))
    w_before = trunk.weight.detach().clone()
    values = monitor.probe(model, loaders, lr=eta, step=1)  # batch 64 > 40 rows: every row
    assert torch.equal(trunk.weight, w_before) and trunk.weight.grad is None

    w = w_before[0]

    def loss(task: str, weights: torch.Tensor) -> float:
        return float(((x @ weights - targets[task]) ** 2).mean())

    grad = {t: 2 * ((x @ w - y)[:, None] * x).mean(0) for t, y in targets.items()}
    cos = float(grad["a"] @ grad["b"] / (grad["a"].norm() * grad["b"].norm()))
    assert values["diagnostics/trunk/a~b/cosine"] == pytest.approx(cos, rel=1e-10)
    ratio = float(grad["a"].norm() / grad["b"].norm())
    assert values["diagnostics/trunk/a~b/norm_ratio"] == pytest.approx(ratio, rel=1e-10)
    for i, j in (("a", "b"), ("b", "a")):
        z = 1 - loss(j, w - eta * grad[i]) / loss(j, w)
        assert values[f"diagnostics/affinity/{i}->{j}"] == pytest.approx(z, rel=1e-9)
    # the per-parameter learning rate of the optimizer's groups is the default step size
    again = InterferenceMonitor(DiagnosticsConfig(every=1)).probe(
        model, loaders, lr=[{"params": [trunk.weight], "lr": eta}], step=1
    )
    assert again == values


def test_partitions_are_every_set_partition() -> None:
    bell = [1, 1, 2, 5, 15, 52, 203]
    for k in range(1, 7):
        parts = list(_partitions(list(range(k))))
        assert len(parts) == bell[k]
        assert len({tuple(sorted(map(tuple, p))) for p in parts}) == bell[k]


def test_grouping_maximises_within_group_affinity_with_negative_pairs_apart() -> None:
    tasks = ["a", "b", "c", "d"]
    z = [
        [NAN, 0.3, 0.1, -0.2],
        [0.2, NAN, -0.4, 0.1],
        [0.1, -0.3, NAN, 0.2],
        [-0.1, 0.1, 0.3, NAN],
    ]
    # mutual: ab +0.5, ac +0.2, ad -0.3, bc -0.7, bd +0.2, cd +0.5 -> {a, b}, {c, d}: 1.0
    assert suggest_groups(tasks, z) == ([["a", "b"], ["c", "d"]], "exhaustive")
    # all positive: one trunk; unmeasured pairs count 0 and ties go to fewer groups
    assert suggest_groups(["a", "b", "c"], [[NAN, 0.1, NAN], [0.1, NAN, NAN], [NAN, NAN, NAN]])[
        0
    ] == [["a", "b", "c"]]
    # a negative mutual affinity within 2 standard errors of 0 is noise: it splits nothing
    z2 = [[NAN, -0.01], [-0.01, NAN]]
    assert suggest_groups(["a", "b"], z2, [[0, 0.02], [0.02, 0]])[0] == [["a", "b"]]
    assert suggest_groups(["a", "b"], z2, [[0, 0.001], [0.001, 0]])[0] == [["a"], ["b"]]


def test_greedy_grouping_beyond_the_exhaustive_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(3)
    k = 12
    cluster = np.arange(k) % 3  # three clusters: helpful inside, harmful across
    z = np.where(cluster[:, None] == cluster[None, :], 0.2, -0.2) + rng.normal(0, 0.05, (k, k))
    np.fill_diagonal(z, np.nan)
    tasks = [f"t{i}" for i in range(k)]
    groups, method = suggest_groups(tasks, z.tolist())
    assert method == "greedy"
    assert sorted(map(tuple, groups)) == sorted(
        tuple(f"t{i}" for i in range(k) if cluster[i] == c) for c in range(3)
    )
    # on a small case greedy finds the exhaustive answer
    import mtlgraph.diagnostics.stats as diagnostics

    small = z[:6, :6].tolist()
    exhaustive = suggest_groups(tasks[:6], small)[0]
    monkeypatch.setattr(diagnostics, "EXHAUSTIVE_MAX_TASKS", 0)
    assert suggest_groups(tasks[:6], small) == (exhaustive, "greedy")


# ---------------------------------------------------------------- config


def test_config_validation_reports_every_problem_with_suggestions() -> None:
    with pytest.raises(ConfigError) as info:
        Trainer(diagnostics={"every": 0, "lr": -1.0, "batch_size": 0, "afinity": True})
    message = str(info.value)
    assert "diagnostics.every: must be >= 1, got 0" in message
    assert "diagnostics.lr: must be a positive number or null" in message
    assert "diagnostics.batch_size: must be >= 1 or null" in message
    assert "diagnostics.afinity: unknown key (did you mean 'affinity'?)" in message
    with pytest.raises(ConfigError, match="diagnostics: expected a mapping or null"):
        Trainer(diagnostics=50)
    with pytest.raises(ConfigError, match="diagnostics.every: must be >= 1"):
        Trainer(diagnostics=DiagnosticsConfig(every=-2))
    assert Trainer().config.diagnostics is None  # off by default
    assert Trainer(diagnostics={}).config.diagnostics == DiagnosticsConfig()
    assert Trainer(diagnostics=DiagnosticsConfig(every=7)).config.diagnostics.every == 7  # type: ignore[union-attr]


def test_yaml_trainer_section_takes_diagnostics() -> None:
    from experiment_helpers import tiny_config

    cfg = parse_config(tiny_config(diagnostics={"every": 5, "affinity": False}))
    assert cfg.trainer.diagnostics == DiagnosticsConfig(every=5, affinity=False)
    with pytest.raises(ConfigError, match=r"trainer\.diagnostics\.every: expected an integer"):
        parse_config(tiny_config(diagnostics={"every": "often"}))


# ---------------------------------------------------------------- end to end


def _opposites(seed: int = 0) -> tuple[MultitaskClassifier, list[DictDataLoader]]:
    """Three regression tasks read one shared feature s = trunk(x) as their prediction, each
    from its own dataset: ``up`` targets +x·u, ``down`` -x·u (opposite targets on the shared
    feature: no head can reconcile them), ``along`` x·u + 0.3·x·v (agrees with ``up``)."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    tasks = [
        Task(t, {"trunk": trunk}, [Operation("trunk", [("_input_", "x")])], task_type="regression")
        for t in ("up", "down", "along")
    ]
    g = torch.Generator().manual_seed(seed + 1)
    u, v = torch.randn(6, generator=g), torch.randn(6, generator=g)
    loaders = []
    for t, sign, extra in (("up", 1.0, 0.0), ("down", -1.0, 0.0), ("along", 1.0, 0.3)):
        x = torch.randn(128, 6, generator=g)
        y = sign * (x @ u) + extra * (x @ v)
        loaders.append(make_loader(f"{t}_data", "train", {"x": x}, {t: y}, 16, shuffle=True))
    return MultitaskClassifier(tasks), loaders


def test_conflicting_pair_is_found_agreeing_pair_kept_together(tmp_path: Path) -> None:
    model, loaders = _opposites()
    trainer = Trainer(
        n_epochs=3, lr=0.01, progress_bar=False, diagnostics={"every": 2}, run_dir=str(tmp_path)
    )
    trainer.fit(model, loaders)
    report = trainer.diagnostics
    assert isinstance(report, DiagnosticsReport)
    assert report.probes == 24 * 3 // 2 and report.tasks == ("up", "down", "along")

    conflict = report.pair("up", "down", "trunk")
    assert conflict is not None and conflict.conflicting
    assert conflict.mean_cosine < -0.4 and conflict.negative_fraction > 0.9
    assert report.affinity_of("up", "down") < 0 and report.affinity_of("down", "up") < 0
    agree = report.pair("up", "along", "trunk")
    assert agree is not None and not agree.conflicting
    assert agree.mean_cosine > 0.3 and agree.mean_cosine - 2 * agree.cosine_error > 0
    assert report.affinity_of("up", "along") > 0 and report.affinity_of("along", "up") > 0
    assert report.conflicts == [p for p in report.pairs if {p.task_a, p.task_b} != {"up", "along"}]
    assert report.grouping == (("up", "along"), ("down",))

    text = report.to_text()
    assert "trunk 1: up, along" in text and "trunk 2: down" in text
    assert "up ~ down" in text and "CONFLICT" in text
    # the report files, and the per-probe values in the history and the writers
    assert DiagnosticsReport.from_dict(json.loads((tmp_path / REPORT_JSON).read_text())) == report
    assert (tmp_path / REPORT_TEXT).read_text() == text + "\n"
    probes = [r for r in trainer.history if "diagnostics/trunk/up~down/cosine" in r]
    assert [r["step"] for r in probes] == [float(s) for s in range(2, 73, 2)]
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == trainer.history
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "diagnostics/trunk/up~down/cosine",
        "diagnostics/trunk/up~along/norm_ratio",
        "diagnostics/affinity/down->up",
    } <= tags
    events = acc.Scalars("diagnostics/trunk/up~down/cosine")
    assert [e.value for e in events] == pytest.approx(
        [r["diagnostics/trunk/up~down/cosine"] for r in probes]
    )


def test_probes_leave_training_bit_identical() -> None:
    """Dropout, batch norm, shuffling, pcgrad and accumulation: on or off, the same run."""

    def run(diagnostics: dict | None, **extra: object) -> tuple[dict, list]:
        torch.manual_seed(0)
        trunk = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.3))
        tasks = [
            Task(
                t,
                {"trunk": trunk, f"{t}_head": nn.Linear(8, 2)},
                [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])],
            )
            for t in ("a", "b")
        ]
        model = MultitaskClassifier(tasks)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(96, 4, generator=g)
        loaders = [
            make_loader("da", "train", {"x": x}, {"a": (x[:, 0] > 0).long()}, 16, shuffle=True),
            make_loader("db", "train", {"x": x}, {"b": (x[:, 1] > 0).long()}, 16, shuffle=True),
            make_loader("da", "valid", {"x": x[:32]}, {"a": (x[:32, 0] > 0).long()}, 16),
        ]
        trainer = Trainer(n_epochs=2, lr=0.02, progress_bar=False, diagnostics=diagnostics, **extra)
        trainer.fit(model, loaders)
        assert all(p.grad is None for p in model.parameters())
        assert model.training
        history = [r for r in trainer.history if not any("diagnostics/" in k for k in r)]
        return {k: v.clone() for k, v in model.state_dict().items()}, history

    for extra in (
        {},
        {"batch_scheduler": "mixed", "balancer": "pcgrad"},
        {"grad_accumulation_steps": 2},
    ):
        off, history_off = run(None, **extra)
        on, history_on = run({"every": 1, "batch_size": 24}, **extra)
        assert all(torch.equal(off[k], on[k]) for k in off), extra
        assert history_on == history_off


def test_off_costs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    class Refuse:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise AssertionError("no monitor may be built when diagnostics is off")

    monkeypatch.setattr(trainer_module, "InterferenceMonitor", Refuse)
    model, loaders = _opposites()
    trainer = Trainer(n_epochs=1, progress_bar=False)
    trainer.fit(model, loaders)
    assert trainer.diagnostics is None
    assert not any(k.startswith("diagnostics/") for r in trainer.history for k in r)


def test_a_resumed_run_reports_what_an_uninterrupted_one_does(tmp_path: Path) -> None:
    def setup(at: int = 0) -> tuple[MultitaskClassifier, list[DictDataLoader]]:
        model, loaders = _opposites(seed=3)
        if at:  # the shared trunk's output passes through a module that stops the run
            model.module_pool["trunk"].append(Interrupt(at))
        return model, loaders

    config = {
        "n_epochs": 2,
        "lr": 0.01,
        "progress_bar": False,
        "diagnostics": {"every": 3},
        "checkpoint_every": 4,
        "checkpoint_unit": "steps",
    }
    reference = Trainer(run_dir=str(tmp_path / "ref"), **config)
    reference.fit(*setup())
    with pytest.raises(KeyboardInterrupt):
        Trainer(run_dir=str(tmp_path / "run"), **config).fit(*setup(at=31))
    state = load_checkpoint(tmp_path / "run")  # weights_only
    assert (
        state["run"]["progress"]["global_step"] == 28
        and state["hooks"]["diagnostics"]["probes"] == 9
    )
    partial = load_report(tmp_path / "run")  # no diagnostics.json yet: from the checkpoint
    assert partial.probes == 9 and partial.step == 27
    resumed = Trainer(run_dir=str(tmp_path / "run"), **config)
    resumed.fit(*setup(), resume_from=tmp_path / "run")
    assert resumed.diagnostics == reference.diagnostics
    assert resumed.history == reference.history
    assert (tmp_path / "run" / REPORT_JSON).read_text() == (
        tmp_path / "ref" / REPORT_JSON
    ).read_text()


def test_diagnose_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, loaders = _opposites()
    Trainer(
        n_epochs=2, progress_bar=False, diagnostics={"every": 4}, run_dir=str(tmp_path / "a")
    ).fit(model, loaders)
    assert cli_main(["diagnose", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Interference diagnostics: 12 probes (every 4 steps")
    assert "Suggested trunks" in out and "trunk 2: down" in out
    assert cli_main(["diagnose", str(tmp_path / "a"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["grouping"]["groups"] == [["up", "along"], ["down"]]
    assert data["affinity"]["matrix"][0][0] is None  # never measured: null, not NaN

    model, loaders = _opposites()
    Trainer(n_epochs=1, progress_bar=False, run_dir=str(tmp_path / "plain")).fit(model, loaders)
    assert cli_main(["diagnose", str(tmp_path / "plain")]) == 2
    err = capsys.readouterr().err
    assert "trained without trainer.diagnostics" in err and "every: 50" in err
    assert cli_main(["diagnose", str(tmp_path / "missing")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_a_new_run_in_a_used_directory_drops_the_old_report(tmp_path: Path) -> None:
    model, loaders = _opposites()
    Trainer(n_epochs=1, progress_bar=False, diagnostics={"every": 4}, run_dir=str(tmp_path)).fit(
        model, loaders
    )
    assert (tmp_path / REPORT_JSON).exists()
    Trainer(n_epochs=1, progress_bar=False, run_dir=str(tmp_path)).fit(*_opposites())
    assert not (tmp_path / REPORT_JSON).exists() and not (tmp_path / REPORT_TEXT).exists()


def test_report_files_are_written_atomically_and_read_back(tmp_path: Path) -> None:
    state = {
        "every": 5,
        "probes": 1,
        "step": 5,
        "tasks": ["a", "b"],
        "pairs": [["trunk", "a", "b", 1, -0.5, 0.25, 1, 0.0, 1]],
        "affinity": [["a", "b", 1, 0.1, 0.01]],
    }
    report = DiagnosticsReport.from_state(state)
    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == [REPORT_JSON, REPORT_TEXT]
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPORT_JSON, REPORT_TEXT]  # no temp
    data = json.loads((tmp_path / REPORT_JSON).read_text())
    assert data["affinity"]["matrix"] == [[None, 0.1], [None, None]]  # NaN -> null
    assert data["pairs"][0]["cosine_error"] is None  # inf -> null
    back = load_report(tmp_path)
    assert back.affinity_of("a", "b") == pytest.approx(0.1) and math.isnan(back.affinity[0][0])
    assert back.pairs[0].cosine_error == math.inf and back.to_text() == report.to_text()
    assert (tmp_path / REPORT_TEXT).read_text() == report.to_text() + "\n"
    remove_report(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_torn_report_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / REPORT_JSON).write_text('{"format": "mtlgraph.diagn')
    with pytest.raises(CheckpointError, match=r"diagnostics.json' is not valid JSON"):
        load_report(tmp_path)
