"""Loop-stall capture: time every step of the event loop and name the line that held it.

Heartbeat gaps false-alarm under load (GC pauses, one loop iteration running many ready
callbacks), so each *step* is timed instead. The parts:

* :mod:`.steps`: the hooks that time each step (asyncio ``Handle._run``, uvloop's
  ``call_*``, a trio instrument), installed through :mod:`..patching`;
* :mod:`.watchdog`: the thread that samples the loop thread's stack and request while a
  long step runs, and spots a worker thread starving the loop of the GIL;
* :mod:`.discount`: what is not the app's doing (GC, preemption by other processes, time
  inside trapped blocking calls);
* :mod:`.watch`: :class:`LoopWatch`, which attaches to loops and judges long steps.

:func:`stop_all` stops every watchdog and takes every hook off (an interrupted run).
"""

from __future__ import annotations

from .watch import ADVICE, LoopWatch, stop_all
from .watchdog import GIL_ADVICE

__all__ = ["ADVICE", "GIL_ADVICE", "LoopWatch", "stop_all"]
