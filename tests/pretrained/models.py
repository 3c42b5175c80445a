"""The tiny pretrained models' shapes, shared by the fixtures and the tests."""

from __future__ import annotations

from typing import Any

WORDS = [
    "good", "great", "fine", "bad", "awful", "poor", "shoe", "hat", "coat", "red", "blue",
    "green", "the", "is", "a", "very", "not", "this", "price", "size",
]  # fmt: skip
"""The tiny BERT's words (after the five special tokens)."""

BERT: dict[str, Any] = {
    "model_type": "bert",
    "hidden_size": 16,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "intermediate_size": 32,
    "max_position_embeddings": 32,
}
