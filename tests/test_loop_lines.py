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
