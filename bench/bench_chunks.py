"""Benchmark: one long video on one segment process against two, and what that says about many.

One job of a ``--seconds`` long ``--size`` H.264/AAC clip (the issue's case: 300 s of 1080p;
see docs/benchmarks.md for what was run here), ``--ladder default``, through the whole fleet
of tests/fleet.py (redis-server, moto server, the Procfile's processes, every store ``s3://``),
cut into ``--chunk-seconds`` chunks. The `upload` and `encrypt` processes run throughout; the
job is run once with one `segment` process and once with two, in an order that alternates by
round. Each segment process is the Procfile's command pinned to a core of its own (``taskset
-c N``), so each ffmpeg gets one core's worth of threads whatever x264 would start: the
figure measures the fleet sharing one video, not x264's own threading. Reported is the job's
wall time (``created_at`` to ``finished_at``) in each configuration and the speed-up.

Then, from the one-process run: per chunk, the ffmpeg time (a wrapper on the fleet's PATH
times every ffmpeg/ffprobe), the coordination around it (the segment stage less its ffmpeg,
the encrypt stage, the queue hops), and the job's S3 requests (moto's log) and Redis commands
(``INFO commandstats``) per chunk. From those it projects the wall time of a 2-hour film in
60 s chunks on 1, 10 and 100 single-core segment machines, and where more machines stop
helping.

    python bench/bench_chunks.py [--seconds S] [--size WxH] [--chunk-seconds S] [--rounds N]
                                 [--two-first]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from fleet_bench import SEQUENTIAL, BenchFleet, ToolRun, lavfi_clip
from machine import describe
from sample_clip import WORK_DIR

#: The issue: two segment processes should finish one long job at least 1.8 times as fast.
TARGET_SPEEDUP = 1.8
DEFAULT_SECONDS = 300
DEFAULT_SIZE = "1920x1080"
DEFAULT_CHUNK_SECONDS = 60
DEFAULT_ROUNDS = 1
RUN_DIR = WORK_DIR / "chunks"
READY_TIMEOUT_S = 60
READY_LINE = "Worker process is ready for action."
#: The projection: a 2-hour film in the product's default chunks.
FILM_SECONDS = 2 * 3600
FILM_CHUNK_SECONDS = 60
MACHINES = (1, 10, 100)


@dataclass(frozen=True)
class ChunkTimes:
    name: str
    segment_wall: float
    ffmpeg: float  # the chunk's ffmpeg process
    ffprobe: float  # probes of the chunk's output, one per rendition
    encrypt_wall: float
    hop_to_encrypt: float  # segment finished -> encrypt started


@dataclass(frozen=True)
class Run:
    processes: int
    wall: float
    fields: dict[str, str]
    chunks: tuple[ChunkTimes, ...]
    s3_requests: int
    redis_commands: int


#: How often the benchmark's submitter reads the job's status.
STATUS_POLL_S = 0.5


def redis_calls(bench: BenchFleet) -> int:
    stats = bench.redis.client().info("commandstats")
    return sum(int(value["calls"]) for value in stats.values())


def start_segments(bench: BenchFleet, count: int) -> list[str]:
    """``count`` segment processes, each the Procfile's command pinned to its own core."""
    kinds = []
    for index in range(count):
        kind = f"segment{index}"
        bench.fleet.commands[kind] = (f"taskset -c {index % (os.cpu_count() or 1)} "
                                      + bench.fleet.commands["segment"])
        log = bench.run_dir / "logs" / f"{kind}.0.log"
        size = log.stat().st_size if log.exists() else 0
        bench.fleet.start(kind)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while READY_LINE not in (log.read_text(errors="replace")[size:] if log.exists() else ""):
            if time.monotonic() > deadline:
                sys.exit(f"bench_chunks: {kind} not ready after {READY_TIMEOUT_S} s")
            time.sleep(0.1)
        kinds.append(kind)
    return kinds


def within(runs: list[ToolRun], tool: str, start: float, end: float, worker: int) -> float:
    """Wall seconds of ``tool`` that ``worker`` (a pid) ran between ``start`` and ``end``: with
    two segment processes their chunks overlap in time, so the time alone cannot tell."""
    return sum(r.end - r.start for r in runs if r.tool == tool and r.parent == worker
               and r.start >= start - 0.05 and r.end <= end + 0.05)


def chunk_times(fields: dict[str, str], runs: list[ToolRun]) -> tuple[ChunkTimes, ...]:
    names = sorted(k.split(".")[0].split(":")[1] for k in fields
                   if k.startswith("segment:c") and k.endswith(".status"))
    times = []
    for name in names:
        seg_start = float(fields[f"segment:{name}.started_at"])
        seg_end = float(fields[f"segment:{name}.finished_at"])
        enc_start = float(fields[f"encrypt:{name}.started_at"])
        enc_end = float(fields[f"encrypt:{name}.finished_at"])
        # workers.flow.worker_name: "host:pid" of the process that ran the stage.
        worker = int(json.loads(fields[f"segment:{name}.worker"]).rsplit(":", 1)[1])
        times.append(ChunkTimes(
            name, seg_end - seg_start, within(runs, "ffmpeg", seg_start, seg_end, worker),
            within(runs, "ffprobe", seg_start, seg_end, worker), enc_end - enc_start,
            enc_start - seg_end,
        ))
    return tuple(times)


def run_job(bench: BenchFleet, clip: Path, processes: int) -> Run:
    [source] = bench.stage_sources(clip, 1)
    kinds = start_segments(bench, processes)
    requests, commands = bench.moto_requests(), redis_calls(bench)
    # The job takes minutes and its wall time is read from its record, so the submitter looks
    # twice a second: at the orchestration benchmark's 5 ms it took ~7 % of a core (and Redis
    # some more) from the two segment processes, and its reads were most Redis commands.
    [(job_id, _)] = bench.submit(SEQUENTIAL, [source], "default", poll_s=STATUS_POLL_S)
    requests = bench.moto_requests() - requests
    commands = redis_calls(bench) - commands - bench.status_reads
    for kind in kinds:
        bench.fleet.kill(kind, signal.SIGTERM)
    fields = bench.record(job_id)
    # One job at a time: every ffmpeg and ffprobe inside a stage's interval is that stage's
    # (the probes of a chunk's output name no source, so they carry no tag).
    runs = bench.tool_runs()
    return Run(processes, float(fields["finished_at"]) - float(fields["created_at"]), fields,
               chunk_times(fields, runs), requests, commands)


def per_worker(run: Run) -> list[int]:
    """How many chunks each segment worker ran (the last delivery of each chunk)."""
    workers = [run.fields.get(f"segment:{c.name}.worker", "?") for c in run.chunks]
    return sorted((workers.count(w) for w in set(workers)), reverse=True)


def tail(run: Run) -> float:
    """From the last chunk segmented to the job's end: encrypt, playlist, upload, invalidate."""
    last = max(float(run.fields[f"segment:{c.name}.finished_at"]) for c in run.chunks)
    return float(run.fields["finished_at"]) - last


def stage_wall(fields: dict[str, str], stage: str) -> float:
    if f"{stage}.started_at" not in fields:
        return 0.0
    return float(fields[f"{stage}.finished_at"]) - float(fields[f"{stage}.started_at"])


def project(run: Run, source_s: float, chunk_s: float) -> None:
    """Print the 2-hour film's projected wall time on 1, 10 and 100 segment machines."""
    chunks = run.chunks
    scale = FILM_CHUNK_SECONDS / chunk_s
    encode = statistics.median(c.ffmpeg for c in chunks) * scale
    fixed = statistics.median(c.ffprobe + c.hop_to_encrypt for c in chunks)
    # S3 transfers and AES grow with the chunk's bytes, so with its length.
    per_second = statistics.median(
        (c.segment_wall - c.ffmpeg - c.ffprobe + c.encrypt_wall) / chunk_s for c in chunks
    )
    coordination = fixed + per_second * FILM_CHUNK_SECONDS
    chunk_cost = encode + coordination
    film_chunks = FILM_SECONDS // FILM_CHUNK_SECONDS
    fields = run.fields
    # The parts no number of segment machines shortens, scaled from this run to the film.
    film = FILM_SECONDS / source_s
    serial = {
        "probe": stage_wall(fields, "probe"),
        "playlist": stage_wall(fields, "playlist") * film,
        "upload (server-side copies)": stage_wall(fields, "upload") * film,
        "invalidate": stage_wall(fields, "invalidate"),
    }
    serial_s = sum(serial.values())
    # The audio pass is not serial: it takes one segment machine's thread for the film's
    # audio, and releases chunk i once the encoder has passed its end (pipeline/audio.py).
    audio_s = stage_wall(fields, "audio") * film
    print(f"per chunk (measured at {chunk_s:g} s chunks, one core): ffmpeg "
          f"{statistics.median(c.ffmpeg for c in chunks):.1f} s, output probes "
          f"{statistics.median(c.ffprobe for c in chunks):.2f} s, segment stage less ffmpeg "
          f"{statistics.median(c.segment_wall - c.ffmpeg - c.ffprobe for c in chunks):.2f} s, "
          f"encrypt stage {statistics.median(c.encrypt_wall for c in chunks):.2f} s, hop to "
          f"encrypt {statistics.median(c.hop_to_encrypt for c in chunks):.2f} s")
    print(f"per chunk, whole job's calls / chunks: {run.s3_requests / len(chunks):.1f} S3 "
          f"requests (moto), {run.redis_commands / len(chunks):.0f} Redis commands (the fleet's "
          "idle consumers' fallback fetches and heartbeats included; the benchmark's own status "
          "reads left out)")
    print(f"2-hour film in {FILM_CHUNK_SECONDS} s chunks: {film_chunks} chunks; per chunk "
          f"{encode:.0f} s of ffmpeg + {coordination:.1f} s of coordination; audio pass "
          f"{audio_s:.0f} s on one machine beside the chunks (chunk i released after "
          f"{audio_s / film_chunks:.1f} s x (i + 1)); serial parts "
          + ", ".join(f"{k} {v:.0f} s" for k, v in serial.items()))

    def wall(machines: int) -> float:
        # Each chunk, in order, to the machine free first, not before its audio is released;
        # one machine starts with the audio pass.
        free = [audio_s] + [0.0] * (min(machines, film_chunks + 1) - 1)
        for index in range(film_chunks):
            machine = min(range(len(free)), key=free.__getitem__)
            free[machine] = max(free[machine], audio_s * (index + 1) / film_chunks) + chunk_cost
        return serial_s + max(free)

    print(f"{'segment machines':>17}{'projected wall':>16}{'speed-up':>10}{'coordination %':>16}")
    for machines in MACHINES:
        rounds = math.ceil(film_chunks / min(machines, film_chunks))
        share = (serial_s + rounds * coordination) / wall(machines)
        print(f"{machines:>17}{wall(machines) / 60:>13.1f} min{wall(1) / wall(machines):>10.1f}"
              f"{share:>15.0%}")
    # Past this many machines the parts no machine count shortens (the upload, the hops, the
    # first chunk's audio) take more of the wall time than the chunks themselves.
    knee = film_chunks * chunk_cost / (serial_s + audio_s / film_chunks)
    print(f"gain stops: serial parts {serial_s / 60:.1f} min, one round of chunks "
          f"{chunk_cost / 60:.1f} min; from {knee:.0f} machines on the serial parts are half "
          f"the wall time or more; beyond {film_chunks} (one chunk each) nothing is gained")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--seconds", type=int, default=DEFAULT_SECONDS)
    parser.add_argument("--size", default=DEFAULT_SIZE)
    parser.add_argument("--chunk-seconds", type=int, default=DEFAULT_CHUNK_SECONDS)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--two-first", action="store_true",
                        help="start with two segment processes (the order still alternates)")
    args = parser.parse_args(argv)
    clip = lavfi_clip(WORK_DIR / f"clip-{args.seconds}s-{args.size}p30-g60.mp4",
                      seconds=args.seconds, size=args.size, gop=60)
    bench = BenchFleet(RUN_DIR, extra_env={"HLSVAULT_CHUNK_SECONDS": str(args.chunk_seconds)})
    runs: list[Run] = []
    try:
        bench.start(("upload", "encrypt"))
        print(describe())
        print(f"clip: {clip.name} ({clip.stat().st_size / 1e6:.1f} MB), --ladder default, 6 s "
              f"segments, HLSVAULT_CHUNK_SECONDS={args.chunk_seconds}; each segment process "
              f"pinned to one core; {os.cpu_count()} CPUs")
        print(f"{'round':<6}{'segment procs':>14}{'wall s':>9}{'chunks':>8}"
              f"{'chunks per worker':>19}{'ffmpeg busy':>13}{'audio s':>9}{'tail s':>8}")
        for index in range(args.rounds):
            for processes in ((1, 2) if (index + args.two_first) % 2 == 0 else (2, 1)):
                run = run_job(bench, clip, processes)
                runs.append(run)
                print(f"{index + 1:<6}{processes:>14}{run.wall:>9.1f}{len(run.chunks):>8}"
                      f"{'+'.join(map(str, per_worker(run))):>19}"
                      f"{sum(c.ffmpeg for c in run.chunks) / (run.wall * processes):>12.0%}"
                      f"{stage_wall(run.fields, 'audio'):>9.1f}{tail(run):>8.1f}", flush=True)
    finally:
        bench.stop()
    medians = {n: statistics.median(r.wall for r in runs if r.processes == n) for n in (1, 2)}
    speedup = medians[1] / medians[2]
    verdict = "met" if speedup >= TARGET_SPEEDUP else "MISSED"
    print(f"RESULT chunks: one segment process {medians[1]:.1f} s, two {medians[2]:.1f} s, "
          f"speed-up {speedup:.2f} (target >= {TARGET_SPEEDUP}: {verdict})")
    one = next(r for r in runs if r.processes == 1)
    planned = json.loads(one.fields["chunks"])
    project(one, float(args.seconds), float(planned[0]["duration"] or args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
