"""A loop stall with a sampled stack always has a line: when no frame of the project's code
is on the stack (a stdlib function run as a loop callback of the request), the finding names
the innermost sampled frame outside the plugin, as its import path names it."""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Any

import anyio
import pytest
from fastapi import FastAPI

from .conftest import ASYNCIO
from .test_loopwatch import STALL_MS, stalls, watched


def _rows_for(ms: float, indent: int | None) -> list[dict[str, Any]]:
    """Rows that json.dumps(..., indent=indent) takes ``ms`` of CPU on."""
    rows = [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(500)]
    t0 = time.thread_time()
    json.dumps(rows, indent=indent)
    one = max(time.thread_time() - t0, 1e-5)
    return rows * max(1, int(ms / 1000.0 / one))


@ASYNCIO
@pytest.mark.anyio
@pytest.mark.parametrize(
    "indent",
    [
        pytest.param(1, id="python-encoder"),  # sampled while it runs: json/encoder.py
        pytest.param(None, id="c-encoder"),  # one C call: sampled after it, or not at all
    ],
)
async def test_a_stall_in_a_stdlib_callback_names_the_stdlib_line(indent: int | None) -> None:
    app = FastAPI()
    app.state.rows = _rows_for(STALL_MS, indent)

    @app.get("/later")
    async def later() -> dict[str, Any]:
        # no user frame on the stack when it runs: the loop calls json.dumps directly
        asyncio.get_running_loop().call_soon(
            functools.partial(json.dumps, app.state.rows, indent=indent)
        )
        return {}

    async with watched(app) as (client, guard, _watch):
        for _ in range(2):
            assert (await client.get("/later")).status_code == 200
            await anyio.sleep(0.01)  # the callback's step
    found = stalls(guard.findings)
    # every stall has a line (the first request may also compile the route's regex)
    for f in found:
        assert f.file is not None and isinstance(f.line, int) and f.line > 0, f
        assert f"at {f.file}:{f.line}" in f.message
    encoder = [f for f in found if f.file is not None and f.file.startswith("json/")]
    assert encoder, found
    assert all("library code" in f.message or "the callback the loop ran" in f.message
               for f in encoder), encoder


# -- an app installed as a package (a server run from its wheel) -------------------------------

PACKAGE = """
import asyncio
import functools
import json
import time

from fastapi import FastAPI


def _rows(ms):
    # rows that json.dumps(..., indent=1) (the pure-Python encoder) takes ~ms of CPU on
    rows = [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(500)]
    t0 = time.thread_time()
    json.dumps(rows, indent=1)
    return rows * max(1, int(ms / 1000.0 / max(time.thread_time() - t0, 1e-5)))


def create_app():
    app = FastAPI()
    rows = _rows(200)

    @app.get("/render")
    async def render():
        # all the time goes to json/encoder.py, called from this line
        return {"n": len(json.dumps(rows, indent=1))}  # RENDER-LINE

    @app.get("/later")
    async def later():
        # the loop runs json.dumps itself: no frame of this package is on the stack
        asyncio.get_running_loop().call_soon(functools.partial(json.dumps, rows, indent=1))
        await asyncio.sleep(0.3)
        return {}

    return app
"""


def test_loop_stalls_of_an_installed_app_always_have_a_line(pytester: pytest.Pytester) -> None:
    """Stacks sampled in library code (json's pure-Python encoder): a stall called from the
    installed app's package is named at the package's line; one with no frame of the package
    on the stack at the innermost sampled frame, said to be library code."""
    site = pytester.path / "venv" / "lib" / "site-packages"
    (site / "shopapp").mkdir(parents=True)
    (site / "shopapp" / "__init__.py").write_text(PACKAGE)
    pytester.makepyfile(
        f"""
        import sys
        sys.path.insert(0, {str(site)!r})

        import httpx
        import pytest
        from shopapp import create_app

        @pytest.mark.anyio
        @pytest.mark.parametrize("path", ["/render", "/later"])
        async def test_it(path):
            transport = httpx.ASGITransport(app=create_app())
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.get(path)).status_code == 200
        """
    )
    result = pytester.runpytest(
        "-p", "no:asyncio", "-k", "asyncio", "--stall-guard", "--stall-report-json=r.json"
    )
    result.assert_outcomes(failed=2)
    report = json.loads((pytester.path / "r.json").read_text())
    found = {
        t["nodeid"].rstrip("]").split("-", 1)[1]: [
            f for f in t["findings"] if f["kind"] == "loop-stall"
        ]
        for t in report["tests"]
    }
    assert set(found) == {"/render", "/later"}, report
    line = next(i for i, t in enumerate(PACKAGE.splitlines(), 1) if "RENDER-LINE" in t)
    assert {(f["file"], f["line"], f["function"]) for f in found["/render"]} == {
        ("shopapp/__init__.py", line, "render")
    }
    later = found["/later"]
    assert later, report
    for f in later:
        assert f["file"].startswith("json/") and f["line"] > 0, f
        assert f"at {f['file']}:{f['line']}" in f["message"]
        assert "library code" in f["message"], f
