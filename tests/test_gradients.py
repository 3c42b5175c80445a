"""Per-task shared-module gradients (mtlgraph.gradients) and the per-plan caches built on them:
a model that gains or loses tasks gets layouts, layers and parameter names of its new plans."""

from __future__ import annotations

import gc
import itertools
import weakref

import pytest
import torch
from torch import nn

from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task
from mtlgraph.balancing import GradNormBalancer, MGDABalancer, StepContext
from mtlgraph.diagnostics import DiagnosticsConfig, InterferenceMonitor
from mtlgraph.gradients import PlanCache, SharedGradients, last_shared_layer, shared_modules


def _task(name: str, chain: list[str], pool: dict[str, nn.Module]) -> Task:
    """A regression task running the modules of ``chain`` in order on input ``x``."""
    ops = [Operation(chain[0], [("_input_", "x")])]
    ops += [Operation(m, [prev]) for prev, m in itertools.pairwise(chain)]
    return Task(name, {m: pool[m] for m in chain}, ops, task_type="regression")


@pytest.fixture
def pool() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "trunk": nn.Linear(3, 4),
        "neck": nn.Linear(4, 4),
        "head_a": nn.Linear(4, 1),
        "head_b": nn.Linear(4, 1),
        "solo": nn.Linear(3, 4),
    }


def _step(model: MultitaskClassifier, balancer: nn.Module) -> StepContext:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g)
    losses, _ = model.calculate_loss({"x": x}, {"a": x[:, 0], "b": -x[:, 1]})
    ctx = StepContext(
        tasks=model.tasks,
        plan=model.plan(losses),
        counts={t: 16 for t in losses},
        backward=lambda loss: loss.backward(),
        scale=lambda loss: loss,
        step=0,
    )
    balancer.backward(losses, ctx)
    return ctx


def test_plan_cache_is_per_plan_object_and_keeps_no_plan_alive(pool: dict) -> None:
    model = MultitaskClassifier([_task("a", ["trunk", "head_a"], pool)])
    cache = PlanCache[tuple[str, ...]]()
    built: list[tuple[str, ...]] = []

    def build(plan):  # type: ignore[no-untyped-def]
        built.append(plan.module_names)
        return plan.module_names

    first = model.plan(["a"])
    assert cache.get(first, build) == ("trunk", "head_a")
    assert cache.get(first, build) == ("trunk", "head_a") and len(built) == 1  # cached
    dead = weakref.ref(first)
    del first
    model.add_task(_task("b", ["trunk", "head_b"], pool))  # the model drops its old plans
    gc.collect()
    assert dead() is None  # the cache did not keep the old plan alive
    assert len(cache) == 0
    second = model.plan(["a", "b"])
    assert cache.get(second, build) == ("trunk", "head_a", "head_b") and len(built) == 2


def test_plan_cache_never_answers_for_another_plan_with_the_same_id(pool: dict) -> None:
    model = MultitaskClassifier([_task("a", ["trunk", "head_a"], pool)])
    other = MultitaskClassifier([_task("b", ["solo", "head_b"], pool)])
    cache = PlanCache[str]()
    old, new = other.plan(["b"]), model.plan(["a"])
    assert cache.get(old, lambda plan: "stale") == "stale"  # another plan's entry
    assert cache.get(new, lambda plan: "fresh") == "fresh"
    assert cache.get(new, lambda plan: "rebuilt") == "fresh"


def test_layout_follows_add_task_and_remove_task(pool: dict) -> None:
    model = MultitaskClassifier(
        [_task("a", ["trunk", "neck", "head_a"], pool), _task("b", ["trunk", "head_b"], pool)]
    )
    grads = SharedGradients()
    before = grads.layout(model.tasks, model.plan(["a", "b"]))
    assert [m for m, _, _ in before.modules] == ["trunk"] and before.size == 3 * 4 + 4
    model.remove_task("b")
    model.add_task(_task("b", ["solo", "neck", "head_b"], pool))  # now shares the neck only
    after = grads.layout(model.tasks, model.plan(["a", "b"]))
    assert [m for m, _, _ in after.modules] == ["neck"] and after.size == 4 * 4 + 4
    assert {id(p) for p in after.shared} == {id(p) for p in pool["neck"].parameters()}
    assert {id(p) for p in after.own["a"]} == {
        id(p) for m in ("trunk", "head_a") for p in pool[m].parameters()
    }
    assert shared_modules(model.plan(["a", "b"])) == ["neck"]


def test_gradient_balancer_uses_the_new_plans_layout(pool: dict) -> None:
    model = MultitaskClassifier(
        [_task("a", ["trunk", "neck", "head_a"], pool), _task("b", ["trunk", "head_b"], pool)]
    )
    balancer = MGDABalancer()
    _step(model, balancer)
    model.zero_grad(set_to_none=True)
    model.remove_task("b")
    model.add_task(_task("b", ["solo", "neck", "head_b"], pool))
    _step(model, balancer)
    # the combined direction on the neck equals β·(g_a, g_b) of the new plan's shared neck
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 3, generator=g)
    per_task = []
    for t, y in (("a", x[:, 0]), ("b", -x[:, 1])):
        losses, _ = model.calculate_loss({"x": x}, {t: y})
        per_task.append(
            torch.cat(
                [
                    v.reshape(-1)
                    for v in torch.autograd.grad(losses[t], [*pool["neck"].parameters()])
                ]
            )
        )
    stacked = torch.stack(per_task)
    beta = torch.tensor([balancer.weights()["a"], balancer.weights()["b"]])
    expected = beta @ stacked
    got = torch.cat([p.grad.reshape(-1) for p in pool["neck"].parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # the trunk is task a's alone now: it gets a's own, plain gradient
    losses, _ = model.calculate_loss({"x": x}, {"a": x[:, 0]})
    own = torch.autograd.grad(losses["a"], [pool["trunk"].weight])[0]
    torch.testing.assert_close(pool["trunk"].weight.grad, own, rtol=1e-5, atol=1e-6)


def test_gradnorm_layer_follows_add_task_and_remove_task(pool: dict) -> None:
    model = MultitaskClassifier(
        [_task("a", ["trunk", "neck", "head_a"], pool), _task("b", ["trunk", "head_b"], pool)]
    )
    balancer = GradNormBalancer()
    balancer.setup(model.tasks)
    ctx = _step(model, balancer)
    assert last_shared_layer(model.tasks, ctx.plan) == [pool["trunk"].weight, pool["trunk"].bias]
    model.remove_task("b")
    model.add_task(_task("b", ["solo", "neck", "head_b"], pool))
    balancer.setup(model.tasks)
    ctx = _step(model, balancer)
    ((plan, layer),) = balancer._layers.items()
    assert plan is ctx.plan
    assert layer == [pool["neck"].weight, pool["neck"].bias]


def test_monitor_probes_a_model_that_gained_and_lost_tasks(pool: dict) -> None:
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))

    def loader(task: str, sign: float) -> DictDataLoader:
        data = DictDataset(f"d_{task}", "train", {"x": x}, {task: sign * x[:, 0]})
        return DictDataLoader(data, batch_size=32)

    def tasks(trunk: str, names: tuple[str, str]) -> list[Task]:
        module = nn.Linear(2, 1, bias=False)
        return [
            Task(t, {trunk: module}, [Operation(trunk, [("_input_", "x")])], task_type="regression")
            for t in names
        ]

    model = MultitaskClassifier(tasks("trunk", ("up", "down")))
    monitor = InterferenceMonitor(DiagnosticsConfig(every=1))
    first = monitor.probe(model, [loader("up", 1.0), loader("down", -1.0)], lr=0.1, step=1)
    assert first["diagnostics/trunk/up~down/cosine"] < 0  # opposite targets conflict
    for task in tasks("trunk2", ("left", "right")):
        model.add_task(task)  # new parameters: names of the old model would not know them
    second = monitor.probe(model, [loader("left", 1.0), loader("right", -1.0)], lr=0.1, step=2)
    assert second["diagnostics/trunk2/left~right/cosine"] < 0
    assert second["diagnostics/affinity/left->right"] < 0  # a step on left hurts right
    model.remove_task("down")
    model.remove_task("up")
    # probe number 2 again: the same rows, and the weights have not moved
    third = monitor.probe(model, [loader("left", 1.0), loader("right", -1.0)], lr=0.1, step=2)
    assert third["diagnostics/affinity/left->right"] == pytest.approx(
        second["diagnostics/affinity/left->right"]
    )
    report = monitor.report()
    assert report.tasks == ("left", "right", "up", "down")  # removed tasks keep their sums, last
    assert report.pair("up", "down") is not None and report.pair("up", "down").probes == 1
    assert report.pair("left", "right").probes == 2  # type: ignore[union-attr]
