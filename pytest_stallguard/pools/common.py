"""What the per-library pool modules share: records, statistics, locations, safe hooks.

:class:`WatchCore` is the state every library watcher writes to (stats per pool, the
guard findings go to, which hooks are off); :class:`HookGuard` runs our bookkeeping so a
failure of ours never reaches the app; :func:`same_signature` builds ``__init__`` wrappers
with the original's exact parameters (SQLAlchemy reads them off the code object).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import itertools
import os
import sys
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from .. import context, guard, patching
from ..clock import real
from ..location import Location, is_user_file, relative, user_location
from ..model import DOCS, PoolStats

POOL_KINDS = ("threads", "sqlalchemy", "httpx", "asyncpg")

# Plain waits for a DB or HTTP pool slot (queueing behind busy connections) are a finding
# only past this bound unless the user set ``pool_wait_ms``: 50 simultaneous requests doing
# only their queries on a 10-connection pool wait up to ~0.2-0.3 s on a loaded 2-core
# machine (capacity, not a bug), while a 0.9 s wait is one users feel.
DEFAULT_SLOT_WAIT_MS = 500.0
# A connection held idle (checked out, no query or request running on it) for a spell this
# long while other requests queued at least QUEUE_FLOOR_MS for the same pool is the pitfall:
# a connection held across an upstream call, CPU work or a sleep.
IDLE_SPELL_MS = 100.0
QUEUE_FLOOR_MS = 20.0

POOL_HELP = (
    "Requests queue for a pool slot. Make the pool bigger only if the database or upstream "
    "allows that many connections; set a short pool timeout and answer a clean 503 when it "
    "fires; never hold a connection while awaiting a slow upstream call."
)
IDLE_HELP = (
    "A connection checked out and doing nothing makes everyone else wait for it. Do the "
    "upstream call, CPU work or sleep before checking the connection out (or after giving "
    "it back), and keep only the queries inside `async with pool.acquire()` / the session."
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
    work_s: float = 0.0
    idle_s: float = 0.0
    # Waits for a slot, to tell whether anyone queued while a connection sat idle:
    # finished (start, end) and in progress (id -> start), by clock.real.perf_counter.
    wait_spans: list[tuple[float, float]] = field(default_factory=list)
    waiting: dict[int, float] = field(default_factory=dict)
    # Connections checked out now (id -> Held), and idle spells of IDLE_SPELL_MS or more.
    held: dict[int, Held] = field(default_factory=dict)
    idle_spells: list[tuple[float, float]] = field(default_factory=list)

    def enter(self) -> None:
        self.in_use += 1
        self.max_in_use = max(self.max_in_use, self.in_use)

    def freeze(self) -> PoolStats:
        return PoolStats(
            name=self.name, kind=self.kind, size=self.size, max_in_use=self.max_in_use,
            waits_ms=tuple(self.waits_ms), timeouts=self.timeouts,
            work_total_ms=self.work_s * 1000.0, idle_held_total_ms=self.idle_s * 1000.0,
        )

    def queued(self, start: float, end: float) -> tuple[int, float, float]:
        """Waits for a slot that overlapped ``[start, end]``: how many, their longest
        overlap and the sum of overlaps, in seconds (call with the core's lock held)."""
        count, longest, total = 0, 0.0, 0.0
        spans = [*self.wait_spans, *((s, end) for s in self.waiting.values())]
        for s, e in spans:
            overlap = min(e, end) - max(s, start)
            if overlap > 0:
                count += 1
                longest = max(longest, overlap)
                total += overlap
        return count, longest, total

    def behind_idle(self, start: float, end: float) -> bool:
        """Whether a wait over ``[start, end]`` overlapped a long idle spell of another
        connection of this pool (call with the core's lock held)."""
        floor, spell = QUEUE_FLOOR_MS / 1000.0, IDLE_SPELL_MS / 1000.0
        spans = list(self.idle_spells)
        for held in self.held.values():
            since = held.idle_since
            if held.depth == 0 and since is not None and end - since >= spell:
                spans.append((since, end))
        return any(min(e, end) - max(s, start) >= floor for s, e in spans)


class Held:
    """One checked-out connection: time working versus time idle in the holder's hands.

    Touched by the holder only (one task, or one thread), so it takes no lock; the pool's
    totals are updated at check-in under the core's lock. ``work_begin``/``work_end`` nest.
    """

    __slots__ = ("awaited", "depth", "idle_rq", "idle_since", "info", "location", "since",
                 "stats", "work_s", "work_since", "worst")

    def __init__(self, stats: Stats, info: context.RequestInfo | None, location: Location,
                 now: float) -> None:
        self.stats = stats
        self.info = info
        self.location = location
        self.since = now
        self.idle_since: float | None = now
        self.idle_rq = -1  # the holder thread's run-queue time when the idle spell began
        self.work_since = 0.0
        self.depth = 0
        self.work_s = 0.0
        self.awaited: str | None = None  # an outbound call started in this idle spell
        # the longest idle spell others queued behind: (idle s, waiters, queued s,
        # longest wait s, what it awaited, where the spell ended)
        self.worst: tuple[float, int, float, float, str | None, Location | None] | None = None


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


def resumed_at(frame: FrameType | None, checkout: Location) -> Location:
    """Where the holder used its connection again: the line of the function that checked
    it out (walking out of the user's own helpers, and out of SQLAlchemy's greenlet), or
    the first user frame."""
    file, _, function = checkout
    for start in (frame, _greenlet_parent_frame()):
        while start is not None:
            code = start.f_code
            if (code.co_name == function and is_user_file(code.co_filename)
                    and relative(code.co_filename) == file):
                return file, start.f_lineno, function
            start = start.f_back
    return caller_location(frame)


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

    def __init__(self, guard_: guard.Guard | None = None, *, threshold_ms: float | None = None,
                 wait_set: bool = False) -> None:
        self._guard = guard_
        self._threshold_ms = threshold_ms
        # Whether ``threshold_ms`` (or the guard's threshold) is the user's word on how long
        # a DB/HTTP pool wait may be; if not, plain waits use DEFAULT_SLOT_WAIT_MS.
        self._wait_set = wait_set
        self._held_by_info: dict[int, list[Held]] = {}  # id(request info) -> its checkouts
        self._wait_ids = itertools.count()
        # Run-queue time (schedstat) per thread: fds by native thread id, and each wait's
        # reading at its start, to tell the machine's share of a wait from the app's.
        self._rq_fds: dict[int, int] = {}
        self._wait_rq: dict[int, int] = {}
        self._rq_off = sys.platform != "linux"
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

    @property
    def slot_wait_ms(self) -> float:
        """The bound on a plain wait for a DB or HTTP pool slot."""
        return self.threshold_ms if self._wait_set else DEFAULT_SLOT_WAIT_MS

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

    def pool_wait(self, stats: Stats, wait_ms: float, frame: FrameType, *, timed_out: bool,
                  started: float | None = None, preempted_s: float = 0.0) -> None:
        """A wait for a SQLAlchemy / asyncpg slot over the bound, or a pool timeout. A
        plain wait behind a connection held idle is left to that holder's finding."""
        info = request_info()
        if info is None:
            return
        if not timed_out and started is not None:
            with self.lock:
                if stats.behind_idle(started, real.perf_counter()):
                    return
        machine = (f", {preempted_s * 1000:.0f} ms of it kept off the CPU by other processes"
                   if preempted_s * 1000 >= 1 else "")
        what = (f"got a pool timeout after waiting {wait_ms:.0f} ms" if timed_out
                else f"waited {wait_ms:.0f} ms{machine} {self.wait_bound()}")
        self.record(
            "pool-exhaustion",
            f"{info.request} {what} for a connection of {stats.name} (size {stats.size}, "
            f"{stats.max_in_use} in use at most). {POOL_HELP} See {DOCS}pool-exhaustion",
            location=caller_location(frame), request=info.request, duration_ms=wait_ms,
            call=stats.name, frame=frame,
        )

    def wait_bound(self) -> str:
        """How the bound on a plain pool wait was set, for messages."""
        if self._wait_set:
            return f"(pool_wait_ms {self.slot_wait_ms:g} ms)"
        return (f"(over the built-in {self.slot_wait_ms:g} ms bound on a plain wait; set "
                "pool_wait_ms to change it)")

    # -- waits, work and idle time per checkout (DB and HTTP pools) -----------------------
    def wait_begin(self, stats: Stats, started: float) -> int:
        """A request starts waiting for a slot of ``stats``'s pool; returns its token."""
        token = next(self._wait_ids)
        run_queue = self._run_queue_ns()
        with self.lock:
            stats.waiting[token] = started
            if run_queue >= 0:
                self._wait_rq[token] = run_queue
        return token

    def wait_end(self, stats: Stats, token: int, wait_ms: float | None = None) -> float:
        """The wait of ``token`` is over after ``wait_ms`` of queueing (less than the time
        since it began when part of it went to opening a new connection); returns the
        seconds of it the waiting thread was runnable but kept off the CPU by other
        processes (0.0 where unknown)."""
        run_queue = self._run_queue_ns()
        now = real.perf_counter()
        with self.lock:
            started = stats.waiting.pop(token, None)
            if started is not None:
                if wait_ms is not None:
                    started = max(started, now - wait_ms / 1000.0)
                stats.wait_spans.append((started, now))
            before = self._wait_rq.pop(token, -1)
        if before < 0 or run_queue < before:
            return 0.0
        return (run_queue - before) / 1e9

    def plain_wait(self, stats: Stats, wait_ms: float, preempted_s: float, frame: FrameType,
                   started: float) -> None:
        """A wait that got its slot: a finding when, less the time the machine kept the
        waiting thread (the loop, for async pools) off the CPU, it passed the bound."""
        if wait_ms - preempted_s * 1000.0 > self.slot_wait_ms:
            self.pool_wait(stats, wait_ms, frame, timed_out=False, started=started,
                           preempted_s=preempted_s)

    def _run_queue_ns(self) -> int:
        """This thread's time runnable but not running so far (Linux schedstat), or -1.

        The file is opened once per thread with O_NONBLOCK (the traps leave such opens
        alone) and read with ``os.pread``, which they do not trap."""
        if self._rq_off:
            return -1
        tid = threading.get_native_id()
        fd = self._rq_fds.get(tid)
        if fd is None:
            try:
                fd = os.open(f"/proc/self/task/{tid}/schedstat",
                             os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
            except OSError:
                self._rq_off = True
                return -1
            with self.lock:
                if tid in self._rq_fds:  # pragma: no cover - one thread opens its own
                    os.close(fd)
                    fd = self._rq_fds[tid]
                else:
                    self._rq_fds[tid] = fd
        try:
            return int(os.pread(fd, 128, 0).split()[1])
        except (OSError, ValueError, IndexError):
            return -1

    def close_run_queues(self) -> None:
        with self.lock:
            fds = list(self._rq_fds.values())
            self._rq_fds.clear()
            self._wait_rq.clear()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def checkout(self, stats: Stats, info: context.RequestInfo | None, location: Location
                 ) -> Held:
        """A connection was checked out for ``info``'s request (at ``location``)."""
        held = Held(stats, info, location, real.perf_counter())
        held.idle_rq = self._run_queue_ns()
        with self.lock:
            stats.held[id(held)] = held
            if info is not None:
                self._held_by_info.setdefault(id(info), []).append(held)
        return held

    def work_begin(self, held: Held, frame: FrameType | None) -> None:
        """A query or request starts running on ``held`` (called by the holder)."""
        if held.depth == 0:
            now = real.perf_counter()
            self._idle_ended(held, now, frame)
            held.work_since = now
        held.depth += 1

    def work_end(self, held: Held) -> None:
        if held.depth <= 0:
            return
        held.depth -= 1
        if held.depth == 0:
            now = real.perf_counter()
            held.work_s += now - held.work_since
            held.idle_since = now
            held.idle_rq = self._run_queue_ns()
            held.awaited = None

    def outbound(self, info: context.RequestInfo | None, call: str) -> None:
        """``info``'s request starts an outbound call: what its idle connections await."""
        if info is None:
            return
        with self.lock:
            for held in self._held_by_info.get(id(info), ()):
                if held.depth == 0 and held.awaited is None:
                    held.awaited = call

    def checkin(self, held: Held, frame: FrameType | None) -> None:
        """``held`` went back to its pool: add its times up, judge its idle spells."""
        now = real.perf_counter()
        if held.depth > 0:
            held.work_s += now - held.work_since
            held.depth = 0
        else:
            self._idle_ended(held, now, frame)
        idle = max(now - held.since - held.work_s, 0.0)
        with self.lock:
            held.stats.work_s += held.work_s
            held.stats.idle_s += idle
            held.stats.held.pop(id(held), None)
            if held.info is not None:
                helds = self._held_by_info.get(id(held.info), [])
                if held in helds:
                    helds.remove(held)
                if not helds:
                    self._held_by_info.pop(id(held.info), None)
        if held.worst is not None:
            self._held_idle(held, now, idle)

    def _idle_ended(self, held: Held, now: float, frame: FrameType | None) -> None:
        """An idle spell of ``held`` ends. Counted: the spell less the time the holder's
        thread (the loop, for async pools) was runnable but kept off the CPU by other
        processes, so a loaded machine does not make a busy connection look idle."""
        started, held.idle_since = held.idle_since, None
        if started is None or (now - started) * 1000.0 < IDLE_SPELL_MS:
            return
        spell = now - started
        run_queue = self._run_queue_ns() if held.idle_rq >= 0 else -1
        if run_queue >= held.idle_rq >= 0:
            spell = max(spell - (run_queue - held.idle_rq) / 1e9, 0.0)
        if spell * 1000.0 < IDLE_SPELL_MS:
            return
        with self.lock:
            held.stats.idle_spells.append((started, now))
            count, longest, total = held.stats.queued(started, now)
        if longest * 1000.0 < QUEUE_FLOOR_MS:
            return
        if held.worst is None or spell > held.worst[0]:
            ended = resumed_at(frame, held.location) if frame is not None else None
            held.worst = (spell, count, total, longest, held.awaited, ended)

    def _held_idle(self, held: Held, now: float, idle: float) -> None:
        """``pool-exhaustion``: others queued while ``held`` sat idle in its holder's hands."""
        assert held.worst is not None
        info, stats = held.info, held.stats
        if info is None:
            return
        spell, waiters, queued, _longest, awaited, ended = held.worst
        file, line, function = held.location
        where = f"{file}:{line}" if file else "an unknown line"
        if function:
            where += f" ({function})"
        until = ""
        if ended is not None and ended[0] is not None and ended[:2] != held.location[:2]:
            until = f"; idle until {ended[0]}:{ended[1]}"
        doing = (f"while awaiting {awaited}" if awaited is not None
                 else "while no query ran on it (an await, CPU work or a sleep)")
        timeouts = f", {stats.timeouts} pool timeout(s) so far" if stats.timeouts else ""
        held_ms = (now - held.since) * 1000.0
        self.record(
            "pool-exhaustion",
            f"{info.request} held a connection of {stats.name} (size {stats.size}) idle for "
            f"{spell * 1000:.0f} ms {doing} (checked out at {where}{until}); idle "
            f"{idle * 1000:.0f} of the {held_ms:.0f} ms it held it. Meanwhile {waiters} "
            f"request(s) queued for that pool ({queued * 1000:.0f} ms of waiting{timeouts}). "
            f"{IDLE_HELP} See {DOCS}pool-exhaustion",
            location=held.location, request=info.request, duration_ms=spell * 1000.0,
            call=stats.name,
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
