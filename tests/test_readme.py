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


def _anchors(text: str) -> set[str]:
    """Explicit ids and GitHub's heading slugs."""
    ids = set(re.findall(r'<a id="([^"]+)"></a>', text))
    for heading in re.findall(r"^#+ +(.+)$", text, re.M):
        plain = re.sub(r"<[^>]+>|`", "", heading).strip().lower()
        ids.add(re.sub(r"[^\w\- ]", "", plain).replace(" ", "-"))
    return ids


def test_every_docs_pointer_in_a_message_names_a_readme_section() -> None:
    """Messages end with "See README.md#section": each section must exist, once."""
    from pytest_stallguard.model import DOCS, KINDS

    readme = (ROOT / "README.md").read_text()
    anchors = _anchors(readme)
    used: set[str] = set(KINDS) | {"findings"}
    for source in (ROOT / "pytest_stallguard").rglob("*.py"):
        used |= set(re.findall(r"\{DOCS\}([\w-]+)", source.read_text()))
    assert DOCS == "README.md#"
    missing = sorted(used - anchors)
    assert not missing, f"README.md has no section for: {missing}"
    explicit = re.findall(r'<a id="([^"]+)"></a>', readme)
    assert len(explicit) == len(set(explicit)), "an anchor id is defined twice"
    for target in re.findall(r"\]\(#([\w-]+)\)", readme):
        assert target in anchors, f"README links to #{target}, which does not exist"
