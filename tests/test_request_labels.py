"""The request label (``context.attributed``) at its cheapest: the enter hooks asked
through their one check only, and no wrapper around ``send`` where the caller's own
``send`` notes the end of the response (the burst driver)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pytest_stallguard import context
from pytest_stallguard.driver import build_spec, call

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.fixture
def enter_hooks() -> Iterator[list[str]]:
    """What the enter hooks and run_enter_hooks() were asked, with the hooks put back."""
    saved = list(context.on_enter)
    for hook, _ in saved:
        context.remove_enter_hook(hook)
    asked: list[str] = []
    yield asked
    for hook, _ in list(context.on_enter):
        context.remove_enter_hook(hook)
    for hook, done in saved:
        context.add_enter_hook(hook, done)


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


async def _get(app: Any) -> int:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        return (await client.get("/")).status_code


@pytest.mark.anyio
@pytest.mark.parametrize("done", [True, False], ids=["done-here", "to-do-here"])
async def test_the_only_hook_s_check_decides_without_run_enter_hooks(
    enter_hooks: list[str], monkeypatch: pytest.MonkeyPatch, done: bool
) -> None:
    """One enter hook with a check: each request calls the check, and run_enter_hooks()
    (which asks for the running loop, a system call) only when the check says there is
    something to do; then the hook runs."""
    run = context.run_enter_hooks

    def counted() -> bool:
        enter_hooks.append("run_enter_hooks")
        return run()

    monkeypatch.setattr(context, "run_enter_hooks", counted)
    context.add_enter_hook(lambda: enter_hooks.append("hook"),
                           lambda: enter_hooks.append("check") is None and done)
    for _ in range(2):
        assert await _get(context.attributed(_app, isolate=True)) == 200
    if done:
        assert enter_hooks == ["check", "check"]
    else:  # (run_enter_hooks asks the check again, then runs the hook on a new loop)
        assert enter_hooks[:4] == ["check", "run_enter_hooks", "check", "hook"]
        assert enter_hooks.count("run_enter_hooks") == 2


@pytest.mark.anyio
async def test_two_hooks_go_through_run_enter_hooks(
    enter_hooks: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    run = context.run_enter_hooks

    def counted() -> bool:
        enter_hooks.append("run_enter_hooks")
        return run()

    monkeypatch.setattr(context, "run_enter_hooks", counted)
    context.add_enter_hook(lambda: enter_hooks.append("a"), lambda: True)
    context.add_enter_hook(lambda: enter_hooks.append("b"), lambda: True)
    assert await _get(context.attributed(_app)) == 200
    assert enter_hooks == ["run_enter_hooks"]  # (both checks say done: no hook runs)
    context.remove_enter_hook(context.on_enter[0][0])
    assert context._only_check[0] is context.on_enter[0][1]


def _recording_app(seen: dict[str, Any]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["send"] = send
        await send({"type": "http.response.start", "status": 200, "headers": []})
        seen["before"] = context.current().request  # type: ignore[union-attr]
        await send({"type": "http.response.body", "body": b"ok"})
        seen["after"] = context.current().request  # type: ignore[union-attr]

    return app


@pytest.mark.anyio
async def test_the_driver_s_send_marks_the_end_of_the_response() -> None:
    """attributed(watch_send=False), as the fixtures run the app: the app gets the
    driver's own send, and what runs after the last body is background, as with the
    wrapped send of attributed() (the default, for the user's own clients)."""
    seen: dict[str, Any] = {}
    reply = await call(context.attributed(_recording_app(seen), watch_send=False),
                       build_spec("GET", "/x"))
    assert reply.status == 200
    assert seen["send"].__qualname__ == "call.<locals>.send"  # the driver's, unwrapped
    assert (seen["before"], seen["after"]) == ("GET /x", "background")

    wrapped: dict[str, Any] = {}
    assert await _get(context.attributed(_recording_app(wrapped))) == 200
    assert wrapped["send"].__qualname__.endswith("watched_send")
    assert (wrapped["before"], wrapped["after"]) == ("GET /", "background")


@pytest.mark.anyio
async def test_the_driver_leaves_a_window_of_the_test_alone() -> None:
    """Called inside a window of the test (its own label) on an app that is labelled,
    the driver marks the request's label done, never the window's."""
    seen: dict[str, Any] = {}
    token = context.enter("window")
    try:
        await call(context.attributed(_recording_app(seen), watch_send=False),
                   build_spec("GET", "/x"))
        assert context.current().request == "window"  # type: ignore[union-attr]
    finally:
        context.leave(token)
    assert seen["after"] == "background"
