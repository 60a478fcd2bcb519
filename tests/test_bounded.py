"""Every wait of ours ends on the real clock, whatever the loop's clock does.

The loop's clock is not ours: freezegun's ``freeze_time`` stops it on asyncio and trio
(not on uvloop, whose clock is libuv's), a patched ``time.monotonic`` stops it on asyncio,
looptime makes it jump. The bursts, the canary and the lifespan must still end on time,
and what they measure must be real time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest
from fastapi import FastAPI
from freezegun import freeze_time

from pytest_stallguard import canary, waits
from pytest_stallguard.client import running
from pytest_stallguard.clock import real
from pytest_stallguard.config import Settings
from pytest_stallguard.driver import build_spec
from pytest_stallguard.model import CanaryResult

from .conftest import BACKENDS

pytestmark = pytest.mark.anyio

BOUND = 0.3  # seconds: the waits under test; every check compares with it


@pytest.fixture(params=BACKENDS)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


@pytest.fixture(params=["freeze_time", "monotonic"])
def stopped_clock(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A test's time patcher, active while the test (and its async fixtures) run."""
    if request.param == "freeze_time":
        with freeze_time("2020-01-01"):
            yield request.param
    else:
        monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
        yield request.param


def hang_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/wait")
    async def wait() -> None:
        await anyio.Event().wait()  # never set

    return app


# Built at import: FastAPI's first route pulls in pydantic, which cannot be imported while
# freezegun has replaced ``datetime.date`` (a user would build the app outside the freeze).
HANG_APP = hang_app()


async def test_move_on_after_ends_on_the_real_clock(stopped_clock: str) -> None:
    loop_started = anyio.current_time()
    started = real.perf_counter()
    with waits.move_on_after(BOUND) as scope:
        await anyio.Event().wait()
    wall = real.perf_counter() - started
    assert scope.cancelled_caught
    # not early (a fast loop clock would end it at once) and not late
    assert BOUND * 0.9 <= wall < 5 * BOUND
    # the premise: where the patcher reaches the loop's clock, it stood still meanwhile
    if (stopped_clock, _flavour()) in STOPS_THE_LOOP_CLOCK:
        assert anyio.current_time() - loop_started < wall / 2


# uvloop keeps libuv's clock; trio's clock is perf_counter, which freezegun also fakes.
STOPS_THE_LOOP_CLOCK = {("freeze_time", "asyncio"), ("freeze_time", "trio"), ("monotonic", "asyncio")}


def _flavour() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "trio"
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def test_fail_after_raises_timeout_on_the_real_clock(stopped_clock: str) -> None:
    started = real.perf_counter()
    with pytest.raises(TimeoutError, match="the thing"), waits.fail_after(BOUND, "the thing"):
        await anyio.sleep(3600)
    assert BOUND * 0.9 <= real.perf_counter() - started < 5 * BOUND


async def test_sleep_until_wakes_on_the_real_clock(stopped_clock: str) -> None:
    started = real.perf_counter()
    for i in range(1, 11):
        await waits.sleep_until(started + i * BOUND / 10)
        assert real.perf_counter() >= started + i * BOUND / 10
    assert real.perf_counter() - started < 5 * BOUND


async def test_a_wait_that_ends_first_leaves_no_timer() -> None:
    with waits.move_on_after(3600) as scope:
        await anyio.sleep(0)
    await waits.sleep_until(real.perf_counter() + 0.001)
    assert not scope.cancelled_caught
    assert waits._timers.pending() == 0


async def test_canary_probes_on_schedule_with_a_stopped_loop_clock(stopped_clock: str) -> None:
    """Probes every 10 ms of real time, through a quiet baseline and a probing window."""
    app = HANG_APP
    spec = build_spec("GET", "/health")
    started = real.perf_counter()
    with waits.fail_after(20 * BOUND):  # the bug was a hang: fail instead
        quiet, _ = await canary.baseline(app, spec, 10.0)
        out: list[CanaryResult] = []
        async with canary.probing(app, spec, 10.0, quiet, out):
            window = real.perf_counter()
            await waits.sleep(BOUND)
            window = real.perf_counter() - window
    assert len(quiet) == canary.BASELINE_PROBES
    expected = window / 0.010
    assert 0.5 * expected <= out[0].probes <= 1.5 * expected + 1
    assert real.perf_counter() - started < 10 * BOUND


async def test_canary_drain_cuts_off_probes_that_hang() -> None:
    """A probe still in flight after the drain bound is cut off and counted as waited."""
    app = HANG_APP
    out: list[CanaryResult] = []
    started = real.perf_counter()
    async with canary.probing(app, build_spec("GET", "/wait"), 10.0, [1.0], out, drain_s=BOUND):
        await waits.sleep(BOUND / 3)
    wall = real.perf_counter() - started
    assert wall < 5 * BOUND
    assert out[0].probes >= 1
    # the first probe waited the whole window and the drain: it counts with that wait
    assert out[0].max_ms >= 0.9 * BOUND * 1000


async def test_canary_that_hangs_in_quiet_is_named() -> None:
    app = HANG_APP
    started = real.perf_counter()
    with pytest.raises(TimeoutError, match="the canary GET /wait did not answer"):
        await canary.baseline(app, build_spec("GET", "/wait"), 10.0, bound_s=BOUND)
    assert real.perf_counter() - started < 5 * BOUND


def lifespan_app(hang_in: str) -> FastAPI:
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        if hang_in == "startup":
            await anyio.Event().wait()
        yield
        if hang_in == "shutdown":
            await anyio.Event().wait()

    return FastAPI(lifespan=lifespan)


LIFESPAN_APPS = {hang_in: lifespan_app(hang_in) for hang_in in ("startup", "shutdown")}


@pytest.mark.parametrize("hang_in", ["startup", "shutdown"])
async def test_lifespan_timeouts_are_real_time(stopped_clock: str, hang_in: str) -> None:
    settings = Settings(startup_timeout=BOUND, shutdown_timeout=BOUND)
    started = real.perf_counter()
    with pytest.raises(TimeoutError, match=f"lifespan {hang_in} did not finish within"):
        async with running(LIFESPAN_APPS[hang_in], settings, None) as client:
            assert hang_in == "shutdown"
            assert client is not None
    wall = real.perf_counter() - started
    assert BOUND * 0.9 <= wall < 5 * BOUND
