"""Metrics, the :class:`Scorer`, and the flat ``task/dataset/split/metric`` keys.

Every built-in metric is a thin wrapper over scikit-learn (or SciPy for the correlations) and
returns a plain ``float`` equal to what that library computes on the same, masked arrays. Each
metric carries ``higher_is_better``, which checkpointing (best-by-metric) and the
``inverse_metric`` balancer read.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError

logger = logging.getLogger(__name__)

MetricFunc = Callable[..., float]
"""``func(golds, preds, probs, **kwargs) -> float`` on masked numpy arrays."""

SEP = "/"


@dataclass(frozen=True)
class Metric:
    """A named metric with its direction.

    Attributes:
        name: Registry name; also the last part of a score key unless a spec renames it.
        func: ``func(golds, preds, probs, **kwargs) -> float`` on masked numpy arrays.
        higher_is_better: ``True`` when larger values are better (accuracy), ``False`` for errors.
        defaults: Keyword arguments passed to ``func`` unless the spec overrides them.
    """

    name: str
    func: MetricFunc
    higher_is_better: bool
    defaults: Mapping[str, Any] = field(default_factory=dict)


def _average(golds: np.ndarray, probs: np.ndarray, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Default ``average`` for precision/recall/f1: binary for two classes, else macro.

    Label matrices ``(N, L)`` (multilabel) default to ``micro``: pooled over elements, which is
    what the same metric gives when ignored elements have been masked out (flattened).
    """
    if "average" not in kwargs:
        if golds.ndim == 2:
            kwargs = {**kwargs, "average": "micro"}
        else:
            binary = probs.ndim == 1 or probs.shape[1] <= 2
            kwargs = {**kwargs, "average": "binary" if binary else "macro"}
    if kwargs["average"] != "binary":
        kwargs.pop("pos_label", None)
    kwargs.setdefault("zero_division", 0.0)
    return kwargs


def _accuracy(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    """Fraction correct; for label matrices ``(N, L)`` the fraction of correct *elements*
    (Hamming accuracy), so masking single elements does not change what is measured."""
    if golds.ndim == 2 and preds.shape == golds.shape:
        return float(skm.accuracy_score(golds.reshape(-1), preds.reshape(-1), **kw))
    return float(skm.accuracy_score(golds, preds, **kw))


def _precision(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    return float(skm.precision_score(golds, preds, **_average(golds, probs, kw)))


def _recall(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    return float(skm.recall_score(golds, preds, **_average(golds, probs, kw)))


def _f1(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    return float(skm.f1_score(golds, preds, **_average(golds, probs, kw)))


def _fbeta(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    return float(skm.fbeta_score(golds, preds, **_average(golds, probs, kw)))


def _mcc(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    return float(skm.matthews_corrcoef(golds, preds, **kw))


def _roc_auc(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    if len(np.unique(golds)) < 2:
        logger.warning("roc_auc is undefined when the golds hold one class only; reporting nan")
        return math.nan
    scores = probs
    if probs.ndim == 2 and probs.shape[1] == 2:
        scores = probs[:, 1]
    elif probs.ndim == 2:
        kw = {"multi_class": "ovr", **kw}
    return float(skm.roc_auc_score(golds, scores, **kw))


def _flat(golds: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return golds.reshape(len(golds), -1).astype(float), preds.reshape(len(preds), -1).astype(float)


def _mse(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    return float(skm.mean_squared_error(*_flat(golds, preds), **kw))


def _mae(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    return float(skm.mean_absolute_error(*_flat(golds, preds), **kw))


def _r2(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
    if len(golds) < 2:
        return math.nan
    return float(skm.r2_score(*_flat(golds, preds), **kw))


def _correlation(kind: str) -> MetricFunc:
    def corr(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, **kw: Any) -> float:
        g, p = (a.reshape(-1).astype(float) for a in (golds, preds))
        if len(g) < 2 or np.ptp(g) == 0 or np.ptp(p) == 0:
            return math.nan  # undefined for constant input
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
            return float(fn(g, p, **kw)[0])

    return corr


_REGISTRY: dict[str, Metric] = {}


def register_metric(name: str, func: MetricFunc, higher_is_better: bool, **defaults: Any) -> Metric:
    """Register a metric under ``name`` so scorers and configs can refer to it.

    Args:
        name: Registry name (no ``/``). Registering an existing name is an error.
        func: ``func(golds, preds, probs, **kwargs) -> float``.
        higher_is_better: Direction used by best-checkpoint selection and balancers.
        **defaults: Default keyword arguments for ``func``.

    Returns:
        The registered :class:`Metric`.

    Example:
        >>> import numpy as np
        >>> from mtlgraph.metrics import register_metric, get_metric
        >>> m = register_metric("max_error_doc", lambda g, p, pr: float(np.abs(g - p).max()), False)
        >>> get_metric("max_error_doc").higher_is_better
        False
    """
    if SEP in name or not name:
        raise ConfigError([f"metric name {name!r} must be non-empty and contain no '/'"])
    if name in _REGISTRY:
        raise ConfigError([f"metric '{name}' is already registered; pick another name"])
    metric = Metric(name, func, higher_is_better, dict(defaults))
    _REGISTRY[name] = metric
    return metric


def get_metric(name: str) -> Metric:
    """Return the registered metric ``name``; unknown names raise with a suggestion."""
    if name not in _REGISTRY:
        raise ConfigError(
            [f"unknown metric '{name}'{did_you_mean(name, _REGISTRY)}; known: {quoted(_REGISTRY)}"]
        )
    return _REGISTRY[name]


def metric_names() -> list[str]:
    """Names of all registered metrics, sorted."""
    return sorted(_REGISTRY)


for _name, _func, _hib, _defaults in [
    ("accuracy", _accuracy, True, {}),
    ("precision", _precision, True, {}),
    ("recall", _recall, True, {}),
    ("f1", _f1, True, {}),
    ("fbeta", _fbeta, True, {"beta": 1.0}),
    ("matthews_corrcoef", _mcc, True, {}),
    ("roc_auc", _roc_auc, True, {}),
    ("mse", _mse, False, {}),
    ("mae", _mae, False, {}),
    ("r2", _r2, True, {}),
    ("pearson", _correlation("pearson"), True, {}),
    ("spearman", _correlation("spearman"), True, {}),
]:
    register_metric(_name, _func, _hib, **_defaults)


MetricSpec = str | Mapping[str, Any]
"""A metric name, or ``{"name": ..., "key": optional output name, **kwargs}``."""


@dataclass(frozen=True)
class _Bound:
    key: str
    func: MetricFunc
    kwargs: Mapping[str, Any]
    higher_is_better: bool


def _check_part(value: object, what: str, problems: list[str]) -> None:
    if not isinstance(value, str) or not value or SEP in value:
        problems.append(f"{what} {value!r} must be a non-empty string without '/'")


class Scorer:
    """Computes a task's metrics on gold labels, predictions and probabilities.

    Labels equal to the ignore value are masked out first: whole rows for 1-D labels, single
    elements for 2-D labels (multilabel and multi-output regression).

    Args:
        metrics: Registered metric names, or specs ``{"name": "fbeta", "beta": 2, "key": "f2"}``
            where ``key`` renames the output and other entries are keyword arguments.
        custom_metric_funcs: ``{key: func(golds, preds, probs) -> float}``; a function may carry
            a ``higher_is_better`` attribute (default ``True``).

    Raises:
        ConfigError: Unknown metric names (with a suggestion), duplicate keys, or keys with ``/``.

    Example:
        >>> import numpy as np
        >>> from mtlgraph import Scorer
        >>> scorer = Scorer(metrics=["accuracy", "f1"])
        >>> golds = np.array([0, 1, 1, -1]); preds = np.array([0, 1, 0, 1])
        >>> probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
        >>> {k: round(v, 3) for k, v in scorer.score(golds, preds, probs).items()}
        {'accuracy': 0.667, 'f1': 0.667}
    """

    def __init__(
        self,
        metrics: Sequence[MetricSpec] = ("accuracy",),
        custom_metric_funcs: Mapping[str, MetricFunc] | None = None,
    ) -> None:
        problems: list[str] = []
        bound: list[_Bound] = []
        if isinstance(metrics, str):
            metrics = [metrics]
        for spec in metrics:
            if isinstance(spec, str):
                name, key, kwargs = spec, spec, {}
            elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
                kwargs = {k: v for k, v in spec.items() if k not in ("name", "key")}
                name = spec["name"]
                key = spec.get("key", name)
            else:
                problems.append(f"metric spec {spec!r} must be a name or a mapping with 'name'")
                continue
            if name not in _REGISTRY:
                problems.append(
                    f"unknown metric '{name}'{did_you_mean(name, _REGISTRY)}; "
                    f"known: {quoted(_REGISTRY)}"
                )
                continue
            _check_part(key, "metric key", problems)
            m = _REGISTRY[name]
            bound.append(_Bound(key, m.func, {**m.defaults, **kwargs}, m.higher_is_better))
        for key, func in (custom_metric_funcs or {}).items():
            _check_part(key, "custom metric key", problems)
            if not callable(func):
                problems.append(f"custom metric '{key}' is not callable")
                continue
            hib = bool(getattr(func, "higher_is_better", True))
            bound.append(_Bound(key, func, {}, hib))
        seen: set[str] = set()
        for b in bound:
            if b.key in seen:
                problems.append(f"metric key '{b.key}' is listed twice; give one a 'key'")
            seen.add(b.key)
        if problems:
            raise ConfigError(problems, header="invalid Scorer:" if len(problems) > 1 else None)
        self._bound = bound

    @property
    def metric_keys(self) -> list[str]:
        """The keys :meth:`score` returns, in order."""
        return [b.key for b in self._bound]

    def higher_is_better(self, key: str) -> bool:
        """Direction of the metric reported under ``key``."""
        for b in self._bound:
            if b.key == key:
                return b.higher_is_better
        raise KeyError(f"scorer has no metric '{key}'{did_you_mean(key, self.metric_keys)}")

    def score(
        self,
        golds: np.ndarray,
        preds: np.ndarray,
        probs: np.ndarray,
        ignore_value: float | int | None = -1,
    ) -> dict[str, float]:
        """Score predictions against golds, masking labels equal to ``ignore_value``.

        Args:
            golds: Gold labels, shape ``(N,)`` or ``(N, L)``.
            preds: Predictions, same leading dimension (``(N,)`` or the shape of ``golds``).
            probs: Output-function values, ``(N,)``, ``(N, C)`` or the shape of ``golds``.
            ignore_value: Labels equal to this are masked; ``nan`` masks NaN labels; ``None``
                masks nothing.

        Returns:
            ``{metric_key: float}``; every metric is ``nan`` when no label is active.
        """
        golds, preds, probs = np.asarray(golds), np.asarray(preds), np.asarray(probs)
        golds, preds, probs = _mask(golds, preds, probs, ignore_value)
        out: dict[str, float] = {}
        for b in self._bound:
            if len(golds) == 0:
                out[b.key] = math.nan
                continue
            try:
                value = b.func(golds, preds, probs, **b.kwargs)
            except Exception as e:
                e.add_note(f"while computing metric '{b.key}'")
                raise
            out[b.key] = float(value)
        return out


def _mask(
    golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, ignore: float | int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if ignore is None:
        return golds, preds, probs
    if isinstance(ignore, float) and math.isnan(ignore):
        active = ~np.isnan(golds.astype(float))
    else:
        active = golds != ignore
    if active.all():
        return golds, preds, probs
    if golds.ndim == 1:
        return golds[active], preds[active], probs[active]
    # Per-element masking: flatten golds/preds/probs of the same shape into 1-D element lists.
    p = probs[active] if probs.shape == golds.shape else probs
    return golds[active], preds[active], p


def make_key(task: str, dataset: str, split: str, metric: str) -> str:
    """Join the four parts of a score key: ``task/dataset/split/metric``."""
    return SEP.join((task, dataset, split, metric))


def split_key(key: str) -> tuple[str, str, str, str]:
    """Split a ``task/dataset/split/metric`` key into its parts.

    The metric part may itself hold ``/`` (as in ``model/all/train/weight/circle_task``), so only
    the first three separators split.
    """
    parts = key.split(SEP, 3)
    if len(parts) != 4:
        raise ValueError(f"{key!r} is not a task/dataset/split/metric key")
    return parts[0], parts[1], parts[2], parts[3]
