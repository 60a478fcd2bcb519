#!/usr/bin/env bash
# Run the test suite against the lowest versions we support (constraints/lowest.txt).
#
#   bash constraints/run-lowest.sh            # the whole suite
#   bash constraints/run-lowest.sh -x -q      # extra arguments go to pytest
#
# Builds a fresh virtualenv in .venv-lowest (git-ignored) with CPython 3.11 (set PYTHON to
# choose the interpreter): the pins are the oldest releases with wheels for 3.11, and some
# of them (asyncpg 0.27, uvloop 0.17, greenlet 2.0) have none for later Pythons.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "run-lowest.sh: constraints/lowest.txt is for CPython 3.11; $python is $("$python" -V 2>&1)." >&2
    echo "Set PYTHON to a 3.11 interpreter." >&2
    exit 2
fi
venv=.venv-lowest
rm -rf "$venv"
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet -e ".[dev]" -c constraints/lowest.txt
"$venv/bin/python" -m pip check
"$venv/bin/python" -m pip freeze --exclude-editable | grep -iE \
    '^(pytest|pluggy|anyio|httpx|httpcore|respx|asgi-lifespan|fastapi|starlette|sqlalchemy|asyncpg|aiosqlite|greenlet|trio|uvloop|pytest-asyncio|pytest-xdist)=='
"$venv/bin/python" -m pytest -p no:randomly "$@"
