"""The loopback upstream: a real HTTP/1.1 server on 127.0.0.1 (``slow_upstream.serve()``).

The standard library's ``ThreadingHTTPServer``: one daemon thread accepts, one daemon
thread per client connection answers, with keep-alive so httpx pools keep warm
connections. Nothing here runs on the caller's thread or loop: the server is built in its
own thread, and a call's delay is a ``selectors`` wait on the connection and a stop socket
(a C-level timeout on the real clock, out of reach of a patched ``time.sleep``, freezegun
and the traps). That wait also sees a client that gives up (the call is ``cancelled``) and
:meth:`Server.close`, which is bounded and leaves no thread running.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..clock import real
from .calls import Call, CallLog, Knobs, Recorded, quietly

__all__ = ["Server", "serve"]

# How often the accept loop looks at the stop flag (the longest close() waits for it).
_POLL_S = 0.05
# Bursts connect all at once; the socketserver default backlog (5) drops SYNs, which the
# client retries only after a second.
_BACKLOG = 256


class _Stopped(Exception):
    """Raised from the accept loop's ``service_actions`` to leave ``serve_forever``."""


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = _BACKLOG

    def __init__(self, owner: Server) -> None:
        self.owner = owner
        self.lock = threading.Lock()
        self.threads: set[threading.Thread] = set()  # connection threads still running
        self.sockets: set[socket.socket] = set()  # client connections open now
        # Readable (at EOF) once close() starts: every delay wait selects on it.
        self.stop_r, self.stop_w = socket.socketpair()
        try:
            super().__init__(("127.0.0.1", 0), _Handler)
        except BaseException:
            self.stop_r.close()
            self.stop_w.close()
            raise

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (socket.getfqdn): a DNS lookup
        # that can take seconds; the name is not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def service_actions(self) -> None:
        if self.owner._closing.is_set():
            raise _Stopped

    def process_request(self, request: Any, client_address: Any) -> None:
        """One daemon thread per connection, tracked so close() can join it."""
        thread = threading.Thread(
            target=self._connection,
            args=(request, client_address),
            name=f"stallguard-upstream-{self.server_port}-conn",
            daemon=True,
        )
        with self.lock:
            if self.owner._closing.is_set():
                self.shutdown_request(request)
                return
            self.threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self.lock:
                self.threads.discard(thread)
            self.shutdown_request(request)
            raise

    def _connection(self, request: Any, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self.lock:
                self.threads.discard(threading.current_thread())

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that left mid-write, a bad request: nothing to print."""

    def opened(self, connection: socket.socket) -> None:
        with self.lock:
            if not self.owner._closing.is_set():
                self.sockets.add(connection)
                return
        _shut(connection)

    def closed(self, connection: socket.socket) -> None:
        with self.lock:
            self.sockets.discard(connection)

    def stop(self) -> None:
        """Wake every delay wait and every keep-alive read (owner._closing is set)."""
        with self.lock:
            sockets = list(self.sockets)
        with contextlib.suppress(OSError):
            self.stop_w.shutdown(socket.SHUT_WR)
        for connection in sockets:
            _shut(connection)

    def wait(self, connection: socket.socket, seconds: float) -> str:
        """Wait ``seconds`` on the real clock: ``"done"``, or ``"gone"`` if the client
        closed the connection meanwhile, or ``"closing"`` if the server is closing."""
        deadline = real.monotonic() + seconds
        with selectors.DefaultSelector() as selector:
            selector.register(self.stop_r, selectors.EVENT_READ, "stop")
            selector.register(connection, selectors.EVENT_READ, "client")
            while True:
                if self.owner._closing.is_set():
                    return "closing"
                remaining = deadline - real.monotonic()
                if remaining <= 0:
                    return "done"
                for key, _ in selector.select(remaining):
                    if key.data == "stop":
                        return "closing"
                    try:
                        peeked = connection.recv(1, socket.MSG_PEEK | _DONTWAIT)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError:
                        return "gone"
                    if not peeked:
                        return "gone"
                    # The client sent more (a pipelined request): only the stop matters now.
                    selector.unregister(connection)


_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)


def _shut(connection: socket.socket) -> None:
    with contextlib.suppress(OSError):
        connection.shutdown(socket.SHUT_RDWR)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    disable_nagle_algorithm = True  # headers and body are two writes
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.opened(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.closed(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: no line on stderr per request."""

    def answer(self) -> None:
        owner = self.server.owner
        self._read_body()
        call = Call(
            method=self.command, url=owner.url + self.path, request=None,
            started=real.perf_counter(),
        )
        log = owner._log
        quietly("the served upstream's call log", log.begin, call)
        quietly("the served upstream's call log", log.enter)
        left = False
        try:
            delay, failed = owner._knobs.draw()
            state = self.server.wait(self.connection, delay) if delay > 0 else "done"
            if state != "done":
                if state == "gone":  # the client gave up while we were slow
                    quietly("the served upstream's call log", log.end, call, "cancelled")
                self.close_connection = True
                return
            status, body, extra = owner._knobs.body(failed)
            # Recorded (and the call out of flight) before the write: the client may read
            # the response, and the test look at .calls, before the write returns here.
            outcome = "failed" if failed else "ok"
            quietly("the served upstream's call log", log.end, call, outcome, status)
            quietly("the served upstream's call log", log.leave)
            left = True
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for name, value in extra:
                self.send_header(name.decode("latin-1"), value.decode("latin-1"))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        finally:
            if not left:
                quietly("the served upstream's call log", log.leave)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = answer

    def _read_body(self) -> None:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                self.rfile.read(size + 2)  # the chunk and its CRLF
        length = int(self.headers.get("Content-Length", "0") or "0")
        if length:
            self.rfile.read(length)


class Server(Recorded):
    """A real HTTP/1.1 server on 127.0.0.1 with keep-alive; see :func:`serve`."""

    def __init__(self, knobs: Knobs) -> None:
        self._knobs = knobs
        self._log = CallLog()
        self._httpd: _HTTPServer | None = None
        self._started = threading.Event()
        self._closing = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(
            target=self._run, name="stallguard-upstream-server", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Client connections open right now."""
        httpd = self._httpd
        return 0 if httpd is None else len(httpd.sockets)

    def threads(self) -> list[threading.Thread]:
        """The server's threads still running (the accept loop and one per connection)."""
        httpd = self._httpd
        found = [self._thread] if self._thread.is_alive() else []
        if httpd is not None:
            with httpd.lock:
                found += [t for t in httpd.threads if t.is_alive()]
        return found

    def __repr__(self) -> str:
        return f"<Server {self.url} calls={len(self._log.calls)}>"

    def _start(self, timeout: float = 10.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout):
            self.close()
            raise RuntimeError(f"stallguard: the upstream server did not start in {timeout} s")
        if self._error is not None:
            self.close()
            raise RuntimeError(f"stallguard: the upstream server failed: {self._error!r}")

    def _run(self) -> None:
        try:
            httpd = _HTTPServer(self)
        except BaseException as exc:  # reported to the starter
            self._error = exc
            self._started.set()
            return
        self._httpd = httpd
        self.port = int(httpd.server_port)
        self._thread.name = f"stallguard-upstream-{self.port}"
        self._started.set()
        try:
            httpd.serve_forever(poll_interval=_POLL_S)
        except _Stopped:
            pass
        except BaseException as exc:  # lost at close: nothing is waiting for it
            self._error = exc
        finally:
            httpd.server_close()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the server and join its threads, all within ``timeout`` (real clock);
        idempotent. In-flight calls are dropped (their outcome stays ``pending``)."""
        deadline = real.monotonic() + timeout
        self._closing.set()
        httpd = self._httpd
        if httpd is not None:
            httpd.stop()
        if self._thread.is_alive():
            self._thread.join(max(0.0, deadline - real.monotonic()))
        if httpd is None:
            return
        with httpd.lock:
            threads = list(httpd.threads)
        for thread in threads:
            thread.join(max(0.0, deadline - real.monotonic()))
        if not self.threads():
            httpd.stop_r.close()
            httpd.stop_w.close()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve(
    *,
    delay: float = 0.0,
    jitter: float = 0.0,
    status: int = 200,
    json: Any = None,
    fail_rate: float = 0.0,
    fail_status: int = 503,
    seed: int | None = None,
) -> Server:
    """Start a real HTTP/1.1 server on 127.0.0.1 (ephemeral port) and return it running.

    Each request is answered after ``delay`` (+ uniform ``jitter``) seconds with ``status``
    and ``json``; ``fail_rate`` of them get ``fail_status``. Keep-alive is honoured, so
    httpx pools keep warm connections to it. Callable from sync code and from inside a
    running asyncio or trio loop (it runs in its own threads); stop it with
    :meth:`Server.close` (or use it as a context manager).
    """
    knobs = Knobs(
        delay=delay,
        jitter=jitter,
        status=status,
        json=json,
        fail_rate=fail_rate,
        fail_status=fail_status,
        seed=seed,
    )
    server = Server(knobs)
    server._start()
    return server
