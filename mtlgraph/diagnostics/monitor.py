"""The probe: :class:`InterferenceMonitor` measures gradient conflict and lookahead affinity on
a model, and accumulates them over a run; :class:`DiagnosticsConfig` holds its settings."""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast

import numpy as np
import torch
from torch import nn

from mtlgraph._io import move_to_device
from mtlgraph.data.collate import Batch, collate_dicts
from mtlgraph.data.datasets import DictDataLoader
from mtlgraph.data.streams import Example, as_example
from mtlgraph.diagnostics.report import DiagnosticsReport
from mtlgraph.diagnostics.stats import lookahead_affinity, pair_statistics
from mtlgraph.exceptions import ConfigError
from mtlgraph.gradients import PlanCache, SharedGradients, SharedLayout
from mtlgraph.graph.model import MultitaskClassifier
from mtlgraph.inference import eval_mode
from mtlgraph.metrics import SEP, make_key

logger = logging.getLogger(__name__)

PREFIX = "diagnostics"
"""First part of every key the monitor logs."""
_STREAM = 8  # keeps the probe generator's seeds apart from other users of the trainer seed

StepSizes: TypeAlias = float | Sequence[Mapping[str, Any]] | torch.optim.Optimizer
"""The lookahead step: the run's optimizer (the step it would take, from its current state),
or a plain gradient step of one size or of each ``param_groups`` entry's ``lr``."""


def conflict_key(module: str, task_a: str, task_b: str, statistic: str) -> str:
    """``diagnostics/<module>/<task_a>~<task_b>/<statistic>`` (a four-part score key)."""
    return make_key(PREFIX, module, f"{task_a}~{task_b}", statistic)


def affinity_key(source: str, target: str) -> str:
    """``diagnostics/affinity/<source>-><target>``."""
    return SEP.join((PREFIX, "affinity", f"{source}->{target}"))


def stream_rows(stream: Any, size: int, probe_index: int) -> list[Example]:
    """Probe ``probe_index``'s rows of a stream (whose length is unknown): ``size`` consecutive
    examples of unit ``probe_index % units`` from example ``(probe_index // units) * size``,
    from the unit's start when it is shorter; at most one unit is read."""
    source = stream.stream  # a NamedStream's ExampleStream
    units = source.num_units()
    if units == 0 or size == 0:
        return []
    unit, lap = probe_index % units, probe_index // units
    where = f"stream '{stream.name}' ({stream.split})"
    for start in dict.fromkeys((lap * size, 0)):
        rows = list(itertools.islice(source.iter_unit(unit, start, 0), size))
        if rows:
            return [as_example(item, where) for item in rows]
    return []


@dataclass
class DiagnosticsConfig:
    """Settings of the interference probes (``TrainerConfig.diagnostics``; docs/diagnostics.md).

    Example:
        >>> from mtlgraph.diagnostics import DiagnosticsConfig
        >>> DiagnosticsConfig(every=0).validate()
        ['every: must be >= 1, got 0']
    """

    every: int = 50  # probe every N optimizer steps
    affinity: bool = True  # also measure lookahead task affinity (one extra forward per task)
    # lookahead: null = the step the run's optimizer would take (Adam's, SGD's... from its
    # current state); a number = a plain gradient step of this size instead
    lr: float | None = None
    batch_size: int | None = None  # rows per training loader in a probe; null = its batch_size

    def validate(self) -> list[str]:
        """Value checks beyond types; one sentence per problem."""
        problems = []
        if self.every < 1:
            problems.append(f"every: must be >= 1, got {self.every}")
        if self.lr is not None and not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr: must be a positive number or null, got {self.lr}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size: must be >= 1 or null, got {self.batch_size}")
        return problems


class _LossOf(nn.Module):
    """Per-task count-weighted mean losses of several batches, for ``functional_call``."""

    def __init__(self, model: MultitaskClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, batches: Sequence[Batch]) -> dict[str, torch.Tensor]:
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}
        for X, Y in batches:
            losses, n = self.model.calculate_loss(X, Y)
            for t, loss in losses.items():
                sums[t] = sums[t] + loss * n[t] if t in sums else loss * n[t]
                counts[t] = counts.get(t, 0) + n[t]
        return {t: total / counts[t] for t, total in sums.items()}


class InterferenceMonitor:
    """Probes a model for gradient conflict and task affinity; accumulates over a run.

    The :class:`~mtlgraph.Trainer` calls :meth:`probe` every ``every`` steps; usable by hand too.

    Args:
        config: The probe settings (default :class:`DiagnosticsConfig`).
        seed: Seed of the probe rows (probe ``p`` of loader ``l`` draws from
            ``numpy.random.default_rng([seed, 8, l, p])``, so a resumed run draws the same rows).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import DictDataLoader, DictDataset, MultitaskClassifier, Operation, Task
        >>> from mtlgraph.diagnostics import DiagnosticsConfig, InterferenceMonitor
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> trunk = nn.Linear(2, 1, bias=False)  # both tasks read the trunk's output
        >>> tasks = [Task(t, {"trunk": trunk}, [Operation("trunk", [("_input_", "x")])],
        ...               task_type="regression") for t in ("up", "down")]
        >>> model = MultitaskClassifier(tasks)
        >>> x = torch.randn(64, 2)
        >>> loaders = [DictDataLoader(DictDataset(f"d_{t}", "train", {"x": x}, {t: s * x[:, 0]}),
        ...                           batch_size=32) for t, s in (("up", 1.0), ("down", -1.0))]
        >>> monitor = InterferenceMonitor(DiagnosticsConfig(every=50))
        >>> values = monitor.probe(model, loaders, lr=0.1, step=50)
        >>> values["diagnostics/trunk/up~down/cosine"] < 0  # opposite targets conflict
        True
        >>> _ = monitor.probe(model, loaders, lr=0.1, step=100)  # other rows
        >>> monitor.report().grouping  # so they get separate trunks
        (('up',), ('down',))
    """

    def __init__(self, config: DiagnosticsConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else DiagnosticsConfig()
        problems = self.config.validate()
        if problems:
            raise ConfigError(problems, header="invalid diagnostics config:")
        self.seed = seed
        self._grads = SharedGradients()
        # functional_call names of a layout's shared parameters, per plan: a model that gained
        # or lost tasks since (add_task / remove_task) has new plans, so never stale names
        self._keys = PlanCache[list[str]]()
        self._trainable: tuple[int, ...] | None = None  # ids of the parameters that train
        self._probes = 0
        self._step = 0
        self._tasks: list[str] = []
        # (module, a, b) -> [probes, Σ cos, Σ cos², probes with cos < 0, Σ log ratio, ratios]
        self._pairs: dict[tuple[str, str, str], list[float]] = {}
        # (i, j) -> [probes, Σ Z_{i→j}, Σ Z_{i→j}²]
        self._affinity: dict[tuple[str, str], list[float]] = {}
        self._said: set[str] = set()

    @property
    def every(self) -> int:
        """Optimizer steps between probes."""
        return self.config.every

    def refresh(self) -> None:
        """Forget the cached layouts of the shared parameters: the next probe finds them again.

        A probe does this by itself when the set of trainable parameters changed since the last
        probe (a ``gradual_unfreezing`` hook thawed a layer, a module was frozen), so the layers
        that train now are measured; call it by hand after other changes to the model.
        """
        self._grads.clear()
        self._keys.clear()
        self._trainable = None

    def _follow_trainable(self, model: nn.Module) -> None:
        """:meth:`refresh` when the trainable parameters are not those of the last probe."""
        trainable = tuple(id(p) for p in model.parameters() if p.requires_grad)
        if trainable != self._trainable:
            self.refresh()
            self._trainable = trainable

    # ------------------------------------------------------------ probe rows

    def probe_batches(
        self, loaders: Sequence[DictDataLoader], probe_index: int
    ) -> list[tuple[str, Batch]]:
        """The rows of probe number ``probe_index``: ``batch_size`` rows of every loader's
        dataset, without replacement, from the monitor's own generator (a stream: consecutive
        rows of one of its units, :func:`stream_rows`)."""
        out = []
        for i, loader in enumerate(loaders):
            dataset = loader.dataset
            wanted = self.config.batch_size or int(loader.batch_size or 1)
            if getattr(loader, "is_stream", False):
                examples = stream_rows(dataset, wanted, probe_index)
                if examples:
                    out.append((dataset.name, collate_dicts(examples)))
                continue
            n = len(dataset)
            size = min(n, wanted)
            if size == 0:
                continue
            rng = np.random.default_rng([self.seed, _STREAM, i, probe_index])
            rows = np.sort(rng.choice(n, size=size, replace=False))
            if loader.collate_fn is collate_dicts and hasattr(dataset, "batch"):
                batch = dataset.batch(torch.from_numpy(rows))
            else:  # items of any dataset, the loader's own collate function
                batch = loader.collate_fn([dataset[int(r)] for r in rows])
            out.append((dataset.name, batch))
        return out

    # ------------------------------------------------------------ one probe

    def probe(
        self,
        model: MultitaskClassifier,
        loaders: Sequence[DictDataLoader],
        lr: StepSizes,
        step: int,
    ) -> dict[str, float]:
        """Measure one probe and add it to the run's sums.

        Args:
            model: The model (its mode, weights, ``.grad`` and random state are left as found).
            loaders: The training loaders (one probe batch each).
            lr: The lookahead step when ``config.lr`` is ``None``: the run's optimizer (the
                step it would take on a task's gradient alone, simulated on a copy of its
                state), or a plain gradient step: a number, or ``param_groups`` (each shared
                parameter takes its group's ``lr``).
            step: The global optimizer step (probe number ``step // every``).

        Returns:
            The probe's values under their flat keys (``diagnostics/...``).
        """
        batches = [
            move_to_device(b, model.device)
            for _, b in self.probe_batches(loaders, step // self.config.every)
        ]
        self._follow_trainable(model)
        devices = [model.device.index or 0] if model.device.type == "cuda" else []
        with eval_mode(model), torch.random.fork_rng(devices=devices), torch.enable_grad():
            values = self._measure(model, batches, lr)
        self._probes += 1
        self._step = step
        return values

    def _measure(
        self,
        model: MultitaskClassifier,
        batches: list[Batch],
        lr: StepSizes,
    ) -> dict[str, float]:
        loss_of = _LossOf(model)
        losses = loss_of(batches)
        order = {t: i for i, t in enumerate(model.task_names)}
        names = sorted(
            (t for t, v in losses.items() if bool(torch.isfinite(v.detach()))),
            key=order.__getitem__,
        )
        self._tasks = _merge_tasks(self._tasks, names, order)
        if len(names) < 2:
            self._say_once("few", "diagnostics: a probe labels fewer than two tasks (%s)", names)
            return {}
        plan = model.plan(names)
        layout = self._grads.layout(model.tasks, plan)
        if layout.size == 0:
            self._say_once("unshared", "diagnostics: tasks %s share no trainable module", names)
            return {}
        grads = self._grads.compute(layout, {t: losses[t] for t in names})
        values = self._conflict(plan.task_modules, layout, names, grads)
        if self.config.affinity:
            shared = {
                t: {m for m, _, _ in layout.modules if m in plan.task_modules[t]} for t in names
            }
            partners = {t: [u for u in names if u != t and shared[t] & shared[u]] for t in names}
            keys = self._keys.get(plan, lambda _: _shared_keys(model, layout))
            values.update(
                self._lookahead(loss_of, batches, layout, keys, partners, grads, losses, lr)
            )
        return values

    def _conflict(
        self,
        task_modules: Mapping[str, tuple[str, ...]],
        layout: SharedLayout,
        names: list[str],
        grads: torch.Tensor,
    ) -> dict[str, float]:
        values: dict[str, float] = {}
        for module, start, stop in layout.modules:
            users = [i for i, t in enumerate(names) if module in task_modules[t]]
            g = grads[users, start:stop]
            cosine, ratio = pair_statistics(g @ g.T)
            cos_l, ratio_l = cosine.tolist(), ratio.tolist()
            for x, y in itertools.combinations(range(len(users)), 2):
                a, b = names[users[x]], names[users[y]]
                c, r = cos_l[x][y], ratio_l[x][y]
                if math.isnan(c):
                    continue
                values[conflict_key(module, a, b, "cosine")] = c
                values[conflict_key(module, a, b, "norm_ratio")] = r
                logged = r > 0 and math.isfinite(r)
                acc = self._pairs.setdefault((module, a, b), [0, 0.0, 0.0, 0, 0.0, 0])
                add = (1, c, c * c, int(c < 0), math.log(r) if logged else 0.0, int(logged))
                acc[:] = [x + y for x, y in zip(acc, add, strict=True)]
        return values

    def _lookahead(
        self,
        loss_of: nn.Module,
        batches: list[Batch],
        layout: SharedLayout,
        keys: list[str],
        partners: Mapping[str, list[str]],
        grads: torch.Tensor,
        losses: Mapping[str, torch.Tensor],
        lr: StepSizes,
    ) -> dict[str, float]:
        """``Z_{i→j}`` for every task ``i`` and each task ``j`` it shares a module with (row ``i``
        of ``grads`` is task ``i`` of ``partners``' order; ``keys`` name the shared parameters
        for :func:`torch.func.functional_call`)."""
        step = self._stepper(layout, lr)
        before = {t: float(losses[t].detach()) for t in partners}
        values: dict[str, float] = {}
        with torch.no_grad():
            for i, source in enumerate(partners):
                if not partners[source]:
                    continue
                task_grads = [
                    grads[i, off : off + n].view_as(p)
                    for p, (off, n) in zip(layout.shared, layout.slices, strict=True)
                ]
                shifted = dict(zip(keys, step(task_grads), strict=True))
                wanted = set(partners[source])
                needed = [b for b in batches if wanted & set(b[1])]  # batches labelling them
                after = torch.func.functional_call(loss_of, shifted, (needed,))
                for target in partners[source]:
                    z = lookahead_affinity(before[target], float(after[target]))
                    if math.isnan(z):
                        continue
                    values[affinity_key(source, target)] = z
                    acc = self._affinity.setdefault((source, target), [0, 0.0, 0.0])
                    acc[:] = [acc[0] + 1, acc[1] + z, acc[2] + z * z]
        return values

    def _stepper(
        self, layout: SharedLayout, lr: StepSizes
    ) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        """The lookahead step: gradients of the shared parameters -> their values after it."""
        params = layout.shared
        if self.config.lr is not None:
            etas = [self.config.lr] * len(params)
        elif isinstance(lr, torch.optim.Optimizer):
            optimizer, factory = lr, cast(Any, type(lr))
            try:
                factory([{**optimizer.defaults, "params": [torch.zeros(1)]}])
            except TypeError as e:  # an optimizer not built from its groups alone
                self._say_once(
                    "stepper",
                    "diagnostics: cannot copy optimizer %s to simulate its step (%s): the "
                    "lookahead takes a plain gradient step at each group's lr instead",
                    type(optimizer).__name__,
                    e,
                )
                return self._stepper(layout, optimizer.param_groups)
            return lambda grads: optimizer_step(optimizer, params, grads)
        elif isinstance(lr, (int, float)):
            etas = [float(lr)] * len(params)
        else:
            wanted = {id(p) for p in params}
            of = {id(p): float(g["lr"]) for g in lr for p in g["params"] if id(p) in wanted}
            etas = [of.get(id(p), 0.0) for p in params]
        return lambda grads: [
            p.detach() - eta * g for p, eta, g in zip(params, etas, grads, strict=True)
        ]

    def _say_once(self, key: str, message: str, *args: object) -> None:
        if key not in self._said:
            self._said.add(key)
            logger.warning(message, *args)

    # ------------------------------------------------------------ state and report

    def state_dict(self) -> dict[str, Any]:
        """The run's sums as plain values (``torch.load(weights_only=True)`` loads them)."""
        return {
            "version": 1,
            "every": self.config.every,
            "probes": self._probes,
            "step": self._step,
            "tasks": list(self._tasks),
            "pairs": [
                [m, a, b, int(v[0]), float(v[1]), float(v[2]), int(v[3]), float(v[4]), int(v[5])]
                for (m, a, b), v in self._pairs.items()
            ],
            "affinity": [
                [i, j, int(v[0]), float(v[1]), float(v[2])] for (i, j), v in self._affinity.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the sums of :meth:`state_dict` (a resumed run)."""
        self._probes = int(state["probes"])
        self._step = int(state["step"])
        self._tasks = [str(t) for t in state["tasks"]]
        self._pairs = {(str(m), str(a), str(b)): list(v) for m, a, b, *v in state["pairs"]}
        self._affinity = {(str(i), str(j)): list(v) for i, j, *v in state["affinity"]}

    def report(self) -> DiagnosticsReport:
        """The report of the probes so far."""
        return DiagnosticsReport.from_state(self.state_dict())


def optimizer_step(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    grads: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """The values ``params`` would take if ``optimizer`` stepped with ``grads`` alone: the step
    runs on copies of the parameters and of their optimizer state (Adam's moments and step
    count, SGD's momentum...), in groups with the same hyper-parameters; the optimizer and the
    parameters are left untouched.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> adam = torch.optim.Adam([w], lr=0.1)
        >>> optimizer_step(adam, [w], [torch.tensor([100.0, 0.01])])[0]  # Adam: ~lr * sign
        tensor([0.9000, 0.9000])
        >>> w.tolist(), adam.state[w]  # untouched
        ([1.0, 1.0], {})
    """
    group_of = {id(p): i for i, g in enumerate(optimizer.param_groups) for p in g["params"]}
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    members: dict[int, list[torch.Tensor]] = {}
    for p, c, g in zip(params, copies, grads, strict=True):
        members.setdefault(group_of[id(p)], []).append(c)
        c.grad = g.detach().clone()
    groups = [
        {**{k: v for k, v in optimizer.param_groups[i].items() if k != "params"}, "params": cs}
        for i, cs in members.items()
    ]
    copy = cast(Any, type(optimizer))(groups)
    for p, c in zip(params, copies, strict=True):
        state = optimizer.state.get(p)
        if state:
            copy.state[c] = {
                k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()
            }
    copy.step()
    return [c.detach() for c in copies]


def _shared_keys(model: MultitaskClassifier, layout: SharedLayout) -> list[str]:
    """The names :func:`torch.func.functional_call` of a :class:`_LossOf` knows the layout's
    shared parameters by."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [f"model.{names[id(p)]}" for p in layout.shared]


def _merge_tasks(seen: list[str], names: list[str], order: Mapping[str, int]) -> list[str]:
    """The tasks probed so far, in model order; tasks the model no longer holds (after
    ``remove_task``) keep their sums and follow, in their previous order."""
    tasks = seen + [t for t in names if t not in seen]
    late = {t: len(order) + i for i, t in enumerate(t for t in tasks if t not in order)}
    return sorted(tasks, key=lambda t: order[t] if t in order else late[t])
