"""The machine-readable report, schema ``stallguard-report/1``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..model import TestRecord

SCHEMA = "stallguard-report/1"


def build(records: Iterable[TestRecord]) -> dict[str, Any]:
    tests = [r.to_dict() for r in records]
    kinds: Counter[str] = Counter()
    for test in tests:
        for finding in test["findings"]:
            kinds[finding["kind"]] += 1
    return {
        "schema": SCHEMA,
        "tests": tests,
        "summary": {"tests": len(tests), "findings": dict(sorted(kinds.items()))},
    }
