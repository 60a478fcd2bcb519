"""The sampling watchdog: a thread that looks at the loop while a long step runs.

It polls about every threshold/4 (between 1 and 50 ms, on the real clock). Where the C
module of the step hooks is built and no other thread could hold the GIL, it polls from C
without the GIL (``_cstep.nap``) and takes the GIL only when its wake has something to do
(a step to sample, an idle loop to read, a loop or thread more): taking the GIL from a
busy loop thread at every poll cost that thread more than the polls. Once the
running step is past half the threshold it reads the step's Context (the request the loop
thread runs for *right now*, or paused) and samples ``sys._current_frames()`` of the loop
thread, keeping the deepest user frame seen while running for a request (the walk stops
at :func:`context.attributed`'s frame, so the test code that called the app is never
named). A C call holding the GIL cannot be sampled while it runs; it is seen right after
it returns: the watchdog samples first on every wake, before anything that releases the
GIL (reading ``/proc``), so it gets in before the loop thread can finish the step.

Why sample the Context: a whole in-process request can run in ONE step that starts and
ends in the test's code (httpx's ASGITransport calls the app inside the test's task), so
the context at the end of the step does not know the request.

GIL starvation ("CPU work moved to a thread"): ``call="gil"`` only with evidence that a
thread held the GIL. At every wake the watchdog takes a :class:`Look` at the other threads
(CPU time from their per-thread clocks, where their innermost frame is; nothing that releases
the GIL). Over a window in which the loop waited for the GIL (the idle loop and the watchdog
both starved past twice the threshold, less the watchdog's own run-queue wait; or a long step
in which the loop thread neither ran nor waited for a CPU, judged by :mod:`.watch`),
:func:`holder` names the thread that held it: threads whose frame moved on ran bytecode,
which needs the GIL, one at a time, with no thread inside a C call running beside them; or
the only thread that ran, inside one call, nearly all the wait (a C call that keeps the
GIL). A thread idle in a blocking wait when the window opens (a worker in ``queue.get()``)
is judged by what it was doing at its end: its CPU was spent after the wait. Threads doing C
work that releases the GIL (argon2, bcrypt, hashlib, zlib) stay inside their call and run
side by side, are caught in the Python code of a function that makes such a call, or get
too small a share of a loaded CPU: no evidence, no finding. The message gives the evidence.
Without per-thread clocks or ``/proc`` schedstat (not Linux) there is no evidence and no
``gil`` finding.
"""

from __future__ import annotations

import asyncio
import contextlib
import dis
import os
import sys
import threading
import time
from types import CodeType, FrameType
from typing import TYPE_CHECKING, Any

from .. import context, guard, patching
from ..clock import real
from ..location import (
    Location,
    is_plugin_file,
    is_user_file,
    library_path,
    relative,
    user_location,
)
from ..model import DOCS
from . import discount, steps

if TYPE_CHECKING:
    from .steps import LoopState
    from .watch import LoopWatch

GIL_ADVICE = (
    "CPU-bound Python in a thread still holds the GIL and starves the loop: use a process "
    "pool, or release the GIL (C extensions that do), or split the work"
)

_CONTEXT_FILE = context.__file__
_ATTRIBUTED_NAME = "stallguard_attributed"


class _Cpu:
    """CPU-time clocks, captured at import (kept off module attributes, like clock.real)."""

    __slots__ = ("clock_gettime_ns", "thread_time_ns")

    def __init__(self) -> None:
        self.clock_gettime_ns = time.clock_gettime_ns
        self.thread_time_ns = time.thread_time_ns


_cpu = _Cpu()
# Per-thread CPU clocks of other threads, read without releasing the GIL (Linux).
_HAS_THREAD_CLOCKS = sys.platform.startswith("linux") and hasattr(time, "clock_gettime_ns")


class Samples:
    """What the watchdog saw of one long step."""

    __slots__ = (
        "depth",
        "guard",
        "inside",
        "inside_n",
        "library",
        "library_depth",
        "outside_after",
        "outside_before",
        "outside_n",
        "request",
    )

    def __init__(self) -> None:
        self.inside: Location | None = None  # deepest user frame inside a request (latest)
        # no user frame on the stack: the innermost sampled frame outside the plugin
        self.library: Location | None = None
        # its depth from the step's boundary: the deepest is kept (a sample taken as the
        # step ends sees only the loop's frame that ran the callback)
        self.library_depth = -1
        self.depth = -1
        # the request when the deepest location was seen (else the latest seen): the
        # response may be sent (label "background") before the step ends
        self.request: str | None = None
        self.guard: guard.Guard | None = None  # active when sampled
        self.inside_n = 0
        self.outside_n = 0
        # When it was last seen outside a request before it was first seen inside one, and
        # first seen outside after it was last seen inside (0.0: not seen): the request's
        # part of the step lies between them.
        self.outside_before = 0.0
        self.outside_after = 0.0

    def request_span(self, start: float, end: float) -> float:
        """At most how long the step ran for requests (from ``start`` to ``end``)."""
        return (self.outside_after or end) - (self.outside_before or start)


def take_samples(st: LoopState, seq: int) -> Samples | None:
    """Loop thread, at the end of step ``seq``: what was sampled of it (and forget it)."""
    with st.lock:
        samples = st.samples if st.sample_seq == seq else None
        st.samples = None
        st.sample_seq = -1
    return samples


def _log_turn(watch: LoopWatch, states: list[LoopState], start: float, end: float) -> None:
    """The watchdog held the GIL from ``start`` to ``end``: when that was long (it was
    preempted holding it), no loop could run meanwhile; their steps are not blamed for it.
    Until it is logged the turn is open (``watch.turn_since``): a loop thread that gets
    the GIL back before the log (a forced switch) sees it as running up to its own end."""
    if end - start > discount.HELD_MIN_S:
        for st in states:
            st.held.append((start, end))
    watch.turn_since = 0.0


# The names of the plugin's own helper threads start so (never a GIL holder worth naming).
HELPER_PREFIX = "stallguard-"


def _running(watch: LoopWatch) -> bool:
    """Whether a loop of ``watch`` is running a step now."""
    return any(st.start for st in list(watch._mine.values()))


def _nap(states: list[LoopState], now: float, interval: float, sample_after: float,
         longest: float) -> float:
    """How long the watchdog sleeps from ``now``: until the running step (the earliest,
    with several loops) is ``sample_after`` old, when it may first need a sample; a step
    that starts later cannot need one sooner than ``sample_after`` after its start, so an
    idle loop gives the ``longest`` nap (``sample_after``, or two intervals for a large
    threshold). Never less than ``interval`` (the cadence of the samples of a long step):
    a long step is first sampled between ``sample_after`` and ``sample_after + interval``
    into it, as with a fixed ``interval``, while a loop busy with short steps wakes the
    watchdog (which takes the GIL from it) up to half as often."""
    due = now + longest
    for st in states:
        start = st.start
        if start and st.active and start + sample_after < due:
            due = start + sample_after
    return min(max(due - now, interval), longest)


# The longest the watchdog polls from C before its Python turn comes round anyway (new
# threads that are not in threading._active, which it cannot see from there).
C_NAP_LIMIT_S = 0.25
# With more loops, or more threads that could hold the GIL, than this, the watchdog sleeps
# in Python (the nap in C reads each one at every look).
C_NAP_MAX_THREADS = 64


class Watchdog:
    """The sampling thread of one :class:`~.watch.LoopWatch`."""

    def __init__(self, watch: LoopWatch) -> None:
        self.watch = watch
        self.thread: threading.Thread | None = None
        self._stopping = False
        self._stop_flag = bytearray(1)  # _stopping, for the nap in C (it has no GIL)
        self._rq_fd = -1  # the watchdog thread's own schedstat (watchdog thread only)
        self._clocks: dict[int, int] = {}  # thread ident -> its CPU clock (watchdog only)
        # the threads look() last saw, and which of them are the plugin's helpers
        self._seen: frozenset[int] = frozenset()
        self._helpers: set[int] = set()

    def start(self) -> None:
        if self.thread is not None:
            return
        self._stopping = False
        self._stop_flag[0] = 0
        self.thread = threading.Thread(
            target=self._run, name="stallguard-loopwatch", daemon=True
        )
        self.thread.start()

    def stop(self, timeout: float) -> None:
        """Stop the thread and join it, waiting at most ``timeout`` seconds."""
        thread, self.thread = self.thread, None
        if thread is None:
            return
        self._stopping = True
        self._stop_flag[0] = 1
        if thread is not threading.current_thread():
            thread.join(timeout=timeout)

    def _run(self) -> None:
        try:
            self._watch(self.watch.interval_s)
        except Exception as exc:
            # A bug of ours: the loops run on unwatched by this thread, never broken.
            kinds = sorted({st.kind for st in list(self.watch._mine.values())})
            patching.hook_failed(
                steps.OWNER, kinds[0] if kinds else "asyncio", "its loop (watchdog)", exc
            )

    def _watch(self, interval: float) -> None:
        # Our own run-queue wait (waiting for a CPU), to tell it from waiting for the GIL.
        # -2: to open (in the loop, when no step runs: opening releases the GIL)
        self._rq_fd = -2 if self.watch.gil else -1
        try:
            self._watch_loop(interval)
        finally:
            fd, self._rq_fd = self._rq_fd, -1
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _watch_loop(self, interval: float) -> None:
        watch = self.watch
        sample_after = watch._sample_after_s
        rq0 = -1  # our run-queue wait (ns) before the sleep, -1 unknown
        while not self._stopping:
            # Before taking the time: reading /proc releases the GIL, and taking it back
            # may wait; that wait is not the sleep's lateness. Not while a loop runs a step
            # (as for the loop's own readings): the step could run to its end unsampled.
            # The last reading is kept instead; being older, it can only count more of the
            # lateness as waiting for a CPU, never less. A step can start while the GIL is
            # released (the first request right after attach): each release is followed at
            # once by the sample it may need, before anything else can release the GIL.
            if self._rq_fd == -2 and not _running(watch):
                released = real.perf_counter()
                self._rq_fd = discount.open_schedstat(threading.get_native_id())
                self._sample_if_late(released)
            looked = watch.turn_since = real.perf_counter()
            before = self.look()  # the baseline of the window this sleep opens
            # Our own run-queue wait tells a late wake's wait for a CPU from one for the
            # GIL: only needed when another thread could hold the GIL (a look was taken).
            rq0 = -1
            if before is not None and self._rq_fd >= 0 and not _running(watch):
                released = real.perf_counter()
                rq0 = discount.run_queue_ns(self._rq_fd)  # releases the GIL
                self._sample_if_late(released)
            asked = real.perf_counter()
            states = list(watch._mine.values())
            _log_turn(watch, states, looked, asked)
            nap = _nap(states, asked, interval, sample_after, watch.nap_max_s)
            nap, from_c = self._sleep(states, before, asked, nap)
            now = watch.turn_since = real.perf_counter()
            states = list(watch._mine.values())
            # Sample first, with the GIL just taken: anything that releases it (reading
            # /proc) lets the loop thread finish the step, and the request, unsampled.
            # Woke late: the GIL was held (a C call on the loop, or a pure-Python step past
            # the switch interval): sample at once, the step may be about to end. So too
            # after the nap in C, which took the GIL for a step early (taking it again for
            # the regular sample would cost a switch interval).
            late = from_c or now - asked - nap > sample_after
            idle_since = self._sample_due(states, now, late, asked + nap)
            starved = now - idle_since
            if before is not None and states and starved > 2 * watch._threshold_s:
                # Neither the loop nor this thread ran for that long: maybe another thread
                # held the GIL. Checked before reading /proc too: the thread that held the
                # GIL would run on meanwhile.
                self._gil_check(starved, now - asked - nap, rq0, before)
            released = real.perf_counter()
            _log_turn(watch, states, now, released)
            for st in states:
                if st.rq_fd == -2:
                    st.rq_fd = discount.open_schedstat(st.native_id)  # releases the GIL
                    if not st.active and st.rq_fd >= 0:  # detached meanwhile
                        discount.close_schedstat(st)
                elif st.rq_fd >= 0 and st.active and not st.start:
                    # Only while the loop runs no step: a busy loop thread takes its own
                    # readings between steps (steps._end), and taking the GIL back from it
                    # costs a switch interval (5 ms), here before the next sample and for
                    # the loop a forced hand-over of the GIL.
                    discount.read_run_queue(st)  # releases the GIL
                else:
                    continue
                # The GIL was released: a step (a C call) may have run meanwhile and we just
                # got the GIL back at its end: sample again before it can end.
                back = watch.turn_since = real.perf_counter()
                self._sample_due(states, back, back - released > sample_after)
                released = real.perf_counter()
                _log_turn(watch, states, back, released)

    def _sleep(self, states: list[LoopState], before: Look | None, asked: float, nap: float
               ) -> tuple[float, bool]:
        """Sleep ``nap`` seconds from ``asked``; or, where the C module is built and no
        other thread could hold the GIL (``before``, the look just taken, is None), in C
        without the GIL until there is something to do (:func:`_cstep.nap`). Returns how
        long the sleep was meant to last, and whether it was the nap in C."""
        cstep = steps._cstep
        if cstep is None or not states or len(states) > C_NAP_MAX_THREADS:
            real.sleep(nap)
            return nap, False
        watch = self.watch
        if before is not None:
            # Another thread could hold the GIL. The nap in C can end when one runs (its CPU
            # clock moves on), but one paired run measured capture lower that way (a 10 ms
            # hold 81 of 90 against 87 with this sleep; not yet told from noise): the
            # watchdog keeps its Python polls then.
            real.sleep(nap)
            return nap, False
        cpus: tuple[tuple[int, int], ...] = ()
        active = getattr(threading, "_active", None)
        dicts = (watch._mine, active) if isinstance(active, dict) else (watch._mine,)
        # A step is worth the GIL from half an interval on: asked for then, the GIL comes
        # (a switch interval later at worst) before the step is past half the threshold
        # plus that, as with a Python wake at every interval; steps shorter than that
        # (nearly all of a healthy app's) never have the watchdog take the GIL from them.
        planned: float = cstep.nap(
            tuple(states), watch.interval_s, watch.interval_s / 2.0, watch._sample_after_s,
            C_NAP_LIMIT_S, self._stop_flag, dicts, cpus,
        )
        return planned - asked, True

    def _sample_if_late(self, released: float) -> None:
        """Right after taking back the GIL released at ``released``: when it came back late,
        a step (a C call holding the GIL) started meanwhile and may be about to end:
        sample it now, as on a late wake."""
        back = real.perf_counter()
        if back - released > self.watch._sample_after_s:
            self._sample_due(list(self.watch._mine.values()), back, True)

    def _sample_due(
        self,
        states: list[LoopState],
        now: float,
        late: bool,
        idle_since: float = 0.0,
    ) -> float:
        """Sample every running step past half the threshold (if ``late``, any running
        step but a young one: see LoopWatch.young_s); return when the loops were last seen
        running (for the GIL check)."""
        sample_after = self.watch._sample_after_s
        young = self.watch.young_s
        for st in states:
            start = st.start
            if start:
                idle_since = now
                age = now - start
                if st.active and (age > sample_after or (late and age >= young)):
                    sample(st, start, st.seq)
            elif st.end and now - st.end > discount.COLD_IDLE_S:
                # (a loop that never ran a step is not idle: a TestClient's new loop)
                st.idle_seen = now
            idle_since = max(idle_since, st.end)
        return idle_since

    def look(self) -> Look | None:
        """Watchdog, at every wake: note each thread's CPU time and where its Python
        frame is (:class:`Look`), the baseline for judging the next window (kept in the
        watch's short history for the loop thread's own judgement of a long step). Nothing
        here releases the GIL. None when only the loops and the watchdog run."""
        watch = self.watch
        if not watch.gil or not _HAS_THREAD_CLOCKS:
            return None
        frames = sys._current_frames()
        try:
            if frames.keys() <= self._ours(frames):
                # only the loops, us and the plugin's helper threads (which never hold the
                # GIL for long): nobody else could hold it
                return None
            look = take_look(frames, self._clocks, threading.get_ident())
        finally:
            del frames
        watch._looks.append(look)
        return look

    def _ours(self, frames: dict[int, FrameType]) -> set[int]:
        """The threads of ``frames`` that are the plugin's own: the loops' (they are the
        ones waiting), this one, and the helper threads named ``stallguard-...`` (the bounded
        waits' timer, the upstream servers), looked up again whenever the threads change."""
        ours = {st.thread for st in list(self.watch._mine.values())}
        ours.add(threading.get_ident())
        if frames.keys() != self._seen:
            self._seen = frozenset(frames)
            self._helpers = {
                t.ident for t in threading.enumerate()
                if t.ident is not None and t.name.startswith(HELPER_PREFIX)
            }
        return ours | self._helpers

    def _gil_check(self, starved: float, late: float, rq0: int, before: Look | None) -> None:
        """Nothing ran on the loop for ``starved`` seconds and the watchdog woke ``late``
        seconds late: name the thread that held the GIL, if the evidence shows one
        (:func:`holder`; ``rq0``: our run-queue wait before the sleep, ns, -1 unknown;
        ``before``: the look taken before the sleep)."""
        g = guard.active()
        if g is None or before is None:
            return
        me = threading.get_ident()
        skip = {me} | {st.thread for st in list(self.watch._mine.values())}
        # Where the threads are and their CPU, first: reading /proc releases the GIL.
        frames = sys._current_frames()
        try:
            after = take_look(frames, self._clocks, me)
            fd = self._rq_fd
            if rq0 < 0 or fd < 0:
                return  # without our own run-queue wait, waiting for a CPU is not ruled out
            rq1 = discount.run_queue_ns(fd)  # releases the GIL
            if rq1 < 0:
                return
            cpu_wait = min(max(rq1 - rq0, 0) / 1e9, late)
            waited = min(starved, late - cpu_wait)
            if waited <= 2.0 * self.watch._threshold_s:
                return
            found = holder(before, after, skip, waited)
            if found is None:
                return
            ident, evidence = found
            frame = frames.get(ident)
            if not has_user_frame(frame):
                return
            location = user_location(frame)
        finally:
            del frames
        why = (
            f"the watchdog woke {late * 1000.0:.1f} ms late, {cpu_wait * 1000.0:.1f} ms of it "
            f"waiting for a CPU and {waited * 1000.0:.1f} ms for the GIL; {evidence}"
        )
        record_gil(self.watch, g, waited, location, why, None)


def record_gil(
    watch: LoopWatch,
    g: guard.Guard,
    waited: float,
    location: Location,
    why: str,
    request: str | None,
) -> None:
    """Record a ``call="gil"`` loop stall: a thread held the GIL for ``waited`` seconds at
    ``location``, ``why`` being the evidence in words."""
    file, line, function = location
    message = (
        f"A worker thread held the GIL for {waited * 1000.0:.1f} ms at {file}:{line} "
        f"({function}): the event loop could not run meanwhile ({why}; "
        f"{GIL_ADVICE}). See {DOCS}loop-stall"
    )
    watch.stalls += 1
    g.record(
        "loop-stall",
        message,
        location=location,
        request=request,
        duration_ms=waited * 1000.0,
        call="gil",
    )


# -- evidence of a GIL holder ------------------------------------------------------------------


class Look:
    """Each thread's CPU time (ns) and where its innermost Python frame was, at ``t``
    (real.perf_counter): ident -> (cpu, frame id, instruction offset, what it was doing:
    one of :data:`PYTHON`, :data:`KEEPS`, :data:`RELEASES`, :data:`CALL`)."""

    __slots__ = ("t", "threads")

    def __init__(self, t: float, threads: dict[int, tuple[int, int, int, str]]) -> None:
        self.t = t
        self.threads = threads


# What a thread's innermost frame was doing when looked at:
PYTHON = "python"  # stopped between bytecodes (not at a call): it was running Python code
KEEPS = "keeps"  # inside a C call known to keep the GIL (json, re, sorted, pickle)
RELEASES = "releases"  # inside a C call known to release it for its work (hashing, I/O)
WAITS = "waits"  # inside a blocking wait that releases it and uses no CPU (queue.get, sleep)
CALL = "call"  # inside some other C call: either
# Caught running Python code in a function that itself calls a GIL-releasing function
# (hashing, compression): its CPU may have gone to that call, it is no evidence.
NEAR_RELEASE = "near-release"

# Names on the line of a call (the callable as the source names it) that tell a C call
# which releases the GIL for its work, or keeps it. Looked up in that order.
_RELEASING_NAMES = frozenset(
    {
        "pbkdf2_hmac", "scrypt", "hashpw", "checkpw", "kdf", "gensalt",
        "argon2_hash", "argon2_verify", "hash_secret", "hash_secret_raw", "verify_secret",
        "compress", "decompress", "flush", "update", "digest", "hexdigest", "file_digest",
        "sha1", "sha224", "sha256", "sha384", "sha512", "md5", "blake2b", "blake2s",
        "sha3_256", "sha3_512", "crc32", "adler32",
        "read", "readinto", "write",
    }
)
# Blocking waits (an idle worker in ``queue.get()``, a sleep) and socket calls (a worker
# waking the loop through its self-pipe): the thread uses little or no CPU in them, so a
# thread seen in one at a window's start spent its CPU in the window on what it did after:
# it is judged by what it was doing at the window's end.
_WAITING_NAMES = frozenset(
    {
        "sleep", "recv", "recv_into", "recvfrom", "send", "sendall", "sendto", "select",
        "poll", "connect", "accept", "acquire", "wait", "join", "get",
    }
)
_RELEASING_MODULES = ("hashlib", "zlib", "bz2", "lzma", "argon2", "bcrypt", "nacl", "ssl")
_KEEPING_NAMES = frozenset(
    {
        "dumps", "loads", "dump", "load", "encode", "decode", "iterencode", "raw_decode",
        "sub", "subn", "findall", "finditer", "search", "match", "fullmatch", "split",
        "sorted", "sort", "sum", "deepcopy",
        # quick builtins a pure-Python loop calls (it is made to give the GIL up right
        # after them): never release it
        "thread_time", "perf_counter", "monotonic", "time", "process_time", "len",
        "isinstance", "range", "append", "extend", "pop", "min", "max", "abs", "int",
        "float", "str", "repr", "getattr", "setattr", "hasattr", "format", "replace",
        "strip", "items", "keys", "values", "randint", "random", "choice",
    }
)
# Modules whose C calls keep the GIL: a thread at a call in their Python code (the
# encoder's call of its C scanner) is inside such a call.
_KEEPING_MODULES = ("json/", "re/", "pickle.py", "copy.py", "csv.py")
_CALL_OPS = frozenset(
    name
    for name in dis.opname
    if name.startswith(("CALL", "PRECALL")) or name in ("BEFORE_WITH", "SETUP_WITH", "IMPORT_NAME")
)
_kinds: dict[tuple[CodeType, int], str] = {}


def doing(frame: FrameType) -> str:
    """What the thread whose innermost frame is ``frame`` was doing (see :class:`Look`):
    the instruction it stopped at, and for a call the names on its line before it."""
    code = frame.f_code
    lasti = frame.f_lasti
    key = (code, lasti)
    kind = _kinds.get(key)
    if kind is not None:
        return kind
    raw = code.co_code
    op = dis.opname[raw[lasti]] if 0 <= lasti < len(raw) else ""
    if op not in _CALL_OPS:
        kind = NEAR_RELEASE if _calls_releasing(code) else PYTHON
    else:
        names: list[str] = []  # loaded by name on the call's line, before the call
        for ins in dis.get_instructions(code):
            if ins.offset >= lasti:
                break
            if ins.starts_line:
                names = []
            if ins.opname.startswith(("LOAD_GLOBAL", "LOAD_ATTR", "LOAD_METHOD", "LOAD_NAME")):
                names.append(str(ins.argval))
        module = library_path(code.co_filename)
        if any(n in _RELEASING_NAMES or n in _RELEASING_MODULES for n in names):
            kind = RELEASES
        elif any(n in _WAITING_NAMES for n in names):
            kind = WAITS
        elif any(n in _KEEPING_NAMES for n in names):
            kind = NEAR_RELEASE if _calls_releasing(code) else KEEPS
        elif module.startswith(_RELEASING_MODULES):
            kind = RELEASES
        elif module.startswith(_KEEPING_MODULES):
            kind = KEEPS
        else:
            kind = CALL
    if len(_kinds) > 4096:
        _kinds.clear()
    _kinds[key] = kind
    return kind


# The names of :data:`_RELEASING_NAMES` that do CPU work (not I/O, not names as common as
# ``update``), for :func:`_calls_releasing`.
_WORK_NAMES = frozenset(
    {
        "pbkdf2_hmac", "scrypt", "hashpw", "checkpw", "kdf", "argon2_hash", "argon2_verify",
        "hash_secret", "hash_secret_raw", "verify_secret", "PasswordHasher", "compress",
        "decompress", "file_digest", "sha1", "sha224", "sha256", "sha384", "sha512", "md5",
        "blake2b", "blake2s", "sha3_256", "sha3_512", "crc32", "adler32",
    }
)
_releasing_code: dict[CodeType, bool] = {}


def _calls_releasing(code: CodeType) -> bool:
    """Whether the function of ``code`` calls a function known to release the GIL for its
    work (names it: ``hashlib.pbkdf2_hmac``, ``zlib.compress``, ``bcrypt.hashpw``)."""
    found = _releasing_code.get(code)
    if found is None:
        found = any(n in _WORK_NAMES or n in _RELEASING_MODULES for n in code.co_names)
        if len(_releasing_code) > 4096:
            _releasing_code.clear()
        _releasing_code[code] = found
    return found


def _clock_of(native_id: int) -> int:
    """The CPU-time clock of a thread of this process (Linux: MAKE_THREAD_CPUCLOCK(tid,
    CPUCLOCK_SCHED)); reading it for a thread that has ended fails with EINVAL, never
    touches freed memory (unlike pthread_getcpuclockid on a stale ident)."""
    return ((~native_id) << 3) | 6


def own_cpu_ns() -> int:
    """The calling thread's CPU time (ns), on the clock :func:`take_look` reads."""
    return _cpu.thread_time_ns()


def _thread_cpu_ns(clock: int) -> int:
    try:
        return _cpu.clock_gettime_ns(clock)
    except (OSError, ValueError, OverflowError):
        return -1


def take_look(frames: dict[int, FrameType], clocks: dict[int, int], me: int) -> Look:
    """A :class:`Look` at the threads of ``frames`` (``sys._current_frames()``) but ``me``;
    ``clocks`` caches ident -> CPU clock. Does not release the GIL."""
    if not _HAS_THREAD_CLOCKS:
        return Look(real.perf_counter(), {})
    if any(ident not in clocks for ident in frames if ident != me):
        clocks.clear()
        for t in threading.enumerate():
            if t.ident is not None and t.native_id is not None:
                clocks[t.ident] = _clock_of(t.native_id)
    threads: dict[int, tuple[int, int, int, str]] = {}
    for ident, frame in frames.items():
        clock = clocks.get(ident)
        if ident == me or clock is None:
            continue
        cpu = _thread_cpu_ns(clock)
        if cpu >= 0:
            threads[ident] = (cpu, id(frame), frame.f_lasti, doing(frame))
    return Look(real.perf_counter(), threads)


# The threads that may hold the GIL ran at least this share of the time the loop waited for
# it (the rest they can have spent preempted while holding it); threads inside calls that
# release it ran at most _BESIDE of that beside them.
_RAN = 0.25
_BESIDE = 0.25
# Threads that need the GIL take turns: together at most about one CPU (slack for readings).
_ONE_AT_A_TIME = 1.25


def holder(
    before: Look, after: Look, skip: set[int], waited: float
) -> tuple[int, str] | None:
    """The thread that held the GIL between two looks while the loop waited ``waited``
    seconds for it, and the evidence in words; None without evidence.

    Evidence: a thread caught between bytecodes (it was running Python, and was made to
    give the GIL up) or inside a C call known to keep the GIL, that ran in the window;
    the threads that may hold the GIL (those, and threads inside other C calls) ran
    ``_RAN`` of the wait at least, together at most one CPU (they take turns); and threads
    inside calls known to release the GIL (hashing, compression, I/O) ran at most
    ``_BESIDE`` of that beside them. C work that releases the GIL in threads (argon2,
    bcrypt, hashlib, zlib) is no evidence however late the loop got the GIL back: on a
    loaded machine a thread preempted while it briefly holds the GIL makes all wait."""
    holders: list[tuple[float, int, str, str]] = []  # caught running Python or keeping it
    maybe = 0.0  # CPU of threads inside other C calls
    beside = 0.0  # CPU of threads inside calls that release the GIL
    for ident, (cpu1, _frame, _lasti, kind) in after.threads.items():
        if ident in skip:
            continue
        old = before.threads.get(ident)
        if old is None:
            continue  # started within the window
        ran = max(cpu1 - old[0], 0) / 1e9
        if ran <= 0.0:
            continue
        if old[3] == RELEASES:
            kind = RELEASES  # its CPU in the window went (at least partly) to that call
        # A thread in a blocking wait at the start (an idle worker in queue.get()) used no
        # CPU there: what it ran came after, judged by what it was doing at the end.
        if kind in (PYTHON, KEEPS):
            holders.append((ran, ident, kind, old[3]))
        elif kind in (RELEASES, NEAR_RELEASE):
            beside += ran
        else:
            maybe += ran
    if not holders:
        return None
    window = after.t - before.t
    held = sum(h[0] for h in holders)
    may = held + maybe
    if may < _RAN * waited or may > _ONE_AT_A_TIME * window or beside > _BESIDE * may:
        return None
    ran, ident, kind, start = max(holders)
    what = (
        "was running Python code (stopped between bytecodes, made to give the GIL up)"
        if kind == PYTHON
        else "was at a C call that keeps the GIL (inside it, or made to give the GIL up "
        "right after it)"
    )
    return ident, (
        f"this thread {what} and ran {ran * 1000.0:.1f} ms of CPU in the "
        f"{window * 1000.0:.1f} ms window ({_AT_START.get(start, _AT_START[CALL])}); the "
        f"threads that can hold the GIL ran {may * 1000.0:.1f} ms, one at a time, threads "
        f"in calls that release it {beside * 1000.0:.1f} ms"
    )


# What a holder was doing when the window opened, in the evidence's words.
_AT_START = {
    PYTHON: "running Python code when it opened",
    KEEPS: "at a C call that keeps the GIL when it opened",
    WAITS: "idle in a blocking wait when it opened: its CPU was spent after that",
    NEAR_RELEASE: "running Python code when it opened",
    CALL: "inside a C call when it opened",
}


def sample(st: LoopState, start: float, seq: int) -> None:
    """Watchdog: read the running step's request and stack into its :class:`Samples`."""
    ctx = st.ctx
    frame = sys._current_frames().get(st.thread)
    if frame is None or ctx is None:
        return
    # The live Context of the running step (safe to read under the GIL): which request
    # the loop thread is running for right now, and whether measurement is paused.
    before = real.perf_counter()
    info = context.info_of(ctx)
    # The label now, next to the frames just taken: the walk below can lose the GIL, and
    # the loop thread may finish the request (label "background") before it is done.
    label = info.request if info is not None else None
    after = real.perf_counter()
    loc, depth = walk(frame)
    library, library_depth = innermost_outside_plugin(frame) if loc is None else (None, 0)
    del frame
    with st.lock:
        if st.start != start or st.seq != seq:
            return  # the step ended before the stack was read
        samples = st.samples
        if samples is None or st.sample_seq != seq:
            samples = st.samples = Samples()
            samples.guard = guard.active()
            st.sample_seq = seq
        if info is not None:
            samples.inside_n += 1
            samples.outside_after = 0.0
            # the deepest line seen, the latest of equally deep ones: a sample taken late
            # (the watchdog woke late) may see the first line of a long loop, the later
            # ones where the time goes
            if loc is not None and depth >= samples.depth:
                samples.inside, samples.depth = loc, depth
                samples.request = label
            elif samples.inside is None:
                samples.request = label  # no location yet: the latest label
                if library is not None and library_depth >= samples.library_depth:
                    samples.library, samples.library_depth = library, library_depth
        else:
            samples.outside_n += 1
            if not samples.inside_n:
                samples.outside_before = before
            elif not samples.outside_after:
                samples.outside_after = after


# -- frames ----------------------------------------------------------------------------------


def _is_attributed(code: CodeType) -> bool:
    return code.co_name == _ATTRIBUTED_NAME and code.co_filename == _CONTEXT_FILE


def _is_step_boundary(code: CodeType) -> bool:
    """The frame that runs one loop step: nothing outside it belongs to the step."""
    return code in steps.BOUNDARY_CODES or (
        code.co_name == "unrolled_run" and "trio" in code.co_filename
    )


def walk(frame: FrameType | None) -> tuple[Location | None, int]:
    """(innermost user location of a running step, its depth from the step boundary).

    The walk stops at the step boundary and at the request call of
    :func:`context.attributed`: frames outside it (the test calling the app) are not the
    request's code."""
    user: FrameType | None = None
    depth_in = 0
    frames = 0
    while frame is not None:
        code = frame.f_code
        if _is_step_boundary(code) or _is_attributed(code):
            break
        if user is None and is_user_file(code.co_filename):
            user = frame
            depth_in = frames
        frames += 1
        frame = frame.f_back
    if user is None:
        return None, 0
    loc = (relative(user.f_code.co_filename), user.f_lineno, user.f_code.co_name)
    return loc, frames - depth_in


def _coro_frames(coro: Any) -> list[FrameType]:
    """Frames of a suspended coroutine chain, outermost first."""
    frames: list[FrameType] = []
    seen = 0
    while coro is not None and seen < 200:
        seen += 1
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        frames.append(frame)
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return frames


def callback_location(owner: Any) -> Location | None:
    """Where a plain loop callback (not a task: its frames may be the test's) is defined:
    (file, first line, name), or None (a builtin, a task, the plugin's own)."""
    if isinstance(owner, asyncio.Task) or hasattr(owner, "coro"):
        return None
    target = owner
    for _ in range(8):
        inner = getattr(target, "func", None) or getattr(target, "__func__", None)
        if inner is None:
            break
        target = inner
    code = getattr(target, "__code__", None)
    if not isinstance(code, CodeType) or is_plugin_file(code.co_filename):
        return None
    return library_path(code.co_filename), code.co_firstlineno, code.co_name


def suspended(owner: Any) -> tuple[Location | None, bool]:
    """Where the step's task is suspended now (after the step): the innermost user frame
    inside the request (None if the task is not suspended inside one), and whether the
    task is suspended inside an attributed request call (a task that runs requests inline,
    like the test's task with ASGITransport)."""
    coro = None
    if isinstance(owner, asyncio.Handle):  # asyncio steps give the handle: its callback
        owner = owner._callback  # type: ignore[attr-defined]
    task = getattr(owner, "__self__", owner)
    if isinstance(task, asyncio.Task):
        coro = task.get_coro()
    elif hasattr(task, "coro"):  # trio.lowlevel.Task
        coro = task.coro
    if coro is None:
        return None, False
    loc: Location | None = None
    for frame in reversed(_coro_frames(coro)):
        code = frame.f_code
        if _is_attributed(code):
            return loc, True
        if loc is None and is_user_file(code.co_filename):
            loc = relative(code.co_filename), frame.f_lineno, code.co_name
    # Not suspended inside a request call (or the chain could not be followed to it): any
    # user frame seen is the caller's (the test's), never the request's.
    return None, False


def resume_point(owner: Any) -> object:
    """Where a step left its task: its suspended frames' (code, line), or the task's
    name and "done" (anyio names a task after the function it runs); for a plain
    callback, the code it ran. Two steps with the same request label and resume point
    ran the same code."""
    if isinstance(owner, asyncio.Handle):
        owner = owner._callback  # type: ignore[attr-defined]
    task = getattr(owner, "__self__", owner)
    if isinstance(task, asyncio.Task):
        coro, name = task.get_coro(), task.get_name()
    elif hasattr(task, "coro"):  # trio.lowlevel.Task
        coro, name = task.coro, str(getattr(task, "name", ""))
    else:
        function = getattr(owner, "__func__", owner)
        return getattr(function, "__code__", function)
    frames = _coro_frames(coro)
    if not frames:
        return name, "done"
    # the whole chain: trio suspends every task in the same trap frame
    return tuple((frame.f_code, frame.f_lineno) for frame in frames)


def innermost_outside_plugin(frame: FrameType | None) -> tuple[Location | None, int]:
    """(the innermost frame of a running step that is not the plugin's (stdlib or an
    installed library: no user frame was on the stack), its depth from the step boundary),
    or (None, 0). Library frames called by a frame of the plugin (its own bookkeeping) are
    the plugin's: not named."""
    found: FrameType | None = None
    found_at = 0
    frames = 0
    while frame is not None:
        code = frame.f_code
        if _is_step_boundary(code) or _is_attributed(code):
            break
        if is_plugin_file(code.co_filename):
            found = None  # what ran inside it was ours
        elif found is None:
            found, found_at = frame, frames
        frames += 1
        frame = frame.f_back
    if found is None:
        return None, 0
    code = found.f_code
    return (library_path(code.co_filename), found.f_lineno, code.co_name), frames - found_at


def has_user_frame(frame: FrameType | None) -> bool:
    while frame is not None:
        if is_user_file(frame.f_code.co_filename):
            return True
        frame = frame.f_back
    return False
