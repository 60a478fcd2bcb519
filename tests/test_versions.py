"""The floors in pyproject.toml are what constraints/lowest.txt installs and tests."""

from __future__ import annotations

import re
import shutil
import subprocess
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
    pinned: dict[str, Version] = {}
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


# -- CI runs the lowest versions too ---------------------------------------------------------


def _lowest_part_of_ci() -> str:
    """What .ci/run does after the README's test command."""
    ci = (ROOT / ".ci" / "run").read_text()
    _, sep, after = ci.partition("\ndeactivate\n")
    assert sep, ".ci/run does not leave the main venv after the README's test command"
    return after


def _run_ci_tail(tmp_path: Path, version: str) -> subprocess.CompletedProcess[str]:
    """The tail of .ci/run on a PATH whose python3 says it is ``version``; the lowest run
    itself is a stand-in that prints what it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    is_311 = "0" if version.startswith("3.11.") else "1"
    python3 = bin_dir / "python3"
    python3.write_text(
        f'#!/bin/sh\nif [ "$1" = -V ]; then echo "Python {version}"; exit 0; fi\nexit {is_311}\n'
    )
    python3.chmod(0o755)
    (bin_dir / "bash").symlink_to(shutil.which("bash") or "/bin/bash")
    (tmp_path / "constraints").mkdir()
    (tmp_path / "constraints" / "run-lowest.sh").write_text('echo "LOWEST PYTHON=$PYTHON $*"\n')
    script = tmp_path / "tail.sh"
    script.write_text("set -euo pipefail\n" + _lowest_part_of_ci())
    return subprocess.run(
        [shutil.which("bash") or "/bin/bash", str(script)], cwd=tmp_path, capture_output=True,
        text=True, timeout=60, env={"PATH": str(bin_dir)},
    )


def test_ci_runs_the_lowest_suite_on_a_python_3_11(tmp_path: Path) -> None:
    done = _run_ci_tail(tmp_path, "3.11.7")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"LOWEST PYTHON={tmp_path / 'bin' / 'python3'} -q"


def test_ci_skips_the_lowest_suite_saying_why_without_a_python_3_11(tmp_path: Path) -> None:
    done = _run_ci_tail(tmp_path, "3.13.0")
    assert done.returncode == 0, done.stderr
    assert "LOWEST" not in done.stdout
    assert "lowest-versions run skipped" in done.stdout and "Python 3.13.0" in done.stdout
