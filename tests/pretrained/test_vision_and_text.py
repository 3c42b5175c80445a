"""A vision encoder reading images decoded with its processor's settings, exported equal to
eager; a word-piece tokenizer trained on the training split, saved and
reused by the run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mtlgraph.data.sources.tokenizer import SubwordTokenizer, load_tokenizer
from mtlgraph.experiment.build import build_experiment
from mtlgraph.experiment.config import load_config
from mtlgraph.inference.export import run_exported

pytest.importorskip("transformers")


def _images(tmp_path: Path, resnet_dir: Path) -> Path:
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = ["file,label"]
    for i in range(12):
        colour = (200, 30, 30) if i % 2 else (30, 30, 200)
        Image.new("RGB", (20 + i, 24), colour).save(tmp_path / "img" / f"{i}.png")
        rows.append(f"{i}.png,{i % 2}")
    (tmp_path / "pics.csv").write_text("\n".join(rows) + "\n")
    cfg = {
        "modules": {
            "enc": {"type": "hf_encoder", "path": str(resnet_dir), "pooling": "pooler"},
            "head": {"type": "linear", "in_features": {"width_of": "enc"}, "out_features": 2},
        },
        "tasks": {
            "colour": {
                "ops": [
                    {"module": "enc", "inputs": [["_input_", "image"]]},
                    {"module": "head", "inputs": ["enc"]},
                ]
            }
        },
        "data": {
            "batch_size": 4,
            "datasets": {
                "pics": {
                    "source": {
                        "type": "images",
                        "path": "pics.csv",
                        "fractions": {"train": 0.75, "valid": 0.25},
                        "images": {"folder": "img", "processor": str(resnet_dir)},
                    },
                    "fields": {"image": "file"},
                    "labels": {"colour": "label"},
                }
            },
        },
        "trainer": {"n_epochs": 3, "lr": 0.05, "progress_bar": False},
    }
    path = tmp_path / "pics.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_resnet_reads_processor_decoded_images_and_exports(
    tmp_path: Path, resnet_dir: Path
) -> None:
    exp = build_experiment(load_config(_images(tmp_path, resnet_dir)))
    exp.trainer.fit(exp.model, exp.loaders)
    X, _ = next(iter(exp.loaders[0]))
    # the processor's size (16) and normalisation ((x - 0.5) / 0.2 for red pixels 200/255)
    assert X["image"].shape[1:] == (3, 16, 16)
    assert float(X["image"][0, 0, 0, 0]) == pytest.approx(
        (200 / 255 - 0.5) / 0.2 if X["image"][0, 0, 0, 0] > 0 else (30 / 255 - 0.5) / 0.2, abs=1e-2
    )
    assert exp.model.score(exp.loaders)["colour/pics/train/accuracy"] == 1.0
    exp.model.eval()
    with torch.no_grad():
        eager = torch.softmax(exp.model(X, ["colour"])["head"], dim=1)
    path = exp.model.export(tmp_path / "m.pt2", tasks=["colour"], example=X)
    assert float((run_exported(path, X)["colour"] - eager).abs().max()) < 1e-4


def test_a_wordpiece_tokenizer_is_trained_saved_and_reused(tmp_path: Path) -> None:
    texts = ["great shoes", "bad price", "great price and shoes", "bad hat"]
    rows = ["review,label"] + [f"{texts[i % 4]},{i % 2}" for i in range(20)]
    (tmp_path / "r.csv").write_text("\n".join(rows) + "\n")
    bert = {"model_type": "bert", "vocab_size": 64, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16}  # fmt: skip
    cfg = {
        "modules": {
            "enc": {"type": "hf_encoder", "config": bert, "pooling": "cls"},
            "head": {"type": "linear", "in_features": {"width_of": "enc"}, "out_features": 2},
        },
        "tasks": {
            "t": {
                "ops": [
                    {
                        "module": "enc",
                        "inputs": [["_input_", "review"], ["_input_", "review_mask"]],
                    },
                    {"module": "head", "inputs": ["enc"]},
                ]
            }
        },
        "data": {
            "datasets": {
                "r": {
                    "source": {
                        "type": "table",
                        "path": "r.csv",
                        "fractions": {"train": 0.8, "valid": 0.2},
                        "text": {
                            "review": {"kind": "wordpiece", "vocab_size": 64, "max_length": 6}
                        },
                    },
                    "fields": {"review": "review"},
                    "labels": {"t": "label"},
                }
            }
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    first = build_experiment(load_config(path), run)
    saved = load_tokenizer(run / "vocab" / "r.review.json")
    assert isinstance(saved, SubwordTokenizer) and saved.kind == "wordpiece"
    assert len(saved) <= 64 and saved.token_id("[PAD]") == 0
    assert first.trainer.experiment_config["vocabularies"] == {"r.review": saved.fingerprint}
    ids = first.datasets[0].X_dict["review"][0].tolist()
    assert ids[0] == saved.token_id("[CLS]") and ids[-1] == saved.token_id("[SEP]")
    assert len(ids) <= 6
    again = build_experiment(load_config(path), run)  # retrained: the same, so accepted
    assert again.trainer.experiment_config["vocabularies"] == {"r.review": saved.fingerprint}
