"""YAML configs: every validation error path, overrides, imports, the resolved-config round trip."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from experiment_helpers import ROOT, tiny_config, write_config

from mtlgraph import ConfigError
from mtlgraph.experiment.config import (
    ExperimentConfig,
    InputConfig,
    apply_overrides,
    config_to_dict,
    dump_config,
    load_config,
    parse_config,
)
from mtlgraph.training.trainer import TrainerConfig


def _errors(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


def _one(path: Path, overrides: tuple[str, ...] = ()) -> str:
    problems = _errors(path, overrides)
    assert len(problems) == 1, problems
    return problems[0]


def test_tiny_config_loads_with_defaults_filled(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_config()))
    assert isinstance(cfg, ExperimentConfig)
    assert isinstance(cfg.trainer, TrainerConfig)
    assert (cfg.trainer.n_epochs, cfg.trainer.lr, cfg.trainer.optimizer) == (2, 0.05, "adam")
    assert cfg.tasks["circle_task"].task_type == "multiclass"
    assert cfg.tasks["circle_task"].ops[0].inputs == [["_input_", "xy"]]
    assert cfg.data.datasets["circles"].source.args == {"n": 200, "seed": 0}
    assert cfg.base_dir == str(tmp_path.resolve())


def test_trainer_section_maps_onto_trainer_config(tmp_path: Path) -> None:
    text = (
        "trainer: {optimizer: {name: sgd, momentum: 0.9}, lr_scheduler: cosine, warmup_steps: 3,"
        " batch_scheduler: round_robin, evaluation_unit: steps, evaluation_freq: 5,"
        " checkpoint_every: 2, checkpoint_unit: steps}"
    )
    cfg = load_config(write_config(tmp_path / "c.yaml", _with(tiny_config(), text)))
    t = cfg.trainer
    assert t.optimizer == {"name": "sgd", "momentum": 0.9}
    assert (t.lr_scheduler, t.batch_scheduler, t.checkpoint_unit) == (
        "cosine",
        "round_robin",
        "steps",
    )


def _with(base: dict, extra_yaml: str) -> str:
    """YAML text of ``base`` with ``extra_yaml`` sections replacing its own."""
    data = dict(base)
    data.update(yaml.safe_load(extra_yaml))
    return yaml.safe_dump(data, sort_keys=False)


# ---------------------------------------------------------------- error paths


def test_unknown_keys_are_named_with_file_line_and_suggestion(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["trainer"]["lrr"] = 0.1
    cfg["tasks"]["circle_task"]["wieght"] = 2.0
    path = write_config(tmp_path / "c.yaml", cfg)
    problems = _errors(path)
    assert len(problems) == 2
    lrr = next(p for p in problems if "lrr" in p)
    assert lrr.startswith(f"{path}:")
    assert "trainer.lrr: unknown key (did you mean 'lr'?)" in lrr
    line = int(lrr.split(":")[1])
    assert path.read_text().splitlines()[line - 1].strip().startswith("lrr:")
    assert any(
        "tasks.circle_task.wieght: unknown key (did you mean 'weight'?)" in p for p in problems
    )


def test_unknown_top_level_section(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["trainr"] = cfg.pop("trainer")
    assert "trainr: unknown key (did you mean 'trainer'?)" in _one(
        write_config(tmp_path / "c.yaml", cfg)
    )


def test_yaml_11_exponent_hint(tmp_path: Path) -> None:
    text = yaml.safe_dump(tiny_config()).replace("lr: 0.05", "lr: 1e-3")
    problem = _one(write_config(tmp_path / "c.yaml", text))
    assert "trainer.lr: expected a number, got the string '1e-3'" in problem
    assert "YAML 1.1 reads '1e-3' as a string" in problem and "1.0e-3" in problem


def test_type_errors_name_the_expected_type(tmp_path: Path) -> None:
    cfg = tiny_config(n_epochs="ten", progress_bar="no")
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    assert any("trainer.n_epochs: expected an integer, got the string 'ten'" in p for p in problems)
    assert any(
        "trainer.progress_bar: expected true or false, got the string 'no'" in p for p in problems
    )


def test_trainer_value_checks(tmp_path: Path) -> None:
    cfg = tiny_config(
        lr=-1.0,
        optimizer={"name": "adamm"},
        checkpoint_every=-2,
        writers=["csv"],
        batch_scheduler={"name": "shufled"},
    )
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    joined = "\n".join(problems)
    assert "trainer.lr: must be a positive number, got -1.0" in joined
    assert "trainer.optimizer.name: unknown optimizer 'adamm' (did you mean 'adam'?)" in joined
    assert "trainer.checkpoint_every: must be >= 0, got -2" in joined
    assert "trainer.writers[0]: unknown writer 'csv'" in joined
    assert (
        "trainer.batch_scheduler.name: unknown batch scheduler 'shufled' (did you mean 'shuffled'?)"
        in joined
    )
    assert len(problems) == 5


def test_duplicate_keys_report_both_lines(tmp_path: Path) -> None:
    text = yaml.safe_dump(tiny_config(), sort_keys=False)
    text = text.replace("  lr: 0.05\n", "  lr: 0.05\n  n_epochs: 3\n  lr: 0.1\n")
    path = write_config(tmp_path / "c.yaml", text)
    problems = _errors(path)
    lines = path.read_text().splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.strip() == "lr: 0.05") + 1
    second = next(i for i, ln in enumerate(lines) if ln.strip() == "lr: 0.1") + 1
    dupes = [p for p in problems if "duplicate" in p]
    assert len(dupes) == 2  # lr and n_epochs
    lr = next(p for p in dupes if "'lr'" in p)
    assert lr == (
        f"{path}:{second}: trainer.lr: duplicate key 'lr' on line {second} (first on line "
        f"{first}); YAML would silently keep the last one: remove or rename one"
    )


def test_missing_sections_and_required_keys(tmp_path: Path) -> None:
    cfg = tiny_config()
    del cfg["modules"]
    del cfg["tasks"]["circle_task"]["ops"]
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    assert any(p.endswith("modules: missing (required)") for p in problems)
    assert any(p.endswith("tasks.circle_task.ops: missing (required)") for p in problems)


def test_module_errors(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["modules"]["trunk"] = {"type": "mpl", "in_dim": 2}
    cfg["modules"]["circle_head"] = {"type": "linear", "in_feature": 8, "out_features": 2}
    cfg["modules"]["square_head"] = {"type": "linear", "in_features": "8", "out_features": 2}
    cfg["modules"]["extra"] = {"in_dim": 3}
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    joined = "\n".join(problems)
    assert "modules.trunk.type: unknown module type 'mpl' (did you mean 'mlp'?)" in joined
    assert "or a dotted import path (register more in a module listed under" in joined
    assert (
        "modules.circle_head.in_feature: module type 'linear' takes no argument 'in_feature' "
        "(did you mean 'in_features'?)"
    ) in joined
    assert "modules.circle_head.in_features: missing (required by module type 'linear')" in joined
    assert "modules.square_head.in_features: expected an integer, got the string '8'" in joined
    assert "modules.extra.type: missing" in joined
    assert len(problems) == 5


def test_task_errors(tmp_path: Path) -> None:
    cfg = tiny_config()
    ops = cfg["tasks"]["circle_task"]["ops"]
    ops[1]["module"] = "circle_haed"
    ops.append({"module": "square_head", "inputs": ["trunkk", ["_input_", "xy", 3]]})
    cfg["tasks"]["square_task"]["loss"] = "cross_entropi"
    cfg["tasks"]["square_task"]["metrics"] = ["acuracy", {"key": "f"}]
    cfg["tasks"]["square_task"]["task_type"] = "multi_class"
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    joined = "\n".join(problems)
    assert "tasks.circle_task.ops[2].inputs[1]: write [source, key], a list of two items" in joined
    assert "tasks.square_task.task_type: expected one of 'multiclass'" in joined
    assert "(did you mean 'multiclass'?)" in joined


def test_task_value_rules_are_the_constructors(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["tasks"]["circle_task"].update(weight=-1.0, threshold=1.5)
    cfg["tasks"]["square_task"]["weight"] = float("nan")
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    assert [p.split(": ", 1)[1] for p in problems] == [
        "tasks.circle_task.weight: must be a finite number >= 0, got -1.0",
        "tasks.circle_task.threshold: must be in (0, 1), got 1.5",
        "tasks.square_task.weight: must be a finite number >= 0, got nan",
    ]


def test_task_cross_checks(tmp_path: Path) -> None:
    cfg = tiny_config()
    ops = cfg["tasks"]["circle_task"]["ops"]
    ops[1]["module"] = "circle_haed"
    ops.append({"module": "square_head", "inputs": ["trunkk"]})
    cfg["tasks"]["square_task"]["loss"] = "cross_entropi"
    cfg["tasks"]["square_task"]["metrics"] = ["acuracy", {"key": "f"}]
    cfg["tasks"]["square_task"]["modules"] = ["trunk"]
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    joined = "\n".join(problems)
    assert "tasks.circle_task.ops[1].module: unknown module 'circle_haed'" in joined
    assert (
        "tasks.circle_task.ops[2].inputs[0]: operation 'square_head' reads 'trunkk', which "
        "names no earlier operation (did you mean 'trunk'?)"
    ) in joined
    assert (
        "tasks.square_task.loss: unknown loss 'cross_entropi' (did you mean 'cross_entropy'?)"
        in joined
    )
    assert (
        "tasks.square_task.metrics[0]: unknown metric 'acuracy' (did you mean 'accuracy'?)"
        in joined
    )
    assert "tasks.square_task.metrics[1]: metric spec" in joined
    assert (
        "tasks.square_task.ops[1].module: unknown module 'square_head' in operation "
        "'square_head'; the task's pool is 'trunk'; add it to tasks.square_task.modules"
    ) in joined
    assert len(problems) == 6


def test_component_arguments_are_checked_before_training(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["tasks"]["square_task"]["metrics"] = ["accuracy", {"name": "fbeta", "betta": 2}]
    cfg["trainer"]["batch_scheduler"] = {"name": "mixed", "sed": 3}
    joined = "\n".join(_errors(write_config(tmp_path / "c.yaml", cfg)))
    assert (
        "tasks.square_task.metrics[1].betta: metric 'fbeta' takes no argument 'betta' "
        "(did you mean 'beta'?)" in joined
    )
    assert (
        "trainer.batch_scheduler.sed: batch scheduler 'mixed' takes no argument 'sed' "
        "(did you mean 'seed'?)" in joined
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "optimizer",
            {"name": "adamw", "amsgrad": "maybe"},
            "trainer.optimizer.amsgrad: expected true or false, got the string 'maybe'",
        ),
        (
            "optimizer",
            {"name": "adamw", "betas": 0.9},
            "trainer.optimizer.betas: expected a list of 2, got float 0.9",
        ),
        (
            "batch_scheduler",
            {"name": "weighted", "weights": [1, 2]},
            "trainer.batch_scheduler.weights: expected a mapping, got list [1, 2]",
        ),
        (
            "optimizer",
            {"name": "sgd", "weight_decay": 5.0},
            "trainer.optimizer.weight_decay: optimizer 'sgd' gets 'weight_decay' from mtlgraph; "
            "set it once, as trainer.weight_decay",
        ),
        (
            "optimizer",
            {"name": "adamw", "lr": 0.1},
            "trainer.optimizer.lr: optimizer 'adamw' gets 'lr' from mtlgraph; set it once, as "
            "trainer.lr",
        ),
        (
            "lr_scheduler",
            {"name": "cosine", "min_factor": "low"},
            "trainer.lr_scheduler.min_factor: expected a number, got the string 'low'",
        ),
    ],
)
def test_component_argument_types_are_checked_before_training(
    tmp_path: Path, key: str, value: Any, message: str
) -> None:
    cfg = tiny_config()
    cfg["trainer"][key] = value
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    assert len(problems) == 1 and message in problems[0], problems


def test_data_errors(tmp_path: Path) -> None:
    cfg = tiny_config()
    circles = cfg["data"]["datasets"]["circles"]
    circles["labels"] = {"circle_tsk": "y"}
    circles["source"]["args"]["radius"] = 2
    squares = cfg["data"]["datasets"]["squares"]
    squares["source"]["name"] = "sqaure"
    cfg["data"]["datasets"]["files"] = {
        "source": {
            "type": "table",
            "path": {"train": "a.csv"},
            "name": "circle",
            "split_column": "split",
            "fractions": {"train": 1.5},
        },
        "fields": {},
        "labels": {"circle_task": "y"},
    }
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    joined = "\n".join(problems)
    assert "data.datasets.files.source.name: 'name' and 'args' are for type 'generator'" in joined
    assert "data.datasets.files.source.split_column: only for a single file" in joined
    assert "data.datasets.files.source.fractions: only for a single file" in joined
    assert "data.datasets.files.fields: empty" in joined
    assert "give 'split_column' or 'fractions', not both" in joined
    assert "data.datasets.files.source.fractions: each in (0, 1], summing to at most 1" in joined
    # value problems do not hide the cross-checks: everything at once
    assert "data.datasets.circles.labels.circle_tsk: labels name tasks" in joined
    assert (
        "data.datasets.circles.source.args.radius: generator 'circle' takes no argument" in joined
    )
    assert "data.datasets.squares.source.name: unknown generator 'sqaure'" in joined
    assert len(problems) == 9


def test_data_cross_checks(tmp_path: Path) -> None:
    cfg = tiny_config()
    circles = cfg["data"]["datasets"]["circles"]
    circles["labels"] = {"circle_tsk": "y"}
    circles["source"]["args"]["radius"] = 2
    cfg["data"]["datasets"]["squares"]["source"]["name"] = "sqaure"
    cfg["data"]["datasets"]["csv"] = {
        "source": {"type": "table", "path": "x.txt"},
        "fields": {"a": "a"},
        "labels": {"square_task": "b"},
    }
    problems = _errors(write_config(tmp_path / "c.yaml", cfg))
    joined = "\n".join(problems)
    assert (
        "data.datasets.circles.labels.circle_tsk: labels name tasks, and there is no task "
        "'circle_tsk' (did you mean 'circle_task'?)"
    ) in joined
    assert (
        "data.datasets.circles.source.args.radius: generator 'circle' takes no argument 'radius'"
        in joined
    )
    assert (
        "data.datasets.squares.source.name: unknown generator 'sqaure' (did you mean 'square'?)"
        in joined
    )
    assert "cannot tell the format of 'x.txt'" in joined
    assert len(problems) == 4


def test_every_problem_at_once_with_a_header(tmp_path: Path) -> None:
    cfg = tiny_config(lrr=1, n_epochs=-1)
    cfg["modules"]["trunk"]["type"] = "mpl"
    path = write_config(tmp_path / "c.yaml", cfg)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"invalid config '{path}' (")
    assert all(p.startswith(f"{path}:") for p in info.value.problems)
    assert "trainer.lrr" in message and "trainer.n_epochs: must be >= 0" in message


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", "modules:\n  a: [1, 2\ntasks: {}\n")
    problem = _one(path)
    assert problem.startswith(f"{path}:3:")
    assert "invalid YAML" in problem


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "the top level must be a mapping of sections"),
    ],
)
def test_empty_or_non_mapping_files(tmp_path: Path, text: str, expected: str) -> None:
    assert expected in _one(write_config(tmp_path / "c.yaml", text))


def test_missing_config_file(tmp_path: Path) -> None:
    assert _one(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: no such config file"


def test_python_objects_are_never_constructed(tmp_path: Path) -> None:
    text = "experiment: !!python/object/apply:os.system ['echo pwned']\n"
    problem = _one(write_config(tmp_path / "c.yaml", text))
    assert "invalid YAML" in problem and "python/object/apply" in problem


# ---------------------------------------------------------------- overrides


def test_overrides_set_create_and_index(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config())
    cfg = load_config(
        path,
        [
            "trainer.lr=0.2",
            "trainer.optimizer={name: sgd, momentum: 0.5}",
            "tasks.circle_task.weight=2",
            "tasks.circle_task.ops[1].name=head_out",
            "data.datasets.circles.source.args.n=100",
            "modules.trunk.hidden=[16, 8]",
            "trainer.checkpoint_metric=null",
        ],
    )
    assert cfg.trainer.lr == 0.2
    assert cfg.trainer.optimizer == {"name": "sgd", "momentum": 0.5}
    assert cfg.tasks["circle_task"].weight == 2.0
    assert cfg.tasks["circle_task"].ops[1].name == "head_out"
    assert cfg.data.datasets["circles"].source.args["n"] == 100
    assert cfg.modules["trunk"]["hidden"] == [16, 8]


def test_override_errors_name_the_override(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", tiny_config())
    problems = _errors(
        path, ("trainer.lr.x=1", "trainer.lr=1e-3", "trainer", "tasks.circle_task.ops[5].name=a")
    )
    joined = "\n".join(problems)
    assert f"{path} (override 'trainer.lr=1e-3'): trainer.lr: expected a number" in joined
    assert "override 'trainer': expected KEY=VALUE, e.g. trainer.lr=0.01" in joined
    assert "override 'trainer.lr.x=1': trainer.lr is 0.05, not a mapping" in joined
    assert (
        "override 'tasks.circle_task.ops[5].name=a': tasks.circle_task.ops is a list of 2" in joined
    )
    assert len(problems) == 4


def test_apply_overrides_parses_yaml_scalars() -> None:
    data: dict = {}
    problems: list[str] = []
    apply_overrides(
        data, ["a.b=3", "a.c=0.5", "a.d=true", "a.e=null", "a.f=word", "a.g=1.0e-3"], problems
    )
    assert problems == []
    assert data == {"a": {"b": 3, "c": 0.5, "d": True, "e": None, "f": "word", "g": 0.001}}


# ---------------------------------------------------------------- imports: the only user code


def test_imports_register_user_modules(tmp_path: Path) -> None:
    (tmp_path / "my_blocks_cfgtest.py").write_text(
        "from torch import nn\n"
        "from mtlgraph.graph import MODULES\n"
        "class Twice(nn.Module):\n"
        "    def __init__(self, scale: float = 2.0):\n"
        "        super().__init__(); self.scale = scale\n"
        "    def forward(self, x):\n"
        "        return x * self.scale\n"
        "MODULES.register('twice_cfgtest', Twice)\n"
    )
    cfg = tiny_config()
    cfg["imports"] = ["my_blocks_cfgtest"]
    cfg["modules"]["double"] = {"type": "twice_cfgtest", "scale": 3.0}
    cfg["tasks"]["circle_task"]["ops"].insert(1, {"module": "double", "inputs": ["trunk"]})
    cfg["tasks"]["circle_task"]["ops"][2]["inputs"] = ["double"]
    loaded = load_config(write_config(tmp_path / "c.yaml", cfg))
    assert loaded.modules["double"] == {"type": "twice_cfgtest", "scale": 3.0}
    # the user module's annotations are checked like any config value
    cfg["modules"]["double"]["scale"] = "big"
    problem = _one(write_config(tmp_path / "c2.yaml", cfg))
    assert "modules.double.scale: expected a number, got the string 'big'" in problem


def test_missing_import_is_a_config_problem(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["imports"] = ["no_such_module_xyz"]
    problem = _one(write_config(tmp_path / "c.yaml", cfg))
    assert (
        "imports[0]: cannot import 'no_such_module_xyz': no module named 'no_such_module_xyz'"
        in problem
    )


def test_exception_inside_an_import_keeps_its_type(tmp_path: Path) -> None:
    (tmp_path / "broken_cfgtest.py").write_text(
        "raise ZeroDivisionError('inside the user module')\n"
    )
    cfg = tiny_config()
    cfg["imports"] = ["broken_cfgtest"]
    with pytest.raises(ZeroDivisionError, match="inside the user module") as info:
        load_config(write_config(tmp_path / "c.yaml", cfg))
    assert any("imports[0]" in n for n in info.value.__notes__)


# ---------------------------------------------------------------- round trip and Python API


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["tasks"]["circle_task"]["ops"][1]["inputs"] = [{"source": "trunk", "detach": False}]
    cfg["tasks"]["square_task"]["task_type"] = "multiclass"
    cfg["tasks"]["square_task"]["ignore_value"] = None
    first = load_config(write_config(tmp_path / "c.yaml", cfg))
    assert first.tasks["circle_task"].ops[1].inputs == [InputConfig("trunk", None, False)]
    text = dump_config(first)
    second = load_config(write_config(tmp_path / "resolved.yaml", text))
    assert second == first
    assert config_to_dict(second) == config_to_dict(first)
    assert "base_dir" not in text


def test_nan_ignore_value_round_trips(tmp_path: Path) -> None:
    cfg = tiny_config()
    cfg["tasks"]["circle_task"]["ignore_value"] = float("nan")
    first = load_config(write_config(tmp_path / "c.yaml", cfg))
    second = load_config(write_config(tmp_path / "r.yaml", dump_config(first)))
    assert math.isnan(second.tasks["circle_task"].ignore_value)  # type: ignore[arg-type]


def test_parse_config_from_a_mapping_is_the_same_as_yaml(tmp_path: Path) -> None:
    from_yaml = load_config(write_config(tmp_path / "c.yaml", tiny_config()))
    from_dict = parse_config(tiny_config(), base_dir=tmp_path.resolve())
    assert from_dict == from_yaml


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.experiment == path.stem


def test_every_field_is_documented() -> None:
    """docs/config.md names every key of every section, every module type and generator."""
    import dataclasses

    from mtlgraph.data.synthetic import GENERATORS
    from mtlgraph.experiment.config import DataConfig, DatasetConfig, OpConfig, TaskConfig
    from mtlgraph.graph.modules import MODULES

    doc = (ROOT / "docs" / "config.md").read_text()
    classes = (
        ExperimentConfig,
        TaskConfig,
        OpConfig,
        InputConfig,
        DataConfig,
        DatasetConfig,
        TrainerConfig,
    )
    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in classes
        for f in dataclasses.fields(cls)
        if f.init and f"`{f.name}`" not in doc
    ]
    builtin = (
        "linear",
        "mlp",
        "embedding_bag",
        "conv2d_stack",
        "identity",
        "concat",
        "sum",
        "dropout",
        "activation",
    )
    assert set(builtin) <= set(MODULES.names())
    missing += [f"module {m}" for m in builtin if f"| `{m}`" not in doc]
    missing += [f"generator {g}" for g in GENERATORS if f"`{g}`" not in doc]
    assert not missing, missing
