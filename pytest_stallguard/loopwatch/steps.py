"""Step timing: the hooks that time every step of an attached loop.

* asyncio: ``asyncio.events.Handle._run`` is wrapped (a class attribute: one layer per
  attached loop, handles of other loops pass straight through), by ``_cstep.StepHook``
  where the package's C module is built (Linux CPython with a compiler at install time;
  ``STALLGUARD_NO_EXTENSIONS=1`` turns it off), else by the Python wrapper: the same
  bookkeeping, which calls back into Python only when a step is long, a finding is held or
  a reading is due;
* uvloop: it has no ``asyncio.Handle``; the loop's ``call_soon``, ``call_later``,
  ``call_at`` and ``call_soon_threadsafe`` are replaced by instance attributes that wrap
  each callback (task steps and future callbacks go through them; uvloop's own transport
  callbacks do not, and in-process ASGI uses none);
* trio: an instrument with ``before_task_step``/``after_task_step``.

Requests run inline by the test's task (``httpx.ASGITransport``, ``TestClient``) share a
step with the test's code, and with each other (a Starlette app answers a sequence of
inline requests without ever yielding to the loop); :func:`mark_inline` notes where in
the running step each such request began and ended (one ``perf_counter`` per mark, no
extra loop iteration), so a long step is blamed on a request only for the longest part of
it a single request ran.

Every hook is installed through :mod:`..patching` with the loop's own
:class:`~pytest_stallguard.patching.Patches`, so detaching a loop takes exactly its hooks
off. A step stores its number, live ``contextvars.Context`` and start time in plain
attributes of the loop's :class:`LoopState` (read by the watchdog), and on asyncio the
length of the loop's ready queue (for the per-step observer); nothing else happens unless
the step ran longer than the threshold.

Never raise into the app: when our bookkeeping around a step fails, the step runs (exactly
once, its exceptions untouched), :func:`patching.hook_failed` notes it, and the loop is no
longer watched.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import contextlib
import contextvars
import functools
import inspect
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from types import CodeType, FunctionType
from typing import TYPE_CHECKING, Any

from .. import patching
from ..clock import real
from . import discount

if TYPE_CHECKING:
    from .watch import LoopWatch
    from .watchdog import Samples

OWNER = "loop watch"
WHAT = "the steps of its event loop"
UVLOOP_METHODS = ("call_soon", "call_soon_threadsafe", "call_later", "call_at")


class _PyStepState:
    """The hot state of one watched loop, as ``_cstep.StepState`` keeps it (its Python twin,
    typed in ``_cstep.pyi``; :class:`LoopState` documents each)."""

    __slots__ = ("active", "cpu0", "ctx", "end", "long_s", "mark_hi", "mark_in", "mark_last",
                 "mark_lo", "mark_step", "pending", "precise", "queue", "queued", "rq_due",
                 "seq", "start")


def _load_c() -> Any:
    """The C module of the per-step hooks (``_cstep.c``), or None: not built (it is
    optional: no compiler, not Linux or not CPython), turned off
    (``STALLGUARD_NO_EXTENSIONS=1``), or its clock is not the one ``time.perf_counter``
    reads. The Python versions of its hooks do the same then."""
    if os.environ.get("STALLGUARD_NO_EXTENSIONS"):
        return None
    try:
        from . import _cstep
    except ImportError:
        return None
    before = real.perf_counter()
    at = _cstep.perf_counter()
    return _cstep if before <= at <= real.perf_counter() else None


# The C module where it is used (the tests set it to None to run the Python versions).
_cstep = _load_c()

if TYPE_CHECKING:
    from ._cstep import StepState as _StepState
else:
    _StepState = _cstep.StepState if _cstep is not None else _PyStepState


class LoopState(_StepState):
    """One attached loop: its hooks, and what its thread is running (read by the watchdog)."""

    __slots__ = (
        "cpu_hist",
        "held",
        "idle_seen",
        "kind",
        "lock",
        "loop",
        "native_id",
        "patches",
        "precise_until",
        "rq_fd",
        "rq_hist",
        "sample_seq",
        "samples",
        "thread",
        "token",
        "watch",
    )

    def __init__(self, watch: LoopWatch, kind: str, loop: Any, token: Any = None) -> None:
        self.watch = watch
        self.kind = kind  # the library, as named in a hook failure: asyncio, uvloop, trio
        self.loop = loop
        self.token = token  # trio: the run's TrioToken
        self.patches = patching.Patches(OWNER)
        self.thread = threading.get_ident()
        self.native_id = threading.get_native_id()
        self.rq_fd = -2  # /proc schedstat of the loop thread: -2 not opened yet, -1 none
        # When the loop thread next reads it itself, at the end of a step (while it is busy:
        # the watchdog reads it only while no step runs; see discount.read_between_steps)
        self.rq_due = 0.0
        # A step longer than this is judged (the watch's threshold; the C hook reads it)
        self.long_s: float = watch._threshold_s
        # (real.perf_counter after the read, run-queue wait in ns, start of the step it was
        # read wholly inside or 0.0), appended at every reading (discount.read_run_queue)
        self.rq_hist: deque[tuple[float, int, float]] = deque(maxlen=16)
        # (start, end) of the watchdog's turns with the GIL that lasted long enough to
        # matter (it was preempted holding it): the loop thread could not run meanwhile
        # (real.perf_counter after the read, CPU time in ns, as rq_hist), read with it
        self.cpu_hist: deque[tuple[float, int, float]] = deque(maxlen=16)
        self.held: deque[tuple[float, float]] = deque(maxlen=64)
        # While the machine keeps the loop thread waiting for a CPU (the watchdog sees its
        # run-queue wait grow), each step reads the thread's CPU time at its start (cpu0,
        # ns; -1 otherwise): a long step then knows exactly how long it was off the CPU.
        self.precise = False
        self.precise_until = 0.0
        self.cpu0 = -1
        # The last time the watchdog saw the loop idle for long (real.perf_counter): the
        # steps right after it run on cold memory (see watch.LoopWatch._judge).
        self.idle_seen = 0.0
        # Long steps held back as possible one-offs: (request label, where the step left
        # its task) -> (the guard holding the finding, the step's end); each later step
        # is compared with them.
        self.pending: dict[object, tuple[Any, float]] = {}
        # asyncio: the loop's ready queue (a deque, appended to by call_soon), and its
        # length when the running step started: what the step scheduled is at its end.
        self.queue: deque[Any] | None = None
        self.queued = 0
        self.active = True
        self.start = 0.0  # real.perf_counter at the start of the running step, 0.0 idle
        self.ctx: contextvars.Context | None = None  # the running step's live Context
        self.end = 0.0  # real.perf_counter at the end of the last step
        self.seq = 0
        self.lock = threading.Lock()
        self.samples: Samples | None = None  # of the step numbered sample_seq
        self.sample_seq = -1
        # Inline requests in the step that started at mark_step (see mark_inline): when
        # the one running now began (0.0: none is), the time of the last mark, and the
        # longest part of the step one of them ran from beginning to end (lo, hi).
        self.mark_step = 0.0
        self.mark_in = 0.0
        self.mark_last = 0.0
        self.mark_lo = 0.0
        self.mark_hi = 0.0

    def fail(self, what: str, exc: BaseException) -> None:
        """Our bookkeeping failed: stop watching this loop (steps run straight through)
        and note it once as a warning. Never raises."""
        self.active = False
        self.start = 0.0
        with contextlib.suppress(Exception):  # nothing of ours may reach the app
            patching.hook_failed(OWNER, self.kind, what, exc)


# The state of the loop attached last on each thread (thread ident -> LoopState), for
# timing_here() and mark_here(): set by hook_* and LoopWatch.attach, dropped by LoopWatch's
# detach (forget).
_on_thread: dict[int, LoopState] = {}


def timing_here() -> bool:
    """Whether the code running now runs inside a step that a loop watch times, so its
    loop is attached already. Cheap: no system call (asking for the running asyncio loop
    makes one). Only one loop can run on a thread at a time, and a loop's step is timed
    (its ``start`` set) only by the hooks of that loop."""
    st = _on_thread.get(threading.get_ident())
    return st is not None and st.active and st.start != 0.0


def track(st: LoopState) -> None:
    """Note ``st`` as its thread's attached loop (until :func:`forget`)."""
    _on_thread[st.thread] = st


def forget(st: LoopState) -> None:
    """``st``'s hooks are off: it is no longer its thread's attached loop."""
    if _on_thread.get(st.thread) is st:
        del _on_thread[st.thread]


# -- the bookkeeping of one step (module functions: a test makes them fail on purpose) -----


_thread_ns = real.thread_time_ns


def _begin(st: LoopState, ctx: contextvars.Context | None) -> float:
    st.seq += 1
    st.ctx = ctx
    st.cpu0 = _thread_ns() if st.precise else -1
    start = st.start = real.perf_counter()
    return start


# -- per-step observer (request audit, issue 10): called at the end of every timed step
# with (start, end, ctx, owner, queue, scheduled); owner is the ``asyncio.Handle`` run
# (asyncio: the handle itself, not its callback, so that an observer can key by it without
# ``id()``, which raises an audit event), the callback run (uvloop) or the trio task;
# ``queue`` is the asyncio loop's ready queue and ``scheduled`` how many handles the step
# appended to it (they are its last ones), None and 0 elsewhere. Set by audit.Recorder
# while a burst is audited, None otherwise. Its failures are ours: they turn this loop's
# watch off like any other bookkeeping failure.
step_observer: Callable[
    [float, float, contextvars.Context | None, Any, deque[Any] | None, int], None
] | None = None


def _end(st: LoopState, start: float, ctx: contextvars.Context | None, owner: Any) -> None:
    end = st.end = real.perf_counter()
    st.start = 0.0
    if step_observer is not None:
        queue = st.queue
        step_observer(start, end, ctx, owner, queue,
                      len(queue) - st.queued if queue is not None else 0)
    _after(st, start, end, ctx, owner)


def _after(st: LoopState, start: float, end: float, ctx: contextvars.Context | None,
           owner: Any) -> None:
    """The end of a step, past the observer (the C hook calls it only when there is
    something to do: a held finding, a long step, a run-queue reading due)."""
    if st.pending:
        st.watch._repeat(st, start, end, ctx, owner)
    if st.active and end - start > st.watch._threshold_s:
        st.watch._judge(st, start, end, ctx, owner)  # (it takes a schedstat reading)
    elif end > st.rq_due:
        discount.read_between_steps(st, end)


def mark_inline(st: LoopState, entering: bool) -> None:
    """Loop thread, inside a step: an inline request begins (``entering``) or ends now.

    Kept per step without a reset per step: the marks belong to the step that started at
    ``mark_step``, and are ignored for any other. Never raises."""
    start = st.start
    if not start or not st.active:
        return
    try:
        now = real.perf_counter()
        if st.mark_step != start:  # the first mark of this step
            st.mark_step = start
            st.mark_in = start  # if it is an end: the step began inside that request
            st.mark_lo = st.mark_hi = 0.0
        elif not st.mark_in:  # an end with none running (nested calls): since the last mark
            st.mark_in = st.mark_last
        if entering:
            st.mark_in = now
        else:
            if now - st.mark_in > st.mark_hi - st.mark_lo:
                st.mark_lo, st.mark_hi = st.mark_in, now
            st.mark_in = 0.0
        st.mark_last = now
    except Exception as exc:
        st.fail(WHAT, exc)


def mark_here(entering: bool) -> None:
    """:func:`mark_inline` for the step running on this thread, if a loop watch times it
    (a :data:`context.on_inline` listener: found without asking for the running loop,
    which makes a system call). Never raises."""
    st = _on_thread.get(threading.get_ident())
    if st is not None:
        mark_inline(st, entering)


def marker() -> Callable[[bool], None]:
    """The :data:`context.on_inline` listener to use: :func:`mark_here`, in C where the
    C module is built and used (twice a request: as cheap as can be)."""
    if _cstep is not None:
        return _cstep.MarkHere(_on_thread)  # type: ignore[no-any-return]
    return mark_here


def timing_check(mark: Callable[[bool], None]) -> Callable[[], bool]:
    """:func:`timing_here`, in C with the C listener ``mark`` (from :func:`marker`): the
    loop watch's enter hook check, made at every request."""
    return getattr(mark, "timing_here", timing_here)


def inline_bounds(st: LoopState, start: float, end: float) -> tuple[float, float]:
    """The longest part of the step from ``start`` to ``end`` that one inline request ran
    in: all of the step unless :func:`mark_inline` saw a request begin or end inside it."""
    if st.mark_step != start:
        return start, end
    lo, hi = st.mark_lo, st.mark_hi
    if st.mark_in and end - st.mark_in > hi - lo:  # one still running at the end
        lo, hi = st.mark_in, end
    return lo, hi


def _context_for(context: contextvars.Context | None) -> contextvars.Context:
    # Made here (as uvloop would) so the step knows the live Context it runs in: the
    # watchdog reads the request from it while the step runs.
    return context if context is not None else contextvars.copy_context()


# -- asyncio ---------------------------------------------------------------------------------

def _hook_failed(st: LoopState, exc: BaseException) -> None:
    """The C hook's bookkeeping failed (it calls this, then runs on untimed)."""
    st.fail(WHAT, exc)


def hook_asyncio(st: LoopState, loop: asyncio.AbstractEventLoop) -> None:
    """Time the handles of ``loop``: one layer on ``Handle._run``."""

    queue = getattr(loop, "_ready", None)  # BaseEventLoop's ready queue
    st.queue = queue if isinstance(queue, deque) else None
    if _cstep is not None:
        # The same as the Python wrapper below, with no frame of its own: asyncio's own
        # Handle._run is then the first frame of a step (the watchdog's walk stops there).
        def make_c(link: patching.Link) -> Any:
            original = inspect.unwrap(link.next)
            if isinstance(original, FunctionType):
                BOUNDARY_CODES.add(original.__code__)
            return functools.update_wrapper(
                _cstep.StepHook(st, loop, link, globals(), _hook_failed, asyncio.events.Handle),
                link.next)

        st.patches.wrap(asyncio.events.Handle, "_run", make_c)
        track(st)
        return

    def make(link: patching.Link) -> Callable[[asyncio.Handle], None]:
        def _run(self: asyncio.Handle) -> None:
            if self._loop is not loop or not st.active:  # type: ignore[attr-defined]
                return link.next(self)  # type: ignore[no-any-return]
            try:
                ctx = self._context  # type: ignore[attr-defined]
                start = _begin(st, ctx)
                if queue is not None:
                    st.queued = len(queue)
            except Exception as exc:
                st.fail(WHAT, exc)
                return link.next(self)  # type: ignore[no-any-return]
            try:
                return link.next(self)  # type: ignore[no-any-return]
            finally:
                try:
                    _end(st, start, ctx, self)
                except Exception as exc:
                    st.fail(WHAT, exc)

        BOUNDARY_CODES.add(_run.__code__)
        return functools.wraps(link.next)(_run)

    st.patches.wrap(asyncio.events.Handle, "_run", make)
    track(st)


# -- uvloop ----------------------------------------------------------------------------------


def _uvloop_step(
    st: LoopState, ctx: contextvars.Context, callback: Callable[..., Any], *args: Any
) -> Any:
    """Runs one uvloop callback (scheduled through the wrappers below), timed."""
    if not st.active:
        return callback(*args)
    try:
        start = _begin(st, ctx)
    except Exception as exc:
        st.fail(WHAT, exc)
        return callback(*args)
    try:
        return callback(*args)
    finally:
        try:
            _end(st, start, ctx, callback)
        except Exception as exc:
            st.fail(WHAT, exc)


def _uvloop_wrapper(st: LoopState, link: patching.Link, delayed: bool) -> Callable[..., Any]:
    step = _uvloop_step
    if delayed:  # call_later(delay, ...), call_at(when, ...)

        def call_timed(when: Any, callback: Any, *args: Any, context: Any = None) -> Any:
            if st.active:
                try:
                    ctx = _context_for(context)
                except Exception as exc:
                    st.fail(WHAT, exc)
                else:
                    return link.next(when, step, st, ctx, callback, *args, context=ctx)
            return link.next(when, callback, *args, context=context)

        return functools.wraps(link.next)(call_timed)

    def call(callback: Any, *args: Any, context: Any = None) -> Any:
        if st.active:
            try:
                ctx = _context_for(context)
            except Exception as exc:
                st.fail(WHAT, exc)
            else:
                return link.next(step, st, ctx, callback, *args, context=ctx)
        return link.next(callback, *args, context=context)

    return functools.wraps(link.next)(call)


def hook_uvloop(st: LoopState, loop: Any) -> None:
    """Time the callbacks scheduled on ``loop``: instance attributes over its call_*."""
    for name in UVLOOP_METHODS:
        delayed = name in ("call_later", "call_at")

        def make(link: patching.Link, delayed: bool = delayed) -> Callable[..., Any]:
            return _uvloop_wrapper(st, link, delayed)

        st.patches.wrap(loop, name, make)
    track(st)


# -- trio ------------------------------------------------------------------------------------


class TrioInstrument:
    """trio instrument timing each task step (duck-typed trio.abc.Instrument)."""

    def __init__(self, st: LoopState) -> None:
        self.st = st
        self._start = 0.0

    def before_task_step(self, task: Any) -> None:
        st = self.st
        self._start = 0.0
        if not st.active:
            return
        try:
            self._start = _begin(st, task.context)
        except Exception as exc:
            st.fail(WHAT, exc)

    def after_task_step(self, task: Any) -> None:
        st = self.st
        start, self._start = self._start, 0.0
        if not st.active or not start:
            return
        try:
            _end(st, start, task.context, task)
        except Exception as exc:
            st.fail(WHAT, exc)


def hook_trio(st: LoopState) -> None:
    """Time the task steps of the running trio run: an instrument, removed by
    ``st.patches`` (inside that run; a run that is over took it with it)."""
    lowlevel = sys.modules["trio"].lowlevel
    instrument = TrioInstrument(st)

    def remove() -> None:
        st.active = False
        try:
            if lowlevel.current_trio_token() is st.token:
                lowlevel.remove_instrument(instrument)
        except (RuntimeError, KeyError, ValueError):
            pass  # not inside that run (it is over): the instrument went with it

    lowlevel.add_instrument(instrument)
    st.patches.undo("instrument", remove, target="trio run")
    track(st)


_trio_context: Any = None


def trio_runner() -> Any:
    """The trio run of this thread (an identity for attach()), or None: cheap."""
    global _trio_context
    if _trio_context is None:
        if "trio" not in sys.modules:
            return None
        try:
            from trio._core import _run  # the run's thread-local: no public cheap check

            _trio_context = _run.GLOBAL_RUN_CONTEXT
        except (ImportError, AttributeError):  # pragma: no cover - other trio layouts
            _trio_context = False
    if _trio_context is False:  # pragma: no cover
        try:
            return sys.modules["trio"].lowlevel.current_trio_token()
        except RuntimeError:
            return None
    return getattr(_trio_context, "runner", None)


# The frames that run one loop step: the watchdog's stack walk stops there.
BOUNDARY_CODES: set[CodeType] = {_uvloop_step.__code__}
