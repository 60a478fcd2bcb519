"""Waits bounded by the real clock, whatever the event loop's clock does.

``anyio.sleep``, ``fail_after`` and ``move_on_after`` run on the loop's clock
(``loop.time()``, trio's clock), and that clock is not ours: freezegun's ``freeze_time``
stops it on asyncio and trio, a patched ``time.monotonic`` stops it on asyncio, looptime
makes it jump. A timeout of ours on that clock may never fire, and a sleep may never end.

Here the deadlines live on :data:`clock.real` and are kept by one timer thread of ours
(``stallguard-timer``), which wakes the loop through its thread-safe door (asyncio and
uvloop ``call_soon_threadsafe``, trio's token ``run_sync_soon``) to cancel a cancel scope
or set an event. The loop's own timers play no part in a bound, so a stopped loop clock
cannot stretch one. Used by bursts, the canary (its schedule through :class:`Pacer`) and
the app's lifespan (``client.py``)::

    with waits.move_on_after(1.0) as scope:
        await call(app, spec)
    if scope.cancelled_caught: ...
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import anyio
import anyio.lowlevel

from .clock import real

__all__ = [
    "Pacer",
    "Timer",
    "call_at",
    "cancel_later",
    "fail_after",
    "move_on_after",
    "on_trio",
    "sleep",
]

# The timer thread ends after this long with nothing to wait for (and starts again on
# the next wait), so a session that stops bursting keeps no thread of ours.
_LINGER_S = 2.0


class Timer:
    """One deadline on the real clock; :meth:`cancel` before it fires makes it a no-op."""

    __slots__ = ("_callback", "_post", "cancelled", "deadline", "fired", "queued")

    def __init__(
        self,
        deadline: float,
        callback: Callable[[], object],
        post: Callable[[Callable[[], object]], object],
    ) -> None:
        self.deadline = deadline
        self._callback: Callable[[], object] | None = callback
        self._post: Callable[[Callable[[], object]], object] | None = post
        self.cancelled = False
        self.fired = False  # set on the loop thread when the callback ran there
        self.queued = False  # on the heap (guarded by the timer thread's lock)

    def cancel(self) -> None:
        """Call on the loop thread. Drops the references (callback, loop) at once, so
        a cancelled timer keeps nothing alive until its deadline."""
        if not self.cancelled:
            _timers.forget(self)


class _TimerThread:
    """A heap of real-clock deadlines and the one thread that keeps them."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._cancelled = 0  # cancelled timers still on the heap
        self._thread: threading.Thread | None = None

    def add(self, timer: Timer) -> None:
        with self._cond:
            heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer))
            timer.queued = True
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="stallguard-timer", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is timer:
                self._cond.notify()

    def forget(self, timer: Timer) -> None:
        """Cancel ``timer``; drop cancelled entries once they are half the heap."""
        with self._cond:
            timer.cancelled = True
            timer._callback = timer._post = None
            if not timer.queued:
                return
            self._cancelled += 1
            if self._cancelled * 2 >= len(self._heap):
                for _, _, gone in self._heap:
                    if gone.cancelled:
                        gone.queued = False
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def stop(self, timeout: float = 2.0) -> None:
        """Drop every timer and end the thread (the end of a session, an interrupted run);
        the join is bounded."""
        with self._cond:
            for _, _, timer in self._heap:
                timer.cancelled = True
                timer.queued = False
                timer._callback = timer._post = None
            self._heap.clear()
            self._cancelled = 0
            thread, self._thread = self._thread, None
            self._cond.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def idle(self) -> bool:
        with self._cond:
            return all(timer.cancelled for _, _, timer in self._heap)

    def pending(self) -> int:
        """Timers on the heap, cancelled or not (for tests)."""
        with self._cond:
            return len(self._heap)

    def _run(self) -> None:
        me = threading.current_thread()
        while True:
            with self._cond:
                while True:
                    if self._thread is not me:  # stopped (or replaced): end at once
                        return
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)[2].queued = False
                        self._cancelled -= 1
                    if not self._heap:
                        self._cond.wait(_LINGER_S)
                        if not self._heap:
                            self._thread = None
                            return
                        continue
                    now = real.perf_counter()
                    if self._heap[0][0] <= now:
                        timer = heapq.heappop(self._heap)[2]
                        timer.queued = False
                        post = timer._post
                        break
                    self._cond.wait(self._heap[0][0] - now)
            # A loop that has closed meanwhile refuses it: nobody is waiting any more.
            if post is not None:
                with contextlib.suppress(Exception):
                    post(functools.partial(_fire, timer))


def _fire(timer: Timer) -> None:
    """On the loop thread: run the callback unless the wait ended meanwhile."""
    callback = timer._callback
    if timer.cancelled or callback is None:
        return
    timer.fired = True
    timer._callback = None
    callback()


_timers = _TimerThread()


def stop() -> None:
    """End the timer thread now, dropping every timer (bounded)."""
    _timers.stop()


def stop_if_idle() -> None:
    """End the timer thread when no wait is using it (after a test: nothing lingers)."""
    if _timers.idle():
        _timers.stop()


def _poster() -> Callable[[Callable[[], object]], object]:
    """How another thread runs a callback on the running loop (asyncio, uvloop or trio)."""
    try:
        return asyncio.get_running_loop().call_soon_threadsafe
    except RuntimeError:
        pass
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            token = trio.lowlevel.current_trio_token()
        except RuntimeError:
            pass
        else:
            return token.run_sync_soon  # type: ignore[no-any-return]
    raise RuntimeError("stallguard waits need a running asyncio or trio event loop")


def on_trio() -> bool:
    """Whether the running loop is trio's (else asyncio's or uvloop's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return sys.modules.get("trio") is not None
    return False


def call_at(deadline: float, callback: Callable[[], object]) -> Timer:
    """Run ``callback`` on this loop's thread once ``real.perf_counter()`` reaches
    ``deadline``, unless the returned timer is cancelled first."""
    timer = Timer(deadline, callback, _poster())
    _timers.add(timer)
    return timer


def cancel_later(scope: anyio.CancelScope, seconds: float) -> Timer:
    """Cancel ``scope`` after ``seconds`` of real time (cancel the timer when done)."""
    return call_at(real.perf_counter() + seconds, scope.cancel)


@contextmanager
def move_on_after(seconds: float | None) -> Iterator[anyio.CancelScope]:
    """``anyio.move_on_after`` on the real clock: ``scope.cancelled_caught`` tells."""
    scope = anyio.CancelScope()
    if seconds is None:
        with scope:
            yield scope
        return
    if seconds <= 0:
        scope.cancel()
        with scope:
            yield scope
        return
    timer = cancel_later(scope, seconds)
    try:
        with scope:
            yield scope
    finally:
        timer.cancel()


@contextmanager
def fail_after(seconds: float | None, what: str = "") -> Iterator[anyio.CancelScope]:
    """``anyio.fail_after`` on the real clock: ``TimeoutError`` once ``seconds`` passed."""
    with move_on_after(seconds) as scope:
        yield scope
    if scope.cancelled_caught:
        raise TimeoutError(what or f"no result within {seconds:g} s")


async def sleep(seconds: float) -> None:
    """Sleep ``seconds`` of real time; the loop's clock plays no part."""
    if seconds <= 0:
        await anyio.lowlevel.checkpoint()
        return
    event = anyio.Event()
    timer = call_at(real.perf_counter() + seconds, event.set)
    try:
        await event.wait()
    finally:
        timer.cancel()


class Pacer:
    """Wakes at a series of real-clock deadlines (the canary's schedule), on time.

    While the loop's clock keeps real time, each wait is a plain loop sleep: precise, and
    no thread of ours wakes per wait (the timer thread needs the GIL to wake the loop,
    and on a starved machine that hand-over alone makes a probe late). Once the loop's
    clock is found not to keep real time, every later wait is a real-clock :func:`sleep`:

    - a clock that runs fast (looptime) ends a loop sleep early: seen at once;
    - a stopped clock (freezegun, a patched ``time.monotonic``) never ends it: the
      first ``PROOF_WAITS`` waits each have a real timer of their own just past their
      deadline; after them one real timer, re-armed every ``RESCUE_S`` while the pacer
      is open, cuts off a loop sleep that has overrun (a clock stopped later costs one
      wait of up to that much).

    Use as ``with Pacer() as pacer: await pacer.sleep_until(deadline)``.
    """

    PROOF_WAITS = 3
    RESCUE_S = 0.25
    SLACK_S = 0.002

    def __init__(self) -> None:
        self.trusted = True  # the loop's clock has kept real time so far
        self._proven = 0  # waits the loop's own timer ended on time
        self._sleeping: anyio.CancelScope | None = None
        self._deadline = 0.0
        self._rescue: Timer | None = None
        self._open = False

    def __enter__(self) -> Pacer:
        self._open = True
        return self

    def __exit__(self, *exc: object) -> None:
        self._open = False
        if self._rescue is not None:
            self._rescue.cancel()
            self._rescue = None

    def _check(self) -> None:
        """On the loop thread, every ``RESCUE_S`` of real time while the pacer is open."""
        self._rescue = None
        if not self._open or not self.trusted:
            return
        if self._sleeping is not None and real.perf_counter() > self._deadline + self.SLACK_S:
            self._sleeping.cancel()
        self._arm()

    def _arm(self) -> None:
        if self._rescue is None and self._open:
            self._rescue = call_at(real.perf_counter() + self.RESCUE_S, self._check)

    async def sleep_until(self, deadline: float) -> None:
        left = deadline - real.perf_counter()
        if left <= 0:
            await anyio.lowlevel.checkpoint()
            return
        if not self.trusted:
            await sleep(left)
            return
        proving = self._proven < self.PROOF_WAITS
        if not proving:
            self._arm()
        loop_start, start = anyio.current_time(), real.perf_counter()
        with anyio.CancelScope() as scope:
            bound = cancel_later(scope, left + self.SLACK_S) if proving else None
            self._sleeping, self._deadline = scope, deadline
            try:
                await anyio.sleep(left)
            finally:
                self._sleeping = None
                if bound is not None:
                    bound.cancel()
        loop_took, took = anyio.current_time() - loop_start, real.perf_counter() - start
        # Judged by the clocks, not by who ended the wait: a starved loop wakes late on a
        # clock that runs true.
        if not took / 2 - self.SLACK_S <= loop_took <= 2 * took + self.SLACK_S:
            self.trusted = False
            if self._rescue is not None:
                self._rescue.cancel()
                self._rescue = None
        elif took > 4 * self.SLACK_S:  # too short a wait proves nothing
            self._proven += 1
        left = deadline - real.perf_counter()
        if left > 0:
            await sleep(left)
