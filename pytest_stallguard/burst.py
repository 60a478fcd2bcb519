"""Bursts: many concurrent requests through the lean driver, each timed from its issue.

Times are read from :data:`clock.real` and a request's ``timeout`` is kept by a real-clock
timer (:mod:`waits`), so neither a frozen nor a fast loop clock changes what is measured.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from . import audit, waits
from .clock import real
from .context import ASGIApp
from .driver import RequestSpec, build_spec, call
from .errors import ConfigError
from .model import BurstResult, RequestError, RequestTiming, RequestTimings, Timeline

SpecLike = Any  # ("GET", "/x") | ("POST", "/x", {"json": ...}) | {"method": ..., "path": ...}


def parse_specs(specs: Sequence[SpecLike] | RequestSpec) -> list[RequestSpec]:
    """Turn the user's request list into prepared specs, with errors that name the entry."""
    if isinstance(specs, RequestSpec):
        return [specs]
    out = []
    for i, item in enumerate(specs):
        if isinstance(item, RequestSpec):
            out.append(item)
            continue
        if isinstance(item, Mapping):
            kwargs = dict(item)
            method, path = kwargs.pop("method", None), kwargs.pop("path", None)
        elif isinstance(item, (tuple, list)) and len(item) in (2, 3):
            method, path = item[0], item[1]
            kwargs = dict(item[2]) if len(item) == 3 else {}
        else:
            raise ConfigError(
                f"burst(): request {i} is {item!r}; give (method, path), "
                "(method, path, {request kwargs}) or {'method': ..., 'path': ..., ...}"
            )
        if not isinstance(method, str) or not isinstance(path, str):
            raise ConfigError(
                f"burst(): request {i} needs a method and a path as strings, got "
                f"method={method!r}, path={path!r}"
            )
        out.append(build_spec(method, path, **kwargs))
    if not out:
        raise ConfigError("burst(): the request list is empty; give at least one request")
    return out


async def run(
    app: ASGIApp,
    specs: list[RequestSpec],
    n: int,
    concurrency: int | None = None,
    timeout: float | None = None,
) -> BurstResult:
    """Fire ``n`` requests (cycling through ``specs``), all at once or ``concurrency`` wide.

    A request's latency runs from the moment it is issued to its last body byte; its time
    to first byte is kept too (streaming responses are not buffered first). A request that
    is still running after ``timeout`` seconds is cancelled, as a client would give up, and
    counted as an error.
    """
    latencies = [0.0] * n
    ttfb = [0.0] * n
    issued_at = [0.0] * n
    status_of = [0] * n
    ledgers: list[audit.Ledger | None] = [None] * n
    statuses: Counter[int] = Counter()
    errors: list[RequestError] = []
    crashed: list[RequestError] = []  # requests the app raised on (answered 500)
    k = len(specs)

    async def one(i: int, issued: float) -> None:
        issued_at[i] = issued
        if recorder is None:
            await one_request(i, issued)
            return
        ledger, token = audit.begin(issued)
        ledgers[i] = ledger
        try:
            await one_request(i, issued)
        finally:
            if not alone:  # (alone, the task is this request's own: its context goes too)
                audit.end(ledger, token)

    async def one_request(i: int, issued: float) -> None:
        spec = specs[i % k]
        if timeout is None:
            reply = await call(app, spec)
        else:
            # The client's clock started at the issue, not when this task got to run.
            with waits.move_on_after(issued + timeout - real.perf_counter()) as scope:
                reply = await call(app, spec)
            if scope.cancelled_caught:
                waited = real.perf_counter() - issued
                latencies[i] = waited * 1000.0
                exc = TimeoutError(f"no response within {timeout} s (client gave up)")
                errors.append(RequestError(i, spec.method, spec.path, exc))
                return
        latencies[i] = (reply.finished - issued) * 1000.0
        ttfb[i] = (reply.first_byte - issued) * 1000.0
        if reply.exception is not None:
            crashed.append(RequestError(i, spec.method, spec.path, reply.exception))
            if reply.status and reply.status != 500:
                # The app crashed after it had started answering: no complete response.
                errors.append(crashed[-1])
        statuses[reply.status] += 1
        status_of[i] = reply.status

    # All at once: each request runs in a task of its own (see _fire); else a worker task
    # runs one request after another, each ended in the step the next one begins in.
    alone = concurrency is None or concurrency >= n
    recorder = audit.Recorder().start() if audit.wanted() else None
    started = real.perf_counter()
    if recorder is not None:
        recorder.t0 = started
    try:
        await _fire(one, n, None if alone else concurrency, started)
    finally:
        if recorder is not None:
            recorder.stop()
    ended = real.perf_counter()
    elapsed = ended - started

    # Made on first read (audit.settle is the costly part): see model.RequestTimings. From
    # what the burst saw up to now: its own copies, and ledgers closed to later spans (a
    # task a request left running may still note one).
    for ledger in ledgers:
        if ledger is not None:
            ledger.open = False
    requests = RequestTimings(functools.partial(
        _timings, specs, issued_at[:], latencies[:], ttfb[:], status_of[:], ledgers, started,
        recorder))
    timeline: Mapping[str, Any] = {}
    if recorder is not None:
        # The findings now (a later one is not the burst's); the counters on first read.
        timeline = Timeline(functools.partial(
            recorder.timeline, ledgers, ended, recorder.marks(ended)))
    labels = tuple(dict.fromkeys(s.label for s in specs))
    mixed = len(labels) > 1
    return BurstResult(
        method="MIXED" if mixed else specs[0].method,
        path=", ".join(labels) if mixed else specs[0].path,
        n=n,
        concurrency=concurrency,
        latencies_ms=latencies,
        ttfb_ms=ttfb,
        statuses=statuses,
        errors=errors,
        elapsed_s=elapsed,
        specs=labels,
        app_exception=min(crashed, key=lambda e: e.index) if crashed else None,
        requests=requests,
        timeline=timeline,
        t0=started,
    )


def _timings(specs: list[RequestSpec], issued_at: list[float], latencies: list[float],
             ttfb: list[float], status_of: list[int], ledgers: list[audit.Ledger | None],
             started: float, recorder: audit.Recorder | None) -> list[RequestTiming]:
    """One RequestTiming per request of a finished burst, each ledger settled."""
    if recorder is not None:
        recorder.split()
    k = len(specs)
    requests = []
    for i, ledger in enumerate(ledgers):
        spec = specs[i % k]
        breakdown: dict[str, float] | None = None
        upstreams: dict[str, float] = {}
        segments: tuple[tuple[str, float, float], ...] = ()
        if ledger is not None:
            finished = issued_at[i] + latencies[i] / 1000.0
            breakdown, upstreams, segments = audit.settle(ledger, finished, started)
        requests.append(RequestTiming(
            i=i,
            method=spec.method,
            path=spec.path,
            status=status_of[i],
            start_ms=(issued_at[i] - started) * 1000.0,
            latency_ms=latencies[i],
            ttfb_ms=ttfb[i],
            breakdown=breakdown,
            upstreams=upstreams,
            segments=segments,
        ))
    return requests


async def _fire(one: Any, n: int, concurrency: int | None, started: float) -> None:
    async with anyio.create_task_group() as tg:
        if concurrency is None:  # (run() passes None for concurrency >= n: "alone")
            # All issued at once: each latency runs from the burst's start, so requests that
            # queued behind a blocked loop are charged for the wait.
            for i in range(n):
                tg.start_soon(one, i, started)
        else:
            cursor = iter(range(n))

            async def worker() -> None:
                for i in cursor:
                    await one(i, real.perf_counter())

            for _ in range(concurrency):
                tg.start_soon(worker)
