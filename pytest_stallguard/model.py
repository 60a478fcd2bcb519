"""Plain data: findings, burst and canary results, pool statistics.

Everything here is a frozen dataclass (or, for the mutable burst sample lists, a plain
dataclass filled once) with ``to_dict`` matching the JSON report schema
``stallguard-report/1``. Nothing in this module imports pytest.
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, overload

KINDS = (
    "blocking-call",
    "loop-stall",
    "threadpool-saturation",
    "pool-exhaustion",
    "connection-leak",
    "task-leak",
    "missing-timeout",
    "client-per-request",
    "canary-slowdown",
)

# Messages end with a pointer to the README section to read ("See README.md#task-leak");
# tests/test_readme.py checks that every one of them exists.
DOCS = "README.md#"


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True)
class Finding:
    """One thing the plugin caught, located in the user's code."""

    kind: str
    message: str
    file: str | None = None
    line: int | None = None
    function: str | None = None
    request: str | None = None
    duration_ms: float | None = None
    call: str | None = None
    count: int = 1
    # Not in the JSON: findings with fails=False are reported but do not fail the test
    # (blocking in the lifespan, by default).
    fails: bool = True

    def key(self) -> tuple[Any, ...]:
        return (self.kind, self.file, self.line, self.function, self.request, self.call)

    def where(self) -> str:
        if self.file is None:
            return "<unknown location>"
        place = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{place} ({self.function})" if self.function else place

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "message": self.message,
            "file": self.file,
            "line": self.line,
            "function": self.function,
            "request": self.request,
            "duration_ms": None if self.duration_ms is None else round(self.duration_ms, 3),
            "call": self.call,
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        return cls(
            kind=data["kind"],
            message=data["message"],
            file=data.get("file"),
            line=data.get("line"),
            function=data.get("function"),
            request=data.get("request"),
            duration_ms=data.get("duration_ms"),
            call=data.get("call"),
            count=data.get("count", 1),
        )


@dataclass(frozen=True)
class CanaryResult:
    """Latencies of a cheap endpoint probed on a fixed schedule.

    Every latency is measured from the probe's *scheduled* time, so a blocked loop that
    delays the probe shows up in the number instead of hiding from it.
    """

    path: str
    every_ms: float
    baseline_ms: tuple[float, ...]
    latencies_ms: tuple[float, ...]
    floor_ms: float
    # real.perf_counter() each probe was scheduled at, in the order of latencies_ms (not
    # in the JSON; a burst's timeline places its probes with it)
    scheduled_s: tuple[float, ...] = ()

    @property
    def baseline_p95_ms(self) -> float:
        return percentile(self.baseline_ms, 95)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p95_ms(self) -> float:
        return percentile(self.latencies_ms, 95)

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    @property
    def probes(self) -> int:
        return len(self.latencies_ms)

    @property
    def slowdown(self) -> float:
        """p95 during the window over the quiet baseline p95 (floored, see README)."""
        return self.p95_ms / max(self.baseline_p95_ms, self.floor_ms)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "baseline_p95_ms": round(self.baseline_p95_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "slowdown": round(self.slowdown, 3),
            "probes": self.probes,
            "floor_ms": round(self.floor_ms, 3),
        }


@dataclass(frozen=True)
class RequestError:
    """A burst request that got no response."""

    index: int
    method: str
    path: str
    exception: BaseException

    def __str__(self) -> str:
        return f"{self.method} {self.path}: {type(self.exception).__name__}: {self.exception}"


def _detached(exc: BaseException) -> BaseException:
    try:
        copy = type(exc).__new__(type(exc))
        copy.args = exc.args
    except Exception:
        copy = RuntimeError(f"{type(exc).__name__}: {exc}")
    return copy


# The keys of a request's breakdown (SPEC section 8), in the order reports show them.
BREAKDOWN_KEYS = (
    "loop_ms",
    "loop_wait_ms",
    "thread_wait_ms",
    "thread_ms",
    "pool_wait_ms",
    "io_ms",
    "other_ms",
)


def _r3(value: float) -> float:
    return round(value, 3)


@dataclass(frozen=True)
class RequestTiming:
    """One request of a burst: when it was issued, how long it took and where the time went.

    ``start_ms`` is the offset of its issue from the burst's start; ``latency_ms`` runs from
    the issue to the last body byte, ``ttfb_ms`` to the first. ``breakdown`` (keys
    :data:`BREAKDOWN_KEYS`, milliseconds) sums to ``latency_ms``; it is None when nothing was
    measured (no guard armed). ``upstreams``: outbound HTTP host -> ms awaited.
    ``segments``: the breakdown in time order, ``(key, start_ms, end_ms)`` from the burst's
    start (what the HTML timeline and the trace draw). ``status`` is 0 for no response.
    """

    i: int
    method: str
    path: str
    status: int
    start_ms: float
    latency_ms: float
    ttfb_ms: float
    breakdown: dict[str, float] | None = None
    upstreams: dict[str, float] = field(default_factory=dict)
    segments: tuple[tuple[str, float, float], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "i": self.i,
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "start_ms": _r3(self.start_ms),
            "latency_ms": _r3(self.latency_ms),
            "ttfb_ms": _r3(self.ttfb_ms),
            "breakdown": None if self.breakdown is None
            else {k: _r3(self.breakdown[k]) for k in BREAKDOWN_KEYS},
            "upstreams": {h: _r3(v) for h, v in sorted(self.upstreams.items())},
            "segments": [[k, _r3(s), _r3(e)] for k, s, e in self.segments],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RequestTiming:
        return cls(
            i=data["i"],
            method=data["method"],
            path=data["path"],
            status=data["status"],
            start_ms=data["start_ms"],
            latency_ms=data["latency_ms"],
            ttfb_ms=data["ttfb_ms"],
            breakdown=data.get("breakdown"),
            upstreams=dict(data.get("upstreams") or {}),
            segments=tuple((k, s, e) for k, s, e in data.get("segments") or ()),
        )


class _MadeOnce:
    """A value made on first read by ``make`` (once, thread-safe; ``make`` and what it
    holds are dropped then)."""

    __slots__ = ("_items", "_lock", "_make")

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make: Callable[[], Any] | None = make
        self._items: Any = None
        self._lock = threading.Lock()

    def _value(self) -> Any:
        items = self._items
        if items is None:
            with self._lock:
                items = self._items
                if items is None:
                    assert self._make is not None
                    items = self._items = self._make()
                    self._make = None
        return items


class RequestTimings(_MadeOnce, Sequence[RequestTiming]):
    """``BurstResult.requests``: the burst's :class:`RequestTiming` list, made on first read.

    Splitting every request's time into its breakdown costs a few microseconds a request;
    a burst that nobody reads request by request (no report, no trace, no test looking)
    does not pay it. A read-only sequence: equal to a list with the same items, pickled as
    that list; ``make`` runs once (thread-safe) and is dropped with what it holds."""

    __slots__ = ()

    def _list(self) -> list[RequestTiming]:
        return self._value()  # type: ignore[no-any-return]

    def __len__(self) -> int:
        return len(self._list())

    @overload
    def __getitem__(self, index: int) -> RequestTiming: ...
    @overload
    def __getitem__(self, index: slice) -> list[RequestTiming]: ...
    def __getitem__(self, index: int | slice) -> RequestTiming | list[RequestTiming]:
        return self._list()[index]

    def __iter__(self) -> Iterator[RequestTiming]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, RequestTimings):
            other = other._list()
        return self._list() == other

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._list())

    def __reduce__(self) -> tuple[Any, ...]:
        return (list, (self._list(),))


class Timeline(_MadeOnce, Mapping[str, Any]):
    """``BurstResult.timeline`` of an audited burst, made on first read: its counters walk
    every loop step of every request, which a burst nobody draws does not pay for. A
    read-only mapping: equal to a dict with the same items, pickled as that dict."""

    __slots__ = ()

    def _dict(self) -> dict[str, Any]:
        return self._value()  # type: ignore[no-any-return]

    def __getitem__(self, key: str) -> Any:
        return self._dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict())

    def __len__(self) -> int:
        return len(self._dict())

    def __repr__(self) -> str:
        return repr(self._dict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self._dict(),))


def sum_breakdowns(requests: Sequence[RequestTiming]) -> dict[str, float] | None:
    """The breakdowns of ``requests`` summed per key; None when none was measured."""
    measured = [r.breakdown for r in requests if r.breakdown is not None]
    if not measured:
        return None
    return {k: sum(b[k] for b in measured) for k in BREAKDOWN_KEYS}


@dataclass(frozen=True)
class BurstResult:
    method: str
    path: str
    n: int
    concurrency: int | None
    latencies_ms: list[float]
    ttfb_ms: list[float]
    statuses: Counter[int]
    errors: list[RequestError]
    elapsed_s: float
    canary: CanaryResult | None = None
    specs: tuple[str, ...] = field(default=())
    # The first request the app raised on (answered 500), for a failing test's report.
    app_exception: RequestError | None = None
    # One per request, in issue order (SPEC section 8); a burst gives RequestTimings (made
    # on first read).
    requests: Sequence[RequestTiming] = field(default_factory=list)
    # What happened during the burst, on its time axis (ms from its start), for the HTML
    # timeline and the trace: "marks" (findings recorded during it), "canary" probes,
    # "loop_lag" and "in_use" counters. See :mod:`..audit`. A burst gives a Timeline (made
    # on first read).
    timeline: Mapping[str, Any] = field(default_factory=dict)
    # real.perf_counter() at the burst's start (not in the JSON).
    t0: float = 0.0

    @property
    def breakdown(self) -> dict[str, float] | None:
        """The requests' breakdowns summed per key (None when none was measured)."""
        return sum_breakdowns(self.requests)

    @property
    def p50_ms(self) -> float:
        return percentile(self.latencies_ms, 50)

    @property
    def p95_ms(self) -> float:
        return percentile(self.latencies_ms, 95)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latencies_ms, 99)

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms, default=0.0)

    @property
    def ok(self) -> int:
        """Requests answered with a status below 500."""
        return sum(c for s, c in self.statuses.items() if s < 500)

    def detached(self) -> BurstResult:
        """A copy for the reports that holds no traceback (a traceback holds the frames,
        and with them the app, the client and the loop of a finished test)."""
        errors = [replace(e, exception=_detached(e.exception)) for e in self.errors]
        return replace(self, errors=errors, app_exception=None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "n": self.n,
            "concurrency": self.concurrency,
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "max_ms": round(self.max_ms, 3),
            "elapsed_s": round(self.elapsed_s, 4),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "errors": len(self.errors),
            "canary": None if self.canary is None else self.canary.to_dict(),
            "latencies_ms": [round(v, 3) for v in self.latencies_ms],
            "breakdown": None if self.breakdown is None
            else {k: _r3(v) for k, v in self.breakdown.items()},
            "requests": [r.to_dict() for r in self.requests],
            "timeline": dict(self.timeline),
        }


@dataclass(frozen=True)
class PoolStats:
    """What one watched pool saw during a test."""

    name: str
    kind: str  # threadpool | sqlalchemy | httpx | asyncpg
    size: int
    max_in_use: int
    waits_ms: tuple[float, ...] = ()
    timeouts: int = 0
    # Summed over the checkouts that ended during the test (DB and HTTP pools): time a
    # query or request ran on the connection, and time it sat checked out doing nothing.
    work_total_ms: float = 0.0
    idle_held_total_ms: float = 0.0

    @property
    def wait_total_ms(self) -> float:
        return sum(self.waits_ms)

    @property
    def wait_p95_ms(self) -> float:
        return percentile(self.waits_ms, 95)

    @property
    def wait_max_ms(self) -> float:
        return max(self.waits_ms, default=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "size": self.size,
            "max_in_use": self.max_in_use,
            "wait_p95_ms": round(self.wait_p95_ms, 3),
            "wait_max_ms": round(self.wait_max_ms, 3),
            "timeouts": self.timeouts,
            "wait_total_ms": round(self.wait_total_ms, 3),
            "work_total_ms": round(self.work_total_ms, 3),
            "idle_held_total_ms": round(self.idle_held_total_ms, 3),
        }


@dataclass
class TestRecord:
    """Everything the plugin measured for one test; the unit of every report."""

    nodeid: str
    outcome: str = "passed"
    findings: list[Finding] = field(default_factory=list)
    bursts: list[BurstResult] = field(default_factory=list)
    pools: list[PoolStats] = field(default_factory=list)
    # Serialised forms, used when a record arrives from an xdist worker.
    raw_bursts: list[dict[str, Any]] = field(default_factory=list)
    raw_pools: list[dict[str, Any]] = field(default_factory=list)

    __test__ = False  # not a pytest test class

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "outcome": self.outcome,
            "findings": [f.to_dict() for f in self.findings],
            "bursts": [b.to_dict() for b in self.bursts] + self.raw_bursts,
            "pools": [p.to_dict() for p in self.pools] + self.raw_pools,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TestRecord:
        return cls(
            nodeid=data["nodeid"],
            outcome=data.get("outcome", "passed"),
            findings=[Finding.from_dict(f) for f in data.get("findings", [])],
            raw_bursts=list(data.get("bursts", [])),
            raw_pools=list(data.get("pools", [])),
        )
