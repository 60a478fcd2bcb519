"""What the per-library pool modules share: records, statistics, locations, safe hooks.

:class:`WatchCore` is the state every library watcher writes to (stats per pool, the
guard findings go to, which hooks are off); :class:`HookGuard` runs our bookkeeping so a
failure of ours never reaches the app; :func:`same_signature` builds ``__init__`` wrappers
with the original's exact parameters (SQLAlchemy reads them off the code object).
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from .. import context, guard, patching
from ..location import Location, is_user_file, relative, user_location
from ..model import DOCS, PoolStats

POOL_KINDS = ("threads", "sqlalchemy", "httpx", "asyncpg")

POOL_HELP = (
    "Requests queue for a pool slot. Make the pool bigger only if the database or upstream "
    "allows that many connections; set a short pool timeout and answer a clean 503 when it "
    "fires; never hold a connection while awaiting a slow upstream call."
)
CLIENT_HELP = (
    "Creating a client, engine or pool per request opens new connections (and a new TLS "
    "handshake) every time and defeats pooling and its limits. Create it once at startup "
    "(the lifespan) and share it."
)


# -- records ------------------------------------------------------------------------------


@dataclass
class Stats:
    name: str
    kind: str
    size: int = 0
    in_use: int = 0
    max_in_use: int = 0
    waits_ms: list[float] = field(default_factory=list)
    timeouts: int = 0

    def enter(self) -> None:
        self.in_use += 1
        self.max_in_use = max(self.max_in_use, self.in_use)

    def freeze(self) -> PoolStats:
        return PoolStats(
            name=self.name, kind=self.kind, size=self.size, max_in_use=self.max_in_use,
            waits_ms=tuple(self.waits_ms), timeouts=self.timeouts,
        )


@dataclass
class ThreadCall:
    """One call handed to a worker thread for a request."""

    function: str
    request: str
    location: Location
    called: float
    started: float | None = None  # in the worker: the token was granted
    ended: float | None = None  # in the worker: the thread is free again
    cancelled: float | None = None  # the awaiting request was cancelled
    thread: int | None = None


@dataclass
class CheckedOut:
    """A SQLAlchemy / asyncpg connection checked out (and not yet returned)."""

    pool: str
    request: str | None
    location: Location
    since: float
    # Checked out by a request or a task it started (not the lifespan, not the test or its
    # fixtures): only these can be a connection leak (armed by context, as tasks are).
    by_request: bool = True


# -- locations ----------------------------------------------------------------------------


def find_user(frame: FrameType | None, stop_at_boundary: bool = False) -> Location | None:
    """The first user frame walking out, or None (optionally not past the ASGI boundary)."""
    while frame is not None:
        code = frame.f_code
        if stop_at_boundary and code.co_name == "stallguard_attributed":
            return None
        if is_user_file(code.co_filename):
            return relative(code.co_filename), frame.f_lineno, code.co_name
        frame = frame.f_back
    return None


def _greenlet_parent_frame() -> FrameType | None:
    """SQLAlchemy's async engines run pool code in a child greenlet: the user's frames are
    in the parent (the task), suspended in ``greenlet_spawn``."""
    mod = sys.modules.get("greenlet")
    if mod is None:
        return None
    current = mod.getcurrent()
    parent = getattr(current, "parent", None)
    if parent is None or not (
        getattr(current, "__sqlalchemy_greenlet_provider__", False)  # SQLAlchemy >= 2.0.3x
        or type(current).__name__ == "_AsyncIoGreenlet"  # the same greenlet, unmarked, before
    ):
        return None
    frame = getattr(parent, "gr_frame", None)
    return frame if isinstance(frame, FrameType) else None


def caller_location(frame: FrameType | None) -> Location:
    found = find_user(frame)
    if found is None:
        found = find_user(_greenlet_parent_frame())
    return found if found is not None else user_location(frame)


def request_info() -> context.RequestInfo | None:
    """The request running this code, unless paused (works in threads and greenlets)."""
    return context.info_of(contextvars.copy_context())


def armed_by(info: context.RequestInfo | None) -> bool:
    """Whether code running with ``info`` can leak: a request's (or a task's it started,
    or a ``stall_guard.only`` window's), not the lifespan's nor the test's own."""
    return info is not None and info.label != "lifespan"


def is_request(info: context.RequestInfo | None) -> bool:
    if info is None:
        return False
    method, _, path = info.label.partition(" ")
    return bool(path) and (method.isupper())


# -- checks of ShrinkPools arguments --------------------------------------------------------


def check_size(kind: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(
            f"shrink_pools: {kind}={value!r} is not valid; give an int >= {minimum}"
        )
    return value


def check_timeout(kind: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ValueError(f"shrink_pools: {kind}={value!r} is not valid; give seconds > 0")
    return float(value)


# -- hooks that must never reach the app ----------------------------------------------------


class HookGuard:
    """Runs one owner's bookkeeping around app calls; a failure turns that hook off for
    that object and is noted once (:func:`patching.hook_failed`), never raised."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._off: dict[tuple[str, int], Any] = {}  # the object is kept: its id stays its
        self._lock = threading.Lock()

    def disabled(self, what: str, obj: Any = None) -> bool:
        return (what, id(obj)) in self._off

    def failed(self, library: str, what: str, exc: BaseException, obj: Any = None) -> None:
        with self._lock:
            self._off[(what, id(obj))] = obj
        patching.hook_failed(self.owner, library, what, exc)

    def safely(self, library: str, what: str, obj: Any, fn: Callable[..., Any], *args: Any
               ) -> Any:
        """``fn(*args)``, or None (and the hook off for ``obj``) when it raises."""
        try:
            return fn(*args)
        except Exception as exc:
            self.failed(library, what, exc, obj)
            return None

    def clear(self) -> None:
        with self._lock:
            self._off.clear()


def same_signature(original: Callable[..., Any],
                   body: Callable[[tuple[Any, ...], dict[str, Any]], Any]) -> Callable[..., Any]:
    """A function with exactly ``original``'s parameters that calls ``body(args, kwargs)``.

    ``args``/``kwargs`` are what calling ``original(*args, **kwargs)`` needs to get the same
    values. Libraries read an ``__init__``'s parameter names from its code object (SQLAlchemy's
    ``create_engine`` routes ``echo=`` and ``pool_size=`` that way), so ``*args, **kwargs``
    is not enough. Falls back to that for callables that are not plain functions.
    """
    try:
        sig = inspect.signature(original)
    except (TypeError, ValueError):
        sig = None
    if sig is None or not isinstance(original, types.FunctionType):

        @functools.wraps(original)
        def passthrough(*args: Any, **kwargs: Any) -> Any:
            return body(args, kwargs)

        return passthrough

    namespace: dict[str, Any] = {"__sg_body": body}
    params: list[str] = []
    positional: list[str] = []
    keywords: list[str] = []
    kinds = inspect.Parameter
    seen_star = False
    previous_kind = None
    for index, p in enumerate(sig.parameters.values()):
        if previous_kind is kinds.POSITIONAL_ONLY and p.kind is not kinds.POSITIONAL_ONLY:
            params.append("/")
        previous_kind = p.kind
        default = ""
        if p.default is not p.empty:
            namespace[f"__sg_d{index}"] = p.default
            default = f"=__sg_d{index}"
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD):
            params.append(p.name + default)
            positional.append(p.name)
        elif p.kind is kinds.VAR_POSITIONAL:
            seen_star = True
            params.append("*" + p.name)
            positional.append("*" + p.name)
        elif p.kind is kinds.KEYWORD_ONLY:
            if not seen_star:
                seen_star = True
                params.append("*")
            params.append(p.name + default)
            keywords.append(f"{p.name!r}: {p.name}")
        else:
            params.append("**" + p.name)
            keywords.append("**" + p.name)
    if previous_kind is kinds.POSITIONAL_ONLY:
        params.append("/")
    source = (
        f"def wrapper({', '.join(params)}):\n"
        f"    return __sg_body(({', '.join(positional)}{',' if positional else ''}), "
        f"{{{', '.join(keywords)}}})\n"
    )
    # Compiled as one of our files, so locating the user's line walks past it.
    exec(compile(source, __file__, "exec"), namespace)
    wrapper = namespace["wrapper"]
    functools.update_wrapper(wrapper, original)
    return wrapper  # type: ignore[no-any-return]


# -- what every library watcher writes to ---------------------------------------------------


class WatchCore:
    """Stats per pool, findings, and the hook guard shared by the library watchers."""

    owner = "pool watch"

    def __init__(self, guard_: guard.Guard | None = None, *, threshold_ms: float | None = None
                 ) -> None:
        self._guard = guard_
        self._threshold_ms = threshold_ms
        self.patches = patching.Patches(self.owner)
        self.hooks = HookGuard(self.owner)
        self.lock = threading.Lock()
        self.on = False
        self._stats: dict[int, Stats] = {}
        self._keep: dict[int, Any] = {}  # keeps ids stable while stats exist
        self._names: dict[str, int] = {}

    @property
    def threshold_ms(self) -> float:
        if self._threshold_ms is not None:
            return self._threshold_ms
        g = self.active_guard()
        return g.threshold_ms if g is not None else 20.0

    def active_guard(self) -> guard.Guard | None:
        return self._guard if self._guard is not None else guard.active()

    def stat(self, key: Any, name: str, kind: str) -> Stats:
        with self.lock:
            stats = self._stats.get(id(key))
            if stats is None:
                count = self._names.get(name, 0)
                self._names[name] = count + 1
                stats = Stats(name if not count else f"{name} #{count + 1}", kind)
                self._stats[id(key)] = stats
                self._keep[id(key)] = key
            return stats

    def all_stats(self) -> list[PoolStats]:
        with self.lock:
            return [s.freeze() for s in self._stats.values()]

    def record(self, kind: str, message: str, *, location: Location, request: str | None,
               duration_ms: float | None = None, call: str | None = None,
               frame: FrameType | None = None) -> None:
        g = self.active_guard()
        if g is None:
            return
        if frame is not None and g.allowed(frame):
            return
        g.record(kind, message, location=location, request=request, duration_ms=duration_ms,
                 call=call)

    def pool_wait(self, stats: Stats, wait_ms: float, frame: FrameType, *, timed_out: bool
                  ) -> None:
        """A wait for a SQLAlchemy / asyncpg slot over the threshold, or a pool timeout."""
        info = request_info()
        if info is None:
            return
        what = (f"got a pool timeout after waiting {wait_ms:.0f} ms" if timed_out
                else f"waited {wait_ms:.0f} ms (threshold {self.threshold_ms:g} ms)")
        self.record(
            "pool-exhaustion",
            f"{info.request} {what} for a connection of {stats.name} (size {stats.size}, "
            f"{stats.max_in_use} in use at most). {POOL_HELP} See {DOCS}pool-exhaustion",
            location=caller_location(frame), request=info.request, duration_ms=wait_ms,
            call=stats.name, frame=frame,
        )

    def created(self, what: str, frame: FrameType) -> None:
        """A client, engine or pool was made: a finding when a request is being served."""
        if not self.on:
            return
        info = request_info()
        if not is_request(info):
            return
        assert info is not None
        self.record(
            "client-per-request",
            f"A new {what} was created while serving {info.request}. {CLIENT_HELP} "
            f"See {DOCS}client-per-request",
            location=caller_location(frame), request=info.request, call=what, frame=frame,
        )

    def watch_init(self, cls: type, library: str, what: str) -> None:
        """Wrap ``cls.__init__`` (same parameters) to report creation during a request."""
        link = self.patches.link(cls, "__init__")
        hook = f"{what} creation"
        core = self

        def body(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            result = link.next(*args, **kwargs)
            if core.on and not core.hooks.disabled(hook, cls):
                core.hooks.safely(library, hook, cls, core.created, what, sys._getframe(1))
            return result

        self.patches.set(cls, "__init__", same_signature(link.next, body), link)
