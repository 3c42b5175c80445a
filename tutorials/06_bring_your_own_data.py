"""Bring your own data: the Tonks story from files on disk, declared in one YAML config.

Tutorial 02 kept everything in memory. A real catalogue lives on disk: a folder of product
photos, a spreadsheet of descriptions and prices, and a log of clicks from the shop. This tutorial
writes such files into a temporary directory, then trains a multi-input model on them from a YAML
config, without any loader code:

- ``images/*.png``: the product photos (scikit-learn's 8×8 handwritten digits, upscaled to
  32×32 and saved as PNG files: photos of product tags);
- ``products.csv``: one row per photo: ``file``, a ``description`` ("premium tag with a red
  label"), a ``price`` (tens of dollars) and the ``category`` (the digit on the tag);
- ``clicks.parquet`` (``clicks.jsonl`` without pyarrow): the shop's log: which product
  ``file`` was shown at which ``price``, and whether it was ``clicked``. Shoppers click cheap
  products (under 25 dollars), and looped tags (0, 6, 8, 9) up to 40 dollars.

The config declares two datasets from these files (``source: {type: images, ...}``: the images
are decoded with Pillow, resized and normalised as declared, the description is tokenised with a
vocabulary built from the training split and saved in the run directory) and three tasks:

- ``category_task``: the digit, from the photo (image trunk);
- ``price_task``: the price, from the description's words (text trunk, regression);
- ``click_task``: the click, from the photo and the price (the shared image trunk + the price).

The two datasets differ in size; batches are drawn by ``temperature`` sampling (T5: dataset
``i`` with probability ∝ ``N_i^(1/T)``) for ``steps_per_epoch`` steps an epoch, and the images
are decoded by two DataLoader worker processes (``num_workers: 2``).

Run: ``python tutorials/06_bring_your_own_data.py`` (about 30 s)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mtlgraph.experiment.build import build_experiment
from mtlgraph.experiment.config import load_config

TIERS = {"basic": 1.5, "classic": 2.5, "premium": 4.0}  # price in tens of dollars, by tier word
COLOURS = ["red", "blue", "green", "black", "white"]
LOOPED = {0, 6, 8, 9}


def write_files(root: Path, n_products: int, n_clicks: int, seed: int = 0) -> str:
    """Write the photos, ``products.csv`` and the click log into ``root``; return the log's
    file name."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    digits = load_digits()
    pick = rng.permutation(len(digits.target))[:n_products]
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = ["file,description,price,category"]
    files, categories = [], []
    for i, k in enumerate(pick):
        pixels = (digits.images[k] * (255 / 16)).astype(np.uint8)
        big = np.kron(pixels, np.ones((4, 4), dtype=np.uint8))  # 8x8 -> 32x32
        name = f"product_{i:05d}.png"
        Image.fromarray(big, mode="L").save(root / "images" / name)
        tier = str(rng.choice(list(TIERS)))
        price = TIERS[tier] + rng.normal(0, 0.2)
        colour = str(rng.choice(COLOURS))
        rows.append(f'{name},"{tier} tag with a {colour} label",{price:.2f},{digits.target[k]}')
        files.append(name)
        categories.append(int(digits.target[k]))
    (root / "products.csv").write_text("\n".join(rows) + "\n")
    shown = rng.integers(len(files), size=n_clicks)
    price = rng.uniform(1.0, 5.0, size=n_clicks).round(2)
    clicked = [  # cheap products, and looped tags up to 40 dollars: about half the rows
        int(p < 2.5 or (categories[j] in LOOPED and p < 4.0))
        for j, p in zip(shown, price, strict=True)
    ]
    flip = rng.random(n_clicks) < 0.03  # a few clicks against the rule: noise
    log = {
        "file": [files[j] for j in shown],
        "price": price.tolist(),
        "clicked": [c ^ int(f) for c, f in zip(clicked, flip, strict=True)],
    }
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # the tables extra is optional: JSON Lines need nothing
        lines = (
            json.dumps(dict(zip(log, row, strict=True))) for row in zip(*log.values(), strict=True)
        )
        (root / "clicks.jsonl").write_text("\n".join(lines) + "\n")
        return "clicks.jsonl"
    pq.write_table(pa.table(log), root / "clicks.parquet")
    return "clicks.parquet"


CONFIG = """\
experiment: tonks_from_files
seed: 0

modules:
  image_trunk: {{type: conv2d_stack, in_channels: 1, channels: [16, 32]}}   # photo -> 32 features
  text_trunk: {{type: embedding_bag, num_embeddings: 64, embedding_dim: 16, mode: sum}}
  with_price: {{type: concat}}                                  # [image features, price]
  category_head: {{type: linear, in_features: 32, out_features: 10}}
  price_head: {{type: linear, in_features: 16, out_features: 1}}
  click_head: {{type: mlp, in_dim: 33, hidden: [32], out_dim: 1}}

tasks:
  category_task:
    ops:
      - {{module: image_trunk, inputs: [[_input_, image]]}}
      - {{module: category_head, inputs: [image_trunk]}}
  price_task:
    task_type: regression
    ops:
      - {{module: text_trunk, inputs: [[_input_, description]]}}
      - {{module: price_head, inputs: [text_trunk]}}
  click_task:
    task_type: binary
    ops:
      - {{module: image_trunk, inputs: [[_input_, image]]}}
      - {{module: with_price, inputs: [image_trunk, [_input_, price]]}}
      - {{module: click_head, inputs: [with_price]}}

data:
  batch_size: 32
  shuffle: true
  num_workers: {num_workers}        # image decoding in worker processes
  persistent_workers: true          # ... kept alive from one pass to the next
  datasets:
    catalog:                        # the photos and products.csv
      source:
        type: images
        path: products.csv
        images: {{folder: images, column: file, mode: L, resize: [8, 8],
                 normalize: {{mean: [0.5], std: [0.5]}}}}
        text: {{description: {{vocab_size: 64, max_length: 16}}}}
        fractions: {{train: 0.8, test: 0.2}}
      fields: {{image: file, description: description}}
      labels: {{category_task: category, price_task: price}}
    clicks:                         # the click log, joined to the photos by file name
      source:
        type: images
        path: {clicks}
        images: {{folder: images, column: file, mode: L, resize: [8, 8],
                 normalize: {{mean: [0.5], std: [0.5]}}}}
        fractions: {{train: 0.8, test: 0.2}}
      fields: {{image: file, price: price}}
      labels: {{click_task: clicked}}

trainer:
  n_epochs: {n_epochs}
  steps_per_epoch: {steps_per_epoch}   # an epoch is this many sampled batches
  batch_scheduler: {{name: temperature, temperature: 2.0}}
  lr: 0.02
  seed: 0
  progress_bar: false
"""


def main(
    n_products: int = 1500,
    n_clicks: int = 3000,
    n_epochs: int = 6,
    steps_per_epoch: int = 100,
    num_workers: int = 2,
    root: str | Path | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Write the files, train from the config, return the test scores and the run directory."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(root) if root is not None else Path(tmp)
        clicks = write_files(base, n_products, n_clicks)
        config = base / "tonks_from_files.yaml"
        config.write_text(
            CONFIG.format(
                clicks=clicks,
                n_epochs=n_epochs,
                steps_per_epoch=steps_per_epoch,
                num_workers=num_workers,
            )
        )
        run_dir = base / "run"
        exp = build_experiment(load_config(config), run_dir)
        exp.trainer.fit(exp.model, exp.loaders)
        scores = exp.model.score([dl for dl in exp.loaders if dl.dataset.split == "test"])
        vocabulary = json.loads((run_dir / "vocab" / "catalog.description.json").read_text())
    if verbose:
        for key, value in sorted(scores.items()):
            print(f"{key:45s} {value:.3f}")
        print("vocabulary:", vocabulary["tokens"][:12], "...")
    return {"scores": scores, "vocabulary": vocabulary["tokens"], "clicks_file": clicks}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    args = parser.parse_args()
    main(n_epochs=args.epochs)
