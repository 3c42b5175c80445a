"""Two separately labelled datasets, one model: the GumGum sentiment study.

Restaurant reviews (Yelp-like) and movie reviews (IMDB-like) are two *different* datasets,
each labelled only for its own sentiment task. Both domains share general sentiment words
("awesome", "poor"); each also has its own ("delicious", "boring") and neutral filler. Following
the GumGum post, every model is a bag of words -> one sigmoid hidden layer -> an output layer:

- two single-task models, one per dataset;
- one multi-task model: the bag-of-words layer and hidden layer are shared (same module names),
  each task keeps its own output layer.

Three views, as in the post:

1. held-out F1 of each task, single-task vs multi-task;
2. word importance: each word's summed absolute weights into the hidden layer, and how the
   rankings of the models agree (Spearman) — the multi-task model should agree with *both*
   single-task models more than they agree with each other;
3. cross-task evaluation: each domain's test data through the *other* domain's output layer
   (``remap_labels``), which never saw that data. The multi-task model's shared layers
   generalise sentiment, so its cross-task accuracy beats the single-task models' cross-domain
   accuracy.

Run: ``python tutorials/05_two_datasets_cross_task.py``
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn

from mtlgraph import (
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Scorer,
    Task,
    Trainer,
)
from mtlgraph.data.synthetic import make_reviews_dataset

DOMAINS = {"yelp": "restaurants", "imdb": "movies"}


def sentiment_task(name: str, shared: dict[str, nn.Module], width: int) -> Task:
    """``<name>_task``: bag of words -> sigmoid hidden layer -> its own output layer."""
    return Task(
        name=f"{name}_task",
        module_pool=nn.ModuleDict({**shared, f"{name}_head": nn.Linear(width, 2)}),
        op_sequence=[
            Operation("bag_of_words", [("_input_", "tokens")]),
            Operation("hidden", ["bag_of_words"]),
            Operation(f"{name}_head", ["hidden"]),
        ],
        scorer=Scorer(metrics=["f1", "accuracy"]),
    )


def trunk(vocab_size: int, width: int) -> dict[str, nn.Module]:
    """The layers a multi-task model shares: word weights into the hidden layer, its sigmoid."""
    return {
        "bag_of_words": nn.EmbeddingBag(vocab_size, width, mode="sum", padding_idx=0),
        "hidden": nn.Sigmoid(),
    }


def word_importance(model: MultitaskClassifier) -> np.ndarray:
    """Each word's summed absolute weight into the hidden layer (the post's measure)."""
    weight = model.module_pool["bag_of_words"].weight.detach()
    return weight.abs().sum(dim=1).numpy()


def main(
    n: int = 3000, vocab_size: int = 200, width: int = 16, n_epochs: int = 10, seed: int = 0
) -> dict[str, Any]:
    """Train two single-task models and one multi-task model; return all three views."""
    loaders: dict[str, list[DictDataLoader]] = {}
    for name, domain in DOMAINS.items():
        data = make_reviews_dataset(n, domain=domain, vocab_size=vocab_size, seed=seed)
        loaders[name] = [
            DictDataLoader(
                DictDataset(
                    name,
                    split,
                    {"tokens": torch.from_numpy(arrays["tokens"])},
                    {f"{name}_task": torch.from_numpy(arrays["label"])},
                ),
                batch_size=32,
                shuffle=split == "train",
                seed=seed,
            )
            for split, arrays in data.items()
        ]
    trainer_config = {"n_epochs": n_epochs, "lr": 0.01, "progress_bar": False, "seed": seed}

    models: dict[str, MultitaskClassifier] = {}
    for name in DOMAINS:  # single-task baselines: same architecture, one dataset each
        torch.manual_seed(seed)
        models[name] = MultitaskClassifier([sentiment_task(name, trunk(vocab_size, width), width)])
        Trainer(**trainer_config).fit(models[name], loaders[name])
    torch.manual_seed(seed)
    shared = trunk(vocab_size, width)  # the same objects, under the same names, in both tasks
    models["mtl"] = MultitaskClassifier([sentiment_task(name, shared, width) for name in DOMAINS])
    Trainer(**trainer_config).fit(models["mtl"], loaders["yelp"] + loaders["imdb"])

    test = {name: [dl for dl in loaders[name] if dl.dataset.split == "test"] for name in DOMAINS}
    f1 = {}
    for name in DOMAINS:
        f1[(name, "single")] = models[name].score(test[name])[f"{name}_task/{name}/test/f1"]
        f1[(name, "mtl")] = models["mtl"].score(test[name])[f"{name}_task/{name}/test/f1"]

    # Cross-task: each domain's test data through the other domain's output layer.
    cross = {}
    for data_name, head_name in (("yelp", "imdb"), ("imdb", "yelp")):
        remap = {f"{data_name}_task": f"{head_name}_task"}
        key = f"{head_name}_task/{data_name}/test/accuracy"
        cross[(data_name, "single")] = models[head_name].score(test[data_name], remap)[key]
        cross[(data_name, "mtl")] = models["mtl"].score(test[data_name], remap)[key]

    importance = {name: word_importance(m) for name, m in models.items()}
    agreement = {
        pair: float(spearmanr(importance[pair[0]][1:], importance[pair[1]][1:])[0])  # 0 pads
        for pair in (("yelp", "imdb"), ("yelp", "mtl"), ("imdb", "mtl"))
    }
    top = {name: (np.argsort(-imp[1:])[:5] + 1).tolist() for name, imp in importance.items()}
    return {
        "f1": f1,
        "cross": cross,
        "agreement": agreement,
        "top_words": top,
        "vocab_size": vocab_size,
    }


def word_kind(word: int, vocab_size: int) -> str:
    """Which part of the generated vocabulary a word id belongs to (see make_reviews_dataset)."""
    tenth = vocab_size // 10
    kinds = ["shared+", "shared-", "food+", "food-", "film+", "film-"]
    index = (word - 1) // tenth
    return kinds[index] if index < len(kinds) else "neutral"


def report(result: dict[str, Any]) -> str:
    f1, cross = result["f1"], result["cross"]
    lines = ["held-out F1            single-task   multi-task"]
    for name in DOMAINS:
        lines.append(f"  {name:<20} {f1[(name, 'single')]:11.3f}  {f1[(name, 'mtl')]:11.3f}")
    lines += ["", "cross-task accuracy    single-task   multi-task   (other domain's head)"]
    for name, other in (("yelp", "imdb"), ("imdb", "yelp")):
        label = f"{name} data, {other} head"
        lines.append(f"  {label:<20} {cross[(name, 'single')]:11.3f}  {cross[(name, 'mtl')]:11.3f}")
    lines += ["", "word-importance rank agreement (Spearman)"]
    for (a, b), rho in result["agreement"].items():
        lines.append(f"  {a:>4} vs {b:<4} {rho:6.3f}")
    lines += ["", "top-5 words by importance (vocabulary part)"]
    for name, words in result["top_words"].items():
        kinds = ", ".join(f"{w}:{word_kind(w, result['vocab_size'])}" for w in words)
        lines.append(f"  {name:<5} {kinds}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3000, help="reviews per domain")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(report(main(n=args.n, n_epochs=args.epochs, seed=args.seed)))
