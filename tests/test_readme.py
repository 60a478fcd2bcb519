"""The README's Quick start must stay the commands CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None, "Quick start has no bash code block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_has_two_commands_and_ci_runs_the_test_one() -> None:
    commands = quick_start_commands()
    assert len(commands) == 2
    examples, suite = commands
    assert "examples" in examples and "--stall-report" in examples
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert suite in ci, f"{suite!r} is not a line of .ci/run"
