"""Image folders: decoding, declared transforms, bad files and the missing-Pillow error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mtlgraph import DictDataLoader, NamedDataset
from mtlgraph.data.collate import collate_dicts
from mtlgraph.data.sources import ImageDecoder, ImageFolder, read_table
from mtlgraph.exceptions import DataError


def make_folder(tmp: Path, n: int = 4) -> Path:
    (tmp / "img").mkdir()
    lines = ["file,digit,price"]
    for i in range(n):
        pixels = np.full((6, 8, 3), 30 * i, dtype=np.uint8)
        Image.fromarray(pixels).save(tmp / "img" / f"{i}.png")
        lines.append(f"{i}.png,{i % 3},{i + 0.5}")
    (tmp / "labels.csv").write_text("\n".join(lines) + "\n")
    return tmp / "labels.csv"


def test_items_decoded_resized_normalised(tmp_path: Path) -> None:
    table = read_table(make_folder(tmp_path))
    decoder = ImageDecoder(mode="RGB", size=(3, 4), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    ds = ImageFolder(
        tmp_path / "img",
        table,
        fields={"price": "price"},
        labels={"digit_task": "digit"},
        decoder=decoder,
    )
    assert len(ds) == 4
    x, y = ds[2]
    assert x["image"].shape == (3, 3, 4) and x["image"].dtype == torch.float32
    expected = (60 / 255 - 0.5) / 0.25
    assert torch.allclose(x["image"], torch.full((3, 3, 4), expected))
    assert x["price"].tolist() == [2.5] and int(y["digit_task"]) == 2
    batch_x, batch_y = collate_dicts([ds[i] for i in range(4)])
    assert batch_x["image"].shape == (4, 3, 3, 4) and batch_y["digit_task"].tolist() == [0, 1, 2, 0]
    grey = ImageFolder(tmp_path / "img", table, image_field="pic", decoder=ImageDecoder(mode="L"))[
        0
    ][0]["pic"]
    assert grey.shape == (1, 6, 8)  # the file's own size without resize


def test_missing_and_corrupt_images_are_named(tmp_path: Path) -> None:
    table = read_table(make_folder(tmp_path, n=8))
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").unlink()
    with pytest.raises(DataError) as info:
        ImageFolder(tmp_path / "img", table, labels={"t": "digit"})
    message = str(info.value)
    assert "6 image file(s) missing" in message and "'0.png' (row 1)" in message
    assert "and 1 more" in message and "add the files or remove their rows" in message
    (tmp_path / "img" / "6.png").write_bytes(b"not a png")
    ds = ImageFolder(tmp_path / "img", {k: v[6:] for k, v in table.items()}, labels={"t": "digit"})
    assert int(ds[1][1]["t"]) == 1
    with pytest.raises(DataError, match=r"row 1: cannot decode image '.*6\.png'.*remove its row"):
        ds[0]
    loader = DictDataLoader(NamedDataset("d", "train", ds, labels=["t"]), num_workers=1)
    with pytest.raises(DataError) as info:  # re-raised from the worker: still one readable problem
        list(loader)
    assert len(info.value.problems) == 1 and "row 1: cannot decode image" in str(info.value)


def test_bad_columns_and_transforms(tmp_path: Path) -> None:
    table = read_table(make_folder(tmp_path))
    with pytest.raises(DataError) as info:
        ImageFolder(tmp_path / "img", table, image_column="path", labels={"t": "digits"})
    assert "no image column 'path'" in str(info.value)
    assert "has no column 'digits' (did you mean 'digit'?)" in str(info.value)
    with pytest.raises(DataError) as info:
        ImageDecoder(mode="L", size=(0, 4), mean=(0.5, 0.5), std=(0.0, 1.0))
    message = str(info.value)
    assert "size: [height, width] of positive integers" in message
    assert "normalize.mean: 2 values, but mode 'L' has 1 channel(s)" in message
    assert "normalize.std: must be > 0" in message


def test_missing_pillow_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = read_table(make_folder(tmp_path))
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(DataError, match=r"needs Pillow: pip install 'mtlgraph\[images\]'"):
        ImageFolder(tmp_path / "img", table)


@pytest.mark.parametrize("size", [None, (2, 2)])
@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA"])
def test_16_bit_grey_is_scaled_by_65535_in_every_mode(
    tmp_path: Path, mode: str, size: tuple[int, int] | None
) -> None:
    grey8 = np.random.default_rng(0).integers(0, 256, (4, 4)).astype(np.uint8)
    Image.fromarray(grey8).save(tmp_path / "a8.png")
    Image.fromarray(grey8.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode == "I;16"
    decode = ImageDecoder(mode=mode, size=size, mean=(0.5,) * len(mode), std=(0.25,) * len(mode))
    x8, x16 = decode(tmp_path / "a8.png"), decode(tmp_path / "a16.png")
    assert x16.shape == x8.shape == (len(mode), *(size or (4, 4)))
    assert torch.allclose(x16, x8, atol=1e-2 if size else 1e-5)  # resized: 8-bit rounding
    if size is None:
        assert float(x16[0].max()) == pytest.approx((grey8.max() / 255 - 0.5) / 0.25, abs=1e-5)


def test_1_bit_images_are_0_and_1(tmp_path: Path) -> None:
    Image.fromarray(np.eye(3, dtype=bool)).save(tmp_path / "b.png")
    assert Image.open(tmp_path / "b.png").mode == "1"
    assert ImageDecoder(mode="L")(tmp_path / "b.png")[0].tolist() == np.eye(3).tolist()
