"""Tiny pretrained models, made offline once per session and loaded back by path, exactly as a
user with downloaded weights does (no network: ``HF_HUB_OFFLINE=1``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from pretrained.models import BERT, WORDS


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT and its word-piece tokenizer, saved with ``save_pretrained``."""
    transformers = pytest.importorskip("transformers")
    import torch

    path = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)})
    tokenizer.save_pretrained(path)
    spec = {k: v for k, v in BERT.items() if k != "model_type"}
    config = transformers.BertConfig(vocab_size=len(vocab), **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.BertModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def resnet_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny ResNet and its image-processor config (mean, std, size)."""
    transformers = pytest.importorskip("transformers")
    import torch

    path = tmp_path_factory.mktemp("tiny-resnet")
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        transformers.ResNetModel(config).save_pretrained(path)
    processor = {"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.2, 0.2], "size": 16}
    (path / "preprocessor_config.json").write_text(json.dumps(processor))
    return path


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models: one thread is faster and steadier on a shared machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
