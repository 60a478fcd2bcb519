"""The real clocks, captured at import and kept out of reach of time patchers.

freezegun's ``freeze_time`` replaces every module attribute that *is* a real time function
(``time.monotonic``, ``perf_counter``, ...) across ``sys.modules``, and tests patch
``time.monotonic`` directly. A module global ``from time import perf_counter`` would be
frozen with them. These functions live as attributes of a plain object instead, which no
patcher walks, so every measurement and every bound of ours uses the real clock::

    from .clock import real
    start = real.perf_counter()
"""

from __future__ import annotations

import time
from collections.abc import Callable


class _RealClocks:
    """Holder of the real time functions (an instance attribute is not a module attribute)."""

    __slots__ = ("monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "sleep",
                 "thread_time_ns", "time")

    def __init__(self) -> None:
        self.monotonic: Callable[[], float] = time.monotonic
        self.monotonic_ns: Callable[[], int] = time.monotonic_ns
        self.perf_counter: Callable[[], float] = time.perf_counter
        self.perf_counter_ns: Callable[[], int] = time.perf_counter_ns
        self.time: Callable[[], float] = time.time
        self.sleep: Callable[[float], None] = time.sleep
        # CPU time of the calling thread (the loop thread's work in a step, on a busy machine)
        self.thread_time_ns: Callable[[], int] = time.thread_time_ns


real = _RealClocks()
