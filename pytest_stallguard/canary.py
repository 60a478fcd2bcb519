"""The canary: a cheap endpoint probed on a fixed schedule while load runs.

Each probe's latency is measured from the time it was *scheduled*, not from when the
probing task got to run. On a blocked loop the prober itself wakes late, so measuring
from its wake-up would hide exactly the stall we are looking for (FINDINGS A8: 2-3 ms
reported while the loop had been blocked 913 ms). Probes a late prober missed are fired
at once with their original schedule times, as wrk2 does against coordinated omission.

The schedule and every stamp are on :data:`clock.real`, and the waits are real-clock ones
(:mod:`waits`): on a frozen loop clock (freezegun, a patched ``time.monotonic``) probes still
fire every ``every_ms``, and on a fast one (looptime) they do not fire early.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from . import waits
from .clock import real
from .context import ASGIApp
from .driver import RequestSpec, call
from .errors import CanaryError
from .model import CanaryResult

# A quiet probe measured from its schedule takes 2-9 ms here, mostly timer wake-up, so a
# ratio against a lucky 0.5 ms baseline would swing with scheduler noise. Below this many
# milliseconds the baseline is taken as this value: see README "Canary".
FLOOR_MS = 5.0
BASELINE_PROBES = 30
SERVICE_PROBES = 5
MAX_IN_FLIGHT = 256
# After the body ends, probes still in flight get this long before they are cancelled
# (less when a burst's ``timeout`` is shorter).
DRAIN_S = 5.0
# The quiet baseline of a cheap endpoint takes well under a second; a canary that has not
# answered this many probes by then is not a canary (a burst's ``timeout`` bounds it too).
BASELINE_BOUND_S = 10.0


async def _probe(app: ASGIApp, spec: RequestSpec, scheduled: float, out: list[float],
                 at: list[float] | None = None) -> None:
    try:
        reply = await call(app, spec)
    except anyio.get_cancelled_exc_class():
        # Cut off by the drain bound: it took at least this long, and that is what counts.
        out.append((real.perf_counter() - scheduled) * 1000.0)
        if at is not None:
            at.append(scheduled)
        raise
    out.append((reply.finished - scheduled) * 1000.0)
    if at is not None:
        at.append(scheduled)  # the schedule of out[i] is at[i] (a burst's timeline)


async def _schedule(
    app: ASGIApp,
    spec: RequestSpec,
    every_s: float,
    out: list[float],
    stop: list[float] | None,
    count: int | None,
    start: float | None = None,
    at: list[float] | None = None,
) -> None:
    """Probe every ``every_s`` from ``start`` until the stop time (or ``count`` probes).

    ``stop`` is empty while the window is open and holds the time it closed after.
    Probes scheduled before that time are fired even if the prober only wakes after it,
    late, because the loop was blocked: each is charged from its schedule.
    """
    if start is None:
        start = real.perf_counter()
    issued = 0
    in_flight = anyio.Semaphore(MAX_IN_FLIGHT)

    async def probe(scheduled: float) -> None:
        async with in_flight:
            await _probe(app, spec, scheduled, out, at)

    async with anyio.create_task_group() as tg:
        with waits.Pacer() as pacer:
            while count is None or issued < count:
                scheduled = start + issued * every_s
                if stop and scheduled >= stop[0]:
                    break
                if scheduled > real.perf_counter():
                    await pacer.sleep_until(scheduled)
                    if stop and scheduled >= stop[0]:
                        break
                tg.start_soon(probe, scheduled)
                issued += 1
                await anyio.lowlevel.checkpoint()


async def service_ms(app: ASGIApp, spec: RequestSpec) -> float:
    """The canary's own loop cost: median of a few direct calls on the quiet app."""
    times = []
    for _ in range(SERVICE_PROBES):
        reply = await call(app, spec)
        times.append((reply.finished - reply.started) * 1000.0)
    return sorted(times)[len(times) // 2]


async def baseline(
    app: ASGIApp, spec: RequestSpec, every_ms: float, bound_s: float = BASELINE_BOUND_S
) -> tuple[list[float], float]:
    """Latencies of probes on the quiet app, and the canary's service time in ms.

    Raises ``TimeoutError`` naming the canary when it takes longer than ``bound_s`` (real
    seconds) in all: a slowdown against a baseline that never finished would mean nothing.
    """
    with waits.fail_after(
        bound_s,
        f"the canary GET {spec.path} did not answer its {BASELINE_PROBES} quiet probes "
        f"within {bound_s:g} s, before any load: a canary must be a cheap endpoint that "
        "answers at once (a health check); pick another path or see why this one waits",
    ):
        reply = await call(app, spec)  # warm-up: one-time framework work is not the baseline
        if reply.status == 404 or reply.status >= 500:
            raise CanaryError(
                f"the canary GET {spec.path} answered {reply.status} before any load: a "
                "canary must be a cheap endpoint of the app that answers 2xx at once (a "
                "health check). Check the path, or pick another with canary=..."
            )
        service = await service_ms(app, spec)
        out: list[float] = []
        await _schedule(app, spec, every_ms / 1000.0, out, None, BASELINE_PROBES)
    return out, service


def floor_for(in_flight: int, service: float) -> float:
    """The smallest baseline a slowdown is judged against.

    Requests fired at once each cost the loop about what a cheap request costs (routing,
    validation, the response), so a canary probe landing among ``in_flight`` of them waits
    about ``in_flight x service`` behind them even when nothing blocks: that is queueing,
    not a stall, and it is allowed for. A route that holds the loop costs far more than
    the canary's own service time and still shows.
    """
    return max(FLOOR_MS, in_flight * service)


@asynccontextmanager
async def probing(
    app: ASGIApp,
    spec: RequestSpec,
    every_ms: float,
    quiet: list[float],
    result: list[CanaryResult],
    floor_ms: float = FLOOR_MS,
    drain_s: float = DRAIN_S,
) -> AsyncIterator[None]:
    """Probe while the body runs; appends the CanaryResult to ``result`` on exit.

    The first probe is scheduled as the body starts, so even a body that blocks the loop
    at once is seen. Probes still in flight when the body ends get ``drain_s`` real
    seconds; the ones cut off count with the time they had waited.
    """
    out: list[float] = []
    at: list[float] = []
    stop: list[float] = []
    drain: waits.Timer | None = None
    try:
        async with anyio.create_task_group() as tg:
            start = real.perf_counter()
            tg.start_soon(_schedule, app, spec, every_ms / 1000.0, out, stop, None, start, at)
            try:
                yield
            finally:
                stop.append(real.perf_counter())
                drain = waits.cancel_later(tg.cancel_scope, drain_s)
    finally:
        if drain is not None:
            drain.cancel()
    result.append(
        CanaryResult(
            path=spec.path,
            every_ms=every_ms,
            baseline_ms=tuple(quiet),
            latencies_ms=tuple(out),
            floor_ms=floor_ms,
            scheduled_s=tuple(at),
        )
    )
