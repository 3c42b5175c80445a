"""Pretrained encoders and per-task adapters: the Tonks story with a ResNet and a BERT.

Tonks (tutorial 02) ensembled ResNets over product photos with a BERT over descriptions, and
fixed destructive interference by giving the tasks that fight their own network. This tutorial
does it with real Hugging Face models, loaded by path from a YAML config as downloaded weights
would be. There is no network here, so it first creates a tiny BERT (with its word-piece
vocabulary) and a tiny ResNet and saves them with ``save_pretrained``; the catalogue is
generated too:

- ``photos/*.png``: a product photo, a coloured patch on a grey background, and ``photos.csv``
  naming its ``colour`` (red, green, blue): ``colour_task``, through the ResNet;
- ``descriptions.csv``: a description ("premium red shoe with laces") and the ``category``
  (shoe, hat, coat, bag): ``category_task``, through the BERT;
- ``prices.csv``: a description and the ``price`` in dollars (20, 50 or 90 by the tier word,
  plus noise): ``price_task``, a regression through the BERT. Its loss, in squared dollars, is
  thousands of times larger than the others'.

Three datasets, each labelled for one task, three set-ups of the same config:

1. **shared**: ``category_task`` and ``price_task`` fine-tune one BERT. The price gradients
   swamp the shared encoder and ``category_task`` falls. The interference diagnostics
   (``trainer.diagnostics``) show why: on ``enc`` the category gradients are a few hundred times
   smaller than the price gradients (norm ratio ~0.002), while their cosine is near 0. It is a
   matter of scale, not of opposing directions, so the cosine, the lookahead affinity (a few
   1e-4 either way) and the suggested grouping do not flag it: the norm ratio does (and the
   loss-scale warning the trainer logs at the first evaluation).
2. **two encoders**: ``price_task`` names its own ``hf_encoder`` (``price_enc``, the same
   directory): the category score recovers, at the price of a second copy of the BERT to train
   and save.
3. **LoRA**: one BERT, frozen (``freeze: true``), and a LoRA adapter per task (``type: lora``,
   ``base: enc``): the base exists once, each task trains a few thousand parameters, and the
   checkpoint holds only those (plus the base's path and fingerprint).

The outcome compares, per set-up, the category accuracy, the trainable parameters and the size
of the saved model file.

Run: ``python tutorials/08_pretrained_encoders_and_adapters.py`` (about 30 s)
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from mtlgraph.diagnostics import DiagnosticsReport
from mtlgraph.experiment.build import build_experiment
from mtlgraph.experiment.config import load_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything below is on disk

CATEGORIES = ["shoe", "hat", "coat", "bag"]
COLOURS = {"red": (200, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210)}
COLOUR_IDS = {name: i for i, name in enumerate(COLOURS)}
TIERS = {"basic": 20.0, "classic": 50.0, "premium": 90.0}  # price in dollars, by tier word
FILLER = ["with", "laces", "wool", "soft", "classic", "look", "for", "daily", "use", "new"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 64, "max_position_embeddings": 32}  # fmt: skip


def save_pretrained_models(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A tiny BERT with its word-piece vocabulary and a tiny ResNet, saved as a user's
    downloaded model directories would be."""
    import transformers

    bert_dir, resnet_dir = root / "tiny-bert", root / "tiny-resnet"
    words = sorted({*CATEGORIES, *COLOURS, *TIERS, *FILLER})
    vocab = {t: i for i, t in enumerate([*SPECIAL, *words])}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(bert_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(vocab), **BERT))
        bert.save_pretrained(bert_dir)
        config = transformers.ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
            layer_type="basic",
        )  # fmt: skip
        transformers.ResNetModel(config).save_pretrained(resnet_dir)
    return bert_dir, resnet_dir


def describe(rng: np.random.Generator) -> tuple[str, int, str]:
    """A product description ("premium red shoe with laces"), its category and its tier."""
    category, tier = int(rng.integers(len(CATEGORIES))), str(rng.choice(list(TIERS)))
    words = [tier, str(rng.choice(list(COLOURS))), CATEGORIES[category]]
    words += list(rng.choice(FILLER, size=int(rng.integers(1, 4)), replace=False))
    return " ".join(words), category, tier


def write_catalogue(root: Path, n: int, seed: int = 0) -> None:
    """The photos and the three tables (each split 70/30 into train and test)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "photos").mkdir(parents=True, exist_ok=True)
    photos, descriptions, prices = (
        ["file,colour,split"],
        ["text,category,split"],
        ["text,price,split"],
    )
    for i in range(n):
        split = "train" if i < 0.7 * n else "test"
        colour = str(rng.choice(list(COLOURS)))  # the photo: a coloured patch on grey noise
        pixels = rng.integers(90, 140, size=(16, 16, 3)).astype(np.uint8)
        top, left = rng.integers(0, 8, size=2)
        pixels[top : top + 8, left : left + 8] = COLOURS[colour]
        Image.fromarray(pixels, mode="RGB").save(root / "photos" / f"p{i:04d}.png")
        photos.append(f"p{i:04d}.png,{COLOUR_IDS[colour]},{split}")
        text, category, tier = describe(rng)
        descriptions.append(f"{text},{category},{split}")
        text, category, tier = describe(rng)  # another product: the datasets are disjoint
        prices.append(f"{text},{TIERS[tier] + 5 * rng.normal():.2f},{split}")
    for name, rows in (("photos", photos), ("descriptions", descriptions), ("prices", prices)):
        (root / f"{name}.csv").write_text("\n".join(rows) + "\n")


def config(setup: str, n_epochs: int, every: int) -> dict[str, Any]:
    """The experiment of one set-up: ``shared``, ``two_encoders`` or ``lora``."""
    text = {"pretrained": "tiny-bert", "max_length": 12}  # the BERT's own tokenizer
    width = {"width_of": "enc"}
    modules: dict[str, Any] = {
        "enc": {"type": "hf_encoder", "path": "tiny-bert", "freeze": setup == "lora"},
        "resnet": {"type": "hf_encoder", "path": "tiny-resnet"},
        "colour_head": {"type": "linear", "in_features": {"width_of": "resnet"}, "out_features": 3},
        "category_head": {"type": "linear", "in_features": width, "out_features": 4},
        "price_head": {"type": "linear", "in_features": width, "out_features": 1},
    }
    readers = {"category_task": "enc", "price_task": "enc"}  # task -> the encoder it runs
    if setup == "two_encoders":
        modules["price_enc"] = {"type": "hf_encoder", "path": "tiny-bert"}
        readers["price_task"] = "price_enc"
    if setup == "lora":
        for task in readers:
            adapter = f"{task.removesuffix('_task')}_lora"
            modules[adapter] = {"type": "lora", "base": "enc", "r": 4, "alpha": 8,
                                "target_modules": ["query", "value"]}  # fmt: skip
            readers[task] = adapter
    tasks: dict[str, Any] = {
        "colour_task": {"ops": [{"module": "resnet", "inputs": [["_input_", "image"]]},
                                {"module": "colour_head", "inputs": ["resnet"]}]},
    }  # fmt: skip
    for task, reader in readers.items():
        head = f"{task.removesuffix('_task')}_head"
        tasks[task] = {
            "ops": [
                {"module": reader, "inputs": [["_input_", "text"], ["_input_", "text_mask"]]},
                {"module": head, "inputs": [reader]},
            ]
        }
    tasks["price_task"]["task_type"] = "regression"
    table = {"type": "table", "split_column": "split", "text": {"text": text}}
    datasets = {
        "photos": {
            "source": {"type": "images", "path": "photos.csv", "split_column": "split",
                       "images": {"folder": "photos", "column": "file", "mode": "RGB",
                                  "normalize": {"mean": [0.5] * 3, "std": [0.25] * 3}}},
            "fields": {"image": "file"},
            "labels": {"colour_task": "colour"},
        },
        "descriptions": {
            "source": {**table, "path": "descriptions.csv"},
            "fields": {"text": "text"},
            "labels": {"category_task": "category"},
        },
        "prices": {
            "source": {**table, "path": "prices.csv"},
            "fields": {"text": "text"},
            "labels": {"price_task": "price"},
        },
    }  # fmt: skip
    trainer: dict[str, Any] = {"n_epochs": n_epochs, "lr": 0.003, "seed": 0,
                               "progress_bar": False, "eval_splits": ["test"],
                               "evaluation_freq": 0}  # fmt: skip  # test scores at the end
    if setup == "lora":
        trainer["param_groups"] = {"*_lora": {"lr": 0.02}}  # adapters take a larger step
    if setup == "shared":
        trainer["diagnostics"] = {"every": every, "batch_size": 64}
    return {
        "experiment": f"tonks_{setup}",
        "modules": modules,
        "tasks": tasks,
        "data": {"batch_size": 32, "shuffle": True, "datasets": datasets},
        "trainer": trainer,
    }


def run(root: Path, setup: str, n_epochs: int, every: int) -> dict[str, Any]:
    """Train one set-up from its YAML file; its test scores, trainable parameters, saved model
    size and diagnostics report."""
    path = root / f"{setup}.yaml"
    path.write_text(yaml.safe_dump(config(setup, n_epochs, every), sort_keys=False))
    exp = build_experiment(load_config(path), root / "runs" / setup)
    exp.trainer.fit(exp.model, exp.loaders)
    scores = exp.trainer.history[-1]  # the evaluation after training: the test splits
    trainable = sum(p.numel() for p in exp.model.parameters() if p.requires_grad)
    exp.model.save(root / f"{setup}.pt")
    report: DiagnosticsReport | None = exp.trainer.diagnostics
    return {
        "category": scores["category_task/descriptions/test/accuracy"],
        "colour": scores["colour_task/photos/test/accuracy"],
        "price_mae": scores["price_task/prices/test/mae"],
        "trainable": trainable,
        "file_kb": (root / f"{setup}.pt").stat().st_size / 1024,
        "report": report,
    }


def main(n: int = 600, n_epochs: int = 6, every: int = 10, verbose: bool = True) -> dict[str, Any]:
    """Create the models and the catalogue, train the three set-ups, compare them.

    Args:
        n: Products per table (70% train, 30% test).
        n_epochs: Epochs of each set-up.
        every: Optimizer steps between interference probes (shared set-up).
        verbose: Print the comparison and the diagnostics.
    """
    say = print if verbose else (lambda *args: None)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: faster and steadier on one thread
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            save_pretrained_models(root)
            write_catalogue(root, n)
            results = {s: run(root, s, n_epochs, every) for s in ("shared", "two_encoders", "lora")}
    finally:
        torch.set_num_threads(threads)
    say(
        f"{'set-up':14s} {'category acc':>12s} {'colour acc':>10s} {'trainable':>10s} "
        f"{'file KB':>8s}"
    )
    for setup, r in results.items():
        say(f"{setup:14s} {r['category']:12.3f} {r['colour']:10.3f} {r['trainable']:10d} "
            f"{r['file_kb']:8.0f}")  # fmt: skip
    report = results["shared"]["report"]
    assert report is not None
    say("\nThe diagnostics of the shared set-up:\n")
    say(report.to_text())
    pair = report.pair("category_task", "price_task", "enc")
    assert pair is not None and pair.norm_ratio < 0.01, "price gradients swamp the shared BERT"
    assert abs(pair.mean_cosine) < 0.1, "a matter of scale, not of direction"
    shared, two, lora = (results[s] for s in ("shared", "two_encoders", "lora"))
    assert shared["category"] < two["category"] - 0.3, "a second encoder should fix category"
    assert shared["category"] < lora["category"] - 0.3, "per-task adapters should fix category"
    assert lora["trainable"] < shared["trainable"] < two["trainable"]
    assert lora["file_kb"] < shared["file_kb"] < two["file_kb"]
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=600)
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    main(n=args.products, n_epochs=args.epochs)
