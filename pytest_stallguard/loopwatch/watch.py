""":class:`LoopWatch`: attach to loops, judge their long steps, record loop-stall findings.

The parts: :mod:`.steps` times each step, :mod:`.watchdog` samples the loop thread while a
long step runs, :mod:`.discount` takes off what is not the app's doing (GC, preemption,
trapped calls). A long step is judged at its end, on the loop thread:

* blamed only when, after the discounts, it is still over the threshold, it ran for a
  request (not the test's own code, not in a ``Guard.paused()`` window) and a guard is
  armed;
* a step in which a request run inline by the test's task began or ended (noted by
  :func:`.steps.mark_inline`, no extra loop iteration) counts only the longest part one
  such request ran, less the GC and trapped calls in it;
* a step that was sampled is blamed only if a sample saw it running for a request, at the
  deepest user line seen, and the samples outside any request before and after it leave
  the request's part of the step longer than the threshold;
* one that was not sampled (a C call holding the GIL to the end of the step) is
  attributed by its context at the end of the step, located where its task is suspended
  after it if that is inside the request (said so in the message), else, for a plain
  callback (not a task), at the callback's own definition; a frame outside the request is
  never named.
* a sampled step with no frame of the project's code on its stack (a stdlib or library
  function run as a loop callback, an app installed as a package not known as such) is
  located at the innermost sampled frame outside the plugin, named as library code.

Steps are timed from the first step that starts after :meth:`LoopWatch.attach`: the step
that calls ``attach()`` is already running and is not timed.
"""

from __future__ import annotations

import asyncio
import asyncio.events
import contextvars
import sys
import weakref
from collections import deque
from typing import Any

from .. import context, guard, patching
from ..location import Location, user_location
from ..model import DOCS
from . import discount, steps, watchdog
from .steps import LoopState

ADVICE = (
    "CPU work or a blocking call in the request: move it to a worker thread "
    "(await anyio.to_thread.run_sync(...)) or a process pool"
)

_watches: weakref.WeakSet[LoopWatch] = weakref.WeakSet()  # started or attached


def stop_all() -> None:
    """Stop every watchdog thread and take every loop hook off (an interrupted run).
    Never raises; each join is bounded."""
    for watch in list(_watches):
        try:
            watch.stop()
            watch.detach_all()
        except Exception:  # pragma: no cover - never keep the others on
            pass


class LoopWatch:
    """Times every loop step and records loop-stall findings into the active guard."""

    def __init__(self, threshold_ms: float, *, gil: bool = True) -> None:
        if threshold_ms <= 0:
            raise ValueError(f"LoopWatch(threshold_ms={threshold_ms!r}): give a positive number")
        self.threshold_ms = float(threshold_ms)
        self._threshold_s = self.threshold_ms / 1000.0
        self._sample_after_s = self._threshold_s / 2.0
        self.interval_s = min(max(self._threshold_s / 4.0, 0.001), 0.05)
        # The watchdog's longest sleep (see watchdog._nap): half the threshold, at most two
        # intervals (a large threshold must not make stop() wait for a long sleep).
        self.nap_max_s = min(self._sample_after_s, 2.0 * self.interval_s)
        # A late wake (something held the GIL past half the threshold) samples the running
        # step at once: it may be about to end. A step younger than young_s did not hold
        # the GIL that long, and when the threshold leaves room for a forced switch of the
        # GIL after the first regular sample (half the threshold in), that sample still
        # comes before the threshold: then such a step is left to it (a sample costs the
        # loop the GIL for its stack walk). At small thresholds every running step is.
        room = self._threshold_s - self._sample_after_s
        self.young_s = self.interval_s / 2.0 if room >= 1.5 * sys.getswitchinterval() else 0.0
        self.gil = gil  # look for threads starving the loop of the GIL
        self.gc_pauses = 0  # steps over the threshold only because of garbage collection
        self.gc_pause_max_ms = 0.0
        self.preempted = 0  # steps over the threshold only because the OS preempted the loop
        # long steps right after an idle that a later step of the same request and code
        # ran short: one-offs (cold memory, a first call), not reported
        self.one_offs = 0
        self.turn_since = 0.0  # the watchdog's turn with the GIL that is not logged yet
        self.stalls = 0  # loop-stall findings recorded (before folding)
        self._mine: dict[Any, LoopState] = {}  # loop or trio runner -> state
        self._failed: set[Any] = set()  # loops/runs attach() could not hook
        self._patches = patching.Patches(steps.OWNER)  # the GC log's gc.callbacks entry
        self._gc = discount.GcLog()
        self._watchdog = watchdog.Watchdog(self)
        # The watchdog's recent looks at the threads (CPU time, frame), for the GIL evidence
        self._looks: deque[watchdog.Look] = deque(maxlen=16)

    @property
    def _thread(self) -> Any:
        return self._watchdog.thread

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the watchdog thread and the GC log (idempotent)."""
        if self._watchdog.thread is not None:
            return
        _watches.add(self)
        if not self._patches:
            self._gc.install(self._patches)
        self._watchdog.start()

    def stop(self) -> None:
        """Stop and join the watchdog (bounded wait) and the GC log. Loop hooks stay until
        :meth:`detach_all`."""
        self._watchdog.stop(timeout=max(1.0, 4 * self.interval_s))
        self._patches.restore()
        if not self._mine:
            _watches.discard(self)

    def attach(self) -> None:
        """Time the steps of the running loop (call from inside it; idempotent, cheap).
        Never raises: a loop that cannot be hooked is noted once and left unwatched."""
        loop = asyncio.events._get_running_loop()
        key = loop if loop is not None else steps.trio_runner()
        if key is None or key in self._failed:
            return
        known = self._mine.get(key)
        if known is not None:  # (another loop of this thread was attached after it)
            steps.track(known)
            return
        kind = "trio" if loop is None else "asyncio"
        if loop is not None and not isinstance(loop, asyncio.BaseEventLoop):
            kind = "uvloop"  # and other loops without asyncio.Handle
        st: LoopState | None = None
        try:
            _watches.add(self)
            for other in list(_watches):  # one watch per loop: the newest
                if other is not self and key in other._mine:
                    other._detach_one(key)
            if loop is None:
                token = sys.modules["trio"].lowlevel.current_trio_token()
                st = LoopState(self, kind, None, token)
                steps.hook_trio(st)
            else:
                st = LoopState(self, kind, loop)
                if kind == "asyncio":
                    steps.hook_asyncio(st, loop)
                else:
                    steps.hook_uvloop(st, loop)
            self._mine[key] = st
            discount.first_reading(st)
        except Exception as exc:
            self._failed.add(key)
            if st is not None:
                st.active = False
                st.patches.restore()
                steps.forget(st)
            patching.hook_failed(steps.OWNER, kind, steps.WHAT, exc)
            return
        for closed in [lp for lp in self._mine if _is_closed(lp)]:
            self._detach_one(closed)

    def _detach_one(self, key: Any) -> None:
        st = self._mine.pop(key, None)
        if st is None:
            return
        st.active = False
        st.patches.restore()
        steps.forget(st)
        discount.close_schedstat(st)

    def detach_all(self) -> None:
        """Undo every attach: Handle._run, uvloop instance attributes, trio instruments
        (removed when called inside that trio run, else dropped with the run)."""
        for key in list(self._mine):
            self._detach_one(key)
        self._failed.clear()
        if self._watchdog.thread is None:
            _watches.discard(self)

    # -- the end of a long step (loop thread) -----------------------------------------------
    def _judge(
        self,
        st: LoopState,
        start: float,
        end: float,
        ctx: contextvars.Context | None,
        owner: Any,
    ) -> None:
        samples = watchdog.take_samples(st, st.seq)
        duration = end - start
        gc_s = self._gc.seconds(start, end)
        blocked_s = discount.blocked_s(st, start, end)
        # Preempted by other processes (CPU burners, a busy CI box), or kept off the GIL
        # by our watchdog: not the app's doing. Against the last reading taken before the
        # step started.
        cpu_s = discount.step_cpu_s(st)
        preempted_s = discount.waited_s(
            st, start, duration,
            discount.preempted_s(st, start, duration, whole=cpu_s is not None),
            blocked_s, cpu_s,
        )
        judged = duration - gc_s - blocked_s - preempted_s
        if judged <= self._threshold_s:
            if gc_s > 0 and duration - blocked_s - preempted_s > self._threshold_s:
                self.gc_pauses += 1
                self.gc_pause_max_ms = max(self.gc_pause_max_ms, gc_s * 1000.0)
            elif preempted_s > 0 and duration - blocked_s > self._threshold_s:
                self.preempted += 1
            return
        if ctx is not None and ctx.get(context._paused, False):
            return
        # The guard active now, or when the step was sampled (a step can run past the end
        # of a test window that ended inside it).
        g = guard.active() or (samples.guard if samples is not None else None)
        if g is None:
            return
        # Part of the step the loop thread neither ran nor waited for a CPU: with evidence
        # that other threads held the GIL meanwhile (watchdog.holder), it waited for them.
        gil_s = self._gil_in_step(st, start, duration, blocked_s + preempted_s, g)
        if gil_s and duration - gil_s - gc_s - blocked_s - preempted_s <= self._threshold_s:
            return  # the step's own work was short: the GIL finding says it all
        lo, hi = steps.inline_bounds(st, start, end)
        if (lo, hi) != (start, end):
            # A request run inline by the test's task began or ended inside the step: only
            # the longest part one such request ran counts (the test's code and the other
            # requests around it are not its doing), less the GC and trapped calls in it,
            # and less all of the step's preemption (it is not known in which part of the
            # step the loop thread waited for a CPU: a false stall is the worse mistake).
            part = hi - lo - self._gc.seconds(lo, hi) - discount.blocked_s(st, lo, hi)
            if part - preempted_s <= self._threshold_s:
                return
        loc: Location | None = None
        request: str | None = None
        note = ""
        if samples is not None and samples.inside_n:
            # Seen running for a request only in a short part of the step (a request run
            # inline by the test's task, then the test's own code): not the app's. The
            # part is scaled by the share of the step the loop thread was not preempted
            # (sparse samples on a busy machine leave a wide span).
            own = (duration - preempted_s) / duration if duration > 0 else 1.0
            if samples.request_span(start, end) * own <= self._threshold_s:
                return
            # Seen running for a request: that request, the deepest user line seen.
            loc, request = samples.inside, samples.request
            if loc is None:
                loc, _ = watchdog.suspended(owner)
            if loc is None and samples.library is not None:
                loc = samples.library
                note = " (library code: no line of the project's code was on the stack when "
                note += "it was sampled; this is the innermost frame sampled)"
            elif loc is None:
                note = " (no line of the project's code was on the stack when it was sampled)"
        elif samples is not None:
            return  # sampled, never running for a request: the test's own code, paused...
        else:
            # Not sampled (a C call holding the GIL to the end of the step): the context
            # at the end of the step, and where its task is suspended now.
            info = context.info_of(ctx)
            if info is None:
                return
            loc, _ = watchdog.suspended(owner)
            if loc is not None:
                note = " (where the request was suspended after the step: the stack could "
                note += "not be sampled while it ran)"
            else:
                loc = watchdog.callback_location(owner)
                if loc is not None:
                    note = " (the callback the loop ran: the stack could not be sampled, a C "
                    note += "call held the GIL to the end of the step)"
                else:
                    note = " (the location could not be sampled: a C call held the GIL to "
                    note += "the end of the step)"
            request = info.request
        if request is None:
            return
        file, line, function = loc if loc is not None else (None, None, None)
        if file is None:
            where = "" if note else " at <unknown location>"
        else:
            where = f" at {file}:{line}" + (f" ({function})" if function else "")
        message = (
            f"The event loop was blocked for {duration * 1000.0:.1f} ms during "
            f"{request}{where}{note} ({ADVICE}). See {DOCS}loop-stall"
        )
        finding: dict[str, Any] = {
            "location": (file, line, function),
            "request": request,
            "duration_ms": duration * 1000.0,
            "call": "step",
        }
        key = _step_key(ctx, owner) if discount.cold(st, start, self.nap_max_s) else None
        if key is not None and (key in st.pending or len(st.pending) < MAX_PENDING):
            # Right after a long idle: possibly cold memory, not the app's doing. Held
            # until a later step of the same request and code runs (see _repeat).
            # With nothing to compare it with, it counts only past what cold memory costs.
            alone = judged - discount.COLD_ALLOWANCE_S > self._threshold_s
            if g.hold(key, "loop-stall", message, alone=alone, **finding):
                self.stalls += 1
                st.pending[key] = (g, end)
            return
        self.stalls += 1
        g.record("loop-stall", message, **finding)

    def _repeat(
        self,
        st: LoopState,
        start: float,
        end: float,
        ctx: contextvars.Context | None,
        owner: Any,
    ) -> None:
        """A step ended while long steps are held: the same request and code again?
        Ran short: the held ones were one-offs, dropped. Ran long, and not right after an
        idle itself: they repeat, recorded. Ran long right after an idle: no evidence
        either way (it is held beside them)."""
        key = _step_key(ctx, owner)
        held = st.pending.get(key) if key is not None else None
        if held is None:
            # No longer compared (the guard settles them at its next read): those of a
            # test that is over, and those no twin followed within PENDING_FOR_S.
            armed = guard.active()
            for k in [k for k, (g, t) in st.pending.items()
                      if g is not armed or end - t > PENDING_FOR_S]:
                del st.pending[k]
            return
        g = held[0]
        if end - start - self._gc.seconds(start, end) <= self._threshold_s:
            del st.pending[key]
            dropped = g.release(key)
            self.stalls -= dropped
            self.one_offs += dropped
        elif not discount.cold(st, start, self.nap_max_s):
            del st.pending[key]
            g.settle(key)

    def _gil_in_step(
        self, st: LoopState, start: float, duration: float, discounted: float, g: guard.Guard
    ) -> float:
        """Loop thread, at the end of a long step: how long the step waited for the GIL
        held by another thread, recorded as a ``call="gil"`` loop stall naming it; 0.0
        without evidence (:func:`watchdog.holder`)."""
        if not self.gil:
            return 0.0
        before = None
        for look in reversed(list(self._looks)):
            if look.t <= start:
                before = look
                break
        if before is None or st.thread not in before.threads:
            return 0.0
        # The loop thread's CPU since the look (taken before the step: it may count some
        # CPU from before the step, never less than the step's own)
        ran = (watchdog.own_cpu_ns() - before.threads[st.thread][0]) / 1e9
        waited = duration - ran - discounted
        if waited <= self._threshold_s:
            return 0.0
        frames = sys._current_frames()
        try:
            after = watchdog.take_look(frames, {}, -1)
            skip = {s.thread for s in list(self._mine.values())}
            dog = self._watchdog.thread
            if dog is not None and dog.ident is not None:
                skip.add(dog.ident)
            found = watchdog.holder(before, after, skip, waited)
            if found is None:
                return 0.0
            ident, evidence = found
            frame = frames.get(ident)
            if not watchdog.has_user_frame(frame):
                return 0.0
            location = user_location(frame)
        finally:
            del frames
        why = (
            f"a step of {duration * 1000.0:.1f} ms, in which the loop thread ran "
            f"{ran * 1000.0:.1f} ms at most, waited {discounted * 1000.0:.1f} ms for a CPU "
            f"or in trapped calls, and {waited * 1000.0:.1f} ms for the GIL; {evidence}"
        )
        watchdog.record_gil(self, g, waited, location, why, None)
        return waited


MAX_PENDING = 8  # long steps held back per loop at once; more are recorded at once
# A held step's twin comes right after it (the requests that waited with it); while any
# step is held, every step is compared, so not for longer than this.
PENDING_FOR_S = 2.0


def _step_key(ctx: contextvars.Context | None, owner: Any) -> object:
    """(the request the step's context last ran, where the step left its task), or None
    when the context never ran a request."""
    info = ctx.get(context.last_var) if ctx is not None else None
    if info is None:
        return None
    return info.label, watchdog.resume_point(owner)


def _is_closed(loop: Any) -> bool:
    is_closed = getattr(loop, "is_closed", None)
    return bool(is_closed()) if callable(is_closed) else False
