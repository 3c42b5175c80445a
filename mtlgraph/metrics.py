"""Metrics, the :class:`Scorer`, the ignore mask, and the flat ``task/dataset/split/metric`` keys.

Built-in metrics wrap scikit-learn / SciPy (imported on first call) and live in :data:`METRICS`;
add one with :func:`register_metric` (``docs/concepts.md``).
"""

from __future__ import annotations

import inspect
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from mtlgraph._suggest import did_you_mean
from mtlgraph.exceptions import ConfigError, UnknownNameError
from mtlgraph.registry import Registry, argument_problems

__all__ = [
    "METRICS",
    "SEP",
    "Metric",
    "Scorer",
    "active_mask",
    "active_rows",
    "make_key",
    "metric_spec_problems",
    "register_metric",
    "split_key",
    "split_scores",
]

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MetricFunc = Callable[..., float]
"""``func(golds, preds, probs, **kwargs) -> float`` on masked numpy arrays."""

SEP = "/"

# ---------------------------------------------------------------- the ignore mask


@overload
def active_mask(labels: torch.Tensor, ignore: float | int | None) -> torch.Tensor: ...
@overload
def active_mask(labels: np.ndarray, ignore: float | int | None) -> np.ndarray: ...
def active_mask(labels: Any, ignore: float | int | None) -> Any:
    """Elementwise mask of the labels that count: those not equal to the ignore value.

    Works on tensors and arrays; ``ignore`` is a value (``-1``), ``nan``, or ``None`` (nothing).

    Example:
        >>> import numpy as np, torch
        >>> active_mask(torch.tensor([0, -1, 2]), -1).tolist()
        [True, False, True]
        >>> active_mask(np.array([1.0, np.nan]), float("nan")).tolist()
        [True, False]
    """
    if ignore is None:
        return (labels == labels) | (labels != labels)  # all True, whatever the values
    if isinstance(ignore, float) and math.isnan(ignore):
        return labels == labels  # NaN is the one value unequal to itself
    return labels != ignore


@overload
def active_rows(labels: torch.Tensor, ignore: float | int | None) -> torch.Tensor: ...
@overload
def active_rows(labels: np.ndarray, ignore: float | int | None) -> np.ndarray: ...
def active_rows(labels: Any, ignore: float | int | None) -> Any:
    """Rows with at least one label that is not the ignore value (see :func:`active_mask`)."""
    active = active_mask(labels, ignore)
    return active if active.ndim == 1 else active.reshape(len(active), -1).any(1)


# ---------------------------------------------------------------- built-in metrics


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


def _skm() -> Any:
    """``sklearn.metrics``, imported on first use (it costs about as much as torch)."""
    from sklearn import metrics

    return metrics


def _averaged(
    golds: np.ndarray,
    probs: np.ndarray,
    average: str | None,
    pos_label: int | str,
    labels: Sequence[Any] | None,
    zero_division: float | str,
) -> dict[str, Any]:
    """Keyword arguments for precision/recall/f/fbeta; ``average=None``: binary for two
    classes, else macro; ``micro`` (pooled over elements) for label matrices ``(N, L)``."""
    if average is None:
        if golds.ndim == 2:
            average = "micro"
        else:
            average = "binary" if probs.ndim == 1 or probs.shape[1] <= 2 else "macro"
    kwargs: dict[str, Any] = {"average": average, "labels": labels, "zero_division": zero_division}
    if average == "binary":
        kwargs["pos_label"] = pos_label
    return kwargs


def _accuracy(
    golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, normalize: bool = True
) -> float:
    """Fraction correct; for label matrices ``(N, L)`` the fraction of correct *elements*
    (Hamming accuracy), so masking single elements does not change what is measured."""
    if golds.ndim == 2 and preds.shape == golds.shape:
        golds, preds = golds.reshape(-1), preds.reshape(-1)
    return float(_skm().accuracy_score(golds, preds, normalize=normalize))


def _averaged_score(sklearn_name: str, **extra: float) -> MetricFunc:
    """``sklearn.metrics.<sklearn_name>`` with :func:`_averaged`; ``extra`` (``beta=1.0``) joins
    the signature that specs are checked against."""

    def score(
        golds: np.ndarray,
        preds: np.ndarray,
        probs: np.ndarray,
        average: str | None = None,
        pos_label: int | str = 1,
        labels: Sequence[Any] | None = None,
        zero_division: float | str = 0.0,
        **kwargs: Any,
    ) -> float:
        kw = _averaged(golds, probs, average, pos_label, labels, zero_division)
        return float(getattr(_skm(), sklearn_name)(golds, preds, **{**extra, **kwargs}, **kw))

    params = list(inspect.signature(score).parameters.values())[:-1]  # without **kwargs
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    added = [inspect.Parameter(k, kind, default=v, annotation=float) for k, v in extra.items()]
    sig = inspect.Signature(params[:3] + added + params[3:], return_annotation=float)
    score.__signature__ = sig  # type: ignore[attr-defined]
    score.__annotations__.update(dict.fromkeys(extra, "float"))  # for the type check of specs
    score.__name__ = score.__qualname__ = f"_{sklearn_name}"
    return score


def _mcc(golds: np.ndarray, preds: np.ndarray, probs: np.ndarray) -> float:
    return float(_skm().matthews_corrcoef(golds, preds))


def _roc_auc(
    golds: np.ndarray,
    preds: np.ndarray,
    probs: np.ndarray,
    average: str | None = "macro",
    multi_class: str = "ovr",
    max_fpr: float | None = None,
    labels: Sequence[Any] | None = None,
) -> float:
    if len(np.unique(golds)) < 2:
        logger.warning("roc_auc is undefined when the golds hold one class only; reporting nan")
        return math.nan
    kw: dict[str, Any] = {"average": average, "max_fpr": max_fpr, "labels": labels}
    scores = probs
    if probs.ndim == 2 and probs.shape[1] == 2:
        scores = probs[:, 1]
    elif probs.ndim == 2:
        kw["multi_class"] = multi_class
    return float(_skm().roc_auc_score(golds, scores, **kw))


def _flat(golds: np.ndarray, preds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return golds.reshape(len(golds), -1).astype(float), preds.reshape(len(preds), -1).astype(float)


def _mse(
    golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, multioutput: str = "uniform_average"
) -> float:
    return float(_skm().mean_squared_error(*_flat(golds, preds), multioutput=multioutput))


def _mae(
    golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, multioutput: str = "uniform_average"
) -> float:
    return float(_skm().mean_absolute_error(*_flat(golds, preds), multioutput=multioutput))


def _r2(
    golds: np.ndarray,
    preds: np.ndarray,
    probs: np.ndarray,
    multioutput: str = "uniform_average",
    force_finite: bool = True,
) -> float:
    if len(golds) < 2:
        return math.nan
    g, p = _flat(golds, preds)
    return float(_skm().r2_score(g, p, multioutput=multioutput, force_finite=force_finite))


def _correlation(kind: str) -> MetricFunc:
    def corr(
        golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, alternative: str = "two-sided"
    ) -> float:
        from scipy import stats  # imported on first use (slow)

        g, p = (a.reshape(-1).astype(float) for a in (golds, preds))
        if len(g) < 2 or np.ptp(g) == 0 or np.ptp(p) == 0:
            return math.nan  # undefined for constant input
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            fn = stats.pearsonr if kind == "pearson" else stats.spearmanr
            return float(fn(g, p, alternative=alternative)[0])

    corr.__name__ = corr.__qualname__ = f"_{kind}"
    return corr


# ---------------------------------------------------------------- the registry


def _scored(func: Callable[..., Any]) -> tuple[str, ...]:
    """Names of the first three positional parameters: ``golds``, ``preds``, ``probs``."""
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        return ()
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(p.name for p in params[:3] if p.kind in positional)


def _metric_problems(name: str, metric: Metric) -> list[str]:
    if not isinstance(metric, Metric):
        return [f"metric '{name}' must be a Metric, got {type(metric).__name__}"]
    if not callable(metric.func):
        return [f"metric '{name}': {metric.func!r} is not callable"]
    problems = argument_problems(
        metric.func, metric.defaults, f"metric '{name}'", "", _scored(metric.func), partial=True
    )
    return [f"{p} (in its defaults)" for p in problems]


METRICS: Registry[Metric] = Registry("metric", check=_metric_problems)
"""Metrics by name; :func:`register_metric` adds one, ``METRICS.unregister(name)`` removes it."""


def register_metric(
    name: str,
    func: MetricFunc,
    higher_is_better: bool,
    *,
    override: bool = False,
    **defaults: Any,
) -> Metric:
    """Register a metric under ``name`` so scorers and configs can refer to it.

    Registering the same function with the same direction and defaults again is a no-op (a
    re-run notebook cell is fine); anything else under a taken name needs ``override=True``.

    Args:
        name: Registry name (no ``/``).
        func: ``func(golds, preds, probs, **kwargs) -> float``. Its keyword parameters are the
            arguments a metric spec may give (checked when a :class:`Scorer` is built).
        higher_is_better: Direction used by best-checkpoint selection and balancers.
        override: Replace a different metric registered under ``name``.
        **defaults: Default keyword arguments for ``func``.

    Returns:
        The registered :class:`Metric`.

    Raises:
        ConfigError: A malformed or taken name, or defaults that ``func`` does not accept.

    Example:
        >>> import numpy as np
        >>> from mtlgraph.metrics import METRICS, register_metric
        >>> def max_error(golds, preds, probs):
        ...     return float(np.abs(golds - preds).max())
        >>> m = register_metric("max_error_doc", max_error, higher_is_better=False)
        >>> METRICS.get("max_error_doc").higher_is_better
        False
        >>> METRICS.unregister("max_error_doc") is m
        True
    """
    metric = Metric(name, func, bool(higher_is_better), dict(defaults))
    return METRICS.register(name, metric, override=override)


_BUILT_IN: list[tuple[str, MetricFunc, bool]] = [
    ("accuracy", _accuracy, True),
    ("precision", _averaged_score("precision_score"), True),
    ("recall", _averaged_score("recall_score"), True),
    ("f1", _averaged_score("f1_score"), True),
    ("fbeta", _averaged_score("fbeta_score", beta=1.0), True),
    ("matthews_corrcoef", _mcc, True),
    ("roc_auc", _roc_auc, True),
    ("mse", _mse, False),
    ("mae", _mae, False),
    ("r2", _r2, True),
    ("pearson", _correlation("pearson"), True),
    ("spearman", _correlation("spearman"), True),
]
for _name, _func, _hib in _BUILT_IN:
    register_metric(_name, _func, _hib)


MetricSpec = str | Mapping[str, Any]
"""A metric name, or ``{"name": ..., "key": optional output name, **kwargs}``."""


@dataclass(frozen=True)
class _Bound:
    key: str
    func: MetricFunc
    kwargs: Mapping[str, Any]
    higher_is_better: bool


def metric_spec_problems(spec: object, path: str = "") -> list[str]:
    """Every problem with one metric spec: its name, its key, and its keyword arguments.

    Config validation calls this before anything is built; each problem starts with ``path``.

    Example:
        >>> metric_spec_problems({"name": "fbeta", "betta": 2}, "m")  # doctest: +ELLIPSIS
        ["m.betta: metric 'fbeta' takes no argument 'betta' (did you mean 'beta'?); it takes ..."]
    """
    problems: list[str] = []
    _bind(spec, problems, path)
    return problems


def _bind(spec: object, problems: list[str], path: str = "") -> _Bound | None:
    """The metric a spec names, with its arguments; problems are appended (``None`` if any)."""
    at = f"{path}: " if path else ""
    if isinstance(spec, str):
        name, key, kwargs = spec, spec, {}
    elif isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        kwargs = {k: v for k, v in spec.items() if k not in ("name", "key")}
        name = spec["name"]
        key = spec.get("key", name)
    else:
        problems.append(f"{at}metric spec {spec!r} must be a name or a mapping with 'name'")
        return None
    if name not in METRICS:
        problems.append(f"{at}{METRICS.unknown(name)}")
        return None
    m = METRICS.get(name)
    kwargs = {**m.defaults, **kwargs}
    found = argument_problems(m.func, kwargs, f"metric '{name}'", path, _scored(m.func))
    found += [f"{at}{p}" for p in _part_problems(key, "metric key")]
    problems += found
    return None if found else _Bound(key, m.func, kwargs, m.higher_is_better)


def _part_problems(value: object, what: str) -> list[str]:
    if not isinstance(value, str) or not value or SEP in value:
        return [f"{what} {value!r} must be a non-empty string without '/'"]
    return []


class Scorer:
    """Computes a task's metrics on gold labels, predictions and probabilities.

    Ignored labels are masked out first (rows for 1-D labels, elements for 2-D labels).

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
            b = _bind(spec, problems)
            if b is not None:
                bound.append(b)
        for key, func in (custom_metric_funcs or {}).items():
            problems += _part_problems(key, "custom metric key")
            if not callable(func):
                problems.append(f"custom metric '{key}' is not callable")
                continue
            if not _takes_three(func):  # a TypeError at the first evaluation otherwise
                problems.append(f"custom metric '{key}' must take (golds, preds, probs)")
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
        raise UnknownNameError(
            [f"scorer has no metric '{key}'{did_you_mean(key, self.metric_keys)}"]
        )

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
            ``{metric_key: float}``; every metric is ``nan`` when no label is active or an
            active row's output (``probs``) is NaN or infinite.
        """
        golds, preds, probs = np.asarray(golds), np.asarray(preds), np.asarray(probs)
        golds, preds, probs = _mask(golds, preds, probs, ignore_value)
        if len(golds) == 0 or _nonfinite(probs):  # NaN/inf outputs score NaN, never a number
            return {b.key: math.nan for b in self._bound}
        out: dict[str, float] = {}
        for b in self._bound:
            try:
                out[b.key] = float(b.func(golds, preds, probs, **b.kwargs))
            except Exception as e:
                e.add_note(f"while computing metric '{b.key}'")
                raise
        return out


def _takes_three(func: Callable[..., Any]) -> bool:
    """Whether ``func(golds, preds, probs)`` binds (builtins without a signature pass)."""
    try:
        inspect.signature(func).bind(None, None, None)
    except TypeError:
        return False
    except ValueError:  # no signature to inspect
        return True
    return True


def _nonfinite(probs: np.ndarray) -> bool:
    """Whether floating outputs hold a NaN or an infinity."""
    return probs.dtype.kind in "fc" and not bool(np.isfinite(probs).all())


def _mask(
    golds: np.ndarray, preds: np.ndarray, probs: np.ndarray, ignore: float | int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    active = np.asarray(active_mask(golds, ignore), dtype=bool)
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


def split_scores(record: Mapping[str, float]) -> Iterator[tuple[str, str, str, str, float]]:
    """``(task, dataset, split, metric, value)`` of each score key of ``record``, in order.

    Example:
        >>> from mtlgraph.metrics import split_scores
        >>> list(split_scores({"step": 3, "a/d/valid/accuracy": 0.5}))
        [('a', 'd', 'valid', 'accuracy', 0.5)]
    """
    for key, value in record.items():
        parts = key.split(SEP, 3)
        if len(parts) == 4:
            yield parts[0], parts[1], parts[2], parts[3], value


def split_key(key: str) -> tuple[str, str, str, str]:
    """Split a ``task/dataset/split/metric`` key at its first three ``/`` (the metric may hold
    more)."""
    parts = key.split(SEP, 3)
    if len(parts) != 4:
        raise ConfigError([f"{key!r} is not a task/dataset/split/metric key"])
    return parts[0], parts[1], parts[2], parts[3]
