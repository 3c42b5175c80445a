"""Fine-tuning a pretrained encoder: mtlgraph's Trainer vs a hand-written loop, and per-task LoRA
adapters vs fully fine-tuned copies, in one run.

Part 1, step time: a BERT-shaped model (``--hidden 128``, 2 layers, 4 heads, sequences of 32
tokens) is created from a config, saved with ``save_pretrained`` and loaded back by path, as
downloaded weights are. Two tasks, two datasets of pre-tokenised descriptions (a word-piece
tokenizer made from the bench's vocabulary; fixed-length ids and attention masks), batch 16,
alternating datasets (``round_robin``), Adam lr 1e-4 with the update mtlgraph picks on the CPU
(``fused=True``), the same initial weights:

- *hand*: ``transformers.AutoModel`` from the directory, masked mean pooling, a linear head per
  task, cross-entropy, ``backward``, ``optimizer.step``, ``zero_grad(set_to_none=True)``; the
  batches sliced once before training;
- *mtlgraph*: ``Trainer.fit`` on the same batches, the encoder as ``hf_encoder`` (``path``,
  ``pooling: mean``).

Fits alternate; medians of the per-step times are compared, and the final weights of both are
checked to agree (so both really do the same work). Target (DESIGN.md): mtlgraph/hand <= 1.05.

Part 2, K tasks (K = 2, 4, 8), each a linear head on a BERT of ``--tasks-hidden 256`` and 4
layers, ``--steps`` batches per task in round robin. *lora*: one frozen encoder and a LoRA
adapter per task (``r=8`` on ``query``/``value``); *copies*: K fully fine-tuned encoders.
Reported: trainable parameters, the bytes of parameters + gradients + Adam state, how far the
peak RSS of the process grew while building and training (one subprocess per set-up; CUDA max
memory on a GPU) and the size of the run's checkpoint (``last.pt``: trainable weights and
optimizer state; the frozen encoder is left out, its path and fingerprint stand in).

Run: ``python bench/finetune.py [--repeats 5] [--quick] [--steps 2] [--skip-tasks]``.
The machine is shared and noisy: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtlgraph import Hook

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = [f"w{i}" for i in range(400)]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def save_encoder(root: Path, hidden: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A BERT-shaped encoder and its word-piece tokenizer, saved with ``save_pretrained``."""
    import transformers

    path = root / f"bert-{hidden}"
    vocab = {t: i for i, t in enumerate([*SPECIAL, *WORDS])}
    transformers.BertTokenizer(vocab=vocab).save_pretrained(path)
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=4 * hidden,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.BertModel(config).save_pretrained(path)
    return path


def make_data(path: Path, rows: int, length: int = 32, seed: int = 0) -> list[dict[str, Any]]:
    """Two datasets of descriptions tokenised by the encoder's own tokenizer (padded to
    ``length``): ``{"ids", "mask", "label"}`` each, labelled for task ``a`` and ``b``."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    g = torch.Generator().manual_seed(seed)
    out = []
    for classes in (2, 3):
        n_words = torch.randint(4, length - 2, (rows,), generator=g)
        texts = [
            " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(k),), generator=g))
            for k in n_words
        ]
        enc = tok(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        label = enc["input_ids"][:, 1] % classes
        out.append({"ids": enc["input_ids"], "mask": enc["attention_mask"].bool(), "label": label})
    return out


def batches(data: list[dict[str, Any]], batch_size: int) -> list[tuple[int, dict[str, Any]]]:
    """``(dataset index, batch)`` in round-robin order (the batches both loops train on)."""
    per = [
        [
            {k: v[i : i + batch_size] for k, v in d.items()}
            for i in range(0, len(d["ids"]), batch_size)
        ]
        for d in data
    ]
    out = []
    for j in range(max(len(p) for p in per)):
        out += [(i, p[j]) for i, p in enumerate(per) if j < len(p)]
    return out


def heads(width: int, seed: int = 1) -> list[nn.Linear]:
    torch.manual_seed(seed)
    return [nn.Linear(width, 2), nn.Linear(width, 3)]


# ---------------------------------------------------------------- part 1: the two loops


def hand_fit(
    path: Path, steps: list[tuple[int, dict[str, Any]]], epochs: int
) -> tuple[float, nn.Module]:
    """The hand-written loop; seconds per step and the trained encoder."""
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(path)
    hs = heads(model.config.hidden_size)
    params = [*model.parameters(), *(p for h in hs for p in h.parameters())]
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for i, b in steps:
            hidden = model(input_ids=b["ids"], attention_mask=b["mask"].long()).last_hidden_state
            w = b["mask"].to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)
            loss = F.cross_entropy(hs[i](pooled), b["label"])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / (epochs * len(steps)), model


class Clock(Hook):
    """Times the loop itself: from ``on_fit_start`` (every piece built) to ``on_fit_end``, as
    the hand loop is timed (its model loaded and its optimizer built before)."""

    def __init__(self) -> None:
        self.start = self.seconds = 0.0

    def on_fit_start(self, run: Any) -> None:
        self.start = time.perf_counter()

    def on_fit_end(self, run: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def mtlgraph_model(path: Path) -> Any:
    from mtlgraph import MultitaskClassifier, Operation, Task
    from mtlgraph.graph.pretrained import HFEncoder

    torch.manual_seed(0)
    enc = HFEncoder(path=str(path), pooling="mean")
    hs = heads(enc.width)
    tasks = [
        Task(
            name,
            {"enc": enc, f"{name}_head": h},
            [
                Operation("enc", [("_input_", "ids"), ("_input_", "mask")]),
                Operation(f"{name}_head", ["enc"]),
            ],
        )
        for name, h in zip("ab", hs, strict=True)
    ]
    return MultitaskClassifier(tasks)


def mtlgraph_fit(
    path: Path, data: list[dict[str, Any]], batch_size: int, epochs: int
) -> tuple[float, nn.Module]:
    """``Trainer.fit`` on the same batches; seconds per step and the trained encoder."""
    from mtlgraph import DictDataLoader, DictDataset, Trainer

    model = mtlgraph_model(path)
    loaders = [
        DictDataLoader(
            DictDataset(f"d{t}", "train", {"ids": d["ids"], "mask": d["mask"]}, {t: d["label"]}),
            batch_size=batch_size,
        )
        for t, d in zip("ab", data, strict=True)
    ]
    clock = Clock()
    trainer = Trainer(
        n_epochs=epochs, lr=1e-4, batch_scheduler="round_robin", progress_bar=False,
        evaluation_freq=0, eval_splits=[], hooks=[clock],
    )  # fmt: skip
    trainer.fit(model, loaders)
    return clock.seconds / trainer.global_step, model.module_pool["enc"].model


@torch.no_grad()
def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(
        float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(), strict=True)
    )


def step_time(root: Path, hidden: int, rows: int, epochs: int, repeats: int) -> dict[str, float]:
    """Part 1: the median seconds per step of each loop, their ratio, and how far the two
    trained encoders differ."""
    path = save_encoder(root, hidden)
    data = make_data(path, rows)
    steps = batches(data, 16)
    times: dict[str, list[float]] = {"hand": [], "mtlgraph": []}
    diff = 0.0
    for k in range(repeats):  # alternating, and which goes first alternates too
        if k % 2:
            t_ours, m_ours = mtlgraph_fit(path, data, 16, epochs)
        t_hand, m_hand = hand_fit(path, steps, epochs)
        if not k % 2:
            t_ours, m_ours = mtlgraph_fit(path, data, 16, epochs)
        times["hand"].append(t_hand)
        times["mtlgraph"].append(t_ours)
        diff = max(diff, max_difference(m_hand, m_ours))
    hand, ours = statistics.median(times["hand"]), statistics.median(times["mtlgraph"])
    return {
        "hand_ms": 1e3 * hand,
        "mtlgraph_ms": 1e3 * ours,
        "ratio": ours / hand,
        "min_ratio": min(times["mtlgraph"]) / min(times["hand"]),
        "max_diff": diff,
    }


# ---------------------------------------------------------------- part 2: K tasks


def k_tasks(path: Path, k: int, mode: str, steps: int, run_dir: Path) -> dict[str, float]:
    """Train K tasks a few steps, each a head on a LoRA adapter of one frozen encoder
    (``lora``) or on its own fully fine-tuned copy (``copies``); their memory and checkpoint."""
    from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task, Trainer
    from mtlgraph.graph.lora import LoRA
    from mtlgraph.graph.pretrained import HFEncoder
    from mtlgraph.training.hooks import peak_memory

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    before = peak_memory(device)  # the process's peak so far: its imports
    torch.manual_seed(0)
    base = HFEncoder(path=str(path), pooling="mean", freeze=True) if mode == "lora" else None
    tasks, loaders = [], []
    data = make_data(path, 16 * steps)[0]  # ``steps`` batches per task
    for t in range(k):
        name = f"t{t}"
        reader: nn.Module = (
            LoRA(base, r=8, alpha=16, target_modules=["query", "value"])
            if base is not None
            else HFEncoder(path=str(path), pooling="mean")
        )
        tasks.append(
            Task(
                name,
                {f"{name}_enc": reader, f"{name}_head": nn.Linear(reader.width, 2)},  # type: ignore[arg-type]
                [
                    Operation(f"{name}_enc", [("_input_", "ids"), ("_input_", "mask")]),
                    Operation(f"{name}_head", [f"{name}_enc"]),
                ],
            )
        )
        X = {"ids": data["ids"], "mask": data["mask"]}
        loaders.append(
            DictDataLoader(DictDataset(f"d{t}", "train", X, {name: data["label"]}), batch_size=16)
        )
    model = MultitaskClassifier(tasks, device=device)
    trainer = Trainer(
        n_epochs=1, batch_scheduler="round_robin", lr=1e-4,
        progress_bar=False, evaluation_freq=0, eval_splits=[], run_dir=str(run_dir), writers=[],
    )  # fmt: skip
    trainer.fit(model, loaders)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    return {
        "trainable": n,
        "state_mb": 4 * n * 4 / 2**20,  # float32 weights, gradients, Adam's two moments
        "checkpoint_mb": (run_dir / "checkpoints" / "last.pt").stat().st_size / 2**20,
        **{f"{k}_growth": v - before[k] for k, v in peak_memory(device).items()},
    }


def k_tasks_table(root: Path, hidden: int, layers: int, steps: int) -> list[dict[str, Any]]:
    """Part 2, each set-up in a fresh process (peak RSS is the process's)."""
    path = save_encoder(root, hidden, layers)
    rows = []
    for k in (2, 4, 8):
        for mode in ("lora", "copies"):
            out = subprocess.run(
                [sys.executable, __file__, "--one", str(path), str(k), mode, str(steps)],
                check=True, capture_output=True, text=True,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
            )  # fmt: skip
            rows.append({"k": k, "mode": mode, **json.loads(out.stdout.strip().splitlines()[-1])})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--rows", type=int, default=160, help="rows per dataset")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="part 2: training steps per task")
    parser.add_argument("--tasks-hidden", type=int, default=256, help="part 2: encoder width")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--skip-tasks", action="store_true")
    parser.add_argument("--one", nargs=4, help=argparse.SUPPRESS)  # part 2's subprocess
    args = parser.parse_args()
    if args.one:
        path, k, mode, steps = args.one
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(k_tasks(Path(path), int(k), mode, int(steps), Path(tmp))))
        return
    if args.quick:
        args.repeats, args.rows, args.epochs, args.steps, args.tasks_hidden = 2, 64, 1, 1, 64
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        r = step_time(Path(tmp), args.hidden, args.rows, args.epochs, args.repeats)
        print(
            f"step time (BERT-shaped, hidden {args.hidden}, 2 tasks, batch 16, seq 32, medians of "
            f"{args.repeats}): hand {r['hand_ms']:.2f} ms, mtlgraph {r['mtlgraph_ms']:.2f} ms, "
            f"mtlgraph/hand {r['ratio']:.3f} (minima {r['min_ratio']:.3f}; target <= 1.05); "
            "weights differ by at most "
            f"{r['max_diff']:.1e}"
        )
        if args.skip_tasks:
            return
        print(f"\nK tasks on a BERT of hidden {args.tasks_hidden}, 4 layers:")
        print(
            f"{'K':>2s} {'set-up':7s} {'trainable':>10s} {'state MB':>9s} {'RSS grew MB':>12s} "
            f"{'last.pt MB':>11s}"
        )
        for row in k_tasks_table(Path(tmp), args.tasks_hidden, 4, args.steps):
            print(
                f"{row['k']:2d} {row['mode']:7s} {row['trainable']:10d} {row['state_mb']:9.1f} "
                f"{row['peak_rss_mb_growth']:12.0f} {row['checkpoint_mb']:11.2f}"
            )


if __name__ == "__main__":
    main()
