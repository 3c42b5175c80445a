"""Export a subset of a model's tasks to ``torch.export`` (``.pt2``) or ONNX. The metadata a
server needs (inputs, outputs, tasks, classes, thresholds, preprocessing, vocabularies) is inside
the one file written (ONNX ``metadata_props``, a ``.pt2`` extra file), and copied to a sidecar
JSON for convenience (``docs/inference.md``).
"""

from __future__ import annotations

import errno
import io
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from mtlgraph._io import atomic_write, import_extra, json_value, write_json
from mtlgraph._suggest import quoted
from mtlgraph.data.datasets import MASK_SUFFIX
from mtlgraph.exceptions import DataError, GraphError
from mtlgraph.graph.lora import merge_adapters
from mtlgraph.graph.plan import ExecutionPlan
from mtlgraph.graph.task import INPUT, unknown_tasks_error
from mtlgraph.inference.protocol import InferenceModel, eval_mode

ExportFormat = Literal["torch_export", "onnx"]
FORMATS: tuple[str, ...] = ("torch_export", "onnx")
SIDECAR_FORMAT = "mtlgraph.export"
METADATA_VERSION = 2
METADATA_KEY = "mtlgraph"
"""Where the metadata is in the file: the ONNX ``metadata_props`` key, and the ``.pt2`` extra
file ``mtlgraph.json``."""
BATCH = "batch"
"""Name of the dynamic batch dimension (dimension 0 of every input and output)."""
LENGTH = "{field}_length"
"""Name of a sequence field's dynamic length (dimension 1), e.g. ``text_length``."""


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


def example_inputs(
    graph: TaskGraph,
    example: Mapping[str, Any] | None,
    sequences: Sequence[str] = (),
) -> tuple[torch.Tensor, ...]:
    """The example batch as positional tensors, at least 2 rows (a batch of 1 would be
    specialised by the exporter instead of kept dynamic). A field of ``sequences`` (and its
    ``<field>_mask``) is padded with zeros, as batches are, to a length of at least 2 that
    differs from the batch size, so that the exporter keeps its length dynamic too.

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
    problems += [
        f"sequence field '{f}' of the example batch must be (batch, length), got shape "
        f"{tuple(example[f].shape)}"
        for f in sequences
        if f in graph.fields and isinstance(example.get(f), torch.Tensor) and example[f].ndim < 2
    ]
    if problems:
        raise GraphError(problems, header="cannot export:" if len(problems) > 1 else None)
    args = [example[f].detach().cpu() for f in graph.fields]
    n = min(int(a.shape[0]) for a in args)
    rows = [a[: max(n, 2)] if n >= 2 else a[:1].repeat(2, *[1] * (a.ndim - 1)) for a in args]
    owners = _sequence_owners(graph.fields, sequences)
    lengths = [int(a.shape[1]) for a, f in zip(rows, graph.fields, strict=True) if f in owners]
    if not lengths:
        return tuple(rows)
    length = max(2, *lengths)
    length += length == len(rows[0])  # equal sizes would be taken for one symbol
    return tuple(
        _pad(a, length) if f in owners else a for a, f in zip(rows, graph.fields, strict=True)
    )


def _sequence_owners(fields: Sequence[str], sequences: Sequence[str]) -> dict[str, str]:
    """``{field: sequence field}`` of the graph's fields with a dynamic length: each sequence
    field, and its ``<field>_mask`` when the graph reads it."""
    out = {f: f for f in sequences if f in fields}
    out.update({f + MASK_SUFFIX: f for f in sequences if f + MASK_SUFFIX in fields})
    return out


def _pad(a: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dimension 1 with zeros (the padding id, a false mask) to ``length``."""
    pad = length - int(a.shape[1])
    if pad <= 0:
        return a
    return torch.cat([a, a.new_zeros((a.shape[0], pad, *a.shape[2:]))], dim=1)


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


def export_program(
    graph: TaskGraph,
    args: tuple[torch.Tensor, ...],
    sequences: Sequence[str] | Mapping[str, int | None] = (),
) -> Any:
    """``torch.export.export`` of the graph with a dynamic batch dimension and, for each field
    of ``sequences`` (and its mask), a dynamic length (dimension 1), in eval mode. A mapping
    gives each field's maximum length (its tokenizer's ``max_length``; ``None``: unbounded),
    which models with a fixed number of positions need.

    Raises:
        GraphError: The exporter refused; the message names the module and the reason.
    """
    batch = torch.export.Dim(BATCH)
    owners = _sequence_owners(graph.fields, list(sequences))
    limits = sequences if isinstance(sequences, Mapping) else {}
    lengths = {
        f: torch.export.Dim(LENGTH.format(field=f), max=limits[f])
        if limits.get(f)
        else torch.export.Dim(LENGTH.format(field=f))
        for f in set(owners.values())
    }
    shapes = tuple(
        {0: batch, 1: lengths[owners[f]]} if f in owners else {0: batch} for f in graph.fields
    )
    with eval_mode(graph.model):
        try:
            # forward(*inputs): the varargs are one tuple in the dynamic_shapes structure
            return torch.export.export(graph, args, dynamic_shapes=(shapes,))
        except GraphError:
            raise
        except Exception as e:
            raise _culprit(graph, args, e) from e


def _tensor_spec(name: str, t: torch.Tensor, length: str | None = None) -> dict[str, Any]:
    dims: list[Any] = [int(s) for s in t.shape[1:]]
    if length is not None:
        dims[0] = length
    return {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": [BATCH, *dims]}


def vocabulary_entry(file: str | os.PathLike[str], where: Path) -> dict[str, Any]:
    """A vocabulary in the metadata: its file, relative to the folder ``where`` of the
    metadata, and, for a tokenizer mtlgraph saved (a word vocabulary or a subword tokenizer,
    :func:`~mtlgraph.data.sources.tokenizer.load_tokenizer`), its content and fingerprint: the
    metadata is then all a server needs. A subword tokenizer's ``tokenizer`` is the
    ``tokenizers`` JSON: ``Tokenizer.from_str(json.dumps(entry["tokenizer"]))`` with
    ``enable_truncation(entry["max_length"])`` gives the ids training saw. Another kind of
    file (one mtlgraph cannot read as a tokenizer) is named, not embedded."""
    from mtlgraph.data.sources.tokenizer import load_tokenizer

    path = Path(file)
    if not path.is_file():
        raise GraphError(
            [f"vocabulary file '{path}' does not exist; name the file the ids come from"]
        )
    try:
        rel = os.path.relpath(path.resolve(), where.resolve())
    except ValueError:  # another drive (Windows): no relative path
        rel = str(path.resolve())
    entry: dict[str, Any] = {"file": rel}
    try:
        tok = load_tokenizer(path)
    except DataError:  # not a tokenizer mtlgraph saved: named, not embedded
        return entry
    return {**entry, **tok.to_dict(), "fingerprint": tok.fingerprint}


def sidecar(
    graph: TaskGraph,
    args: tuple[torch.Tensor, ...],
    program: str,
    fmt: str,
    class_labels: Mapping[str, Sequence[str]] | None = None,
    vocabularies: Mapping[str, str | os.PathLike[str]] | None = None,
    preprocessing: Mapping[str, Mapping[str, Any]] | None = None,
    sequences: Mapping[str, int | None] | None = None,
    where: Path = Path(),
) -> dict[str, Any]:
    """The metadata: inputs (dtype, shape, vocabulary, maximum length, preprocessing),
    outputs, tasks (type, classes, threshold). Vocabulary files are named relative to
    ``where``, the folder of the exported file."""
    with eval_mode(graph.model), torch.no_grad():  # shapes only: no batch-norm statistics move
        outs = graph(*args)
    owners = _sequence_owners(graph.fields, list(sequences or {}))
    inputs = []
    for f, a in zip(graph.fields, args, strict=True):
        length = LENGTH.format(field=owners[f]) if f in owners else None
        entry = _tensor_spec(f, a, length)
        file = (vocabularies or {}).get(f)
        entry["vocabulary"] = vocabulary_entry(file, where) if file is not None else None
        if f in (sequences or {}):
            entry["max_length"] = (sequences or {})[f]
        entry.update((preprocessing or {}).get(f, {}))
        inputs.append(entry)
    return {
        "format": SIDECAR_FORMAT,
        "version": METADATA_VERSION,
        "program": program,
        "exporter": fmt,
        "torch": torch.__version__,
        "inputs": inputs,
        "outputs": [_tensor_spec(t, o) for t, o in zip(graph.task_names, outs, strict=True)],
        "tasks": _task_entries(graph, outs, class_labels),
    }


def _task_entries(
    graph: TaskGraph,
    outs: Sequence[torch.Tensor],
    class_labels: Mapping[str, Sequence[str]] | None,
) -> list[dict[str, Any]]:
    tasks = []
    for t, out in zip(graph.task_names, outs, strict=True):
        task = graph.model.tasks[t]
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
    return tasks


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """Where the sidecar of an exported file goes: ``<file>.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def require_onnx() -> None:
    """Raise the ``onnx`` extra's ImportError unless onnx and onnxscript import."""
    import_extra("exporting to ONNX", "onnx", "onnx", "onnxscript", needs=_ONNX_NEEDS)


def _onnx_bytes(program: Any, graph: TaskGraph, metadata: str) -> bytes:
    """The ONNX file's bytes, the metadata under ``metadata_props['mtlgraph']``."""
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
    _name_dynamic_dims(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, metadata
    data: bytes = proto.SerializeToString()
    return data


def _pt2_bytes(program: Any, metadata: str) -> bytes:
    """The ``.pt2`` file's bytes (written in memory: torch's C++ writer cannot report a
    failed write of a Python file), the metadata as the extra file ``mtlgraph.json``."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer, extra_files={f"{METADATA_KEY}.json": metadata})
    return buffer.getvalue()


def _name_dynamic_dims(proto: Any) -> None:
    """Call the symbolic batch dimension ``batch`` and a sequence length ``<field>_length``
    everywhere (the exporter names them ``s0``, ``s1``, ...)."""
    graph = proto.graph
    names: dict[str, str] = {}
    for vi in graph.input:
        dims = vi.type.tensor_type.shape.dim
        for j, dim in enumerate(dims):
            if dim.dim_param and dim.dim_param not in names:
                names[dim.dim_param] = BATCH if j == 0 else LENGTH.format(field=vi.name)
    for vi in graph.output:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].dim_param and dims[0].dim_param not in names:
            names[dims[0].dim_param] = BATCH
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        for dim in vi.type.tensor_type.shape.dim:
            if dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]


def export(
    model: InferenceModel,
    path: str | os.PathLike[str],
    tasks: Sequence[str] | None = None,
    format: str = "torch_export",
    example: Mapping[str, Any] | None = None,
    class_labels: Mapping[str, Sequence[str]] | None = None,
    vocabularies: Mapping[str, str | os.PathLike[str]] | None = None,
    preprocessing: Mapping[str, Mapping[str, Any]] | None = None,
    sequences: Mapping[str, int | None] | None = None,
) -> Path:
    """See :meth:`MultitaskClassifier.export`; ``sequences={field: max_length or None}``
    gives those fields (and their masks) a dynamic length, ``preprocessing={field: {...}}``
    adds to their metadata entry (``mtlgraph export`` puts an image field's decoding there)."""
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
    args = example_inputs(graph, example, list(sequences or {}))
    program = export_program(graph, args, dict(sequences or {}))
    fmt = cast(ExportFormat, format)  # checked above
    save_program(
        program, graph, args, target, fmt, class_labels, vocabularies, preprocessing, sequences
    )
    return target


def save_program(
    program: Any,
    graph: TaskGraph,
    args: tuple[torch.Tensor, ...],
    path: str | os.PathLike[str],
    format: ExportFormat = "torch_export",
    class_labels: Mapping[str, Sequence[str]] | None = None,
    vocabularies: Mapping[str, str | os.PathLike[str]] | None = None,
    preprocessing: Mapping[str, Mapping[str, Any]] | None = None,
    sequences: Mapping[str, int | None] | None = None,
) -> Path:
    """Write an :func:`export_program` result as ``format`` to ``path`` with its metadata
    inside, in one atomic write; then the sidecar ``<path>.json``, a convenience copy (an older
    sidecar is removed first, so no fault leaves one that describes another program). One
    traced program can be saved in both formats.

    Raises:
        OSError: A write that failed (a full disk...), naming the file; an older file at
            ``path`` is then unchanged.
    """
    target = Path(path)
    meta = sidecar(
        graph, args, target.name, format, class_labels, vocabularies, preprocessing,
        sequences, target.parent,
    )  # fmt: skip
    text = json.dumps(json_value(meta), indent=2)
    data = _onnx_bytes(program, graph, text) if format == "onnx" else _pt2_bytes(program, text)
    side = sidecar_path(target)
    _writing(side, lambda: side.unlink(missing_ok=True), "an older sidecar is in the way")
    _writing(target, lambda: atomic_write(target, lambda fh: fh.write(data)))
    _writing(side, lambda: write_json(side, meta), f"'{target}' is complete, metadata inside")
    return target


def _writing(path: Path, write: Any, context: str = "an older file there is unchanged") -> None:
    """Run ``write``; an OSError (a full disk, permissions) becomes one naming ``path``."""
    try:
        write()
    except OSError as e:
        reason = e.strerror or os.strerror(e.errno or errno.EIO)
        raise OSError(e.errno, f"cannot write '{path}': {reason} ({context})") from e


# ---------------------------------------------------------------- loading and checking


def load_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata inside an exported file (for a file exported without it, its sidecar).

    Raises:
        GraphError: Neither holds it, naming the file.
    """
    p = Path(path)
    text = None
    if zipfile.is_zipfile(p):  # a .pt2 archive: read the one entry, not the program
        with zipfile.ZipFile(p) as z:
            names = [n for n in z.namelist() if n.endswith(f"/extra/{METADATA_KEY}.json")]
            text = z.read(names[0]).decode() if names else None
    elif p.is_file():
        (onnx,) = import_extra("reading an ONNX file", "onnx", "onnx", needs=_ONNX_NEEDS)
        try:
            props = {e.key: e.value for e in onnx.load(os.fspath(p)).metadata_props}
        except Exception:  # not an ONNX file: the sidecar or the error below
            props = {}
        text = props.get(METADATA_KEY)
    if text is None and sidecar_path(p).is_file():
        text = sidecar_path(p).read_text()
    if text is None:
        raise GraphError(
            [f"'{p}' holds no mtlgraph metadata and has no sidecar '{sidecar_path(p)}'"]
        )
    meta: dict[str, Any] = json.loads(text)
    return meta


def run_exported(
    path: str | os.PathLike[str], inputs: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Run an exported file on named inputs with its own runtime (the loaded ``.pt2`` program,
    or onnxruntime for ``.onnx``), reading the input order from its metadata; returns
    task -> output.

    Example:
        See ``docs/inference.md``.
    """
    meta = load_metadata(path)
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
    graph = TaskGraph(model, list(exported), [i["name"] for i in load_metadata(path)["inputs"]])
    with eval_mode(model), torch.no_grad():
        eager = graph(*(inputs[f] for f in graph.fields))
    return {
        t: float((exported[t].float() - e.float()).abs().max()) if e.numel() else 0.0
        for t, e in zip(graph.task_names, eager, strict=True)
    }
