"""The floors in pyproject.toml are what constraints/lowest.txt installs and tests."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LINT_TOOLS = {"ruff", "mypy"}  # not part of the supported range


def declared() -> list[Requirement]:
    """The project's dependencies and its dev extra (a plain parse: tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = []
    for name in ("dependencies", "dev"):
        block = re.search(rf"^{name} = \[\n(.*?)^\]", text, re.M | re.S)
        assert block is not None, f"pyproject.toml has no {name} list"
        found += [Requirement(s) for s in re.findall(r'^\s*"([^"]+)",', block.group(1), re.M)]
    return found


def pins() -> dict[str, Version]:
    pinned = {}
    for line in (ROOT / "constraints" / "lowest.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pinned[canonicalize_name(name)] = Version(version)
    return pinned


def test_every_floor_is_the_pin_the_lowest_run_installs() -> None:
    pinned = pins()
    checked = 0
    for req in declared():
        name = canonicalize_name(req.name)
        if name in LINT_TOOLS:
            continue
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        assert len(floors) == 1, f"{req}: give it one >= floor"
        assert name in pinned, f"{req.name} has no pin in constraints/lowest.txt"
        assert floors[0] == pinned[name], (
            f"{req.name}: pyproject.toml says >={floors[0]}, "
            f"constraints/lowest.txt installs {pinned[name]}"
        )
        checked += 1
    assert checked >= 15


def test_lowest_pins_are_exact_and_cover_the_hooked_libraries() -> None:
    text = (ROOT / "constraints" / "lowest.txt").read_text()
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    assert all("==" in ln for ln in lines if ln), "every line of lowest.txt is a == pin"
    hooked = {
        "pytest",
        "anyio",
        "httpx",
        "httpcore",
        "respx",
        "asgi-lifespan",
        "fastapi",
        "starlette",
        "sqlalchemy",
        "asyncpg",
        "trio",
        "uvloop",
        "pytest-asyncio",
        "pytest-xdist",
    }
    assert hooked <= set(pins())
