"""Blocking-call traps: sync calls that wait on the network, disk, a sleep or a child
process, caught at the call when they run on the event-loop thread for a request.

Three mechanisms, one finding per call:

* **Wrappers** (process-global, installed by :func:`install` through :mod:`.patching`,
  owner ``"traps"``, taken off exactly by :func:`uninstall`): ``time.sleep``;
  ``socket.socket`` connect/connect_ex/send/sendall/recv/recv_into/recvfrom/sendto
  (sockets with ``gettimeout() == 0.0`` are the loop's own and are skipped);
  ``socket.getaddrinfo``/``gethostbyname``/``gethostbyname_ex`` (calls with
  ``AI_NUMERICHOST`` cannot block and are skipped: trio makes them on the loop);
  ``builtins.open``/``io.open``; ``os.read``/``os.write`` on blocking fds;
  ``sqlite3.connect``; ``subprocess.Popen`` (``__init__``/``wait``/``communicate``) and
  ``subprocess.run``/``call``/``check_call``/``check_output``/``getoutput``/
  ``getstatusoutput``; ``os.system``; ``logging.Handler.handle`` for handlers that write
  to a file or a socket (file-backed ``StreamHandler``, ``FileHandler`` and its subclasses,
  ``SocketHandler``, ``DatagramHandler``, ``SysLogHandler``, ``HTTPHandler``,
  ``SMTPHandler``; console streams, in-memory streams and ``QueueHandler`` are not
  blocking and not trapped). ``http.client``, ``urllib``, ``urllib3`` and ``requests``
  are covered through the socket wrappers. Wrapped calls are timed: the finding has a
  duration. A wrapper behaves like what it replaces when stored on a class: the wrapper
  of a builtin (``time.sleep``, ``open``, ...) does not bind, the wrapper of a Python
  function or a method binds as it would; both keep the original's signature.
* **sqlite3's trace callback** for statements: ``sqlite3.Connection`` is a C type that
  cannot be patched, and the connection must keep its type (the user's factory class, or
  ``sqlite3.Connection``). A connection made through ``sqlite3.connect`` while the traps
  are installed gets our trace callback for its life (so a connection opened in one test
  is still watched in the next), unless a factory of the user's with its own ``__init__``
  (which may have set one) made it, or it belongs to a worker thread that no loop runs
  in; a callback the user sets later replaces ours, as it would replace any. The callback
  runs as each statement starts (``execute``, ``executemany``, ``executescript``,
  ``COMMIT``), so these findings are not timed and raise mode cannot raise there (sqlite3
  swallows a callback's exception); outside a guard it returns at once.
* **An audit hook** (``sys.addaudithook``, added once, never removable, a no-op while
  not installed: it filters on the event name first) for names bound before patching: it
  sees ``open``, ``socket.connect``, ``socket.getaddrinfo``, ``socket.gethostbyname``,
  ``subprocess.Popen``, ``os.system``, ``os.posix_spawn`` and ``sqlite3.connect`` even
  through ``from socket import getaddrinfo``. It cannot time the call (it runs before it),
  so those findings have no duration. CPython raises no audit event for ``time.sleep``,
  ``os.read``/``os.write`` or socket send/recv: ``from time import sleep`` bound before
  :func:`install` is NOT caught by the traps (the loop watch still sees the stall if it is
  longer than the threshold).

A call seen twice (a wrapped ``open`` also raises the ``open`` audit event; ``requests``
resolving inside a trapped logging handler ...) is reported once: a thread-local flag
marks "inside a trapped call" and everything nested is ignored.

A trap fires only for code running on the loop thread for a request
(:func:`context.on_loop`), while a guard is active with ``traps != "off"``; never in
worker threads (``def`` endpoints, ``anyio.to_thread``, ``asyncio.to_thread``).
``record`` mode runs the call, times it and records after it returns (also when it
raises); ``raise`` mode records, then raises :class:`BlockingCallError` instead of making
the call. With no guard active, or outside any request, every wrapper checks a global and
a context variable and calls through.

Our bookkeeping never reaches the app: when deciding, locating or recording fails, the
app's call runs once as without the plugin, the trap turns itself off until the next
:func:`install`, and :func:`patching.hook_failed` notes it for a warning.
"""

from __future__ import annotations

import builtins
import functools
import importlib
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
from asyncio import _get_running_loop as asyncio_running_loop
from collections import deque
from collections.abc import Callable
from types import FrameType
from typing import Any

from . import context, guard, patching
from .clock import real
from .context import current_var as _request
from .errors import BlockingCallError
from .location import _PLUGIN_DIR, is_user_file, user_location
from .loopwatch import steps
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

OWNER = "traps"

_lock = threading.Lock()
_patches = patching.Patches(OWNER)
_armed = False  # wrappers in place and the audit hook live (turned off by _patches)
_hook_added = False
_tls = threading.local()  # .inside: a trapped call is running in this thread
_audit_off: set[str] = set()  # audit events whose bookkeeping failed (until install)

# Time spent inside trapped calls on loop threads, (thread, start, end) in perf_counter
# seconds: the loop watch subtracts it from a step so one blocking call is not reported
# twice (as blocking-call and as loop-stall).
recent_blocks: deque[tuple[int, float, float]] = deque(maxlen=256)


def install() -> None:
    """Install every trap (idempotent); see :func:`patching.live` for what is in place."""
    global _armed, _hook_added
    with _lock:
        if _patches:
            return
        try:
            _patch_all()
            if not _hook_added:
                _add_audit_hook()
                _hook_added = True
            _audit_off.clear()
            _armed = True
            _patches.undo("audit hook", _disarm, target="sys.audit")
        except BaseException:
            _patches.restore()
            raise


def _add_audit_hook() -> None:
    """Add :func:`_audit` as an audit hook, for good. Where the C module of the step hooks is
    built, through a hook in C that calls it only for the events it looks at: every other
    audit event of the process (anyio's ``id()`` at each task it starts) then costs a
    few string compares, not a Python call."""
    if steps._cstep is not None:
        steps._cstep.add_audit_hook(_audit, tuple(_AUDIT_EVENTS))
    else:
        sys.addaudithook(_audit)


def _disarm() -> None:
    global _armed
    _armed = False


def uninstall() -> None:
    """Take every trap off (idempotent), in any order with other owners' layers.

    The audit hook stays, disarmed; sqlite3 connections keep our trace callback, which
    returns at once while no guard is active.
    """
    with _lock:
        _patches.restore()
        _disarm()


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
    elif how == "trace":
        what = (
            f"{name} ran a statement on the event loop "
            "(seen by sqlite3's trace callback, not timed)"
        )
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
    """Record the finding; may raise (callers turn that into :func:`patching.hook_failed`)."""
    loc = user_location(frame)
    message = _message(name, family, info, loc, duration_ms, how)
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


# -- the trapped call ------------------------------------------------------------------------


class _Spec:
    """What one wrapper traps: its name in findings, family (advice), library and skip."""

    __slots__ = ("family", "library", "name", "off", "skip")

    def __init__(
        self, name: str, family: str, library: str, skip: Callable[..., bool] | None = None
    ) -> None:
        self.name = name
        self.family = family
        self.library = library  # the stdlib module, for patching.hook_failed
        self.skip = skip
        self.off = False  # our bookkeeping failed: call through until the next install


def _failed(spec: _Spec, exc: BaseException) -> None:
    spec.off = True
    patching.hook_failed(OWNER, spec.library, spec.name, exc)


_PLAIN, _QUIET, _TIMED, _RAISE = range(4)


def _through(
    spec: _Spec, call: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    """A trapped callable called while a guard is active. Frame 2 is the caller's."""
    if spec.off or getattr(_tls, "inside", False):
        return call(*args, **kwargs)
    plan = _PLAIN
    message = ""
    g: guard.Guard | None = None
    info: context.RequestInfo | None = None
    frame: FrameType | None = None
    try:
        g = guard._active
        info = context.on_loop() if g is not None and g.traps != "off" else None
        if g is not None and info is not None:
            if spec.skip is not None and spec.skip(*args, **kwargs):
                plan = _QUIET
            else:
                frame = sys._getframe(2)
                if exempt(frame) or (g.traps == "raise" and g.allowed(frame)):
                    # The allowlist is applied by Guard.record (which counts what it
                    # drops); raise mode must not raise where blocking is allowed.
                    plan = _QUIET
                elif g.traps == "raise":
                    message = _report(g, info, frame, spec.name, spec.family, None, "raise")
                    plan = _RAISE
                else:
                    plan = _TIMED
    except Exception as exc:  # our bookkeeping, never the app's call
        _failed(spec, exc)
        return call(*args, **kwargs)
    if plan == _PLAIN:
        return call(*args, **kwargs)
    _tls.inside = True  # nested traps and audit events belong to this call
    try:
        if plan == _QUIET:
            return call(*args, **kwargs)
        if plan == _RAISE:
            raise BlockingCallError(message)  # the user asked for it: traps="raise"
        start = real.perf_counter()
        try:
            return call(*args, **kwargs)
        finally:
            end = real.perf_counter()
            try:
                assert g is not None and info is not None and frame is not None
                recent_blocks.append((info.thread, start, end))
                _report(g, info, frame, spec.name, spec.family, (end - start) * 1000.0, "timed")
            except Exception as exc:
                _failed(spec, exc)
    finally:
        _tls.inside = False


class _Unbound:
    """The trap of a builtin function: called like it, and like it never bound as a method.

    ``class C: pause = time.sleep`` then ``C().pause(0.01)`` sleeps, as without the
    plugin. ``__get__`` returns the trap itself (so ``inspect.isroutine`` holds, as for the
    builtin); ``functools.update_wrapper`` keeps the name, doc and ``__wrapped__``, so
    ``inspect.signature`` is the builtin's; pickling refers to it by name, as for a builtin.
    """

    def __init__(self, spec: _Spec, link: patching.Link) -> None:
        self._spec = spec
        self._link = link
        functools.update_wrapper(self, link.next)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if guard._active is None or _request.get() is None:  # fast path: nothing to check
            return self._link.next(*args, **kwargs)
        return _through(self._spec, self._link.next, args, kwargs)

    def __get__(self, obj: object, objtype: type | None = None) -> _Unbound:
        return self

    def __getattr__(self, name: str) -> Any:
        # What update_wrapper does not copy (``__self__``, ``__text_signature__``, ...) is
        # the builtin's.
        if name == "__wrapped__":
            raise AttributeError(name)
        return getattr(self.__wrapped__, name)

    def __reduce__(self) -> tuple[Any, ...]:
        # By name, as the builtin pickles: ``posix.read`` for ``os.read``.
        wrapped = self.__wrapped__
        return (getattr, (_ModuleRef(wrapped.__module__), wrapped.__qualname__))

    def __repr__(self) -> str:
        return f"<stallguard trap of {self.__wrapped__!r}>"


class _ModuleRef:
    """Pickles as ``importlib.import_module(name)`` (a module cannot be pickled itself)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __reduce__(self) -> tuple[Any, ...]:
        return (importlib.import_module, (self.name,))


def _bound_trap(spec: _Spec, link: patching.Link) -> Callable[..., Any]:
    """The trap of a Python function or a method: a function, so it binds as they do."""

    @functools.wraps(link.next)
    def trap(*args: Any, **kwargs: Any) -> Any:
        if guard._active is None or _request.get() is None:  # fast path: nothing to check
            return link.next(*args, **kwargs)
        return _through(spec, link.next, args, kwargs)

    return trap


def _trap(spec: _Spec) -> Callable[[patching.Link], Any]:
    """``make`` for :meth:`patching.Patches.wrap`: bind exactly when the original binds."""

    def make(link: patching.Link) -> Any:
        if hasattr(type(link.next), "__get__"):
            return _bound_trap(spec, link)
        return _Unbound(spec, link)

    return make


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


# -- sqlite3 -------------------------------------------------------------------------------

_SQLITE_STATEMENTS = _Spec("sqlite3", "sqlite3", "sqlite3")


class _SqliteConnect(_Unbound):
    """``sqlite3.connect``: trapped as a call, and the connection it makes gets our trace
    callback, so its statements are seen without changing its type."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if guard._active is None or _request.get() is None:
            conn = self._link.next(*args, **kwargs)
        else:
            conn = _through(self._spec, self._link.next, args, kwargs)
        _observe(conn, args, kwargs)
        return conn


def _observe(conn: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Give a new connection our trace callback, unless code of the user's may have set one
    or it can never run on an event loop.

    ``sqlite3.Connection`` and factory classes that do not define ``__init__`` ran no code
    of the user's; a factory with its own ``__init__`` (or a factory that is not a class)
    may have set a trace callback, which cannot be read back: those are left alone. So is
    a connection made in a worker thread with ``check_same_thread`` on (aiosqlite's, a
    ``def`` endpoint's): only that thread may use it, and no loop runs there.

    The callback stays for the connection's life (taking it off again could remove one the
    user set since, and from another thread could deadlock with a statement starting);
    while no guard is active it returns at once. What remains is sqlite3's own cost of a
    trace callback: it expands the bound parameters into the statement text first.
    """
    try:
        factory = kwargs.get("factory", args[5] if len(args) > 5 else sqlite3.Connection)
        same_thread = kwargs.get("check_same_thread", args[4] if len(args) > 4 else True)
        if (
            isinstance(factory, type)
            and type(conn) is factory
            and factory.__init__ is sqlite3.Connection.__init__
            and (not same_thread or _loop_may_run_here())
        ):
            connection: Any = conn
            connection.set_trace_callback(_sqlite_trace)
    except Exception as exc:
        patching.hook_failed(OWNER, "sqlite3", "sqlite3 connections", exc)


def _loop_may_run_here() -> bool:
    """The main thread (where pytest runs the test's loop), or a thread running a loop."""
    if threading.current_thread() is threading.main_thread():
        return True
    if asyncio_running_loop() is not None:
        return True
    trio = sys.modules.get("trio")
    in_trio_run = getattr(getattr(trio, "lowlevel", None), "in_trio_run", None)
    return bool(in_trio_run()) if in_trio_run is not None else False


# The BEGIN sqlite3 issues before a write in its default transaction handling takes no
# lock (a deferred transaction): not a wait, and not a second finding for the write's line.
_LOCK_FREE_BEGINS = frozenset({"BEGIN ", "BEGIN", "BEGIN DEFERRED"})


def _sqlite_trace(statement: str) -> None:
    """sqlite3 calls this as each statement starts, on the thread running it."""
    if guard._active is None or _request.get() is None or not _armed:
        return
    if _SQLITE_STATEMENTS.off:
        return
    if getattr(_tls, "inside", False) or statement in _LOCK_FREE_BEGINS:
        return
    try:
        g = guard._active
        if g is None or g.traps == "off":
            return
        info = context.on_loop()
        if info is None:
            return
        frame = sys._getframe(1)  # the Python code that called execute/commit/...
        if exempt(frame):
            return
        _report(g, info, frame, "sqlite3", "sqlite3", None, "trace")
    except Exception as exc:  # sqlite3 would swallow it; note it and stop watching
        _failed(_SQLITE_STATEMENTS, exc)


# -- installing ------------------------------------------------------------------------------


def _wrap(target: Any, attr: str, spec: _Spec) -> None:
    _patches.wrap(target, attr, _trap(spec))


def _patch_all() -> None:
    _SQLITE_STATEMENTS.off = False
    _wrap(time, "sleep", _Spec("time.sleep", "time.sleep", "time", _sleep_skip))
    for attr in _SOCKET_METHODS:
        _wrap(socket.socket, attr, _Spec(f"socket.{attr}", "socket", "socket", _nonblocking_socket))
    _wrap(socket, "getaddrinfo", _Spec("socket.getaddrinfo", "dns", "socket", _numeric_skip))
    for attr in ("gethostbyname", "gethostbyname_ex"):
        _wrap(socket, attr, _Spec(f"socket.{attr}", "dns", "socket"))
    # One object for builtins.open and io.open (the same builtin), as without the plugin.
    open_link = _patches.link(builtins, "open")
    trapped_open = _trap(_Spec("open", "open", "io"))(open_link)
    _patches.set(builtins, "open", trapped_open, open_link)
    if io.open is open_link.next:
        _patches.set(io, "open", trapped_open)
    else:  # someone else's layer on io.open only: a trap of its own
        _wrap(io, "open", _Spec("open", "open", "io"))
    _wrap(os, "read", _Spec("os.read", "os.read", "os", _fd_skip))
    _wrap(os, "write", _Spec("os.write", "os.write", "os", _fd_skip))
    _wrap(os, "system", _Spec("os.system", "os.system", "os"))
    connect_spec = _Spec("sqlite3.connect", "sqlite3", "sqlite3")
    connect_link = _patches.link(sqlite3, "connect")
    trapped_connect = _SqliteConnect(connect_spec, connect_link)
    _patches.set(sqlite3, "connect", trapped_connect, connect_link)
    if sqlite3.dbapi2.connect is connect_link.next:
        _patches.set(sqlite3.dbapi2, "connect", trapped_connect)
    else:
        _patches.wrap(
            sqlite3.dbapi2, "connect", lambda link: _SqliteConnect(connect_spec, link)
        )
    for attr in ("__init__", "wait", "communicate"):
        name = "subprocess.Popen" if attr == "__init__" else f"subprocess.Popen.{attr}"
        _wrap(subprocess.Popen, attr, _Spec(name, "subprocess", "subprocess"))
    for attr in _SUBPROCESS_FUNCTIONS:
        _wrap(subprocess, attr, _Spec(f"subprocess.{attr}", "subprocess", "subprocess"))
    _wrap(
        logging.Handler,
        "handle",
        _Spec("logging handler", "logging", "logging", _handler_skip),
    )
    _patches.wrap(threading.Thread, "start", _timed_thread_start)


def _timed_thread_start(link: patching.Link) -> Callable[..., Any]:
    """``Thread.start`` waits until the new thread has run; on a loaded machine that is
    30-40 ms on the loop the first time a library starts a worker (anyio's threadpool,
    ``anyio.Path``). Not the app's stall: the time goes to :data:`recent_blocks`, which
    the loop watch does not count against the step."""

    @functools.wraps(link.next)
    def start(self: threading.Thread) -> None:
        if guard._active is None:
            return link.next(self)  # type: ignore[no-any-return]
        began = real.perf_counter()
        try:
            return link.next(self)  # type: ignore[no-any-return]
        finally:
            recent_blocks.append((threading.get_ident(), began, real.perf_counter()))

    return start


# -- audit hook ----------------------------------------------------------------------------

# event -> (name in findings, family, stdlib module)
_AUDIT_EVENTS: dict[str, tuple[str, str, str]] = {
    "open": ("open", "open", "io"),
    "socket.connect": ("socket.connect", "socket", "socket"),
    "socket.getaddrinfo": ("socket.getaddrinfo", "dns", "socket"),
    "socket.gethostbyname": ("socket.gethostbyname", "dns", "socket"),
    "subprocess.Popen": ("subprocess.Popen", "subprocess", "subprocess"),
    "os.posix_spawn": ("os.posix_spawn", "subprocess", "os"),
    "os.system": ("os.system", "os.system", "os"),
    "sqlite3.connect": ("sqlite3.connect", "sqlite3", "sqlite3"),
}


def _audit(event: str, args: tuple[Any, ...]) -> None:
    # Called for every audit event of the process, forever (a hook cannot be removed):
    # the event name first (sys._getframe below raises an audit event of its own).
    if event not in _AUDIT_EVENTS or not _armed or guard._active is None:
        return
    if _request.get() is None:  # not for a request, the lifespan or a window
        return
    if event in _audit_off or getattr(_tls, "inside", False):
        return
    try:
        message = _audit_check(event, args)
    except Exception as exc:  # our bookkeeping: the audited call goes on
        _audit_off.add(event)
        patching.hook_failed(OWNER, _AUDIT_EVENTS[event][2], f"the {event} audit event", exc)
        return
    if message is not None:
        raise BlockingCallError(message)  # the user asked for it: traps="raise"


def _audit_check(event: str, args: tuple[Any, ...]) -> str | None:
    """Record the event if it is a finding; the message when raise mode must raise."""
    g = guard._active
    if g is None or g.traps == "off":
        return None
    info = context.on_loop()
    if info is None:
        return None
    if event == "socket.connect" and args and _nonblocking_socket(args[0]):
        return None
    if (
        event == "open"
        and len(args) > 2
        and isinstance(args[2], int)
        and args[2] & getattr(os, "O_NONBLOCK", 0)
    ):
        return None
    frame = sys._getframe(2)  # 0: here, 1: _audit, 2: the code making the call
    while frame.f_code.co_filename.startswith(_PLUGIN_DIR) and frame.f_back is not None:
        frame = frame.f_back  # pragma: no cover - our own opens are not made on the loop
    if exempt(frame) or (g.traps == "raise" and g.allowed(frame)):
        return None
    name, family, _ = _AUDIT_EVENTS[event]
    if g.traps == "raise":
        return _report(g, info, frame, name, family, None, "raise")
    _report(g, info, frame, name, family, None, "audit")
    return None
