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


def _rows_for(ms: float) -> list[dict[str, Any]]:
    """Rows that json.dumps(..., indent=1) (the pure-Python encoder) takes ``ms`` of CPU on."""
    rows = [{"id": i, "name": f"row {i}", "tags": ["a", "b"]} for i in range(500)]
    t0 = time.thread_time()
    json.dumps(rows, indent=1)
    one = max(time.thread_time() - t0, 1e-4)
    return rows * max(1, int(ms / 1000.0 / one))


@ASYNCIO
@pytest.mark.anyio
async def test_a_stall_in_a_stdlib_callback_names_the_stdlib_line() -> None:
    app = FastAPI()
    app.state.rows = _rows_for(STALL_MS)

    @app.get("/later")
    async def later() -> dict[str, Any]:
        # no user frame on the stack when it runs: the loop calls json.dumps directly
        asyncio.get_running_loop().call_soon(
            functools.partial(json.dumps, app.state.rows, indent=1)
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
    assert all("library code" in f.message for f in encoder)
