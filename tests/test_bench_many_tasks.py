"""bench/many_tasks.py: its LibMTL peer takes the same representation gradients as ours.

Outcomes only (the update's direction on the shared trunk); no timing thresholds.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from bench import many_tasks

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("LibMTL") is None,
    reason="LibMTL is not installed: pip install --no-deps LibMTL==1.1.5",
)


def trunk_gradient(n_tasks: int, method: str, mode: str) -> torch.Tensor:
    """One step's gradient on the trunk (flattened, unit length), no optimizer step."""
    model, X, Y = many_tasks.build(n_tasks, batch=1, seed=3)
    if mode == "libmtl":
        step, _ = many_tasks.libmtl_step(model, method, X, Y)
    else:
        step, _ = many_tasks.ours_step(model, method, mode, X, Y, 0)
    step()
    g = torch.cat([p.grad.reshape(-1) for p in model.module_pool["trunk"].parameters()])
    return g / g.norm()


@pytest.mark.parametrize("method", ["mgda", "imtl"])
def test_libmtl_rep_grad_host_matches_our_representation_mode_on_one_example(method: str) -> None:
    """LibMTL sums each task's representation gradient over the batch; on one example that is
    our row, so the bench's LibMTL ``rep_grad`` host and ``gradients: representation`` combine
    the same rows: the trunk's update points the same way (the scale is each library's)."""
    ours = trunk_gradient(3, method, "representation")
    theirs = trunk_gradient(3, method, "libmtl")
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
