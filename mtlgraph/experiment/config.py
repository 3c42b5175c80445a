"""YAML experiment configs: parsed with ``yaml.safe_load`` rules into validated dataclasses.

Every field is documented in ``docs/config.md``. Validation reports every problem at once, each
naming the file, line and dotted key. Only :mod:`mtlgraph.experiment.build` turns a validated
config into objects; value rules that belong to an object are its constructor's, asked here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from torch import nn

from mtlgraph._io import map_structure
from mtlgraph._schema import Problems, build, plain_config
from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.data.synthetic import GENERATORS
from mtlgraph.exceptions import ConfigError, TaskDefinitionError
from mtlgraph.experiment.data_config import DataConfig, DatasetConfig, old_spelling_problems
from mtlgraph.experiment.imports import absolute, import_dirs, import_user_modules, run_import_paths
from mtlgraph.experiment.module_types import absolute_paths, check_module_spec, module_order
from mtlgraph.experiment.yaml_lines import apply_overrides, locate, parse_yaml
from mtlgraph.graph.losses import LOSSES
from mtlgraph.graph.task import INPUT, Operation, Task, TaskType, op_problems
from mtlgraph.metrics import metric_spec_problems
from mtlgraph.registry import argument_problems
from mtlgraph.training.trainer import TrainerConfig

# ---------------------------------------------------------------- the schema


@dataclass
class InputConfig:
    """An operation input written as a mapping (needed for stop-gradient edges)."""

    source: str  # an earlier operation's name, or "_input_" for the batch's X_dict
    key: str | int | None = None  # key or index into the source's output; null = all of it
    detach: bool = False  # stop-gradient edge: no gradient flows back into `source`


@dataclass
class OpConfig:
    """One operation of a task: run ``module`` on ``inputs``."""

    module: str  # name of a module in the `modules` section (and the task's module pool)
    inputs: list[str | list[str | int] | InputConfig]  # op name | [source, key] | {source, ...}
    name: str | None = None  # name of this op's output; null = the module name

    def validate(self) -> list[str]:
        return [
            f"inputs[{i}]: write [source, key], a list of two items; got {len(spec)} items"
            for i, spec in enumerate(self.inputs)
            if isinstance(spec, list) and len(spec) != 2
        ]


@dataclass
class TaskConfig:
    """A task: a path through the declared modules, its type, loss, metrics and weight."""

    ops: list[OpConfig]  # operation sequence; the last op's output is the task output
    modules: list[str] | None = None  # module pool; null = the modules its ops use
    task_type: TaskType = "multiclass"  # multiclass | binary | multilabel | regression
    loss: str | dict[str, Any] | None = None  # loss name or {name, **kwargs}; null = by task type
    metrics: list[str | dict[str, Any]] | None = None  # names or {name, **kwargs}
    weight: float = 1.0  # static loss weight (>= 0)
    ignore_value: int | float | Literal["default"] | None = "default"  # masked label value
    threshold: float = 0.5  # probability threshold of binary/multilabel predictions

    def validate(self) -> list[str]:
        """``Task``'s own value rules (``weight``, ``threshold``), asked of its constructor
        with a one-operation stand-in graph, so that they live in one place."""
        problems = ["ops: empty; a task needs at least one operation"] if not self.ops else []
        kwargs = {k: getattr(self, k) for k in ("task_type", "weight", "ignore_value", "threshold")}
        try:
            Task("t", {"m": nn.Identity()}, [Operation("m", [INPUT])], **kwargs)
        except TaskDefinitionError as e:  # "task 't': weight must be ..." -> "weight: must be ..."
            problems += [p.removeprefix("task 't': ").replace(" ", ": ", 1) for p in e.problems]
        return problems


@dataclass
class ExperimentConfig:
    """A whole experiment, as declared by a YAML file (see ``docs/config.md``).

    Example:
        >>> from mtlgraph.experiment.config import parse_config
        >>> cfg = parse_config({
        ...     "modules": {"head": {"type": "linear", "in_features": 2, "out_features": 2}},
        ...     "tasks": {"t": {"ops": [{"module": "head", "inputs": [["_input_", "x"]]}]}},
        ...     "data": {"datasets": {"d": {
        ...         "source": {"type": "generator", "name": "circle", "args": {"n": 100}},
        ...         "fields": {"x": "x"}, "labels": {"t": "y"}}}},
        ...     "trainer": {"n_epochs": 1, "lr": 0.05},
        ... })
        >>> cfg.trainer.lr, cfg.tasks["t"].ops[0].module
        (0.05, 'head')
    """

    modules: dict[str, dict[str, Any]]  # module name -> {type: <registry name>, **kwargs}
    tasks: dict[str, TaskConfig]  # task name -> task
    data: DataConfig  # datasets
    experiment: str = "experiment"  # run directories go to <runs_root>/<experiment>/<timestamp>
    runs_root: str = "runs"  # root of run directories (relative to the working directory)
    seed: int = 0  # seeds module initialisation (the trainer has its own seed)
    device: str = "cpu"  # "cpu", "cuda", "cuda:1"
    imports: list[str] = field(default_factory=list)  # Python modules imported first (user code)
    # More directories searched for imports (relative to the config file's directory)
    import_paths: list[str] = field(default_factory=list)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # Trainer keyword arguments
    # Directory that relative data paths are read from (the config file's); not a YAML key.
    base_dir: str = field(default=".", init=False, repr=False, compare=False)

    def validate(self) -> list[str]:
        problems: list[str] = []
        if not self.experiment or self.experiment in (".", ".."):
            problems.append(f"experiment: must be a non-empty name, got {self.experiment!r}")
        problems += _check_modules(self.modules)
        problems += _check_tasks(self.tasks, self.modules)
        problems += _check_data(self.data, self.tasks)
        return problems


# ---------------------------------------------------------------- cross-checks


def _check_modules(modules: Mapping[str, Mapping[str, Any]]) -> list[str]:
    problems = []
    for name, spec in modules.items():
        path = f"modules.{name}"
        if "/" in name or "." in name or not name:
            problems.append(f"{path}: a module name must be non-empty, without '/' or '.'")
        problems += check_module_spec(spec, path, modules)  # type, arguments, references...
    try:
        module_order(modules)
    except ConfigError as e:
        problems += e.problems
    return problems


def _check_tasks(
    tasks: Mapping[str, TaskConfig], modules: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    problems = []
    declared = f"the config declares {quoted(modules) or 'no modules'}"
    for name, task in tasks.items():
        path = f"tasks.{name}"
        if "/" in name or not name:
            problems.append(f"{path}: a task name must be non-empty, without '/'")
        for i, m in enumerate(task.modules or []):
            if m not in modules:
                problems.append(
                    f"{path}.modules[{i}]: unknown module '{m}'{did_you_mean(m, modules)}; "
                    f"{declared}"
                )
        problems += _check_ops(name, task, modules, declared)
        problems += _check_loss_and_metrics(path, task)
    return problems


def _check_ops(
    name: str, task: TaskConfig, modules: Mapping[str, Mapping[str, Any]], declared: str
) -> list[str]:
    """Each op's module is declared and in the pool; inputs name earlier ops; names unique."""
    pool, note = list(modules), declared
    if task.modules is not None:
        pool = task.modules
        note = f"the task's pool is {quoted(pool)}; add it to tasks.{name}.modules"
    steps = [(op.name or op.module, op.module, [_source(s) for s in op.inputs]) for op in task.ops]
    return [
        f"tasks.{name}.ops[{i}]{part}: {message}"
        for i, part, message in op_problems(steps, pool, note)
    ]


def _check_loss_and_metrics(path: str, task: TaskConfig) -> list[str]:
    """The task's loss and metrics name registered ones."""
    problems = []
    if task.loss is not None:
        problems += LOSSES.problems(task.loss, f"{path}.loss")
    for i, metric_spec in enumerate(task.metrics or []):
        problems += metric_spec_problems(metric_spec, f"{path}.metrics[{i}]")
    return problems


def _source(spec: str | list[str | int] | InputConfig) -> object:
    """The operation or ``_input_`` an input spec reads from."""
    if isinstance(spec, InputConfig):
        return spec.source
    if isinstance(spec, list):
        return spec[0] if spec else None
    return spec


def _check_data(data: DataConfig, tasks: Mapping[str, TaskConfig]) -> list[str]:
    problems = []
    for name, ds in data.datasets.items():
        path = f"data.datasets.{name}"
        if "/" in name or not name:
            problems.append(f"{path}: a dataset name must be non-empty, without '/'")
        for label in ds.labels:
            if label not in tasks:
                problems.append(
                    f"{path}.labels.{label}: labels name tasks, and there is no task '{label}'"
                    f"{did_you_mean(label, tasks)}; tasks: {quoted(tasks)}"
                )
        src = ds.source
        if src.type == "generator" and src.name is not None:
            if src.name not in GENERATORS:
                problems.append(f"{path}.source.name: {GENERATORS.unknown(src.name)}")
            else:
                gen = GENERATORS.get(src.name)
                what = f"generator '{src.name}'"
                problems += argument_problems(gen, src.args, what, f"{path}.source.args")
    return problems


# ---------------------------------------------------------------- loading


def parse_config(
    data: Mapping[str, Any],
    source: str = "<config>",
    lines: Mapping[str, int] | None = None,
    overrides: Sequence[str] = (),
    base_dir: str | Path = ".",
    problems: list[str] | None = None,
) -> ExperimentConfig:
    """Validate a config mapping (as YAML would give it) into an :class:`ExperimentConfig`.

    Args:
        data: The mapping.
        source: Name used in messages (the file name).
        lines: ``{dotted path: line}`` for messages (from :func:`parse_yaml`).
        overrides: ``a.b.c=value`` strings applied first.
        base_dir: Directory relative data paths are read from.
        problems: Problems found earlier (duplicate keys), already located; reported with these.

    Raises:
        ConfigError: Every problem, each naming the source, line and dotted key.
    """
    early = list(problems or [])
    problems = Problems()
    raw = map_structure(lambda leaf: leaf, dict(data) if isinstance(data, Mapping) else data)
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (modules, tasks, data, "
            f"trainer), got {type(raw).__name__}"
        )
    applied = apply_overrides(raw, overrides, problems)
    problems += old_spelling_problems(raw.get("data"))
    import_user_modules(raw.get("imports", []), problems, import_dirs(raw, base_dir))
    cfg = build(ExperimentConfig, raw, "", problems)
    if problems or early:
        located = early + [locate(p, source, lines or {}, applied) for p in problems]
        n = len(located)
        raise ConfigError(
            located, header=f"invalid config '{source}' ({n} problem{'s' * (n > 1)}):"
        )
    cfg.base_dir = str(base_dir)
    return cfg


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read, override and validate a YAML experiment config.

    Args:
        path: The YAML file.
        overrides: ``a.b.c=value`` strings (values parsed as YAML scalars or flow collections).

    Raises:
        ConfigError: A missing file, invalid YAML, duplicate keys, unknown keys, wrong types or
            values: everything at once, each naming the file, line and dotted key.

    Example:
        >>> from pathlib import Path
        >>> from mtlgraph.experiment.config import load_config
        >>> cfg = load_config(Path("configs/quickstart.yaml"), ["trainer.n_epochs=2"])
        >>> cfg.trainer.n_epochs, sorted(cfg.tasks)
        (2, ['circle_task', 'inv_circle_task', 'square_task'])
    """
    file = Path(path)
    source = str(path)
    if not file.is_file():
        raise ConfigError([f"{source}: no such config file"])
    data, lines, problems = parse_yaml(file.read_text(), source)
    if data is None:
        raise ConfigError([f"{source}: the file is empty; see docs/config.md for the sections"])
    return parse_config(data, source, lines, overrides, file.resolve().parent, problems)


def config_to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config (defaults filled in) as plain YAML-ready values."""
    out = plain_config(cfg)
    out.pop("base_dir", None)
    return dict(out)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML text (keys in declaration order)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=None)


def dump_run_config(cfg: ExperimentConfig) -> str:
    """The resolved config as a run directory keeps it (``config.yaml``): relative data paths
    and the directories of ``imports:`` made absolute, so it re-runs from any directory.

    Example:
        >>> from mtlgraph.experiment.config import load_config
        >>> from mtlgraph.experiment.data_config import SourceConfig
        >>> cfg = load_config("configs/quickstart.yaml")
        >>> cfg.data.datasets["circleDataset"].source = SourceConfig("table", "c.npz")
        >>> cfg.base_dir = "/data/exp"
        >>> "path: /data/exp/c.npz" in dump_run_config(cfg)
        True
    """
    out = config_to_dict(cfg)
    base = Path(cfg.base_dir)
    for ds in (out.get("data") or {}).get("datasets", {}).values():
        src = ds.get("source") or {}
        path = src.get("path")
        if isinstance(path, str):
            src["path"] = absolute(base, path)
        elif isinstance(path, list):
            src["path"] = [absolute(base, p) for p in path]
        elif isinstance(path, dict):
            src["path"] = {
                s: [absolute(base, p) for p in v] if isinstance(v, list) else absolute(base, v)
                for s, v in path.items()
            }
        if src.get("images"):
            src["images"]["folder"] = absolute(base, src["images"]["folder"])
            if src["images"].get("processor"):
                src["images"]["processor"] = absolute(base, src["images"]["processor"])
        for text in (src.get("text") or {}).values():
            if text.get("pretrained") and (base / text["pretrained"]).exists():
                text["pretrained"] = absolute(base, text["pretrained"])
    out["modules"] = absolute_paths(out["modules"], base)
    out["import_paths"] = run_import_paths(cfg.imports, cfg.import_paths, base)
    return yaml.safe_dump(out, sort_keys=False, default_flow_style=None)


__all__ = [
    "DataConfig",
    "DatasetConfig",
    "ExperimentConfig",
    "InputConfig",
    "OpConfig",
    "TaskConfig",
    "apply_overrides",
    "config_to_dict",
    "dump_config",
    "dump_run_config",
    "load_config",
    "parse_config",
    "parse_yaml",
]
