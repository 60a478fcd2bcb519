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

from pytest_stallguard import burst, canary, waits
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


@pytest.fixture
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


UVLOOP = BACKENDS[1].values[0]
# Each time patcher on each backend where it stops the loop's clock, and uvloop (whose
# clock is libuv's) under freezegun, which still freezes the module clocks.
STOPPED = pytest.mark.parametrize(
    ("anyio_backend", "stopped_clock"),
    [
        pytest.param("asyncio", "freeze_time", id="asyncio-freeze_time"),
        pytest.param("asyncio", "monotonic", id="asyncio-monotonic"),
        pytest.param("trio", "freeze_time", id="trio-freeze_time"),
        pytest.param(UVLOOP, "freeze_time", id="uvloop-freeze_time"),
    ],
    indirect=True,
)


class RacingLoop(asyncio.SelectorEventLoop):
    """A loop whose clock runs 1000x fast, as looptime's jumps over idle time."""

    def time(self) -> float:
        return super().time() * 1000.0


RACING = pytest.mark.parametrize(
    "anyio_backend", [pytest.param(("asyncio", {"loop_factory": RacingLoop}), id="racing")]
)


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


@STOPPED
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


@STOPPED
async def test_pacer_wakes_on_the_real_clock(stopped_clock: str) -> None:
    """Waits on the real clock, never early, and on time once a stopped clock is seen."""
    started = real.perf_counter()
    late, own = [], []
    with waits.Pacer() as pacer:
        for i in range(1, 61):
            deadline = started + i * BOUND / 10
            begun = real.perf_counter()
            await pacer.sleep_until(deadline)
            woke = real.perf_counter()
            late.append(woke - deadline)
            # how late this wait made itself (a wait begun after its deadline, because an
            # earlier one was starved, owes nothing for the time before it began)
            own.append(woke - max(deadline, begun))
    assert min(late) >= 0  # never early
    # on time: a stopped clock would hold a wait up until the pacer's coarse rescue timer
    # (every 0.25 s): several waits late by their own doing; a starved machine makes one
    # or two (the waits after a starved one begin past their deadlines and owe nothing)
    assert sum(x > BOUND / 10 for x in own) <= 2, own
    assert real.perf_counter() - started < 10 * BOUND
    # the premise: where the patcher stops the loop's clock, the pacer stopped trusting it
    assert pacer.trusted == ((stopped_clock, _flavour()) not in STOPS_THE_LOOP_CLOCK)


@RACING
async def test_waits_do_not_end_early_on_a_racing_loop_clock() -> None:
    loop_started = anyio.current_time()
    started = real.perf_counter()
    with waits.move_on_after(BOUND) as scope:
        await anyio.Event().wait()
    assert scope.cancelled_caught
    assert BOUND * 0.9 <= real.perf_counter() - started < 5 * BOUND
    with waits.Pacer() as pacer:
        await pacer.sleep_until(real.perf_counter() + BOUND)
    assert not pacer.trusted
    wall = real.perf_counter() - started
    assert 1.9 * BOUND <= wall < 10 * BOUND
    # the premise: the loop's clock ran far ahead of the real one
    assert anyio.current_time() - loop_started > 100 * wall


@RACING
async def test_burst_timeout_and_canary_keep_real_time_on_a_racing_loop_clock() -> None:
    app = HANG_APP
    out: list[CanaryResult] = []
    async with canary.probing(app, build_spec("GET", "/health"), 10.0, [1.0], out):
        result = await burst.run(app, [build_spec("GET", "/wait")], 5, timeout=BOUND)
    assert len(result.errors) == 5
    # the client gave up after BOUND of real time, not after BOUND of the loop's clock
    assert min(result.latencies_ms) >= 0.9 * BOUND * 1000
    assert result.elapsed_s >= 0.9 * BOUND
    expected = result.elapsed_s / 0.010
    assert 0.5 * expected <= out[0].probes <= 1.5 * expected + 5


async def test_a_wait_that_ends_first_leaves_no_timer() -> None:
    with waits.move_on_after(3600) as scope:
        await anyio.sleep(0)
    with waits.Pacer() as pacer:
        for _ in range(3):
            await pacer.sleep_until(real.perf_counter() + 0.001)
    assert not scope.cancelled_caught
    assert waits._timers.pending() == 0


@STOPPED
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


@STOPPED
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


# -- as users meet it: burst(timeout=) on a route that hangs ----------------------------

HANG_APP_SOURCE = '''
import anyio
from fastapi import FastAPI


def create_app():
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/wait")
    async def wait():
        await anyio.Event().wait()  # never set

    @app.get("/sleep")
    async def sleep():
        await anyio.sleep(30)
        return {"ok": True}

    return app
'''

HANG_TESTS = '''
import time

import pytest
from freezegun import freeze_time

from pytest_stallguard.clock import real

TIMEOUT = 1.0
UVLOOP = ("asyncio", {"use_uvloop": True})


@pytest.fixture
def anyio_backend(request):
    return request.param


@pytest.fixture
def clock(request, monkeypatch):
    if request.param == "freeze_time":
        with freeze_time("2020-01-01"):
            yield
    elif request.param == "monotonic":
        monkeypatch.setattr(time, "monotonic", lambda: 1000.0)
        yield
    else:
        yield


@pytest.mark.parametrize(
    ("anyio_backend", "clock", "path", "canary"),
    [
        ("asyncio", "real", "/wait", None),
        ("asyncio", "real", "/sleep", "/health"),
        ("asyncio", "freeze_time", "/wait", "/health"),
        ("asyncio", "monotonic", "/wait", "/health"),
        (UVLOOP, "freeze_time", "/wait", "/health"),
        ("trio", "freeze_time", "/wait", "/health"),
    ],
    indirect=["anyio_backend", "clock"],
)
async def test_hanging_route(clock, stall_client, path, canary):
    started = real.perf_counter()
    r = await stall_client.burst("GET", path, n=5, timeout=TIMEOUT, canary=canary)
    wall = real.perf_counter() - started
    print(f"wall={wall:.2f} elapsed={r.elapsed_s:.2f}")
    assert len(r.errors) == 5 and not r.statuses
    assert all(isinstance(e.exception, TimeoutError) for e in r.errors)
    # the warm-up, the baseline and the burst: a few timeouts, never the route's 30 s
    assert wall < 5 * TIMEOUT
    # elapsed_s is the burst's own real time: one timeout (not less), a part of the wall
    assert 0.9 * TIMEOUT <= r.elapsed_s <= wall
    assert r.elapsed_s > wall / 5
    assert min(r.latencies_ms) >= 0.9 * TIMEOUT * 1000
    if canary:
        # probes every 10 ms of real time, whatever the loop's clock did
        expected = r.elapsed_s * 1000 / 10
        assert 0.5 * expected <= r.canary.probes <= 1.5 * expected + 5
'''


def test_burst_timeout_ends_a_hanging_burst_whatever_the_clock(pytester: pytest.Pytester) -> None:
    """A GET that never answers, under freezegun, a patched time.monotonic, on every
    backend: each burst(timeout=1) ends in a few seconds and says how long it took."""
    pytester.makepyfile(myapp=HANG_APP_SOURCE, test_hang=HANG_TESTS)
    pytester.makeini(
        """
        [pytest]
        stallguard_app = myapp:create_app()
        faulthandler_timeout = 30
        """
    )
    # A subprocess with a timeout: if a wait of ours hangs again, this fails instead.
    result = pytester.runpytest_subprocess("-p", "no:asyncio", "-p", "no:randomly", "-s", timeout=180)
    result.assert_outcomes(passed=6)
