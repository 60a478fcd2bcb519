"""Waits bounded by the real clock, whatever the event loop's clock does.

``anyio.sleep``, ``fail_after`` and ``move_on_after`` run on the loop's clock
(``loop.time()``, trio's clock), and that clock is not ours: freezegun's ``freeze_time``
stops it on asyncio and trio, a patched ``time.monotonic`` stops it on asyncio, looptime
makes it jump. A timeout of ours on that clock may never fire, and a sleep may never end.

Here the deadlines live on :data:`clock.real` and are kept by one timer thread of ours
(``stallguard-timer``), which wakes the loop through its thread-safe door (asyncio and
uvloop ``call_soon_threadsafe``, trio's token ``run_sync_soon``) to cancel a cancel scope
or set an event. The loop's own timers play no part in a bound, so a stopped loop clock
cannot stretch one. Used by bursts, the canary and the app's lifespan (``client.py``)::

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
    "Timer",
    "cancel_later",
    "fail_after",
    "move_on_after",
    "on_trio",
    "sleep",
    "sleep_until",
]

# The timer thread ends after this long with nothing to wait for (and starts again on
# the next wait), so a session that stops bursting keeps no thread of ours.
_LINGER_S = 2.0


class Timer:
    """One deadline on the real clock; :meth:`cancel` before it fires makes it a no-op."""

    __slots__ = ("_callback", "cancelled", "deadline", "fired")

    def __init__(self, deadline: float, callback: Callable[[], object]) -> None:
        self.deadline = deadline
        self._callback: Callable[[], object] | None = callback
        self.cancelled = False
        self.fired = False  # set on the loop thread when the callback ran there

    def cancel(self) -> None:
        """Call on the loop thread; drops the references so nothing waits on the heap."""
        if not self.cancelled:
            self.cancelled = True
            self._callback = None
            _timers.forget()


class _TimerThread:
    """A heap of real-clock deadlines and the one thread that keeps them."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, Timer, Callable[[Callable[[], object]], object]]] = []
        self._seq = itertools.count()
        self._cancelled = 0
        self._thread: threading.Thread | None = None

    def add(self, timer: Timer, post: Callable[[Callable[[], object]], object]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (timer.deadline, next(self._seq), timer, post))
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="stallguard-timer", daemon=True
                )
                self._thread.start()
            elif self._heap[0][2] is timer:
                self._cond.notify()

    def forget(self) -> None:
        """A timer was cancelled: drop cancelled entries once they are half the heap."""
        with self._cond:
            self._cancelled += 1
            if self._cancelled * 2 >= len(self._heap):
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)
                self._cancelled = 0

    def pending(self) -> int:
        """Timers not yet fired or cancelled (for tests)."""
        with self._cond:
            return sum(1 for entry in self._heap if not entry[2].cancelled)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    while self._heap and self._heap[0][2].cancelled:
                        heapq.heappop(self._heap)
                        self._cancelled = max(0, self._cancelled - 1)
                    now = real.perf_counter()
                    if not self._heap:
                        self._cond.wait(_LINGER_S)
                        if not self._heap:
                            self._thread = None
                            return
                        continue
                    if self._heap[0][0] <= now:
                        _, _, timer, post = heapq.heappop(self._heap)
                        break
                    self._cond.wait(self._heap[0][0] - now)
            if timer.cancelled:
                continue
            # A loop that has closed meanwhile refuses it: nobody is waiting any more.
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
    timer = Timer(deadline, callback)
    _timers.add(timer, _poster())
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


async def sleep_until(deadline: float) -> None:
    """Wake at ``deadline`` on ``real.perf_counter()``, as promptly as the loop allows.

    The loop's own timer wakes it on time when the loop's clock runs true (a thread of
    ours may wait a GIL switch interval to get in, which a canary would count); the real
    timer bounds the wait when that clock is stopped; a loop clock that runs fast (looptime)
    only wakes it early, and the rest is waited on the real clock.
    """
    left = deadline - real.perf_counter()
    if left > 0:
        with move_on_after(left):
            await anyio.sleep(left)
        left = deadline - real.perf_counter()
        if left > 0:
            await sleep(left)
    else:
        await anyio.lowlevel.checkpoint()
