"""Segmenting: one rendition of the source cut into plain MPEG-TS segments by ffmpeg."""

from __future__ import annotations

import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ffmpeg

from .errors import StageTimeout, TransientError, UnsupportedMedia
from .media import MediaInfo, ffmpeg_reason, probe
from .plan import MAX_RATE_FACTOR, Rendition
from .sources import ffmpeg_input, shown_name, source_demuxer

#: Progress callbacks are rate limited: the job record is not a firehose.
PROGRESS_INTERVAL_S = 0.5
#: x264 preset: "veryfast" keeps a 1080p ladder near real time on two cores at a small size cost.
X264_PRESET = "veryfast"
SEGMENT_PATTERN = "seg_%05d.ts"
PLAIN_PLAYLIST = "plain.m3u8"

ProgressCallback = Callable[[float], None]


@dataclass(frozen=True)
class Segment:
    sequence: int  # media sequence number: also the IV when EXT-X-KEY carries none
    name: str
    duration: float
    size: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SegmentedRendition:
    """What the segment stage produced for one rendition: measured from the output of a
    transcode, taken from the source's probe for a remux (which leaves the streams as they
    are)."""

    rendition: str
    segments: tuple[Segment, ...]
    width: int
    height: int
    frame_rate: str
    video_profile: str | None
    video_level: int | None
    audio_codec: str | None
    audio_profile: str | None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["segments"] = [segment.to_dict() for segment in self.segments]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SegmentedRendition:
        fields = dict(data)
        fields["segments"] = tuple(Segment(**segment) for segment in data["segments"])
        return cls(**fields)


def ffmpeg_args(
    source: str,
    rendition: Rendition,
    out_dir: Path,
    segment_seconds: float,
    *,
    has_audio: bool,
    demuxer: str,
) -> list[str]:
    """The ffmpeg command that writes ``rendition`` as plain segments into ``out_dir``,
    reading ``source`` with ``demuxer`` (the probe's) under the source allow-lists."""
    name, input_options = ffmpeg_input(source, demuxer=demuxer)
    stream = ffmpeg.input(name, **input_options)
    video = stream["v:0"]
    outputs: list[Any] = [video]
    options: dict[str, Any] = {
        "format": "hls",
        "hls_time": f"{segment_seconds:g}",
        "hls_playlist_type": "vod",
        "hls_list_size": 0,
        "hls_segment_type": "mpegts",
        "hls_segment_filename": str(out_dir / SEGMENT_PATTERN),
        "map_metadata": -1,
    }
    if has_audio:
        outputs.append(stream["a:0"])
    if rendition.copy:
        options["c"] = "copy"
    else:
        if rendition.video_kbps is None or rendition.gop_frames is None:
            raise ValueError(f"rendition {rendition.name} is a transcode without rate or GOP")
        video = video.filter("fps", fps=rendition.frame_rate).filter(
            "scale", rendition.width, rendition.height
        )
        outputs[0] = video
        options.update(
            {
                "c:v": "libx264",
                "preset": X264_PRESET,
                "profile:v": "high" if rendition.height >= 720 else "main",
                "pix_fmt": "yuv420p",
                "b:v": f"{rendition.video_kbps}k",
                "maxrate": f"{int(rendition.video_kbps * MAX_RATE_FACTOR)}k",
                "bufsize": f"{rendition.video_kbps * 2}k",
                "g": rendition.gop_frames,
                "keyint_min": rendition.gop_frames,
                "sc_threshold": 0,
                "force_key_frames": f"expr:gte(t,n_forced*{segment_seconds:g})",
            }
        )
        if has_audio:
            options.update({"c:a": "aac", "b:a": f"{rendition.audio_kbps or 96}k", "ac": 2})
    output = ffmpeg.output(*outputs, str(out_dir / PLAIN_PLAYLIST), **options)
    args: list[str] = (
        output.global_args(
            "-nostdin", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1"
        )
        .overwrite_output()
        .compile()
    )
    return args


def run_ffmpeg(
    args: list[str], *, duration: float, timeout: float, on_progress: ProgressCallback | None
) -> None:
    """Run ffmpeg, reporting progress from its ``-progress`` output, killing it at ``timeout``."""
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=stderr)
        stdout = process.stdout
        if stdout is None:  # Popen with stdout=PIPE always sets it; narrows the type
            raise RuntimeError("ffmpeg's stdout pipe was not opened")
        deadline = time.monotonic() + timeout
        last_report = 0.0
        selector = selectors.DefaultSelector()
        selector.register(stdout, selectors.EVENT_READ)
        buffer = b""
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StageTimeout(f"ffmpeg ran longer than {timeout:.0f} s and was stopped")
                if not selector.select(timeout=min(remaining, 1.0)):
                    continue
                chunk = os.read(stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    key, _, value = line.decode(errors="replace").partition("=")
                    if key == "out_time_us" and on_progress and duration > 0:
                        now = time.monotonic()
                        if now - last_report >= PROGRESS_INTERVAL_S and value.strip().isdigit():
                            last_report = now
                            on_progress(min(1.0, int(value) / 1e6 / duration))
            returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except (StageTimeout, subprocess.TimeoutExpired):
            process.kill()
            process.wait()
            raise StageTimeout(f"ffmpeg ran longer than {timeout:.0f} s and was stopped") from None
        finally:
            selector.close()
            stdout.close()
            if process.poll() is None:
                process.kill()
                process.wait()
        if returncode < 0:
            raise TransientError(f"ffmpeg was killed by signal {-returncode}")
        if returncode != 0:
            stderr.seek(0)
            errors = stderr.read()
            reason = ffmpeg_reason(errors) if errors.strip() else f"exit status {returncode}"
            raise UnsupportedMedia(f"ffmpeg could not segment the source: {reason}")
    if on_progress:
        on_progress(1.0)


def parse_plain_playlist(out_dir: Path) -> list[Segment]:
    """Read back the segment names and exact durations ffmpeg wrote into its playlist."""
    segments: list[Segment] = []
    duration: float | None = None
    for line in (out_dir / PLAIN_PLAYLIST).read_text().splitlines():
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:") :].split(",", 1)[0])
        elif line and not line.startswith("#") and duration is not None:
            name = line.strip().rsplit("/", 1)[-1]
            sequence = len(segments)
            segments.append(Segment(sequence, name, duration, (out_dir / name).stat().st_size))
            duration = None
    if not segments:
        raise UnsupportedMedia("ffmpeg produced no segments: the source has no decodable frames")
    return segments


def segment_rendition(
    source: str,
    rendition: Rendition,
    out_dir: Path,
    *,
    info: MediaInfo,
    segment_seconds: float,
    timeout: float,
    on_progress: ProgressCallback | None = None,
) -> SegmentedRendition:
    """Cut ``rendition`` of ``source`` (whose probe is ``info``) into ``out_dir`` and describe
    what was produced."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("seg_*.ts"):
        stale.unlink()  # a previous, interrupted attempt: start from a clean directory
    demuxer = source_demuxer(info.format_name, shown_name(source))
    args = ffmpeg_args(
        source,
        rendition,
        out_dir,
        segment_seconds,
        has_audio=info.audio is not None,
        demuxer=demuxer,
    )
    run_ffmpeg(args, duration=info.duration, timeout=timeout, on_progress=on_progress)
    segments = parse_plain_playlist(out_dir)
    if rendition.copy:
        # A remux moves the same H.264 and AAC bitstreams into MPEG-TS: size, profile, level
        # and audio profile are the source's, so its probe describes the output (and saves an
        # ffprobe process, ~0.08 s). Rotation, the one thing TS cannot carry, rules out a copy.
        video, audio = info.video, info.audio
    else:
        # A transcode's CODECS must be measured from what the encoder actually produced.
        produced = probe(str(out_dir / segments[0].name), shown=f"segment {segments[0].name}")
        video, audio = produced.video, produced.audio
    return SegmentedRendition(
        rendition=rendition.name,
        segments=tuple(segments),
        width=video.width,
        height=video.height,
        frame_rate=rendition.frame_rate,
        video_profile=video.profile,
        video_level=video.level,
        audio_codec=audio.codec if audio else None,
        audio_profile=audio.profile if audio else None,
    )
