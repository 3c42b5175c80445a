"""One registry type for every named component.

Module types, losses, metrics, batch schedulers, balancers, optimizers, LR schedules, writers and
synthetic-data generators are all looked up by name in a :class:`Registry`. Every registry behaves
the same way:

- ``get`` of an unknown name raises :class:`~mtlgraph.exceptions.UnknownNameError` (a
  :class:`~mtlgraph.ConfigError` and a ``KeyError``) with a did-you-mean;
- registering the *same* object (or an equal value) under a name again is a no-op and returns
  the registered one (a re-run notebook cell is fine); registering *another* object under a
  taken name needs ``override=True``;
- ``unregister`` removes a name (tests and doctests leave no registrations behind);
- ``check_kwargs`` compares keyword arguments with the component's signature, so a misspelled
  argument is a ``ConfigError`` with a suggestion before any work starts.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError, UnknownNameError

__all__ = [
    "Registry",
    "accepted_parameters",
    "must_be_callable",
    "must_subclass",
    "signature_problems",
    "split_spec",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names mapped to components of one kind.

    Args:
        kind: What is registered, for messages (``"metric"``, ``"batch scheduler"``).
        entries: Built-in entries, registered in order.
        check: Optional ``check(name, obj) -> problems`` run on every registration.

    Example:
        >>> from mtlgraph.registry import Registry
        >>> colours = Registry[int]("colour", {"red": 1})
        >>> colours.register("blue", 2)
        2
        >>> colours.register("blue", 2)  # the same object again: a no-op
        2
        >>> colours.get("bleu")
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.UnknownNameError: unknown colour 'bleu' (did you mean 'blue'?); ...
        >>> colours.register("blue", 3)
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.ConfigError: colour 'blue' is already registered (as 2); pass ...
        >>> colours.register("blue", 3, override=True)
        3
        >>> @colours.register("green")  # the decorator form, for functions and classes
        ... def green() -> int:
        ...     return 4
        >>> colours.names()
        ['blue', 'green', 'red']
        >>> colours.unregister("blue"), colours.unregister("green")() # leave none behind
        (3, 4)
        >>> colours.names()
        ['red']
    """

    def __init__(
        self,
        kind: str,
        entries: Mapping[str, T] | None = None,
        check: Callable[[str, T], list[str]] | None = None,
    ) -> None:
        self.kind = kind
        self._check = check
        self._entries: dict[str, T] = {}
        for name, obj in (entries or {}).items():
            self.register(name, obj)

    @overload
    def register(self, name: str, obj: T, *, override: bool = False) -> T: ...

    @overload
    def register(
        self, name: str, obj: None = None, *, override: bool = False
    ) -> Callable[[T], T]: ...

    def register(
        self, name: str, obj: T | None = None, *, override: bool = False
    ) -> T | Callable[[T], T]:
        """Register ``obj`` under ``name``; without ``obj``, return a decorator that does.

        Raises:
            ConfigError: The name is malformed, the object fails the registry's check, or the
                name holds another object and ``override`` is false.
        """
        if obj is None:

            def decorator(target: T) -> T:
                return self.register(name, target, override=override)

            return decorator
        problems = _name_problems(self.kind, name)
        if not problems and self._check is not None:
            problems = self._check(name, obj)
        held = self._entries.get(name) if not problems else None
        if held is not None and _same(held, obj):
            return held  # the same component again (a re-run cell): a no-op
        if not problems and held is not None and not override:
            problems = [
                f"{self.kind} '{name}' is already registered (as {self._entries[name]!r}); "
                "pass override=True to replace it, or pick another name"
            ]
        if problems:
            raise ConfigError(problems)
        self._entries[name] = obj
        return obj

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return what it held; an unknown name raises like :meth:`get`."""
        obj = self.get(name)
        del self._entries[name]
        return obj

    def get(self, name: str) -> T:
        """The object registered as ``name``; an unknown name raises with a suggestion."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise UnknownNameError([self.unknown(name)]) from None

    def unknown(self, name: object) -> str:
        """The message for an unknown ``name``: the suggestion and the known names."""
        hint = did_you_mean(name, self._entries) if isinstance(name, str) else ""
        return f"unknown {self.kind} {name!r}{hint}; known: {quoted(self._entries)}"

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"

    def check_kwargs(
        self, name: str, kwargs: Mapping[str, Any], supplied: Collection[str] = ()
    ) -> list[str]:
        """Problems with ``kwargs`` for the component ``name``, checked against its signature.

        Args:
            name: A registered name (an unknown one is itself the problem reported).
            kwargs: The keyword arguments a user gave.
            supplied: Parameters mtlgraph passes itself (a scheduler's ``seed``, a metric's
                ``golds``); the user may not give them and need not.

        Returns:
            One sentence per unknown, reserved or missing argument; empty when all is well.
        """
        if name not in self._entries:
            return [self.unknown(name)]
        factory = self._entries[name]
        if not callable(factory):
            return []
        return signature_problems(factory, kwargs, f"{self.kind} '{name}'", supplied=supplied)


def split_spec(spec: str | Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A component spec, ``"name"`` or ``{"name": ..., **kwargs}``, as ``(name, kwargs)``.

    The name is ``None`` when a mapping has none (lookup then reports it as unknown).

    Example:
        >>> split_spec({"name": "cosine", "min_factor": 0.1})
        ('cosine', {'min_factor': 0.1})
        >>> split_spec("adam")
        ('adam', {})
    """
    if isinstance(spec, str):
        return spec, {}
    kwargs = dict(spec)
    return kwargs.pop("name", None), kwargs


def signature_problems(
    factory: Callable[..., Any],
    kwargs: Mapping[str, Any],
    what: str,
    supplied: Collection[str] = (),
    partial: bool = False,
) -> list[str]:
    """Unknown, reserved or missing keyword arguments of ``factory`` (a class or a function).

    Args:
        factory: The class or function the arguments are for.
        kwargs: The keyword arguments a user gave.
        what: Names the component in messages (``"metric 'fbeta'"``).
        supplied: Parameters mtlgraph passes itself; giving one is a problem.
        partial: ``kwargs`` are only some of the arguments (defaults): missing required
            ones are not reported.

    Example:
        >>> def fbeta(golds, preds, beta=1.0): ...
        >>> signature_problems(fbeta, {"betta": 2}, "metric 'fbeta'", supplied=("golds", "preds"))
        ["metric 'fbeta' takes no argument 'betta' (did you mean 'beta'?); its arguments: 'beta'"]
    """
    params = accepted_parameters(factory)
    if params is None:  # **kwargs or no inspectable signature: anything goes
        return []
    own = {n: p for n, p in params.items() if n not in supplied}
    problems = []
    for key in kwargs:
        if key in supplied:
            problems.append(f"{what}: '{key}' is set by mtlgraph; remove it")
        elif key not in own:
            known = quoted(own) if own else "none"
            problems.append(
                f"{what} takes no argument '{key}'{did_you_mean(key, own)}; its arguments: {known}"
            )
    for n, p in own.items():
        if not partial and p.default is inspect.Parameter.empty and n not in kwargs:
            problems.append(f"{what} needs the argument '{n}'")
    return problems


def accepted_parameters(factory: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """Keyword-passable parameters of ``factory``, or ``None`` when it takes ``**kwargs``."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    params: dict[str, inspect.Parameter] = {}
    for n, p in sig.parameters.items():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            return None
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            params[n] = p
    return params


def _same(held: object, obj: object) -> bool:
    """Whether ``obj`` is the component ``held``: the same object, or an equal value (a
    :class:`~mtlgraph.metrics.Metric` rebuilt from the same function and defaults)."""
    if held is obj:
        return True
    try:
        return bool(held == obj)
    except (ValueError, TypeError, RuntimeError):  # an __eq__ that cannot answer (arrays)
        return False


def _name_problems(kind: str, name: object) -> list[str]:
    if not isinstance(name, str) or not name:
        return [f"{kind} name {name!r} must be a non-empty string"]
    if "/" in name:
        return [f"{kind} name '{name}' must not contain '/' (it is a score-key separator)"]
    return []


def must_be_callable(kind: str) -> Callable[[str, Any], list[str]]:
    """A registry ``check``: entries must be callable (a function or a class).

    Example:
        >>> must_be_callable("loss")("l2", 3)
        ["loss 'l2': 3 is not callable"]
    """

    def check(name: str, obj: Any) -> list[str]:
        return [] if callable(obj) else [f"{kind} '{name}': {obj!r} is not callable"]

    return check


def must_subclass(base: type, kind: str) -> Callable[[str, Any], list[str]]:
    """A registry ``check``: entries must be subclasses of ``base``.

    Example:
        >>> must_subclass(int, "number type")("text", str)
        ["number type 'text' must be a int subclass, got <class 'str'>"]
    """

    def check(name: str, obj: Any) -> list[str]:
        if isinstance(obj, type) and issubclass(obj, base):
            return []
        return [f"{kind} '{name}' must be a {base.__name__} subclass, got {obj!r}"]

    return check
