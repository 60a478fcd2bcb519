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
from typing import Any, Protocol

from . import traps
from .config import Settings
from .guard import Guard
from .model import DOCS, Finding


class Detector(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


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
        self.after_test: list[Callable[[], Any]] = []  # async leak checks, run in the loop
        self.client: Any = None  # the StallClient, when the test used stall_client

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
        return self

    def stop(self) -> None:
        self._stack.close()

    def pool_stats(self) -> list[Any]:
        """PoolStats of every detector that watches pools."""
        stats: list[Any] = []
        for detector in self.detectors:
            stats.extend(getattr(detector, "stats", list)())
        return stats

    def __enter__(self) -> GuardRun:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Traps:
    """Blocking-call traps, process-wide while a test runs (they check the guard's mode)."""

    def __init__(self, run: GuardRun) -> None:
        self.run = run

    def start(self) -> None:
        traps.install()

    def stop(self) -> None:
        traps.uninstall()


def _traps(run: GuardRun) -> _Traps | None:
    return None if run.settings.traps == "off" else _Traps(run)


# Factories (run -> detector or None), started in this order and stopped in reverse.
_DETECTORS: list[Callable[[GuardRun], Any]] = [_traps]


def failure_message(findings: list[Finding]) -> str:
    """The assertion text for a test that failed on findings: one numbered block each."""
    noun = "problem" if len(findings) == 1 else "problems"
    lines = [f"stallguard found {len(findings)} {noun} in this test:", ""]
    for i, f in enumerate(findings, 1):
        times = f" (seen {f.count} times)" if f.count > 1 else ""
        lines.append(f"{i}. [{f.kind}]{times} {f.message}")
    lines.append("")
    lines.append(
        "Allow a known case with stall_guard.allow('module.function'), the marker's "
        f"allow=[...] or the stallguard_allow ini. Docs: {DOCS}findings"
    )
    return "\n".join(lines)
