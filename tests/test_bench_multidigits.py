"""bench/multidigits.py and bench/peers.py: the data's split property, Δm, and a --quick run.

Outcomes only (keys, accuracies above chance, Δm recomputed from the per-seed numbers, peers
bit-identical where the method is the same arithmetic); no timing thresholds.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from bench import _libmtl_shim, multidigits, peers
from mtlgraph.balancing import BALANCERS

CHANCE = 0.1  # ten digit classes

TINY = multidigits.Config(pairs={"train": 256, "valid": 64, "test": 128}, epochs=1)


def test_splits_share_no_source_scan_and_labels_match_the_scans() -> None:
    data = multidigits.make_multidigits(multidigits.QUICK)
    used = {split: set(np.concatenate(list(part.sources.values()))) for split, part in data.items()}
    assert not used["train"] & used["valid"]
    assert not used["train"] & used["test"]
    assert not used["valid"] & used["test"]
    targets = load_digits().target
    for split, part in data.items():
        n = multidigits.QUICK.pairs[split]
        assert part.images.shape == (n, 1, multidigits.CANVAS, multidigits.CANVAS)
        assert (part.sources["left"] != part.sources["right"]).all()
        for task in multidigits.TASKS:
            assert part.labels[task].tolist() == targets[part.sources[task]].tolist()
    # deterministic: the same config gives the same images
    again = multidigits.make_multidigits(multidigits.QUICK)
    assert torch.equal(again["test"].images, data["test"].images)


def test_overlay_places_left_up_left_right_down_right_merged_with_max() -> None:
    left, right = np.full((8, 8), 0.25, np.float32), np.full((8, 8), 0.75, np.float32)
    rng = np.random.default_rng(0)
    overlaps = set()
    for _ in range(50):
        canvas = multidigits.overlay(left, right, rng)
        rows, cols = np.nonzero(canvas == 0.75)  # the right digit wins where they overlap (max)
        assert len(rows) == 64 and rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7
        assert 5 <= rows.min() <= 8 and 5 <= cols.min() <= 8
        rows, cols = np.nonzero(canvas == 0.25)  # what is left of the left digit
        assert 0 <= rows.min() <= 3 and 0 <= cols.min() <= 3
        overlaps.add(64 - len(rows))
    assert max(overlaps) > 0 and min(overlaps) >= 0  # the digits do overlap, sometimes


def test_delta_m_from_hand_numbers() -> None:
    single = {"left": 0.80, "right": 0.50}
    # (0.88 - 0.80)/0.80 = +10 %, (0.45 - 0.50)/0.50 = -10 %: mean 0
    assert multidigits.delta_m({"left": 0.88, "right": 0.45}, single) == pytest.approx(0.0)
    # +10 % and +20 %: mean +15 %
    assert multidigits.delta_m({"left": 0.88, "right": 0.60}, single) == pytest.approx(15.0)
    # lower is better for "right" (an error rate): 0.60 > 0.50 is 20 % worse
    assert multidigits.delta_m(
        {"left": 0.88, "right": 0.60}, single, {"right": False}
    ) == pytest.approx((10.0 - 20.0) / 2)
    assert multidigits.mean_std([0.5, 0.7]) == pytest.approx((0.6, 0.1414213562))
    assert multidigits.mean_std([0.5]) == (0.5, 0.0)


def test_mode_rows_for_the_balancers_that_accept_the_mode() -> None:
    specs = multidigits.method_specs(["representation", "gram"])
    assert set(BALANCERS.names()) <= set(specs)
    assert specs["mgda"] == "mgda"
    assert specs["mgda [representation]"] == {"name": "mgda", "gradients": "representation"}
    assert specs["upgrad [gram]"] == {"name": "upgrad", "gradients": "gram"}
    # weighting balancers take no `gradients`; moco keeps per-parameter state of the rows
    for name in ("sum", "famo", "moco", "db_mtl"):
        assert f"{name} [representation]" not in specs and f"{name} [gram]" not in specs
    assert set(multidigits.method_specs([])) == set(BALANCERS.names())


def test_gram_row_trains_the_model_of_the_parameters_row() -> None:
    data = multidigits.make_multidigits(TINY)
    plain = multidigits.run_ours("mgda", data, TINY, 0)
    gram = multidigits.run_ours({"name": "mgda", "gradients": "gram"}, data, TINY, 0)
    rep = multidigits.run_ours({"name": "mgda", "gradients": "representation"}, data, TINY, 0)
    n_test = TINY.pairs["test"]
    for task in multidigits.TASKS:  # the same update up to float rounding: at most one flip
        assert abs(gram.accuracy[task] - plain.accuracy[task]) <= 1 / n_test
    assert rep.accuracy != plain.accuracy  # other coefficients, another model


@pytest.mark.slow
def test_quick_run_table_json_and_delta_m(tmp_path, capsys) -> None:
    out = tmp_path / "multidigits.json"
    result = multidigits.main(
        ["--quick", "--seeds", "0", "--quiet", "--threads", "1", "--json", str(out)]
    )
    table = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert set(saved["methods"]) == {"single_task", *BALANCERS.names()}
    assert saved["config"]["seeds"] == [0]
    assert saved["config"]["modes"] == []  # --quick: the parameter rows only
    single = saved["single_task_accuracy"]
    for task in multidigits.TASKS:
        assert single[task] > CHANCE + 0.2
    for name, row in saved["methods"].items():
        assert f"| {name} |" in table
        if name in ("single_task", "sum"):
            assert "error" not in row
        if "error" in row:  # a balancer that cannot run here says why, in the table too
            continue
        assert {"left_mean", "left_std", "right_mean", "right_std", "delta_m_mean"} <= set(row)
        assert row["ms_per_step"] > 0 and row["s_per_epoch"] > 0
        assert min(row["left_mean"], row["right_mean"]) > CHANCE + 0.1, name
        if name == "single_task":
            continue
        per_seed = [multidigits.delta_m(run["accuracy"], single) for run in saved["per_seed"][name]]
        assert row["delta_m_mean"] == pytest.approx(sum(per_seed) / len(per_seed))
        expected = (
            (row["left_mean"] - single["left"]) / single["left"]
            + (row["right_mean"] - single["right"]) / single["right"]
        ) * 50
        assert row["delta_m_mean"] == pytest.approx(expected)  # Δm is linear in the accuracies
    assert result["methods"]["sum"]["left_mean"] == saved["methods"]["sum"]["left_mean"]


@pytest.mark.slow
def test_peers_match_bit_for_bit_where_the_arithmetic_is_the_same(monkeypatch) -> None:
    pytest.importorskip("torchjd")
    methods = {m.label: m for m in peers.METHODS}
    monkeypatch.setattr(peers, "METHODS", [methods["EW"], methods["PCGrad"]])
    result = peers.run_peers(TINY, [0], log=lambda _: None, timing_rounds=1)
    ew = result["methods"]["EW"]
    assert "error" not in ew["mtlgraph"]
    # same init, batches and optimizer: the same model (TorchJD sums the Jacobian's rows, the
    # others backpropagate the summed loss: the same up to rounding)
    assert abs(ew["TorchJD"]["accuracy_diff"]) <= 0.02
    assert ew["TorchJD"]["time_ratio"] > 0 and ew["mtlgraph"]["rotation_ms_per_step"] > 0
    if "error" not in ew["LibMTL"]:
        assert ew["LibMTL"]["accuracy_diff"] == 0.0
        assert result["methods"]["PCGrad"]["LibMTL"]["within_spread"]
    table = peers.format_peer_table(result)
    assert "| EW |" in table and "| PCGrad |" in table


def test_a_missing_peer_is_skipped_with_the_install_command(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "LibMTL", None)
    with pytest.raises(
        _libmtl_shim.PeerMissingError, match=r"pip install --no-deps LibMTL==1\.1\.5"
    ):
        _libmtl_shim.weighting_class("EW")
    methods = {m.label: m for m in peers.METHODS}
    ew = peers.Method("EW", "sum", methods["EW"].libmtl, None)
    monkeypatch.setattr(peers, "METHODS", [ew])
    tiny = multidigits.Config(pairs={"train": 64, "valid": 32, "test": 32}, epochs=1)
    result = peers.run_peers(tiny, [0], log=lambda _: None, timing_rounds=1)
    assert result["methods"]["EW"]["LibMTL"]["error"].startswith("skipped: LibMTL is not installed")
    assert "skipped: LibMTL is not installed" in peers.format_peer_table(result)
    assert not math.isnan(result["methods"]["EW"]["mtlgraph"]["accuracy_mean"])
