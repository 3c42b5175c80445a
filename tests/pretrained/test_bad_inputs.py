"""Bad input around pretrained encoders and adapters, each named by ``mtlgraph check`` (exit
status 2, docs/cli.md) with the key it comes from."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mtlgraph import ConfigError
from mtlgraph.experiment.cli import main
from mtlgraph.experiment.module_types import build_module

pytest.importorskip("transformers")

TEXTS = ["good shoe", "bad hat", "the red coat", "a very poor price", "not green", "blue size"]


def _config(tmp_path: Path, modules: dict[str, Any], data: dict[str, Any] | None = None,
            adapter: str = "enc") -> Path:  # fmt: skip
    """Task ``t`` = ``adapter`` (on field ``review`` and its mask) + a head; dataset ``d``."""
    rows = ["review,label,split"] + [
        f"{TEXTS[i % 6]},{i % 2},{'train' if i < 12 else 'valid'}" for i in range(16)
    ]
    (tmp_path / "d.csv").write_text("\n".join(rows) + "\n")
    dataset = data or {
        "source": {
            "type": "table",
            "path": "d.csv",
            "split_column": "split",
            "text": {"review": {}},
        },
        "fields": {"review": "review"},
        "labels": {"t": "label"},
    }
    field = next(iter(dataset["fields"]))
    inputs = [["_input_", field]] + ([["_input_", f"{field}_mask"]] if field == "review" else [])
    cfg = {
        "modules": {**modules, "head": {"type": "linear", "in_features": 16, "out_features": 2}},
        "tasks": {
            "t": {
                "ops": [
                    {"module": adapter, "inputs": inputs},
                    {"module": "head", "inputs": [adapter]},
                ]
            }
        },
        "data": {"datasets": {"d": dataset}},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _check(capsys: pytest.CaptureFixture[str], path: Path) -> str:
    code = main(["check", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    return err


def test_a_directory_that_is_no_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    err = _check(capsys, _config(tmp_path, {"enc": {"type": "hf_encoder", "path": "empty"}}))
    assert "modules.enc: hf_encoder: path" in err
    assert "is not a model directory: it has no config.json" in err

    import transformers

    transformers.BertConfig(vocab_size=25, hidden_size=16).save_pretrained(tmp_path / "cfg_only")
    err = _check(capsys, _config(tmp_path, {"enc": {"type": "hf_encoder", "path": "cfg_only"}}))
    assert "modules.enc: hf_encoder: path" in err
    assert "holds a model config but no weights it can load" in err


def test_a_tokenizer_with_more_ids_than_the_model_embeds(
    tmp_path: Path, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = {
        "source": {
            "type": "table",
            "path": "d.csv",
            "split_column": "split",
            "text": {"review": {"kind": "wordpiece", "vocab_size": 200}},
        },
        "fields": {"review": "review"},
        "labels": {"t": "label"},
    }
    enc = {"enc": {"type": "hf_encoder", "path": str(bert_dir)}}
    err = _check(capsys, _config(tmp_path, enc, data))
    assert "data.datasets.d.source.text.review: the tokenizer has" in err
    assert "and module 'enc' of task 't' embeds 25: use the model directory's own tokenizer" in err


def test_base_naming_no_module_or_a_non_encoder(
    tmp_path: Path, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = {
        "enc": {"type": "hf_encoder", "path": str(bert_dir)},
        "lin": {"type": "linear", "in_features": 2, "out_features": 2},
        "a": {"type": "lora", "base": "ecn"},
        "b": {"type": "lora", "base": "lin"},
    }
    err = _check(capsys, _config(tmp_path, modules, adapter="a"))
    assert "modules.a.base: no module 'ecn' (did you mean 'enc'?)" in err
    assert "modules.b.base: 'lin' is a module of type 'linear'; it must be 'hf_encoder'" in err


def test_target_modules_matching_nothing(
    tmp_path: Path, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = {
        "enc": {"type": "hf_encoder", "path": str(bert_dir)},
        "a": {"type": "lora", "base": "enc", "target_modules": ["q_proj"]},
    }
    err = _check(capsys, _config(tmp_path, modules, adapter="a"))
    assert "modules.a: lora: target_modules ['q_proj'] match no Linear or Conv2d layer" in err
    assert "'query'" in err and "'value'" in err  # the names it has


def test_init_from_on_a_pretrained_encoder_names_path_instead(
    tmp_path: Path, bert_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    modules = {
        "enc": {"type": "hf_encoder", "path": str(bert_dir), "init_from": "enc.pt"},
        "extra": {"type": "linear", "in_features": 2},
    }
    err = _check(capsys, _config(tmp_path, modules))
    assert (
        "modules.enc.init_from: module type 'hf_encoder' takes its weights from 'path:', not "
        "from init_from; save your weights with model.save_pretrained(directory) and declare "
        "'path: directory' instead"
    ) in err
    assert "modules.extra" in err and "out_features" in err  # reported with the others

    with pytest.raises(ConfigError, match=r"modules\.enc\.init_from: module type 'hf_encoder'"):
        build_module(modules["enc"], "modules.enc")  # by hand too, before loading the model


def test_an_image_size_the_model_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.png")
    (tmp_path / "pics.csv").write_text(
        "file,label\n" + "".join(f"{i}.png,{i % 2}\n" for i in range(4))
    )
    vit = {"model_type": "vit", "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 32, "image_size": 16, "patch_size": 8}  # fmt: skip
    data = {
        "source": {
            "type": "images",
            "path": "pics.csv",
            "fractions": {"train": 0.5, "valid": 0.5},
            "images": {"folder": "img", "resize": [32, 32]},
        },
        "fields": {"image": "file"},
        "labels": {"t": "label"},
    }
    err = _check(capsys, _config(tmp_path, {"enc": {"type": "hf_encoder", "config": vit}}, data))
    assert (
        "data.datasets.d.source.images.resize: module 'enc' of task 't' takes only 16x16 images, "
        "not 32x32: declare resize: [16, 16]"
    ) in err


def test_a_missing_extra_names_itself(
    tmp_path: Path,
    bert_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers: ImportError
    err = _check(capsys, _config(tmp_path, {"enc": {"type": "hf_encoder", "path": str(bert_dir)}}))
    assert "modules.enc: hf_encoder (a Hugging Face model) needs transformers: " in err
    assert "pip install 'mtlgraph[hf]'" in err
