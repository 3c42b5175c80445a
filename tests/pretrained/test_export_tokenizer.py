"""Export metadata embeds a subword tokenizer, so a server rebuilds the training ids from the
metadata alone (``tokenizers`` only, no run directory, no mtlgraph)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from mtlgraph import MultitaskClassifier, Operation, Task
from mtlgraph.data.sources.tokenizer import SubwordTokenizer
from mtlgraph.inference.export import sidecar_path

tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["good shoe", "a very good red hat and a bad blue coat", "zzz unknown words"]


class MeanEmbedding(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(size, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).mean(1)


def test_a_server_rebuilds_the_ids_from_the_export_metadata_alone(
    tmp_path: Path, bert_dir: Path
) -> None:
    tok = SubwordTokenizer.pretrained(bert_dir, max_length=6)
    file = tok.save(tmp_path / "run" / "vocabularies" / "reviews.text.json")
    (tmp_path / "out").mkdir()
    ops = [Operation("enc", [("_input_", "text")]), Operation("head", ["enc"])]
    task = Task("t", {"enc": MeanEmbedding(len(tok)), "head": nn.Linear(4, 2)}, ops)
    example = {"text": torch.stack([tok.encode(TEXTS[1]), tok.encode(TEXTS[1])])}
    out = MultitaskClassifier([task]).export(
        tmp_path / "out" / "t.pt2", ["t"], example=example, vocabularies={"text": file}
    )
    entry = json.loads(sidecar_path(out).read_text())["inputs"][0]["vocabulary"]
    assert entry["file"] == "../run/vocabularies/reviews.text.json"
    assert (entry["type"], entry["kind"], entry["max_length"]) == ("subword", "pretrained", 6)
    assert entry["fingerprint"] == tok.fingerprint
    server = tokenizers.Tokenizer.from_str(json.dumps(entry["tokenizer"]))
    server.enable_truncation(entry["max_length"])
    for text in TEXTS:
        assert server.encode(text).ids == tok.encode(text).tolist()
    assert len(server.encode(TEXTS[1]).ids) == 6  # cut as in training, [SEP] kept


def test_a_file_that_is_no_saved_tokenizer_is_named_not_embedded(tmp_path: Path) -> None:
    from mtlgraph.inference.export import vocabulary_entry

    (tmp_path / "tokenizer.json").write_text('{"model": {}}')  # JSON, but not mtlgraph's
    assert vocabulary_entry(tmp_path / "tokenizer.json", tmp_path) == {"file": "tokenizer.json"}
