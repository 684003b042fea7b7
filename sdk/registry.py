"""Plugin discovery and registration: one plugin manager per engine, and what each plugin provides."""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import time
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import pluggy

from . import hookspecs
from .errors import InvalidRequestError, PluginError
from .types import SamplingParams

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = ["DEFAULT_PLUGINS", "ENV_PLUGINS", "KINDS", "Pipeline", "Provided", "Registry", "resolve_names"]

#: The built-in plugins, registered exactly like third-party ones.
DEFAULT_PLUGINS = (
    "nextoken.plugins.hf_tokenizer",
    "nextoken.plugins.sampling",
    "nextoken.plugins.stopping",
    "nextoken.plugins.costs",
    "nextoken.plugins.structured",
    "nextoken.plugins.speculative",
    "nextoken.plugins.reasoning",
    "nextoken.plugins.tool_parsers",
)

#: Which external (entry-point) plugins load: unset or "all": every one; "none": none;
#: "a,b": only the entry points named a and b.
ENV_PLUGINS = "NEXTOKEN_PLUGINS"

#: kind -> the registration hook that provides it.
KINDS = {
    "tokenizer": "register_tokenizers",
    "logits_processor": "register_logits_processors",
    "strategy": "register_strategies",
    "stop_condition": "register_stop_conditions",
    "cost_meter": "register_cost_meters",
    "proposer": "register_proposers",
    "reasoning_parser": "register_reasoning_parsers",
    "tool_parser": "register_tool_parsers",
}


@dataclass(frozen=True)
class Provided:
    """One named piece a plugin registered: its kind, name, factory, and where it came from.

    ``order`` sorts logits processors; ``auto`` pieces are asked on every request (their factory
    decides from the parameters whether it is active), the others only when a request names them.
    """

    kind: str
    name: str
    factory: Callable[..., Any]
    plugin: str
    distribution: str
    order: int = 100
    auto: bool = False
    description: str = ""

    def make(self, *args: Any) -> Any:
        """Call the factory; a failure is a :class:`PluginError` naming the plugin."""
        try:
            return self.factory(*args)
        except (InvalidRequestError, PluginError):
            raise
        except Exception as exc:
            raise self.error(exc) from exc

    def error(self, exc: BaseException) -> PluginError | InvalidRequestError:
        """The error a failure of this piece is raised as: a PluginError naming it, or the
        InvalidRequestError it raised (the piece found the request at fault)."""
        if isinstance(exc, InvalidRequestError):
            return exc
        return PluginError(
            f"plugin {self.plugin!r} failed in {self.kind} {self.name!r} ({KINDS[self.kind]}): "
            f"{type(exc).__name__}: {exc}",
            plugin=self.plugin,
        )


def _allowed_external(external: bool | Sequence[str] | None) -> set[str] | None:
    """None: all; a set: only those names (empty: none)."""
    if external is None:
        value = os.environ.get(ENV_PLUGINS, "").strip()
        if value in ("", "all", "*"):
            return None
        if value.lower() == "none":
            return set()
        return {v.strip() for v in value.split(",") if v.strip()}
    if external is True:
        return None
    if external is False:
        return set()
    return set(external)


class Registry:
    """The plugins of one engine: a pluggy manager with nextoken's hook specs, the built-ins, the
    allowed entry-point plugins, and any registered at run time.

    ``external``: which entry-point plugins load (None: as ``NEXTOKEN_PLUGINS`` says, all when unset;
    False: none; a list: only those entry-point names).
    """

    def __init__(self, external: bool | Sequence[str] | None = None) -> None:
        """
        Args:
            external: which entry-point plugins load (None: as ``NEXTOKEN_PLUGINS`` says, all when unset;
                False: none; a list: only those entry-point names).
        """
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.distributions: dict[str, str] = {}
        for module_name in DEFAULT_PLUGINS:
            module = importlib.import_module(module_name)
            self.pm.register(module, name=module_name)
            self.distributions[module_name] = "nextoken (built-in)"
        allowed = _allowed_external(external)
        for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
            if allowed is not None and ep.name not in allowed:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            dist = ep.dist.name if ep.dist is not None else "?"
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(
                    f"plugin {ep.name!r} from {dist} failed to load: {type(exc).__name__}: {exc}; "
                    f"leave it out with {ENV_PLUGINS} (e.g. {ENV_PLUGINS}=none)"
                ) from exc
            self._register(plugin, ep.name, dist)
        self._provided: dict[str, dict[str, Provided]] | None = None

    # -- registration -------------------------------------------------------------------------------
    def _register(self, plugin: Any, name: str | None, distribution: str) -> str:
        if name is None and not self.pm.is_registered(plugin):
            name = self._name_for(plugin)
        try:
            registered = self.pm.register(plugin, name=name)
        except ValueError as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from None
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {name or plugin!r} does not fit nextoken's hooks: {exc}") from None
        registered = str(registered or name or self.pm.get_name(plugin))
        self.distributions[registered] = distribution
        self._provided = None
        return registered

    def _name_for(self, plugin: Any) -> str:
        """What an unnamed plugin is called in listings and errors: its module's name, its class's
        qualified name, or for an object its class's (``#2``, ``#3`` ... for more of one class)."""
        if isinstance(plugin, types.ModuleType):
            base = plugin.__name__
        else:
            cls = plugin if isinstance(plugin, type) else type(plugin)
            base = (
                f"{cls.__module__}.{cls.__qualname__}"
                if cls.__module__ not in ("__main__", "builtins")
                else cls.__qualname__
            )
            if not isinstance(plugin, type) and isinstance(getattr(plugin, "__name__", None), str):
                base = plugin.__name__  # a function or a named object: its own name
        name, n = base, 1
        while self.pm.get_plugin(name) is not None:
            n += 1
            name = f"{base}#{n}"
        return name

    def register(self, plugin: Any, name: str | None = None) -> str:
        """Register a plugin (a module, class or object with ``@nextoken.hookimpl`` functions) at run
        time; unnamed, it is called by its module or class name."""
        return self._register(plugin, name, "registered at run time")

    def unregister(self, name: str) -> None:
        """Remove a plugin registered under ``name``."""
        plugin = self.pm.get_plugin(name)
        if plugin is None:
            raise PluginError(f"no plugin named {name!r} is registered")
        self.pm.unregister(plugin)
        self.distributions.pop(name, None)
        self._provided = None

    # -- what is provided -------------------------------------------------------------------------------
    def provided(self, kind: str) -> dict[str, Provided]:
        """Every piece of ``kind`` by name."""
        if self._provided is None:
            self._provided = self._collect()
        return self._provided[kind]

    def _collect(self) -> dict[str, dict[str, Provided]]:
        """Call each registration hook once, through pluggy (so its wrappers, tracing and hook
        monitoring apply), and gather what every plugin registered, each piece named by the plugin
        whose hook implementation registered it."""
        out: dict[str, dict[str, Provided]] = {kind: {} for kind in KINDS}
        for kind, hook_name in KINDS.items():
            caller = getattr(self.pm.hook, hook_name)
            codes = _implementation_codes(caller)

            def register(
                name: str,
                factory: Callable[..., Any],
                *,
                order: int = 100,
                auto: bool = False,
                description: str = "",
                _kind: str = kind,
                _codes: dict = codes,
            ) -> None:
                plugin = _registering_plugin(_codes)
                if not isinstance(name, str) or not name:
                    raise PluginError(f"plugin {plugin!r} registered a {_kind} without a name")
                if not callable(factory):
                    raise PluginError(
                        f"plugin {plugin!r} registered {_kind} {name!r} with a factory that is not callable"
                    )
                existing = out[_kind].get(name)
                if existing is not None:
                    raise PluginError(
                        f"{_kind} {name!r} is registered twice: by {existing.plugin!r} and by {plugin!r}; "
                        f"leave one out ({ENV_PLUGINS}) or unregister it"
                    )
                doc = description or next(iter((factory.__doc__ or "").strip().splitlines()), "")
                dist = self.distributions.get(plugin, "?")
                out[_kind][name] = Provided(_kind, name, factory, plugin, dist, order, auto, doc)

            try:
                caller(register=register)
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {_blame(exc, caller)!r} failed in {hook_name}: {type(exc).__name__}: {exc}"
                ) from exc
        return out

    def tokenizer(self, name: str, *args: Any) -> tuple[Tokenizer, Provided]:
        """The tokenizer of tokenizer plugin ``name``, made from ``args`` (a package's path and manifest),
        and the piece that made it (what it answers is checked where it enters the engine)."""
        (loader,) = resolve_names("tokenizer", [name], self)
        return cast("Tokenizer", loader.make(*args)), loader

    def check(self, kind: str, names: Iterable[str]) -> None:
        """Every one of ``names`` is a registered piece of ``kind`` (else an error listing those that are)."""
        resolve_names(kind, list(names), self)

    def listing(self) -> list[dict[str, Any]]:
        """Every plugin: its name, distribution, and what it provides (for ``nextoken plugins``)."""
        rows: dict[str, dict[str, Any]] = {}
        for name, dist in self.distributions.items():
            if self.pm.get_plugin(name) is None:
                continue
            hooks = sorted({c.name for c in (self.pm.get_hookcallers(self.pm.get_plugin(name)) or [])})
            rows[name] = {"plugin": name, "distribution": dist, "provides": {}, "hooks": hooks}
        for kind in KINDS:
            for piece in self.provided(kind).values():
                rows[piece.plugin]["provides"].setdefault(kind, []).append(piece.name)
        return list(rows.values())

    # -- observers ------------------------------------------------------------------------------------
    def observers(self, hook_name: str) -> pluggy.HookCaller | None:
        """The hook caller of ``hook_name`` if any plugin implements it, else None (so callers skip it)."""
        caller = getattr(self.pm.hook, hook_name)
        return caller if caller.get_hookimpls() else None

    def call_observer(self, hook_name: str, caller: pluggy.HookCaller, **kwargs: Any) -> None:
        """Call an observer hook; a failure is a :class:`PluginError` naming the plugin that raised."""
        try:
            caller(**kwargs)
        except Exception as exc:
            blamed = _blame(exc, caller)
            raise PluginError(
                f"plugin {blamed!r} failed in {hook_name}: {type(exc).__name__}: {exc}", plugin=blamed
            ) from exc


def _implementation_codes(caller: pluggy.HookCaller) -> dict[types.CodeType, str]:
    """The code object of each implementation of a hook, and the plugin it belongs to."""
    functions = (
        (getattr(impl.function, "__func__", impl.function), impl.plugin_name) for impl in caller.get_hookimpls()
    )
    return {fn.__code__: name for fn, name in functions if isinstance(fn, types.FunctionType)}


def _registering_plugin(codes: dict[types.CodeType, str]) -> str:
    """The plugin whose hook implementation is calling ``register`` now (found on the stack)."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            name = codes.get(frame.f_code)
            if name is not None:
                return name
            frame = frame.f_back
    finally:
        del frame
    return "?"


def _blame(exc: BaseException, caller: pluggy.HookCaller) -> str:
    """The plugin whose hook implementation raised ``exc`` (found in the traceback)."""
    codes = _implementation_codes(caller)
    tb = exc.__traceback__
    blamed = "?"
    while tb is not None:
        name = codes.get(tb.tb_frame.f_code)
        if name is not None:
            blamed = name
        tb = tb.tb_next
    return blamed


def resolve_names(kind: str, names: Iterable[str], registry: Registry) -> list[Provided]:
    """The pieces of ``kind`` named by a request; an unknown name lists the registered ones."""
    table = registry.provided(kind)
    out = []
    for name in names:
        piece = table.get(name)
        if piece is None:
            raise InvalidRequestError(
                f"unknown {kind.replace('_', ' ')} {name!r}; registered: {', '.join(sorted(table)) or 'none'}"
            )
        out.append(piece)
    return out


@dataclass
class Active:
    """A resolved plugin piece: the callable the loop calls, and where it came from (for errors)."""

    fn: Callable[..., Any]
    provided: Provided
    holdback: Callable[[str], int] | None = None


def _timed(fn: Callable[..., Any], key: str, table: dict[str, float]) -> Callable[..., Any]:
    """``fn`` with its time added to ``table[key]`` (only made when a request asks for timings)."""
    table.setdefault(key, 0.0)
    clock = time.perf_counter

    def call(*args: Any) -> Any:
        start = clock()
        try:
            return fn(*args)
        finally:
            table[key] += clock() - start

    return call


class Pipeline:
    """What one request runs, resolved once from the registry: processors in order, the strategy,
    the stop conditions, the cost meters, and the observers (None when no plugin listens).

    With ``params.hook_timings``, every callable is wrapped to add its time to :attr:`seconds`
    (by ``"<kind>:<name>"``); without, nothing is wrapped, so the loop pays nothing."""

    def __init__(
        self, registry: Registry, params: SamplingParams, engine_meters: Mapping[str, Mapping[str, Any]] | None = None
    ) -> None:
        #: seconds spent in each plugin, when timed (else None)
        self.seconds: dict[str, float] | None = {} if params.hook_timings else None

        def piece(provided: Provided, fn: Any) -> Active:
            holdback = getattr(fn, "holdback", None)
            if self.seconds is not None:
                key = f"{provided.kind}:{provided.name}"
                fn = _timed(fn, key, self.seconds)
                holdback = holdback and _timed(holdback, key, self.seconds)
            return Active(fn, provided, holdback)

        def active(kind: str, named: Sequence[str]) -> list[Active]:
            table = registry.provided(kind)
            chosen = {p.name: p for p in resolve_names(kind, named, registry)}
            chosen.update({n: p for n, p in table.items() if p.auto})
            out = []
            for provided in sorted(chosen.values(), key=lambda p: (p.order, p.name)):
                fn = provided.make(params, params.options.get(provided.name, {}))
                if fn is not None:
                    if not callable(fn):
                        raise provided.error(TypeError(f"its factory returned {type(fn).__name__}, not a callable"))
                    out.append(piece(provided, fn))
            return out

        self.processors = active("logits_processor", params.processors)
        self.stops = active("stop_condition", params.stop_conditions)
        self.text_stops = [s for s in self.stops if s.holdback is not None]
        (strategy,) = resolve_names("strategy", [params.strategy_name], registry)
        self.strategy = piece(strategy, strategy.make(params, params.options.get(strategy.name, {})))
        meters = {**(engine_meters or {}), **params.cost_meters}
        self.meters = [
            (provided.name, piece(provided, provided.make(dict(meters[provided.name]))))
            for provided in resolve_names("cost_meter", list(meters), registry)
        ]
        self.proposer: Active | None = None
        if params.speculative is not None:
            (proposer,) = resolve_names("proposer", [params.speculative["method"]], registry)
            self.proposer = piece(proposer, proposer.make(params, params.options.get(proposer.name, {})))
        self.top_logprobs = params.top_logprobs
        self.registry = registry
        self.on_start = registry.observers("on_request_start")
        self.on_step = registry.observers("on_step")
        self.on_end = registry.observers("on_request_end")

    def observe(self, hook_name: str, caller: pluggy.HookCaller, **kwargs: Any) -> None:
        """Call an observer hook (timed as ``observer:<hook>`` when timings are on)."""
        if self.seconds is None:
            self.registry.call_observer(hook_name, caller, **kwargs)
            return
        key = f"observer:{hook_name}"
        start = time.perf_counter()
        try:
            self.registry.call_observer(hook_name, caller, **kwargs)
        finally:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start

    def timed(self, key: str, start: float) -> None:
        """Add the time since ``start`` to ``key`` (the loop's own timings: the tokenizer)."""
        if self.seconds is not None:
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
