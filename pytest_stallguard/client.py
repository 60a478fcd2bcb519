"""``stall_client``: the app in-process with its lifespan, an httpx client, bursts, canary."""

from __future__ import annotations

import gc
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import httpx
from asgi_lifespan import LifespanManager

from . import burst as burst_mod
from . import canary as canary_mod
from . import context
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

    async def _warm_up(self, specs: Sequence[Any]) -> None:
        """One request per safe route, unmeasured, to absorb one-time framework work."""
        token = context.pause()
        try:
            for spec in specs:
                if spec.method in SAFE_METHODS and spec.label not in self._warm:
                    self._warm.add(spec.label)
                    await call(self.app, spec)
        finally:
            context.unpause(token)

    async def _baseline(self, path: str, every_ms: float) -> tuple[list[float], float]:
        key = f"{path}@{every_ms:g}"
        if key not in self._baselines:
            spec = build_spec("GET", path)
            token = context.pause()
            try:
                self._baselines[key] = await canary_mod.baseline(self.app, spec, every_ms)
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
        await self._warm_up(specs)
        quiet_gc()
        results: list[CanaryResult] = []
        if settings.canary is None:
            result = await burst_mod.run(self.app, specs, settings.n, settings.concurrency, timeout)
        else:
            quiet, service = await self._baseline(settings.canary, settings.every_ms)
            probe = build_spec("GET", settings.canary)
            in_flight = min(settings.n, settings.concurrency or settings.n)
            floor = canary_mod.floor_for(in_flight, service)
            async with canary_mod.probing(
                self.app, probe, settings.every_ms, quiet, results, floor
            ):
                result = await burst_mod.run(
                    self.app, specs, settings.n, settings.concurrency, timeout
                )
        if results:
            result = replace(result, canary=results[0])
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


@asynccontextmanager
async def running(app: Any, settings: Settings, guard: Guard | None) -> AsyncIterator[StallClient]:
    """Start ``app`` with its lifespan and yield a :class:`StallClient` on it."""
    from asgi_lifespan._exceptions import LifespanNotSupported

    wrapped = context.attributed(app)
    manager = LifespanManager(
        wrapped,
        startup_timeout=settings.startup_timeout,
        shutdown_timeout=settings.shutdown_timeout,
    )
    try:
        await manager.__aenter__()
    except LifespanNotSupported:
        manager = None  # type: ignore[assignment]
    try:
        async with StallClient(manager.app if manager else wrapped, settings, guard) as client:
            yield client
    finally:
        gc.unfreeze()
        if manager is not None:
            await manager.__aexit__(*sys.exc_info())
