"""A folder of image files plus a table that maps file names to labels and extra fields.

Images are decoded lazily, one per item, with Pillow (``pip install 'mtlgraph[images]'``) and
the declared :class:`ImageDecoder`; the table's other columns are read once into memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from mtlgraph._suggest import first_few, quoted
from mtlgraph.data.datasets import Batch
from mtlgraph.data.sources.files import Table, as_table, table_length
from mtlgraph.data.sources.table import Tokenizer, table_columns
from mtlgraph.exceptions import DataError

IMAGE_MODES = ("L", "RGB", "RGBA")
"""Pillow modes images can be converted to (1, 3 and 4 channels)."""

WIDE_MODES = {"I": "32-bit integer", "F": "32-bit float"}
"""Pillow modes of files that are refused: no range to scale them by."""

_SHOWN = 5  # missing files named in one message


def require_pillow(what: str = "decoding images") -> Any:
    """The ``PIL.Image`` module, or a :class:`DataError` naming the extra to install."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError([f"{what} needs Pillow: pip install 'mtlgraph[images]'"]) from None
    return Image


@dataclass(frozen=True)
class ImageDecoder:
    """Image file -> ``float32`` tensor ``(C, H, W)``: the declared transforms, in this order.

    1. convert to ``mode`` (``"L"`` grey, ``"RGB"``, ``"RGBA"``);
    2. resize to ``size = (height, width)`` (bilinear) when given;
    3. scale pixels to ``[0, 1]``;
    4. normalise each channel, ``(x - mean[c]) / std[c]``, when ``mean`` and ``std`` are given.

    Example:
        >>> import tempfile, pathlib
        >>> from PIL import Image
        >>> from mtlgraph.data.sources import ImageDecoder
        >>> f = pathlib.Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.new("RGB", (8, 4), (255, 0, 0)).save(f)
        >>> x = ImageDecoder(mode="RGB", size=(2, 2), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(f)
        >>> x.shape, x[:, 0, 0].tolist()
        (torch.Size([3, 2, 2]), [1.0, -1.0, -1.0])
    """

    mode: str = "RGB"  # Pillow mode the image is converted to: L (1 channel), RGB, RGBA
    size: tuple[int, int] | None = None  # (height, width) after resizing; None = keep
    mean: tuple[float, ...] | None = None  # per-channel mean subtracted (pixels in [0, 1])
    std: tuple[float, ...] | None = None  # per-channel standard deviation divided by

    def __post_init__(self) -> None:
        problems = []
        if self.mode not in IMAGE_MODES:
            problems.append(f"mode: one of {IMAGE_MODES}, got {self.mode!r}")
        if self.size is not None and (len(self.size) != 2 or min(self.size) < 1):
            problems.append(f"size: [height, width] of positive integers, got {list(self.size)}")
        channels = len(self.mode)
        if (self.mean is None) != (self.std is None):
            problems.append("normalize: give both mean and std")
        for what, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) != channels:
                problems.append(
                    f"normalize.{what}: {len(values)} values, but mode {self.mode!r} has "
                    f"{channels} channel(s)"
                )
        if self.std is not None and any(s <= 0 for s in self.std):
            problems.append(f"normalize.std: must be > 0, got {list(self.std)}")
        if problems:
            raise DataError(problems, header="invalid image transforms:")
        # steps 3 and 4 as one multiply-add per pixel: x * scale - offset
        mean = np.asarray(self.mean if self.mean is not None else [0.0] * channels, np.float32)
        std = np.asarray(self.std if self.std is not None else [1.0] * channels, np.float32)
        object.__setattr__(self, "_scale", 1 / (255 * std))
        object.__setattr__(self, "_offset", mean / std)

    @property
    def channels(self) -> int:
        """Channels of the decoded tensor."""
        return len(self.mode)

    def __call__(self, path: str | os.PathLike[str]) -> torch.Tensor:
        """Decode one file; a missing, corrupt or refused file is a :class:`DataError` naming it.

        8-bit images (and 1-bit, palette, grey with alpha, CMYK...) are converted to ``mode``
        and divided by 255; 16-bit grey images (Pillow modes ``I;16*``) are divided by 65535;
        32-bit integer and float images (``I``, ``F``), whose range no file states, are
        refused, as is an image larger than Pillow's decompression-bomb limit.
        """
        Image = require_pillow()
        try:
            with Image.open(path) as img:  # over twice the limit: DecompressionBombError
                limit = Image.MAX_IMAGE_PIXELS  # over it: Pillow only warns; refused here
                if limit and img.width * img.height > limit:
                    raise Image.DecompressionBombError(
                        f"Image size ({img.width * img.height} pixels) exceeds limit of "
                        f"{limit} pixels"
                    )
                pixels, full_scale = self._pixels(Image, img, path)
        except DataError:
            raise
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise DataError(
                [
                    f"image '{path}' is refused as a possible decompression bomb ({e}); if it "
                    "is a genuine image, shrink it, or raise PIL.Image.MAX_IMAGE_PIXELS in a "
                    "module the config imports (imports:)"
                ]
            ) from None
        except (OSError, ValueError) as e:  # Pillow's UnidentifiedImageError is an OSError
            raise DataError(
                [
                    f"cannot decode image '{path}' ({type(e).__name__}: {e}); replace the file "
                    "or remove its row from the table"
                ]
            ) from None
        pixels = pixels.reshape(pixels.shape[0], pixels.shape[1], -1)  # (H, W, C)
        pixels *= self._scale * (255 / full_scale)  # type: ignore[attr-defined]
        pixels -= self._offset  # type: ignore[attr-defined]
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())

    def _pixels(self, Image: Any, img: Any, path: Any) -> tuple[np.ndarray, float]:
        """``(pixels (H, W[, C]) float32 in [0, full scale], full scale)`` in ``mode`` and
        ``size``."""
        if img.mode in WIDE_MODES:
            raise DataError(
                [
                    f"image '{path}' has {WIDE_MODES[img.mode]} pixels (Pillow mode "
                    f"'{img.mode}'), whose range the file does not state, so they cannot be "
                    "scaled to [0, 1]; save it as an 8-bit or 16-bit image"
                ]
            )
        if not img.mode.startswith("I;16"):
            img = img.convert(self.mode)
            if self.size is not None:
                img = img.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.float32), 255.0
        grey = Image.fromarray(np.asarray(img, dtype=np.float32))  # mode F, 0..65535
        if self.size is not None:
            grey = grey.resize((self.size[1], self.size[0]), Image.Resampling.BILINEAR)
        g = np.asarray(grey, dtype=np.float32)
        channels = [g] * min(len(self.mode), 3) + [np.full_like(g, 65535.0)] * (self.mode == "RGBA")
        return np.stack(channels, axis=-1), 65535.0


class ImageFolder(Dataset[Batch]):
    """Images in ``folder`` named by a table column, with labels and extra fields from the table.

    Args:
        folder: Directory the file names are relative to.
        table: The table's columns (from :func:`~mtlgraph.data.sources.read_table`).
        image_field: Input field that receives the decoded image.
        image_column: Column holding each row's file name.
        fields: Other input fields -> column(s), read into memory like a table's.
        labels: Task name -> label column.
        decoder: How a file becomes a tensor (mode, resize, normalise).
        text: Column -> tokenizer for text fields.
        origin: How messages name the table (e.g. its file).

    Raises:
        DataError: Pillow missing (naming the ``images`` extra), absent columns, non-numeric
            cells, missing image files (all named at once). A corrupt file raises when read,
            naming the file and the row.

    Example:
        >>> import tempfile, pathlib, numpy as np
        >>> from PIL import Image
        >>> from mtlgraph.data.sources import ImageDecoder, ImageFolder
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> for i in range(2):
        ...     Image.new("L", (4, 4), 40 * i).save(d / f"{i}.png")
        >>> table = {"file": np.array(["0.png", "1.png"]), "digit": np.array([3, 7])}
        >>> ds = ImageFolder(d, table, labels={"digit_task": "digit"},
        ...                  decoder=ImageDecoder(mode="L", size=(2, 2)))
        >>> x, y = ds[1]
        >>> x["image"].shape, int(y["digit_task"])
        (torch.Size([1, 2, 2]), 7)
    """

    def __init__(
        self,
        folder: str | os.PathLike[str],
        table: Table,
        image_field: str = "image",
        image_column: str = "file",
        fields: Mapping[str, str | Sequence[str]] | None = None,
        labels: Mapping[str, str] | None = None,
        decoder: ImageDecoder | None = None,
        text: Mapping[str, Tokenizer] | None = None,
        origin: str = "the table",
    ) -> None:
        require_pillow("an image dataset")
        self.folder = Path(folder)
        self.image_field = image_field
        self.decoder = decoder or ImageDecoder()
        t = as_table(table, origin)
        problems: list[str] = []
        if image_column not in t:
            problems.append(f"{t.origin} has no image column '{image_column}'; it has {quoted(t)}")
        try:
            self.X, self.Y = table_columns(t, fields or {}, labels or {}, text)
        except DataError as e:
            problems += e.problems
        files = [str(f) for f in t.get(image_column, [])]
        problems += self._missing_files(files)
        if problems:
            raise DataError(problems, header=f"cannot read the images of {t.origin}:")
        self.files = files
        self._length = table_length(t)
        self._first_size: tuple[int, int] | None = None  # (height, width) of files[0]

    def _missing_files(self, files: Sequence[str]) -> list[str]:
        if not self.folder.is_dir():
            what = "is a file" if self.folder.exists() else "does not exist"
            return [
                f"image folder '{self.folder}' {what}: name the directory that holds the "
                "table's image files (images.folder)"
            ]
        missing = [(i, f) for i, f in enumerate(files) if not (self.folder / f).is_file()]
        if not missing:
            return []
        listed = first_few([f"'{f}' (row {i + 1})" for i, f in missing], _SHOWN)
        return [
            f"{len(missing)} image file(s) missing from '{self.folder}': {listed}; add the "
            "files or remove their rows"
        ]

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Batch:
        path = self.folder / self.files[index]
        try:
            image = self.decoder(path)
            if self.decoder.size is None:
                self._check_size(path, image)
        except DataError as e:
            raise DataError([f"row {index + 1}: {p}" for p in e.problems]) from None
        x = {self.image_field: image}
        x.update({k: v[index] for k, v in self.X.items()})
        y = {k: v[index] for k, v in self.Y.items()}
        return x, y

    def _check_size(self, path: Path, image: torch.Tensor) -> None:
        """Without a resize, every image must have the first one's size (every worker process
        compares with the same file, so batches agree too)."""
        if self._first_size is None:
            Image = require_pillow()
            first = self.folder / self.files[0]
            try:
                with Image.open(first) as img:  # the header only
                    self._first_size = (int(img.height), int(img.width))
            except (OSError, ValueError):  # the first file's own row reports it
                self._first_size = (int(image.shape[1]), int(image.shape[2]))
        h, w = int(image.shape[1]), int(image.shape[2])
        if (h, w) != self._first_size:
            H, W = self._first_size
            raise DataError(
                [
                    f"image '{path}' is {h}x{w} pixels (height x width) but '{self.files[0]}' "
                    f"(row 1) is {H}x{W}: images of different sizes cannot be batched; set the "
                    "source's images.resize: [height, width] (ImageDecoder(size=...) in Python)"
                ]
            )

    def __repr__(self) -> str:
        return (
            f"ImageFolder(folder='{self.folder}', n={len(self)}, "
            f"X={[self.image_field, *self.X]}, Y={list(self.Y)})"
        )
