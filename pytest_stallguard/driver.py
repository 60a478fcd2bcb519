"""A lean in-process ASGI driver: one request, timed, without httpx on the hot path.

httpx's ``ASGITransport`` spends about two thirds of each in-process request building and
parsing httpx objects, buffers streaming bodies, and raises app exceptions into the test.
Bursts go through :func:`call` instead: a scope dict, two closures, real-clock stamps
(:data:`clock.real`) for the first and last body byte. :class:`DriverTransport` puts the
same driver behind the httpx API for the single requests a test makes with
``stall_client.get(...)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import anyio
import httpx

from .clock import real
from .context import ASGIApp, Message, current_var

_SERVER = ("testserver", 80)
_CLIENT = ("127.0.0.1", 50000)


@dataclass
class Reply:
    """What the app sent back for one request, with timestamps on the real clock."""

    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    started: float = 0.0
    first_byte: float = 0.0
    finished: float = 0.0
    exception: BaseException | None = None


@dataclass(frozen=True)
class RequestSpec:
    """One request of a burst, prepared once so that issuing it costs almost nothing."""

    method: str
    path: str
    scope: dict[str, Any]
    body: bytes

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


def _encode_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]


def build_spec(
    method: str,
    url: str,
    *,
    params: Mapping[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
    json: Any = None,
    content: bytes | str | None = None,
    data: Mapping[str, Any] | None = None,
    files: Any = None,
    cookies: dict[str, str] | None = None,
) -> RequestSpec:
    """Prepare a request with httpx's own encoding rules (json, data, files, params)."""
    request = httpx.Request(
        method.upper(),
        httpx.URL("http://testserver").join(url),
        params=params,
        headers=headers,
        json=json,
        content=content,
        data=data,
        files=files,
        cookies=cookies,
    )
    body = request.read()
    parts = urlsplit(str(request.url))
    path = request.url.path
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": request.method,
        "scheme": "http",
        "path": path,
        "raw_path": quote(path).encode("ascii"),
        "query_string": parts.query.encode("ascii"),
        "root_path": "",
        "headers": _encode_headers(request.headers.multi_items()),
        "client": _CLIENT,
        "server": _SERVER,
        "extensions": {},
    }
    return RequestSpec(request.method, path, scope, body)


async def call(app: ASGIApp, spec: RequestSpec) -> Reply:
    """Run one request through ``app``; never raises for app errors (they become 500)."""
    reply = Reply()
    body_sent = False
    disconnect: anyio.Event | None = None

    async def receive() -> Message:
        nonlocal body_sent, disconnect
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": spec.body, "more_body": False}
        # A server reports a disconnect only once the response is over.
        if not reply.finished:
            if disconnect is None:
                disconnect = anyio.Event()
            await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            reply.status = message["status"]
            reply.headers = list(message.get("headers", ()))
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk and not reply.first_byte:
                reply.first_byte = real.perf_counter()
            reply.body += chunk
            if not message.get("more_body", False):
                reply.finished = real.perf_counter()
                if not reply.first_byte:
                    reply.first_byte = reply.finished
                if disconnect is not None:
                    disconnect.set()
                info = current_var.get()  # what runs for the request now is background
                if info is not None:
                    info.done = True

    scope = dict(spec.scope)
    reply.started = real.perf_counter()
    try:
        await app(scope, receive, send)
    except Exception as exc:  # the app crashed: answer as a server would
        reply.exception = exc
        if not reply.status:
            reply.status = 500
            reply.headers = [(b"content-type", b"text/plain; charset=utf-8")]
            reply.body = bytearray(b"Internal Server Error")
    if not reply.finished:
        reply.finished = real.perf_counter()
        if not reply.first_byte:
            reply.first_byte = reply.finished
    if disconnect is not None:
        disconnect.set()
    return reply


class DriverTransport(httpx.AsyncBaseTransport):
    """The driver behind httpx's API: ``AsyncClient(transport=DriverTransport(app))``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        path = request.url.path
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": request.method,
            "scheme": request.url.scheme,
            "path": path,
            "raw_path": request.url.raw_path.split(b"?", 1)[0],
            "query_string": request.url.query,
            "root_path": "",
            "headers": [(k.lower(), v) for k, v in request.headers.raw],
            "client": _CLIENT,
            "server": (request.url.host, request.url.port or 80),
            "extensions": {},
        }
        reply = await call(self.app, RequestSpec(request.method, path, scope, body))
        return httpx.Response(
            reply.status,
            headers=reply.headers,
            content=bytes(reply.body),
            request=request,
            extensions={"stallguard_exception": reply.exception},
        )
