"""The guard: the per-test recorder every detector reports to.

Detectors (traps, the loop watch, pools, upstream fakes, leak checks) never raise into
app code in ``record`` mode: they call :meth:`Guard.record`, which is thread-safe, folds
repeats at one place into one finding with a count, and honours the allowlist. The test
fails at teardown from :attr:`Guard.findings`.

One guard is active at a time (the test being run); :func:`active` returns it.
"""

from __future__ import annotations

import contextlib
import fnmatch
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from types import FrameType

from . import context
from .clock import real
from .location import relative, user_location
from .model import Finding

_active: Guard | None = None
MAX_EVENTS = 100_000


def active() -> Guard | None:
    return _active


class Guard:
    """Collects findings for one test."""

    def __init__(
        self,
        *,
        threshold_ms: float = 20.0,
        traps: str = "record",
        allow: Iterable[str] = (),
        lifespan: str = "report",
    ) -> None:
        self.threshold_ms = threshold_ms
        self.traps = traps
        self.lifespan = lifespan
        self._allow: list[str] = [p.strip() for p in allow if p.strip()]
        self._lock = threading.Lock()
        self._findings: dict[tuple[object, ...], Finding] = {}
        self.suppressed = 0  # findings dropped by the allowlist
        # Off while fixtures are set up: only the lifespan is measured then.
        self.recording = True
        # Every finding recorded, unfolded, with the real time it was recorded at: what a
        # burst's timeline marks (see audit.Recorder.marks). Bounded.
        self.events: list[tuple[float, Finding]] = []

    # -- arming ------------------------------------------------------------------------
    def __enter__(self) -> Guard:
        global _active
        _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        if _active is self:
            _active = None

    # -- user API ----------------------------------------------------------------------
    def allow(self, pattern: str) -> None:
        """Allow blocking in ``module.function`` or ``path/file.py:function`` (globs ok)."""
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(
                f"stall_guard.allow({pattern!r}): give 'module.function' or "
                "'path/to/file.py:function' (shell-style wildcards allowed)"
            )
        self._allow.append(pattern.strip())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing that runs inside this block (and the tasks it starts) is a finding."""
        token = context.pause()
        try:
            yield
        finally:
            context.unpause(token)

    @contextlib.contextmanager
    def only(self, label: str = "test") -> Iterator[None]:
        """Measure the test's own code inside this block, as if it served a request."""
        token = context.enter(label)
        try:
            yield
        finally:
            context.leave(token)

    @property
    def findings(self) -> list[Finding]:
        with self._lock:
            return list(self._findings.values())

    def failing(self) -> list[Finding]:
        return [f for f in self.findings if f.fails]

    # -- detector API ------------------------------------------------------------------
    def allowed(self, frame: FrameType | None) -> bool:
        if not self._allow:
            return False
        while frame is not None:
            code = frame.f_code
            module = frame.f_globals.get("__name__", "")
            names = (
                f"{module}.{code.co_name}",
                f"{relative(code.co_filename)}:{code.co_name}",
                f"{code.co_filename}:{code.co_name}",
            )
            for pattern in self._allow:
                if any(fnmatch.fnmatchcase(name, pattern) for name in names):
                    return True
            frame = frame.f_back
        return False

    def record(
        self,
        kind: str,
        message: str,
        *,
        frame: FrameType | None = None,
        location: tuple[str | None, int | None, str | None] | None = None,
        request: str | None = None,
        duration_ms: float | None = None,
        call: str | None = None,
        count: int = 1,
    ) -> Finding | None:
        """Record a finding; returns it (folded) or None when it is not one.

        Dropped: anything outside the test's run phase but the lifespan, and anything the
        allowlist matches.
        """
        if not self.recording and request != "lifespan":
            return None
        if frame is not None and self.allowed(frame):
            with self._lock:
                self.suppressed += 1
            return None
        file, line, function = location if location is not None else user_location(frame)
        fails = not (request == "lifespan" and self.lifespan != "fail")
        finding = Finding(
            kind=kind,
            message=message,
            file=file,
            line=line,
            function=function,
            request=request,
            duration_ms=duration_ms,
            call=call,
            count=count,
            fails=fails,
        )
        with self._lock:
            if len(self.events) < MAX_EVENTS:
                self.events.append((real.perf_counter(), finding))
            old = self._findings.get(finding.key())
            if old is not None:
                longest = max(
                    (d for d in (old.duration_ms, duration_ms) if d is not None), default=None
                )
                finding = replace(
                    old,
                    count=old.count + count,
                    duration_ms=longest,
                    message=old.message if (old.duration_ms or 0) >= (duration_ms or 0)
                    else message,
                )
            self._findings[finding.key()] = finding
        return finding
