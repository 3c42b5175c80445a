"""How task gradients are taken: batched rows (one vmapped backward pass) against one pass per
task, the fallback where PyTorch refuses to batch, and ``gradients="gram"`` (the Gram matrix a
chunk of parameters at a time, then one weighted backward pass) against the rows path."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_balancing import (
    assert_next_steps_agree,
    context,
    reload,
    same_state,
    trained_balancer,
)
from torch import nn

from mtlgraph import ConfigError, MultitaskClassifier, Operation, Task
from mtlgraph.balancing import BALANCERS, GradientBalancer
from mtlgraph.gradients import SharedGradients, SharedLayout, gram_chunks, gramian, vmap_refused
from mtlgraph.graph.experts import Experts, Gate

# ---------------------------------------------------------------------- models


def chain_task(name: str, chain: list[str], pool: dict[str, nn.Module], out: int = 1) -> Task:
    """A regression task (``out`` = 1) or a classifier over ``out`` classes running ``chain``."""
    ops = [Operation(chain[0], [("_input_", "x")])]
    ops += [Operation(m, [prev]) for prev, m in itertools.pairwise(chain)]
    kind = "regression" if out == 1 else "multiclass"
    return Task(name, {m: pool[m] for m in chain}, ops, task_type=kind)


def mlp_model() -> MultitaskClassifier:
    """Three tasks on an MLP trunk; ``c`` skips the shared neck; ``d`` reads no shared module."""
    torch.manual_seed(0)
    pool = {
        "trunk": nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 8)),
        "neck": nn.Sequential(nn.Linear(8, 8), nn.ReLU()),
        "solo": nn.Linear(6, 3),
        **{f"{t}_head": nn.Linear(8, 1) for t in "abc"},
        "d_head": nn.Linear(3, 3),
    }
    return MultitaskClassifier(
        [
            chain_task("a", ["trunk", "neck", "a_head"], pool),
            chain_task("b", ["trunk", "neck", "b_head"], pool),
            chain_task("c", ["trunk", "c_head"], pool),
            chain_task("d", ["solo", "d_head"], pool, out=3),
        ]
    )


class Unflatten(nn.Module):
    """16 features -> a 3×4×4 image (the same plane three times)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(-1, 1, 4, 4).expand(-1, 3, 4, 4).contiguous()


def conv_model() -> MultitaskClassifier:
    """Three tasks on a small conv trunk (input ``x``: 6 features made into 3×4×4 images)."""
    torch.manual_seed(1)
    pool = {
        "image": nn.Sequential(nn.Linear(6, 16), Unflatten()),
        "conv": nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.GroupNorm(2, 4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, stride=2),
            nn.Flatten(),
        ),
        **{f"{t}_head": nn.Linear(4, 2 if t == "a" else 1) for t in "abc"},
    }
    return MultitaskClassifier(
        [
            chain_task("a", ["image", "conv", "a_head"], pool, out=2),
            chain_task("b", ["image", "conv", "b_head"], pool),
            chain_task("c", ["image", "conv", "c_head"], pool),
        ]
    )


def mmoe_model(kind: str = "softmax") -> MultitaskClassifier:
    """MMoE: shared experts, one gate and head per task (``kind``: the gates' kind)."""
    torch.manual_seed(2)
    experts = Experts(in_dim=6, n_experts=4, hidden=[8, 5])
    tasks = []
    for t in "abc":
        pool = {
            "experts": experts,
            f"{t}_gate": Gate(6, 4, kind=kind),
            f"{t}_head": nn.Linear(5, 1),
        }
        ops = [
            Operation("experts", [("_input_", "x")]),
            Operation(f"{t}_gate", [("_input_", "x"), "experts"]),
            Operation(f"{t}_head", [f"{t}_gate"]),
        ]
        tasks.append(Task(t, pool, ops, task_type="regression"))
    return MultitaskClassifier(tasks)


def labels(model: MultitaskClassifier, seed: int = 3, n: int = 12) -> tuple[dict, dict]:
    """Inputs ``x`` and a label per task (regression targets, or classes 0..2 of a classifier)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = {}
    for i, t in enumerate(sorted(model.tasks)):
        target = x[:, i] * 2 - x[:, 5]
        classify = model.tasks[t].task_type == "multiclass"
        y[t] = (target > 0).long() + (target > 1).long() * (t == "d") if classify else target
    return {"x": x}, y


MODELS: dict[str, Callable[[], MultitaskClassifier]] = {
    "mlp": mlp_model,
    "conv": conv_model,
    "mmoe": mmoe_model,
    "mmoe_dselect": lambda: mmoe_model("dselect_k"),
}


def rows_and_own(
    model: MultitaskClassifier, batched: bool | None, tasks_per_pass: int = 0
) -> tuple[torch.Tensor, SharedLayout, list[torch.Tensor]]:
    """The shared rows (``batched``: the layout's verdict before the step) and task-only grads."""
    model.zero_grad(set_to_none=True)
    X, Y = labels(model)
    losses, _ = model.calculate_loss(X, Y)
    layout = SharedGradients(tasks_per_pass).layout(model.tasks, model.plan(losses))
    layout.batched = batched
    rows = SharedGradients.compute(layout, losses, accumulate_own=True).clone()
    own = [p.grad.clone() for t in losses for p in layout.own[t]]
    return rows, layout, own


# ---------------------------------------------------------------------- batched rows


@pytest.mark.parametrize("name", list(MODELS))
def test_batched_rows_equal_one_pass_per_task(name: str) -> None:
    model = MODELS[name]()
    per_task, _, own_ref = rows_and_own(model, batched=False)
    rows, layout, own = rows_and_own(model, batched=None)
    assert layout.batched is True  # the trial succeeded and is remembered for the plan
    assert rows.shape == (len(model.tasks), layout.size) and layout.size > 0
    assert (rows - per_task).abs().max().item() <= 1e-6
    assert rows.abs().max().item() > 1e-3  # not trivially equal
    assert all(torch.allclose(a, b, atol=1e-6, rtol=0) for a, b in zip(own, own_ref, strict=True))
    again, _, _ = rows_and_own(model, batched=True)  # the remembered verdict: no retained trial
    assert torch.equal(again, rows)


def test_the_default_batches_off_the_cpu_only() -> None:
    model = conv_model()
    X, Y = labels(model)
    losses, _ = model.calculate_loss(X, Y)
    layout = SharedGradients().layout(model.tasks, model.plan(losses))
    SharedGradients.compute(layout, losses)
    assert layout.tasks_per_pass is None and layout.batched is None  # CPU: never tried


def test_batched_passes_of_fewer_tasks_give_the_same_rows() -> None:
    model = conv_model()  # three tasks: passes of two tasks, then one
    per_task, _, _ = rows_and_own(model, batched=False)
    for width in (1, 2, 3):
        rows, layout, _ = rows_and_own(model, batched=None, tasks_per_pass=width)
        assert layout.batched is (None if width == 1 else True)  # 1: never tried
        assert (rows - per_task).abs().max().item() <= 1e-6


def test_rows_of_tasks_that_skip_shared_parameters_are_zero_there() -> None:
    model = mlp_model()
    rows, layout, _ = rows_and_own(model, batched=None)
    columns = {m: (start, stop) for m, start, stop in layout.modules}
    assert set(columns) == {"trunk", "neck"}  # "solo" is d's alone
    order = list(layout.task_names)
    start, stop = columns["neck"]
    assert rows[order.index("c"), start:stop].abs().max() == 0  # c does not read the neck
    assert rows[order.index("d")].abs().max() == 0  # d reads no shared parameter
    assert rows[order.index("c"), : columns["trunk"][1]].abs().max() > 0


class ItemInBackward(torch.autograd.Function):
    """Identity whose backward reads a Python number (``.item()``), which vmap refuses."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad * (1.0 if grad.abs().sum().item() >= 0 else 0.0)


class Through(nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn.apply(x)


def refusing_model(fn: Any) -> MultitaskClassifier:
    torch.manual_seed(4)
    pool = {
        "trunk": nn.Sequential(nn.Linear(6, 8), Through(fn), nn.Tanh(), nn.Linear(8, 8)),
        **{f"{t}_head": nn.Linear(8, 1) for t in "abc"},
    }
    return MultitaskClassifier([chain_task(t, ["trunk", f"{t}_head"], pool) for t in "abc"])


def test_a_backward_vmap_refuses_falls_back_to_one_pass_per_task(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = refusing_model(ItemInBackward)
    per_task, _, own_ref = rows_and_own(model, batched=False)
    with caplog.at_level("INFO", logger="mtlgraph.gradients"):
        rows, layout, own = rows_and_own(model, batched=None)
    assert layout.batched is False  # decided once for the plan
    assert torch.equal(rows, per_task)
    assert all(torch.equal(a, b) for a, b in zip(own, own_ref, strict=True))
    assert "cannot batch their backward pass (Batching rule not implemented" in caplog.text


class SometimesItem(torch.autograd.Function):
    """Identity whose backward reads ``.item()`` only once ``refuse`` is set."""

    refuse = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if SometimesItem.refuse:
            grad.sum().item()
        return grad


def test_a_refusal_after_a_batched_first_step_propagates_with_the_way_out() -> None:
    model = refusing_model(SometimesItem)
    X, Y = labels(model)
    grads = SharedGradients(0)
    losses, _ = model.calculate_loss(X, Y)
    layout = grads.layout(model.tasks, model.plan(losses))
    SharedGradients.compute(layout, losses)
    assert layout.batched is True
    SometimesItem.refuse = True
    try:
        losses, _ = model.calculate_loss(X, Y)
        with pytest.raises(RuntimeError, match="Batching rule not implemented") as info:
            SharedGradients.compute(layout, losses)
    finally:
        SometimesItem.refuse = False
    assert "which worked on this plan's first step" in "".join(info.value.__notes__)
    assert "tasks_per_pass = 1" in "".join(info.value.__notes__)
    assert layout.batched is True  # not silently switched


class Broken(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        raise ValueError("broken backward of a user function")


def test_other_errors_in_the_batched_pass_propagate_unchanged() -> None:
    model = refusing_model(Broken)
    with pytest.raises(ValueError, match="broken backward of a user function"):
        rows_and_own(model, batched=None)
    assert not vmap_refused(ValueError("vmap")) and not vmap_refused(RuntimeError("oom"))


# ---------------------------------------------------------------------- Gram


def test_gramian_in_chunks_equals_the_rows_gram_and_allocates_no_rows() -> None:
    model = conv_model()
    rows, _, _ = rows_and_own(model, batched=False)
    expected = (rows @ rows.T).double()
    X, Y = labels(model)
    for max_values, width in ((1, 0), (100, 2), (1 << 24, 0), (1 << 24, 1)):
        # one parameter a chunk, a few (passes of two tasks), all at once (one pass per task)
        losses, _ = model.calculate_loss(X, Y)
        layout = SharedGradients(width).layout(model.tasks, model.plan(losses))
        m = gramian(layout, list(losses.values()), max_values)
        assert torch.allclose(m, expected, rtol=1e-6, atol=1e-7)
        assert layout._buffer is None  # no K × P rows were allocated
    params = [nn.Parameter(torch.zeros(n)) for n in (5, 3, 40, 2, 2)]
    assert gram_chunks(params, 2, 20) == [slice(0, 2), slice(2, 3), slice(3, 5)]


GRAM_METHODS: list[dict[str, Any]] = [
    {"name": "mgda"},
    {"name": "mgda", "rescale": False},
    {"name": "cagrad"},
    {"name": "pcgrad", "seed": 3},
    {"name": "imtl"},
    {"name": "imtl", "loss_scaling": True},
    {"name": "aligned_mtl"},
    {"name": "upgrad"},
    {"name": "nash_mtl", "update_weights_every": 2},
    {"name": "gradvac"},
    {"name": "fairgrad", "alpha": 2.0},
    {"name": "sdmgrad"},
]


def gram_capable_names() -> set[str]:
    """Every registered gradient balancer whose default build runs in gram mode."""
    names = set()
    for name in BALANCERS.names():
        cls = BALANCERS.get(name)
        if isinstance(cls, type) and issubclass(cls, GradientBalancer) and not cls().rows_needed():
            names.add(name)
    return names


def test_the_gram_capable_methods_are_all_tested() -> None:
    assert gram_capable_names() == {spec["name"] for spec in GRAM_METHODS}


def train_steps(
    model: MultitaskClassifier, balancer: GradientBalancer, steps: int = 3
) -> list[list[torch.Tensor]]:
    """Gradients of ``steps`` SGD steps (each step's data differs)."""
    balancer.setup(model.tasks)
    opt = torch.optim.SGD([*model.parameters(), *balancer.parameters()], lr=0.05)
    out = []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        X, Y = labels(model, seed=10 + step)
        losses, _ = model.calculate_loss(X, Y)
        balancer.backward(losses, context(model, losses))
        out.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
        opt.step()
    return out


@pytest.mark.parametrize("spec", GRAM_METHODS, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("model_name", ["mlp", "conv"])
def test_gram_mode_updates_equal_the_rows_path(spec: dict, model_name: str) -> None:
    model = MODELS[model_name]()
    rows_balancer = BALANCERS.build(spec)
    gram_balancer = BALANCERS.build({**spec, "gradients": "gram"})
    gram_balancer.gram_values = 50  # several chunks
    gram_balancer.tasks_per_pass = 0  # batched (rows: one pass per task, the CPU's default)
    a = train_steps(copy.deepcopy(model), rows_balancer)
    b = train_steps(copy.deepcopy(model), gram_balancer)
    worst = max(
        (x - y).abs().max().item()
        for sa, sb in zip(a, b, strict=True)
        for x, y in zip(sa, sb, strict=True)
    )
    assert all(len(sa) == len(sb) for sa, sb in zip(a, b, strict=True))
    assert worst <= 1e-6, worst
    assert rows_balancer.weights() == pytest.approx(gram_balancer.weights(), rel=1e-6, abs=1e-6)


def test_gram_mode_reduces_chunks_and_the_direction_over_ranks() -> None:
    """Under DDP the Gram matrix is that of the rank-averaged rows (each Jacobian chunk is
    averaged before its product): ``reduce`` sees (K, chunk) blocks and the (P-sized) parts
    of ``d``, never a (K, P) block."""
    model = mlp_model()
    X, Y = labels(model)
    losses, _ = model.calculate_loss(X, Y)
    ctx = context(model, losses)
    seen: list[tuple[int, ...]] = []
    ctx.reduce = lambda t: (seen.append(tuple(t.shape)), t)[1]
    b = BALANCERS.build({"name": "mgda", "gradients": "gram"})
    b.gram_values = 4 * 130  # the trunk's 6×16 weight and its bias, then the rest
    b.setup(model.tasks)
    b.backward(losses, ctx)
    layout = b._grads.layout(model.tasks, ctx.plan)
    chunks = [s for s in seen if len(s) == 2 and s[0] == 4]
    assert sum(s[1] for s in chunks) == layout.size and len(chunks) > 1
    assert (4, layout.size) not in seen


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"name": "mgda", "gradients": "grams"},
            "balancer 'mgda': gradients must be 'parameters', 'representation' or 'gram', got "
            "'grams' \\(did you mean 'gram'\\?\\)",
        ),
        (
            {"name": "db_mtl", "gradients": "gram"},
            "gradients: gram does not fit: it averages each task's gradient row over steps",
        ),
        (
            {"name": "gradvac", "group": "module", "gradients": "gram"},
            "group: module splits the shared parameters' gradient rows by module; with "
            "gradients: gram use group: model",
        ),
    ],
)
def test_bad_gradients_argument_is_refused_with_the_fix(spec: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        BALANCERS.build(spec)


def test_a_bad_gradients_argument_is_reported_with_the_others() -> None:
    with pytest.raises(ConfigError) as info:
        BALANCERS.build({"name": "nash_mtl", "gradients": "grams", "max_norm": -1})
    problems = "\n".join(info.value.problems)
    assert "gradients must be 'parameters', 'representation' or 'gram', got 'grams'" in problems
    assert "max_norm" in problems


@pytest.mark.parametrize(
    "spec",
    [
        {"name": "nash_mtl", "gradients": "gram"},
        {"name": "pcgrad", "gradients": "gram"},
        {"name": "imtl", "loss_scaling": True, "gradients": "gram"},
    ],
    ids=lambda s: s["name"],
)
def test_gram_mode_resume_is_bit_exact(spec: dict) -> None:
    model, balancer = trained_balancer(spec)  # type: ignore[arg-type]
    assert isinstance(balancer, GradientBalancer) and balancer.gradients == "gram"
    fresh = reload(spec, balancer, model)  # type: ignore[arg-type]
    assert same_state(balancer.state_dict(), fresh.state_dict())
    w1 = assert_next_steps_agree(model, balancer, fresh)
    assert all(math.isfinite(v) for v in w1.values())


@pytest.mark.timeout(200)
def test_two_ranks_in_gram_mode_equal_one_process_on_the_whole_batch() -> None:
    """Each rank averages every Jacobian chunk before its Gram product, so its Gram matrix is
    that of the whole batch's rows: two ranks on halves give one process's update (the mean
    loss of equal halves is the whole batch's). Averaging each rank's Gram matrix instead would
    not: it holds the cross-rank terms ``g_i^r·g_j^s`` for ``r = s`` only."""
    import queue as queue_mod
    import socket

    import numpy as np
    import torch.multiprocessing as mp
    from ddp_gradient_modes import SPECS, ddp_worker, gradients

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [
        spawn.Process(target=ddp_worker, args=(r, 2, port, queue), daemon=True) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    items = []
    while len(items) < 2 * len(SPECS):
        try:
            items.append(queue.get(timeout=120))
        except queue_mod.Empty:
            break
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    by = {(i, rank): grads for i, rank, grads in items}
    for i, spec in enumerate(SPECS):
        one = gradients(spec, slice(0, 16), lambda t: t)
        for rank in (0, 1):
            worst = max(float(np.abs(a - b).max()) for a, b in zip(by[(i, rank)], one, strict=True))
            assert worst <= 1e-6, (spec, rank, worst)


@pytest.mark.timeout(200)
def test_two_ranks_train_identically_in_gram_mode() -> None:
    import queue as queue_mod
    import socket

    import numpy as np
    import torch.multiprocessing as mp
    from ddp_gradient_modes import trainer_worker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    spawn = mp.get_context("spawn")
    queue = spawn.Queue()
    procs = [
        spawn.Process(target=trainer_worker, args=(r, 2, port, queue), daemon=True) for r in (0, 1)
    ]
    for p in procs:
        p.start()
    items = []
    while len(items) < 2:
        try:
            items.append(queue.get(timeout=150))
        except queue_mod.Empty:
            break
    for p in procs:
        p.join(timeout=30)
    assert [p.exitcode for p in procs] == [0, 0]
    (_, s0, w0), (_, s1, w1) = sorted(items, key=lambda item: item[0])
    assert all(np.array_equal(s0[k], s1[k]) for k in s0)  # bit-identical
    assert all(np.isfinite(v).all() for v in s0.values())
    assert w0 == w1 and len(w0) == 2
