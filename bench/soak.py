"""Run the whole test suite several times beside CPU-burning processes: a suite that gates
CI must pass on a loaded machine, every time.

Plain script::

    python bench/soak.py --runs 5

Each run is the README's test command, ``python -m pytest`` from the repository root, with
``-p no:cacheprovider -q`` (anything after ``--`` is passed on to pytest), while
``--burners`` processes (default 2) spin on the CPU. The burners are started before the
first run and always stopped at the end, also on Ctrl-C or an error; each also stops by
itself when this script is gone or its time bound has passed. Each run is bounded by
``--run-timeout`` seconds.

Prints per run: passed / failed / errors (and the other outcomes pytest counted), the ids of
failing tests, the duration; then a totals line. Exits 1 when any run failed, errored,
timed out or exited non-zero; 0 when every run passed.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTEST_ARGS = ["-m", "pytest", "-p", "no:cacheprovider", "-q"]

# A burner spins until its deadline, checking every ~0.2 s that its parent still exists.
BURNER = """
import os, sys, time
parent, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline and os.getppid() == parent:
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        pass
"""

COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed|deselected|warnings?)")
OUTCOME_LINE = re.compile(r"^=*\s*(no tests ran|\d+ \w+.*) in [\d.]+s")


@dataclass
class Run:
    number: int
    returncode: int | None  # None: killed at the timeout
    seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    failing: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        bad = self.counts.get("failed", 0) + self.counts.get("errors", 0)
        return bad > 0 or self.returncode != 0

    def line(self) -> str:
        counts = ", ".join(
            f"{self.counts.get(k, 0)} {k}" for k in ("passed", "failed", "errors")
        )
        extra = ", ".join(
            f"{v} {k}" for k, v in sorted(self.counts.items())
            if k not in ("passed", "failed", "errors", "warnings")
        )
        status = "timed out" if self.returncode is None else f"exit {self.returncode}"
        return (
            f"run {self.number}: {counts}{', ' + extra if extra else ''} "
            f"in {self.seconds:.1f} s ({status})"
        )


def parse(output: str) -> tuple[dict[str, int], list[str]]:
    """Outcome counts from pytest's closing line, failing ids from its short summary."""
    counts: dict[str, int] = {}
    for line in reversed(output.splitlines()):
        if OUTCOME_LINE.search(line.strip()):
            for number, kind in COUNT.findall(line):
                kind = {"error": "errors", "warning": "warnings"}.get(kind, kind)
                counts[kind] = int(number)
            break
    failing = []
    summary = output.rsplit("short test summary info", 1)
    for line in summary[1].splitlines() if len(summary) == 2 else []:
        if line.startswith(("FAILED ", "ERROR ")):
            failing.append(line.split(" - ", 1)[0])
    return counts, failing


def start_burners(n: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    return [
        subprocess.Popen(
            [sys.executable, "-c", BURNER, str(os.getpid()), str(seconds)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
        for _ in range(n)
    ]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def one_run(number: int, extra: list[str], timeout_s: float, log_dir: Path | None) -> Run:
    env = dict(os.environ)
    # The suite of this checkout, whatever copy of the package is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, *PYTEST_ARGS, *extra],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # so a timeout can stop the run and what it started
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        returncode: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        output, _ = proc.communicate(timeout=30)
        returncode = None
    except BaseException:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
        raise
    seconds = time.perf_counter() - started
    if log_dir is not None:
        (log_dir / f"run-{number}.txt").write_text(output)
    counts, failing = parse(output)
    return Run(number, returncode, seconds, counts, failing)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Arguments after -- go to pytest, e.g. -- tests/test_leaks.py",
    )
    parser.add_argument("--runs", type=int, default=5, help="full-suite runs (default 5)")
    parser.add_argument("--burners", type=int, default=2, help="CPU-burning processes (2)")
    parser.add_argument(
        "--run-timeout", type=float, default=1800.0, help="seconds per run before it is "
        "stopped and counted as failed (default 1800)",
    )
    parser.add_argument("--log-dir", type=Path, help="keep each run's pytest output here")
    args, extra = parser.parse_known_args()
    if extra[:1] == ["--"]:
        extra = extra[1:]
    elif extra:
        parser.error(f"unknown arguments {' '.join(extra)}; put pytest's after --")
    if args.runs < 1 or args.burners < 0 or args.run_timeout <= 0:
        parser.error("--runs must be >= 1, --burners >= 0 and --run-timeout > 0")
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)

    command = " ".join(["python", *PYTEST_ARGS, *extra])
    print(
        f"soak: {args.runs} run(s) of `{command}` beside {args.burners} CPU burner(s); "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    runs: list[Run] = []
    burners = start_burners(args.burners, args.runs * (args.run_timeout + 60) + 60)
    try:
        for number in range(1, args.runs + 1):
            run = one_run(number, extra, args.run_timeout, args.log_dir)
            runs.append(run)
            print(run.line(), flush=True)
            for test_id in run.failing:
                print(f"    {test_id}", flush=True)
            if run.failed and not run.counts:
                print("    (no pytest summary line; see --log-dir)", flush=True)
    finally:
        stop(burners)

    failed_runs = [r for r in runs if r.failed]
    total = {k: sum(r.counts.get(k, 0) for r in runs) for k in ("passed", "failed", "errors")}
    print(
        f"totals: {len(runs)} run(s), {total['passed']} passed, {total['failed']} failed, "
        f"{total['errors']} errors; runs with failures: {len(failed_runs)}; "
        f"{sum(r.seconds for r in runs):.0f} s",
        flush=True,
    )
    return 1 if failed_runs else 0


if __name__ == "__main__":
    sys.exit(main())
