"""What an upstream answers (:class:`Knobs`) and what it saw (:class:`Call`, :class:`CallLog`).

Shared by the respx fakes (:mod:`.fake`) and the loopback server (:mod:`.server`). Both
record every call in a :class:`CallLog` and expose it to the test through
:class:`Recorded`. Times are taken from :data:`clock.real`, which no time patcher reaches.
"""

from __future__ import annotations

import json as jsonlib
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from .. import patching
from ..clock import real

__all__ = ["OWNER", "Call", "CallLog", "Knobs", "Recorded", "failed", "quietly"]

OWNER = "slow upstream"  # the owner of our patches and of our hook-failure notes
LIBRARY = "httpx"


def failed(what: str, exc: BaseException) -> None:
    """Our bookkeeping failed: note it once; the caller carries on without it."""
    patching.hook_failed(OWNER, LIBRARY, what, exc)


def quietly(what: str, fn: Callable[..., object], *args: Any) -> None:
    """Run one step of our bookkeeping; if it fails, note it and go on (never raise)."""
    try:
        fn(*args)
    except Exception as exc:
        failed(what, exc)


@dataclass
class Call:
    """One call an upstream fake or a served upstream received."""

    method: str
    url: str
    request: str | None  # the app request it was made for ("POST /checkout"), if any
    timeout: dict[str, float | None] = field(default_factory=dict)
    outcome: str = "pending"  # ok | failed | read-timeout | pool-timeout | connect-timeout
    #                           | connect-error | cancelled
    status: int | None = None
    started: float = 0.0
    ended: float | None = None
    httpx_request: httpx.Request | None = field(default=None, repr=False)

    @property
    def duration_ms(self) -> float | None:
        return None if self.ended is None else (self.ended - self.started) * 1000.0


class Knobs:
    """How an upstream answers: delay, jitter, status, JSON body, failures (seeded)."""

    def __init__(
        self,
        *,
        delay: float,
        jitter: float,
        status: int,
        json: Any,
        fail_rate: float,
        fail_status: int,
        seed: int | None,
    ) -> None:
        for name, value in (("delay", delay), ("jitter", jitter)):
            if value < 0:
                raise ValueError(
                    f"slow_upstream: {name}={value!r} is not valid; give seconds >= 0"
                )
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(
                f"slow_upstream: fail_rate={fail_rate!r} is not valid; give a fraction "
                "from 0.0 (never fail) to 1.0 (always fail)"
            )
        self.delay = delay
        self.jitter = jitter
        self.status = status
        self.json = json
        self.fail_rate = fail_rate
        self.fail_status = fail_status
        self._random = random.Random(seed)
        self._random_lock = threading.Lock()

    def draw(self) -> tuple[float, bool]:
        """(this call's delay, whether it fails)."""
        with self._random_lock:
            extra = self._random.uniform(0.0, self.jitter) if self.jitter else 0.0
            failed = self.fail_rate > 0 and self._random.random() < self.fail_rate
        return self.delay + extra, failed

    def chance(self, rate: float) -> bool:
        with self._random_lock:
            return rate >= 1.0 or (rate > 0 and self._random.random() < rate)

    def body(self, failed: bool) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        if failed:
            data = jsonlib.dumps({"detail": "upstream failure (stallguard fail_rate)"}).encode()
            return self.fail_status, data, [(b"content-type", b"application/json")]
        if self.json is None:
            return self.status, b"", []
        return (
            self.status,
            jsonlib.dumps(self.json).encode(),
            [(b"content-type", b"application/json")],
        )


class CallLog:
    """The call log, in flight, max in flight and outcome counts; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.calls: list[Call] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.timed_out = 0
        self.cancelled = 0
        self.untimed = 0

    def begin(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    def note_untimed(self) -> None:
        with self._lock:
            self.untimed += 1

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def end(self, call: Call, outcome: str, status: int | None = None) -> None:
        with self._lock:
            call.outcome = outcome
            call.status = status
            call.ended = real.perf_counter()
            if outcome.endswith("timeout"):
                self.timed_out += 1
            elif outcome == "cancelled":
                self.cancelled += 1


class Recorded:
    """What a test reads from a fake or a served upstream; both keep a :class:`CallLog`."""

    _log: CallLog

    @property
    def calls(self) -> list[Call]:
        return list(self._log.calls)

    @property
    def max_in_flight(self) -> int:
        return self._log.max_in_flight

    @property
    def in_flight(self) -> int:
        return self._log.in_flight

    @property
    def cancelled(self) -> int:
        """Calls given up before the answer (cancelled by the caller, or the client left)."""
        return self._log.cancelled
