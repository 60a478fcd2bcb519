"""Which request is running: the context the guard is armed by.

The guard does not watch the clock of a whole test; it watches code that runs *for* a
request, the lifespan, or a window the test opens. An ASGI call is wrapped by
:func:`attributed`, which puts a :class:`RequestInfo` in a context variable. Tasks the
request spawns inherit it; worker threads inherit it too (anyio copies the context), so
every check also compares the thread with the loop thread the request started on.

``perf_counter``, ``monotonic`` and ``real_sleep`` here are the real clocks of
:mod:`.clock` (kept for the modules that import them from here): functions of ours, not
the ``time`` functions themselves, so freezegun, which replaces module attributes that
*are* time functions, passes them by.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from asyncio import _get_running_loop
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import anyio.lowlevel

from . import location
from .clock import real


def perf_counter() -> float:
    """The real ``time.perf_counter`` (see :mod:`.clock`)."""
    return real.perf_counter()


def monotonic() -> float:
    """The real ``time.monotonic`` (see :mod:`.clock`)."""
    return real.monotonic()


def real_sleep(seconds: float) -> None:
    """The real ``time.sleep``, whatever patches ``time.sleep`` (see :mod:`.clock`)."""
    real.sleep(seconds)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass
class RequestInfo:
    """The request (or lifespan, or test window) that code is running for."""

    label: str
    thread: int
    done: bool = False  # the final response body has been sent: what runs now is background

    @property
    def request(self) -> str:
        return "background" if self.done else self.label


_current: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "stallguard_request", default=None
)
# The same variable, for hot paths that cannot afford a function call (the traps' fast
# path: ``current_var.get() is None`` means no request, no lifespan, no window).
current_var = _current
# The last request this context ran, never reset: a loop step that finished a request
# still knows which request it was (the loop watch compares it with later steps).
last_var: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar(
    "stallguard_last_request", default=None
)
# Set by ``stall_guard.paused()``: measurement off in this context.
_paused: contextvars.ContextVar[bool] = contextvars.ContextVar("stallguard_paused", default=False)


def current() -> RequestInfo | None:
    """The request info of the running code, or None outside any request or window."""
    return _current.get()


def on_loop() -> RequestInfo | None:
    """The request info if this code runs on the loop thread for a request, else None."""
    info = _current.get()
    if info is None or info.thread != threading.get_ident() or _paused.get():
        return None
    return info


def info_of(ctx: contextvars.Context | None) -> RequestInfo | None:
    """The request info stored in a ``contextvars.Context`` (an asyncio handle's)."""
    if ctx is None or ctx.get(_paused, False):
        return None
    return ctx.get(_current)


def enter(label: str) -> contextvars.Token[RequestInfo | None]:
    return _current.set(RequestInfo(label, threading.get_ident()))


def leave(token: contextvars.Token[RequestInfo | None]) -> None:
    _current.reset(token)


def pause() -> contextvars.Token[bool]:
    return _paused.set(True)


def unpause(token: contextvars.Token[bool]) -> None:
    _paused.reset(token)


def label_of(scope: Scope) -> str:
    kind = scope.get("type")
    if kind == "lifespan":
        return "lifespan"
    path = scope.get("path", "")
    if kind == "websocket":
        return f"WS {path}"
    return f"{scope.get('method', 'GET')} {path}"


_WRAPPED = "__stallguard_wrapped__"

# Called (without arguments) on the loop thread as an ASGI call starts on a loop they have
# not seen yet; the loop watch uses it to hook each loop once. Each hook comes with a check
# that it has nothing to do for the code running now, or None: asking for the running
# asyncio loop makes a system call (the loop's pid check: getpid), and on a virtual
# machine that call cost a trivial request more than the whole rest of the label. Change
# it only through add_enter_hook / remove_enter_hook, which forget which loops were seen.
on_enter: list[tuple[Callable[[], None], Callable[[], bool] | None]] = []
_seen_loop: list[object] = [None]  # the asyncio loop the hooks last ran on
# The check of the only hook, when there is one and it has a check: attributed() calls it
# at every request, and run_enter_hooks() only when it says there is something to do.
_only_check: list[Callable[[], bool] | None] = [None]


def add_enter_hook(hook: Callable[[], None], done: Callable[[], bool] | None = None) -> None:
    """Run ``hook`` as ASGI calls start on a loop it has not run on; ``done``, when given,
    is a cheap check (no system call) that it has nothing to do for the running code."""
    on_enter.append((hook, done))
    _hooks_changed()


def remove_enter_hook(hook: Callable[[], None]) -> None:
    for k, (known, _) in enumerate(on_enter):
        if known == hook:  # (a bound method is a new object at each access)
            del on_enter[k]
            break
    _hooks_changed()


def _hooks_changed() -> None:
    _seen_loop[0] = None
    _only_check[0] = on_enter[0][1] if len(on_enter) == 1 else None


def run_enter_hooks() -> bool:
    """Run the hooks unless they already ran on this (asyncio) loop; cheap when they did.
    True when they ran now on an asyncio loop they had not seen."""
    if not on_enter:
        return False
    for _, done in on_enter:
        if done is None or not done():
            break
    else:
        return False  # every hook says so itself, without asking for the running loop
    loop = _get_running_loop()
    if loop is not None and loop is _seen_loop[0]:
        return False
    for hook, _ in on_enter:
        hook()
    _seen_loop[0] = loop  # None on trio: the hooks run every time (they are cheap there)
    return loop is not None


# Called on the loop thread with True as a request run inline by its caller's task starts
# (``attributed(..., isolate=True)``) and with False as it ends, inside the running loop
# step: the loop watch notes where in the step the request's part lies. Listeners must
# never raise and must be cheap (they run twice a request).
on_inline: list[Callable[[bool], None]] = []


def attributed(app: ASGIApp, *, isolate: bool = False, watch_send: bool = True) -> ASGIApp:
    """Wrap an ASGI app so that code running for each call knows its request.

    The wrapper changes nothing the app sees: same scope, receive and send messages.
    Wrapping twice is a no-op.

    ``isolate=True`` is for clients that run the app inline, in the caller's task
    (``httpx.ASGITransport``, ``TestClient``): the request then shares loop steps with the
    test's code, and with the requests before and after it when the app never yields.
    Its start and end are told to the :data:`on_inline` listeners (the loop watch notes
    them in the running step, so neither the test's code nor a run of such requests adds
    up to a loop stall no request caused), with no extra loop iteration: a scheduling
    point at each end would double the steps of a trivial request and keep every request
    of a gathered batch alive at once (three times the garbage collections). Only on a
    loop the hooks had not seen (``TestClient`` may run each request on a loop of its
    own) does the call start with a scheduling point, so that the request runs in a step
    the loop watch times from its beginning.

    The app's ``send`` is wrapped, to note when the last body has gone (what runs after
    is ``background``). ``watch_send=False`` is for a caller whose own ``send`` notes it
    (sets ``current().done``: the burst driver): the app then gets that ``send`` as is.
    """
    if getattr(app, _WRAPPED, False):
        return app
    with contextlib.suppress(Exception):  # where findings point, never a client failure
        location.add_app(app)

    only_check = _only_check

    async def stallguard_attributed(scope: Scope, receive: Receive, send: Send) -> None:
        if on_enter:
            check = only_check[0]  # (no call into run_enter_hooks() when it says so)
            if (check is None or not check()) and run_enter_hooks() and isolate:
                # A loop hooked just now (a TestClient runs each request on a loop of its
                # own): the request starts in a step the loop watch times from its start.
                await anyio.lowlevel.checkpoint()
        info = RequestInfo(label_of(scope), threading.get_ident())
        token = _current.set(info)
        last_var.set(info)
        if isolate:
            for mark in on_inline:
                mark(True)
        try:
            if scope.get("type") != "http":
                await app(scope, receive, send)
                return

            if not watch_send:  # (the caller's send sets info.done itself)
                await app(scope, receive, send)
                return

            async def watched_send(message: Message) -> None:
                await send(message)
                if message.get("type") == "http.response.body" and not message.get(
                    "more_body", False
                ):
                    info.done = True

            await app(scope, receive, watched_send)
        finally:
            _current.reset(token)
            if isolate:
                for mark in on_inline:
                    mark(False)

    setattr(stallguard_attributed, _WRAPPED, True)
    stallguard_attributed.__wrapped__ = app  # type: ignore[attr-defined]
    return stallguard_attributed
