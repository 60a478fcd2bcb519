"""The ``--stall-report`` terminal summary."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..model import TestRecord


def _fmt_statuses(statuses: dict[str, int]) -> str:
    return " ".join(f"{code}x{count}" for code, count in sorted(statuses.items())) or "-"


def lines(records: Iterable[TestRecord]) -> list[str]:
    """One block per test that burst, watched a pool or found something."""
    out: list[str] = []
    for record in records:
        data = record.to_dict()
        if not (data["findings"] or data["bursts"] or data["pools"]):
            continue
        out.append(f"{data['nodeid']} [{data['outcome']}]")
        for b in data["bursts"]:
            conc = f", {b['concurrency']} wide" if b["concurrency"] else ""
            out.append(
                f"  burst {b['method']} {b['path']} n={b['n']}{conc}: p50 {b['p50_ms']:.1f} ms, "
                f"p95 {b['p95_ms']:.1f} ms, p99 {b['p99_ms']:.1f} ms, max {b['max_ms']:.1f} ms; "
                f"statuses {_fmt_statuses(b['statuses'])}; errors {b['errors']}"
            )
            c = b["canary"]
            if c:
                out.append(
                    f"    canary GET {c['path']}: baseline p95 {c['baseline_p95_ms']:.2f} ms, "
                    f"during p95 {c['p95_ms']:.1f} ms, max {c['max_ms']:.1f} ms, "
                    f"slowdown {c['slowdown']:.1f}x"
                )
            out.extend(audit_lines(b))
        out.extend(_pool_lines(data["pools"]))
        for f in data["findings"]:
            place = f"{f['file']}:{f['line']}" if f["file"] else "?"
            dur = f" {f['duration_ms']:.1f} ms" if f["duration_ms"] is not None else ""
            times = f" x{f['count']}" if f["count"] > 1 else ""
            req = f" during {f['request']}" if f["request"] else ""
            call = f" {f['call']}" if f["call"] else ""
            out.append(f"  {f['kind']}{times}:{call}{dur}{req} at {place} ({f['function']})")
    return out


LABELS = {
    "loop_ms": "loop",
    "loop_wait_ms": "loop wait",
    "thread_wait_ms": "thread wait",
    "thread_ms": "thread",
    "pool_wait_ms": "pool wait",
    "io_ms": "io",
    "other_ms": "other",
}
SLOWEST = 3


def shares(breakdown: dict[str, float], least: float = 0.01) -> str:
    """``"loop wait 81%, loop 19%"``: the parts of a breakdown, largest first."""
    total = sum(breakdown.values())
    if total <= 0:
        return "-"
    parts = sorted(breakdown.items(), key=lambda kv: -kv[1])
    return ", ".join(
        f"{LABELS.get(k, k)} {v / total:.0%}" for k, v in parts if v / total >= least
    ) or "-"


def overlapping(marks: list[dict[str, Any]], start_ms: float, end_ms: float
                ) -> list[tuple[str, str, int]]:
    """Findings recorded while a request ran: (kind, where, times), most frequent first."""
    seen: Counter[tuple[str, str]] = Counter()
    for m in marks:
        begun = m["t_ms"]
        ended = begun + (m.get("duration_ms") or 0.0)
        if ended >= start_ms and begun <= end_ms:
            where = f"{m['file']}:{m['line']}" if m.get("file") else "?"
            if m.get("function"):
                where += f" ({m['function']})"
            seen[(m["kind"], where)] += 1
    return [(kind, where, n) for (kind, where), n in seen.most_common()]


def audit_lines(burst: dict[str, Any]) -> list[str]:
    """Where the burst's time went (one line), then its slowest requests (SPEC section 8)."""
    total = burst.get("breakdown")
    requests = [r for r in burst.get("requests") or () if r.get("breakdown")]
    if not total or not requests:
        return []
    summed = sum(total.values())
    out = [f"    time went to: {shares(total)} (of {summed:.0f} ms in {len(requests)} requests)"]
    marks = (burst.get("timeline") or {}).get("marks") or []
    slowest = sorted(requests, key=lambda r: -r["latency_ms"])[:SLOWEST]
    for r in slowest:
        parts = sorted(r["breakdown"].items(), key=lambda kv: -kv[1])
        spent = ", ".join(f"{LABELS.get(k, k)} {v:.1f}" for k, v in parts if v >= 0.05)
        line = (f"    slow #{r['i']} {r['method']} {r['path']} -> {r['status'] or 'no answer'} "
                f"in {r['latency_ms']:.1f} ms: {spent}")
        if r.get("upstreams"):
            line += "; awaited " + ", ".join(
                f"{h} {ms:.0f} ms" for h, ms in sorted(r["upstreams"].items()))
        found = overlapping(marks, r["start_ms"], r["start_ms"] + r["latency_ms"])
        if found:
            shown = "; ".join(f"{k}{f' x{n}' if n > 1 else ''} at {w}" for k, w, n in found[:2])
            more = f" (+{len(found) - 2} more)" if len(found) > 2 else ""
            line += f"; meanwhile {shown}{more}"
        out.append(line)
    return out


def _pool_lines(pools: list[dict[str, Any]]) -> list[str]:
    """One line per pool; pools of one kind and name made many times (a client per
    request: "httpx pool", "httpx pool #2", ...) fold into one line."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in pools:
        base = re.sub(r" #\d+$", "", p["name"])
        groups.setdefault((base, p["kind"]), []).append(p)
    out: list[str] = []
    for (base, kind), members in groups.items():
        if len(members) == 1:
            p = members[0]
            out.append(
                f"  pool {p['name']} ({kind}, size {p['size']}): max in use "
                f"{p['max_in_use']}, wait p95 {p['wait_p95_ms']:.1f} ms, max "
                f"{p['wait_max_ms']:.1f} ms, timeouts {p['timeouts']}{_held(p)}"
            )
            continue
        once = sum(1 for p in members if p["max_in_use"] <= 1)
        use = "each used once" if once == len(members) else f"{once} of them used once"
        out.append(
            f"  pool {base} ({kind}) x{len(members)}: {len(members)} created, {use}; "
            f"wait max {max(p['wait_max_ms'] for p in members):.1f} ms, "
            f"timeouts {sum(p['timeouts'] for p in members)}"
        )
    return out


def _held(pool: dict[str, Any]) -> str:
    """Where the connections' time went: waiting for one, working, held idle (records
    from older workers may lack the fields)."""
    if "wait_total_ms" not in pool:
        return ""
    text = f"; wait total {pool['wait_total_ms']:.0f} ms"
    work, idle = pool.get("work_total_ms", 0.0), pool.get("idle_held_total_ms", 0.0)
    if work or idle:
        text += f", held working {work:.0f} ms / idle held {idle:.0f} ms"
    return text


def totals(records: Iterable[TestRecord]) -> str:
    """The last line: tests armed, how they ended, bursts, findings by kind."""
    records = list(records)
    outcomes = Counter(r.outcome for r in records)
    kinds: Counter[str] = Counter(f.kind for r in records for f in r.findings)
    bursts = sum(len(r.bursts) + len(r.raw_bursts) for r in records)
    ended = ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items()))
    found = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items())) or "none"
    return f"stallguard: {len(records)} tests armed ({ended}); {bursts} bursts; findings: {found}"
