"""Blocking-call traps: sync calls that wait on the network, disk, a sleep or a child
process, caught at the call when they run on the event-loop thread for a request.

Two mechanisms, one finding per call:

* **Patches** (process-global, installed by :func:`install`, restored exactly by
  :func:`uninstall`): ``time.sleep``; ``socket.socket`` connect/connect_ex/send/sendall/
  recv/recv_into/recvfrom/sendto (sockets with ``gettimeout() == 0.0`` are the loop's own
  and are skipped); ``socket.getaddrinfo``/``gethostbyname``/``gethostbyname_ex`` (calls
  with ``AI_NUMERICHOST`` cannot block and are skipped: trio makes them on the loop);
  ``builtins.open``/``io.open``; ``os.read``/``os.write`` on blocking fds; ``sqlite3.connect``
  (connections it makes are a subclass whose ``execute``/``executemany``/``executescript``/
  ``commit``/``rollback`` and cursors' ``execute``/``executemany``/``executescript``/
  ``fetch*`` are trapped; ``sqlite3.Connection`` is a C type that cannot be patched);
  ``subprocess.Popen`` (``__init__``/``wait``/``communicate``) and ``subprocess.run``/
  ``call``/``check_call``/``check_output``/``getoutput``/``getstatusoutput``; ``os.system``;
  ``logging.Handler.handle`` for handlers that write to a file or a socket (file-backed
  ``StreamHandler``, ``FileHandler`` and its subclasses, ``SocketHandler``,
  ``DatagramHandler``, ``SysLogHandler``, ``HTTPHandler``, ``SMTPHandler``; console
  streams, in-memory streams and ``QueueHandler`` are not blocking and not trapped).
  ``http.client``, ``urllib``, ``urllib3`` and ``requests`` are covered through the socket
  patches. Patched calls are timed: the finding has a duration.
* **An audit hook** (``sys.addaudithook``, added once, never removable, a no-op while
  not installed) for names bound before patching: it sees ``open``, ``socket.connect``,
  ``socket.getaddrinfo``, ``socket.gethostbyname``, ``subprocess.Popen``, ``os.system``,
  ``os.posix_spawn`` and ``sqlite3.connect`` even through ``from socket import
  getaddrinfo``. It cannot time the call (it runs before it), so those findings have no
  duration. CPython raises no audit event for ``time.sleep``, ``os.read``/``os.write`` or
  socket send/recv: ``from time import sleep`` bound before :func:`install` is NOT caught
  by the traps (the loop watch still sees the stall if it is longer than the threshold).

A call seen by both (a patched ``open`` also raises the ``open`` audit event; ``requests``
resolving inside a trapped logging handler ...) is reported once: a thread-local flag
marks "inside a trapped call" and everything nested is ignored.

A trap fires only for code running on the loop thread for a request
(:func:`context.on_loop`), while a guard is active with ``traps != "off"``; never in
worker threads (``def`` endpoints, ``anyio.to_thread``, ``asyncio.to_thread``).
``record`` mode runs the call, times it and records after it returns (also when it
raises); ``raise`` mode records, then raises :class:`BlockingCallError` instead of making
the call.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import io
import logging
import logging.handlers
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from . import context, guard
from .context import perf_counter
from .errors import BlockingCallError
from .location import _PLUGIN_DIR, is_user_file, user_location
from .model import DOCS

# One-time framework and interpreter work that reads files (or starts processes) on the
# loop and is not the app's doing. A finding is dropped when any frame between the trap
# and the first user frame belongs to one of these modules (or a submodule):
#   importlib / _frozen_importlib*  lazy imports (anyio.Path's first use), importlib.metadata
#   zipimport, pkgutil              the import system reading packages
#   linecache, inspect, tokenize    source reads: FastAPI's first-request
#                                   _extract_endpoint_context (inspect.getsourcelines),
#                                   traceback formatting of an app error
#   pydantic                        its own metadata/plugin reads (not the user's validators:
#                                   those are user frames and stop the walk first)
#   mimetypes                       the first guess_type() reads /etc/mime.types
#   asyncio.base_subprocess, asyncio.unix_events, trio._subprocess
#                                   the async subprocess APIs start the child with Popen on
#                                   the loop: that is the recommended fix, not the bug
EXEMPT_MODULES: tuple[str, ...] = (
    "importlib",
    "_frozen_importlib",
    "_frozen_importlib_external",
    "zipimport",
    "pkgutil",
    "linecache",
    "inspect",
    "tokenize",
    "pydantic",
    "pydantic_core",
    "mimetypes",
    "asyncio.base_subprocess",
    "asyncio.unix_events",
    "trio._subprocess",
)

_THREAD_ADVICE = "run it in a worker thread: await anyio.to_thread.run_sync(...)"
ADVICE: dict[str, str] = {
    "time.sleep": f"Await an async equivalent (anyio.sleep) or {_THREAD_ADVICE}",
    "socket": "Use an async client (httpx.AsyncClient, an async DB driver) or " + _THREAD_ADVICE,
    "dns": "Resolve asynchronously (await anyio.getaddrinfo(...)) or " + _THREAD_ADVICE,
    "open": "Use anyio.Path / anyio.open_file, or " + _THREAD_ADVICE,
    "os.read": "Use anyio.open_file / anyio streams, or " + _THREAD_ADVICE,
    "os.write": "Use anyio.open_file / anyio streams, or " + _THREAD_ADVICE,
    "sqlite3": "Use an async driver (aiosqlite, SQLAlchemy's async engine) or " + _THREAD_ADVICE,
    "subprocess": "Use await anyio.run_process(...) (or asyncio.create_subprocess_exec), or "
    + _THREAD_ADVICE,
    "os.system": "Use await anyio.run_process(...) (or asyncio.create_subprocess_shell), or "
    + _THREAD_ADVICE,
    "logging": "Log through a logging.handlers.QueueHandler + QueueListener so the write "
    "happens in another thread, or " + _THREAD_ADVICE,
}

_MISSING = object()
_lock = threading.Lock()
_armed = False  # patches in place and the audit hook live
_hook_added = False
_saved: list[tuple[object, str, object]] = []  # (owner, attribute, original or _MISSING)
_tls = threading.local()  # .inside: a trapped call is running in this thread

# Time spent inside trapped calls on loop threads, (thread, start, end) in perf_counter
# seconds: the loop watch subtracts it from a step so one blocking call is not reported
# twice (as blocking-call and as loop-stall).
recent_blocks: deque[tuple[int, float, float]] = deque(maxlen=256)


def installed() -> bool:
    return _armed


def install() -> None:
    """Install every trap (idempotent)."""
    global _armed, _hook_added
    with _lock:
        if _armed:
            return
        try:
            _patch_all()
        except BaseException:
            _restore_all()
            raise
        if not _hook_added:
            sys.addaudithook(_audit)
            _hook_added = True
        _armed = True


def uninstall() -> None:
    """Restore every original exactly (idempotent). The audit hook stays, disarmed."""
    global _armed
    with _lock:
        _armed = False
        _restore_all()


@functools.cache
def _module_exempt(name: str) -> bool:
    return any(name == m or name.startswith(m + ".") for m in EXEMPT_MODULES)


def exempt(frame: FrameType | None) -> bool:
    """True when a frame between ``frame`` and the first user frame is exempt work."""
    while frame is not None:
        if is_user_file(frame.f_code.co_filename):
            return False
        name = frame.f_globals.get("__name__")
        if isinstance(name, str) and _module_exempt(name):
            return True
        frame = frame.f_back
    return False


def _active_guard() -> guard.Guard | None:
    g = guard.active()
    if g is None or g.traps == "off":
        return None
    return g


def _message(
    name: str,
    family: str,
    info: context.RequestInfo,
    loc: tuple[str | None, int | None, str | None],
    duration_ms: float | None,
    how: str,
) -> str:
    file, line, function = loc
    where = "<unknown location>" if file is None else f"{file}:{line}"
    if function:
        where += f" ({function})"
    if how == "timed":
        what = f"{name}() blocked the event loop for {duration_ms:.1f} ms"
    elif how == "raise":
        what = f"{name}() was called on the event loop"
    else:  # audit: seen before the call, not timed
        what = f"{name}() ran on the event loop (seen by the audit hook, not timed)"
    return f"{what} during {info.request} at {where}. {ADVICE[family]}. See {DOCS}blocking-call"


def _report(
    g: guard.Guard,
    info: context.RequestInfo,
    frame: FrameType,
    name: str,
    family: str,
    duration_ms: float | None,
    how: str,
) -> str:
    loc = user_location(frame)
    message = _message(name, family, info, loc, duration_ms, how)
    # A bug of ours must never break the app.
    with contextlib.suppress(Exception):
        g.record(
            "blocking-call",
            message,
            frame=frame,
            location=loc,
            request=info.request,
            duration_ms=duration_ms,
            call=family,
        )
    return message


def _trapped(
    name: str,
    family: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    info: context.RequestInfo,
    g: guard.Guard,
    frame: FrameType,
) -> Any:
    """Run ``func`` as a trapped call: record (and raise in raise mode)."""
    # The allowlist is applied by Guard.record (which counts what it drops); raise mode
    # must not raise where blocking is allowed.
    if exempt(frame) or (g.traps == "raise" and g.allowed(frame)):
        return _quiet(func, args, kwargs)
    _tls.inside = True
    try:
        if g.traps == "raise":
            message = _report(g, info, frame, name, family, None, "raise")
            raise BlockingCallError(message)
        start = perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            end = perf_counter()
            recent_blocks.append((info.thread, start, end))
            _report(g, info, frame, name, family, (end - start) * 1000.0, "timed")
    finally:
        _tls.inside = False


def _quiet(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Run a call the traps decided to let through, hiding it from the audit hook."""
    if getattr(_tls, "inside", False):
        return func(*args, **kwargs)
    _tls.inside = True
    try:
        return func(*args, **kwargs)
    finally:
        _tls.inside = False


def _should_trap() -> tuple[context.RequestInfo, guard.Guard] | None:
    g = guard.active()
    if g is None or g.traps == "off" or getattr(_tls, "inside", False):
        return None
    info = context.on_loop()
    if info is None:
        return None
    return info, g


# -- patches -------------------------------------------------------------------------------


def _set(owner: object, attr: str, value: object) -> None:
    original = vars(owner).get(attr, _MISSING) if isinstance(owner, type) else getattr(owner, attr)
    _saved.append((owner, attr, original))
    setattr(owner, attr, value)


def _restore_all() -> None:
    while _saved:
        owner, attr, original = _saved.pop()
        if original is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(owner, attr)
        else:
            setattr(owner, attr, original)


def _function_trap(
    func: Callable[..., Any],
    name: str,
    family: str,
    skip: Callable[..., bool] | None = None,
) -> Callable[..., Any]:
    @functools.wraps(func)
    def trap(*args: Any, **kwargs: Any) -> Any:
        if guard._active is None:  # fast path: nothing armed
            return func(*args, **kwargs)
        armed = _should_trap()
        if armed is None:
            return func(*args, **kwargs)
        if skip is not None and skip(*args, **kwargs):
            return _quiet(func, args, kwargs)
        return _trapped(name, family, func, args, kwargs, *armed, sys._getframe(1))

    trap.__stallguard_original__ = func  # type: ignore[attr-defined]
    return trap


def _sleep_skip(seconds: float = 0, *args: Any, **kwargs: Any) -> bool:
    return seconds == 0


def _numeric_skip(host: Any = None, port: Any = None, *args: Any, **kwargs: Any) -> bool:
    flags = kwargs.get("flags", args[3] if len(args) > 3 else 0)
    return bool(flags & socket.AI_NUMERICHOST) if isinstance(flags, int) else False


def _fd_skip(fd: int, *args: Any, **kwargs: Any) -> bool:
    try:
        return not os.get_blocking(fd)
    except (OSError, TypeError, ValueError):
        return True


def _nonblocking_socket(sock: Any, *args: Any, **kwargs: Any) -> bool:
    try:
        return bool(sock.gettimeout() == 0.0)
    except Exception:
        return True


_SOCKET_METHODS = (
    "connect",
    "connect_ex",
    "send",
    "sendall",
    "recv",
    "recv_into",
    "recvfrom",
    "sendto",
)


class _TrappedCursor(sqlite3.Cursor):
    """A cursor whose statements are trapped (made by connections from ``sqlite3.connect``)."""


class _TrappedConnection(sqlite3.Connection):
    """A connection whose statements are trapped; ``sqlite3.connect`` makes these."""

    def cursor(self, factory: Any = None) -> Any:
        return super().cursor(factory or _TrappedCursor)

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        # The C method creates a plain cursor; go through our cursor so it is trapped once.
        return self.cursor().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> Any:
        return self.cursor().executemany(*args, **kwargs)

    def executescript(self, *args: Any, **kwargs: Any) -> Any:
        return self.cursor().executescript(*args, **kwargs)


_SQLITE_CONNECTION_METHODS = ("commit", "rollback", "backup")
_SQLITE_CURSOR_METHODS = (
    "execute",
    "executemany",
    "executescript",
    "fetchone",
    "fetchmany",
    "fetchall",
)


def _sqlite_connect_trap(func: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(func)
    def connect(*args: Any, **kwargs: Any) -> Any:
        # Every connection made while installed is trapped, wherever it was made (a
        # connection opened in the lifespan is used by requests later).
        if len(args) < 6 and kwargs.get("factory", sqlite3.Connection) is sqlite3.Connection:
            kwargs["factory"] = _TrappedConnection
        if guard._active is None:
            return func(*args, **kwargs)
        armed = _should_trap()
        if armed is None:
            return func(*args, **kwargs)
        return _trapped("sqlite3.connect", "sqlite3", func, args, kwargs, *armed, sys._getframe(1))

    connect.__stallguard_original__ = func  # type: ignore[attr-defined]
    return connect


def _method_trap(
    cls: type, attr: str, name: str, family: str, skip: Callable[..., bool] | None = None
) -> None:
    method = getattr(cls, attr)
    _set(cls, attr, _function_trap(method, name, family, skip))


_SUBPROCESS_FUNCTIONS = (
    "run",
    "call",
    "check_call",
    "check_output",
    "getoutput",
    "getstatusoutput",
)

_NETWORK_HANDLERS: tuple[type[logging.Handler], ...] = (
    logging.FileHandler,
    logging.handlers.SocketHandler,  # and DatagramHandler
    logging.handlers.SysLogHandler,
    logging.handlers.HTTPHandler,
    logging.handlers.SMTPHandler,
)


def _handler_blocks(handler: logging.Handler) -> bool:
    """Does emitting through this handler write to a file or a socket?"""
    if type(handler).__module__.startswith("_pytest"):
        return False  # pytest's capture and --log-file handlers belong to the test run
    if isinstance(handler, _NETWORK_HANDLERS):
        return True
    if not isinstance(handler, logging.StreamHandler):
        return False  # QueueHandler, MemoryHandler, NullHandler, ...
    try:
        fd = handler.stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # io.StringIO and other in-memory streams
    if fd in (0, 1, 2):
        return False  # the console: blocking in theory, what everybody does
    try:
        return not os.isatty(fd)
    except OSError:
        return False


def _handler_skip(handler: logging.Handler, *args: Any, **kwargs: Any) -> bool:
    return not _handler_blocks(handler)


def _patch_all() -> None:
    _set(time, "sleep", _function_trap(time.sleep, "time.sleep", "time.sleep", _sleep_skip))
    for attr in _SOCKET_METHODS:
        _method_trap(socket.socket, attr, f"socket.{attr}", "socket", _nonblocking_socket)
    _set(
        socket,
        "getaddrinfo",
        _function_trap(socket.getaddrinfo, "socket.getaddrinfo", "dns", _numeric_skip),
    )
    for attr in ("gethostbyname", "gethostbyname_ex"):
        _set(socket, attr, _function_trap(getattr(socket, attr), f"socket.{attr}", "dns"))
    trapped_open = _function_trap(builtins.open, "open", "open")
    _set(builtins, "open", trapped_open)
    _set(io, "open", trapped_open)
    _set(os, "read", _function_trap(os.read, "os.read", "os.read", _fd_skip))
    _set(os, "write", _function_trap(os.write, "os.write", "os.write", _fd_skip))
    _set(os, "system", _function_trap(os.system, "os.system", "os.system"))
    sqlite_connect = _sqlite_connect_trap(sqlite3.connect)
    _set(sqlite3, "connect", sqlite_connect)
    _set(sqlite3.dbapi2, "connect", sqlite_connect)
    for attr in _SQLITE_CONNECTION_METHODS:
        _method_trap(_TrappedConnection, attr, f"sqlite3.Connection.{attr}", "sqlite3")
    for attr in _SQLITE_CURSOR_METHODS:
        _method_trap(_TrappedCursor, attr, f"sqlite3.Cursor.{attr}", "sqlite3")
    for attr in ("__init__", "wait", "communicate"):
        name = "subprocess.Popen" if attr == "__init__" else f"subprocess.Popen.{attr}"
        _method_trap(subprocess.Popen, attr, name, "subprocess")
    for attr in _SUBPROCESS_FUNCTIONS:
        _set(
            subprocess,
            attr,
            _function_trap(getattr(subprocess, attr), f"subprocess.{attr}", "subprocess"),
        )
    _method_trap(logging.Handler, "handle", "logging handler", "logging", _handler_skip)


# -- audit hook ----------------------------------------------------------------------------

_AUDIT_EVENTS: dict[str, tuple[str, str]] = {
    "open": ("open", "open"),
    "socket.connect": ("socket.connect", "socket"),
    "socket.getaddrinfo": ("socket.getaddrinfo", "dns"),
    "socket.gethostbyname": ("socket.gethostbyname", "dns"),
    "subprocess.Popen": ("subprocess.Popen", "subprocess"),
    "os.posix_spawn": ("os.posix_spawn", "subprocess"),
    "os.system": ("os.system", "os.system"),
    "sqlite3.connect": ("sqlite3.connect", "sqlite3"),
}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Filter by name first: sys._getframe below raises an audit event of its own.
    if not _armed or event not in _AUDIT_EVENTS or guard._active is None:
        return
    armed = _should_trap()
    if armed is None:
        return
    info, g = armed
    if event == "socket.connect" and args and _nonblocking_socket(args[0]):
        return
    if (
        event == "open"
        and len(args) > 2
        and isinstance(args[2], int)
        and args[2] & getattr(os, "O_NONBLOCK", 0)
    ):
        return
    frame = sys._getframe(1)
    while frame.f_code.co_filename.startswith(_PLUGIN_DIR) and frame.f_back is not None:
        frame = frame.f_back  # pragma: no cover - our own opens are not made on the loop
    if exempt(frame) or (g.traps == "raise" and g.allowed(frame)):
        return
    name, family = _AUDIT_EVENTS[event]
    if g.traps == "raise":
        message = _report(g, info, frame, name, family, None, "raise")
        raise BlockingCallError(message)
    _report(g, info, frame, name, family, None, "audit")


def patched() -> Iterator[tuple[object, str]]:
    """(owner, attribute) of every patch in place, for tests and diagnostics."""
    for owner, attr, _ in list(_saved):
        yield owner, attr
