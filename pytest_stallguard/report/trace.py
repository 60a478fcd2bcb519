"""``--stall-trace``: the bursts as Chrome Trace Event JSON (Perfetto, chrome://tracing,
speedscope).

One process per burst (named after its test and request), in which:

* every request has a track of its own (``tid`` = its index + 1), with a complete event
  (``"ph": "X"``) from its issue to its last byte and, nested inside it, one per segment of
  its breakdown (loop, loop wait, thread wait, ...): complete events must nest on a track,
  and a request's segments tile its interval;
* counters (``"ph": "C"``): loop lag, threads in use, DB connections in use, HTTP calls in
  flight, the canary's latency;
* instant events (``"ph": "i"``) for the loop stalls, blocking calls and other findings
  recorded during the burst, with ``file:line`` in their ``args``.

Times are microseconds from the burst's start (each burst starts at 0). Built from the
JSON report's dict, so an xdist run writes one trace merged from every worker.
"""

from __future__ import annotations

from typing import Any

from .text import LABELS

LOOP_TID = 0  # the track of the burst's own events (stalls, blocking calls)


def _us(ms: float) -> float:
    return round(ms * 1000.0, 1)


def _where(m: dict[str, Any]) -> str:
    if not m.get("file"):
        return "?"
    return f"{m['file']}:{m['line']}" if m.get("line") else str(m["file"])


def build(report: dict[str, Any]) -> dict[str, Any]:
    events: list[dict[str, Any]] = []
    pid = 0
    for test in report["tests"]:
        for burst in test["bursts"]:
            requests = burst.get("requests") or []
            if not requests:
                continue
            pid += 1
            name = f"{test['nodeid']}: {burst['method']} {burst['path']} x{burst['n']}"
            events.append({"name": "process_name", "ph": "M", "pid": pid,
                           "args": {"name": name}})
            events.append({"name": "process_sort_index", "ph": "M", "pid": pid,
                           "args": {"sort_index": pid}})
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": LOOP_TID,
                           "args": {"name": "findings"}})
            for r in requests:
                events.extend(_request(pid, r))
            events.extend(_counters(pid, burst))
            events.extend(_marks(pid, burst))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "otherData": {"producer": "pytest-stallguard", "schema": report.get("schema")},
    }


def _request(pid: int, r: dict[str, Any]) -> list[dict[str, Any]]:
    tid = r["i"] + 1
    label = f"#{r['i']} {r['method']} {r['path']}"
    out: list[dict[str, Any]] = [
        {"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}},
        {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
         "args": {"sort_index": tid}},
        {
            "name": f"{r['method']} {r['path']} -> {r['status'] or 'no answer'}",
            "cat": "request",
            "ph": "X",
            "pid": pid,
            "tid": tid,
            "ts": _us(r["start_ms"]),
            "dur": _us(r["latency_ms"]),
            "args": {
                "status": r["status"],
                "latency_ms": r["latency_ms"],
                "ttfb_ms": r["ttfb_ms"],
                "breakdown": r.get("breakdown"),
                "upstreams": r.get("upstreams") or {},
            },
        },
    ]
    end = _us(r["start_ms"] + r["latency_ms"])
    for key, s, e in r.get("segments") or []:
        ts = max(_us(s), _us(r["start_ms"]))
        dur = min(_us(e), end) - ts
        if dur <= 0:
            continue
        out.append({"name": LABELS.get(key, key), "cat": key, "ph": "X", "pid": pid,
                    "tid": tid, "ts": ts, "dur": round(dur, 1)})
    return out


def _counters(pid: int, burst: dict[str, Any]) -> list[dict[str, Any]]:
    tl = burst.get("timeline") or {}
    out: list[dict[str, Any]] = []
    for t, lag in tl.get("loop_lag_ms") or []:
        out.append({"name": "loop lag (ms)", "ph": "C", "pid": pid, "ts": _us(t),
                    "args": {"lag": lag}})
    for name, series in (tl.get("in_use") or {}).items():
        for t, level in series:
            out.append({"name": name, "ph": "C", "pid": pid, "ts": _us(t),
                        "args": {"in use": level}})
    for t, lat in tl.get("canary") or []:
        out.append({"name": "canary latency (ms)", "ph": "C", "pid": pid,
                    "ts": _us(t + lat), "args": {"latency": lat}})
    return out


def _marks(pid: int, burst: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in (burst.get("timeline") or {}).get("marks") or []:
        args: dict[str, Any] = {"file:line": _where(m)}
        for key in ("function", "request", "duration_ms", "call"):
            if m.get(key) is not None:
                args[key] = m[key]
        out.append({"name": m["kind"], "cat": "finding", "ph": "i", "s": "t", "pid": pid,
                    "tid": LOOP_TID, "ts": _us(m["t_ms"]), "args": args})
    return out
