"""bench/finetune.py: its hand-written loop and mtlgraph train the same weights, and its K-task
table measures what it says. Outcomes only; no timing thresholds."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from bench import finetune


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return finetune.save_encoder(tmp_path_factory.mktemp("bench"), hidden=16, layers=1)


def test_the_hand_loop_and_mtlgraph_train_the_same_weights(encoder: Path) -> None:
    data = finetune.make_data(encoder, rows=24, length=8)
    steps = finetune.batches(data, 16)
    assert [i for i, _ in steps] == [0, 1, 0, 1]  # round robin over the two datasets
    _, hand = finetune.hand_fit(encoder, steps, epochs=1)
    _, ours = finetune.mtlgraph_fit(encoder, data, 16, epochs=1)
    assert finetune.max_difference(hand, ours) < 1e-6


def test_lora_trains_and_saves_a_fraction_of_the_copies(encoder: Path, tmp_path: Path) -> None:
    lora = finetune.k_tasks(encoder, 2, "lora", 1, tmp_path / "lora")
    copies = finetune.k_tasks(encoder, 2, "copies", 1, tmp_path / "copies")
    assert lora["trainable"] == 2 * (2 * 8 * 16 * 2 + 16 * 2 + 2)  # A, B on query/value; heads
    assert copies["trainable"] > 10 * lora["trainable"]
    assert lora["checkpoint_mb"] < copies["checkpoint_mb"] / 3
    assert copies["state_mb"] == pytest.approx(16 * copies["trainable"] / 2**20)
