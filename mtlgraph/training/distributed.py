"""Training under ``torchrun`` with PyTorch's DistributedDataParallel: the environment, the
process group, sharded loaders, gathered predictions and the run's collectives
(``docs/distributed.md``).
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from mtlgraph.data.datasets import DictDataLoader, EpochSampler
from mtlgraph.exceptions import DataError, MtlGraphError

logger = logging.getLogger(__name__)


class DistributedError(MtlGraphError, RuntimeError):
    """A distributed run cannot start (torchrun's variables are incomplete)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in a distributed job.

    Attributes:
        rank: Global rank (0 is the main process: it alone logs and writes files).
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """True on rank 0."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """True when more than one process takes part."""
        return self.world_size > 1

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DistEnv:
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` as set by ``torchrun``.

        Without them (a plain ``python`` run) this is the single-process environment.

        Example:
            >>> from mtlgraph.training.distributed import DistEnv
            >>> DistEnv.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
            DistEnv(rank=1, world_size=2, local_rank=1)
            >>> DistEnv.from_env({}).enabled
            False
        """
        env = os.environ if environ is None else environ
        if "WORLD_SIZE" not in env or "RANK" not in env:
            return cls()
        return cls(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
        )


def backend_for(device: torch.device) -> str:
    """``"nccl"`` for CUDA devices, ``"gloo"`` otherwise."""
    return "nccl" if device.type == "cuda" else "gloo"


def device_for(env: DistEnv, requested: torch.device) -> torch.device:
    """The device this rank should use: ``cuda:<local_rank>`` when CUDA is requested."""
    if requested.type == "cuda":
        return torch.device("cuda", env.local_rank)
    return requested


@contextmanager
def process_group(env: DistEnv, device: torch.device, timeout_s: float) -> Iterator[bool]:
    """Create the process group for ``env`` (if needed) and destroy it on exit or error.

    Yields ``True`` when a group is active. A group that already exists (created by the caller)
    is used and left alone. ``timeout_s`` bounds every collective, so a rank that dies makes the
    others fail with an error instead of hanging.
    """
    if not env.enabled:
        yield False
        return
    if dist.is_available() and dist.is_initialized():
        yield True
        return
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={env.world_size} is set but {', '.join(missing)} is not; launch with "
            "torchrun (which sets them) or set them yourself"
        )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend=backend_for(device),
        rank=env.rank,
        world_size=env.world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    logger.info(
        "rank %d/%d joined a %s process group", env.rank, env.world_size, backend_for(device)
    )
    try:
        yield True
        # every rank leaves the group together: a rank that destroys its group while another
        # still runs a collective or tears down gloo's threads makes that rank abort at exit
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard_train_loader(loader: DictDataLoader, env: DistEnv) -> DictDataLoader:
    """A copy of ``loader`` (same options) that reads this rank's shard: a :class:`RankSampler`
    (the same number of batches on every rank) or, for a stream, its share of
    ``world_size x workers`` consumers (:mod:`mtlgraph.data.streams`)."""
    options = dict(loader.options)
    if loader.is_stream:
        copy = DictDataLoader(loader.dataset, **options)
        copy.dataset.feed.rank, copy.dataset.feed.world_size = env.rank, env.world_size
        return copy
    shuffle = bool(getattr(loader.sampler, "shuffle", False))
    seed = int(getattr(loader.sampler, "seed", 0))
    options["shuffle"] = False
    block = int(options.pop("shuffle_block", 1))  # the ranks' batches of a step mix their blocks
    window = int(loader.batch_size or 1) * env.world_size
    n = len(loader.dataset)
    sampler = RankSampler(n, shuffle, seed, env.rank, env.world_size, block, window)
    return DictDataLoader(loader.dataset, sampler=sampler, **options)


class RankSampler(Sampler[int]):
    """Rank ``rank``'s rows of an :class:`~mtlgraph.data.datasets.EpochSampler` order, padded to
    a multiple of ``world_size`` by repeating the first rows (``DistributedSampler``'s rows for
    pass 0); ``set_pass`` selects a restart's fresh shuffle, ``skip`` drops the next iteration's
    first rows. ``block``/``window``: the order's block shuffle (``EpochSampler``).
    """

    def __init__(
        self,
        n: int,
        shuffle: bool,
        seed: int,
        rank: int,
        world_size: int,
        block: int = 1,
        window: int = 1,
    ) -> None:
        self.order_of = EpochSampler(n, shuffle, seed, block, window)
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.n, self.skip = -(-n // world_size), 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (its pass 0)."""
        self.order_of.set_epoch(epoch)

    def set_pass(self, pass_: int) -> None:
        """Select pass ``pass_`` of the epoch."""
        self.order_of.set_pass(pass_)

    def __iter__(self) -> Iterator[int]:
        perm = self.order_of.order()
        rows = list(range(self.order_of.n)) if perm is None else perm.tolist()
        total = self.n * self.world_size
        while len(rows) < total:
            rows += rows[: total - len(rows)]
        skip, self.skip = self.skip, 0
        return iter(rows[self.rank : total : self.world_size][skip:])

    def __len__(self) -> int:
        return self.n


class StridedBatchSampler(Sampler[int]):
    """Rows of batches ``rank, rank + world, ...`` of the sequential order: no padding.

    Each rank sees whole batches exactly as a single process would, so every prediction is
    computed on the same batch and is bit-identical to a single-process evaluation.
    """

    def __init__(self, n: int, batch_size: int, rank: int, world_size: int) -> None:
        starts = range(rank * batch_size, n, world_size * batch_size)
        self.indices = [i for s in starts for i in range(s, min(s + batch_size, n))]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def shard_eval_loader(loader: DictDataLoader, env: DistEnv) -> DictDataLoader:
    """A copy of ``loader`` over this rank's batch-strided, unpadded shard of the dataset."""
    if not isinstance(loader.sampler, EpochSampler) or loader.sampler.shuffle:
        name = loader.dataset.name
        message = f"evaluation loader of dataset '{name}' must be unshuffled to be sharded"
        raise DataError([f"{message}; build it with shuffle=False"])
    batch_size = int(loader.batch_size or 1)
    options = {k: v for k, v in loader.options.items() if k not in ("shuffle", "batch_size")}
    sampler = StridedBatchSampler(len(loader.dataset), batch_size, env.rank, env.world_size)
    return DictDataLoader(loader.dataset, batch_size=batch_size, sampler=sampler, **options)


def gather_predictions(
    shard: Mapping[str, Mapping[str, np.ndarray]], indices: list[int], n: int
) -> dict[str, dict[str, np.ndarray]]:
    """All-gather every rank's predictions and put rows back in dataset order.

    Args:
        shard: This rank's ``predict`` result (``{"golds"|"probs"|"preds": {task: array}}``).
        indices: The dataset rows of this rank's shard, in the order of ``shard``'s rows.
        n: Dataset length.

    Returns:
        The result a single process would compute over the whole dataset, on every rank.
    """
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, ({k: dict(v) for k, v in shard.items()}, indices))
    out: dict[str, dict[str, np.ndarray]] = {}
    for kind in shard:
        tasks = {t for part, _ in parts for t in part.get(kind, {})}
        for task in tasks:
            pieces = [(part[kind][task], idx) for part, idx in parts if task in part.get(kind, {})]
            first = pieces[0][0]
            full = np.empty((n, *first.shape[1:]), dtype=first.dtype)
            for arr, idx in pieces:
                full[np.asarray(idx, dtype=np.int64)] = arr
            out.setdefault(kind, {})[task] = full
    return out


def broadcast_object(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (``value`` itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


class Collectives:
    """The collective operations of one training run, following *its* :class:`DistEnv`.

    A ``Trainer(distributed="off")`` in a process that holds a group runs no collective; in a
    single process every method is a local no-op.

    Example:
        >>> import torch
        >>> from mtlgraph.training.distributed import Collectives, DistEnv
        >>> comm = Collectives(DistEnv())
        >>> comm.gather_objects("x"), comm.gather_sums({"a": [1.0, 2.0]})
        (['x'], {'a': [1.0, 2.0]})
    """

    def __init__(self, env: DistEnv) -> None:
        self.enabled = env.enabled
        self.world_size = env.world_size

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` over ranks in place."""
        if self.enabled:
            dist.all_reduce(tensor)
            tensor.div_(self.world_size)
        return tensor

    def max_(self, tensor: torch.Tensor) -> torch.Tensor:
        """The max of ``tensor`` over ranks, in place."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather_sums(self, sums: Mapping[Any, list[float]]) -> dict[Any, list[float]]:
        """Add up every rank's ``{key: [sum, count]}`` (a copy of ``sums`` in one process).

        Keys may differ between ranks (a rank whose shard had no label of a task has no entry).
        """
        out: dict[Any, list[float]] = {}
        for part in self.gather_objects(dict(sums)):
            for key, (s, c) in part.items():
                acc = out.setdefault(key, [0.0, 0.0])
                acc[0] += s
                acc[1] += c
        return out

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value``, in rank order."""
        if not self.enabled:
            return [value]
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, value)
        return parts

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()
