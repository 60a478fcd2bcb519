"""The ``--stall-report`` terminal summary."""

from __future__ import annotations

from collections.abc import Iterable

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
        for p in data["pools"]:
            out.append(
                f"  pool {p['name']} ({p['kind']}, size {p['size']}): max in use "
                f"{p['max_in_use']}, wait p95 {p['wait_p95_ms']:.1f} ms, max "
                f"{p['wait_max_ms']:.1f} ms, timeouts {p['timeouts']}"
            )
        for f in data["findings"]:
            place = f"{f['file']}:{f['line']}" if f["file"] else "?"
            dur = f" {f['duration_ms']:.1f} ms" if f["duration_ms"] is not None else ""
            times = f" x{f['count']}" if f["count"] > 1 else ""
            req = f" during {f['request']}" if f["request"] else ""
            call = f" {f['call']}" if f["call"] else ""
            out.append(f"  {f['kind']}{times}:{call}{dur}{req} at {place} ({f['function']})")
    return out
