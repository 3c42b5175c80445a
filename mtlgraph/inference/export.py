"""Export a subset of a model's tasks to ``torch.export`` (``.pt2``) or ONNX, with a sidecar
JSON describing inputs, outputs, tasks and classes (``docs/inference.md``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from mtlgraph._io import atomic_write, import_extra, write_json
from mtlgraph._suggest import quoted
from mtlgraph.exceptions import GraphError
from mtlgraph.graph.lora import merge_adapters
from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.graph.task import INPUT, unknown_tasks_error
from mtlgraph.inference.protocol import InferenceModel, eval_mode

ExportFormat = Literal["torch_export", "onnx"]
FORMATS: tuple[str, ...] = ("torch_export", "onnx")
SIDECAR_FORMAT = "mtlgraph.export"
BATCH = "batch"
"""Name of the dynamic batch dimension (dimension 0 of every input and output)."""


_ONNX_NEEDS = "onnx, onnxscript and onnxruntime"


def input_fields(
    model: InferenceModel, task_names: Sequence[str], available: Sequence[str] = ()
) -> list[str]:
    """The input fields the tasks' operations read, in task order, then operation order.

    An operation that reads the whole input dictionary (``"_input_"`` without a key) reads every
    field, so then every ``available`` field is returned.
    """
    unknown = [t for t in task_names if t not in model.tasks]
    if unknown:
        raise unknown_tasks_error(unknown, model.tasks)
    fields: list[str] = []
    for t in task_names:
        for op in model.tasks[t].op_sequence:
            for inp in op.inputs:
                if inp.source != INPUT:
                    continue
                if inp.key is None:
                    return list(available)
                if str(inp.key) not in fields:
                    fields.append(str(inp.key))
    return fields


class TaskGraph(nn.Module):
    """The chosen tasks of a model as one module: ``forward(*fields) -> tuple of task outputs``.

    It shares (not copies) the tasks' modules and runs the model's own execution plan.

    Args:
        model: The model.
        task_names: The tasks, in output order.
        fields: The input fields, in argument order (default: :func:`input_fields`).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import MultitaskClassifier, Operation, Task
        >>> trunk = nn.Linear(2, 4)
        >>> model = MultitaskClassifier([
        ...     Task(t, {"trunk": trunk, f"{t}_head": nn.Linear(4, 3)},
        ...          [Operation("trunk", [("_input_", "x")]), Operation(f"{t}_head", ["trunk"])])
        ...     for t in ("a", "b")])
        >>> graph = TaskGraph(model, ["b"])
        >>> graph.fields, sorted(graph.modules_by_name)
        (['x'], ['b_head', 'trunk'])
        >>> [p.shape for p in graph(torch.randn(5, 2))]
        [torch.Size([5, 3])]
    """

    _model: InferenceModel

    def __init__(
        self,
        model: InferenceModel,
        task_names: Sequence[str],
        fields: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if not task_names:
            raise GraphError(["export needs at least one task"])
        self.task_names: list[str] = list(task_names)
        self.plan: ExecutionPlan = model.plan(self.task_names)  # unknown tasks: a GraphError
        self.fields: list[str] = (
            list(fields) if fields is not None else input_fields(model, self.task_names)
        )
        # only the plan's modules are registered: the exported file holds no other weights
        self.modules_by_name = nn.ModuleDict(
            {m: model.module_pool[m] for m in self.plan.module_names}
        )
        self._output_funcs = [model.tasks[t].output_func for t in self.task_names]
        object.__setattr__(self, "_model", model)  # not a submodule: its other tasks stay out

    @property
    def model(self) -> InferenceModel:
        """The model whose tasks this graph runs (held, not registered as a submodule)."""
        return self._model

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        X = dict(zip(self.fields, inputs, strict=True))
        cache = self.model.execute(self.plan, X)
        outputs = []
        for task_name, output_func in zip(self.task_names, self._output_funcs, strict=True):
            out = output_func(cache[self.plan.outputs[task_name]])
            if not isinstance(out, torch.Tensor):
                raise GraphError(
                    [
                        f"the output_func of task '{task_name}' returns a {type(out).__name__}; "
                        "an exported task must return one tensor"
                    ]
                )
            outputs.append(out)
        return tuple(outputs)


def example_inputs(graph: TaskGraph, example: Mapping[str, Any] | None) -> tuple[torch.Tensor, ...]:
    """The example batch as positional tensors, at least 2 rows (a batch of 1 would be
    specialised by the exporter instead of kept dynamic).

    Raises:
        GraphError: No example, a missing field, or a field that is not a tensor.
    """
    if example is None:
        raise GraphError(
            [
                "export needs an example batch to trace: pass example={field: tensor} with "
                f"the fields {quoted(graph.fields)} (e.g. the X_dict of one batch)"
            ]
        )
    problems = []
    for f in graph.fields:
        if f not in example:
            problems.append(f"the example batch has no field '{f}'; it has {quoted(example)}")
        elif not isinstance(example[f], torch.Tensor) or example[f].ndim == 0:
            problems.append(
                f"field '{f}' of the example batch is a {type(example[f]).__name__}; only "
                "tensors with a batch dimension can be exported"
            )
    if problems:
        raise GraphError(problems, header="cannot export:" if len(problems) > 1 else None)
    args = [example[f].detach().cpu() for f in graph.fields]
    n = min(int(a.shape[0]) for a in args)
    return tuple(a[: max(n, 2)] if n >= 2 else a[:1].repeat(2, *[1] * (a.ndim - 1)) for a in args)


def _first_lines(error: BaseException, n: int = 4) -> str:
    lines = [ln for ln in str(error).strip().splitlines() if ln.strip()]
    text = " ".join(ln.strip() for ln in lines[:n])
    return f"{type(error).__name__}: {text}"


def _culprit(graph: TaskGraph, args: tuple[torch.Tensor, ...], error: Exception) -> GraphError:
    """Find the module the exporter refused: export each module alone on its recorded inputs."""
    calls: list[tuple[str, nn.Module, tuple[Any, ...]]] = []
    handles = [
        module.register_forward_pre_hook(lambda m, a, name=name: calls.append((name, m, a)))
        for name, module in graph.modules_by_name.items()
    ]
    try:
        with torch.no_grad():
            graph(*args)
    finally:
        for h in handles:
            h.remove()
    batch = torch.export.Dim(BATCH)
    for name, module, call_args in calls:
        shapes = [
            {0: batch} if isinstance(a, torch.Tensor) and a.ndim > 0 else None for a in call_args
        ]
        try:
            torch.export.export(module, call_args, dynamic_shapes=tuple(shapes))
        except Exception as e:
            users = [t for t in graph.task_names if name in graph.plan.task_modules[t]]
            return GraphError(
                [
                    f"module '{name}' ({type(module).__name__}, used by tasks {quoted(users)}) "
                    f"cannot be exported: {_first_lines(e)}. Export other tasks, or rewrite its "
                    "forward without data-dependent control flow (torch.cond)"
                ]
            )
    return GraphError(
        [
            f"tasks {quoted(graph.task_names)} cannot be exported (each module exports alone, "
            f"so an output_func or the glue between modules is refused): {_first_lines(error)}"
        ]
    )


def export_program(graph: TaskGraph, args: tuple[torch.Tensor, ...]) -> Any:
    """``torch.export.export`` of the graph with a dynamic batch dimension (eval mode).

    Raises:
        GraphError: The exporter refused; the message names the module and the reason.
    """
    batch = torch.export.Dim(BATCH)
    shapes = tuple({0: batch} for _ in args)
    with eval_mode(graph.model):
        try:
            # forward(*inputs): the varargs are one tuple in the dynamic_shapes structure
            return torch.export.export(graph, args, dynamic_shapes=(shapes,))
        except GraphError:
            raise
        except Exception as e:
            raise _culprit(graph, args, e) from e


def _tensor_spec(name: str, t: torch.Tensor) -> dict[str, Any]:
    return {
        "name": name,
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": [BATCH, *(int(s) for s in t.shape[1:])],
    }


def sidecar(
    graph: TaskGraph,
    args: tuple[torch.Tensor, ...],
    program: str,
    fmt: str,
    class_labels: Mapping[str, Sequence[str]] | None = None,
    vocabularies: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The sidecar JSON's content: inputs, outputs, tasks, class labels, vocabularies."""
    with eval_mode(graph.model), torch.no_grad():  # shapes only: no batch-norm statistics move
        outs = graph(*args)
    inputs = [
        {**_tensor_spec(f, a), "vocabulary": (vocabularies or {}).get(f)}
        for f, a in zip(graph.fields, args, strict=True)
    ]
    tasks = []
    model = graph.model
    for t, out in zip(graph.task_names, outs, strict=True):
        task = model.tasks[t]
        width = int(out.shape[1]) if out.ndim > 1 else 1
        labels = list((class_labels or {}).get(t, []))
        if not labels and task.task_type == "multiclass":
            labels = [str(i) for i in range(width)]
        elif not labels and task.task_type == "binary":
            labels = ["0", "1"]
        tasks.append(
            {
                "name": t,
                "task_type": task.task_type,
                "output": t,
                "classes": labels or None,
                "threshold": task.threshold if task.task_type in ("binary", "multilabel") else None,
            }
        )
    return {
        "format": SIDECAR_FORMAT,
        "version": 1,
        "program": program,
        "exporter": fmt,
        "torch": torch.__version__,
        "inputs": inputs,
        "outputs": [_tensor_spec(t, o) for t, o in zip(graph.task_names, outs, strict=True)],
        "tasks": tasks,
    }


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the sidecar of an exported file goes: ``<file>.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def require_onnx() -> None:
    """Raise the ``onnx`` extra's ImportError unless onnx and onnxscript import."""
    import_extra("exporting to ONNX", "onnx", "onnx", "onnxscript", needs=_ONNX_NEEDS)


def _save_onnx(program: Any, graph: TaskGraph, target: Path) -> None:
    require_onnx()
    try:
        onnx_program = torch.onnx.export(
            program,
            (),
            dynamo=True,
            input_names=graph.fields,
            output_names=graph.task_names,
            verbose=False,
        )
    except Exception as e:
        raise GraphError(
            [
                f"tasks {quoted(graph.task_names)} export to torch.export but not to ONNX: "
                f"{_first_lines(e)}"
            ]
        ) from e
    assert onnx_program is not None
    proto = onnx_program.model_proto
    _name_batch_dims(proto)
    data = proto.SerializeToString()
    atomic_write(target, lambda fh: fh.write(data))


def _name_batch_dims(proto: Any) -> None:
    """Call the symbolic batch dimension ``batch`` everywhere (the exporter names it ``s0``)."""
    graph = proto.graph
    symbols = {
        vi.type.tensor_type.shape.dim[0].dim_param
        for vi in [*graph.input, *graph.output]
        if vi.type.tensor_type.shape.dim and vi.type.tensor_type.shape.dim[0].dim_param
    }
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in symbols:
                dim.dim_param = BATCH


def export(
    model: InferenceModel,
    path: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
    format: str = "torch_export",
    example: Mapping[str, Any] | None = None,
    class_labels: Mapping[str, Sequence[str]] | None = None,
    vocabularies: Mapping[str, str] | None = None,
) -> Path:
    """See :meth:`MultitaskClassifier.export`."""
    if format not in FORMATS:
        raise GraphError([f"unknown export format {format!r}; choose one of {quoted(FORMATS)}"])
    if format == "onnx":
        require_onnx()  # before the tracing, which takes a while
    target = Path(path)
    if not target.parent.is_dir():
        raise GraphError([f"cannot write '{target}': directory '{target.parent}' does not exist"])
    task_names = list(tasks) if tasks is not None else model.task_names
    available = [k for k, v in (example or {}).items() if isinstance(v, torch.Tensor)]
    graph = TaskGraph(model, task_names, input_fields(model, task_names, available))
    merge_adapters(graph)  # LoRA adapters: plain weights in the file (mtlgraph.graph.lora)
    args = example_inputs(graph, example)
    program = export_program(graph, args)
    fmt = cast(ExportFormat, format)  # checked above
    save_program(program, graph, args, target, fmt, class_labels, vocabularies)
    return target


def save_program(
    program: Any,
    graph: TaskGraph,
    args: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    format: ExportFormat = "torch_export",
    class_labels: Mapping[str, Sequence[str]] | None = None,
    vocabularies: Mapping[str, str] | None = None,
) -> Path:
    """Write an :func:`export_program` result as ``format`` to ``path``, and its sidecar
    (both atomically). One traced program can be saved in both formats."""
    target = Path(path)
    if format == "onnx":
        _save_onnx(program, graph, target)
    else:
        atomic_write(target, lambda fh: torch.export.save(program, fh))
    meta = sidecar(graph, args, target.name, format, class_labels, vocabularies)
    write_json(sidecar_path(target), meta)
    return target


# ---------------------------------------------------------------- loading and checking


def load_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of an exported file (``<file>.json``)."""
    meta: dict[str, Any] = json.loads(sidecar_path(path).read_text())
    return meta


def run_exported(
    path: str | os.PathLike[str], inputs: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Run an exported file on named inputs with its own runtime (the loaded ``.pt2`` program,
    or onnxruntime for ``.onnx``); returns task -> output.

    Example:
        See ``docs/inference.md``.
    """
    meta = load_sidecar(path)
    names = [i["name"] for i in meta["inputs"]]
    tasks = [o["name"] for o in meta["outputs"]]
    if meta["exporter"] == "onnx":
        (onnxruntime,) = import_extra(
            "running an ONNX file", "onnx", "onnxruntime", needs=_ONNX_NEEDS
        )
        session = onnxruntime.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
        outs = session.run(tasks, {n: inputs[n].detach().cpu().numpy() for n in names})
        return {t: torch.from_numpy(o) for t, o in zip(tasks, outs, strict=True)}
    program = torch.export.load(os.fspath(path)).module()
    with torch.no_grad():
        result = program(*(inputs[n] for n in names))
    return dict(zip(tasks, result, strict=True))


def max_export_error(
    model: InferenceModel,
    path: str | os.PathLike[str],
    inputs: Mapping[str, torch.Tensor],
) -> dict[str, float]:
    """Max absolute difference between the exported file's outputs and eager ones, per task."""
    exported = run_exported(path, inputs)
    graph = TaskGraph(model, list(exported), [i["name"] for i in load_sidecar(path)["inputs"]])
    with eval_mode(model), torch.no_grad():
        eager = graph(*(inputs[f] for f in graph.fields))
    return {
        t: float((exported[t].float() - e.float()).abs().max()) if e.numel() else 0.0
        for t, e in zip(graph.task_names, eager, strict=True)
    }
