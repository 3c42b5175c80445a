"""The tutorials run in the suite with their outcomes asserted."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, TUTORIALS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_01_mtl_basics() -> None:
    model, scores = load("01_mtl_basics").main(N=1000, n_epochs=10)
    assert len(model.tasks) == 3
    assert len(model.module_pool) == 4  # 1 shared module plus 3 separate task heads
    expected = {
        f"{task}/{ds}/{split}/accuracy"
        for task, ds in (
            ("circle_task", "circleDataset"),
            ("square_task", "squareDataset"),
            ("inv_circle_task", "InvCircleDataset"),
        )
        for split in ("train", "valid", "test")
    }
    assert set(scores) == expected
    for key in expected:
        if "/test/" in key:
            assert scores[key] >= 0.9, (key, scores[key])


def test_02_multi_dataset_ensembles() -> None:
    """A conflicting task on the shared image trunk hurts the digit task; the diagnostics show
    it and suggest a separate trunk; with its own trunk the digit task recovers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: faster and steadier on one thread
    try:
        result = load("02_multi_dataset_ensembles").main(verbose=False)
    finally:
        torch.set_num_threads(threads)
    baseline, shared, separate = result["baseline"], result["shared"], result["separate"]
    assert baseline >= 0.85
    assert shared <= baseline - 0.3  # destructive interference
    assert separate >= baseline - 0.04  # recovered with a second image trunk
    step2 = result["reports"]["2 digit + loop, shared image trunk"]
    assert step2.grouping == (("digit_task", "loop_task"),)  # related tasks: keep sharing
    report = result["reports"]["3 + price on the shared image trunk"]
    pair = report.pair("digit_task", "price_task", "image_trunk")
    assert pair is not None
    assert pair.mean_cosine < 0  # the price gradients point against the digit's, on average
    assert pair.norm_ratio < 0.05  # and are over 20x larger: price dominates the trunk
    assert report.affinity_of("price_task", "digit_task") < 0  # a price step hurts the digit
    value, error = report.mutual("digit_task", "price_task")
    assert value + 2 * error < 0
    assert report.grouping == (("digit_task", "loop_task"), ("price_task",))


def test_03_sin_cos_regression() -> None:
    results = load("03_sin_cos_regression").main(n=800, n_epochs=12, seed=0)
    assert set(results) == {"equal weights", "static weights", "dynamic weights"}
    for name, r in results.items():
        assert r["sin_mse"] < 0.02 and r["cos_mse"] < 0.02, name  # targets have variance 0.5
    assert results["static weights"]["weights"] == {"sin": 1.0, "cos": 0.5}
    lo, hi = results["dynamic weights"]["cos_weight_range"]
    assert lo < 1.0 < hi  # inverse_metric moved the weights between evaluations
    w = results["dynamic weights"]["weights"]
    assert abs(w["sin"] + w["cos"] - 2.0) < 1e-9  # renormalised: the weights sum to K


@pytest.mark.slow
def test_04_loss_scales_lrs_and_stop_gradient() -> None:
    result = load("04_loss_scales_lrs_and_stop_gradient").main(n=2000, n_epochs=30, seed=0)
    one = result["lesson_1"]
    # a plain sum lets the dwell seconds own the trunk; uncertainty weighting rescues the click
    assert one["uncertainty"]["click_auc"] > one["sum"]["click_auc"] + 0.15
    assert one["uncertainty"]["dwell_r2"] > one["sum"]["dwell_r2"] - 0.02
    assert one["uncertainty"]["dwell_weight"] < 0.05 < one["uncertainty"]["click_weight"]
    two = result["lesson_2"]
    assert two["lr_trunk"] == (0.005, 0.01) and two["lr_heads"] == (0.025, 0.05)
    three = result["lesson_3"]
    assert three["dwell_loss_reaches_with_stop_gradient"] == ["dwell_head", "trunk"]
    assert three["dwell_loss_reaches_without"] == ["click_head", "dwell_head", "trunk"]
    assert three["dwell_r2"] > 0.8 and three["click_accuracy"] > 0.7


def test_05_two_datasets_cross_task() -> None:
    result = load("05_two_datasets_cross_task").main(n=1200, n_epochs=6, seed=0)
    for name in ("yelp", "imdb"):
        assert result["f1"][(name, "single")] > 0.85 and result["f1"][(name, "mtl")] > 0.85
        # each domain's test data through the other domain's head: MTL generalises sentiment
        assert result["cross"][(name, "mtl")] > result["cross"][(name, "single")] + 0.05
    agreement = result["agreement"]
    # the multi-task model's word ranking agrees with each single-task model more than the
    # single-task models agree with each other (the post's scatter plots)
    assert agreement[("yelp", "mtl")] > agreement[("yelp", "imdb")]
    assert agreement[("imdb", "mtl")] > agreement[("yelp", "imdb")]


@pytest.mark.slow
def test_06_bring_your_own_data() -> None:
    """Files on disk (PNG photos, a CSV, a Parquet click log) -> a YAML config -> a trained
    three-task model, with temperature sampling and two loader workers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: faster and steadier on one thread
    try:
        result = load("06_bring_your_own_data").main(
            n_products=500, n_clicks=1000, n_epochs=5, steps_per_epoch=40, verbose=False
        )
    finally:
        torch.set_num_threads(threads)
    scores = result["scores"]
    assert set(scores) == {
        "category_task/catalog/test/accuracy",
        "price_task/catalog/test/mse",
        "price_task/catalog/test/mae",
        "price_task/catalog/test/r2",
        "click_task/clicks/test/accuracy",
    }
    assert scores["category_task/catalog/test/accuracy"] >= 0.75  # 10 digits from the photos
    assert scores["price_task/catalog/test/r2"] >= 0.8  # the price from the description's words
    assert scores["click_task/clicks/test/accuracy"] >= 0.75  # photo + price; half the rows click
    assert result["clicks_file"] == "clicks.parquet"  # the tables extra is installed
    vocabulary = result["vocabulary"]
    assert vocabulary[:2] == ["<pad>", "<unk>"] and {"basic", "classic", "premium"} <= set(
        vocabulary
    )


def test_07_weak_supervision() -> None:
    """Soft labels from weighted LF votes train an end model at least as accurate as hard
    majority votes do (measured at the defaults: 0.971 vs 0.865; true labels 0.969)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = load("07_weak_supervision").main(n=2000, n_epochs=15, seed=0, verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert result["soft"] >= result["hard_majority"]
    assert result["soft"] >= 0.93
    assert result["true_labels"] >= 0.95
    assert result["soft"] >= result["true_labels"] - 0.05


def test_08_pretrained_encoders_and_adapters() -> None:
    """A price regression swamps a BERT it shares with the category task (the diagnostics show
    its gradients hundreds of times larger, at a cosine near 0); a second BERT or a
    LoRA adapter per task on one frozen BERT gives the category its accuracy back, the adapters
    with the fewest trainable parameters and the smallest saved model."""
    pytest.importorskip("transformers")
    result = load("08_pretrained_encoders_and_adapters").main(n=400, n_epochs=5, verbose=False)
    shared, two, lora = result["shared"], result["two_encoders"], result["lora"]
    assert shared["category"] <= 0.5  # four categories: near chance under the price gradients
    assert two["category"] >= 0.95 and lora["category"] >= 0.95
    assert min(r["colour"] for r in result.values()) >= 0.95  # the ResNet reads the photos
    assert lora["trainable"] < 0.4 * shared["trainable"] < 0.4 * two["trainable"]
    assert lora["file_kb"] < 0.6 * shared["file_kb"] and two["file_kb"] > 1.5 * shared["file_kb"]
    pair = shared["report"].pair("category_task", "price_task", "enc")
    assert pair.norm_ratio < 0.01  # price gradients over 100x the category's on the BERT
    assert abs(pair.mean_cosine) < 0.1  # a matter of scale, not of direction
