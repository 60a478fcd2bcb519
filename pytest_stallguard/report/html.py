"""A self-contained, offline HTML report: findings and a latency strip per burst."""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = """
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
h2{font-size:1.05em;margin-top:2em;border-bottom:1px solid #ccc}
.failed h2,.error h2{color:#a00}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:2px 8px;text-align:left}
.kind{font-family:monospace;background:#fee;padding:0 4px}
.bar{display:inline-block;width:3px;margin-right:1px;background:#48a;vertical-align:bottom}
.strip{height:60px;border-bottom:1px solid #999;white-space:nowrap;overflow-x:auto}
"""


def _strip(values: list[float]) -> str:
    if not values:
        return ""
    top = max(values) or 1.0
    bars = "".join(
        f'<span class="bar" style="height:{max(1, int(58 * v / top))}px" '
        f'title="{v:.1f} ms"></span>'
        for v in values
    )
    return f'<div class="strip">{bars}</div>'


def render(report: dict[str, Any]) -> str:
    parts = [
        "<!doctype html><meta charset=utf-8><title>stallguard report</title>",
        f"<style>{STYLE}</style><h1>stallguard report</h1>",
        f"<p>{report['summary']['tests']} tests; findings: "
        + escape(", ".join(f"{k} {v}" for k, v in report["summary"]["findings"].items()) or "none")
        + "</p>",
    ]
    for test in report["tests"]:
        parts.append(f'<section class="{escape(test["outcome"])}">')
        parts.append(f"<h2>{escape(test['nodeid'])} ({escape(test['outcome'])})</h2>")
        for f in test["findings"]:
            parts.append(
                f'<p><span class="kind">{escape(f["kind"])}</span> x{f["count"]} '
                f"{escape(f['message'])}</p>"
            )
        for b in test["bursts"]:
            parts.append(
                f"<p>burst {escape(b['method'])} {escape(b['path'])} n={b['n']}: p50 "
                f"{b['p50_ms']} ms, p95 {b['p95_ms']} ms, max {b['max_ms']} ms</p>"
            )
            parts.append(_strip(list(b.get("latencies_ms", []))))
            if b.get("canary"):
                c = b["canary"]
                parts.append(
                    f"<p>canary GET {escape(c['path'])}: baseline p95 {c['baseline_p95_ms']} "
                    f"ms, p95 {c['p95_ms']} ms, slowdown {c['slowdown']}x</p>"
                )
        if test["pools"]:
            rows = "".join(
                f"<tr><td>{escape(p['name'])}</td><td>{p['kind']}</td><td>{p['size']}</td>"
                f"<td>{p['max_in_use']}</td><td>{p['wait_p95_ms']}</td><td>{p['timeouts']}</td></tr>"
                for p in test["pools"]
            )
            parts.append(
                "<table><tr><th>pool</th><th>kind</th><th>size</th><th>max in use</th>"
                f"<th>wait p95 ms</th><th>timeouts</th></tr>{rows}</table>"
            )
        parts.append("</section>")
    return "\n".join(parts) + "\n"
