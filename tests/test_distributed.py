"""Distributed helpers on 2 gloo ranks (CPU), bounded by timeouts."""

from __future__ import annotations

import socket

import pytest
import torch.multiprocessing as mp
from ddp_workers import sharding_worker, small_data, small_model

from mtlgraph import DictDataLoader
from mtlgraph.distributed import DistEnv, backend_for


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_env_detection() -> None:
    assert DistEnv.from_env({}) == DistEnv(0, 1, 0)
    env = DistEnv.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.enabled) == (
        3,
        4,
        1,
        False,
        True,
    )


def test_backend_choice() -> None:
    import torch

    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"


@pytest.mark.timeout(120)
def test_sharding_and_gathered_evaluation_equal_single_process() -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(
        sharding_worker, args=(2, free_port(), queue), nprocs=2, start_method="spawn"
    )
    results = sorted(queue.get(timeout=60) for _ in range(2))
    model = small_model()
    valid = DictDataLoader(small_data(23, "valid"), batch_size=5)
    expected_scores = model.score(valid)
    expected = model.predict(valid, return_preds=True)
    for _rank, n_batches, n_rows, scores, full in results:
        assert n_batches == 3 and n_rows == 12  # ceil(23 / 2) rows each, padded
        assert scores == expected_scores
        assert full["probs"] == expected["probs"]["a"].tolist()
