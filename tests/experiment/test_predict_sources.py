"""``mtlgraph predict`` through a dataset's declared file ``source``: table text with the run's
vocabulary, image folders (file names as ids), shard globs, config datasets with a source, and
the bad-input cases (exit status 2, culprit named)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from experiment_helpers import write_config

from mtlgraph import DictDataLoader, DictDataset
from mtlgraph.data.sources import ImageDecoder, WordTokenizer
from mtlgraph.experiment.cli import main
from mtlgraph.experiment.config import load_config
from mtlgraph.experiment.inference_cli import load_model
from mtlgraph.experiment.predict import read_prediction_data
from mtlgraph.experiment.sources import VOCAB_DIR
from mtlgraph.inference.predictions import read_predictions

WORDS = ["good", "great", "fine", "bad", "awful", "poor"]
TOL = 1e-5


def _predict(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["predict", *args, "--quiet"])
    return code, capsys.readouterr().err


def _eager(config: Path, run: Path, task: str, X: dict[str, torch.Tensor]) -> np.ndarray:
    model = load_model(load_config(config), run)
    loader = DictDataLoader(DictDataset("new", "serve", X, {}), 4)
    return np.asarray(model.predict(loader, task_names=[task], return_preds=True)["probs"][task])


# ---------------------------------------------------------------- a table with a text column


def _reviews_config() -> dict[str, Any]:
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
                        "text": {"text": {"vocab_size": 20, "max_length": 16}},
                    },
                    "fields": {"text": "text", "stars": "stars"},
                    "labels": {"sentiment": "label"},
                }
            },
        },
        "trainer": {"n_epochs": 1, "lr": 0.1, "progress_bar": False},
    }


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reviews")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):
        label = int(rng.integers(2))
        words = rng.choice(WORDS[:3] if label else WORDS[3:], size=3).tolist()
        split = "train" if i < 48 else "valid"
        rows.append(
            {"text": " ".join(words), "stars": float(rng.random()), "label": label, "split": split}
        )
    (root / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = write_config(root / "reviews.yaml", _reviews_config())
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={root / 'run'}"]) == 0
    return config, root / "run"


def test_table_text_uses_the_runs_vocabulary(
    reviews: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = reviews
    new = tmp_path / "new.csv"
    new.write_text("name,text,stars\na,good great,0.5\nb,zzzunseen bad movie,0.25\nc,poor,1.0\n")
    tok = WordTokenizer.load(run / VOCAB_DIR / "reviews.text.json")
    data = read_prediction_data(load_config(config), new, ["text", "stars"], run_dir=run)
    (X, _), *_ = data.batches(8)
    expected = [tok.encode(t) for t in ["good great", "zzzunseen bad movie", "poor"]]
    assert X["text"][1].tolist() == expected[1].tolist() and int(X["text"][1][0]) == 1  # <unk>
    assert X["text"][0][:2].tolist() == expected[0].tolist() and X["text_mask"][2].sum() == 1
    out = tmp_path / "p.jsonl"
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", str(new), "--out", str(out),
        "--id-column", "name",
    )  # fmt: skip
    assert code == 0, err
    rows = read_predictions(out)
    assert [r["id"] for r in rows] == ["a", "b", "c"]
    eager = _eager(config, run, "sentiment", {"text": X["text"], "stars": X["stars"]})
    np.testing.assert_allclose([r["sentiment/probs"] for r in rows], eager, atol=TOL)


def test_config_dataset_with_a_source_by_name(
    reviews: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = reviews
    out = tmp_path / "p.jsonl"
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", "reviews:valid", "--out", str(out)
    )
    assert code == 0, err
    rows = read_predictions(out)
    assert [r["id"] for r in rows] == list(range(12))
    valid = tmp_path / "valid.jsonl"  # the same rows as a new file: the same predictions
    lines = (config.parent / "reviews.jsonl").read_text().splitlines()[48:]
    valid.write_text("\n".join(lines) + "\n")
    again = tmp_path / "again.jsonl"
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", str(valid), "--out", str(again)
    )
    assert code == 0, err
    np.testing.assert_allclose(
        [r["sentiment/probs"] for r in read_predictions(again)],
        [r["sentiment/probs"] for r in rows],
        atol=TOL,
    )


def test_missing_column_and_missing_vocabulary_exit_2(
    reviews: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, run = reviews
    bad = tmp_path / "bad.csv"
    bad.write_text("text,star\ngood,1\n")
    out = tmp_path / "p.jsonl"
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", str(bad), "--out", str(out)
    )
    assert code == 2
    assert (
        f"'{bad}' has no column for input field 'stars' (looked for 'stars') (did you mean 'star'?)"
        in err
    )
    assert not out.exists()
    lost = tmp_path / "run"
    shutil.copytree(run, lost)
    (lost / VOCAB_DIR / "reviews.text.json").unlink()
    good = tmp_path / "good.csv"
    good.write_text("text,stars\ngood,1\n")
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(lost), "--data", str(good), "--out", str(out)
    )
    assert code == 2
    assert f"needs the run's vocabulary '{lost / VOCAB_DIR / 'reviews.text.json'}'" in err
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".pt2", ".onnx"])
def test_export_of_text_has_a_dynamic_length_and_embeds_the_vocabulary(
    reviews: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], suffix: str
) -> None:
    from mtlgraph.experiment.predict import vocabulary_files
    from mtlgraph.inference.export import load_metadata, run_exported

    config, run = reviews
    files = vocabulary_files(load_config(config), run, ["text", "stars"])
    assert files == {"text": str(run / VOCAB_DIR / "reviews.text.json")}
    out = tmp_path / f"m{suffix}"
    assert main(["export", str(config), "--checkpoint", str(run), "--out", str(out)]) == 0
    capsys.readouterr()
    meta = load_metadata(out)  # from inside the file: the sidecar is a copy
    assert json.loads(Path(f"{out}.json").read_text()) == meta
    inputs = {i["name"]: i for i in meta["inputs"]}
    tok = WordTokenizer.load(files["text"])
    vocab = inputs["text"]["vocabulary"]
    assert (out.parent / vocab["file"]).resolve() == Path(files["text"]).resolve()
    assert vocab["tokens"] == tok.tokens and vocab["fingerprint"] == tok.fingerprint
    assert (
        inputs["text"]["shape"] == ["batch", "text_length"] and inputs["text"]["max_length"] == 16
    )
    assert inputs["stars"]["vocabulary"] is None and inputs["stars"]["shape"] == ["batch", 1]
    # texts shorter (1 word) and longer (14 words) than the example batch's (3 words)
    new = tmp_path / "new.csv"
    texts = ["good", "bad " * 7 + "great " * 7, "poor fine", "awful"]
    new.write_text("text,stars\n" + "".join(f"{t},0.5\n" for t in texts))
    preds = tmp_path / "p.jsonl"
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", str(new), "--out", str(preds)
    )
    assert code == 0, err
    for text in (["good", "awful"], texts):
        ids = [tok.encode(t) for t in text]
        X = torch.zeros(len(ids), max(len(i) for i in ids), dtype=torch.long)
        for row, i in enumerate(ids):
            X[row, : len(i)] = i
        got = run_exported(out, {"text": X, "stars": torch.full((len(ids), 1), 0.5)})
        expected = [r["sentiment/probs"] for r in read_predictions(preds) if texts[r["id"]] in text]
        np.testing.assert_allclose(got["sentiment"].numpy(), expected, atol=1e-4)


# ---------------------------------------------------------------- images and shards


def _image_config() -> dict[str, Any]:
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
                    },
                    "fields": {"image": "file"},
                    "labels": {"digit_task": "digit"},
                }
            },
        },
        "trainer": {"n_epochs": 1, "progress_bar": False},
    }


def test_image_folder_ids_are_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    for folder in ("img", "new"):
        (tmp_path / folder).mkdir()
    lines = ["file,digit"]
    for i in range(10):
        Image.fromarray(np.full((8, 8), 25 * i, dtype=np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"{i}.png,{i % 2}")
    (tmp_path / "products.csv").write_text("\n".join(lines) + "\n")
    rng = np.random.default_rng(1)
    names = ["b.png", "a.jpg", "c.png"]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (6, 10), dtype=np.uint8)).save(tmp_path / "new" / name)
    (tmp_path / "new" / "notes.txt").write_text("not an image")
    config = write_config(tmp_path / "images.yaml", _image_config())
    run = tmp_path / "run"
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={run}"]) == 0
    out = tmp_path / "p.jsonl"
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", str(tmp_path / "new"),
        "--out", str(out), "--batch-size", "2",
    )  # fmt: skip
    assert code == 0, err
    rows = read_predictions(out)
    assert [r["id"] for r in rows] == sorted(names)
    decode = ImageDecoder(mode="L", size=(4, 4), mean=(0.5,), std=(0.5,))
    images = torch.stack([decode(tmp_path / "new" / n) for n in sorted(names)])
    eager = _eager(config, run, "digit_task", {"image": images})
    np.testing.assert_allclose([r["digit_task/probs"] for r in rows], eager, atol=TOL)
    workers = tmp_path / "w.jsonl"  # decoded in 2 worker processes: the same rows, in order
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", str(tmp_path / "new"),
        "--out", str(workers), "--batch-size", "1", "--num-workers", "2",
    )  # fmt: skip
    assert code == 0, err
    assert read_predictions(workers) == rows
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", "products:test",
        "--out", str(workers),
    )  # fmt: skip
    assert code == 0, err
    assert [r["id"] for r in read_predictions(workers)] == [f"{i}.png" for i in range(6, 10)]


def test_shards_glob_is_streamed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "logs").mkdir()
    (tmp_path / "new").mkdir()
    for folder, parts in (("logs", 2), ("new", 3)):
        for part in range(parts):
            rows = [
                json.dumps({"f0": r / 4, "f1": part, "clicked": (r + part) % 2}) for r in range(4)
            ]
            (tmp_path / folder / f"part-{part}.jsonl").write_text("\n".join(rows) + "\n")
    cfg = {
        "modules": {"head": {"type": "linear", "in_features": 2, "out_features": 2}},
        "tasks": {"click_task": {"ops": [{"module": "head", "inputs": [["_input_", "x"]]}]}},
        "data": {
            "batch_size": 4,
            "datasets": {
                "clicks": {
                    "source": {"type": "shards", "path": "logs/part-*.jsonl"},
                    "fields": {"x": ["f0", "f1"]},
                    "labels": {"click_task": "clicked"},
                }
            },
        },
        "trainer": {
            "n_epochs": 1,
            "steps_per_epoch": 2,
            "batch_scheduler": "uniform",
            "progress_bar": False,
        },
    }
    config = write_config(tmp_path / "clicks.yaml", cfg)
    run = tmp_path / "run"
    assert main(["train", str(config), "--quiet", f"trainer.run_dir={run}"]) == 0
    out = tmp_path / "p.jsonl"
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", str(tmp_path / "new" / "part-*.jsonl"),
        "--out", str(out), "--batch-size", "3",
    )  # fmt: skip
    assert code == 0, err
    rows = read_predictions(out)
    assert [r["id"] for r in rows] == list(range(12))
    x = torch.tensor([[r / 4, part] for part in range(3) for r in range(4)], dtype=torch.float32)
    eager = _eager(config, run, "click_task", {"x": x})
    np.testing.assert_allclose([r["click_task/probs"] for r in rows], eager, atol=TOL)
    code, err = _predict(
        capsys, str(config), "--checkpoint", str(run), "--data", "clicks", "--out", str(out)
    )  # the config's (shuffled for training) stream, predicted in file order
    assert code == 0, err
    by_name = read_predictions(out)
    assert [r["id"] for r in by_name] == [f"train/{i}" for i in range(8)]
    np.testing.assert_allclose(
        [r["click_task/probs"] for r in by_name],
        [r["click_task/probs"] for r in rows[:8]],
        atol=TOL,
    )  # logs/part-0,1 hold the same rows as new/part-0,1
