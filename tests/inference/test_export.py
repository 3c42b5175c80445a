"""Export of task subsets: only the chosen tasks' modules and fields, a dynamic batch dimension,
exported == eager (max abs difference <= 1e-5) with the loaded .pt2 and with onnxruntime on every
shipped config's tasks (MTAN also on its own), the sidecar, and the errors (a module the exporter
refuses is named)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from experiment_helpers import ROOT, cli_env
from torch import nn

from mtlgraph import GraphError, MultitaskClassifier, Operation, Task
from mtlgraph.experiment.build import build_model
from mtlgraph.experiment.config import load_config
from mtlgraph.experiment.inference_cli import config_fields, example_batch
from mtlgraph.graph.experts import Experts, Gate, MTANAttention
from mtlgraph.inference.export import (
    TaskGraph,
    example_inputs,
    export_program,
    input_fields,
    max_export_error,
    run_exported,
    save_program,
    sidecar_path,
)

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TOL = 1e-5


def _model() -> MultitaskClassifier:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU())
    tasks = [
        Task(
            "a",
            {"trunk": trunk, "a_head": nn.Linear(8, 3)},
            [Operation("trunk", [("_input_", "x")]), Operation("a_head", ["trunk"])],
        ),
        Task(
            "b",
            {"trunk": trunk, "b_head": nn.Linear(8, 1)},
            [Operation("trunk", [("_input_", "x")]), Operation("b_head", ["trunk"])],
            task_type="binary",
        ),
        Task(
            "c",
            {"other": nn.Linear(5, 1)},
            [Operation("other", [("_input_", "z")])],
            task_type="regression",
        ),
    ]
    return MultitaskClassifier(tasks)


def test_the_program_holds_only_the_chosen_tasks_modules_and_fields(tmp_path: Path) -> None:
    model = _model()
    assert input_fields(model, ["a", "b"]) == ["x"]
    assert input_fields(model, ["c", "a"]) == ["z", "x"]
    path = model.export(tmp_path / "ab.pt2", ["a", "b"], example={"x": torch.randn(4, 2)})
    program = torch.export.load(path)
    names = set(program.state_dict)
    assert names == {
        "modules_by_name.trunk.0.weight",
        "modules_by_name.trunk.0.bias",
        "modules_by_name.a_head.weight",
        "modules_by_name.a_head.bias",
        "modules_by_name.b_head.weight",
        "modules_by_name.b_head.bias",
    }
    meta = json.loads(sidecar_path(path).read_text())
    assert [i["name"] for i in meta["inputs"]] == ["x"]
    assert meta["inputs"][0] == {
        "name": "x",
        "dtype": "float32",
        "shape": ["batch", 2],
        "vocabulary": None,
    }
    assert [(o["name"], o["shape"]) for o in meta["outputs"]] == [
        ("a", ["batch", 3]),
        ("b", ["batch"]),
    ]
    assert meta["tasks"][0]["classes"] == ["0", "1", "2"]
    assert meta["tasks"][1] == {
        "name": "b",
        "task_type": "binary",
        "output": "b",
        "classes": ["0", "1"],
        "threshold": 0.5,
    }
    # outputs after output_func, any batch size (the example had 4 rows)
    x = torch.randn(11, 2)
    a, b = program.module()(x)
    model.eval()
    eager = model.forward({"x": x}, ["a", "b"])
    assert torch.allclose(a, torch.softmax(eager["a_head"], 1), atol=TOL)
    assert torch.allclose(b, torch.sigmoid(eager["b_head"]).squeeze(-1), atol=TOL)


def test_a_one_row_example_still_gives_a_dynamic_batch(tmp_path: Path) -> None:
    model = _model()
    (tmp_path / "vocab.txt").write_text("a\nb\n")  # not a word vocabulary: named, not embedded
    path = model.export(
        tmp_path / "c.pt2",
        ["c"],
        example={"z": torch.randn(1, 5), "x": torch.randn(1, 2)},
        class_labels={"c": ["price"]},
        vocabularies={"z": tmp_path / "vocab.txt"},
    )
    meta = json.loads(sidecar_path(path).read_text())
    assert [i["name"] for i in meta["inputs"]] == ["z"]
    assert meta["inputs"][0]["vocabulary"] == {"file": "vocab.txt"}  # relative to the file
    assert meta["tasks"][0]["classes"] == ["price"]
    for n in (1, 3, 64):
        z = torch.randn(n, 5)
        errors = max_export_error(model, path, {"z": z})
        assert errors["c"] <= TOL


def test_bad_requests_are_named() -> None:
    model = _model()
    with pytest.raises(GraphError, match=r"unknown task 'aa' \(did you mean 'a'\?\)"):
        model.export("x.pt2", ["aa"], example={"x": torch.randn(2, 2)})
    with pytest.raises(GraphError, match=r"export needs an example batch .* 'x'"):
        model.export("x.pt2", ["a"])
    with pytest.raises(GraphError, match=r"the example batch has no field 'x'; it has 'z'"):
        model.export("x.pt2", ["a"], example={"z": torch.randn(2, 5)})
    with pytest.raises(GraphError, match="unknown export format 'tflite'"):
        model.export("x.pt2", ["a"], format="tflite", example={"x": torch.randn(2, 2)})
    with pytest.raises(GraphError, match="directory '.*nowhere' does not exist"):
        model.export("nowhere/x.pt2", ["a"], example={"x": torch.randn(2, 2)})


class DataDependent(nn.Module):
    """Branches on the values of its input: torch.export cannot trace that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:
            return x * 2
        return -x


def test_a_module_the_exporter_refuses_is_named_with_its_reason(tmp_path: Path) -> None:
    trunk = nn.Linear(2, 2)
    model = MultitaskClassifier(
        [
            Task(
                "t",
                {"trunk": trunk, "gate": DataDependent()},
                [Operation("trunk", [("_input_", "x")]), Operation("gate", ["trunk"])],
            )
        ]
    )
    with pytest.raises(GraphError) as info:
        model.export(tmp_path / "t.pt2", ["t"], example={"x": torch.randn(4, 2)})
    message = str(info.value)
    assert message.startswith("module 'gate' (DataDependent, used by tasks 't') cannot be exported")
    assert "data-dependent" in message.lower() or "guard" in message.lower()
    assert info.value.__cause__ is not None  # the exporter's own exception is kept
    assert not (tmp_path / "t.pt2").exists()
    assert not list(tmp_path.iterdir())


def test_onnx_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with pytest.raises(ImportError, match=r"pip install 'mtlgraph\[onnx\]'"):
        _model().export(tmp_path / "a.onnx", ["a"], "onnx", example={"x": torch.randn(2, 2)})
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"running an ONNX file needs .*mtlgraph\[onnx\]"):
        (tmp_path / "a.onnx.json").write_text(
            json.dumps({"exporter": "onnx", "inputs": [], "outputs": []})
        )
        run_exported(tmp_path / "a.onnx", {})


def _export_both(config: Path, out: Path) -> tuple[MultitaskClassifier, dict, list[Path]]:
    """Every task of a shipped config (untrained weights), traced once, saved in both formats."""
    cfg = load_config(config)
    model = build_model(cfg)
    model.eval()
    tasks = model.task_names
    fields = input_fields(model, tasks, config_fields(cfg))
    example = example_batch(cfg, fields, rows=8)
    graph = TaskGraph(model, tasks, fields)
    args = example_inputs(graph, example)
    program = export_program(graph, args)
    paths = [
        save_program(program, graph, args, out / f"{cfg.experiment}.pt2", "torch_export"),
        save_program(program, graph, args, out / f"{cfg.experiment}.onnx", "onnx"),
    ]
    # other rows and another batch size than the traced ones
    other = example_batch(cfg, fields, rows=29)
    return model, other, paths


def test_mtan_exports_to_both_formats_and_matches_eager(tmp_path: Path) -> None:
    """configs/mtan.yaml (conv maps, batch norms in eval mode, a shared module run by each task
    under its own operation name) and a dense MTAN on (B, D) vectors."""
    model, batch, paths = _export_both(ROOT / "configs" / "mtan.yaml", tmp_path)
    for path in paths:
        errors = max_export_error(model, path, batch)
        assert set(errors) == {"color_task", "pattern_task"}
        assert max(errors.values()) <= TOL, (path.name, errors)
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(5, 6), nn.ReLU())
    tasks = [
        Task(
            t,
            {"trunk": trunk, f"{t}_att": MTANAttention(6, 6), f"{t}_head": nn.Linear(6, 2)},
            [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_att", ["trunk", "trunk"]),
             Operation(f"{t}_head", [f"{t}_att"])],
        )
        for t in ("a", "b")
    ]  # fmt: skip
    dense = MultitaskClassifier(tasks)
    dense.train()
    dense({"x": torch.randn(64, 5)}, ["a", "b"])  # batch norm running statistics off their start
    path = dense.export(tmp_path / "dense.pt2", ["a", "b"], example={"x": torch.randn(4, 5)})
    errors = max_export_error(dense, path, {"x": torch.randn(9, 5)})
    assert set(errors) == {"a", "b"} and max(errors.values()) <= TOL


def test_a_dselect_k_gate_exports_with_a_dynamic_batch(tmp_path: Path) -> None:
    """The shipped MMoE config has softmax gates; DSelect-k's selectors reshape by batch size."""
    torch.manual_seed(0)
    experts = Experts(8, 4, [4])
    tasks = [
        Task(
            t,
            {"experts": experts, f"{t}_gate": Gate(8, 4, kind="dselect_k", k=2),
             f"{t}_head": nn.Linear(4, 2)},
            [Operation("experts", [("_input_", "x")]),
             Operation(f"{t}_gate", [("_input_", "x"), "experts"]),
             Operation(f"{t}_head", [f"{t}_gate"])],
        )
        for t in ("a", "b")
    ]  # fmt: skip
    model = MultitaskClassifier(tasks)
    path = model.export(tmp_path / "gate.pt2", ["a", "b"], example={"x": torch.randn(4, 8)})
    errors = max_export_error(model, path, {"x": torch.randn(9, 8)})
    assert set(errors) == {"a", "b"} and max(errors.values()) <= TOL


@pytest.mark.slow
def test_every_shipped_config_exports_and_matches_eager(tmp_path: Path) -> None:
    assert len(CONFIGS) >= 6
    inputs = {}
    for config in CONFIGS:
        if config.name == "quickstart.yaml":
            continue  # test_the_tutorial_config_exports_... below
        model, batch, paths = _export_both(config, tmp_path)
        for path in paths:
            errors = max_export_error(model, path, batch)
            assert set(errors) == set(model.task_names), path
            assert max(errors.values()) <= TOL, (path.name, errors)
        torch.save(batch, tmp_path / f"{paths[0].stem}.inputs.pt")
        model.eval()
        with torch.no_grad():
            graph = TaskGraph(model, model.task_names, list(batch))
            torch.save(list(graph(*batch.values())), tmp_path / f"{paths[0].stem}.eager.pt")
        inputs[paths[0].stem] = list(batch)
    # the .pt2 files load and run in a process that never imports mtlgraph
    script = f"""
import json, sys, torch
from pathlib import Path
root = Path({str(tmp_path)!r})
worst = 0.0
for stem, fields in json.loads({json.dumps(json.dumps(inputs))}).items():
    program = torch.export.load(root / f"{{stem}}.pt2").module()
    batch = torch.load(root / f"{{stem}}.inputs.pt")
    eager = torch.load(root / f"{{stem}}.eager.pt")
    out = program(*(batch[f] for f in fields))
    worst = max(worst, *(float((o - e).abs().max()) for o, e in zip(out, eager)))
assert not any(m.startswith("mtlgraph") for m in sys.modules), "mtlgraph was imported"
print(worst)
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        env={k: v for k, v in cli_env().items() if k != "PYTHONPATH"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) <= TOL


def test_the_tutorial_config_exports_to_onnx_and_matches_eager(tmp_path: Path) -> None:
    model, batch, paths = _export_both(ROOT / "configs" / "quickstart.yaml", tmp_path)
    assert max(max_export_error(model, paths[0], batch).values()) <= TOL  # the loaded .pt2
    onnx_path = paths[1]
    assert onnx_path.suffix == ".onnx" and sidecar_path(onnx_path).is_file()
    out = run_exported(onnx_path, batch)
    assert list(out) == ["circle_task", "square_task", "inv_circle_task"]
    assert all(o.shape == (len(batch["circle_data"]), 2) for o in out.values())
    assert max(max_export_error(model, onnx_path, batch).values()) <= TOL
    import onnx

    proto = onnx.load(onnx_path)
    assert [i.name for i in proto.graph.input] == ["circle_data", "square_data", "inv_circle_data"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
