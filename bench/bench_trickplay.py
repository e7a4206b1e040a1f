"""Benchmark: what ``--trick-play`` adds to a packaging, in wall clock and CPU.

The cached 1080p30 clip (bench/sample_clip.py, or ``--clip PATH``) packaged in embedded mode
with ``hlsvault package clip --ladder copy --json``, with and without ``--trick-play``, rounds
alternating. The copy ladder is trick play's worst case: the I-frames are taken from the one
1080p rendition (a transcoded ladder takes them from its 360p one) and the packaging it adds
to is a remux, seconds long. Reported: the median wall clock of each command, the trick play
stage's own time from the job record (``trickplay`` started to finished), and the CPU seconds
of each command (children included).

    flock /tmp/hlsvault-bench.lock python bench/bench_trickplay.py [--rounds N] [--clip PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from machine import describe, timed_command
from sample_clip import WORK_DIR, ensure_clip

DEFAULT_ROUNDS = 3
#: Packaging a couple of minutes of 1080p by remux takes seconds; this is a hang.
COMMAND_TIMEOUT_S = 900
RUN_DIR = WORK_DIR / "trickplay"
HLSVAULT = [sys.executable, "-m", "hlsvault"]


def run(args: list[str], env: dict[str, str]) -> tuple[float, float, dict[str, Any]]:
    """Wall seconds, CPU seconds (this command and its children) and the parsed JSON."""
    ran = timed_command(args, env, timeout_s=COMMAND_TIMEOUT_S, bench="bench_trickplay")
    parsed: dict[str, Any] = json.loads(ran.stdout)
    return ran.wall, ran.cpu, parsed


def stage_seconds(job_id: str, env: dict[str, str], stage: str) -> float:
    done = subprocess.run([*HLSVAULT, "status", job_id, "--json"], env=env, capture_output=True,
                          text=True, timeout=60, check=True)
    stages = {s["name"]: s for s in json.loads(done.stdout)["stages"]}
    found = stages[stage]
    return float(found["finished_at"]) - float(found["started_at"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--clip", type=Path, default=None)
    options = parser.parse_args()
    clip = options.clip.resolve() if options.clip else ensure_clip()
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS_URL"))}
    env["HLSVAULT_DATA_DIR"] = str(RUN_DIR / "hlsvault-data")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    print(describe())
    print(f"clip: {clip.name} ({clip.stat().st_size / 1e6:.1f} MB), --ladder copy, 6 s segments")
    walls: dict[str, list[float]] = {"plain": [], "trick": []}
    cpus: dict[str, list[float]] = {"plain": [], "trick": []}
    stage: list[float] = []
    iframes = segments = 0
    for round_number in range(options.rounds):
        order = ("plain", "trick") if round_number % 2 == 0 else ("trick", "plain")
        for kind in order:
            extra = ["--trick-play"] if kind == "trick" else []
            args = [*HLSVAULT, "package", str(clip), "--ladder", "copy", "--asset",
                    f"{kind}{round_number}", "--json", *extra]
            wall, cpu, summary = run(args, env)
            walls[kind].append(wall)
            cpus[kind].append(cpu)
            if kind == "trick":
                stage.append(stage_seconds(str(summary["job_id"]), env, "trickplay"))
                renditions = {r["name"]: r for r in summary["renditions"]}
                iframes = int(renditions["iframes"]["segments"])
                segments = max(int(r["segments"]) for name, r in renditions.items()
                               if name != "iframes")
            print(f"round {round_number} {kind}: {wall:.2f} s wall, {cpu:.2f} CPU-s")
    plain, trick = statistics.median(walls["plain"]), statistics.median(walls["trick"])
    print(f"load average: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"RESULT trickplay: package {plain:.2f} s, with --trick-play {trick:.2f} s "
          f"(+{trick - plain:.2f} s, x{trick / plain:.2f}); trickplay stage "
          f"{statistics.median(stage):.2f} s for {iframes} I-frames of {segments} segments; "
          f"CPU {statistics.median(cpus['plain']):.2f} -> {statistics.median(cpus['trick']):.2f} s")


if __name__ == "__main__":
    main()
