"""A long step right after the loop idled, that the same step of the next requests does
not repeat, is a one-off (cold memory on a VM, a first call's setup), not a loop stall.
The same long step repeated, or with nothing to compare it with, still is one."""

from __future__ import annotations

import pytest

from .conftest import load_json

APP = """
import anyio
import time

from fastapi import FastAPI

IDLE_S = 0.4  # the loop sits idle this long before the requests go on together
SPIN_S = 0.08  # 4x the 20 ms threshold: unmistakable when it counts


def spin():
    deadline = time.thread_time() + SPIN_S
    while time.thread_time() < deadline:  # SPIN-LINE
        pass


def create_app():
    app = FastAPI()
    woke = {"at": 0.0}

    @app.get("/first-only")
    async def first_only():
        await anyio.sleep(IDLE_S)
        # only the first request to wake after the idle does the work
        if time.monotonic() - woke["at"] > IDLE_S / 2:
            spin()
            woke["at"] = time.monotonic()  # after: on a busy machine spin() takes long
        return {"ok": True}

    @app.get("/with-a-helper")
    async def with_a_helper():
        await anyio.sleep(IDLE_S)
        async with anyio.create_task_group() as tg:
            tg.start_soon(helper)  # runs, short, after the spin: no twin of this step
            spin()
        return {"ok": True}

    async def helper():
        pass

    @app.get("/every-time")
    async def every_time():
        await anyio.sleep(IDLE_S)
        spin()
        return {"ok": True}

    return app
"""


def line_of(marker: str) -> int:
    return next(i for i, line in enumerate(APP.strip().splitlines(), 1) if marker in line)


def test_one_off_after_idle_is_dropped_repeats_and_lone_steps_are_not(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(myapp=APP)
    pytester.syspathinsert()
    pytester.makepyfile(
        """
        import pytest
        from myapp import create_app

        @pytest.fixture(
            params=["asyncio", ("asyncio", {"use_uvloop": True}), "trio"],
            ids=["asyncio", "uvloop", "trio"],
        )
        def anyio_backend(request):
            return request.param

        @pytest.fixture
        def stall_app():
            return create_app()

        async def test_one_off(stall_client):
            r = await stall_client.burst("GET", "/first-only", n=10)
            assert r.statuses[200] == 10

        async def test_repeated(stall_client):
            r = await stall_client.burst("GET", "/every-time", n=10)
            assert r.statuses[200] == 10

        async def test_helper(stall_client):
            assert (await stall_client.get("/with-a-helper")).status_code == 200

        async def test_lone(stall_client):
            # one request: nothing to compare the step with, so it counts
            assert (await stall_client.get("/first-only")).status_code == 200
        """
    )
    result = pytester.runpytest("-p", "no:asyncio", "--stall-report-json=r.json")
    result.assert_outcomes(passed=3, failed=9)
    tests = {t["nodeid"].split("::")[1]: t for t in load_json(pytester.path / "r.json")["tests"]}
    spin = [("loop-stall", line_of("SPIN-LINE"))]
    for backend in ("asyncio", "uvloop", "trio"):
        assert tests[f"test_one_off[{backend}]"]["findings"] == [], backend
        repeated = tests[f"test_repeated[{backend}]"]["findings"]
        assert [(f["kind"], f["line"]) for f in repeated] == spin, backend
        # the held one is recorded when the next step repeats it
        assert repeated[0]["count"] == 10, backend
        for lone in ("test_lone", "test_helper"):
            found = tests[f"{lone}[{backend}]"]["findings"]
            assert [(f["kind"], f["line"]) for f in found] == spin, (lone, backend)


def test_the_guard_settles_held_findings_at_its_next_read_unless_released() -> None:
    from pytest_stallguard.guard import Guard

    g = Guard()
    place = ("app.py", 3, "handler")
    for _ in range(2):
        assert g.hold("a", "loop-stall", "step A", location=place, request="GET /a")
    assert g.hold("b", "loop-stall", "step B", location=place, request="GET /b")
    assert g.hold("c", "loop-stall", "step C", location=place, request="GET /c", alone=False)
    assert g.hold("d", "loop-stall", "step D", location=place, request="GET /d", alone=False)
    assert g.release("a") == 2 and g.release("a") == 0
    g.settle("d")  # it repeated: recorded, whether or not it counts alone
    # the read settles the rest: "b" counts alone, "c" does not
    assert sorted(f.request for f in g.findings) == ["GET /b", "GET /d"]
    assert len(g.findings) == 2  # settled once: a second read adds nothing

    g.recording = False  # outside the test's run phase nothing is held, as for record()
    assert not g.hold("e", "loop-stall", "step E", request="GET /e")
