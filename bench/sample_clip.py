"""The benchmark clip: 120 s of 1080p30 H.264 High + AAC, generated once and cached.

Generated from ffmpeg's lavfi sources (testsrc2 + sine), so every machine benchmarks the same
bytes-per-second without shipping a video. The clip lives in ``bench/.work/`` (gitignored);
its name carries its parameters, so changing them generates a new clip instead of reusing a
stale one.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
#: Scratch for clips, outputs and data dirs; listed in .gitignore.
WORK_DIR = BENCH_DIR / ".work"

CLIP_SECONDS = 120
CLIP_SIZE = "1920x1080"
CLIP_FPS = 30
#: A keyframe every 2 s: 6 s HLS segments can then be cut on a keyframe without re-encoding.
CLIP_GOP_FRAMES = 2 * CLIP_FPS
#: About 15.5 Mbit/s with the audio: a high-quality 1080p30 upload (~236 MB for the clip), so
#: that the work a packager does per byte (remux, encryption, writes) dominates its fixed costs.
CLIP_VIDEO_KBPS = 15500
CLIP_VIDEO_BITRATE = f"{CLIP_VIDEO_KBPS}k"
CLIP_AUDIO_BITRATE = "128k"
#: Generating 120 s of 1080p with x264 veryfast takes about a minute on two cores.
GENERATE_TIMEOUT_S = 1800


def clip_path() -> Path:
    """Where the clip is cached; the name spells out every parameter that shapes it."""
    size = f"{CLIP_SIZE}p{CLIP_FPS}"
    return WORK_DIR / f"clip-{CLIP_SECONDS}s-{size}-g{CLIP_GOP_FRAMES}-{CLIP_VIDEO_BITRATE}.mp4"


def generate_args(out: Path) -> list[str]:
    """The ffmpeg command that writes the clip to ``out``."""
    return [
        "ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={CLIP_SIZE}:rate={CLIP_FPS}:duration={CLIP_SECONDS}",
        "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={CLIP_SECONDS}",
        "-c:v", "libx264", "-preset", "veryfast", "-profile:v", "high", "-pix_fmt", "yuv420p",
        "-b:v", CLIP_VIDEO_BITRATE, "-maxrate", CLIP_VIDEO_BITRATE,
        "-bufsize", f"{2 * CLIP_VIDEO_KBPS}k",
        "-g", str(CLIP_GOP_FRAMES), "-keyint_min", str(CLIP_GOP_FRAMES), "-sc_threshold", "0",
        "-c:a", "aac", "-b:a", CLIP_AUDIO_BITRATE,
        "-movflags", "+faststart", "-shortest",
        "-f", "mp4", str(out),
    ]


def ensure_clip() -> Path:
    """The cached clip, generating it first when it is missing."""
    path = clip_path()
    if path.is_file() and path.stat().st_size > 0:
        return path
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    print(f"generating {path.name} (once; cached in {WORK_DIR}) ...", flush=True)
    # Written aside and renamed, so an interrupted run never leaves a truncated clip cached.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        subprocess.run(generate_args(tmp), check=True, timeout=GENERATE_TIMEOUT_S)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
