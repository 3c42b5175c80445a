"""TorchJD aggregators as balancers: built from dotted paths, classes and instances, checked
against mtlgraph's own implementations of the same methods, refused when they cannot resume."""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch

from mtlgraph import ConfigError, Trainer
from mtlgraph.balancing import BALANCERS
from mtlgraph.balancing.aggregators import AggregatorBalancer
from mtlgraph.registry import import_object

pytest.importorskip("torchjd")
pytest.importorskip("quadprog")
aggregation = pytest.importorskip("torchjd.aggregation")

from test_balancing import batch, context, two_task_model  # noqa: E402


def _rows(seed: int, k: int = 3, p: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, p, generator=g, dtype=torch.float64)
    rows[1] = -0.8 * rows[0] + 0.3 * rows[1]  # a conflict, so the methods do something
    return rows


def _exact_upgrad() -> object:
    """TorchJD's UPGrad without the regularisation of its default projector (``reg_eps`` and
    ``norm_eps`` of 1e-4 move its weights by about 1e-3 from the exact projection)."""
    from torchjd.linalg import QuadprogProjector

    return aggregation.UPGrad(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0))


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ("upgrad", "upgrad"),
        ({"type": "torchjd.aggregation.IMTLG"}, "imtl"),
        ({"type": "torchjd.aggregation.AlignedMTL"}, "aligned_mtl"),
        # TorchJD stops its Frank-Wolfe at epsilon 1e-3 by default: weights off by up to 0.03
        (
            {"type": "torchjd.aggregation.MGDA", "epsilon": 1e-12, "max_iters": 100_000},
            {"name": "mgda", "rescale": False},
        ),
    ],
    ids=["UPGrad", "IMTLG", "AlignedMTL", "MGDA"],
)
@pytest.mark.parametrize("k", [2, 3])
def test_aggregators_agree_with_our_implementations(theirs: object, ours: object, k: int) -> None:
    for seed in range(3):
        rows = _rows(seed, k)
        balancer = BALANCERS.build(_exact_upgrad() if theirs == "upgrad" else theirs)
        d_theirs, w_theirs = balancer.direction(rows, None)
        d_mine, w_mine = BALANCERS.build(ours).direction(rows, None)
        torch.testing.assert_close(d_theirs, d_mine, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(w_theirs, w_mine, rtol=1e-6, atol=1e-8)
        gram = (rows @ rows.T).numpy()  # the Gram path gives the same weights
        np.testing.assert_allclose(balancer.combine(gram), w_theirs, rtol=1e-6, atol=1e-9)


def test_a_fit_with_an_aggregator_equals_the_same_method_of_ours() -> None:
    results = []
    for spec in ({"type": "torchjd.aggregation.UPGrad"}, "upgrad"):
        model = two_task_model(seed=3)
        X, Y = batch(seed=4, n=64)
        from mtlgraph import DictDataLoader, DictDataset

        loader = DictDataLoader(DictDataset("d", "train", X, Y), batch_size=16)
        trainer = Trainer(n_epochs=2, lr=0.01, balancer=spec, progress_bar=False, seed=0)
        trainer.fit(model, [loader])
        results.append((model, trainer.balancer.weights()))
    (m1, w1), (m2, w2) = results
    for p, q in zip(m1.parameters(), m2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert w1.keys() == w2.keys() == {"a", "b"}
    assert all(abs(w1[t] - w2[t]) < 1e-4 for t in w1)


def test_instances_classes_and_arguments() -> None:
    upgrad = aggregation.UPGrad()
    built = BALANCERS.build(upgrad)
    assert isinstance(built, AggregatorBalancer) and built.aggregator is upgrad
    assert type(BALANCERS.build(aggregation.DualProj)).__name__ == "AggregatorBalancer"
    mgda = BALANCERS.build({"type": "torchjd.aggregation.MGDA", "epsilon": 0.01})
    assert mgda.name == "MGDA" and mgda.aggregator.gramian_weighting.epsilon == 0.01
    weighted = BALANCERS.build({"type": "torchjd.aggregation.UPGrad", "pref_vector": [1, 3]})
    d, weights = weighted.direction(torch.eye(2), None)  # no conflict: the preference itself
    assert torch.equal(d, torch.tensor([1.0, 3.0])) and weights.tolist() == [1.0, 3.0]


def test_bad_arguments_are_reported_with_their_key_paths() -> None:
    problems = BALANCERS.problems({"type": "torchjd.aggregation.CAGrad", "cc": 1}, "trainer.b")
    assert problems == [
        "trainer.b.cc: balancer 'torchjd.aggregation.CAGrad' takes no argument 'cc' (did you "
        "mean 'c'?); it takes 'c', 'norm_eps'",
        "trainer.b.c: missing (required by balancer 'torchjd.aggregation.CAGrad')",
    ]
    problems = BALANCERS.problems({"type": "torchjd.aggregation.MGDA", "epsilon": "small"}, "b")
    assert problems == ["b.epsilon: expected a number, got the string 'small'"]
    with pytest.raises(ConfigError, match="expected a torchjd.aggregation Aggregator instance"):
        AggregatorBalancer(torch.nn.Linear(2, 2))


def test_stateful_aggregators_are_refused_naming_ours() -> None:
    with pytest.raises(ConfigError) as info:
        BALANCERS.build({"type": "torchjd.aggregation.NashMTL", "n_tasks": 2}, "trainer.balancer")
    assert info.value.problems == [
        "trainer.balancer: TorchJD's NashMTL keeps state between steps that a checkpoint cannot "
        "hold, so a resumed run would not match; use mtlgraph's own balancer of that method "
        "(see docs/balancing.md)"
    ]
    with pytest.raises(ConfigError, match="TorchJD's GradVac keeps state"):
        AggregatorBalancer(aggregation.GradVac())


def test_an_aggregator_without_weights_logs_nan_weights() -> None:
    balancer = BALANCERS.build({"type": "torchjd.aggregation.ConFIG"})
    rows = _rows(0).float()
    d, weights = balancer.direction(rows, None)
    torch.testing.assert_close(d, aggregation.ConFIG()(rows))
    assert balancer.name == "ConFIG"
    assert np.isnan(weights).all() and weights.shape == (3,)


def test_a_step_writes_the_aggregated_direction_into_the_shared_grads() -> None:
    model = two_task_model(seed=0)
    reference = copy.deepcopy(model)
    balancer = BALANCERS.build({"type": "torchjd.aggregation.UPGrad"})
    balancer.setup(model.tasks)
    X, Y = batch()
    losses, _ = model.calculate_loss(X, Y)
    balancer.backward(losses, context(model, losses))
    trunk = list(reference.module_pool["trunk"].parameters())
    ref_losses, _ = reference.calculate_loss(X, Y)
    rows = torch.stack(
        [
            torch.cat(
                [
                    g.reshape(-1)
                    for g in torch.autograd.grad(ref_losses[t], trunk, retain_graph=True)
                ]
            )
            for t in ("a", "b")
        ]
    )
    expected = aggregation.UPGrad()(rows)
    got = torch.cat([p.grad.reshape(-1) for p in model.module_pool["trunk"].parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [m for m in sys.modules if m == "torchjd" or m.startswith("torchjd.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchjd", None)
    with pytest.raises(ConfigError) as info:
        import_object("torchjd.aggregation.UPGrad", "trainer.balancer.type")
    assert info.value.problems == [
        "trainer.balancer.type: cannot import 'torchjd.aggregation.UPGrad': no module named "
        "'torchjd': pip install 'mtlgraph[torchjd]'"
    ]
