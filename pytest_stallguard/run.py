"""One armed test: the guard plus every detector, started and stopped together.

``GuardRun`` is what the pytest plugin creates per test, and what a script can use
directly::

    with GuardRun(Settings()) as run:
        anyio.run(exercise_app)
    print(run.guard.findings)

Stopping restores everything that was patched, whatever happened in between.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel

from . import context, traps
from .config import Settings
from .errors import StallFindings
from .guard import Guard
from .leaks import LeakCheck
from .loopwatch import LoopWatch
from .loopwatch.steps import marker, timing_check
from .model import DOCS, BurstResult, Finding, PoolStats
from .pools import PoolWatch, ShrinkPools
from .upstream import SlowUpstreams


class GuardRun:
    """Arms a :class:`Guard` and the detectors for the length of a test."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.guard = Guard(
            threshold_ms=settings.threshold_ms,
            traps=settings.traps,
            allow=settings.allow,
            lifespan=settings.lifespan,
        )
        self.detectors: list[Any] = []
        self._stack = contextlib.ExitStack()
        self.client: Any = None  # the StallClient, when the test used stall_client
        self.bursts: list[BurstResult] = []  # its bursts, kept when the run stops
        self.pool_watch = PoolWatch(self.guard, threshold_ms=settings.pool_wait_ms,
                                    wait_set=settings.pool_wait_set)
        self.leaks = LeakCheck(self.pool_watch, self.guard)
        self._shrink: ShrinkPools | None = None
        self._upstreams: SlowUpstreams | None = None
        self._stopped = False
        self._judged: set[tuple[object, ...]] = set()  # failing findings already judged

    @property
    def shrink(self) -> ShrinkPools:
        """The pool shrinker of this test (the ``shrink_pools`` fixture), made on first use."""
        if self._shrink is None:
            self._shrink = ShrinkPools()
            self._stack.callback(self._shrink.close)
        return self._shrink

    @property
    def upstreams(self) -> SlowUpstreams:
        """The slow upstream fakes of this test (the ``slow_upstream`` fixture)."""
        if self._upstreams is None:
            self._upstreams = SlowUpstreams()
            self._stack.callback(self._upstreams.close)
        return self._upstreams

    def start(self) -> GuardRun:
        stack = self._stack
        stack.enter_context(self.guard)
        for factory in _DETECTORS:
            detector = factory(self)
            if detector is None:
                continue
            detector.start()
            stack.callback(detector.stop)
            self.detectors.append(detector)
        self.pool_watch.start()
        stack.callback(self.pool_watch.stop)
        stack.callback(self.leaks.close)
        if self.settings.pools:
            self.shrink.apply(dict(self.settings.pools))
        return self

    def stop(self) -> None:
        """Undo everything this run installed (idempotent, never raises on a second call)
        and drop what ties it to the test's app and loop, so finished tests hold nothing."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self._stack.close()
        finally:
            if self.client is not None:
                self.bursts = list(self.client.bursts)
            self.client = None
            self.detectors.clear()

    def verdict(self, error: BaseException | None = None) -> None:
        """Fail on the failing findings not judged yet; when the test failed too, the
        findings come first (they are usually why), its own error chained below them.

        Called at the end of the test body, and again after teardown for what the app's
        shutdown or the fixtures' teardown recorded since."""
        __tracebackhide__ = True
        failing = [f for f in self.guard.failing() if f.key() not in self._judged]
        self._judged.update(f.key() for f in failing)
        if failing:
            raise StallFindings(failure_message(failing), failing) from error

    async def enter_loop(self) -> None:
        """Hook the running loop now (from inside it), then start a fresh loop step.

        Loop steps are timed from the first step that starts after the loop is hooked;
        the test's first request may run inside the very step that would hook it.
        """
        context.run_enter_hooks()
        if self.settings.leak_check:
            self.leaks.start()
        await anyio.lowlevel.checkpoint()

    async def leave_loop(self) -> None:
        """After the test body: end its loop step (so it is judged), check for leaks,
        put shrunken pools back (disposing temporary async pools in their loop)."""
        await anyio.lowlevel.checkpoint()
        try:
            if self.settings.leak_check:
                await self.leaks.check()
        finally:
            if self._shrink is not None:
                await self._shrink.aclose()

    def pool_stats(self) -> list[PoolStats]:
        """What every watched pool saw during the test."""
        return self.pool_watch.stats()

    def __enter__(self) -> GuardRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Traps:
    """Blocking-call traps, process-wide while a test runs (they check the guard's mode)."""

    def start(self) -> None:
        traps.install()

    def stop(self) -> None:
        traps.uninstall()


def _traps(run: GuardRun) -> _Traps | None:
    return None if run.settings.traps == "off" else _Traps()


class _LoopStalls:
    """The loop watch: its watchdog runs for the test; loops are hooked as requests start."""

    def __init__(self, run: GuardRun) -> None:
        self.watch = LoopWatch(run.settings.threshold_ms)
        self.mark = marker()

    def start(self) -> None:
        self.watch.start()
        context.add_enter_hook(self.watch.attach, timing_check(self.mark))
        context.on_inline.append(self.mark)

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            context.on_inline.remove(self.mark)
        context.remove_enter_hook(self.watch.attach)
        self.watch.stop()
        self.watch.detach_all()


# Factories (run -> detector or None), started in this order and stopped in reverse.
_DETECTORS: list[Callable[[GuardRun], Any]] = [_traps, _LoopStalls]


def _place(finding: Finding) -> str:
    """" (at file:line in function)" unless the message already names the place."""
    if finding.file is None or finding.line is None:
        return ""
    place = f"{finding.file}:{finding.line}"
    if place in finding.message:
        return ""
    return f" (at {place}" + (f" in {finding.function})" if finding.function else ")")


def failure_message(findings: list[Finding]) -> str:
    """The assertion text for a test that failed on findings: one numbered block each."""
    noun = "problem" if len(findings) == 1 else "problems"
    lines = [f"stallguard found {len(findings)} {noun} in this test:", ""]
    for i, f in enumerate(findings, 1):
        times = f" (seen {f.count} times)" if f.count > 1 else ""
        lines.append(f"{i}. [{f.kind}]{times} {f.message}{_place(f)}")
    lines.append("")
    lines.append(
        "Allow a known case with stall_guard.allow('module.function'), the marker's "
        f"allow=[...] or the stallguard_allow ini. Docs: {DOCS}findings"
    )
    return "\n".join(lines)
