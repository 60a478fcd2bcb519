"""Types of the C module ``_cstep.c``: the asyncio step hook, the audit's common case, the
leak check's create_task and the traps' audit hook."""

import contextvars
from collections import deque
from collections.abc import Callable
from typing import Any

class StepState:
    start: float
    end: float
    rq_due: float
    long_s: float
    seq: int
    cpu0: int
    queued: int
    active: bool
    precise: bool
    ctx: contextvars.Context | None
    pending: dict[object, tuple[Any, float]]
    queue: deque[Any] | None
    mark_step: float
    mark_in: float
    mark_last: float
    mark_lo: float
    mark_hi: float

class StepHook:
    def __init__(
        self,
        state: StepState,
        loop: Any,
        link: Any,
        globals: dict[str, Any],
        fail: Callable[[Any, BaseException], None],
        handle_type: type,
    ) -> None: ...
    def __call__(self, handle: Any) -> None: ...
    def __get__(self, obj: Any, type: Any = None) -> Any: ...

class MarkHere:
    def __init__(self, on_thread: dict[int, StepState]) -> None: ...
    def __call__(self, entering: bool, /) -> None: ...
    def timing_here(self) -> bool: ...

class CreateTask:
    def __init__(
        self, link: Any, var: contextvars.ContextVar[Any], note: Callable[[Any, Any], None]
    ) -> None: ...
    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

def audit_on(
    sched: dict[Any, float],
    closing: list[Any],
    flat: list[Any],
    var: contextvars.ContextVar[Any],
    observe: Callable[..., None],
    ledger: type,
    /,
) -> None: ...
def audit_off() -> None: ...
def perf_counter() -> float: ...
def add_audit_hook(hook: Callable[[str, tuple[Any, ...]], None], events: tuple[str, ...], /
                   ) -> None: ...

def nap(
    states: tuple[StepState, ...],
    interval: float,
    early: float,
    late: float,
    limit: float,
    stop: bytearray,
    dicts: tuple[dict[Any, Any], ...],
    cpus: tuple[tuple[int, int], ...],
    /,
) -> float: ...
