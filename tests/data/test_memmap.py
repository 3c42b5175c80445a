"""Memory-mapped fields and labels: batches read only their rows, equal to in-memory data."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlgraph import DataError, DictDataLoader, DictDataset
from mtlgraph.data.memmap import MapReader, PageBudget


def _maps(tmp_path: Path) -> tuple[np.ndarray, np.ndarray, np.memmap, np.memmap]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3)).astype(np.float32)
    y = rng.integers(0, 2, size=50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return (
        x,
        y,
        np.load(tmp_path / "x.npy", mmap_mode="r"),
        np.load(tmp_path / "y.npy", mmap_mode="r"),
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_memmapped_batches_equal_in_memory_batches(tmp_path: Path, workers: int) -> None:
    x, y, xm, ym = _maps(tmp_path)
    mapped = DictDataset("d", "train", {"x": xm}, {"t": ym})
    memory = DictDataset("d", "train", {"x": x}, {"t": y})
    assert mapped.X_dict["x"] is xm  # kept mapped, not read
    for shuffle in (False, True):
        a = DictDataLoader(mapped, batch_size=8, shuffle=shuffle, seed=1, num_workers=workers)
        b = DictDataLoader(memory, batch_size=8, shuffle=shuffle, seed=1)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa["x"], xb["x"]) and torch.equal(ya["t"], yb["t"])


def test_gather_reads_sorted_and_restores_the_batch_order() -> None:
    arr = np.arange(20).reshape(10, 2)
    read = MapReader().gather
    assert read(arr, torch.tensor([9, 0, 4])).tolist() == [[18, 19], [0, 1], [8, 9]]
    assert read(arr, torch.tensor([3, 3, -1, 3])).tolist() == [[6, 7], [6, 7], [18, 19], [6, 7]]
    assert read(arr, slice(2, 4)).tolist() == [[4, 5], [6, 7]]
    assert read(arr, slice(8, 2, -3)).tolist() == [[16, 17], [10, 11]]
    assert read(arr, []).shape == (0, 2)
    with pytest.raises(IndexError, match="out of range for 10 rows"):
        read(arr, [10])


def test_page_budget_releases_after_the_budget(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import mtlgraph.data.memmap as mm

    _, _, xm, _ = _maps(tmp_path)
    released = []
    monkeypatch.setattr(mm, "release", lambda handle: released.append(handle))
    resident = iter([1000, 1050, 1100, 900])
    monkeypatch.setattr(mm, "resident_bytes", lambda: next(resident))
    budget = PageBudget(budget=100)  # the map is larger than this
    budget.account(xm, 60)  # base 1000
    budget.account(xm, 60)  # +50: kept
    assert not released
    budget.account(xm, 60)  # +100: released, new base 900
    assert released == [xm._mmap] and budget.base == 900
    monkeypatch.setattr(mm, "resident_bytes", lambda: None)  # no /proc: estimate
    budget.account(xm, 60)
    budget.account(xm, 60)
    assert len(released) == 2


def test_a_scalar_memmap_is_refused(tmp_path: Path) -> None:
    np.save(tmp_path / "s.npy", np.float32(1.0))
    scalar = np.load(tmp_path / "s.npy", mmap_mode="r")
    with pytest.raises(DataError, match=r"X_dict\['s'\] is a scalar"):
        DictDataset("d", "train", {"s": scalar, "x": np.zeros((2, 1))}, {})


def test_yaml_npy_directory_is_memory_mapped_with_per_dataset_loading(tmp_path: Path) -> None:
    from experiment_helpers import tiny_config, write_config

    from mtlgraph.experiment.build import build_experiment
    from mtlgraph.experiment.config import load_config

    rng = np.random.default_rng(0)
    for split, n in (("train", 120), ("valid", 40)):
        d = tmp_path / "circles_npy" / split
        d.mkdir(parents=True)
        x = rng.normal(size=(n, 2)).astype(np.float32)
        np.save(d / "features.npy", x)
        np.save(d / "label.npy", (x[:, 0] ** 2 + x[:, 1] ** 2 < 1).astype(np.int64))
    cfg = tiny_config(batch_scheduler={"name": "temperature", "temperature": 2.0})
    cfg["trainer"]["steps_per_epoch"] = 9
    cfg["data"]["num_workers"] = 0
    cfg["data"]["datasets"]["circles"] = {
        "source": {
            "type": "npy",
            "path": {"train": "circles_npy/train", "valid": "circles_npy/valid"},
        },
        "fields": {"xy": "features"},
        "labels": {"circle_task": "label"},
        "batch_size": 8,
        "num_workers": 2,
    }
    exp = build_experiment(load_config(write_config(tmp_path / "c.yaml", cfg)))
    loaders = {(dl.dataset.name, dl.dataset.split): dl for dl in exp.loaders}
    circles = loaders[("circles", "train")]
    assert isinstance(circles.dataset.X_dict["xy"], np.memmap)
    assert (circles.batch_size, circles.num_workers) == (8, 2)
    assert loaders[("squares", "train")].num_workers == 0
    exp.trainer.fit(exp.model, exp.loaders)
    assert exp.trainer.global_step == 2 * 9
    assert "circle_task/circles/valid/accuracy" in exp.trainer.history[-1]

    np.save(tmp_path / "circles_npy" / "train" / "features.npy", np.zeros((120, 2)))
    with pytest.raises(DataError, match="memory-mapped array is float64; .* save it as float32"):
        build_experiment(load_config(tmp_path / "c.yaml"))


def test_a_pickled_dataset_reopens_its_maps_instead_of_copying(tmp_path: Path) -> None:
    import pickle

    x, y, xm, ym = _maps(tmp_path)
    ds = DictDataset("d", "train", {"x": xm[10:30]}, {"t": ym[10:30]})
    blob = pickle.dumps(ds)
    assert len(blob) < 2000  # references, not 50 x 3 floats + labels
    again = pickle.loads(blob)
    assert isinstance(again.X_dict["x"], np.memmap)
    assert np.array_equal(again.X_dict["x"], x[10:30]) and np.array_equal(
        again.Y_dict["t"], y[10:30]
    )


@pytest.mark.parametrize("cached", [True, False])
def test_rows_of_a_large_map_are_read_from_its_file(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cached: bool,
) -> None:
    """A map larger than the budget: one ``preadv`` per run of neighbouring rows, the batch's
    own order (duplicates, negative rows) restored. Runs the page cache holds are read at once
    (``RWF_NOWAIT``); the others get a readahead hint each, then a read."""
    import mtlgraph.data.memmap as mm

    x, _, xm, _ = _maps(tmp_path)
    reads: list[tuple[int, int]] = []  # blocking reads: (offset, bytes)
    hints: list[tuple[int, int]] = []
    preadv = os.preadv
    nowait = 8

    def counted_preadv(fd, buffers, offset, flags=0):  # type: ignore[no-untyped-def]
        if flags == nowait:
            if not cached:
                raise BlockingIOError("not in the page cache")
            return preadv(fd, buffers, offset)
        reads.append((offset, sum(len(b) for b in buffers)))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted_preadv)
    monkeypatch.setattr(mm, "NOWAIT", nowait)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: hints.append((off, n)))
    reader = MapReader(budget=16)  # every map is "large"
    reader.batched = False  # one preadv a run (BatchedReads: tested below)
    idx = torch.tensor([40, 3, 4, 3, -1, 17, 5])  # rows 3..5 are neighbours
    assert torch.equal(reader.gather(xm[2:], idx), torch.from_numpy(x[2:][idx.numpy()]))
    width = 3 * 4
    base = xm.offset + 2 * width
    runs = [(base + 3 * width, 3 * width), (base + 17 * width, width), (base + 40 * width, width)]
    runs.append((base + 47 * width, width))  # -1 of 48 rows
    assert (reads, hints) == (([], []) if cached else (runs, runs))
    reads.clear()
    assert torch.equal(reader.gather(xm, slice(5, 9)), torch.from_numpy(x[5:9]))
    assert reads == [(xm.offset + 5 * width, 4 * width)]  # a slice: one read, no hint
    with pytest.raises(IndexError):
        reader.gather(xm, torch.tensor([50]))
    truncated = tmp_path / "cut.npy"
    truncated.write_bytes((tmp_path / "x.npy").read_bytes())
    cut = np.load(truncated, mmap_mode="r")
    os.truncate(truncated, truncated.stat().st_size - 100)  # replaced under the map
    with pytest.raises(DataError, match="ended before row 4[0-9]"):
        reader.gather(cut, torch.arange(0, 50, 2))


def test_a_file_system_without_nowait_reads_turns_them_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import mtlgraph.data.memmap as mm

    x, _, xm, _ = _maps(tmp_path)
    preadv = os.preadv

    def no_nowait(fd, buffers, offset, flags=0):  # type: ignore[no-untyped-def]
        if flags:
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", no_nowait)
    monkeypatch.setattr(mm, "NOWAIT", 8)
    reader = MapReader(budget=16)
    reader.batched = False
    idx = torch.tensor([9, 1, 30])
    assert torch.equal(reader.gather(xm, idx), torch.from_numpy(x[idx.numpy()]))
    assert reader.nowait is False


def test_read_ahead_keeps_order_and_raises_the_readers_own_error_at_its_item() -> None:
    from mtlgraph.data.memmap import read_ahead

    class Broken(Exception):
        pass

    def items():  # type: ignore[no-untyped-def]
        yield from range(3)
        raise Broken("row 3 is unreadable")

    got = []
    with pytest.raises(Broken, match="row 3 is unreadable"):
        for item in read_ahead(items()):
            got.append(item)
    assert got == [0, 1, 2]


def test_a_mapped_dataset_reads_ahead_and_trains_like_the_in_memory_one(tmp_path: Path) -> None:
    """Memory-mapped fields and labels (labels checked chunk by chunk before training) give
    the same weights as the same arrays in memory."""
    from mtlgraph import MultitaskClassifier, Operation, Task, Trainer

    x, y, xm, ym = _maps(tmp_path)

    def fit(X, Y):  # type: ignore[no-untyped-def]
        torch.manual_seed(0)
        task = Task(
            "t", {"m": torch.nn.Linear(x.shape[1], 3)}, [Operation("m", [("_input_", "x")])]
        )
        model = MultitaskClassifier([task])
        ds = DictDataset("d", "train", {"x": X}, {"t": Y})
        assert ds.mapped == isinstance(X, np.memmap)
        Trainer(n_epochs=2, lr=0.1, progress_bar=False).fit(
            model, [DictDataLoader(ds, batch_size=7, shuffle=True)]
        )
        return [p.detach().clone() for p in model.parameters()]

    mapped, memory = fit(xm, ym), fit(torch.from_numpy(x), torch.from_numpy(y))
    assert all(torch.equal(a, b) for a, b in zip(mapped, memory, strict=True))


def test_a_bad_label_in_a_mapped_label_file_is_named_before_training(tmp_path: Path) -> None:
    from mtlgraph import MultitaskClassifier, Operation, Task, Trainer

    x, y, xm, _ = _maps(tmp_path)
    bad = y.copy()
    bad[5] = 7
    np.save(tmp_path / "bad.npy", bad)
    ym = np.load(tmp_path / "bad.npy", mmap_mode="r")
    task = Task("t", {"m": torch.nn.Linear(x.shape[1], 3)}, [Operation("m", [("_input_", "x")])])
    loader = DictDataLoader(DictDataset("d", "train", {"x": xm}, {"t": ym}), batch_size=8)
    with pytest.raises(DataError, match=r"dataset 'd' \(train\), task 't', rows 0\.\..*label 7"):
        Trainer(n_epochs=1, progress_bar=False).fit(MultitaskClassifier([task]), [loader])


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("from_file", [False, True])
def test_a_batch_holds_the_samplers_rows_in_the_samplers_order(
    tmp_path: Path, workers: int, from_file: bool
) -> None:
    """Workers read a whole batch in one call (``__getitems__``); rows are read in file order
    but every batch holds exactly the sampler's rows, in its order, none dropped, and a loader
    started at batch ``k`` (a resumed epoch) yields the uninterrupted epoch's batches from k."""
    x, y, xm, ym = _maps(tmp_path)
    ds = DictDataset("d", "train", {"x": xm}, {"t": ym})
    if from_file:
        ds._reader = MapReader(budget=16)  # every map is read with preadv
    loader = DictDataLoader(ds, batch_size=8, shuffle=True, seed=3, num_workers=workers)
    loader.set_epoch(2)
    order = loader.sampler.order()
    assert order is not None
    batches = list(loader)
    assert [len(b[1]["t"]) for b in batches] == [8] * 6 + [2]
    assert torch.equal(torch.cat([b[0]["x"] for b in batches]), torch.from_numpy(x[order]))
    assert torch.equal(torch.cat([b[1]["t"] for b in batches]), torch.from_numpy(y[order]))
    resumed = list(loader.iterate(start=3))
    assert len(resumed) == 4
    for (xa, ya), (xb, yb) in zip(resumed, batches[3:], strict=True):
        assert torch.equal(xa["x"], xb["x"]) and torch.equal(ya["t"], yb["t"])


def test_getitems_gives_a_custom_collate_function_the_rows_one_by_one(tmp_path: Path) -> None:
    x, y, xm, ym = _maps(tmp_path)
    ds = DictDataset("d", "train", {"x": xm}, {"t": ym})
    rows = ds.__getitems__([5, 0, 5])
    assert len(rows) == 3 and [int(r[1]["t"]) for r in rows] == [y[5], y[0], y[5]]
    assert torch.equal(rows[1][0]["x"], torch.from_numpy(x[0]))
    loader = DictDataLoader(
        ds, batch_size=4, collate_fn=lambda rows: [int(r[1]["t"]) for r in rows]
    )
    assert [t for batch in loader for t in batch] == y.tolist()


def test_a_large_batch_is_read_whole_and_a_pickled_reader_opens_its_own_files(
    tmp_path: Path,
) -> None:
    x = np.random.default_rng(1).normal(size=(300, 5)).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    xm = np.load(tmp_path / "big.npy", mmap_mode="r")
    reader = MapReader(budget=16)
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(0))[:200]
    assert torch.equal(reader.gather(xm, idx), torch.from_numpy(x[idx.numpy()]))
    again = pickle.loads(pickle.dumps(reader))  # a worker's copy opens its own files
    assert again._files == {} and again.budget == 16
    assert torch.equal(again.gather(xm, idx), torch.from_numpy(x[idx.numpy()]))


def _big(tmp_path: Path, rows: int = 400, width: int = 5) -> tuple[np.ndarray, np.memmap]:
    x = np.random.default_rng(2).normal(size=(rows, width)).astype(np.float32)
    np.save(tmp_path / "big.npy", x)
    return x, np.load(tmp_path / "big.npy", mmap_mode="r")


@pytest.mark.parametrize("batched", [True, False])
def test_mapped_reads_equal_in_memory_rows_for_any_index_set(tmp_path: Path, batched: bool) -> None:
    """Random index sets (unsorted, duplicates, negative rows, neighbours, one row, a slice),
    read with one system call for the batch or one ``preadv`` a run, equal numpy indexing."""
    from mtlgraph.data.memmap import BatchedReads

    if batched and not BatchedReads.supported():
        pytest.skip("batched reads need Linux AIO")
    x, xm = _big(tmp_path)
    reader = MapReader(budget=16)  # every map is read from its file
    reader.batched = batched
    rng = np.random.default_rng(0)
    sets = [rng.integers(-400, 400, size=k) for k in (1, 7, 256, 1500)]  # 1500 > CAPACITY
    sets += [np.array([5, 5, 5]), np.array([9, 3, 4, 5, 3, 399, 0]), np.arange(100, 0, -1)]
    for idx in sets:
        assert torch.equal(reader.gather(xm, torch.from_numpy(idx)), torch.from_numpy(x[idx]))
    assert torch.equal(reader.gather(xm, slice(17, 290)), torch.from_numpy(x[17:290]))
    assert torch.equal(reader.gather(xm[3:], [0, 2, 1]), torch.from_numpy(x[3:][[0, 2, 1]]))
    assert reader.batched is batched


def test_runs_batched_reads_leave_are_hinted_then_read_and_a_refusal_turns_them_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the page cache does not hold (a run not read, or read in part) is read after a
    readahead hint; where the kernel refuses batched reads the reader stops trying them."""
    import ctypes
    from threading import Lock

    from mtlgraph.data.memmap import BatchedReads

    x, xm = _big(tmp_path)
    width = 5 * 4
    hints: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, off, n, advice: hints.append((off, n)))
    calls: list[int] = []

    def half(self, fd, address, offsets, starts, sizes):  # type: ignore[no-untyped-def]
        calls.append(len(sizes))
        got = np.zeros(len(sizes), np.int64)
        got[1] = sizes[1]  # the second run whole, the third in part, the others not at all
        got[2] = width
        for i in (1, 2):
            ctypes.memmove(
                int(address + starts[i]), os.pread(fd, int(got[i]), int(offsets[i])), int(got[i])
            )
        return got

    monkeypatch.setattr(BatchedReads, "supported", staticmethod(lambda: True))
    monkeypatch.setattr(BatchedReads, "__init__", lambda self: setattr(self, "_lock", Lock()))
    monkeypatch.setattr(BatchedReads, "_submit", half)
    reader = MapReader(budget=16)
    idx = np.array([300, 10, 200, 201, 202, 50])  # runs: 10 | 50 | 200-202 | 300
    assert torch.equal(reader.gather(xm, torch.from_numpy(idx)), torch.from_numpy(x[idx]))
    base = xm.offset
    left = [(base + 10 * width, width), (base + 201 * width, 2 * width)]
    assert hints == [*left, (base + 300 * width, width)]
    monkeypatch.setattr(BatchedReads, "_submit", lambda self, *args: None)  # refused
    assert torch.equal(reader.gather(xm, torch.from_numpy(idx)), torch.from_numpy(x[idx]))
    assert reader.batched is False and calls == [4]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_block_shuffled_mapped_batch_equals_in_memory_and_is_read_a_block_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    x, xm = _big(tmp_path, rows=96)
    y = np.arange(96)
    mapped = DictDataset("d", "train", {"x": xm}, {"t": y})
    memory = DictDataset("d", "train", {"x": x}, {"t": y})
    options = {"batch_size": 12, "shuffle": True, "seed": 7, "shuffle_block": 4}
    a = DictDataLoader(mapped, num_workers=workers, **options)  # type: ignore[arg-type]
    b = DictDataLoader(memory, **options)  # type: ignore[arg-type]
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa["x"], xb["x"]) and torch.equal(ya["t"], yb["t"])
    reads: list[int] = []
    preadv = os.preadv

    def counted(fd, buffers, offset, flags=0):  # type: ignore[no-untyped-def]
        reads.append(offset)
        return preadv(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", counted)
    mapped._reader = MapReader(budget=16)  # read from the file, one preadv a run
    mapped._reader.batched = mapped._reader.nowait = False
    order = DictDataLoader(mapped, **options).sampler.order()  # type: ignore[arg-type]
    for first in range(0, 96, 12):
        mapped.batch(order[first : first + 12])
        assert len(reads) <= 3  # 12 rows: three whole blocks of 4 neighbouring rows
        reads.clear()


def test_threads_sharing_a_reader_each_get_their_own_rows(tmp_path: Path) -> None:
    """A read-ahead thread and the training thread may read one dataset at once."""
    from concurrent.futures import ThreadPoolExecutor

    x, xm = _big(tmp_path, rows=2000)
    reader = MapReader(budget=16)
    sets = [np.random.default_rng(i).integers(0, 2000, size=300) for i in range(40)]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda idx: reader.gather(xm, torch.from_numpy(idx)), sets))
    assert all(torch.equal(g, torch.from_numpy(x[idx])) for g, idx in zip(got, sets, strict=True))


def test_batched_reads_name_a_truncated_file_and_a_missing_context_falls_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from mtlgraph.data.memmap import BatchedReads

    x, xm = _big(tmp_path)
    cut = tmp_path / "cut.npy"
    cut.write_bytes((tmp_path / "big.npy").read_bytes())
    short = np.load(cut, mmap_mode="r")
    os.truncate(cut, cut.stat().st_size - 200)  # the last rows are gone under the map
    reader = MapReader(budget=16)
    with pytest.raises(DataError, match=r"cut\.npy' ended before row 39[0-9]"):
        reader.gather(short, torch.tensor([3, 398, 100]))

    def no_context(self):  # type: ignore[no-untyped-def]
        raise OSError(errno.EAGAIN, "io_setup: Resource temporarily unavailable")

    monkeypatch.setattr(BatchedReads, "supported", staticmethod(lambda: True))
    monkeypatch.setattr(BatchedReads, "__init__", no_context)
    reader = MapReader(budget=16)
    idx = torch.tensor([7, 300, 2, 7])
    assert torch.equal(reader.gather(xm, idx), torch.from_numpy(x[idx.numpy()]))
    assert reader.batched is False
