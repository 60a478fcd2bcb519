"""``stall_client``: the app in-process with its lifespan, an httpx client, bursts, canary."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import anyio
import httpx
from asgi_lifespan import LifespanManager

from . import burst as burst_mod
from . import canary as canary_mod
from . import context, waits
from .config import Settings, layer
from .context import ASGIApp
from .driver import DriverTransport, build_spec, call
from .guard import Guard
from .location import user_location
from .model import DOCS, BurstResult, CanaryResult

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def quiet_gc() -> None:
    """Move what exists now (the test session, the app) out of the collector's sight.

    A full collection over a pytest process walks every object pytest and the app hold
    and pauses the loop for 30-70 ms: a stall of the test process, not of the app, that
    a canary would otherwise charge to the endpoint. ``gc.freeze()`` (undone when the
    client closes) keeps collections to what the burst allocates. See README "Canary".
    """
    gc.freeze()


class CanaryWatch:
    """What ``stall_client.canary()`` gives: ``.result`` (a CanaryResult) once the block ends.

    Its attributes (``p95_ms``, ``slowdown``, ...) read through to the result.
    """

    def __init__(self) -> None:
        self._results: list[CanaryResult] = []

    @property
    def result(self) -> CanaryResult:
        if not self._results:
            raise RuntimeError("the canary result is ready only after the `async with` block")
        return self._results[0]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.result, name)


def slowdown_message(result: CanaryResult, limit: float, during: str) -> str:
    base = result.baseline_p95_ms
    floor = f" (floored to {result.floor_ms:.1f} ms)" if base < result.floor_ms else ""
    return (
        f"The canary GET {result.path} slowed down {result.slowdown:.1f}x during {during}: "
        f"p95 {result.p95_ms:.1f} ms (max {result.max_ms:.1f} ms, {result.probes} probes) "
        f"against a quiet baseline p95 of {base:.2f} ms{floor}; the limit is {limit:g}x. "
        "Something in the requests under load held the event loop or a pool that the canary "
        "needs: look at the blocking-call and loop-stall findings of this test, run the "
        "burst with a smaller concurrency to see where latency starts to climb, or raise "
        f"max_canary_slowdown if this endpoint is meant to share a saturated resource. "
        f"See {DOCS}canary"
    )


class StallClient(httpx.AsyncClient):
    """An httpx AsyncClient on the app in-process, with :meth:`burst` and :meth:`canary`."""

    def __init__(self, app: ASGIApp, settings: Settings, guard: Guard | None) -> None:
        super().__init__(transport=DriverTransport(app), base_url="http://testserver")
        self.app = app
        self.settings = settings
        self.guard = guard
        self.bursts: list[BurstResult] = []
        self._warm: set[str] = set()
        self._baselines: dict[str, tuple[list[float], float]] = {}

    async def _warm_up(self, specs: Sequence[Any], timeout: float | None) -> None:
        """One request per safe route, unmeasured, to absorb one-time framework work.

        All of them together get the burst's ``timeout`` (real seconds): a route that hangs
        costs the burst one timeout here, not forever. Cut off or not, a route is warmed
        once.
        """
        token = context.pause()
        try:
            with waits.move_on_after(timeout):
                for spec in specs:
                    if spec.method in SAFE_METHODS and spec.label not in self._warm:
                        self._warm.add(spec.label)
                        await call(self.app, spec)
        finally:
            context.unpause(token)

    async def _baseline(
        self, path: str, every_ms: float, timeout: float | None = None
    ) -> tuple[list[float], float]:
        """The canary's quiet baseline, measured once per path and schedule.

        Bounded by the probes' own schedule plus ``timeout`` (or ``BASELINE_BOUND_S``);
        a canary that does not answer in time raises ``TimeoutError`` naming it.
        """
        key = f"{path}@{every_ms:g}"
        if key not in self._baselines:
            spec = build_spec("GET", path)
            schedule_s = canary_mod.BASELINE_PROBES * every_ms / 1000.0
            grace = canary_mod.BASELINE_BOUND_S if timeout is None else timeout
            token = context.pause()
            try:
                self._baselines[key] = await canary_mod.baseline(
                    self.app, spec, every_ms, bound_s=schedule_s + grace
                )
            finally:
                context.unpause(token)
        return self._baselines[key]

    def _judge(self, result: CanaryResult, limit: float, during: str) -> None:
        if self.guard is not None and result.slowdown > limit:
            frame = sys._getframe(2)
            self.guard.record(
                "canary-slowdown",
                slowdown_message(result, limit, during),
                location=user_location(frame),
                request=f"GET {result.path}",
                duration_ms=result.p95_ms,
            )

    async def burst(
        self,
        method: str | Sequence[Any],
        path: str | None = None,
        n: int | None = None,
        concurrency: int | None = None,
        canary: str | None = None,
        *,
        timeout: float | None = None,
        max_canary_slowdown: float | None = None,
        every_ms: float | None = None,
        **request_kwargs: Any,
    ) -> BurstResult:
        """Fire ``n`` concurrent requests and return their timings.

        ``method`` is an HTTP method with ``path``, or a list of request specs for mixed
        traffic: ``[("GET", "/a"), ("POST", "/b", {"json": {...}})]`` (cycled up to ``n``;
        ``n`` defaults to the list's length). ``request_kwargs`` are httpx's (json, data,
        params, headers, content, files, cookies). With ``canary``, a cheap path is probed
        during the burst and a ``canary-slowdown`` finding fails the test when its p95
        exceeds ``max_canary_slowdown`` times its quiet baseline.

        ``timeout`` (seconds of real time, whatever the loop's clock does) is how long a
        request may take before the client gives up on it (an error in the result); it
        also bounds the warm-up of the routes, the canary's quiet baseline and the drain
        of the canary's last probes, so a hanging route costs a few timeouts, never a hang.
        """
        where = "stall_client.burst() arguments"
        if isinstance(method, str):
            if path is None:
                raise TypeError(
                    f"stall_client.burst({method!r}): the path is missing; give "
                    "burst(method, path, ...) or burst([(method, path), ...])"
                )
            specs = burst_mod.parse_specs([(method, path, request_kwargs)])
            default_n = self.settings.n
        else:
            if path is not None or request_kwargs:
                extra = ", ".join((["path"] if path is not None else []) + sorted(request_kwargs))
                raise TypeError(
                    f"stall_client.burst(specs, ...): got {extra} "
                    "beside a list of requests; put the path and request arguments inside each "
                    "spec: (method, path, {request kwargs})"
                )
            specs = burst_mod.parse_specs(method)
            default_n = len(specs)
        settings = layer(
            self.settings,
            {
                "n": n if n is not None else (None if isinstance(method, str) else default_n),
                "concurrency": self.settings.concurrency if concurrency is None else concurrency,
                "canary": canary if canary is not None else self.settings.canary,
                "max_canary_slowdown": max_canary_slowdown,
                "every_ms": every_ms,
            },
            where,
        )
        await self._warm_up(specs, timeout)
        quiet_gc()
        results: list[CanaryResult] = []
        if settings.canary is None:
            result = await burst_mod.run(self.app, specs, settings.n, settings.concurrency, timeout)
        else:
            quiet, service = await self._baseline(settings.canary, settings.every_ms, timeout)
            probe = build_spec("GET", settings.canary)
            in_flight = min(settings.n, settings.concurrency or settings.n)
            floor = canary_mod.floor_for(in_flight, service)
            drain = canary_mod.DRAIN_S if timeout is None else min(canary_mod.DRAIN_S, timeout)
            async with canary_mod.probing(
                self.app, probe, settings.every_ms, quiet, results, floor, drain
            ):
                result = await burst_mod.run(
                    self.app, specs, settings.n, settings.concurrency, timeout
                )
        if results:
            probes = results[0]
            timeline = dict(result.timeline)
            timeline["canary"] = sorted(
                [round((s - result.t0) * 1000.0, 3), round(lat, 3)]
                for s, lat in zip(probes.scheduled_s, probes.latencies_ms, strict=False)
            )
            result = replace(result, canary=probes, timeline=timeline)
            during = f"a burst of {settings.n} x {', '.join(result.specs)}"
            self._judge(results[0], settings.max_canary_slowdown, during)
        self.bursts.append(result)
        return result

    @asynccontextmanager
    async def canary(
        self,
        path: str,
        every_ms: float = 10.0,
        max_canary_slowdown: float | None = None,
    ) -> AsyncIterator[CanaryWatch]:
        """Probe ``path`` every ``every_ms`` while the block runs; fail on a slowdown."""
        settings = layer(
            self.settings,
            {"canary": path, "every_ms": every_ms, "max_canary_slowdown": max_canary_slowdown},
            "stall_client.canary() arguments",
        )
        assert settings.canary is not None
        quiet, _ = await self._baseline(settings.canary, settings.every_ms)
        quiet_gc()
        watch = CanaryWatch()
        probe = build_spec("GET", settings.canary)
        async with canary_mod.probing(self.app, probe, settings.every_ms, quiet, watch._results):
            yield watch
        self._judge(watch.result, settings.max_canary_slowdown, "the canary block")


# asgi-lifespan's own cleanup (cancel and await the lifespan task) gets this much real time
# beyond the startup or shutdown timeout, at most: on asyncio it first polls the task with
# ``asyncio.wait(timeout=0)``, a loop timer that never fires under freezegun (frozen at a
# date, ``loop.time() + clock resolution`` rounds to ``loop.time()``), and on trio it waits
# for a lifespan task that nothing cancelled.
CLEANUP_S = 5.0


class _Lifespan(LifespanManager):
    """asgi-lifespan's manager with its startup and shutdown bounded by the real clock.

    Its own timeouts run on the loop's clock (``asyncio.wait_for``, ``trio.move_on_after``),
    which freezegun or a patched ``time.monotonic`` stops and looptime fast-forwards; they
    are switched off and the same waits are bounded by :mod:`waits` instead. Raises
    ``TimeoutError`` as asgi-lifespan does.
    """

    def __init__(self, app: ASGIApp, startup_timeout: float, shutdown_timeout: float) -> None:
        super().__init__(app, startup_timeout=None, shutdown_timeout=None)
        self.real_startup_timeout = startup_timeout
        self.real_shutdown_timeout = shutdown_timeout

    def late(self, phase: str) -> str:
        timeout = self.real_startup_timeout if phase == "startup" else self.real_shutdown_timeout
        return f"lifespan {phase} did not finish within {timeout:g} s"

    async def startup(self) -> None:
        with waits.fail_after(self.real_startup_timeout, self.late("startup")):
            await super().startup()

    async def shutdown(self) -> None:
        with waits.fail_after(self.real_shutdown_timeout, self.late("shutdown")):
            await super().shutdown()


@contextmanager
def _phase(span: anyio.CancelScope | None, seconds: float) -> Iterator[anyio.CancelScope]:
    """Bound one lifespan phase: a scope of its own, or a timer on the spanning scope."""
    if span is None:
        with waits.move_on_after(seconds) as scope:
            yield scope
        return
    timer = waits.cancel_later(span, seconds)
    try:
        yield span
    finally:
        timer.cancel()


def _timeouts_only(exc: BaseException) -> bool:
    """A TimeoutError, or an exception group holding nothing else."""
    if isinstance(exc, TimeoutError):
        return True
    inner = getattr(exc, "exceptions", None)
    return isinstance(inner, (list, tuple)) and bool(inner) and all(map(_timeouts_only, inner))


@asynccontextmanager
async def running(app: Any, settings: Settings, guard: Guard | None) -> AsyncIterator[StallClient]:
    """Start ``app`` with its lifespan and yield a :class:`StallClient` on it.

    Startup and shutdown each end within their timeout (real seconds) plus at most
    ``CLEANUP_S`` (or the timeout, if shorter) for asgi-lifespan to clean up, with a
    ``TimeoutError`` when they do not.
    """
    from asgi_lifespan import LifespanNotSupported

    wrapped = context.attributed(app, watch_send=False)  # (driver.call's send notes it)
    lifespan = _Lifespan(wrapped, settings.startup_timeout, settings.shutdown_timeout)
    manager: _Lifespan | None = lifespan
    startup_s = settings.startup_timeout + min(CLEANUP_S, settings.startup_timeout)
    shutdown_s = settings.shutdown_timeout + min(CLEANUP_S, settings.shutdown_timeout)
    # On trio asgi-lifespan's nursery lives from enter to exit and a cancel scope must not
    # end inside it: one scope spans both, cancelled only by the phase bounds. On asyncio
    # (whose fixtures pytest-asyncio may set up and tear down in different tasks) each
    # phase gets its own scope.
    span = anyio.CancelScope() if waits.on_trio() else None
    phase = "startup"
    with span if span is not None else nullcontext():
        with _phase(span, startup_s) as scope:
            try:
                await lifespan.__aenter__()
            except LifespanNotSupported:
                manager = None
        if scope.cancelled_caught:
            raise TimeoutError(lifespan.late(phase))
        try:
            async with StallClient(manager.app if manager else wrapped, settings, guard) as client:
                yield client
        finally:
            gc.unfreeze()
            if manager is not None:
                phase = "shutdown"
                with _phase(span, shutdown_s) as scope:
                    try:
                        await manager.__aexit__(*sys.exc_info())
                    except Exception as exc:
                        # On trio our TimeoutError comes out of asgi-lifespan's nursery in a
                        # group.
                        if _timeouts_only(exc):
                            raise TimeoutError(lifespan.late(phase)) from exc
                        raise
                if scope.cancelled_caught:
                    raise TimeoutError(lifespan.late(phase))
    if span is not None and span.cancelled_caught:
        raise TimeoutError(lifespan.late(phase))
