"""Image folder throughput: mtlgraph's image source vs a plain torch DataLoader, same decode.

Writes ``n_images`` PNG files (``size`` x ``size`` RGB) and a CSV of labels into a temporary
directory, then reads every image once per pass with

- mtlgraph: ``ImageFolder`` (the ``images`` source) in a ``NamedDataset`` through
  ``DictDataLoader`` (items ``(x_dict, y_dict)``, collated by ``collate_dicts``);
- torch: a minimal map-style ``Dataset`` over the same files returning ``(image, label)``
  through ``torch.utils.data.DataLoader`` (default collate),

both decoding with the same :class:`~mtlgraph.data.sources.ImageDecoder` (Pillow, RGB, scaled to
[0, 1], normalised), at each ``num_workers``. Reported: images/s of each (median of ``repeats``
alternating runs) and the ratio mtlgraph / torch (goal >= 0.95).

Run: ``python bench/data_images.py [--n-images 20000] [--workers 0 1 2]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mtlgraph import DictDataLoader, NamedDataset
from mtlgraph.data.sources import ImageDecoder, ImageFolder, read_table

DECODER = ImageDecoder(mode="RGB", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def write_images(root: Path, n_images: int, size: int = 64, seed: int = 0) -> Path:
    """``n_images`` random PNG files and ``labels.csv`` (file, label) in ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = ["file,label"]
    base = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    for i in range(n_images):
        # a smooth image plus a little noise: PNG sizes like photos', not like pure noise
        pixels = (base // 4 + (i % 64) * 2 + rng.integers(0, 8, size=base.shape)).astype(np.uint8)
        Image.fromarray(pixels).save(root / "img" / f"{i:06d}.png")
        lines.append(f"{i:06d}.png,{i % 10}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root / "labels.csv"


class PlainImages(Dataset[tuple[torch.Tensor, int]]):
    """The hand-written reference: file names and labels in lists, the same decode."""

    def __init__(self, folder: Path, files: list[str], labels: list[int]) -> None:
        self.folder, self.files, self.labels = folder, files, labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return DECODER(self.folder / self.files[i]), self.labels[i]


def _rate(loader: Any, n: int) -> float:
    start = time.perf_counter()
    seen = 0
    for batch in loader:
        x = batch[0]
        seen += len(x["image"] if isinstance(x, dict) else x)
    elapsed = time.perf_counter() - start
    assert seen == n, (seen, n)
    return n / elapsed


def run(
    num_workers_list: tuple[int, ...] = (0, 1, 2),
    n_images: int = 2000,
    size: int = 64,
    batch_size: int = 64,
    repeats: int = 3,
    verbose: bool = True,
) -> dict[str, Any]:
    """Images/s of both loaders at each ``num_workers``.

    Returns:
        ``{"n_images", "size", "workers": {num_workers: {"mtlgraph", "torch", "ratio"}}}``
        (images/s medians and mtlgraph / torch).
    """
    results: dict[str, Any] = {"n_images": n_images, "size": size, "workers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_images(Path(tmp), n_images, size)
        table = read_table(csv)
        folder = Path(tmp) / "img"
        images = ImageFolder(folder, table, labels={"t": "label"}, decoder=DECODER)
        ours_ds = NamedDataset("images", "train", images, labels=["t"])
        plain_ds = PlainImages(
            folder, [str(f) for f in table["file"]], [int(v) for v in table["label"]]
        )
        for workers in num_workers_list:
            ours = DictDataLoader(ours_ds, batch_size=batch_size, num_workers=workers)
            plain = DataLoader(plain_ds, batch_size=batch_size, num_workers=workers)
            _rate(ours, n_images)  # warm the page cache and the imports
            rates: dict[str, list[float]] = {"mtlgraph": [], "torch": []}
            for r in range(repeats):
                pair = [("mtlgraph", ours), ("torch", plain)]
                for name, loader in pair if r % 2 == 0 else pair[::-1]:
                    rates[name].append(_rate(loader, n_images))
            row = {k: statistics.median(v) for k, v in rates.items()}
            row["ratio"] = row["mtlgraph"] / row["torch"]
            results["workers"][workers] = row
            if verbose:
                print(
                    f"num_workers={workers}: mtlgraph {row['mtlgraph']:8.0f} img/s, torch "
                    f"{row['torch']:8.0f} img/s, ratio {row['ratio']:.3f} (goal >= 0.95)"
                )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(tuple(args.workers), args.n_images, args.size, repeats=args.repeats)
