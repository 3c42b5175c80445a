"""Synthetic data: generators are a registry; bad arguments are mtlgraph errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from mtlgraph import ConfigError, MtlGraphError
from mtlgraph.data.synthetic import GENERATORS, make_digit_products, make_reviews_dataset


def test_generators_registry_builds_splits() -> None:
    data = GENERATORS.get("circle")(n=50, seed=0)
    assert sorted(data) == ["test", "train", "valid"]
    assert data["train"]["x"].shape == (40, 2) and data["train"]["y"].dtype == np.int64
    with pytest.raises(ConfigError, match=r"unknown generator 'circel' \(did you mean 'circle'"):
        GENERATORS.get("circel")


def test_bad_generator_arguments_are_config_errors_reported_together() -> None:
    with pytest.raises(ConfigError) as info:
        make_reviews_dataset(100, "books", vocab_size=10)
    assert isinstance(info.value, MtlGraphError)
    assert info.value.problems == [
        "domain must be 'restaurants' or 'movies', got 'books'",
        "vocab_size must be at least 50, got 10",
    ]
    with pytest.raises(ConfigError, match=r"part must be in \[0, parts\)"):
        make_digit_products(part=3, parts=2)


def test_import_mtlgraph_loads_no_heavy_optional_library() -> None:
    code = (
        "import sys, mtlgraph; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'sklearn', 'scipy', 'tensorboard'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
