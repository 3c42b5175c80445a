"""The ``gradual_unfreezing`` hook: a pretrained module's layers thaw top-down on a schedule
(ULMFiT's gradual unfreezing), exactly again after a resume (docs/training.md § Fine-tuning
pretrained modules)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ArgumentCheck, ConfigError
from mtlgraph.metrics import make_key
from mtlgraph.training.hooks import HOOKS, Every, Hook, Run
from mtlgraph.training.layers import Layer, module_layers

logger = logging.getLogger(__name__)


class GradualUnfreezing(Hook):
    """Train a module's top ``initial`` layers first, then unfreeze ``count`` more, top-down,
    every ``every`` epochs (or steps), until all train.

    The layers are those of ``layer_lr_decay`` (:func:`~mtlgraph.training.layers.module_layers`:
    for a Hugging Face text encoder the embeddings, then ``encoder.layer.0`` ... ``N-1``);
    parameters above the top layer (a pooler) train from the start. The frozen layers stay in
    the optimizer without gradients, so they take no update and no optimizer state until they
    thaw. The number of unfrozen layers is checkpointed: a resumed run thaws at the same steps.
    When ``fit`` ends, the layers' ``requires_grad`` are restored to what they were.

    Args:
        module: The module's name in the model's pool.
        every: Unfreeze after every ``every`` ``unit`` (>= 1).
        unit: ``"epochs"`` or ``"steps"`` (optimizer steps).
        count: Layers unfrozen each time (>= 1).
        initial: Layers trainable from the start, counted from the top (>= 0).
        layers: The module's layers bottom to top, as submodule names or patterns
            (``["embeddings", "encoder.layer.*"]``); ``None``: found.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from mtlgraph import (DictDataLoader, DictDataset, MultitaskClassifier, Operation,
        ...                       Task, Trainer)
        >>> from mtlgraph.training import GradualUnfreezing
        >>> trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8))
        >>> task = Task("t", {"trunk": trunk, "head": nn.Linear(8, 2)},
        ...             [Operation("trunk", [("_input_", "x")]), Operation("head", ["trunk"])])
        >>> x = torch.randn(32, 4); y = (x[:, 0] > 0).long()
        >>> loader = DictDataLoader(DictDataset("d", "train", {"x": x}, {"t": y}), batch_size=8)
        >>> first = trunk[0].weight.detach().clone()
        >>> hook = GradualUnfreezing("trunk", every=1, unit="epochs")
        >>> Trainer(n_epochs=2, progress_bar=False, hooks=[hook]).fit(
        ...     MultitaskClassifier([task]), [loader])
        >>> hook.unfrozen, bool(torch.equal(trunk[0].weight, first))  # 2 of 3 layers thawed
        (2, True)
    """

    name = "gradual_unfreezing"

    def __init__(
        self,
        module: str,
        every: int = 1,
        unit: Literal["epochs", "steps"] = "epochs",
        count: int = 1,
        initial: int = 0,
        layers: list[str] | None = None,
    ) -> None:
        check = ArgumentCheck("gradual_unfreezing")
        check.require(
            isinstance(module, str) and bool(module),
            f"module must be a module name, got {module!r}",
        )
        check.integer("every", every)
        check.choice("unit", unit, ("epochs", "steps"))
        check.integer("count", count)
        check.integer("initial", initial, least=0)
        check.done()
        self.module, self.count, self.layer_names = module, count, layers
        self.every = Every.of(every, unit)
        self.unfrozen = initial  # layers trainable now, from the top
        self.layers: list[Layer] = []
        self.saved: list[tuple[nn.Parameter, bool]] = []  # requires_grad before the fit

    def on_fit_start(self, run: Run) -> None:
        """Find the layers (every problem at once), then freeze all but the top ``unfrozen``."""
        pool: Mapping[str, nn.Module] = getattr(run.model, "module_pool", {})
        where = "gradual_unfreezing"
        if self.module not in pool:
            raise ConfigError(
                [
                    f"{where}: module '{self.module}' is no module of the model"
                    f"{did_you_mean(self.module, pool)}; modules: {quoted(pool)}"
                ]
            )
        layers, problems = module_layers(pool[self.module], self.layer_names, f"{where}.layers")
        if not layers and not problems:
            problems.append(
                f"{where}: module '{self.module}' has no nn.ModuleList or nn.Sequential of 2 or "
                "more layers; name its layers bottom to top (layers: [...])"
            )
        stepped = {id(p) for group in run.optimizer.param_groups for p in group["params"]}
        if any(id(p) not in stepped for layer in layers for p in layer.params):
            problems.append(
                f"{where}: parameters of module '{self.module}' are not in the optimizer (it is "
                "in trainer.freeze, or was frozen before fit): remove it from freeze and set "
                "requires_grad_(True) on it"
            )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            problems.append(
                f"{where}: not available under DDP, which fixes the trained parameters when it "
                "wraps the model; unfreeze between runs instead"
            )
        if problems:
            raise ConfigError(problems)
        self.layers = layers
        self.saved = [(p, p.requires_grad) for layer in layers for p in layer.params]
        self.apply(run)

    def on_step_end(self, run: Run) -> None:
        self.thaw(run)

    def on_epoch_end(self, run: Run) -> None:
        self.thaw(run)

    def on_evaluate_end(self, run: Run, scores: Mapping[str, float]) -> None:
        """Log the layers that trained in the last step (evaluation comes before the thaw)."""
        key = make_key("model", "all", "train", f"unfrozen_layers/{self.module}")
        run.log({key: min(self.unfrozen, len(self.layers))})

    def on_fit_end(self, run: Run) -> None:
        for p, flag in self.saved:
            p.requires_grad_(flag)
        self.saved = []

    def thaw(self, run: Run) -> None:
        """Unfreeze ``count`` more layers (none left: nothing)."""
        if self.unfrozen < len(self.layers):
            self.unfrozen = min(len(self.layers), self.unfrozen + self.count)
            self.apply(run)
            logger.info(
                "step %d: %d of %d layers of module '%s' train",
                run.global_step,
                self.unfrozen,
                len(self.layers),
                self.module,
            )

    def apply(self, run: Run) -> None:
        """``requires_grad`` for the top ``unfrozen`` layers only; the balancer is set up again
        (gradient methods cache which parameters train)."""
        bottom = len(self.layers) - min(self.unfrozen, len(self.layers))
        for i, layer in enumerate(self.layers):
            for p in layer.params:
                p.requires_grad_(i >= bottom)
        tasks = getattr(run.model, "tasks", None)
        if tasks is not None:
            run.balancer.setup(tasks)

    def state_dict(self) -> dict[str, Any]:
        return {"unfrozen": self.unfrozen}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.unfrozen = int(state["unfrozen"])


HOOKS.register("gradual_unfreezing", GradualUnfreezing)
