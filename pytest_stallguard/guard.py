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
        # Findings a detector holds back until it knows whether they repeat (see hold()),
        # by the detector's key: (real time seen, the finding, whether it counts alone).
        self._held: dict[object, list[tuple[float, Finding, bool]]] = {}

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
        self.settle()
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
        finding = self._finding(
            kind, message, frame, location, request, duration_ms, call, count
        )
        return None if finding is None else self._add(real.perf_counter(), finding)

    def hold(
        self,
        key: object,
        kind: str,
        message: str,
        *,
        alone: bool = True,
        location: tuple[str | None, int | None, str | None] | None = None,
        request: str | None = None,
        duration_ms: float | None = None,
        call: str | None = None,
    ) -> bool:
        """Keep a finding back under ``key`` until the detector settles it (it repeated)
        or releases it (it was a one-off). Every read of :attr:`findings` settles what is
        still held: recorded if ``alone`` (it counts without anything to compare it
        with), dropped otherwise. Returns whether it is held (False: it is not a finding,
        as for :meth:`record`)."""
        finding = self._finding(kind, message, None, location, request, duration_ms, call, 1)
        if finding is None:
            return False
        with self._lock:
            self._held.setdefault(key, []).append((real.perf_counter(), finding, alone))
        return True

    def release(self, key: object) -> int:
        """Drop the findings held under ``key``; returns how many there were."""
        with self._lock:
            return len(self._held.pop(key, ()))

    def settle(self, key: object = None) -> None:
        """Record the findings held under ``key`` (they repeated), or, when ``key`` is
        None, those of every key that count alone (the others are dropped)."""
        with self._lock:
            if key is None:
                held = [(at, f) for hs in self._held.values() for at, f, alone in hs if alone]
                self._held.clear()
            else:
                held = [(at, f) for at, f, _ in self._held.pop(key, ())]
        for at, finding in held:
            self._add(at, finding)

    def _finding(
        self,
        kind: str,
        message: str,
        frame: FrameType | None,
        location: tuple[str | None, int | None, str | None] | None,
        request: str | None,
        duration_ms: float | None,
        call: str | None,
        count: int,
    ) -> Finding | None:
        if not self.recording and request != "lifespan":
            return None
        if frame is not None and self.allowed(frame):
            with self._lock:
                self.suppressed += 1
            return None
        file, line, function = location if location is not None else user_location(frame)
        fails = not (request == "lifespan" and self.lifespan != "fail")
        return Finding(
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

    def _add(self, at: float, finding: Finding) -> Finding:
        """Fold ``finding`` (seen at real time ``at``) into the findings."""
        duration_ms, message, count = finding.duration_ms, finding.message, finding.count
        with self._lock:
            if len(self.events) < MAX_EVENTS:
                self.events.append((at, finding))
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
