"""Trainer controls: per-module hyper-parameters (``param_groups``), ``freeze``, ``amp``,
``grad_accumulation_steps`` and gradient clipping with both."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mtlgraph import (
    ConfigError,
    DictDataLoader,
    DictDataset,
    MultitaskClassifier,
    Operation,
    Task,
    Trainer,
)
from mtlgraph.training.optim import SubsetStepper

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def make_model(seed: int = 0, task_type: str = "multiclass") -> MultitaskClassifier:
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    out = 1 if task_type == "regression" else 2
    tasks = [
        Task(
            name,
            {"base_mlp": trunk, f"{name}_head": nn.Linear(8, out)},
            [Operation("base_mlp", [("_input_", "x")]), Operation(f"{name}_head", ["base_mlp"])],
            task_type=task_type,
        )
        for name in ("a", "b")
    ]
    return MultitaskClassifier(tasks)


def make_data(n: int = 80, seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    return {"x": x}, {"a": (x[:, 0] > 0).long(), "b": (x[:, 0] + x[:, 1] > 0).long()}


def loaders(batch_size: int = 16, n: int = 80, valid: bool = True) -> list[DictDataLoader]:
    X, Y = make_data(n)
    splits = ("train", "valid") if valid else ("train",)
    return [DictDataLoader(DictDataset("d", s, X, Y), batch_size=batch_size) for s in splits]


def params_of(model: MultitaskClassifier, module: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.module_pool[module].parameters()]


def changed(before: list[torch.Tensor], model: MultitaskClassifier, module: str) -> bool:
    after = model.module_pool[module].parameters()
    return any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


# ---------------------------------------------------------------------- param_groups


def test_param_groups_set_per_module_hyper_parameters() -> None:
    model = make_model()
    trainer = Trainer(
        n_epochs=1,
        lr=0.01,
        weight_decay=0.01,
        param_groups={"*_head": {"lr": 0.05, "weight_decay": 0.0}},
        progress_bar=False,
    )
    trainer.fit(model, loaders())
    groups = trainer.optimizer.param_groups
    ids = [{id(p) for p in g["params"]} for g in groups]
    heads = {id(p) for m in ("a_head", "b_head") for p in model.module_pool[m].parameters()}
    trunk = {id(p) for p in model.module_pool["base_mlp"].parameters()}
    assert ids[0] == trunk and groups[0]["lr"] == 0.01 and groups[0]["weight_decay"] == 0.01
    assert ids[1] == heads and groups[1]["lr"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert all(g["scope"] == "model" for g in groups)
    record = trainer.history[-1]
    assert record["model/all/train/lr"] == 0.01
    assert record["model/all/train/lr/*_head"] == 0.05


def test_a_group_learning_rate_really_applies() -> None:
    model = make_model()
    heads, trunk = params_of(model, "a_head"), params_of(model, "base_mlp")
    trainer = Trainer(
        n_epochs=1,
        optimizer="sgd",
        lr=0.1,
        param_groups={"?_head": {"lr": 0.0}},
        progress_bar=False,
    )
    trainer.fit(model, loaders(valid=False))
    assert not changed(heads, model, "a_head")
    assert changed(trunk, model, "base_mlp")


def test_lr_schedule_scales_every_group() -> None:
    model = make_model()
    trainer = Trainer(
        n_epochs=1,
        lr=0.01,
        lr_scheduler={"name": "linear", "end_factor": 0.5},
        param_groups={"a_head": {"lr": 0.1}},
        progress_bar=False,
    )
    trainer.fit(model, loaders(valid=False))
    # 5 steps: the factor at the last step is 1 - 0.5 * 4/5 = 0.6
    lrs = {g.get("name"): g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs[None] == pytest.approx(0.006) and lrs["a_head"] == pytest.approx(0.06)


def test_a_pattern_matching_nothing_is_an_error_with_a_suggestion() -> None:
    trainer = Trainer(param_groups={"base_mpl": {"lr": 0.1}}, progress_bar=False)
    with pytest.raises(
        ConfigError, match=r"pattern 'base_mpl' matches no module .*did you mean 'base_mlp'"
    ):
        trainer.fit(make_model(), loaders())


def test_every_fit_time_problem_is_reported_at_once_and_nothing_is_changed() -> None:
    model = make_model()
    trainer = Trainer(
        param_groups={"*_head": {"lr": 0.1}, "a_*": {"lr": 0.2}, "zzz": {}},
        freeze=["base_mlp", "a_haed"],
        amp="fp16",
        balancer={"name": "uncertainty", "forms": {"c": "regression"}},
        progress_bar=False,
    )
    with pytest.raises(ConfigError) as info:
        trainer.fit(model, loaders())
    problems = info.value.problems
    assert any("module 'a_head' matches both '*_head' and 'a_*'" in p for p in problems)
    assert any("param_groups: pattern 'zzz' matches no module" in p for p in problems)
    assert any(
        "freeze: pattern 'a_haed' matches no module" in p and "'a_head'" in p for p in problems
    )
    assert any("'fp16' needs a CUDA device" in p for p in problems)
    assert any("forms names unknown task 'c'" in p for p in problems)
    assert len(problems) == 5
    assert all(p.requires_grad for p in model.parameters())  # freeze not applied


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"param_groups": {"*_head": {"lrr": 0.1}}},
            r"param_groups\.\*_head\.lrr: .*did you mean 'lr'",
        ),
        (
            {"param_groups": {"*_head": {"lr": -1.0}}},
            r"param_groups\.\*_head\.lr: must be a number >= 0",
        ),
        ({"param_groups": {"*_head": {"params": []}}}, "is set by the Trainer"),
        ({"param_groups": {"*_head": 0.1}}, "param_groups.*_head: expected a mapping"),
        ({"freeze": "base_mlp"}, "freeze: expected a list"),
        ({"freeze": [""]}, "freeze: entries must be non-empty strings"),
        ({"grad_accumulation_steps": 0}, "grad_accumulation_steps: must be >= 1"),
        ({"amp": "fp32"}, "amp: expected one of 'bf16', 'fp16' or null"),
    ],
)
def test_construction_time_checks(config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Trainer(**config)


def test_param_group_options_are_checked_against_the_chosen_optimizer() -> None:
    Trainer(optimizer="sgd", param_groups={"*": {"momentum": 0.9}})
    with pytest.raises(ConfigError, match=r"takes no 'momentum'"):
        Trainer(optimizer="adam", param_groups={"*": {"momentum": 0.9}})


# ---------------------------------------------------------------------- freeze


@pytest.mark.parametrize("pattern", ["base_mlp", "base_*"])
def test_frozen_modules_are_not_trained(pattern: str) -> None:
    model = make_model()
    trunk, head = params_of(model, "base_mlp"), params_of(model, "a_head")
    trainer = Trainer(n_epochs=1, freeze=[pattern], progress_bar=False)
    trainer.fit(model, loaders())
    assert not changed(trunk, model, "base_mlp")
    assert changed(head, model, "a_head")
    assert all(not p.requires_grad for p in model.module_pool["base_mlp"].parameters())
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_optimizer & {id(p) for p in model.module_pool["base_mlp"].parameters()}


def test_freeze_works_with_gradient_methods() -> None:
    model = make_model()
    trunk = params_of(model, "base_mlp")
    Trainer(
        n_epochs=1,
        freeze=["base_mlp"],
        balancer="pcgrad",
        batch_scheduler="mixed",
        progress_bar=False,
    ).fit(model, loaders())
    assert not changed(trunk, model, "base_mlp")


# ---------------------------------------------------------------------- amp


class DtypeProbe(nn.Module):
    """Identity that records the dtype it sees in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[torch.dtype] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.seen.add(x.dtype)
        return x


def probed_model() -> tuple[MultitaskClassifier, DtypeProbe]:
    torch.manual_seed(0)
    probe = DtypeProbe()
    trunk = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU())
    tasks = [
        Task(
            name,
            {"base_mlp": trunk, "probe": probe, f"{name}_head": nn.Linear(8, 2)},
            [
                Operation("base_mlp", [("_input_", "x")]),
                Operation("probe", ["base_mlp"]),
                Operation(f"{name}_head", ["probe"]),
            ],
        )
        for name in ("a", "b")
    ]
    return MultitaskClassifier(tasks), probe


def test_bf16_autocast_on_cpu_trains() -> None:
    model, probe = probed_model()
    trainer = Trainer(n_epochs=15, lr=0.02, amp="bf16", progress_bar=False)
    trainer.fit(model, loaders(n=200))
    assert probe.seen == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    record = trainer.history[-1]
    assert record["a/d/valid/accuracy"] > 0.9 and record["b/d/valid/accuracy"] > 0.9


def test_without_amp_the_forward_is_float32() -> None:
    model, probe = probed_model()
    Trainer(n_epochs=1, progress_bar=False).fit(model, loaders())
    assert probe.seen == {torch.float32}


def test_fp16_on_cpu_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match=r"amp: 'fp16' needs a CUDA device .*use amp='bf16'"):
        Trainer(amp="fp16", progress_bar=False).fit(make_model(), loaders())


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("amp", ["fp16", "bf16"])
@pytest.mark.parametrize("balancer", ["sum", "pcgrad"])
def test_amp_on_cuda_trains(amp: str, balancer: str) -> None:
    torch.manual_seed(0)
    model = make_model()
    model.to("cuda")
    trainer = Trainer(
        n_epochs=15,
        lr=0.02,
        amp=amp,
        grad_clip=1.0,
        balancer=balancer,
        batch_scheduler="mixed",
        progress_bar=False,
    )
    trainer.fit(model, loaders(n=200))
    record = trainer.history[-1]
    assert record["a/d/valid/accuracy"] > 0.9 and record["b/d/valid/accuracy"] > 0.9


# ---------------------------------------------------------------------- accumulation


def fit_copy(model: MultitaskClassifier, **config: object) -> tuple[MultitaskClassifier, Trainer]:
    model = copy.deepcopy(model)
    batch_size = int(config.pop("batch_size"))  # type: ignore[call-overload]
    trainer = Trainer(progress_bar=False, evaluation_freq=0, **config)
    trainer.fit(model, loaders(batch_size=batch_size, valid=False))
    return model, trainer


@pytest.mark.parametrize("balancer", ["sum", "uncertainty"])
@pytest.mark.parametrize("grad_clip", [None, 0.05])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_accumulation_equals_the_big_batch_update(
    balancer: str, grad_clip: float | None, optimizer: str
) -> None:
    """80 rows: batches of 32 (32, 32, 16) vs micro-batches of 8 accumulated 4 at a time
    (4, 4, and a last group of 2 micro-batches, rescaled to its mean)."""
    init = make_model()
    common = {"n_epochs": 2, "lr": 0.05, "balancer": balancer, "grad_clip": grad_clip}
    big, big_trainer = fit_copy(init, batch_size=32, optimizer=optimizer, **common)
    acc, acc_trainer = fit_copy(
        init, batch_size=8, grad_accumulation_steps=4, optimizer=optimizer, **common
    )
    assert big_trainer.global_step == acc_trainer.global_step == 6
    for p, q in zip(big.parameters(), acc.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    for p, q in zip(
        big_trainer.balancer.parameters(), acc_trainer.balancer.parameters(), strict=True
    ):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert any(
        not torch.equal(p, q) for p, q in zip(init.parameters(), acc.parameters(), strict=True)
    )


def test_accumulating_steps_of_different_tasks_steps_their_union() -> None:
    """Round-robin over two one-task loaders, 2 micro-steps per update, is the mixed step
    (one batch of each loader) with half the gradient: equal with SGD at twice the lr."""
    X, Y = make_data(64)
    train = [
        DictDataLoader(DictDataset(f"d_{t}", "train", X, {t: Y[t]}), batch_size=16)
        for t in ("a", "b")
    ]
    init = make_model()
    mixed = copy.deepcopy(init)
    Trainer(n_epochs=2, optimizer="sgd", lr=0.05, batch_scheduler="mixed", progress_bar=False).fit(
        mixed, train
    )
    accumulated = copy.deepcopy(init)
    trainer = Trainer(
        n_epochs=2,
        optimizer="sgd",
        lr=0.1,
        batch_scheduler="round_robin",
        grad_accumulation_steps=2,
        progress_bar=False,
    )
    trainer.fit(accumulated, train)
    assert trainer.global_step == 8
    for p, q in zip(mixed.parameters(), accumulated.parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_accumulation_with_a_gradient_method_trains() -> None:
    model = make_model()
    trainer = Trainer(
        n_epochs=20,
        lr=0.02,
        balancer="cagrad",
        batch_scheduler="mixed",
        grad_accumulation_steps=2,
        amp="bf16",
        progress_bar=False,
    )
    trainer.fit(model, loaders(batch_size=8, n=200))
    record = trainer.history[-1]
    assert record["a/d/valid/accuracy"] > 0.9 and record["b/d/valid/accuracy"] > 0.9


def test_evaluation_in_steps_counts_optimizer_steps() -> None:
    model = make_model()
    trainer = Trainer(
        n_epochs=1,
        grad_accumulation_steps=2,
        evaluation_unit="steps",
        evaluation_freq=1,
        progress_bar=False,
    )
    trainer.fit(model, loaders(batch_size=16, n=80))  # 5 micro-steps -> 3 optimizer steps
    assert [r["step"] for r in trainer.history] == [1.0, 2.0, 3.0]


# ---------------------------------------------------------------------- clipping


def test_clipping_unscales_first() -> None:
    """With a grad scaler the step unscales before clipping: the same update as clipping the
    unscaled gradients (the CPU scaler exercises the same code path as CUDA's)."""
    init = make_model()
    X, Y = make_data(32)
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = copy.deepcopy(init)
        optimizer = torch.optim.SGD(
            [{"params": list(model.parameters()), "scope": "model"}], lr=1.0
        )
        stepper = SubsetStepper(optimizer)
        losses, _ = model.calculate_loss(X, Y)
        total = losses["a"] + losses["b"]
        (total if scaler is None else scaler.scale(total)).backward()
        plan = model.plan(losses)
        norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
        if scaler is not None:
            norm = norm / 2.0**12
        assert norm > 0.1  # clipping is active
        stepper.step(plan, grad_clip=0.1, scaler=scaler)
        results.append(model)
    for p, q in zip(results[0].parameters(), results[1].parameters(), strict=True):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    moved = torch.cat(
        [
            (p - q).detach().reshape(-1)
            for p, q in zip(init.parameters(), results[0].parameters(), strict=True)
        ]
    )
    assert moved.norm().item() == pytest.approx(0.1, rel=1e-4)  # SGD lr 1: the clipped norm


def test_clipping_bounds_the_update_in_the_trainer() -> None:
    init = make_model()
    model = copy.deepcopy(init)
    Trainer(
        n_epochs=1, optimizer="sgd", lr=1.0, grad_clip=0.01, progress_bar=False, evaluation_freq=0
    ).fit(model, loaders(batch_size=80, valid=False))
    moved = torch.cat(
        [
            (p - q).detach().reshape(-1)
            for p, q in zip(init.parameters(), model.parameters(), strict=True)
        ]
    )
    assert moved.norm().item() == pytest.approx(0.01, rel=1e-4)
