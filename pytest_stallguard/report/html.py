"""A self-contained, offline HTML report: per burst, a timeline of where the time went.

One file, no JavaScript, nothing fetched: inline CSS and SVG (hover titles are SVG
``<title>`` elements). Per test: its findings with their locations, then per burst a
timeline with one bar per request from its issue to its last byte, split into the
breakdown's segments (coloured by key) and its status at the end; the canary's latency on
the same time axis above it; loop stalls and blocking calls marked where they happened;
then the pools the test watched. Drawn from the JSON report's dict (so xdist's merged
report draws the same).
"""

from __future__ import annotations

import re
from html import escape
from typing import Any

from ..model import BREAKDOWN_KEYS
from .text import LABELS, shares

COLOURS = {
    "loop_ms": "#d62728",
    "loop_wait_ms": "#ff9896",
    "thread_wait_ms": "#c5b0d5",
    "thread_ms": "#9467bd",
    "pool_wait_ms": "#ff7f0e",
    "io_ms": "#1f77b4",
    "other_ms": "#d9d9d9",
}
MARK_COLOURS = {"loop-stall": "#b00020", "blocking-call": "#6a1b9a"}
MAX_ROWS = 200  # requests drawn per burst (the slowest, in issue order)
WIDTH = 960  # px of the time axis
LEFT = 56  # px left of the axis (request numbers)
RIGHT = 48  # px right of it (statuses)
CANARY_H = 56

STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h2{font-size:1.05em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:.95em;margin:1.2em 0 .3em}
.failed h2,.error h2{color:#a00}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;text-align:left}
th{border-bottom:1px solid #ccc}td.n{text-align:right;font-variant-numeric:tabular-nums}
.kind{font-family:monospace;background:#fee;padding:0 4px}
.where{font-family:monospace}
.legend span{display:inline-block;margin-right:1em}
.legend i{display:inline-block;width:.9em;height:.9em;margin-right:.3em;vertical-align:-1px}
.went{margin:.2em 0}
svg{display:block;margin:.4em 0}
svg text{font:10px system-ui,sans-serif;fill:#444}
"""


def _f(value: float) -> str:
    return f"{value:.1f}"


def _legend() -> str:
    items = "".join(
        f'<span><i style="background:{COLOURS[k]}"></i>{escape(LABELS[k])}</span>'
        for k in BREAKDOWN_KEYS
    )
    marks = "".join(
        f'<span><i style="background:{c};opacity:.5"></i>{escape(kind)}</span>'
        for kind, c in MARK_COLOURS.items()
    )
    return f'<p class="legend">{items}{marks}<span>— canary latency</span></p>'


def _where(item: dict[str, Any]) -> str:
    if not item.get("file"):
        return "?"
    place = f"{item['file']}:{item['line']}" if item.get("line") else item["file"]
    return place + (f" ({item['function']})" if item.get("function") else "")


def _rows(burst: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    requests = list(burst.get("requests") or ())
    if len(requests) <= MAX_ROWS:
        return requests, ""
    slowest = sorted(requests, key=lambda r: -r["latency_ms"])[:MAX_ROWS]
    note = f"the {MAX_ROWS} slowest of {len(requests)} requests are drawn"
    return sorted(slowest, key=lambda r: r["i"]), note


def timeline(burst: dict[str, Any]) -> str:
    """The SVG timeline of one burst ('' when it has no per-request timings)."""
    rows, note = _rows(burst)
    if not rows:
        return ""
    tl = burst.get("timeline") or {}
    canary = tl.get("canary") or []
    marks = tl.get("marks") or []
    end = max(r["start_ms"] + r["latency_ms"] for r in rows)
    end = max([end, *(t for t, _ in canary)]) or 1.0
    scale = WIDTH / end
    row_h = 10 if len(rows) <= 60 else 6 if len(rows) <= 120 else 4
    top = CANARY_H + 14 if canary else 14
    height = top + len(rows) * row_h + 22
    width = LEFT + WIDTH + RIGHT

    def x(ms: float) -> float:
        return LEFT + max(0.0, ms) * scale

    out = [
        f'<svg width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" class="timeline">',
        f"<title>{escape(burst['method'])} {escape(burst['path'])}: one bar per request, "
        "issue to last byte</title>",
        f'<rect x="{LEFT}" y="0" width="{WIDTH}" height="{height - 20}" fill="#fafafa"/>',
    ]
    # Marks first (under the bars): loop stalls as bands, blocking calls as ticks.
    for m in marks:
        colour = MARK_COLOURS.get(m["kind"])
        if colour is None:
            continue
        mx = x(m["t_ms"])
        w = max(1.5, (m.get("duration_ms") or 0.0) * scale) if m["kind"] == "loop-stall" else 1.5
        tip = f"{m['kind']}: {_where(m)}"
        if m.get("duration_ms") is not None:
            tip += f", {_f(m['duration_ms'])} ms"
        if m.get("request"):
            tip += f", during {m['request']}"
        out.append(
            f'<rect class="mark {escape(m["kind"])}" x="{mx:.1f}" y="0" width="{w:.1f}" '
            f'height="{height - 20}" fill="{colour}" fill-opacity="0.25">'
            f"<title>{escape(tip)}</title></rect>"
        )
    if canary:
        top_lat = max(lat for _, lat in canary) or 1.0
        # Each probe at the time it was scheduled, as high as it took to answer (from
        # that schedule): a probe that fell into a stall stands out where the stall began.
        points = " ".join(
            f"{x(t):.1f},{CANARY_H - lat / top_lat * (CANARY_H - 8):.1f}" for t, lat in canary
        )
        path = (burst.get("canary") or {}).get("path", "")
        out.append(
            f'<text x="2" y="12">canary</text><text x="2" y="24">{escape(path)}</text>'
            f'<text x="{LEFT + 3}" y="10">{_f(top_lat)} ms</text>'
            f'<polyline class="canary" points="{points}" fill="none" stroke="#2ca02c" '
            f'stroke-width="1.5"><title>canary {escape(path)}: each probe\'s latency, at '
            f"the time it was scheduled (max {_f(top_lat)} ms)</title></polyline>"
        )
        out.append(
            f'<line x1="{LEFT}" y1="{CANARY_H}" x2="{LEFT + WIDTH}" y2="{CANARY_H}" '
            'stroke="#bbb"/>'
        )
    for n, r in enumerate(rows):
        y = top + n * row_h
        h = row_h - 1
        tip = (f"#{r['i']} {r['method']} {r['path']} -> {r['status'] or 'no answer'} in "
               f"{_f(r['latency_ms'])} ms")
        if r.get("breakdown"):
            tip += ": " + shares(r["breakdown"])
        out.append(f'<g class="request"><title>{escape(tip)}</title>')
        segments = r.get("segments") or []
        if segments:
            for key, s, e in segments:
                out.append(
                    f'<rect class="seg {key}" x="{x(s):.1f}" y="{y}" '
                    f'width="{max(0.5, (e - s) * scale):.1f}" height="{h}" '
                    f'fill="{COLOURS.get(key, "#999")}"/>'
                )
        else:
            out.append(
                f'<rect class="seg" x="{x(r["start_ms"]):.1f}" y="{y}" '
                f'width="{max(0.5, r["latency_ms"] * scale):.1f}" height="{h}" fill="#999"/>'
            )
        status = r["status"] or 0
        colour = "#a00" if status == 0 or status >= 500 else "#444"
        label = str(status) if status else "—"
        if row_h >= 6:
            out.append(
                f'<text x="{x(r["start_ms"] + r["latency_ms"]) + 3:.1f}" y="{y + h}" '
                f'style="font-size:{min(10, row_h)}px;fill:{colour}">{label}</text>'
            )
        if n % max(1, len(rows) // 10) == 0 and row_h >= 6:
            out.append(f'<text x="{LEFT - 4}" y="{y + h}" text-anchor="end" '
                       f'style="font-size:{min(10, row_h)}px">#{r["i"]}</text>')
        out.append("</g>")
    # The time axis.
    axis_y = height - 20
    out.append(f'<line x1="{LEFT}" y1="{axis_y}" x2="{LEFT + WIDTH}" y2="{axis_y}" '
               'stroke="#888"/>')
    for k in range(6):
        ms = end * k / 5
        out.append(f'<text x="{x(ms):.1f}" y="{axis_y + 13}" text-anchor="middle">'
                   f"{ms:.0f} ms</text>")
    out.append("</svg>")
    if note:
        out.append(f"<p>{escape(note)}</p>")
    return "".join(out)


def _fold(pools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pools of one name and kind made many times (a client per request: "httpx pool",
    "httpx pool #2", ...) as one row: totals and counts summed, the rest their maximum."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in pools:
        base = re.sub(r" #\d+$", "", str(p["name"]))
        groups.setdefault((base, str(p["kind"])), []).append(p)
    out = []
    for (base, kind), members in groups.items():
        if len(members) <= 2:
            out.extend(members)
            continue
        row: dict[str, Any] = {"name": f"{base} x{len(members)}", "kind": kind}
        for p in members:
            for k, v in p.items():
                if k in ("name", "kind") or not isinstance(v, (int, float)):
                    continue
                summed = k == "timeouts" or k.endswith("_total_ms")
                row[k] = (row.get(k, 0) + v) if summed else max(row.get(k, v), v)
        out.append(row)
    return out


def _num(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    return escape(str(value))


def _pools(pools: list[dict[str, Any]]) -> str:
    """Every pool the test watched, with whatever numbers it carries (the article's three
    are wait_total_ms, work_total_ms and timeouts when the pool watch gives them)."""
    if not pools:
        return ""
    pools = _fold(pools)
    keys: list[str] = []
    for p in pools:
        for k in p:
            if k not in ("name", "kind") and k not in keys:
                keys.append(k)
    head = "".join(f"<th>{escape(k.replace('_', ' '))}</th>" for k in keys)
    rows = []
    for p in pools:
        cells = "".join(f'<td class="n">{_num(p.get(k, ""))}</td>' for k in keys)
        rows.append(f"<tr><td>{escape(p['name'])}</td><td>{escape(p['kind'])}</td>{cells}</tr>")
    return (f'<table class="pools"><tr><th>pool</th><th>kind</th>{head}</tr>'
            f"{''.join(rows)}</table>")


def render(report: dict[str, Any]) -> str:
    summary = report["summary"]
    found = ", ".join(f"{k} {v}" for k, v in summary["findings"].items()) or "none"
    parts = [
        "<!doctype html><html lang=en><meta charset=utf-8><title>stallguard report</title>",
        f"<style>{STYLE}</style><h1>stallguard report</h1>",
        f"<p>{summary['tests']} tests; findings: {escape(found)}</p>",
        _legend(),
    ]
    for test in report["tests"]:
        parts.append(f'<section class="{escape(test["outcome"])}">')
        parts.append(f"<h2>{escape(test['nodeid'])} ({escape(test['outcome'])})</h2>")
        if test["findings"]:
            parts.append('<ul class="findings">')
            for f in test["findings"]:
                parts.append(
                    f'<li><span class="kind">{escape(f["kind"])}</span> x{f["count"]} at '
                    f'<span class="where">{escape(_where(f))}</span>: {escape(f["message"])}</li>'
                )
            parts.append("</ul>")
        for b in test["bursts"]:
            conc = f", {b['concurrency']} wide" if b.get("concurrency") else ""
            parts.append(
                f"<h3>burst {escape(b['method'])} {escape(b['path'])} n={b['n']}{conc}: "
                f"p50 {_f(b['p50_ms'])} ms, p95 {_f(b['p95_ms'])} ms, max {_f(b['max_ms'])} ms; "
                "statuses "
                + escape(" ".join(f"{k}x{v}" for k, v in b["statuses"].items()) or "-")
                + "</h3>"
            )
            if b.get("breakdown"):
                parts.append(f'<p class="went">time went to: {escape(shares(b["breakdown"]))}</p>')
            if b.get("canary"):
                c = b["canary"]
                parts.append(
                    f"<p>canary GET {escape(c['path'])}: baseline p95 "
                    f"{_f(c['baseline_p95_ms'])} ms, p95 {_f(c['p95_ms'])} ms, slowdown "
                    f"{_f(c['slowdown'])}x</p>"
                )
            parts.append(timeline(b))
        parts.append(_pools(test["pools"]))
        parts.append("</section>")
    return "\n".join(parts) + "\n"
