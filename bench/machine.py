"""What a benchmark ran on: printed at the top of every run, so figures can be compared."""

from __future__ import annotations

import mmap
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

REPO_DIR = Path(__file__).resolve().parent.parent
#: What the guest has handed back to the host so far (virtio-balloon free page reporting).
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")
#: Pre-touched in pieces of this size: one reused source buffer, no giant Python object.
_TOUCH_PIECE = 1 << 20


def reported_mib() -> float | None:
    """MiB the guest has reported free to the host so far (None: not this kernel)."""
    try:
        return int(REPORTED_KIB.read_text()) / 1024
    except (OSError, ValueError):
        return None


def prefault(mib: int) -> None:
    """Write ``mib`` MiB of fresh anonymous memory and free it again, so that the pages a
    command started right after gets are backed by the host.

    This VM hands memory the guest frees back to the host (free page reporting); a page the
    host took back costs a hypervisor fault when the guest next writes it, so a command that
    writes new pages (a remux's output in the page cache) runs two to three times slower when
    it gets reported pages. The kernel hands out the pages freed last first and puts reported
    pages back at the tail of its free lists, so touching about what the command will write
    just before it starts gives every contender the same start; the reported count across the
    command says whether the reporter ran meanwhile. Freeing much more than that (1 GiB before
    a remux writing 236 MB) measured slower, not faster: see docs/benchmarks.md."""
    if mib <= 0:
        return
    piece = bytes(_TOUCH_PIECE)
    with mmap.mmap(-1, mib * _TOUCH_PIECE) as memory:
        for offset in range(0, mib * _TOUCH_PIECE, _TOUCH_PIECE):
            memory[offset:offset + _TOUCH_PIECE] = piece


class Timed(NamedTuple):
    """One command run to its end by :func:`timed_command`."""

    #: Wall seconds.
    wall: float
    #: CPU seconds, user + system, of the command and every process it waited for.
    cpu: float
    stdout: str
    #: The epoch second it was spawned at (to place a job record's timestamps).
    spawned_at: float
    #: MiB the guest reported to the host while it ran (None: not this kernel).
    reported_mib: float | None


def timed_command(
    args: list[str], env: dict[str, str] | None, *, timeout_s: float, bench: str
) -> Timed:
    """Run ``args`` to its end and time it; a failed command ends the benchmark ``bench`` with
    its stderr."""
    reported_before = reported_mib()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    spawned_at = time.time()
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, errors="replace",
                          timeout=timeout_s, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    reported_after = reported_mib()
    if done.returncode != 0:
        sys.exit(f"{bench}: {' '.join(args[:4])} failed ({done.returncode}):\n"
                 f"{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    reported = (None if reported_before is None or reported_after is None
                else reported_after - reported_before)
    return Timed(wall, cpu, done.stdout, spawned_at, reported)


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
