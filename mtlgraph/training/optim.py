"""Optimizer set-up and the optimizer step: :data:`OPTIMIZERS` and :func:`make_optimizer`,
``param_groups`` and ``freeze`` (checked against the model when ``fit`` starts), and
:class:`StepControl` / :class:`SubsetStepper` (amp, accumulation, clipping, the step over the
parameters a step touched). Rules: docs/training.md.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.balancing import Balancer
from mtlgraph.exceptions import ConfigError
from mtlgraph.graph.model import ExecutionPlan, MultitaskClassifier
from mtlgraph.registry import Registry, accepted_parameters
from mtlgraph.training.layers import LayerDecay, as_layer_decay, module_layers

AMP_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
NO_CONTEXT = contextlib.nullcontext()  # reusable: entering it does nothing (no per-step object)

OptimizerFactory = Callable[..., torch.optim.Optimizer]
Narrowed = tuple[list[dict[str, Any]], list[tuple[dict[str, Any], dict[str, Any]]]]
"""Narrowed copies of optimizer groups, and each copy with the full group it narrows."""

UNSUPPORTED_TORCH: dict[str, str] = {
    "lbfgs": "it needs a closure that re-evaluates the loss at every step, which the "
    "Trainer's one-backward step does not provide",
    "sparseadam": "it only takes sparse gradients, which mtlgraph's modules do not produce",
    "muon": "it only takes 2-D weight matrices; a model's biases and norms make it fail",
}
"""``torch.optim`` classes the Trainer's step cannot drive, with the reason."""


def torch_optimizers() -> dict[str, type[torch.optim.Optimizer]]:
    """Every ``torch.optim`` optimizer class the Trainer can drive, by lower-case name."""
    found: dict[str, type[torch.optim.Optimizer]] = {}
    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.Optimizer)
            and obj is not torch.optim.Optimizer
            and attr.lower() not in UNSUPPORTED_TORCH
        ):
            found[attr.lower()] = obj
    return found


def _find_optimizer(name: str) -> OptimizerFactory | str | None:
    """An optimizer :data:`OPTIMIZERS` does not hold by ``name``: a registered name or a
    ``torch.optim`` class, case-insensitive; ``None`` for a dotted path; else why not."""
    lower = name.lower()
    registered = {n.lower(): n for n in OPTIMIZERS.names()}
    if lower in registered:
        return OPTIMIZERS.get(registered[lower])
    if lower in UNSUPPORTED_TORCH:
        return f"optimizer '{name}' cannot be used: {UNSUPPORTED_TORCH[lower]}"
    available = torch_optimizers()
    if lower in available:
        return available[lower]
    if "." in name:
        return None
    known = sorted(set(registered) | set(available))
    return (
        f"unknown optimizer {name!r}{did_you_mean(lower, known)}; known: {quoted(known)}, or "
        "a dotted import path to a torch.optim.Optimizer subclass"
    )


OPTIMIZERS: Registry[OptimizerFactory] = Registry(
    "optimizer",
    {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD},
    base=torch.optim.Optimizer,
    supplied={
        "params": "remove it (the Trainer passes the model's parameter groups)",
        "lr": "set it once, as trainer.lr (per module: trainer.param_groups), and remove it here",
        "weight_decay": "set it once, as trainer.weight_decay (per module: "
        "trainer.param_groups), and remove it here",
    },
    find=_find_optimizer,
)
"""Optimizers by name; besides these, any ``torch.optim`` class by case-insensitive name
(``"adamax"``, ``"RMSprop"``) or a dotted import path. Built as ``factory(param_groups, lr=...,
weight_decay=..., **kwargs)``: ``lr`` and ``weight_decay`` are the Trainer's settings only.

Example:
    >>> import torch
    >>> from mtlgraph.training.optim import OPTIMIZERS
    >>> OPTIMIZERS.resolve("RMSprop")[0] is torch.optim.RMSprop
    True
    >>> OPTIMIZERS.problems({"name": "adamw", "amsgrad": "maybe"}, "optimizer")
    ["optimizer.amsgrad: expected true or false, got the string 'maybe'"]
"""


def make_optimizer(
    spec: Any,
    model: MultitaskClassifier,
    balancer: Balancer,
    *,
    lr: float,
    weight_decay: float,
    param_groups: Mapping[str, Mapping[str, Any]],
    layer_lr_decay: Mapping[str, float | LayerDecay] | None = None,
) -> torch.optim.Optimizer:
    """The run's one optimizer: the model's groups (default first, then ``param_groups``
    patterns, then ``layer_lr_decay`` layers; frozen parameters left out) and the balancer's
    learned weights in their own group.
    """
    groups, _ = model_param_groups(model, param_groups, (), layer_lr_decay, lr)
    balancer_params = [p for p in balancer.parameters() if p.requires_grad]
    if balancer_params:
        groups.append(
            {
                "params": balancer_params,
                "scope": "balancer",
                "weight_decay": 0.0,
                **balancer.optimizer_options(),
            }
        )
    params = accepted_parameters(OPTIMIZERS.resolve(spec, "optimizer")[0])
    decay = {"weight_decay": weight_decay} if params is None or "weight_decay" in params else {}
    return OPTIMIZERS.build(spec, "optimizer", params=groups, lr=lr, **decay)


def optimizer_problems(
    spec: Any, weight_decay: float, param_groups: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Every problem of the optimizer ``spec``, ``weight_decay`` and ``param_groups``, by key.

    Example:
        >>> optimizer_problems("sgd", 0.0, {"head*": {"lr": -1, "betas": [0.9, 0.99]}})
        ... # doctest: +ELLIPSIS
        ['param_groups.head*.lr: must be a number >= 0, got -1', "param_groups.head*.betas: ...
    """
    problems = OPTIMIZERS.problems(spec, "optimizer")
    try:
        factory, _, name = OPTIMIZERS.resolve(spec, "optimizer")
    except ConfigError:
        return problems  # the name's problem, reported above
    accepted = accepted_parameters(factory)
    if accepted is None:
        return problems
    accepted.discard("params")  # the Trainer's
    if weight_decay and "weight_decay" not in accepted:
        problems.append(
            f"weight_decay: optimizer '{name}' takes no weight_decay; set weight_decay=0 or "
            "pick another optimizer"
        )
    for pattern, options in param_groups.items():
        where = f"param_groups.{pattern}"
        if not pattern:
            problems.append("param_groups: a pattern must be a non-empty string")
        for key, value in options.items():
            if key in ("params", "scope", "name"):
                problems.append(f"{where}.{key}: is set by the Trainer; remove it")
            elif key not in accepted:
                problems.append(
                    f"{where}.{key}: the optimizer takes no '{key}'{did_you_mean(key, accepted)};"
                    f" it takes {quoted(accepted)}"
                )
            elif key in ("lr", "weight_decay") and (
                isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0
            ):
                problems.append(f"{where}.{key}: must be a number >= 0, got {value!r}")
    return problems


def _matching(what: str, pattern: str, names: Sequence[str], problems: list[str]) -> list[str]:
    """The module ``names`` that ``pattern`` matches; matching none is a problem of ``what``."""
    found = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if not found:
        problems.append(
            f"{what}: pattern '{pattern}' matches no module of the model"
            f"{did_you_mean(pattern, names)}; modules: {quoted(names)}"
        )
    return found


def resolve_modules(
    model: MultitaskClassifier, key: str, patterns: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Module names that the ``patterns`` of setting ``key`` select, and one sentence per
    pattern that matches none."""
    names = list(model.module_pool)
    chosen: list[str] = []
    problems: list[str] = []
    for pattern in patterns:
        chosen += [n for n in _matching(key, pattern, names, problems) if n not in chosen]
    return chosen, problems


def model_param_groups(
    model: MultitaskClassifier,
    param_groups: Mapping[str, Mapping[str, Any]],
    frozen: Sequence[str] = (),
    layer_lr_decay: Mapping[str, float | LayerDecay] | None = None,
    lr: float | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The model's optimizer groups: the default group first, then one per pattern, then one
    per layer below the top of each ``layer_lr_decay`` module (:func:`layer_groups`).

    Groups carry ``"scope": "model"`` (and ``"name"``: the pattern, or ``module.layer``); frozen
    parameters are left out.

    Returns:
        ``(groups, problems)``: patterns matching no module, modules matched by two patterns,
        layer problems.
    """
    names = list(model.module_pool)
    problems: list[str] = []
    owner: dict[str, str] = {}  # module -> pattern
    for pattern in param_groups:
        for module_name in _matching("param_groups", pattern, names, problems):
            if module_name in owner:
                problems.append(
                    f"param_groups: module '{module_name}' matches both '{owner[module_name]}' "
                    f"and '{pattern}'; make the patterns disjoint"
                )
            else:
                owner[module_name] = pattern
    skip = {id(p) for m in frozen for p in model.module_pool[m].parameters()}
    grouped: dict[str, list[nn.Parameter]] = {pattern: [] for pattern in param_groups}
    default: list[nn.Parameter] = []
    seen: set[int] = set(skip)
    for module_name, module in model.module_pool.items():
        target = grouped[owner[module_name]] if module_name in owner else default
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                target.append(p)
    groups: list[dict[str, Any]] = [{"params": default, "scope": "model"}]
    for pattern, params in grouped.items():
        if params:
            groups.append(
                {**param_groups[pattern], "params": params, "scope": "model", "name": pattern}
            )
    if layer_lr_decay:
        if lr is None:
            raise TypeError("model_param_groups: layer_lr_decay needs lr (the default group's)")
        problems += layer_groups(model, groups, layer_lr_decay, frozen, lr)
    return groups, problems


def layer_groups(
    model: MultitaskClassifier,
    groups: list[dict[str, Any]],
    layer_lr_decay: Mapping[str, float | LayerDecay],
    frozen: Sequence[str],
    lr: float,
) -> list[str]:
    """Split ``groups`` by layer for ``layer_lr_decay``: a layer ``k`` layers below its
    module's top trains at ``decay ** k`` times the lr of the group it leaves (its options
    kept; named ``module.layer``); the top layer and parameters above it stay. Returns the
    problems (patterns matching no module, frozen modules, layers not found)."""
    names = list(model.module_pool)
    problems: list[str] = []
    group_of = {id(p): g for g in groups for p in g["params"]}
    moved: set[int] = set()
    added: list[dict[str, Any]] = []
    for pattern, spec in layer_lr_decay.items():
        decay = as_layer_decay(spec)
        where = f"layer_lr_decay.{pattern}"
        for module_name in _matching("layer_lr_decay", pattern, names, problems):
            if module_name in frozen:
                problems.append(f"{where}: module '{module_name}' is frozen (trainer.freeze)")
                continue
            layers, found = module_layers(
                model.module_pool[module_name], decay.layers, f"{where}.layers"
            )
            problems += found
            if not layers and not found:
                problems.append(
                    f"{where}: module '{module_name}' has no nn.ModuleList or nn.Sequential of 2 "
                    "or more layers; name its layers bottom to top (layers: [...])"
                )
            if layers and not any(id(p) in group_of for layer in layers for p in layer.params):
                problems.append(
                    f"{where}: the layers of module '{module_name}' do not train (a frozen "
                    "encoder: freeze: true); decay the lr of a module that trains"
                )
            for depth, layer in enumerate(reversed(layers)):
                params = [p for p in layer.params if id(p) in group_of and id(p) not in moved]
                if depth == 0 or not params:
                    continue
                by_group: dict[int, list[nn.Parameter]] = {}
                for p in params:
                    by_group.setdefault(id(group_of[id(p)]), []).append(p)
                for ps in by_group.values():
                    source = group_of[id(ps[0])]
                    base = source.get("lr", lr)
                    options = {k: v for k, v in source.items() if k not in ("params", "name")}
                    added.append(
                        {
                            **options,
                            "lr": base * decay.decay**depth,
                            "params": ps,
                            "name": f"{module_name}.{layer.name}",
                        }
                    )
                moved.update(id(p) for p in params)
    for g in groups:
        g["params"] = [p for p in g["params"] if id(p) not in moved]
    groups[1:] = [g for g in groups[1:] if g["params"]]  # a pattern's group may be all layers
    groups.extend(added)
    return problems


def freeze_modules(model: MultitaskClassifier, frozen: Sequence[str]) -> None:
    """Set ``requires_grad = False`` on every parameter of the named modules."""
    for module_name in frozen:
        for p in model.module_pool[module_name].parameters():
            p.requires_grad_(False)


class SubsetStepper:
    """Steps a torch optimizer on the parameters of one execution plan only.

    For a step the optimizer's ``param_groups`` are narrowed to the parameters the plan touched;
    the update is identical to ``optimizer.step()``, its cost no longer grows with the task count.

    Args:
        optimizer: The optimizer. Groups whose ``"scope"`` is ``"model"`` are narrowed to the
            plan's parameters, groups whose scope is ``"balancer"`` to ``balancer_params(tasks)``
            (when given and not ``None``); other groups are stepped whole.
        balancer_params: ``task names -> parameters`` of a learned balancer, or ``None`` for all.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        balancer_params: Callable[[Sequence[str]], Sequence[nn.Parameter] | None] | None = None,
    ) -> None:
        self.optimizer = optimizer
        self.full_groups = optimizer.param_groups
        self.base_lrs = [float(g["lr"]) for g in self.full_groups]
        self.balancer_params = balancer_params
        self._group_of = {
            id(p): i
            for i, g in enumerate(self.full_groups)
            if g.get("scope") in ("model", "balancer")
            for p in g["params"]
        }
        self._subsets: dict[tuple[str, ...], Narrowed] = {}
        # the non-finite guard: with it, a non-finite clipped norm drops the step
        self.guard_norm = False
        self.nonfinite_norm: float | None = None  # the last dropped step's norm, for the guard

    def set_lr_factor(self, factor: float) -> None:
        """Set every group's lr to its base lr times ``factor``."""
        for group, base in zip(self.full_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def load_state_dict(self, state: Mapping[str, Any], keep_settings: bool = False) -> None:
        """Load an optimizer ``state_dict`` (saved outside :meth:`step`, with full groups).

        Base learning rates stay those of the config: the saved ``lr`` values are scheduled ones.
        With ``keep_settings`` every group keeps its current hyper-parameters (``lr``,
        ``weight_decay``, betas, ...) instead of the saved ones: a resume with changed settings.
        """
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.full_groups]
        self.optimizer.load_state_dict(dict(state))
        if keep_settings:
            for group, kept in zip(self.optimizer.param_groups, settings, strict=True):
                group.update(kept)
        self.full_groups = self.optimizer.param_groups  # load_state_dict builds new group dicts
        self._subsets.clear()

    def step(
        self,
        plan: ExecutionPlan,
        grad_clip: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """``optimizer.step()`` restricted to the plan's parameters (cached per task set).

        With a ``scaler`` the gradients are unscaled first; ``grad_clip`` then clips the global
        L2 norm of the plan's model gradients.
        """
        narrowed = self._subsets.get(plan.task_names)
        if narrowed is None:
            narrowed = self._subsets[plan.task_names] = self._narrow(
                plan.parameters, plan.task_names
            )
        if grad_clip is None and scaler is None:  # the common step: no unscale, no clip
            groups, pairs = narrowed
            for sub, full in pairs:
                sub["lr"] = full["lr"]
            optimizer = self.optimizer
            optimizer.param_groups = groups
            try:
                optimizer.step()
            finally:
                optimizer.param_groups = self.full_groups
        else:
            self._step(narrowed, plan.parameters, grad_clip, scaler)

    def step_union(
        self,
        task_names: Sequence[str],
        params: Sequence[nn.Parameter],
        grad_clip: float | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        """Like :meth:`step` for the union of several plans' parameters (not cached)."""
        self._step(self._narrow(params, task_names), params, grad_clip, scaler)

    def _step(
        self,
        narrowed: Narrowed,
        params: Sequence[nn.Parameter],
        grad_clip: float | None,
        scaler: torch.amp.GradScaler | None,
    ) -> None:
        groups, pairs = narrowed
        for sub, full in pairs:
            sub["lr"] = full["lr"]
        self.optimizer.param_groups = groups
        try:
            if scaler is not None:
                scaler.unscale_(self.optimizer)
            if grad_clip is not None:
                norm = torch.nn.utils.clip_grad_norm_(
                    [p for p in params if p.grad is not None], grad_clip
                )
                if self.guard_norm and scaler is None and not bool(torch.isfinite(norm)):
                    self.nonfinite_norm = float(norm)  # TrainStep reports it; no update
                    return
            if scaler is not None:
                scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        finally:
            self.optimizer.param_groups = self.full_groups

    def _narrow(self, params: Iterable[nn.Parameter], task_names: Sequence[str]) -> Narrowed:
        """Narrowed copies of the groups and ``(copy, full group)`` pairs, in O(touched
        parameters)."""
        picked: dict[int, list[nn.Parameter]] = {}
        for p in params:
            i = self._group_of.get(id(p))
            if i is not None and self.full_groups[i].get("scope") == "model":
                picked.setdefault(i, []).append(p)
        extra = self.balancer_params(task_names) if self.balancer_params is not None else None
        if extra is not None:
            for p in extra:
                i = self._group_of.get(id(p))
                if i is not None:
                    picked.setdefault(i, []).append(p)
        out = []
        for i, group in enumerate(self.full_groups):
            scope = group.get("scope")
            if scope == "model" or (scope == "balancer" and extra is not None):
                chosen = picked.get(i, [])
            else:
                chosen = group["params"]
            if chosen:
                out.append(({**group, "params": chosen}, group))
        return [sub for sub, _ in out], out


class StepControl:
    """Mixed precision, loss scaling, gradient accumulation and clipping around the optimizer.

    Without ``amp`` and with ``N = 1`` every part is a no-op: one path for all. Losses are
    divided by ``accumulation_steps`` (``N``); when only ``r < N`` micro-steps produced gradients,
    they are multiplied by ``N/r`` before the step (docs/training.md).

    Args:
        amp: ``None``, ``"bf16"`` (CPU and CUDA) or ``"fp16"`` (CUDA only, with a grad scaler).
        accumulation_steps: Micro-steps per optimizer step (``N >= 1``).
        grad_clip: Max global L2 norm of the step's model gradients, or ``None``.
        device: The model's device.

    Raises:
        ConfigError: ``amp="fp16"`` on a device other than CUDA.

    Example:
        >>> import torch
        >>> from mtlgraph.training.optim import StepControl
        >>> ctl = StepControl(None, 4, None, torch.device("cpu"))
        >>> float(ctl.scale(torch.tensor(2.0)))  # the loss of one of 4 micro-steps
        0.5
    """

    def __init__(
        self,
        amp: str | None,
        accumulation_steps: int,
        grad_clip: float | None,
        device: torch.device,
    ) -> None:
        if amp == "fp16" and device.type != "cuda":
            raise ConfigError(
                [
                    f"amp: 'fp16' needs a CUDA device (the model is on {device.type}); use "
                    "amp='bf16' on this device, or move the model to CUDA"
                ]
            )
        self.amp = amp
        self.device_type = device.type
        self.n = accumulation_steps
        self.grad_clip = grad_clip
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
        self.plain = self.scaler is None and accumulation_steps == 1  # loss differentiated as is
        self.pending: list[ExecutionPlan] = []
        self.micro_steps = 0  # micro-steps since the last optimizer step, empty ones included

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The forward pass's autocast context (a no-op without ``amp``)."""
        if self.amp is None:
            return NO_CONTEXT
        return torch.autocast(self.device_type, dtype=AMP_DTYPES[self.amp])

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as it is differentiated: times the fp16 loss scale, divided by ``N``."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        return loss / self.n if self.n != 1 else loss

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of the scaled loss."""
        if self.plain:
            loss.backward()
        else:
            self.scale(loss).backward()

    def add(self, plan: ExecutionPlan | None) -> None:
        """Record a micro-step; ``plan`` is what it produced gradients for (``None``: nothing)."""
        self.micro_steps += 1
        if plan is not None:
            self.pending.append(plan)

    def ready(self, end_of_epoch: bool) -> bool:
        """Whether the optimizer steps now (``N`` micro-steps, or the epoch's last ones)."""
        return self.micro_steps >= self.n or (end_of_epoch and self.micro_steps > 0)

    def step(self, stepper: SubsetStepper, balancer_params: Sequence[nn.Parameter] | None) -> None:
        """Step the optimizer on the accumulated gradients and zero them (nothing to step when
        no micro-step produced gradients).

        Args:
            stepper: The subset stepper.
            balancer_params: Learned balancer parameters to zero afterwards (``None``: none).
        """
        plans = self.pending
        self.micro_steps = 0
        if not plans:
            return
        self.pending = []
        if len(plans) == 1:  # the common step: one plan, its narrowed groups cached
            plan = plans[0]
            params: Sequence[nn.Parameter] = plan.parameters
            if self.n != 1:  # the mean over the one micro-step that produced gradients
                _scale_grads([*params, *(balancer_params or ())], float(self.n))
            stepper.step(plan, self.grad_clip, self.scaler)
        else:
            params = self._step_plans(plans, stepper, balancer_params)
        if self.scaler is not None:
            self.scaler.update()
        for p in params:
            p.grad = None
        if balancer_params:
            for p in balancer_params:
                p.grad = None

    def _step_plans(
        self,
        plans: Sequence[ExecutionPlan],
        stepper: SubsetStepper,
        balancer_params: Sequence[nn.Parameter] | None,
    ) -> Sequence[nn.Parameter]:
        """Step several micro-steps' plans; the parameters stepped."""
        first = plans[0]
        if all(p.task_names == first.task_names for p in plans):
            params: Sequence[nn.Parameter] = first.parameters
        else:
            params = list({id(p): p for plan in plans for p in plan.parameters}.values())
        if len(plans) < self.n:  # the mean over the micro-steps that produced gradients
            _scale_grads([*params, *(balancer_params or ())], self.n / len(plans))
        if params is first.parameters:
            stepper.step(first, self.grad_clip, self.scaler)
        else:
            names = list(dict.fromkeys(t for plan in plans for t in plan.task_names))
            stepper.step_union(names, params, self.grad_clip, self.scaler)
        return params


def _scale_grads(params: Iterable[nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)
