"""What a benchmark ran on: printed at the top of every run, so figures can be compared."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent


def timed_command(
    args: list[str], env: dict[str, str] | None, *, timeout_s: float, bench: str
) -> tuple[float, float, str]:
    """Run ``args``: wall seconds, CPU seconds (the command and every process it waited for)
    and its stdout; a failed command ends the benchmark ``bench`` with its stderr."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{bench}: {' '.join(args[:4])} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def revision() -> str:
    """The commit benchmarked, marked dirty when the working tree has uncommitted changes."""
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO_DIR), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown revision"
    return done.stdout.strip()


def describe() -> str:
    """One line: CPUs, model, load, commit. A high load means other work shared the CPUs."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return (f"machine: {os.cpu_count()} CPUs, {cpu_model()}, load average {load}; "
            f"hlsvault at {revision()}")
