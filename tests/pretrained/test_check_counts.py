"""``mtlgraph check`` counts every parameter once: a LoRA base's weights on its own line (frozen),
each adapter only its own A and B (trainable)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mtlgraph.experiment.cli import main
from pretrained.test_yaml_lora import _config

pytest.importorskip("transformers")


def _row(lines: list[str], name: str) -> list[str]:
    return next(ln.split() for ln in lines if ln.split()[:1] == [name])


def test_check_counts_a_lora_base_once_and_splits_trainable_from_frozen(
    tmp_path: Path, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    transformers = pytest.importorskip("transformers")
    bert = sum(p.numel() for p in transformers.BertModel.from_pretrained(bert_dir).parameters())
    assert main(["check", str(_config(tmp_path, bert_dir))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1] == "modules (5; shared = used by several tasks):"
    enc = _row(lines, "enc")
    assert enc[:6] == ["enc", "hf_encoder", f"{bert:,}", "params", "0", "trainable"]
    assert " ".join(enc[6:]) == "base of product_lora, review_lora"
    adapter = 2 * (16 * 2 + 2 * 16)  # r=2 on query and value of the one layer (width 16)
    for name in ("review_lora", "product_lora"):
        assert _row(lines, name)[2:5] == [f"{adapter:,}", "params", f"{adapter:,}"]
    heads = (16 * 2 + 2) + (16 * 3 + 3)
    trainable = 2 * adapter + heads
    total = bert + trainable
    assert (
        f"parameters: {total:,} ({trainable:,} trainable, {bert:,} frozen; "
        "a parameter several modules hold is counted once)"
    ) in lines
