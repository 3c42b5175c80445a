"""Generated datasets for tutorials, tests, benchmarks and configs (nothing is downloaded).

Every generator takes a ``seed`` and uses its own ``numpy.random.Generator``; the registry
:data:`GENERATORS` names them for configs (``source: {type: generator, name: circle}``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from mtlgraph.exceptions import ConfigError
from mtlgraph.registry import Registry

Split = tuple[np.ndarray, np.ndarray]
Arr = np.ndarray
Generator = Callable[..., dict[str, dict[str, np.ndarray]]]
"""A config generator: keyword arguments -> ``{split: {array name: array}}``."""
SPLITS = ("train", "valid", "test")
Fractions = Sequence[float]
FRACTIONS = (0.8, 0.1, 0.1)
"""The default train/valid/test fractions of every generator."""


def _bounds(n: int, fractions: Sequence[float]) -> list[tuple[int, int]]:
    """Row ranges of the train, valid and test splits of ``n`` rows."""
    a = round(fractions[0] * n)
    b = a + round(fractions[1] * n)
    return [(0, a), (a, b), (b, n)]


def _labelled_points(
    n: int,
    R: float,
    rng: np.random.Generator,
    label: Callable[[np.ndarray], np.ndarray],
    fractions: Sequence[float],
) -> tuple[Split, Split, Split]:
    """``n`` points uniform in the square of half-width ``1.5 * R`` centred on the origin, their
    0/1 ``label(X)``, split by ``fractions``."""
    X = rng.uniform(-1.5 * R, 1.5 * R, size=(n, 2)).astype(np.float32)
    Y = label(X).astype(np.int64)
    (i, a), (_, b), _ = _bounds(n, fractions)
    return (X[i:a], Y[i:a]), (X[a:b], Y[a:b]), (X[b:], Y[b:])


def make_circle_dataset(
    n: int, R: float = 1.0, seed: int = 0, fractions: Fractions = FRACTIONS
) -> tuple[Split, Split, Split]:
    """2-D points labelled 1 when inside the circle of radius ``R`` centred on the origin.

    Example:
        >>> from mtlgraph.data.synthetic import make_circle_dataset
        >>> (X, Y), valid, test = make_circle_dataset(1000, 1.0)
        >>> X.shape, sorted(set(Y.tolist()))
        ((800, 2), [0, 1])
    """
    rng = np.random.default_rng([seed, 1])
    return _labelled_points(n, R, rng, lambda X: np.linalg.norm(X, axis=1) < R, fractions)


def make_inv_circle_dataset(
    n: int, R: float = 1.0, seed: int = 0, fractions: Fractions = FRACTIONS
) -> tuple[Split, Split, Split]:
    """Like :func:`make_circle_dataset` (other points) with flipped labels: 1 means outside."""
    rng = np.random.default_rng([seed, 2])
    return _labelled_points(n, R, rng, lambda X: np.linalg.norm(X, axis=1) >= R, fractions)


def make_square_dataset(
    n: int, R: float = 1.0, seed: int = 0, fractions: Fractions = FRACTIONS
) -> tuple[Split, Split, Split]:
    """2-D points labelled 1 when inside the axis-aligned square of half-width ``R``."""
    rng = np.random.default_rng([seed, 3])
    return _labelled_points(n, R, rng, lambda X: np.abs(X).max(axis=1) < R, fractions)


def make_sin_cos_dataset(
    n: int,
    low: float = -np.pi,
    high: float = np.pi,
    noise: float = 0.0,
    seed: int = 0,
    fractions: Fractions = FRACTIONS,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], ...]:
    """Inputs ``x`` uniform in ``[low, high]`` with targets ``sin(x)`` and ``cos(x)``.

    Returns:
        ``(train, valid, test)``, each ``(x (N, 1), sin (N,), cos (N,))`` as float32.
    """
    rng = np.random.default_rng([seed, 4])
    x = rng.uniform(low, high, size=(n, 1)).astype(np.float32)
    s = (np.sin(x[:, 0]) + noise * rng.standard_normal(n)).astype(np.float32)
    c = (np.cos(x[:, 0]) + noise * rng.standard_normal(n)).astype(np.float32)
    return tuple((x[i:j], s[i:j], c[i:j]) for i, j in _bounds(n, fractions))


def _texts(
    rng: np.random.Generator,
    fillers: Callable[[], list[Any]],
    hints: Sequence[tuple[float, np.ndarray]],
    length: int,
) -> np.ndarray:
    """Token rows: ``fillers()`` words, plus each hint's word with its probability, shuffled,
    cut or 0-padded to ``length``."""
    text = np.zeros((len(hints[0][1]), length), dtype=np.int64)
    for i in range(len(text)):
        words = fillers()
        for p, ids in hints:
            if rng.random() < p:
                words.append(ids[i])
        rng.shuffle(words)
        text[i, : min(length, len(words))] = words[:length]
    return text


def _cut(arrays: dict[str, np.ndarray], fractions: Sequence[float]) -> dict[str, dict[str, Arr]]:
    bounds = _bounds(len(next(iter(arrays.values()))), fractions)
    return {
        split: {k: v[i:j] for k, v in arrays.items()}
        for split, (i, j) in zip(SPLITS, bounds, strict=True)
    }


def make_reviews_dataset(
    n: int,
    domain: str = "restaurants",
    vocab_size: int = 200,
    length: int = 24,
    noise: float = 0.15,
    seed: int = 0,
    fractions: Fractions = FRACTIONS,
) -> dict[str, dict[str, Arr]]:
    """Bag-of-words sentiment reviews of one domain (the GumGum story's Yelp and IMDB).

    Token ids ``1..vocab_size-1`` (0 pads). The first tenth of the vocabulary are positive words
    shared by all domains, the next tenth negative shared words; each domain also has its own
    positive and negative words and its own neutral words. A review of label 1 (positive) draws
    sentiment words of its polarity, with probability ``noise`` of the other one.

    Args:
        n: Reviews.
        domain: ``"restaurants"`` or ``"movies"`` (which domain-specific words appear).
        vocab_size: Vocabulary size including the padding id 0 (at least 50).
        length: Maximum review length; shorter reviews are padded with 0.
        noise: Probability that a sentiment word has the opposite polarity.
        seed: Seed.
        fractions: Train/valid/test fractions.

    Returns:
        ``{split: {"tokens": (N, length) int64, "label": (N,) int64}}``.

    Example:
        >>> from mtlgraph.data.synthetic import make_reviews_dataset
        >>> data = make_reviews_dataset(100, "movies")
        >>> data["train"]["tokens"].shape, sorted(set(data["train"]["label"].tolist()))
        ((80, 24), [0, 1])
    """
    problems = []
    if domain not in ("restaurants", "movies"):
        problems.append(f"domain must be 'restaurants' or 'movies', got {domain!r}")
    if vocab_size < 50:
        problems.append(f"vocab_size must be at least 50, got {vocab_size}")
    if problems:
        raise ConfigError(problems, header="make_reviews_dataset:" if len(problems) > 1 else None)
    rng = np.random.default_rng([seed, 5, 0 if domain == "restaurants" else 1])
    tenth = vocab_size // 10
    shared_pos = np.arange(1, 1 + tenth)
    shared_neg = np.arange(1 + tenth, 1 + 2 * tenth)
    base = 1 + 2 * tenth if domain == "restaurants" else 1 + 4 * tenth
    own_pos = np.arange(base, base + tenth)
    own_neg = np.arange(base + tenth, base + 2 * tenth)
    start = 1 + 6 * tenth + (0 if domain == "restaurants" else (vocab_size - 1 - 6 * tenth) // 2)
    neutral = np.arange(start, start + (vocab_size - 1 - 6 * tenth) // 2)
    labels = rng.integers(0, 2, size=n)
    tokens = np.zeros((n, length), dtype=np.int64)
    for i in range(n):
        size = int(rng.integers(length // 2, length + 1))
        kinds = rng.random(size)
        polarity = np.where(rng.random(size) < noise, 1 - labels[i], labels[i])
        shared = rng.random(size) < 0.5
        for j in range(size):
            if kinds[j] < 0.3:
                pool = (
                    (shared_pos if shared[j] else own_pos)
                    if polarity[j]
                    else (shared_neg if shared[j] else own_neg)
                )
            else:
                pool = neutral
            tokens[i, j] = pool[rng.integers(len(pool))]
    return _cut({"tokens": tokens, "label": labels.astype(np.int64)}, fractions)


def make_products_dataset(
    n: int,
    image_size: int = 8,
    vocab_size: int = 40,
    length: int = 8,
    seed: int = 0,
    fractions: Fractions = FRACTIONS,
) -> dict[str, dict[str, Arr]]:
    """Product images and titles with colour and pattern attributes (the Tonks story).

    Each product has a colour (0 red, 1 green, 2 blue: the bright channel of its image) and a
    pattern (0 plain, 1 striped: alternating bright rows). Its title holds a colour word with
    probability 0.6, a pattern word with probability 0.6, and filler words.

    Returns:
        ``{split: {"image": (N, 3, S, S) float32, "text": (N, length) int64 (0 pads),
        "color": (N,) int64, "pattern": (N,) int64}}``.

    Example:
        >>> from mtlgraph.data.synthetic import make_products_dataset
        >>> data = make_products_dataset(50)
        >>> data["train"]["image"].shape, data["train"]["text"].shape
        ((40, 3, 8, 8), (40, 8))
    """
    rng = np.random.default_rng([seed, 6])
    color = rng.integers(0, 3, size=n)
    pattern = rng.integers(0, 2, size=n)
    images = rng.normal(0.0, 0.6, size=(n, 3, image_size, image_size)).astype(np.float32)
    stripes = (np.arange(image_size) % 2 == 0).astype(np.float32)[:, None]  # (S, 1)
    for i in range(n):
        shade = np.where(stripes > 0, 1.0, 0.2) if pattern[i] else np.full((image_size, 1), 0.6)
        images[i, color[i]] += shade.astype(np.float32)
    filler = np.arange(6, vocab_size)
    hints = [(0.6, 1 + color), (0.6, 4 + pattern)]  # ids 1..3: colour words, 4..5: pattern words
    text = _texts(rng, lambda: list(rng.choice(filler, size=length - 2)), hints, length)
    return _cut(
        {
            "image": images,
            "text": text,
            "color": color.astype(np.int64),
            "pattern": pattern.astype(np.int64),
        },
        fractions,
    )


DIGIT_WORDS = (
    "<pad>",
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    *("round", "angular"),
    *("handwritten", "tag", "label", "sticker", "scanned", "small", "white", "paper", "ink"),
    *("grey", "item", "code", "printed", "new", "sale", "card", "mark", "box", "shelf"),
)
"""Vocabulary of :func:`make_digit_products` descriptions: token id ``i`` is ``DIGIT_WORDS[i]``."""


def make_digit_products(
    n: int | None = None,
    part: int = 0,
    parts: int = 1,
    price_mean: float = 30.0,
    price_scale: float = 10.0,
    price_noise: float = 0.3,
    hint: float = 0.3,
    length: int = 6,
    seed: int = 0,
    fractions: Fractions = FRACTIONS,
) -> dict[str, dict[str, Arr]]:
    """Products with a small image and a text description (the Tonks story, interference part).

    Each item is one of scikit-learn's bundled 8×8 handwritten digits (``load_digits``, nothing is
    downloaded), seen as the photo of a product tag, with a generated description of the same
    item. Attributes: ``digit`` (the tag's digit), ``loop`` (1 when the digit has a closed loop:
    0, 6, 8, 9; related to ``digit``) and ``price`` in dollars, ``price_mean + price_scale·z``
    where ``z`` is a fixed random pattern of the pixels (standardised, plus ``price_noise``
    noise): readable from the image, unrelated to the digit, and on a scale far from the other
    losses. A description holds 3–5 filler words, the digit's word with probability ``hint`` and
    "round"/"angular" (the loop) with probability ``hint``.

    Args:
        n: Items (``None``: all 1,797 digits) before ``part`` is taken.
        part: Which of ``parts`` disjoint slices of the shuffled items to return (several
            task-specific datasets from one pool).
        parts: Number of slices.
        price_mean: Mean price in dollars.
        price_scale: Standard deviation of the price's image-driven part, in dollars.
        price_noise: Noise of the price, in units of ``price_scale``.
        hint: Probability that a description names the digit (and, separately, the loop).
        length: Tokens per description (0 pads).
        seed: Seed of the shuffle, the noise and the descriptions (the price pattern is fixed).
        fractions: Train/valid/test fractions of the slice.

    Returns:
        ``{split: {"image": (N, 64) float32 in [0, 1], "text": (N, length) int64,
        "digit": (N,) int64, "loop": (N,) int64, "price": (N,) float32}}``.

    Example:
        >>> from mtlgraph.data.synthetic import DIGIT_WORDS, make_digit_products
        >>> data = make_digit_products(part=0, parts=3)
        >>> data["train"]["image"].shape, data["train"]["text"].shape
        ((479, 64), (479, 6))
        >>> all(DIGIT_WORDS[t] for t in data["train"]["text"][0])
        True
    """
    from sklearn.datasets import load_digits

    if not 0 <= part < parts:
        raise ConfigError([f"part must be in [0, parts), got part={part}, parts={parts}"])
    digits = load_digits()
    images = (digits.images.reshape(len(digits.images), 64) / 16.0).astype(np.float32)
    pattern = np.random.default_rng([9, 0]).normal(size=64)  # the price rule: fixed
    z = (images - images.mean(0)) @ pattern
    z = z / z.std()
    rng = np.random.default_rng([seed, 9])
    order = rng.permutation(len(images))[:n]
    rows = np.array_split(order, parts)[part]
    image, digit = images[rows], digits.target[rows].astype(np.int64)
    loop = np.isin(digit, (0, 6, 8, 9)).astype(np.int64)
    noise = price_noise * rng.standard_normal(len(rows))
    price = (price_mean + price_scale * (z[rows] + noise)).astype(np.float32)
    filler = np.arange(13, len(DIGIT_WORDS))
    hints = [(hint, 1 + digit), (hint, np.where(loop == 1, 11, 12))]  # ids 1..10; round/angular
    text = _texts(
        rng, lambda: list(rng.choice(filler, int(rng.integers(3, 6)), replace=False)), hints, length
    )
    return _cut(
        {"image": image, "text": text, "digit": digit, "loop": loop, "price": price}, fractions
    )


def make_kpi_dataset(
    n: int, n_features: int = 8, noise: float = 0.1, seed: int = 0, fractions: Fractions = FRACTIONS
) -> dict[str, dict[str, Arr]]:
    """Two KPIs of one feed item (the Taboola story): a click and a dwell time.

    ``click ~ Bernoulli(sigmoid(w·x))``; ``dwell = 2·sigmoid(w·x) + 0.5·(v·x) + noise``, so the
    click-probability estimate is a useful feature of the dwell task (and should not receive the
    dwell task's gradients: a stop-gradient edge).

    Returns:
        ``{split: {"x": (N, n_features) float32, "click": (N,) int64, "dwell": (N,) float32}}``.

    Example:
        >>> from mtlgraph.data.synthetic import make_kpi_dataset
        >>> data = make_kpi_dataset(100)
        >>> data["train"]["x"].shape, data["valid"]["dwell"].dtype
        ((80, 8), dtype('float32'))
    """
    rng = np.random.default_rng([seed, 7])
    w = rng.normal(0.0, 1.0, size=n_features)
    v = rng.normal(0.0, 1.0, size=n_features)
    x = rng.normal(0.0, 1.0, size=(n, n_features)).astype(np.float32)
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    click = (rng.random(n) < p).astype(np.int64)
    dwell = (2 * p + 0.5 * (x @ v) / np.sqrt(n_features) + noise * rng.standard_normal(n)).astype(
        np.float32
    )
    return _cut({"x": x, "click": click, "dwell": dwell}, fractions)


def make_feature_subsets(
    n: int, n_tasks: int = 2, n_features: int = 8, seed: int = 0, fractions: Fractions = FRACTIONS
) -> dict[str, dict[str, Arr]]:
    """Tasks whose labels depend on different feature subsets: ``y_t = [x_{2t} · x_{2t+1} > 0]``.

    Every task is an XOR of two signs on its own pair of features (the other features are noise
    to it). A trunk of 4 ReLU units can learn one such task but not two at once, while per-task
    paths (MMoE / CGC gates, cross-stitch columns) of that size can: a case built to need an
    architecture beyond one shared trunk (``tests/graph/test_architectures.py``).

    Returns:
        ``{split: {"x": (N, n_features) float32, "y0": (N,) int64, "y1": ..., }}``, one label
        array per task.

    Example:
        >>> from mtlgraph.data.synthetic import make_feature_subsets
        >>> data = make_feature_subsets(100, n_tasks=3)
        >>> sorted(data["train"]), data["train"]["x"].shape
        (['x', 'y0', 'y1', 'y2'], (80, 8))
    """
    if n_features < 2 * n_tasks:
        raise ConfigError(
            [f"feature_subsets: n_features={n_features} < 2 * n_tasks; raise n_features"]
        )
    rng = np.random.default_rng([seed, 14])
    x = rng.normal(0.0, 1.0, size=(n, n_features)).astype(np.float32)
    labels = {f"y{t}": (x[:, 2 * t] * x[:, 2 * t + 1] > 0).astype(np.int64) for t in range(n_tasks)}
    return _cut({"x": x, **labels}, fractions)


def _named(make: Callable[..., Sequence[tuple[Arr, ...]]], *names: str) -> Generator:
    """``make`` (same arguments) with the arrays of each of its splits named ``names``."""

    @functools.wraps(make)
    def generate(*args: Any, **kwargs: Any) -> dict[str, dict[str, Arr]]:
        splits = make(*args, **kwargs)
        return {
            s: dict(zip(names, arrays, strict=True))
            for s, arrays in zip(SPLITS, splits, strict=True)
        }

    return generate


GENERATORS: Registry[Generator] = Registry(
    "generator",
    {
        "circle": _named(make_circle_dataset, "x", "y"),  # x (N, 2), y (N,)
        "square": _named(make_square_dataset, "x", "y"),  # x (N, 2), y (N,)
        "inv_circle": _named(make_inv_circle_dataset, "x", "y"),  # x (N, 2), y (N,)
        "sin_cos": _named(make_sin_cos_dataset, "x", "sin", "cos"),  # x (N, 1), sin, cos (N,)
        "reviews": make_reviews_dataset,  # arrays tokens (N, L), label (N,)
        "products": make_products_dataset,  # arrays image, text, color, pattern
        "kpi": make_kpi_dataset,  # arrays x, click, dwell
        "digit_products": make_digit_products,  # arrays image, text, digit, loop, price
        "feature_subsets": make_feature_subsets,  # arrays x, y0, y1, ...
    },
)
"""Generators a config names with ``generator:``; each returns ``{split: {array: ndarray}}``."""
