"""Balancers: each method's math against hand-computed cases from its paper's formula, the
registry and its errors, gradient plumbing (shared vs task-only parameters), and state that
round-trips through ``state_dict`` for bit-exact resume."""

from __future__ import annotations

import copy
import io
import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import optimize
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
from mtlgraph.balancing import (
    BALANCERS,
    Balancer,
    CAGradBalancer,
    DWABalancer,
    GradNormBalancer,
    InverseMetricBalancer,
    MGDABalancer,
    PCGradBalancer,
    StepContext,
    UncertaintyBalancer,
)

ALL = [
    "sum",
    "uncertainty",
    "dwa",
    "gradnorm",
    "inverse_metric",
    "rlw",
    "pcgrad",
    "cagrad",
    "mgda",
]
GRADIENT_METHODS = ["pcgrad", "cagrad", "mgda"]


# ---------------------------------------------------------------------- helpers


def two_task_model(
    seed: int = 0, types: tuple[str, str] = ("regression", "regression"), weights=(1.0, 1.0)
) -> MultitaskClassifier:
    """Tasks ``a`` and ``b`` on a shared trunk, each with its own linear head."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4))
    tasks = []
    for name, task_type, w in zip(("a", "b"), types, weights, strict=True):
        out = 2 if task_type == "multiclass" else 1
        tasks.append(
            Task(
                name,
                {"trunk": trunk, f"{name}_head": nn.Linear(4, out)},
                [Operation("trunk", [("_input_", "x")]), Operation(f"{name}_head", ["trunk"])],
                task_type=task_type,
                weight=w,
            )
        )
    return MultitaskClassifier(tasks)


def batch(seed: int = 1, n: int = 16) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return {"x": x}, {"a": x[:, 0] * 2 + 1, "b": -x[:, 1] + x[:, 2]}


def context(
    model: MultitaskClassifier,
    losses: Mapping[str, torch.Tensor],
    backward: Callable[[torch.Tensor], None] | None = None,
) -> StepContext:
    return StepContext(
        tasks=model.tasks,
        plan=model.plan(losses),
        counts={t: 16 for t in losses},
        backward=backward or (lambda loss: loss.backward()),
        scale=lambda loss: loss,
        step=0,
    )


def run_step(model: MultitaskClassifier, balancer: Balancer, seed: int = 1) -> None:
    X, Y = batch(seed)
    losses, _ = model.calculate_loss(X, Y)
    balancer.backward(losses, context(model, losses))


def flat_grads(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def per_task_grads(
    model: MultitaskClassifier, params: Mapping[str, list[nn.Parameter]]
) -> dict[str, torch.Tensor]:
    """Each task's (Task.weight-weighted) gradient on ``params[task]``, flattened."""
    X, Y = batch()
    out = {}
    for t in ("a", "b"):
        losses, _ = model.calculate_loss(X, {t: Y[t]})
        loss = losses[t] * model.tasks[t].weight
        out[t] = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params[t])])
    return out


# ---------------------------------------------------------------------- registry & errors


def test_registry_holds_every_method() -> None:
    assert set(ALL) <= set(BALANCERS.names())
    for name in ALL:
        assert BALANCERS.build(name).name == name


def test_make_balancer_from_mapping_and_instance() -> None:
    b = BALANCERS.build({"name": "cagrad", "c": 0.25})
    assert isinstance(b, CAGradBalancer) and b.c == 0.25
    assert BALANCERS.build(b) is b


def test_unknown_balancer_suggests_the_near_miss() -> None:
    with pytest.raises(ConfigError, match=r"unknown balancer 'pcgard' \(did you mean 'pcgrad'\?\)"):
        BALANCERS.build("pcgard")


def test_unknown_argument_names_the_accepted_ones() -> None:
    with pytest.raises(ConfigError, match=r"takes no argument 'cc' \(did you mean 'c'\?\)"):
        BALANCERS.build({"name": "cagrad", "cc": 0.5})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "dwa", "temperature": 0}, "temperature must be a finite number > 0"),
        ({"name": "cagrad", "c": 1.0}, r"c must be a finite number in \[0, 1\)"),
        ({"name": "gradnorm", "alpha": -1}, "alpha must be a finite number >= 0"),
        ({"name": "gradnorm", "lr": 0}, "lr must be a finite number > 0"),
        ({"name": "uncertainty", "forms": {"a": "gaussian"}}, "must be 'regression' or"),
        ({"name": "mgda", "max_iter": 0}, "max_iter must be an integer >= 1"),
        ({"name": "inverse_metric", "eps": 0}, "eps must be a finite number > 0"),
    ],
)
def test_bad_values_are_rejected(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BALANCERS.build(spec)


def test_trainer_validates_the_balancer_at_construction() -> None:
    with pytest.raises(ConfigError) as info:
        Trainer(balancer={"name": "dwa", "temperature": -1.0}, lr=-1.0)
    text = str(info.value)
    assert "balancer: " in text and "temperature must be a finite number > 0" in text
    assert "lr: must be a positive number" in text  # every problem at once


def test_register_balancer_rejects_duplicates_and_non_balancers() -> None:
    with pytest.raises(ConfigError, match="already registered"):
        BALANCERS.register("sum", PCGradBalancer)
    with pytest.raises(ConfigError, match="must be a Balancer subclass"):
        BALANCERS.register("not_a_balancer", dict)  # type: ignore[arg-type]


def test_setup_errors_name_the_culprit() -> None:
    model = two_task_model()
    with pytest.raises(ConfigError, match=r"forms names unknown task 'aa' \(did you mean 'a'\?\)"):
        UncertaintyBalancer(forms={"aa": "regression"}).setup(model.tasks)
    with pytest.raises(ConfigError, match=r"task 'a' has no metric 'accuracy'"):
        InverseMetricBalancer(metric="accuracy").setup(model.tasks)
    with pytest.raises(ConfigError, match=r"layer 'trunc' names no module .*did you mean 'trunk'"):
        GradNormBalancer(layer="trunc").setup(model.tasks)
    with pytest.raises(ConfigError, match=r"module 'trunk' has no '7'"):
        GradNormBalancer(layer="trunk.7").setup(model.tasks)


# ---------------------------------------------------------------------- sum


def test_sum_respects_task_weights() -> None:
    model = two_task_model(weights=(3.0, 0.5))
    X, Y = batch()
    seen: list[torch.Tensor] = []
    losses, _ = model.calculate_loss(X, Y)
    BALANCERS.build("sum").backward(losses, context(model, losses, seen.append))
    expected = 3.0 * losses["a"] + 0.5 * losses["b"]
    assert torch.allclose(seen[0], expected)


# ---------------------------------------------------------------------- uncertainty


@pytest.mark.parametrize("task_type", ["regression", "multiclass"])
def test_uncertainty_loss_formula(task_type: str) -> None:
    model = two_task_model(types=(task_type, "regression"))
    b = UncertaintyBalancer()
    b.setup(model.tasks)
    with torch.no_grad():
        b.log_vars[0].fill_(0.3)
        b.log_vars[1].fill_(-0.7)
    X, Y = batch()
    if task_type == "multiclass":
        Y["a"] = (Y["a"] > 1).long()
    losses, _ = model.calculate_loss(X, Y)
    seen: list[torch.Tensor] = []
    b.backward(losses, context(model, losses, seen.append))
    la, lb = losses["a"].item(), losses["b"].item()
    factor_a = 0.5 if task_type == "regression" else 1.0
    expected = factor_a * math.exp(-0.3) * la + 0.15 + 0.5 * math.exp(0.7) * lb - 0.35
    assert seen[0].item() == pytest.approx(expected, rel=1e-6)
    # d/ds of ½e^{-s}L + ½s is -½e^{-s}L + ½ (regression form)
    seen[0].backward()
    assert b.log_vars.grad[1].item() == pytest.approx(-0.5 * math.exp(0.7) * lb + 0.5, rel=1e-5)
    assert b.weights() == pytest.approx({"a": math.exp(-0.3), "b": math.exp(0.7)})


def test_uncertainty_forms_override_the_task_type() -> None:
    model = two_task_model()
    b = UncertaintyBalancer(forms={"a": "classification"})
    b.setup(model.tasks)
    X, Y = batch()
    losses, _ = model.calculate_loss(X, Y)
    seen: list[torch.Tensor] = []
    b.backward(losses, context(model, losses, seen.append))
    expected = losses["a"].item() + 0.5 * losses["b"].item()
    assert seen[0].item() == pytest.approx(expected, rel=1e-6)


def test_uncertainty_parameters_are_trained_logged_and_in_their_own_group() -> None:
    model = two_task_model()
    X, Y = batch(n=64)
    loaders = [
        DictDataLoader(DictDataset("d", s, X, {"a": Y["a"] * 10, "b": Y["b"]}), batch_size=16)
        for s in ("train", "valid")
    ]
    trainer = Trainer(n_epochs=3, balancer={"name": "uncertainty", "lr": 0.05}, progress_bar=False)
    trainer.fit(model, loaders)
    b = trainer.balancer
    assert isinstance(b, UncertaintyBalancer)
    s_a, s_b = (p.item() for p in b.log_vars)
    assert s_a > s_b  # the large-loss task learned a larger variance, i.e. a smaller weight
    group = trainer.optimizer.param_groups[-1]
    assert group["scope"] == "balancer" and group["lr"] == 0.05 and group["weight_decay"] == 0
    record = trainer.history[-1]
    assert record["model/all/train/weight/a"] == pytest.approx(math.exp(-s_a))
    assert record["model/all/train/weight/b"] == pytest.approx(math.exp(-s_b))


def test_uncertainty_setup_keeps_learned_values_and_adds_new_tasks() -> None:
    model = two_task_model()
    b = UncertaintyBalancer()
    b.setup({"a": model.tasks["a"]})
    with torch.no_grad():
        b.log_vars[0].fill_(1.5)
    b.setup(model.tasks)
    assert [p.item() for p in b.log_vars] == [1.5, 0.0]


# ---------------------------------------------------------------------- DWA


def test_dwa_weights_from_loss_histories() -> None:
    b = DWABalancer(temperature=2.0)
    b.on_epoch_end(0, {"a": 2.0, "b": 1.0, "c": 4.0})
    assert b.weights() == {"a": 1.0, "b": 1.0, "c": 1.0}  # one epoch: weights stay 1
    b.on_epoch_end(1, {"a": 1.0, "b": 0.9, "c": 4.0})
    r = {"a": 1.0 / 2.0, "b": 0.9 / 1.0, "c": 4.0 / 4.0}
    z = sum(math.exp(v / 2.0) for v in r.values())
    expected = {t: 3 * math.exp(v / 2.0) / z for t, v in r.items()}
    assert b.weights() == pytest.approx(expected)
    assert sum(b.weights().values()) == pytest.approx(3.0)
    b.on_epoch_end(2, {"a": 1.0, "b": 0.45, "c": 2.0})  # ratios of epochs 2 and 1 only
    r = {"a": 1.0, "b": 0.5, "c": 0.5}
    z = sum(math.exp(v / 2.0) for v in r.values())
    assert b.weights() == pytest.approx({t: 3 * math.exp(v / 2.0) / z for t, v in r.items()})


def test_dwa_backward_applies_weights_and_task_weights() -> None:
    model = two_task_model(weights=(2.0, 1.0))
    b = DWABalancer(temperature=1.0)
    b.on_epoch_end(0, {"a": 1.0, "b": 1.0})
    b.on_epoch_end(1, {"a": 1.0, "b": 0.5})
    w = b.weights()
    X, Y = batch()
    losses, _ = model.calculate_loss(X, Y)
    seen: list[torch.Tensor] = []
    b.backward(losses, context(model, losses, seen.append))
    expected = 2.0 * w["a"] * losses["a"] + w["b"] * losses["b"]
    assert torch.allclose(seen[0], expected)
    assert w["a"] > 1 > w["b"]  # the task whose loss fell slower gets more weight


# ---------------------------------------------------------------------- GradNorm


def test_gradnorm_update_matches_the_formula() -> None:
    b = GradNormBalancer(alpha=1.0, lr=0.1)
    b._initial = {"a": 1.0, "b": 1.0}
    # Equal learning pace (r_i = 1), G = (2, 1): Ḡ = 1.5, targets 1.5, ∇_w L_grad = (+2, -1).
    # Adam's first step moves each weight by lr against the sign: w = (0.9, 1.1), Σ = 2.
    b._update(["a", "b"], [1.0, 1.0], [2.0, 1.0], [1.0, 1.0])
    assert b.weights() == pytest.approx({"a": 0.9, "b": 1.1})
    # Equal gradient norms but task b learns slower (L̃ = (0.5, 1.0)): r = (2/3, 4/3),
    # targets Ḡ·r^α are (2/3, 4/3)·G: b's weight must go up.
    b2 = GradNormBalancer(alpha=1.0, lr=0.1)
    b2._initial = {"a": 1.0, "b": 1.0}
    b2._update(["a", "b"], [1.0, 1.0], [1.0, 1.0], [0.5, 1.0])
    w = b2.weights()
    assert w["b"] > 1 > w["a"] and w["a"] + w["b"] == pytest.approx(2.0)


def test_gradnorm_lowers_the_weight_of_the_task_with_larger_gradients() -> None:
    model = two_task_model()
    with torch.no_grad():
        model.module_pool["a_head"].weight.mul_(20)  # task a's gradients on the trunk dominate
    b = GradNormBalancer(alpha=1.5, lr=0.05)
    b.setup(model.tasks)
    for _ in range(5):
        run_step(model, b)
        model.zero_grad(set_to_none=True)
    w = b.weights()
    assert w["a"] < 1 < w["b"]
    assert w["a"] + w["b"] == pytest.approx(2.0)


def test_gradnorm_uses_the_last_shared_layer() -> None:
    model = two_task_model()
    b = GradNormBalancer()
    b.setup(model.tasks)
    run_step(model, b)
    ((_, layer),) = b._layers.items()
    last = model.module_pool["trunk"][2]
    assert [id(p) for p in layer] == [id(last.weight), id(last.bias)]
    b2 = GradNormBalancer(layer="trunk.0")
    b2.setup(model.tasks)
    run_step(model, b2)
    ((_, layer),) = b2._layers.items()
    assert [id(p) for p in layer] == [id(p) for p in model.module_pool["trunk"][0].parameters()]


def test_gradnorm_model_gradient_is_the_weighted_sum() -> None:
    model = two_task_model()
    b = GradNormBalancer()
    b.setup(model.tasks)
    b._w = {"a": 0.5, "b": 1.5}
    X, Y = batch()
    losses, _ = model.calculate_loss(X, Y)
    seen: list[torch.Tensor] = []
    b.backward(losses, context(model, losses, lambda loss: seen.append(loss.detach())))
    assert torch.allclose(seen[0], 0.5 * losses["a"] + 1.5 * losses["b"])
    assert b._initial == pytest.approx({t: v.item() for t, v in losses.items()})


# ---------------------------------------------------------------------- inverse metric


def test_inverse_metric_weights_higher_and_lower_is_better() -> None:
    model = two_task_model(types=("multiclass", "regression"))
    b = InverseMetricBalancer(metric={"a": "accuracy", "b": "mse"}, eps=0.01)
    b.setup(model.tasks)
    b.on_evaluation(
        {
            "a/d1/valid/accuracy": 0.9,
            "a/d2/valid/accuracy": 0.7,  # two datasets of the split: averaged, 0.8
            "a/d1/train/accuracy": 0.1,  # other splits are ignored
            "b/d1/valid/mse": 0.5,
            "b/d1/valid/r2": 0.2,
        }
    )
    raw = {"a": 1 / 0.8, "b": 0.5}
    z = sum(raw.values())
    assert b.weights() == pytest.approx({t: 2 * v / z for t, v in raw.items()})
    b.on_evaluation({"a/d1/valid/accuracy": 0.0, "b/d1/valid/mse": 0.0})  # clipped at eps
    assert b.weights() == pytest.approx({"a": 2 * 100 / 100.01, "b": 2 * 0.01 / 100.01})


def test_inverse_metric_default_metric_per_task() -> None:
    model = two_task_model(types=("multiclass", "regression"))
    b = InverseMetricBalancer()
    b.setup(model.tasks)
    assert b._metric == {"a": "accuracy", "b": "r2"}  # r2 has no unit, mse does
    assert b._higher == {"a": True, "b": True}
    b.on_evaluation({"a/d/valid/accuracy": 0.5, "b/d/valid/r2": 0.25, "b/d/valid/mse": 9.0})
    assert b.weights() == pytest.approx({"a": 2 * 2 / 6, "b": 2 * 4 / 6})


def test_inverse_metric_applies_weights_between_evaluations() -> None:
    model = two_task_model(types=("multiclass", "regression"))
    b = InverseMetricBalancer()
    b.setup(model.tasks)
    X, Y = batch()
    Y["a"] = (Y["a"] > 1).long()
    losses, _ = model.calculate_loss(X, Y)
    seen: list[torch.Tensor] = []
    b.backward(losses, context(model, losses, seen.append))
    assert torch.allclose(seen[0], losses["a"] + losses["b"])  # weights 1 before evaluations
    b.on_evaluation({"a/d/valid/accuracy": 0.5, "b/d/valid/r2": 0.25})
    b.backward(losses, context(model, losses, seen.append))
    assert torch.allclose(seen[1], 2 / 3 * losses["a"] + 4 / 3 * losses["b"])


def test_inverse_metric_updates_at_each_trainer_evaluation() -> None:
    model = two_task_model(types=("multiclass", "regression"))
    X, Y = batch(n=64)
    Y["a"] = (Y["a"] > 1).long()
    loaders = [DictDataLoader(DictDataset("d", s, X, Y), batch_size=16) for s in ("train", "valid")]
    trainer = Trainer(n_epochs=2, balancer="inverse_metric", progress_bar=False)
    trainer.fit(model, loaders)
    first, last = trainer.history
    acc, r2 = first["a/d/valid/accuracy"], first["b/d/valid/r2"]
    raw = {"a": 1 / max(acc, 0.01), "b": 1 / max(r2, 0.01)}
    z = sum(raw.values())
    # weights logged at an evaluation are those set by the previous one
    assert last["model/all/train/weight/a"] == pytest.approx(2 * raw["a"] / z)
    assert last["model/all/train/weight/b"] == pytest.approx(2 * raw["b"] / z)


# ---------------------------------------------------------------------- PCGrad


def pcgrad_direct(g: np.ndarray, orders: list[list[int]]) -> np.ndarray:
    """PCGrad on explicit vectors, projecting in the given orders (the paper's loop)."""
    out = np.zeros(g.shape[1])
    for i, order in enumerate(orders):
        gi = g[i].copy()
        for j in order:
            if j != i and gi @ g[j] < 0:
                gi = gi - (gi @ g[j]) / (g[j] @ g[j]) * g[j]
        out += gi
    return out


def test_pcgrad_projects_two_conflicting_gradients() -> None:
    g = np.array([[1.0, 0.0], [-1.0, 1.0]])
    # g1' = g1 - (g1·g2/|g2|²) g2 = (1,0) + ½(-1,1) = (½,½); g2' = g2 - (g2·g1/|g1|²) g1 = (0,1)
    d = PCGradBalancer().combine(g @ g.T) @ g
    assert np.allclose(d, [0.5, 1.5])
    projected = np.array([[0.5, 0.5], [0.0, 1.0]])
    assert np.allclose(projected[0] @ g[1], 0) and np.allclose(projected[1] @ g[0], 0)


def test_pcgrad_leaves_agreeing_gradients_alone() -> None:
    g = np.array([[1.0, 0.2], [0.5, 1.0]])
    assert np.allclose(PCGradBalancer().combine(g @ g.T), [1.0, 1.0])


def test_pcgrad_matches_the_vector_algorithm_with_random_order() -> None:
    rng = np.random.default_rng(0)
    g = rng.standard_normal((4, 6))
    b = PCGradBalancer(seed=7)
    gen = torch.Generator().manual_seed(7)  # the order protocol: one permutation per task
    orders = [torch.randperm(4, generator=gen).tolist() for _ in range(4)]
    assert np.allclose(b.combine(g @ g.T) @ g, pcgrad_direct(g, orders))


def test_pcgrad_uses_its_own_generator_not_the_global_one() -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    g = np.random.default_rng(1).standard_normal((3, 4))
    PCGradBalancer().combine(g @ g.T)
    assert torch.equal(before, torch.random.get_rng_state())


# ---------------------------------------------------------------------- MGDA


def test_mgda_two_task_closed_form() -> None:
    g1, g2 = np.array([1.0, 0.0]), np.array([-0.5, 2.0])
    alpha1 = float(np.clip(((g2 - g1) @ g2) / ((g1 - g2) @ (g1 - g2)), 0, 1))
    g = np.stack([g1, g2])
    alpha = MGDABalancer(rescale=False).combine(g @ g.T)
    assert alpha == pytest.approx([alpha1, 1 - alpha1])
    assert MGDABalancer().combine(g @ g.T) == pytest.approx([2 * alpha1, 2 * (1 - alpha1)])
    # one gradient inside the other's half-space: the smaller one is the min-norm point
    g = np.array([[3.0, 0.0], [1.0, 0.0]])
    assert MGDABalancer(rescale=False).combine(g @ g.T) == pytest.approx([0.0, 1.0])


@settings(max_examples=60, deadline=None)
@given(
    arrays(
        np.float64,
        st.tuples(st.integers(2, 5), st.integers(2, 6)),
        elements=st.floats(-10, 10, allow_nan=False, width=32),
    )
)
def test_mgda_direction_decreases_every_loss(g: np.ndarray) -> None:
    gram = g @ g.T
    alpha = MGDABalancer(rescale=False, max_iter=2000).combine(gram)
    assert alpha.min() >= 0 and alpha.sum() == pytest.approx(1.0)
    d = alpha @ g
    scale = max(float(np.abs(gram).max()), 1e-12)
    # min-norm point u of the hull: g_i·u >= |u|² >= 0 for every task (first-order decrease)
    assert (g @ d >= d @ d - 1e-3 * scale).all()
    assert (g @ d >= -1e-3 * scale).all()


def test_mgda_frank_wolfe_reaches_the_min_norm_point() -> None:
    rng = np.random.default_rng(3)
    g = rng.standard_normal((3, 4))
    gram = g @ g.T
    alpha = MGDABalancer(rescale=False).combine(gram)
    res = optimize.minimize(
        lambda a: a @ gram @ a,
        np.full(3, 1 / 3),
        bounds=[(0, 1)] * 3,
        constraints=[{"type": "eq", "fun": lambda a: a.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-14},
    )
    assert alpha @ gram @ alpha == pytest.approx(res.fun, rel=1e-4, abs=1e-9)


# ---------------------------------------------------------------------- CAGrad


def cagrad_objective(w: np.ndarray, g: np.ndarray, c: float) -> float:
    g0 = g.mean(axis=0)
    gw = w @ g
    return float(gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw))


def test_cagrad_with_c_zero_is_the_mean() -> None:
    g = np.array([[1.0, 0.0], [-3.0, 1.0], [0.5, 0.5]])
    assert CAGradBalancer(c=0.0).combine(g @ g.T) == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("c", [0.2, 0.5, 0.9])
def test_cagrad_two_tasks_against_a_dense_search(c: float) -> None:
    g = np.array([[1.0, 0.0], [-0.8, 0.6]])
    b = CAGradBalancer(c=c, rescale=False)
    w = b.solve(g @ g.T, c * float(np.linalg.norm(g.mean(axis=0))))
    grid = np.linspace(0, 1, 100001)
    gw = np.outer(grid, g[0]) + np.outer(1 - grid, g[1])  # g_w for every grid point
    g0 = g.mean(axis=0)
    values = gw @ g0 + c * np.linalg.norm(g0) * np.linalg.norm(gw, axis=1)
    best = grid[int(np.argmin(values))]
    assert cagrad_objective(np.array([best, 1 - best]), g, c) == pytest.approx(values.min())
    assert w[0] == pytest.approx(best, abs=2e-5)
    # d = g0 + (√φ/|g_w|) g_w lies on the sphere |d - g0| = c|g0| ...
    g0 = g.mean(axis=0)
    d = b.combine(g @ g.T) @ g
    assert np.linalg.norm(d - g0) == pytest.approx(c * np.linalg.norm(g0))
    # ... and helps the worst task at least as much as the average gradient does
    assert (g @ d).min() >= (g @ g0).min() - 1e-12
    rescaled = CAGradBalancer(c=c).combine(g @ g.T) @ g
    assert np.allclose(rescaled, d / (1 + c * c))


def test_cagrad_many_tasks_against_scipy() -> None:
    rng = np.random.default_rng(5)
    g = rng.standard_normal((4, 5))
    g[1] = -0.8 * g[0] + 0.1 * rng.standard_normal(5)  # a strong conflict
    c = 0.5
    b = CAGradBalancer(c=c, rescale=False, max_iter=1000)
    w = b.solve(g @ g.T, c * float(np.linalg.norm(g.mean(axis=0))))
    res = optimize.minimize(
        lambda x: cagrad_objective(x, g, c),
        np.full(4, 0.25),
        bounds=[(0, 1)] * 4,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 1000},
    )
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert cagrad_objective(w, g, c) <= res.fun + 1e-6


# ---------------------------------------------------------------------- gradient plumbing


def reference_direction(name: str, g: np.ndarray) -> np.ndarray:
    if name == "pcgrad":
        return pcgrad_direct(g, [[1 - i] for i in range(2)])
    if name == "mgda":
        a = float(np.clip(((g[1] - g[0]) @ g[1]) / ((g[0] - g[1]) @ (g[0] - g[1])), 0, 1))
        return 2 * (a * g[0] + (1 - a) * g[1])
    assert name == "cagrad"
    return g.mean(axis=0)  # c = 0


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_split_shared_and_task_only_parameters(name: str) -> None:
    model = two_task_model(weights=(2.0, 1.0))
    trunk = list(model.module_pool["trunk"].parameters())
    per_task = per_task_grads(model, {"a": trunk, "b": trunk})
    heads = {t: list(model.module_pool[f"{t}_head"].parameters()) for t in ("a", "b")}
    own = per_task_grads(model, heads)
    b = BALANCERS.build({"name": name, "c": 0.0} if name == "cagrad" else name)
    b.setup(model.tasks)
    run_step(model, b)
    g = torch.stack([per_task["a"], per_task["b"]]).double().numpy()
    expected = reference_direction(name, g)
    assert np.allclose(flat_grads(trunk).double().numpy(), expected, rtol=1e-5, atol=1e-6)
    # heads: their own task's gradient, including Task.weight, untouched by the combination
    assert torch.allclose(flat_grads(heads["a"]), own["a"])
    assert torch.allclose(flat_grads(heads["b"]), own["b"])


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_gradient_methods_equal_sum_without_conflict(name: str) -> None:
    """Two copies of one task never conflict: PCGrad leaves them alone (sum), MGDA gives the
    common gradient (rescaled to the sum), CAGrad the common gradient scaled by (1+c)/(1+c²)."""
    model = two_task_model()
    X, Y = batch()
    Y["b"] = Y["a"]
    with torch.no_grad():
        model.module_pool["b_head"].load_state_dict(model.module_pool["a_head"].state_dict())
    reference = copy.deepcopy(model)
    losses, _ = reference.calculate_loss(X, Y)
    (losses["a"] + losses["b"]).backward()
    losses, _ = model.calculate_loss(X, Y)
    b = BALANCERS.build(name)
    b.setup(model.tasks)
    b.backward(losses, context(model, losses))
    # CAGrad: g_0 = g_w = g, so d = (g + c·g)/(1 + c²) with the default c = 0.4
    factor = 0.5 * 1.4 / (1 + 0.4**2) if name == "cagrad" else 1.0
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        if p in set(model.module_pool["trunk"].parameters()):
            assert torch.allclose(p.grad, factor * q.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", [*GRADIENT_METHODS, "gradnorm"])
def test_one_task_step_uses_the_plain_gradient_and_says_so_once(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    model = two_task_model(weights=(3.0, 1.0))
    reference = copy.deepcopy(model)
    X, Y = batch()
    losses, _ = reference.calculate_loss(X, {"a": Y["a"]})
    (3.0 * losses["a"]).backward()
    b = BALANCERS.build(name)
    b.setup(model.tasks)
    with caplog.at_level(logging.WARNING, logger="mtlgraph.balancing"):
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            losses, _ = model.calculate_loss(X, {"a": Y["a"]})
            b.backward(losses, context(model, losses))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad)
    said = [r for r in caplog.records if "holds only task 'a'" in r.getMessage()]
    assert len(said) == 1 and name in said[0].getMessage()
    other = BALANCERS.build(name)  # once per balancer instance
    other.setup(model.tasks)
    with caplog.at_level(logging.WARNING, logger="mtlgraph.balancing"):
        losses, _ = model.calculate_loss(X, {"a": Y["a"]})
        other.backward(losses, context(model, losses))
    assert len([r for r in caplog.records if "holds only task" in r.getMessage()]) == 2


def test_gradient_methods_skip_frozen_parameters() -> None:
    model = two_task_model()
    first = model.module_pool["trunk"][0]
    for p in first.parameters():
        p.requires_grad_(False)
    b = BALANCERS.build("pcgrad")
    b.setup(model.tasks)
    run_step(model, b)
    assert all(p.grad is None for p in first.parameters())
    assert all(p.grad is not None for p in model.module_pool["trunk"][2].parameters())


def test_gradient_methods_accumulate_into_existing_gradients() -> None:
    model = two_task_model()
    b = BALANCERS.build("mgda")
    b.setup(model.tasks)
    run_step(model, b)
    once = [p.grad.clone() for p in model.parameters()]
    run_step(model, b)
    for p, g in zip(model.parameters(), once, strict=True):
        assert torch.allclose(p.grad, 2 * g)


# ---------------------------------------------------------------------- state round trip


def trained_balancer(name: str) -> tuple[MultitaskClassifier, Balancer]:
    model = two_task_model(types=("multiclass", "regression"))
    X, Y = batch(n=64)
    Y["a"] = (Y["a"] > 1).long()
    loaders = [DictDataLoader(DictDataset("d", s, X, Y), batch_size=16) for s in ("train", "valid")]
    trainer = Trainer(n_epochs=3, balancer=name, progress_bar=False)
    trainer.fit(model, loaders)
    return model, trainer.balancer


def reload(name: str, balancer: Balancer, model: MultitaskClassifier) -> Balancer:
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    fresh = BALANCERS.build(name)
    fresh.setup(model.tasks)
    fresh.load_state_dict(state)
    return fresh


def same_state(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, Mapping):
        return (
            isinstance(b, Mapping)
            and a.keys() == b.keys()
            and all(same_state(a[k], b[k]) for k in a)
        )
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b, strict=True))  # type: ignore[arg-type]
    return a == b


def assert_next_steps_agree(
    model: MultitaskClassifier,
    balancer: Balancer,
    fresh: Balancer,
    step: Callable[[MultitaskClassifier, Balancer, dict, dict], object] | None = None,
    epoch_end: bool = False,
) -> dict[str, float]:
    """The same three next steps from ``balancer`` and its reload ``fresh``, each on a copy of
    ``model`` (``step(model, balancer, X, Y)``, default: its ``backward`` on the losses; with
    ``epoch_end``, then an epoch end), give identical gradients, weights and state; returns the
    weights."""
    X, Y = batch(seed=9)
    Y["a"] = (Y["a"] > 1).long()
    results = []
    for b in (balancer, fresh):
        m = copy.deepcopy(model)
        grads = []
        for _ in range(3):
            m.zero_grad(set_to_none=True)
            b.zero_grad(set_to_none=True)
            if step is None:
                losses, _ = m.calculate_loss(X, Y)
                b.backward(losses, context(m, losses))
            else:
                step(m, b, X, Y)
            grads += [p.grad.clone() for p in m.parameters()]
            grads += [p.grad.clone() for p in b.parameters() if p.grad is not None]
        if epoch_end:
            b.on_epoch_end(5, {"a": 0.3, "b": 0.2})
        results.append((grads, b.weights(), b.state_dict()))
    (g1, w1, s1), (g2, w2, s2) = results
    assert len(g1) == len(g2) and all(torch.equal(x, y) for x, y in zip(g1, g2, strict=True))
    assert w1 == w2 and same_state(s1, s2)
    return w1


@pytest.mark.parametrize("name", ALL)
def test_state_round_trips_and_resume_is_bit_exact(name: str) -> None:
    model, balancer = trained_balancer(name)
    fresh = reload(name, balancer, model)
    assert same_state(balancer.state_dict(), fresh.state_dict())
    assert fresh.weights() == balancer.weights()
    assert_next_steps_agree(model, balancer, fresh, epoch_end=True)


def test_state_holds_histories_and_initial_losses() -> None:
    _, dwa = trained_balancer("dwa")
    extra = dwa.state_dict()["_extra_state"]
    assert set(extra["history"]) == {"a", "b"} and all(
        len(h) == 2 for h in extra["history"].values()
    )
    _, gradnorm = trained_balancer("gradnorm")
    extra = gradnorm.state_dict()["_extra_state"]
    assert set(extra["initial_losses"]) == {"a", "b"} and set(extra["adam"]) == {"a", "b"}
    _, pcgrad = trained_balancer("pcgrad")
    assert pcgrad.state_dict()["_extra_state"]["generator"].dtype == torch.uint8


def test_uncertainty_state_rejects_other_tasks() -> None:
    model, balancer = trained_balancer("uncertainty")
    fresh = UncertaintyBalancer()
    fresh.setup({"b": model.tasks["b"], "a": model.tasks["a"]})
    with pytest.raises(ConfigError, match="holds tasks"):
        fresh.load_state_dict(balancer.state_dict())
