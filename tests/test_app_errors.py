"""Messages for a burst the app fails, and for a canary that cannot be one."""

from __future__ import annotations

import pytest

APP = """
from fastapi import FastAPI


def create_app():
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"ok": True}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("the database is down")  # BOOM-LINE

    @app.get("/sick")
    async def sick():
        raise RuntimeError("not healthy")

    return app
"""


@pytest.fixture
def app_dir(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(myapp=APP)
    pytester.makeini("[pytest]\nstallguard_app = myapp:create_app()\n")
    pytester.syspathinsert()
    return pytester


def _line(marker: str) -> int:
    return next(i for i, text in enumerate(APP.splitlines()) if marker in text)


def test_a_failing_burst_shows_the_first_app_exception(app_dir: pytest.Pytester) -> None:
    app_dir.makepyfile(
        """
        async def test_fails(stall_client):
            r = await stall_client.burst("GET", "/boom", n=5)
            assert r.statuses[200] == 5

        async def test_passes_with_500s(stall_client):
            r = await stall_client.burst("GET", "/boom", n=3)
            assert r.statuses[500] == 3
        """
    )
    result = app_dir.runpytest("-p", "no:asyncio")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*stallguard: the app raised during a burst*",
            "request #* of the burst GET /boom answered 500: the app raised",
            "RuntimeError: the database is down",
            f"  myapp.py:{_line('BOOM-LINE')} in boom",
        ]
    )
    assert result.stdout.str().count("the app raised during a burst") == 1


@pytest.mark.parametrize(("path", "status"), [("/nope", 404), ("/sick", 500)])
def test_a_canary_that_cannot_be_one_is_a_usage_error(
    app_dir: pytest.Pytester, path: str, status: int
) -> None:
    app_dir.makepyfile(
        f"""
        async def test_it(stall_client):
            await stall_client.burst("GET", "/health", n=5, canary="{path}")
        """
    )
    result = app_dir.runpytest("-p", "no:asyncio")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([f"*CanaryError: the canary GET {path} answered {status}*"])
