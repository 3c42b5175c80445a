"""A YAML config declares a pretrained encoder by local path and a LoRA adapter per task: two
tasks on two datasets train, resume bit-exactly, predict new text with the saved tokenizer and
export a task subset equal to eager."""

from __future__ import annotations

import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from mtlgraph.experiment.cli import main
from pretrained.models import WORDS

pytest.importorskip("transformers")

REVIEWS = ["good shoe", "great hat", "bad coat", "awful price", "very good size", "not good"]
PRODUCTS = ["red shoe", "blue hat", "green coat", "red hat", "blue coat", "green shoe"]


def _table(path: Path, texts: list[str], label: object, column: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    rows = [f"{column},label,split"]
    for i in range(n):
        text = rng.choice(texts)
        split = "train" if i < n - 8 else "valid"
        rows.append(f"{text},{label(text)},{split}")  # type: ignore[operator]
    path.write_text("\n".join(rows) + "\n")


def _config(tmp_path: Path, bert_dir: Path) -> Path:
    _table(tmp_path / "reviews.csv", REVIEWS, lambda t: int("good" in t or "great" in t),
           "review", 40, 1)  # fmt: skip
    colours = ["red", "blue", "green"]
    _table(tmp_path / "products.csv", PRODUCTS, lambda t: colours.index(t.split()[0]),
           "desc", 32, 2)  # fmt: skip
    text = {"pretrained": str(bert_dir), "max_length": 8}
    lora = {"type": "lora", "base": "enc", "r": 2, "target_modules": ["query", "value"]}
    cfg = {
        "experiment": "tiny_bert",
        "modules": {
            "enc": {"type": "hf_encoder", "path": str(bert_dir), "freeze": True},
            "review_lora": lora,
            "product_lora": lora,
            "review_head": {
                "type": "linear",
                "in_features": {"width_of": "enc"},
                "out_features": 2,
            },
            "product_head": {
                "type": "linear",
                "in_features": {"width_of": "enc"},
                "out_features": 3,
            },
        },
        "tasks": {
            task: {
                "ops": [
                    {
                        "module": adapter,
                        "inputs": [["_input_", field], ["_input_", f"{field}_mask"]],
                    },
                    {"module": head, "inputs": [adapter]},
                ]
            }
            for task, adapter, head, field in [
                ("sentiment", "review_lora", "review_head", "review"),
                ("category", "product_lora", "product_head", "desc"),
            ]
        },
        "data": {
            "batch_size": 8,
            "shuffle": True,
            "datasets": {
                "reviews": {
                    "source": {
                        "type": "table",
                        "path": "reviews.csv",
                        "split_column": "split",
                        "text": {"review": text},
                    },
                    "fields": {"review": "review"},
                    "labels": {"sentiment": "label"},
                },
                "products": {
                    "source": {
                        "type": "table",
                        "path": "products.csv",
                        "split_column": "split",
                        "text": {"desc": text},
                    },
                    "fields": {"desc": "desc"},
                    "labels": {"category": "label"},
                },
            },
        },
        "trainer": {"n_epochs": 2, "lr": 0.05, "progress_bar": False},
    }
    path = tmp_path / "bert.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_lora_per_task_trains_resumes_predicts_and_exports(tmp_path: Path, bert_dir: Path) -> None:
    config = str(_config(tmp_path, bert_dir))
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(["train", config, f"trainer.run_dir={ref}", "--quiet"]) == 0
    assert main(["train", config, f"trainer.run_dir={run}", "trainer.n_epochs=1", "--quiet"]) == 0
    assert main(["train", config, "--resume", str(run), "--quiet"]) == 0

    expected = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)
    got = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    steps = expected["run"]["progress"]["global_step"]
    assert steps == got["run"]["progress"]["global_step"] == 2 * (4 + 3)  # 2 epochs, 32+24 rows
    tensors = {k: v for k, v in expected["model"].items() if isinstance(v, torch.Tensor)}
    assert tensors and all(torch.equal(v, got["model"][k]) for k, v in tensors.items())
    # the frozen encoder is left out: adapters and heads only, with the base's path and hash
    names = sorted(tensors)
    assert not any("word_embeddings" in k or "query.weight" in k for k in names)
    assert any(k.endswith("review_lora.A.0") for k in names)
    extra = expected["model"]["module_pool.review_lora.base._extra_state"]
    assert extra["path"] == str(bert_dir) and len(extra["fingerprint"]) == 32

    new = tmp_path / "new.csv"
    new.write_text("review\ngood hat\nawful coat\n")
    preds = tmp_path / "preds.jsonl"
    args = ["--checkpoint", str(run), "--data", str(new), "--tasks", "sentiment"]
    assert main(["predict", config, *args, "--out", str(preds)]) == 0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert len(rows) == 2

    from mtlgraph.data.sources.tokenizer import load_tokenizer
    from mtlgraph.experiment.build import build_model
    from mtlgraph.experiment.config import load_config

    tok = load_tokenizer(run / "vocab" / "reviews.review.json")
    ids = [tok.encode(t) for t in ("good hat", "awful coat")]
    assert ids[0].tolist() == [2, 5 + WORDS.index("good"), 5 + WORDS.index("hat"), 3]
    model = build_model(load_config(config))
    model.load(run / "checkpoints" / "last.pt")
    model.eval()
    width = max(len(i) for i in ids)
    X = {
        "review": torch.stack([torch.nn.functional.pad(i, (0, width - len(i))) for i in ids]),
        "review_mask": torch.stack([torch.arange(width) < len(i) for i in ids]),
    }
    with torch.no_grad():
        probs = torch.softmax(model(X, ["sentiment"])["review_head"], dim=1)
    assert torch.allclose(torch.tensor([r["sentiment/probs"] for r in rows]), probs, atol=1e-6)

    from mtlgraph.inference.export import run_exported

    formats = [("torch_export", "sentiment.pt2")]
    if all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime")):
        formats.append(("onnx", "sentiment.onnx"))  # the onnx extra (CI installs it)
    for fmt, name in formats:
        program = model.export(tmp_path / name, tasks=["sentiment"], format=fmt, example=X)
        out = run_exported(program, X)["sentiment"]
        assert float((out - probs).abs().max()) < 1e-4  # the adapter merged into the weights
        # the command line traces on the config's rows (their text and mask fields), with a
        # dynamic length bounded by the tokenizer's max_length (BERT has 32 positions)
        cli = tmp_path / f"cli-{name}"
        export = ["export", config, "--checkpoint", str(run), "--tasks", "sentiment"]
        assert main([*export, "--out", str(cli), "--quiet"]) == 0
        assert float((run_exported(cli, X)["sentiment"] - probs).abs().max()) < 1e-4


def test_relative_model_paths_become_absolute_in_the_run_config(
    tmp_path: Path, bert_dir: Path
) -> None:
    from mtlgraph.experiment.config import dump_run_config, load_config

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "bert").symlink_to(bert_dir)
    path = _config(tmp_path, bert_dir)
    cfg = yaml.safe_load(path.read_text())
    cfg["modules"]["enc"]["path"] = "models/bert"
    text = {"pretrained": "models/bert", "max_length": 8}
    cfg["data"]["datasets"]["reviews"]["source"]["text"]["review"] = text
    path.write_text(yaml.safe_dump(cfg))
    run = yaml.safe_load(dump_run_config(load_config(path)))
    where = str((tmp_path / "models" / "bert").resolve())  # the data paths' rule
    assert run["modules"]["enc"]["path"] == where
    assert run["data"]["datasets"]["reviews"]["source"]["text"]["review"]["pretrained"] == where
