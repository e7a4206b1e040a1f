"""Benchmark: the default ladder in hlsvault against one ffmpeg that decodes once, side by side.

Both transcode the same cached 60 s 1920x1080p30 H.264/AAC clip into the default ladder (1080p,
720p, 480p, 360p), 6 s segments, with the same x264 preset, bitrates, VBV, GOP and forced
keyframes, and AAC at the ladder's audio rates:

- ffmpeg:   one command: ``-filter_complex [0:v]fps,split=4`` into four scalers and encoders,
            four HLS outputs (``-f hls``, unencrypted): the floor for any packager that
            decodes the source once.
- hlsvault: ``hlsvault package clip --ladder default --asset benchN --json`` in embedded mode
            (REDIS_URL unset, HLSVAULT_DATA_DIR in bench/.work): probe, the chunk's one ffmpeg
            (a 60 s source is one chunk), an ffprobe of each rendition's output, AES-128, key,
            catalog, publish to the local origin.

Rounds alternate the order. Reported are the median wall clock of each whole command, the
median CPU time of it and every process it waited for (getrusage of children), and both
ratios hlsvault / ffmpeg.

    python bench/bench_ladder.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from fleet_bench import lavfi_clip
from machine import describe, timed_command
from sample_clip import WORK_DIR

from pipeline.plan import DEFAULT_RUNGS, MAX_RATE_FACTOR
from pipeline.segment import X264_PRESET

#: The issue: hlsvault's ladder should cost at most 5 % more than one decode-once command.
TARGET_RATIO = 1.05
DEFAULT_ROUNDS = 3
CLIP_SECONDS = 60
CLIP = WORK_DIR / f"clip-{CLIP_SECONDS}s-1920x1080p30-g60.mp4"
RUN_DIR = WORK_DIR / "ladder"
SEGMENT_S = 6
FPS = 30
#: Four 1080p-ladder encodes of a minute take a few minutes on two cores; this is a hang.
COMMAND_TIMEOUT_S = 1800
FFMPEG = "ffmpeg-split"
HLSVAULT = "hlsvault"
CONTENDERS = (FFMPEG, HLSVAULT)


def ffmpeg_split_args(clip: Path, out_dir: Path) -> list[str]:
    """One ffmpeg, one decode, the default ladder's four encodes (as hlsvault configures x264)."""
    labels = [f"v{height}" for height, _, _ in DEFAULT_RUNGS]
    scalers = ";".join(
        f"[s{index}]scale={round(1920 * height / 1080 / 2) * 2}:{height}[{label}]"
        for index, ((height, _, _), label) in enumerate(zip(DEFAULT_RUNGS, labels, strict=True))
    )
    graph = (f"[0:v:0]fps={FPS},split={len(labels)}"
             + "".join(f"[s{index}]" for index in range(len(labels))) + ";" + scalers)
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip),
            "-filter_complex", graph]
    for (height, video_kbps, audio_kbps), label in zip(DEFAULT_RUNGS, labels, strict=True):
        rendition = out_dir / f"{height}p"
        rendition.mkdir(parents=True)
        gop = FPS * SEGMENT_S
        args += [
            "-map", f"[{label}]", "-map", "0:a:0",
            "-c:v", "libx264", "-preset", X264_PRESET,
            "-profile:v", "high" if height >= 720 else "main", "-pix_fmt", "yuv420p",
            "-b:v", f"{video_kbps}k", "-maxrate", f"{int(video_kbps * MAX_RATE_FACTOR)}k",
            "-bufsize", f"{video_kbps * 2}k", "-g", str(gop), "-keyint_min", str(gop),
            "-sc_threshold", "0", "-force_key_frames", f"expr:gte(t,n_forced*{SEGMENT_S})",
            "-c:a", "aac", "-b:a", f"{audio_kbps}k", "-ac", "2",
            "-f", "hls", "-hls_time", str(SEGMENT_S), "-hls_playlist_type", "vod",
            "-hls_segment_filename", str(rendition / "seg_%05d.ts"), str(rendition / "index.m3u8"),
        ]
    return args


def hlsvault_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HLSVAULT_")}
    env.pop("REDIS_URL", None)
    env["HLSVAULT_DATA_DIR"] = str(RUN_DIR / "hlsvault-data")
    return env


def hlsvault_args(clip: Path, label: str) -> list[str]:
    beside = Path(sys.executable).parent / "hlsvault"
    return [str(beside), "package", str(clip), "--ladder", "default", "--asset",
            f"bench{label}", "--json"]


def timed(args: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """Wall and CPU seconds (the command and every process it waited for)."""
    ran = timed_command(args, env, timeout_s=COMMAND_TIMEOUT_S, bench="bench_ladder")
    return ran.wall, ran.cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    args = parser.parse_args(argv)
    clip = lavfi_clip(CLIP, seconds=CLIP_SECONDS, size="1920x1080", gop=60)
    shutil.rmtree(RUN_DIR, ignore_errors=True)
    RUN_DIR.mkdir(parents=True)
    print(describe())
    print(f"clip: {clip.name} ({clip.stat().st_size / 1e6:.1f} MB), default ladder "
          f"(1080p, 720p, 480p, 360p), {SEGMENT_S} s segments, x264 {X264_PRESET}; "
          f"{args.rounds} rounds, order alternating")
    print(f"{'round':<7}{'contender':<14}{'wall s':>9}{'cpu s':>9}")
    results: dict[str, list[tuple[float, float]]] = {c: [] for c in CONTENDERS}
    for index in range(args.rounds):
        order = CONTENDERS if index % 2 == 0 else CONTENDERS[::-1]
        for name in order:
            os.sync()
            if name == FFMPEG:
                out = RUN_DIR / f"ffmpeg-{index}"
                wall, cpu = timed(ffmpeg_split_args(clip, out))
                shutil.rmtree(out)
            else:
                wall, cpu = timed(hlsvault_args(clip, str(index)), hlsvault_env())
            results[name].append((wall, cpu))
            print(f"{index + 1:<7}{name:<14}{wall:>9.1f}{cpu:>9.1f}", flush=True)
    walls = {n: statistics.median(w for w, _ in r) for n, r in results.items()}
    cpus = {n: statistics.median(c for _, c in r) for n, r in results.items()}
    for name in CONTENDERS:
        print(f"median {name:<14}wall {walls[name]:.1f} s, cpu {cpus[name]:.1f} s")
    wall_ratio = walls[HLSVAULT] / walls[FFMPEG]
    cpu_ratio = cpus[HLSVAULT] / cpus[FFMPEG]
    verdict = "met" if wall_ratio <= TARGET_RATIO else "MISSED"
    print(f"RESULT ladder: hlsvault {walls[HLSVAULT]:.1f} s ({cpus[HLSVAULT]:.1f} CPU-s), "
          f"one-decode ffmpeg {walls[FFMPEG]:.1f} s ({cpus[FFMPEG]:.1f} CPU-s), ratio "
          f"{wall_ratio:.3f} wall, {cpu_ratio:.3f} CPU (target <= {TARGET_RATIO}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
