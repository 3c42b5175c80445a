"""One registry type, and one way from a spec to an object, for every component kind.

A spec is a registered name, a dotted import path, ``{name: ..., **kwargs}``, a class or factory,
or a built instance; its arguments are checked against the factory's signature and annotations
before anything is built (see docs/concepts.md, "Registries").
"""

from __future__ import annotations

import functools
import importlib
import inspect
import typing
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

from mtlgraph._io import EXTRAS
from mtlgraph._schema import convert
from mtlgraph._suggest import did_you_mean, quoted
from mtlgraph.exceptions import ConfigError, UnknownNameError

__all__ = [
    "Registry",
    "accepted_parameters",
    "argument_problems",
    "import_object",
    "type_hints",
]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names mapped to components of one kind, and specs built into objects.

    Args:
        kind: What is registered, for messages (``"metric"``, ``"batch scheduler"``).
        entries: Built-in entries, registered in order.
        check: ``check(name, obj) -> problems`` run on every registration (default, with
            ``base`` or ``bind``: the object must be callable).
        base: The class every built object must be an instance of (an instance given as the
            spec is returned as it is); ``None``: not checked.
        supplied: Arguments mtlgraph passes itself, mapped to what to do instead of giving
            them (a spec that gives one is refused with that sentence).
        bind: Entries are functions mtlgraph calls later with the ``supplied`` arguments
            (losses, LR schedules): :meth:`build` returns the function with the spec's
            arguments bound instead of calling it.
        find: Looks up a name that is not registered, before dotted paths: the object,
            ``None`` (not found), or the sentence saying why there is none.
        keys: The keys of a spec mapping that name the component (one of them is given).
        adapt: Turns what a spec names (imported, or given as an object) into a component of
            this kind where it comes from another library (a TorchJD aggregator into a
            balancer); anything else it returns unchanged.

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
        >>> colours.unregister("blue"), colours.names()
        (2, ['red'])

        Building from specs, with arguments checked against the signature and its types:

        >>> class Gate:
        ...     def __init__(self, k: int, soft: bool = True) -> None:
        ...         self.k, self.soft = k, soft
        >>> gates = Registry("gate", base=Gate)
        >>> @gates.register("topk")
        ... class TopK(Gate): ...
        >>> gates.build({"name": "topk", "k": 2}).k
        2
        >>> gates.build({"name": "topk", "k": 2, "soft": "maybe"}, "model.gate")
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.ConfigError: model.gate.soft: expected true or false, got the string ...
        >>> gates.problems({"name": "topk", "kk": 2}, "gate")  # doctest: +NORMALIZE_WHITESPACE
        ["gate.kk: gate 'topk' takes no argument 'kk' (did you mean 'k'?); it takes 'k', 'soft'",
         "gate.k: missing (required by gate 'topk')"]
    """

    def __init__(
        self,
        kind: str,
        entries: Mapping[str, T] | None = None,
        check: Callable[[str, T], list[str]] | None = None,
        *,
        base: type | None = None,
        supplied: Mapping[str, str] | None = None,
        bind: bool = False,
        find: Callable[[str], T | str | None] | None = None,
        keys: tuple[str, ...] = ("name", "type"),
        adapt: Callable[[Any], Any] | None = None,
    ) -> None:
        self.kind = kind
        self.adapt = adapt
        self.base = base
        self.supplied = dict(supplied or {})
        self.bind = bind
        self._find = find
        self.keys = keys
        self._check = check or (self._callable if base is not None or bind else lambda n, o: [])
        self._entries: dict[str, T] = {}
        for name, obj in (entries or {}).items():
            self.register(name, obj)

    # ------------------------------------------------------------ the name table

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
            return functools.partial(self.register, name, override=override)
        problems = _name_problems(self.kind, name) or self._check(name, obj)
        held = self._entries.get(name) if not problems else None
        if held is not None and _same(held, obj):
            return held  # the same component again (a re-run cell): a no-op
        if not problems and held is not None and not override:
            problems = [
                f"{self.kind} '{name}' is already registered (as {held!r}); "
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

    def _callable(self, name: str, obj: Any) -> list[str]:
        base = self.base
        if base is not None and isinstance(obj, type) and not issubclass(obj, base):
            return [f"{self.kind} '{name}' must be a {base.__name__} subclass, got {obj!r}"]
        if callable(obj) and not (base is not None and isinstance(obj, base)):
            return []
        return [f"{self.kind} '{name}': {obj!r} is not callable (a class or factory)"]

    # ------------------------------------------------------------ specs -> objects

    def resolve(self, spec: Any, path: str = "") -> tuple[Any, dict[str, Any], str]:
        """A spec as ``(factory or instance, keyword arguments, name for messages)``.

        Raises:
            ConfigError: An unknown name (with a suggestion), a dotted path that does not
                import, or something that is no spec; naming ``path``.
        """
        kwargs: dict[str, Any] = {}
        if isinstance(spec, Mapping):
            kwargs = dict(spec)
            keys = [k for k in self.keys if k in kwargs]
            if not keys:
                key = f"{path}.{self.keys[0]}" if path else self.keys[0]
                hint = f"one of {quoted(self._entries)} or a dotted import path"
                raise ConfigError([f"{key}: missing; say which {self.kind} to build: {hint}"])
            if len(keys) > 1:
                raise ConfigError([f"{_at(path)}give one of {quoted(keys)}, not both"])
            spec = kwargs.pop(keys[0])
            path = f"{path}.{keys[0]}" if path else ""
        if self.adapt is not None and not isinstance(spec, str):
            spec = self.adapt(spec)
        if isinstance(spec, str):
            factory = self._named(spec, path)
            factory = self.adapt(factory) if self.adapt is not None else factory
            base = self.base
            wrong = isinstance(factory, type) and base is not None and not issubclass(factory, base)
            if wrong or not (callable(factory) or (base is not None and isinstance(factory, base))):
                kind = f"the class {factory.__name__}" if wrong else f"a {type(factory).__name__}"
                want = f"a {base.__name__} subclass" if base is not None else "a class"
                problem = f"'{spec}' is {kind}, not {want} or a function returning one"
                raise ConfigError([_at(path) + problem])
            return factory, kwargs, spec
        if self.base is not None and isinstance(spec, self.base) and not isinstance(spec, type):
            if kwargs:
                raise ConfigError([f"{_at(path)}a built {self.kind} takes no arguments"])
            return spec, kwargs, type(spec).__name__
        if callable(spec):
            return spec, kwargs, getattr(spec, "__name__", repr(spec))
        kinds = f"a {self.base.__name__}, " if self.base is not None else ""
        problem = f"a {self.kind} is {kinds}a registered name ({quoted(self._entries)}), {{name: "
        problem += f"..., **kwargs}}, a dotted import path, or a class or factory; got {spec!r}"
        raise ConfigError([_at(path) + problem])

    def _checked(
        self, spec: Any, path: str, given: Collection[str]
    ) -> tuple[Any, dict[str, Any], str, list[str]]:
        """:meth:`resolve`'s factory (or instance), arguments and name, and their problems."""
        factory, kwargs, name = self.resolve(spec, path)
        if self.base is not None and isinstance(factory, self.base):
            return factory, kwargs, name, []
        what = f"{self.kind} '{name}'"
        problems = argument_problems(factory, kwargs, what, path, self.supplied, given, self.bind)
        return factory, kwargs, name, problems

    def _named(self, name: str, path: str) -> Any:
        if name in self._entries:
            return self._entries[name]
        found = self._find(name) if self._find is not None else None
        if isinstance(found, str):  # the reason there is none
            raise UnknownNameError([f"{_at(path)}{found}"])
        if found is not None:
            return found
        if "." in name:
            return import_object(name, path)
        more = "or a dotted import path (register more in a module listed under 'imports:')"
        raise UnknownNameError([f"{_at(path)}{self.unknown(name)}, {more}"])

    def problems(
        self, spec: Any, path: str = "", given: Collection[str] = (), build: bool = False
    ) -> list[str]:
        """Every problem of ``spec`` (``given``: arguments the caller adds); with ``build``, a
        spec without such problems is built too, so its constructor's value rules report too."""
        try:
            problems = self._checked(spec, path, given)[3]
            if build and not problems:
                self.build(spec, path)
        except ConfigError as e:
            return list(e.problems)
        return problems

    def build(self, spec: Any, path: str = "", **given: Any) -> Any:
        """The object ``spec`` describes: ``factory(**given, **kwargs)`` after every argument
        is checked (a spec may override a ``given`` default, never a ``supplied`` argument);
        with ``bind``, the function with the spec's arguments bound.

        Raises:
            ConfigError: Every problem :meth:`problems` finds, or a factory that made something
                other than ``base`` (or refused its arguments with a ``ConfigError``), naming
                ``path``.
        """
        factory, kwargs, name, problems = self._checked(spec, path, given)
        if problems:
            raise ConfigError(problems)
        if self.base is not None and isinstance(factory, self.base):
            return factory
        hints = type_hints(_signature_source(factory))  # 1 -> 1.0, lists -> tuples
        kwargs = {k: convert(v, hints[k], k, []) if k in hints else v for k, v in kwargs.items()}
        kwargs = {**given, **kwargs}
        if self.bind:
            return functools.partial(factory, **kwargs) if kwargs else factory
        try:
            obj = factory(**kwargs)
        except ConfigError as e:  # a value rule in the constructor: name the key path
            raise ConfigError([f"{_at(path)}{p}" for p in e.problems]) from e
        except Exception as e:  # the user's own error: its type kept, with context
            e.add_note(f"mtlgraph: while building {path or 'a'} ({self.kind} '{name}')")
            raise
        if self.base is not None and not isinstance(obj, self.base):
            made = f"{self.kind} '{name}' made a {type(obj).__name__}, not a {self.base.__name__}"
            raise ConfigError([_at(path) + made])
        return obj


def _at(path: str) -> str:
    return f"{path}: " if path else ""


def import_object(path: str, where: str = "") -> Any:
    """The object a dotted import path names (``"torch.optim.NAdam"``, ``"pkg.mod.Class.attr"``).

    Raises:
        ConfigError: No module of the path imports (is it installed, or listed under
            ``imports:``?), or it has no such attribute (with a suggestion); naming ``where``.
            An exception raised *by* the imported module propagates unchanged.

    Example:
        >>> from mtlgraph.registry import import_object
        >>> import_object("torch.optim.NAdam").__name__
        'NAdam'
        >>> import_object("torch.optim.Nadam", "trainer.optimizer")
        Traceback (most recent call last):
        ...
        mtlgraph.exceptions.ConfigError: trainer.optimizer: cannot import 'torch.optim.Nadam': ...
    """
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise  # a module the imported one needs: the user's problem, unchanged
            if cut > 1:
                continue
            if e.name in EXTRAS:
                why = f"no module named '{e.name}': pip install 'mtlgraph[{EXTRAS[e.name]}]'"
            else:
                why = f"no module named '{e.name}' (is it installed, or its module listed under "
                why += "'imports:'?)"
            raise ConfigError([f"{_at(where)}cannot import '{path}': {why}"]) from None
        for i, attr in enumerate(parts[cut:], cut):
            if not hasattr(obj, attr):
                names = [n for n in dir(obj) if not n.startswith("_")]
                why = f"'{'.'.join(parts[:i])}' has no '{attr}'{did_you_mean(attr, names)}"
                raise ConfigError([f"{_at(where)}cannot import '{path}': {why}"])
            obj = getattr(obj, attr)
        return obj
    raise ConfigError([f"{_at(where)}'{path}' is no dotted import path (module.name)"])


# ---------------------------------------------------------------- the one argument checker


def argument_problems(
    factory: Callable[..., Any],
    kwargs: Mapping[str, Any],
    what: str,
    path: str = "",
    supplied: Mapping[str, str] | Collection[str] = (),
    given: Collection[str] = (),
    partial: bool = False,
) -> list[str]:
    """Problems of calling ``factory(**kwargs)``: arguments it does not take, that mtlgraph
    supplies itself, that are missing, or whose value does not fit the annotation.

    Args:
        factory: A class or function (a class whose ``__init__`` takes only ``*args,
            **kwargs``, like ``torch.nn.LSTM``, is checked against its first base naming them).
        kwargs: The keyword arguments a user gave.
        what: Names the component in messages (``"metric 'fbeta'"``).
        path: The spec's key path; each problem starts with ``<path>.<argument>``.
        supplied: Arguments mtlgraph passes itself (giving one is a problem), each optionally
            mapped to the sentence saying where to set it instead.
        given: Arguments the caller passes besides ``kwargs`` (not missing; may be overridden).
        partial: Arguments missing from ``kwargs`` are not reported (defaults; a bound function
            called later).

    Example:
        >>> def fbeta(golds, preds, beta: float = 1.0): ...
        >>> argument_problems(fbeta, {"betta": 2, "preds": 1}, "metric 'fbeta'", "m",
        ...                   supplied=("golds", "preds"))  # doctest: +NORMALIZE_WHITESPACE
        ["m.betta: metric 'fbeta' takes no argument 'betta' (did you mean 'beta'?); it takes
          'beta'", "m.preds: metric 'fbeta' gets 'preds' from mtlgraph; remove it"]
        >>> argument_problems(fbeta, {"beta": "two"}, "metric 'fbeta'", "m", ("golds", "preds"))
        ["m.beta: expected a number, got the string 'two'"]
    """
    prefix = f"{path}." if path else ""
    source = _signature_source(factory)
    params = _parameters(source)
    if params is None:  # no inspectable signature
        return []
    named, open_kwargs = params
    fixes = supplied if isinstance(supplied, Mapping) else {}
    hints = type_hints(source)
    problems: list[str] = []
    for key, value in kwargs.items():
        if key in supplied:
            fix = fixes.get(key) or "remove it"
            problems.append(f"{prefix}{key}: {what} gets '{key}' from mtlgraph; {fix}")
        elif key in named:
            if key in hints:
                convert(value, hints[key], f"{prefix}{key}", problems)
        elif not open_kwargs:
            own = [n for n in named if n not in supplied and n not in given]
            problems.append(
                f"{prefix}{key}: {what} takes no argument '{key}'{did_you_mean(str(key), own)};"
                f" it takes {quoted(own) or 'none'}"
            )
    if not partial and source is factory:
        for name, p in named.items():
            if p.default is p.empty and name not in {*kwargs, *supplied, *given}:
                problems.append(f"{prefix}{name}: missing (required by {what})")
    return problems


def accepted_parameters(factory: Callable[..., Any]) -> set[str] | None:
    """The keyword arguments ``factory`` takes; ``None`` when it takes ``**kwargs`` (or has no
    inspectable signature)."""
    params = _parameters(_signature_source(factory))
    return None if params is None or params[1] else set(params[0])


def _signature_source(factory: Callable[..., Any]) -> Callable[..., Any]:
    """``factory``, or for a class whose ``__init__`` names no argument (only ``*args,
    **kwargs``) the first base class that names them."""
    own = _parameters(factory)
    if not isinstance(factory, type) or own is None or own[0] or not own[1]:
        return factory
    for cls in factory.__mro__[1:]:
        params = _parameters(cls)
        if cls is object or params is None or params[0]:
            return factory if cls is object or params is None else cls
    return factory


def _parameters(factory: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], bool] | None:
    """Keyword-passable parameters, and whether ``**kwargs`` is taken; ``None``: unknown."""
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError):
        return None
    named = {
        n: p
        for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
    }
    return named, any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def type_hints(factory: Callable[..., Any]) -> dict[str, Any]:
    """The resolved annotations of ``factory(...)`` (a class: its ``__init__``); ``{}`` when
    they do not resolve (argument names are then checked, types are not)."""
    target = factory.__init__ if isinstance(factory, type) else factory  # type: ignore[misc]
    try:
        return typing.get_type_hints(target)
    except Exception:  # annotations that do not resolve: names are checked, types are not
        return {}


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
