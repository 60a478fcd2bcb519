"""Where did the time go: the per-request audit of a burst (SPEC section 8).

While a burst runs, each request carries a :class:`Ledger` in a context variable; the
tasks it starts and the worker threads it hands work to inherit it. The sources write
*spans* (a kind, a start and an end on :data:`clock.real`) into it:

* the loop watch's step hook (:data:`.loopwatch.steps.step_observer`): every loop step run
  in the request's context is ``loop``; the time from when that step was *scheduled* to
  when it ran is ``loop_wait``: ready, while the loop ran other work. asyncio: what a step
  appended to the loop's ready queue is found there at the step's end (nothing is
  wrapped; call_soon itself is not timed: of the n handles a step scheduled, the k-th
  counts as ready k/n into it); uvloop: ``call_soon`` is wrapped for the burst; trio: the
  ``task_scheduled`` instrument;
* the pool watch (:func:`span`, :func:`http_call`): a worker-thread call's wait for a
  token and its run (``thread_wait``, ``thread``), a DB or HTTP pool checkout's wait
  (``pool_wait``), an outbound httpx call (``io``, and its host in ``upstreams``);
* SQLAlchemy's cursor events: a query with the connection in hand (``io``).

:func:`settle` then *partitions* each request's time, from its issue to its last
body byte, when the burst's requests are first read (:class:`.model.RequestTimings`; the
per-step path only notes floats): every instant goes to the highest-ranked span that
covers it (loop, loop_wait, thread, thread_wait, pool_wait, io, in that order: a request
whose own code runs while its query is in flight is running, not waiting), and whatever
no span covers is
``other_ms`` (sleeps, locks, queues, the framework). The parts therefore sum to the latency
exactly and none is negative (``other_ms`` is what is left, so it cannot go below zero);
spans outside the request's own interval are clipped to it.

What ``loop_wait`` does not see: a timer that fired late (its wait counts as ``other``), a
socket the selector found ready before its reader callback ran (counted as ``io``), and on
asyncio a callback another thread scheduled while no step ran (``call_soon_threadsafe``
while the loop waited in its selector: it runs at once then); the task wake-ups that
follow are seen.

Nothing here raises into the app: the hooks run inside ``try`` and a failure notes itself
(:func:`patching.hook_failed`) and turns the audit off for the rest of the burst.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

from . import guard as guard_mod
from . import patching
from .clock import real
from .loopwatch import steps
from .model import BREAKDOWN_KEYS

__all__ = ["Ledger", "Recorder", "http_call", "span"]

OWNER = "request audit"

# Span kinds, highest rank (wins where spans overlap) first; index = rank.
KINDS = ("loop", "loop_wait", "thread", "thread_wait", "pool_wait", "io")
RANK = {kind: rank for rank, kind in enumerate(KINDS)}
OTHER = len(KINDS)
KEYS = BREAKDOWN_KEYS  # loop_ms, loop_wait_ms, thread_wait_ms, thread_ms, ... other_ms
_KEY_OF = {
    RANK["loop"]: "loop_ms",
    RANK["loop_wait"]: "loop_wait_ms",
    RANK["thread"]: "thread_ms",
    RANK["thread_wait"]: "thread_wait_ms",
    RANK["pool_wait"]: "pool_wait_ms",
    RANK["io"]: "io_ms",
    OTHER: "other_ms",
}
MAX_MARKS = 5000  # findings recorded during one burst kept for its timeline
LAG_MIN_S = 0.0002  # loop lag below this is not drawn in the counter


class Ledger:
    """What one request of a burst spent its time on (filled by the hooks).

    One small object a request, nothing else while the burst runs: its loop steps go to
    the recorder's one flat list, and are handed to it (``steps``) when the burst is
    first read (:meth:`Recorder.split`)."""

    __slots__ = ("issued", "open", "spans", "steps", "upstreams")

    def __init__(self, issued: float) -> None:
        self.issued = issued
        self.open = True  # False once its burst is over: what it holds is settled as is
        # The spans the pools, threads and SQLAlchemy noted: (rank, start, end).
        self.spans: list[tuple[int, float, float]] | None = None
        # Its loop steps, flat: ready, start, end, ready, start, end, ... (ready == start
        # when it did not wait), once the burst is split; None before.
        self.steps: list[float] | None = None
        self.upstreams: dict[str, float] | None = None

    def step_spans(self) -> list[tuple[int, float, float]]:
        """Its loop steps as loop_wait and loop spans, with the others."""
        out = list(self.spans or ())
        flat = self.steps or ()
        for k in range(0, len(flat), 3):
            ready, start, end = flat[k], flat[k + 1], flat[k + 2]
            if start > ready:
                out.append((1, ready, start))  # loop_wait
            out.append((0, start, end))  # loop
        return out


_ledger: contextvars.ContextVar[Ledger | None] = contextvars.ContextVar(
    "stallguard_ledger", default=None
)
_recorder: Recorder | None = None  # the burst being audited (one at a time)
# Audit every burst (on by default; bench/audit.py turns it off to measure its cost).
enabled = True


def wanted() -> bool:
    """Whether a burst starting now is audited: on, and a guard armed (whose loop watch
    times the steps; without one there is nothing to split the time with)."""
    return enabled and guard_mod.active() is not None


def span(kind: str, start: float, end: float) -> None:
    """Note that the request running this code spent ``start``..``end`` on ``kind``
    (a name of :data:`KINDS`). Cheap, and a no-op outside an audited burst."""
    ledger = _ledger.get()
    if ledger is not None and end > start and ledger.open:
        if ledger.spans is None:
            ledger.spans = []
        ledger.spans.append((RANK[kind], start, end))


def http_call(host: str, start: float, end: float, wait_s: float) -> None:
    """An outbound httpx call of the running request: ``wait_s`` of it waiting for a pool
    connection (taken as its beginning), the rest ``io``; the whole call counts for
    ``host`` in the request's upstreams."""
    ledger = _ledger.get()
    if ledger is None or end <= start or not ledger.open:
        return
    wait_end = min(end, start + max(wait_s, 0.0))
    if ledger.spans is None:
        ledger.spans = []
    if wait_end > start:
        ledger.spans.append((RANK["pool_wait"], start, wait_end))
    ledger.spans.append((RANK["io"], wait_end, end))
    if ledger.upstreams is None:
        ledger.upstreams = {}
    ledger.upstreams[host] = ledger.upstreams.get(host, 0.0) + (end - start)
    rec = _recorder
    if rec is not None:
        rec.in_use.append((start, "http calls in flight", 1))
        rec.in_use.append((end, "http calls in flight", -1))


def begin(issued: float) -> tuple[Ledger, contextvars.Token[Ledger | None]]:
    """The ledger of a request issued at ``issued``, set for the code that runs it."""
    ledger = Ledger(issued)
    return ledger, _ledger.set(ledger)


def end(ledger: Ledger, token: contextvars.Token[Ledger | None]) -> None:
    """The request is over (its last body byte is in): the step running now is its last
    one, up to now; the loop watch's observer gives it that part at the step's end."""
    rec = _recorder
    if rec is not None:
        rec.closing.append((ledger, real.perf_counter()))
    try:
        _ledger.reset(token)
    except ValueError:  # set in another context: nothing to undo here
        return


# -- the loop step hook -------------------------------------------------------------------


def observe(start: float, end: float, ctx: contextvars.Context | None, owner: Any,
            queue: deque[Any] | None, scheduled: int) -> None:
    """Called by the loop watch at the end of every step (see steps.step_observer).

    The hot path: every loop step while a burst runs. It only notes floats (the step's
    ledger, when it was ready, its start and end) in one flat list; the clamping of the
    ready time is left to :meth:`Recorder.split`, after the burst. No id() on asyncio (it
    raises an audit event, for which the traps' hook runs)."""
    rec = _recorder
    if rec is None:
        return
    try:
        sched = rec.sched
        if scheduled:  # asyncio: the step's own handles, last in the ready queue
            if scheduled == 1:
                sched[queue[-1]] = end  # type: ignore[index]
            else:  # call_soon is not timed: the k-th of n counts as ready k/n into it
                part = (end - start) / scheduled
                for k in range(scheduled):
                    sched[queue[k - scheduled]] = start + part * (k + 1)  # type: ignore[index]
        ready = sched.pop(owner if rec.by_handle else id(owner), start)
        if rec.closing:  # requests that ended inside this step: their part of it
            closing = rec.closing[:]
            rec.closing.clear()  # in place: the C hook holds the list
            for done, at in closing:
                rec.flat.extend((done, ready, start, at))
        if ctx is not None:
            ledger = ctx.get(_ledger)
            if ledger is not None and ledger.open:
                rec.flat.extend((ledger, ready, start, end))
    except Exception as exc:
        rec.stop()
        patching.hook_failed(OWNER, "asyncio", "the loop steps of a request", exc)


# -- per-burst recording --------------------------------------------------------------------


class Recorder:
    """Audits one burst: hooks the running loop's scheduling and SQLAlchemy's cursor
    events, collects findings, counters and the ledgers, and settles them at the end."""

    def __init__(self) -> None:
        self.patches = patching.Patches(OWNER)
        # when each step was ready: by its asyncio.Handle (asyncio, noted by observe()),
        # else by the id of the callback (uvloop) or trio task (see by_handle)
        self.sched: dict[Any, float] = {}
        self.by_handle = False
        self.in_use: list[tuple[float, str, int]] = []  # (time, counter, +1/-1)
        self.cursors: dict[int, float] = {}  # id(cursor) -> query start
        self.closing: list[tuple[Ledger, float]] = []  # requests over in the running step
        # Every loop step of the burst's requests, flat and in the order they ran:
        # ledger, ready, start, end, ledger, ... (split among the ledgers on first read)
        self.flat: list[Any] = []
        self._split = threading.Lock()
        self.t0 = 0.0
        self._marks_from = 0

    # -- start / stop (on the loop thread) ----------------------------------------------
    def start(self) -> Recorder:
        """Hook the running loop (call from inside it); set :attr:`t0` after."""
        global _recorder
        g = guard_mod.active()
        self._marks_from = len(g.events) if g is not None else 0
        try:
            self._hook_loop()
        except Exception as exc:  # loop_wait goes unseen (counted as other), the rest is kept
            self.patches.restore()
            patching.hook_failed(OWNER, "asyncio", "the scheduling of loop steps", exc)
        if "sqlalchemy" in sys.modules:
            try:
                self._hook_sqlalchemy()
            except Exception as exc:
                patching.hook_failed(OWNER, "sqlalchemy", "cursor and pool events", exc)
        _recorder = self
        steps.step_observer = observe
        if self.by_handle and steps._cstep is not None:
            steps._cstep.audit_on(self.sched, self.closing, self.flat, _ledger, observe, Ledger)
        return self

    def stop(self) -> None:
        global _recorder
        if _recorder is self:
            _recorder = None
            steps.step_observer = None
            if steps._cstep is not None:
                steps._cstep.audit_off()
        self.patches.restore()
        self.sched.clear()  # handles of steps that never ran (cancelled): let them go

    def _hook_loop(self) -> None:
        loop = asyncio.events._get_running_loop()
        sched = self.sched
        now = real.perf_counter
        if loop is None:
            self._hook_trio()
            return
        if isinstance(loop, asyncio.BaseEventLoop):
            # Nothing to hook: the loop watch hands observe() each step's handle and what
            # the step appended to the loop's ready queue.
            self.by_handle = True
            return
        for name in ("call_soon", "call_soon_threadsafe"):  # uvloop: steps and wake-ups

            def make(link: patching.Link) -> Callable[..., Any]:
                def call_soon(callback: Any, *args: Any, context: Any = None) -> Any:
                    handle = link.next(callback, *args, context=context)
                    sched[id(callback)] = now()
                    return handle

                return call_soon

            self.patches.wrap(loop, name, make)

    def _hook_trio(self) -> None:
        trio = sys.modules.get("trio")
        if trio is None:
            return
        sched = self.sched

        class _Scheduled:
            def task_scheduled(self, task: Any) -> None:
                sched[id(task)] = real.perf_counter()

        instrument = _Scheduled()
        token = trio.lowlevel.current_trio_token()
        trio.lowlevel.add_instrument(instrument)

        def remove() -> None:
            with contextlib.suppress(RuntimeError, KeyError, ValueError):
                if trio.lowlevel.current_trio_token() is token:
                    trio.lowlevel.remove_instrument(instrument)

        self.patches.undo("task_scheduled instrument", remove, target="trio run")

    def _hook_sqlalchemy(self) -> None:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine
        from sqlalchemy.pool import Pool

        cursors, in_use = self.cursors, self.in_use

        def before(conn: Any, cursor: Any, *rest: Any) -> None:
            cursors[id(cursor)] = real.perf_counter()

        def after(conn: Any, cursor: Any, *rest: Any) -> None:
            started = cursors.pop(id(cursor), None)
            if started is not None:
                span("io", started, real.perf_counter())

        def checkout(*args: Any) -> None:
            in_use.append((real.perf_counter(), "db connections in use", 1))

        def checkin(*args: Any) -> None:
            in_use.append((real.perf_counter(), "db connections in use", -1))

        listeners = [
            (Engine, "before_cursor_execute", before),
            (Engine, "after_cursor_execute", after),
            (Pool, "checkout", checkout),
            (Pool, "checkin", checkin),
        ]
        installed = []
        for target, name, fn in listeners:
            listener = _safe(fn, name)
            event.listen(target, name, listener)
            installed.append((target, name, listener))

        def remove() -> None:
            for target, name, listener in installed:
                with contextlib.suppress(Exception):
                    event.remove(target, name, listener)

        self.patches.undo("cursor and pool events", remove, target="sqlalchemy")

    # -- the end of the burst -------------------------------------------------------------
    def marks(self, end: float) -> list[dict[str, Any]]:
        """The findings recorded during the burst, on its time axis (ms from its start)."""
        g = guard_mod.active()
        if g is None:
            return []
        g.settle()  # a step held back as a possible one-off is on the timeline too
        out = []
        for at, finding in g.events[self._marks_from:self._marks_from + MAX_MARKS]:
            if at > end + 0.001:
                continue  # (a held finding is added when settled, out of time order)
            dur = finding.duration_ms or 0.0
            # A timed call or a loop step is recorded as it ends: it began dur earlier.
            begun = at - dur / 1000.0 if finding.kind in ("loop-stall", "blocking-call") else at
            out.append({
                "kind": finding.kind,
                "t_ms": round((begun - self.t0) * 1000.0, 3),
                "duration_ms": None if finding.duration_ms is None
                else round(finding.duration_ms, 3),
                "file": finding.file,
                "line": finding.line,
                "function": finding.function,
                "request": finding.request,
                "call": finding.call,
            })
        return out

    def split(self) -> None:
        """Hand each ledger its loop steps (once; called by whatever reads the burst
        first, its request timings or its timeline). A step was not ready before the
        request was issued or before its previous step ended: its ready time is clamped
        to the later of the two (or counts as not waiting, if that is after its start)."""
        with self._split:
            flat, self.flat = self.flat, []
            last: dict[Ledger, float] = {}  # each ledger's latest step end so far
            for k in range(0, len(flat), 4):
                ledger, ready, start, end = flat[k:k + 4]
                steps = ledger.steps
                if steps is None:
                    steps = ledger.steps = []
                before = last.get(ledger, ledger.issued)
                if ready >= start:
                    ready = start
                elif ready < before:
                    ready = before if before < start else start
                steps += (ready, start, end)
                if end > before:
                    last[ledger] = end

    def timeline(self, ledgers: Iterable[Ledger | None], end: float,
                 marks: list[dict[str, Any]]) -> dict[str, Any]:
        """The burst's timeline: the counters, and ``marks`` (see :meth:`marks`)."""
        out = self.counters(ledgers, end)
        out["marks"] = marks
        return out

    def counters(self, ledgers: Iterable[Ledger | None], end: float) -> dict[str, Any]:
        """Step counters on the burst's time axis: ``[[t_ms, value], ...]`` per name."""
        self.split()
        t0 = self.t0
        changes = list(self.in_use)
        lags: dict[int, float] = {}  # ms slot -> the longest a request's step waited then
        for ledger in ledgers:
            if ledger is None:
                continue
            flat = ledger.steps or ()
            for k in range(0, len(flat), 3):
                s, e = flat[k], flat[k + 1]  # ready at s, ran at e
                if end >= e > s:  # loop_wait (in the burst: read after it, a task it
                    # left running may have added steps)
                    slot = int((e - t0) * 1000.0)
                    if e - s > lags.get(slot, 0.0):
                        lags[slot] = e - s
            for rank, s, e in ledger.spans or ():
                if rank == 2:  # thread
                    changes.append((s, "threads in use", 1))
                    changes.append((e, "threads in use", -1))
        changes.sort(key=lambda c: c[0])
        series: dict[str, list[list[float]]] = {}
        level: dict[str, int] = {}
        for at, name, delta in changes:
            if at < t0 or at > end:
                level[name] = max(0, level.get(name, 0) + delta) if at < t0 else level.get(
                    name, 0)
                continue
            level[name] = max(0, level.get(name, 0) + delta)
            series.setdefault(name, []).append([round((at - t0) * 1000.0, 3), level[name]])
        lag = [[float(slot), round(v * 1000.0, 3)] for slot, v in sorted(lags.items())
               if v >= LAG_MIN_S]
        return {"loop_lag_ms": lag, "in_use": series}


def _safe(fn: Callable[..., None], what: str) -> Callable[..., None]:
    """A listener that never raises into SQLAlchemy (a failure is noted once)."""

    def listener(*args: Any) -> None:
        try:
            fn(*args)
        except Exception as exc:
            patching.hook_failed(OWNER, "sqlalchemy", what, exc)

    return listener


def _start(span: tuple[int, float, float]) -> float:
    return span[1]


def _put(totals: list[float], segments: list[tuple[int, float, float]], rank: int,
         s: float, e: float) -> None:
    """Count ``s``..``e`` for ``rank``, merged into the last segment when it continues it."""
    totals[rank] += e - s
    if segments and segments[-1][0] == rank and segments[-1][2] == s:
        segments[-1] = (rank, segments[-1][1], e)
    else:
        segments.append((rank, s, e))


def partition(spans: list[tuple[int, float, float]], lo: float, hi: float
              ) -> tuple[list[float], list[tuple[int, float, float]]]:
    """Split ``lo``..``hi`` among ``spans`` by rank (see the module docstring).

    Returns the seconds per rank (index :data:`OTHER` is the rest) and the segments in
    time order, gaps included as OTHER; adjacent segments of one rank are merged.
    """
    totals = [0.0] * (OTHER + 1)
    segments: list[tuple[int, float, float]] = []
    # Fast path, the common case: the spans in time order do not overlap.
    at = lo
    for rank, s, e in sorted(spans, key=_start):
        s, e = max(s, lo), min(e, hi)
        if e <= s:
            continue
        if s < at:
            break  # overlapping spans: the sweep below
        if s > at:
            _put(totals, segments, OTHER, at, s)
        _put(totals, segments, rank, s, e)
        at = e
    else:
        if hi > at:
            _put(totals, segments, OTHER, at, hi)
        return totals, segments
    # The sweep: each instant goes to the highest-ranked (lowest index) span covering it.
    totals = [0.0] * (OTHER + 1)
    segments = []
    events: list[tuple[float, int, int]] = []
    for rank, s, e in spans:
        s, e = max(s, lo), min(e, hi)
        if e > s:
            events.append((s, 1, rank))
            events.append((e, -1, rank))
    events.sort()
    active = [0] * OTHER
    at = lo
    for t, delta, rank in events:
        if t > at:
            best = next((r for r in range(OTHER) if active[r]), OTHER)
            _put(totals, segments, best, at, t)
            at = t
        active[rank] += delta
    if hi > at:
        _put(totals, segments, OTHER, at, hi)
    return totals, segments


def settle(ledger: Ledger, finished: float, t0: float
           ) -> tuple[dict[str, float] | None, dict[str, float], tuple[tuple[str, float, float],
                                                                      ...]]:
    """(breakdown in ms, upstreams in ms, segments in ms from ``t0``) of one request."""
    ups = {h: s * 1000.0 for h, s in ledger.upstreams.items()} if ledger.upstreams else {}
    if not ledger.steps:  # no loop step seen: the loop watch is not attached (no guard)
        return None, ups, ()
    t, segments = partition(ledger.step_spans(), ledger.issued, finished)
    breakdown = {  # in the order of BREAKDOWN_KEYS
        "loop_ms": t[0] * 1000.0,
        "loop_wait_ms": t[1] * 1000.0,
        "thread_wait_ms": t[3] * 1000.0,
        "thread_ms": t[2] * 1000.0,
        "pool_wait_ms": t[4] * 1000.0,
        "io_ms": t[5] * 1000.0,
        "other_ms": t[6] * 1000.0,
    }
    key = _KEY_OF
    segs = tuple([(key[rank], (s - t0) * 1000.0, (e - t0) * 1000.0) for rank, s, e in segments])
    return breakdown, ups, segs
