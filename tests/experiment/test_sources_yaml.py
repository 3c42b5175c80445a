"""File sources, dotted module types and init_from declared in YAML."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mtlgraph.data.sources.tokenizer import TOKENIZERS
from mtlgraph.exceptions import CheckpointError, ConfigError, DataError
from mtlgraph.experiment.build import build_experiment, build_model
from mtlgraph.experiment.config import parse_config
from mtlgraph.experiment.sources import VOCAB_DIR

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]


def write_reviews(tmp: Path, n: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = int(rng.integers(2))
        words = rng.choice(WORDS[:3] if label else WORDS[3:], size=3).tolist()
        rows.append(
            {
                "text": " ".join(words) + " movie",
                "stars": float(rng.random()),
                "label": label,
                "split": "train" if i < n * 0.8 else "valid",
            }
        )
    f = tmp / "reviews.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def config(**source: Any) -> dict[str, Any]:
    return {
        "modules": {
            "bag": {"type": "embedding_bag", "num_embeddings": 20, "embedding_dim": 8},
            "head": {"type": "torch.nn.Linear", "in_features": 9, "out_features": 2},
            "cat": {"type": "concat"},
        },
        "tasks": {
            "sentiment": {
                "ops": [
                    {"module": "bag", "inputs": [["_input_", "text"]]},
                    {"module": "cat", "inputs": ["bag", ["_input_", "stars"]]},
                    {"module": "head", "inputs": ["cat"]},
                ]
            }
        },
        "data": {
            "batch_size": 16,
            "datasets": {
                "reviews": {
                    "source": {
                        "type": "table",
                        "path": "reviews.jsonl",
                        "split_column": "split",
                        "text": {"text": {"vocab_size": 20}},
                        **source,
                    },
                    "fields": {"text": "text", "stars": "stars"},
                    "labels": {"sentiment": "label"},
                }
            },
        },
        "trainer": {"n_epochs": 3, "lr": 0.1, "progress_bar": False},
    }


def test_table_source_trains_and_keeps_its_vocabulary(tmp_path: Path) -> None:
    write_reviews(tmp_path)
    cfg = parse_config(config(), base_dir=tmp_path)
    run = tmp_path / "run"
    exp = build_experiment(cfg, run)
    assert [(d.name, d.split, len(d)) for d in exp.datasets] == [
        ("reviews", "train", 160),
        ("reviews", "valid", 40),
    ]
    vocab = json.loads((run / VOCAB_DIR / "reviews.text.json").read_text())
    assert vocab["tokens"][:2] == ["<pad>", "<unk>"] and set(WORDS) < set(vocab["tokens"])
    fingerprint = exp.trainer.experiment_config["vocabularies"]["reviews.text"]
    assert isinstance(fingerprint, str) and len(fingerprint) == 16
    exp.trainer.fit(exp.model, exp.loaders)
    assert exp.model.score(exp.loaders)["sentiment/reviews/valid/accuracy"] >= 0.95
    # built again for the same run directory: the same vocabulary, the file untouched
    before = (run / VOCAB_DIR / "reviews.text.json").stat().st_mtime_ns
    again = build_experiment(cfg, run)
    assert again.trainer.experiment_config["vocabularies"]["reviews.text"] == fingerprint
    assert (run / VOCAB_DIR / "reviews.text.json").stat().st_mtime_ns == before


def test_changed_vocabulary_on_resume_is_an_error(tmp_path: Path) -> None:
    write_reviews(tmp_path)
    run = tmp_path / "run"
    build_experiment(parse_config(config(), base_dir=tmp_path), run)
    saved = (run / VOCAB_DIR / "reviews.text.json").read_text()
    write_reviews(tmp_path, seed=1)  # other training texts: other counts, other ids
    changed = config()
    changed["data"]["datasets"]["reviews"]["source"]["text"]["text"]["vocab_size"] = 5
    with pytest.raises(
        DataError,
        match=r"source\.text\.text: the vocabulary built from this "
        r"config's training split differs from the run's .*start a new run",
    ):
        build_experiment(parse_config(changed, base_dir=tmp_path), run)
    assert (run / VOCAB_DIR / "reviews.text.json").read_text() == saved  # not damaged


def test_checkpoint_vocabulary_mismatch_is_an_error(tmp_path: Path) -> None:
    write_reviews(tmp_path)
    cfg = config()
    cfg["trainer"].update(n_epochs=1, checkpoint_every=1)
    run = tmp_path / "run"
    exp = build_experiment(parse_config(cfg, base_dir=tmp_path), run)
    exp.trainer.fit(exp.model, exp.loaders)
    (run / VOCAB_DIR / "reviews.text.json").unlink()  # a lost vocabulary file, other settings
    cfg["data"]["datasets"]["reviews"]["source"]["text"]["text"]["vocab_size"] = 6
    with pytest.raises(CheckpointError, match="the checkpoint was trained with vocabulary"):
        build_experiment(parse_config(cfg, base_dir=tmp_path), run)


def test_source_config_problems_are_reported_at_once(tmp_path: Path) -> None:
    bad = config(type="images", fractions={"train": 1.5})
    bad["data"]["datasets"]["reviews"]["source"]["text"]["text"]["vocab_size"] = 2
    with pytest.raises(ConfigError) as info:
        parse_config(bad, base_dir=tmp_path)
    message = str(info.value)
    assert "source.images: needed by type 'images'" in message
    assert "fractions: give 'split_column' or 'fractions', not both" in message
    assert "vocab_size: must be >= 3" in message


def test_data_problems_name_the_column_and_row(tmp_path: Path) -> None:
    write_reviews(tmp_path)
    with (tmp_path / "reviews.jsonl").open("a") as fh:
        fh.write(json.dumps({"text": "x", "stars": "many", "label": 1, "split": "train"}) + "\n")
    cfg = config()
    cfg["data"]["datasets"]["reviews"]["labels"] = {"sentiment": "labl"}
    with pytest.raises(DataError) as info:
        build_experiment(parse_config(cfg, base_dir=tmp_path))
    message = str(info.value)
    assert (
        "data.datasets.reviews.fields.stars: '" in message
        and "reviews.jsonl' line 201, column 'stars': 'many' is not a number" in message
    )
    assert "has no column 'labl' (did you mean 'label'?)" in message
    cfg = config(path="nothing.csv")
    with pytest.raises(DataError, match="file '.*nothing.csv' does not exist"):
        build_experiment(parse_config(cfg, base_dir=tmp_path))


def test_user_tokenizer_from_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_reviews(tmp_path)
    (tmp_path / "my_tokens.py").write_text(
        "import torch\n"
        "def char_ids(text):\n"
        "    return torch.tensor([1 + ord(c) % 19 for c in text[:10]])\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = config()
    cfg["imports"] = ["my_tokens"]
    cfg["data"]["datasets"]["reviews"]["source"]["text"] = {
        "text": {"tokenizer": "my_tokens.char_ids"}
    }
    exp = build_experiment(parse_config(cfg, base_dir=tmp_path), tmp_path / "run")
    x, _ = exp.datasets[0].batch(slice(0, 1))
    assert x["text"].shape == (1, 10) and not (tmp_path / "run" / VOCAB_DIR).exists()
    assert "vocabularies" not in exp.trainer.experiment_config
    text = cfg["data"]["datasets"]["reviews"]["source"]["text"]["text"]
    text["tokenizer"] = "my_tokens.nope"
    with pytest.raises(ConfigError, match=r"tokenizer: cannot import 'my_tokens.nope'"):
        parse_config(cfg, base_dir=tmp_path)  # at validation, before any data is read
    TOKENIZERS.register("chars_test", sys.modules["my_tokens"].char_ids)
    try:
        text["tokenizer"] = {"name": "chars_test", "lenght": 3}
        with pytest.raises(ConfigError, match=r"tokenizer.lenght: tokenizer 'chars_test' takes no"):
            parse_config(cfg, base_dir=tmp_path)
        text["tokenizer"] = "chars_test"
        exp = build_experiment(parse_config(cfg, base_dir=tmp_path), tmp_path / "run2")
        assert exp.datasets[0].batch(slice(0, 1))[0]["text"].shape == (1, 10)
    finally:
        TOKENIZERS.unregister("chars_test")


# ---------------------------------------------------------------- modules


def lstm_config(**lstm: Any) -> dict[str, Any]:
    cfg = config()
    cfg["modules"] = {
        "emb": {"type": "torch.nn.Embedding", "num_embeddings": 20, "embedding_dim": 8},
        "lstm": {
            "type": "torch.nn.LSTM",
            "input_size": 8,
            "hidden_size": 8,
            "batch_first": True,
            **lstm,
        },
        "enc": {
            "type": "torch.nn.TransformerEncoder",
            "num_layers": 1,
            "encoder_layer": {
                "type": "torch.nn.TransformerEncoderLayer",
                "d_model": 8,
                "nhead": 2,
                "dim_feedforward": 16,
                "batch_first": True,
            },
        },
        "head": {"type": "linear", "in_features": 8, "out_features": 2},
    }
    cfg["tasks"]["sentiment"]["ops"] = [
        {"module": "emb", "inputs": [["_input_", "text"]]},
        {"module": "lstm", "inputs": ["emb"]},
        {"module": "enc", "inputs": [["lstm", 0]]},
        {"module": "head", "inputs": ["enc"]},
    ]
    return cfg


def test_dotted_module_types_with_nested_specs() -> None:
    cfg = parse_config(lstm_config())
    model = build_model(cfg)
    assert isinstance(model.module_pool["lstm"], nn.LSTM)
    enc = model.module_pool["enc"]
    assert isinstance(enc, nn.TransformerEncoder) and enc.layers[0].self_attn.num_heads == 2
    out, _ = model.module_pool["lstm"](torch.zeros(2, 5, 8))
    assert out.shape == (2, 5, 8)


def test_dotted_module_type_problems() -> None:
    cfg = lstm_config(hidden_sise=3)
    cfg["modules"]["emb"]["type"] = "torch.nn.Embeding"
    cfg["modules"]["enc"]["encoder_layer"]["nhead"] = "two"
    cfg["modules"]["head"]["type"] = "nowhere_pkg.Head"
    cfg["modules"]["fn"] = {"type": "torch.nn.functional.relu"}
    cfg["modules"]["num"] = {"type": "math.pi"}
    with pytest.raises(ConfigError) as info:
        parse_config(cfg)
    message = str(info.value)
    assert (
        "modules.lstm.hidden_sise: module type 'torch.nn.LSTM' takes no argument "
        "'hidden_sise' (did you mean 'hidden_size'?)" in message
    )
    assert (
        "modules.emb.type: cannot import 'torch.nn.Embeding': 'torch.nn' has no "
        "'Embeding' (did you mean 'Embedding'?)" in message
    )
    assert "modules.enc.encoder_layer.nhead: expected an integer" in message
    assert (
        "modules.head.type: cannot import 'nowhere_pkg.Head': no module named "
        "'nowhere_pkg'" in message
    )
    assert "modules.num.type: 'math.pi' is a float, not a Module subclass or a function" in message
    assert (
        "modules.fn.input: missing (required by module type 'torch.nn.functional.relu')" in message
    )  # a function is a factory too: its signature is checked


def test_init_from_loads_weights(tmp_path: Path) -> None:
    source = nn.Linear(8, 2)
    torch.save(source.state_dict(), tmp_path / "head.pt")
    cfg = lstm_config()
    cfg["modules"]["head"]["init_from"] = "head.pt"
    model = build_model(parse_config(cfg, base_dir=tmp_path))
    assert torch.equal(model.module_pool["head"].weight, source.weight)
    torch.save(nn.Linear(4, 2).state_dict(), tmp_path / "small.pt")
    torch.save({"w": [1, 2]}, tmp_path / "list.pt")
    for file, match in (
        ("small.pt", r"'weight' has shape \[2, 4\] in '.*small.pt', the module's is \[2, 8\]"),
        ("list.pt", "holds no state dict"),
        ("absent.pt", "does not exist"),
    ):
        cfg["modules"]["head"]["init_from"] = file
        with pytest.raises(ConfigError, match=rf"modules\.head\.init_from: .*{match}"):
            build_model(parse_config(cfg, base_dir=tmp_path))
    cfg["modules"]["head"]["init_from"] = 3
    with pytest.raises(ConfigError, match="init_from: expected a file path"):
        parse_config(cfg, base_dir=tmp_path)


# ---------------------------------------------------------------- images and shards


def image_config(tmp: Path) -> dict[str, Any]:
    from PIL import Image

    (tmp / "img").mkdir()
    lines = ["file,digit,desc,price"]
    for i in range(10):
        Image.fromarray(np.full((8, 8), 25 * i, dtype=np.uint8)).save(tmp / "img" / f"{i}.png")
        lines.append(f"{i}.png,{i % 2},{'red' if i % 2 else 'blue'} tag,{i / 10}")
    (tmp / "products.csv").write_text("\n".join(lines) + "\n")
    return {
        "modules": {
            "cnn": {"type": "conv2d_stack", "in_channels": 1, "channels": [4]},
            "head": {"type": "linear", "in_features": 4, "out_features": 2},
        },
        "tasks": {
            "digit_task": {
                "ops": [
                    {"module": "cnn", "inputs": [["_input_", "image"]]},
                    {"module": "head", "inputs": ["cnn"]},
                ]
            }
        },
        "data": {
            "batch_size": 4,
            "datasets": {
                "products": {
                    "source": {
                        "type": "images",
                        "path": "products.csv",
                        "fractions": {"train": 0.6, "test": 0.4},
                        "images": {
                            "folder": "img",
                            "mode": "L",
                            "resize": [4, 4],
                            "normalize": {"mean": [0.5], "std": [0.5]},
                        },
                        "text": {"desc": {}},
                    },
                    "fields": {"image": "file", "desc": "desc", "price": "price"},
                    "labels": {"digit_task": "digit"},
                }
            },
        },
        "trainer": {"n_epochs": 1, "progress_bar": False},
    }


def test_images_source_builds_named_datasets(tmp_path: Path) -> None:
    from mtlgraph import NamedDataset

    exp = build_experiment(parse_config(image_config(tmp_path), base_dir=tmp_path), tmp_path / "r")
    assert [(type(d), d.split, len(d)) for d in exp.datasets] == [
        (NamedDataset, "train", 6),
        (NamedDataset, "test", 4),
    ]
    x, y = next(iter(exp.loaders[0]))
    assert x["image"].shape == (4, 1, 4, 4) and float(x["image"][0].min()) == -1.0
    assert x["desc"].shape == (4, 2) and x["price"].shape == (4, 1)
    assert y["digit_task"].tolist() == [0, 1, 0, 1]
    assert (tmp_path / "r" / VOCAB_DIR / "products.desc.json").is_file()
    cfg = image_config_labels(exp.config)
    with pytest.raises(
        DataError,
        match=r"column 'label3' of '.*products.csv' \(train split\) for task 'digit_task': "
        r"label 2 \(row 2; 1 more\) is outside 0..1: the head outputs 2 classes",
    ):
        build_experiment(cfg)
    (tmp_path / "img" / "3.png").unlink()
    with pytest.raises(DataError, match=r"1 image file\(s\) missing from .*'3.png' \(row 4\)"):
        build_experiment(exp.config)


def image_config_labels(cfg: Any) -> Any:
    """The same config, labels read from a column with class 2 (the head has 2 classes)."""
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.data.datasets["products"].labels = {"digit_task": "label3"}
    csv = Path(cfg.base_dir) / "products.csv"
    lines = csv.read_text().splitlines()
    csv.write_text(
        "\n".join([lines[0] + ",label3"] + [f"{r},{i % 3}" for i, r in enumerate(lines[1:])]) + "\n"
    )
    return cfg


def test_shards_source_streams_each_split(tmp_path: Path) -> None:
    from mtlgraph import NamedDataset

    (tmp_path / "logs").mkdir()
    for part in range(3):
        rows = [json.dumps({"f0": r / 4, "f1": part, "clicked": (r + part) % 2}) for r in range(4)]
        (tmp_path / "logs" / f"part-{part}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = {
        "modules": {"head": {"type": "linear", "in_features": 2, "out_features": 2}},
        "tasks": {"click_task": {"ops": [{"module": "head", "inputs": [["_input_", "x"]]}]}},
        "data": {
            "batch_size": 5,
            "datasets": {
                "clicks": {
                    "source": {
                        "type": "shards",
                        "path": {"train": "logs/part-[01].jsonl", "valid": ["logs/part-2.jsonl"]},
                    },
                    "fields": {"x": ["f0", "f1"]},
                    "labels": {"click_task": "clicked"},
                }
            },
        },
        "trainer": {"n_epochs": 1, "progress_bar": False},
    }
    exp = build_experiment(parse_config(cfg, base_dir=tmp_path))
    assert [(type(d).__name__, d.split, d.dataset.num_units()) for d in exp.datasets] == [
        ("NamedStream", "train", 2),
        ("NamedStream", "valid", 1),
    ]
    assert isinstance(exp.datasets[0], NamedDataset)
    batches = list(exp.loaders[1])
    assert [len(y["click_task"]) for _, y in batches] == [4]
    assert batches[0][0]["x"][:, 1].tolist() == [2.0] * 4
    cfg["trainer"].update(steps_per_epoch=6, n_epochs=2, batch_scheduler="uniform", lr=0.1)
    exp = build_experiment(parse_config(cfg, base_dir=tmp_path))
    exp.trainer.fit(exp.model, exp.loaders)  # a stream trains for steps_per_epoch steps
    assert exp.trainer.global_step == 12
    cfg["data"]["datasets"]["clicks"]["source"]["path"] = "logs/nothing-*.jsonl"
    with pytest.raises(DataError, match=r"source.path: no file matches 'logs/nothing-\*.jsonl'"):
        build_experiment(parse_config(cfg, base_dir=tmp_path))


def test_evaluation_without_a_training_split_uses_the_runs_vocabulary(tmp_path: Path) -> None:
    write_reviews(tmp_path)
    run = tmp_path / "run"
    trained = build_experiment(parse_config(config(), base_dir=tmp_path), run)
    cfg = config()
    cfg["data"]["datasets"]["reviews"]["splits"] = ["valid"]
    valid = build_experiment(parse_config(cfg, base_dir=tmp_path), run)
    ids = valid.datasets[0].batch(slice(0, 40))[0]["text"]
    assert torch.equal(ids, trained.datasets[1].batch(slice(0, 40))[0]["text"])
    with pytest.raises(DataError, match="the vocabulary is built from the training split: no "):
        build_experiment(parse_config(cfg, base_dir=tmp_path))  # no run directory to read
