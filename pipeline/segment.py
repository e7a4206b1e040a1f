"""Segmenting: one time chunk of the source cut, for every rendition at once, into plain MPEG-TS
segments by one ffmpeg that decodes the source once."""

from __future__ import annotations

import os
import selectors
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ffmpeg

from .errors import StageTimeout, TransientError, UnsupportedMedia
from .media import MediaInfo, ffmpeg_reason, probe
from .plan import MAX_RATE_FACTOR, Chunk, Rendition
from .sources import ffmpeg_input, shown_name, source_demuxer, work_input

if TYPE_CHECKING:
    from .sealing import SegmentSealer

#: Progress callbacks are rate limited: the job record is not a firehose.
PROGRESS_INTERVAL_S = 0.5
#: x264 preset: "veryfast" keeps a 1080p ladder near real time on two cores at a small size cost.
X264_PRESET = "veryfast"
#: Audio bitrate of a rendition whose plan names none (planned before audio rates were kept).
DEFAULT_AUDIO_KBPS = 96
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


#: Every chunk's muxers (hls, and the MPEG-TS muxer inside it) keep the timestamps they are
#: given. By default each shifts a stream whose first timestamp is negative (x264's B-frame
#: delay, AAC priming) to start at 0, which only chunk 0 has: its timeline would then run 67 ms
#: ahead of every other chunk's and jump back at the first join. MPEG-TS adds 1.4 s to every
#: timestamp anyway, so none is negative in the segments.
KEEP_TIMESTAMPS = "disabled"
CHUNK_TS_OPTIONS = f"avoid_negative_ts={KEEP_TIMESTAMPS}"


@dataclass(frozen=True)
class AudioPiece:
    """A chunk's share of the job's audio (see :mod:`pipeline.audio`), as ffmpeg reads it."""

    path: Path
    offset: float  # where its first frame starts, in seconds after the chunk's start


def chunk_args(
    source: str,
    renditions: Sequence[Rendition],
    chunk: Chunk,
    out_dir: Path,
    segment_seconds: float,
    *,
    has_audio: bool,
    demuxer: str,
    audio: Mapping[int, AudioPiece] | None = None,
    temp_files: bool = False,
) -> list[str]:
    """The one ffmpeg command that writes ``chunk`` of every rendition as plain segments into
    ``out_dir/<rendition>/``, reading ``source`` with ``demuxer`` (the probe's) under the source
    allow-lists.

    The source is decoded once: its video goes through ``fps`` and then a ``split`` into one
    scaler and encoder per rendition. Audio is either copied from the chunk's pieces of the
    job's one audio encode (``audio``, by bitrate: a chunked job) or encoded here from the
    decoded source audio (a job of one chunk). A remux copies both streams. With
    ``temp_files`` a segment appears under its name only once ffmpeg has closed it (sealing).
    """
    name, input_options = ffmpeg_input(source, demuxer=demuxer)
    seek: dict[str, str] = {}
    if chunk.start > 0:
        seek["ss"] = f"{chunk.start:.6f}"
    if chunk.duration is not None:
        seek["t"] = f"{chunk.duration:.6f}"
    stream = ffmpeg.input(name, **seek, **input_options)
    copy = any(r.copy for r in renditions)
    if copy and len(renditions) != 1:
        raise ValueError("a remux makes exactly one rendition")
    video = stream["v:0"]
    if copy:
        branches = [video]
    else:
        frame_rate = renditions[0].frame_rate
        if any(r.frame_rate != frame_rate for r in renditions):
            raise ValueError("the renditions of one ladder share one frame rate")
        video = video.filter("fps", fps=frame_rate)
        if len(renditions) > 1:
            split = video.filter_multi_output("split", len(renditions))
            branches = [split[index] for index in range(len(renditions))]
        else:
            branches = [video]
    pieces = {
        kbps: audio_input(piece.path, piece.offset) for kbps, piece in (audio or {}).items()
    }
    outputs = []
    for rendition, branch in zip(renditions, branches, strict=True):
        rendition_dir = out_dir / rendition.name
        streams: list[Any] = [branch]
        options: dict[str, Any] = {
            "format": "hls",
            "hls_time": f"{segment_seconds:g}",
            "hls_playlist_type": "vod",
            "hls_list_size": 0,
            "hls_segment_type": "mpegts",
            "hls_segment_filename": str(rendition_dir / SEGMENT_PATTERN),
            "start_number": chunk.first_segment,
            "map_metadata": -1,
        }
        if temp_files:
            options["hls_flags"] = "temp_file"
        if copy:
            options["c"] = "copy"
            if has_audio:
                streams.append(stream["a:0"])
        else:
            streams[0] = branch.filter("scale", rendition.width, rendition.height)
            options.update(_x264_options(rendition, segment_seconds))
            # Where a single pass would have put this chunk's timestamps: continuous joins.
            options["output_ts_offset"] = f"{chunk.start:.6f}"
            options["avoid_negative_ts"] = KEEP_TIMESTAMPS
            options["hls_ts_options"] = CHUNK_TS_OPTIONS
            kbps = rendition.audio_kbps or DEFAULT_AUDIO_KBPS
            if audio is not None:
                streams.append(pieces[kbps]["a:0"])
                options["c:a"] = "copy"
            elif has_audio:
                streams.append(stream["a:0"])
                options.update({"c:a": "aac", "b:a": f"{kbps}k", "ac": 2})
        outputs.append(ffmpeg.output(*streams, str(rendition_dir / PLAIN_PLAYLIST), **options))
    args: list[str] = (
        ffmpeg.merge_outputs(*outputs)
        .global_args(
            "-nostdin", "-hide_banner", "-loglevel", "error", "-nostats", "-progress", "pipe:1"
        )
        .overwrite_output()
        .compile()
    )
    return args


def _x264_options(rendition: Rendition, segment_seconds: float) -> dict[str, Any]:
    if rendition.video_kbps is None or rendition.gop_frames is None:
        raise ValueError(f"rendition {rendition.name} is a transcode without rate or GOP")
    return {
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
        # The encoder's clock starts at 0 in every chunk, and chunks are whole segments: the
        # forced keyframes fall on the same instants as in one pass over the whole source.
        "force_key_frames": f"expr:gte(t,n_forced*{segment_seconds:g})",
    }


def audio_input(path: Path, offset: float) -> Any:
    """A chunk's audio piece (raw AAC frames) as an ffmpeg input, placed ``offset`` seconds
    after the chunk's start, opened under the work-file allow-lists."""
    name, options = work_input(str(path), demuxer="aac")
    return ffmpeg.input(name, itsoffset=f"{offset:.6f}", **options)


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


def parse_plain_playlist(
    out_dir: Path, first_sequence: int = 0, plain_sizes: Mapping[str, int] | None = None
) -> list[Segment]:
    """Read back the segment names and exact durations ffmpeg wrote into its playlist; the
    first is media sequence number ``first_sequence``. Sizes are the files' own, or taken from
    ``plain_sizes`` (segments sealed since ffmpeg wrote them)."""
    segments: list[Segment] = []
    duration: float | None = None
    for line in (out_dir / PLAIN_PLAYLIST).read_text().splitlines():
        if line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:") :].split(",", 1)[0])
        elif line and not line.startswith("#") and duration is not None:
            name = line.strip().rsplit("/", 1)[-1]
            sequence = first_sequence + len(segments)
            if plain_sizes is not None and name in plain_sizes:
                size = plain_sizes[name]
            else:
                size = (out_dir / name).stat().st_size
            segments.append(Segment(sequence, name, duration, size))
            duration = None
    if not segments:
        raise UnsupportedMedia("ffmpeg produced no segments: the source has no decodable frames")
    return segments


def segment_chunk(
    source: str,
    renditions: Sequence[Rendition],
    chunk: Chunk,
    out_dir: Path,
    *,
    info: MediaInfo,
    segment_seconds: float,
    timeout: float,
    audio: Mapping[int, AudioPiece] | None = None,
    on_progress: ProgressCallback | None = None,
    seal: SegmentSealer | None = None,
) -> dict[str, SegmentedRendition]:
    """Cut ``chunk`` of every rendition of ``source`` (whose probe is ``info``) into
    ``out_dir/<rendition>/`` with one ffmpeg, and describe what was produced, by rendition.
    With ``seal`` (one rendition), each segment is encrypted as soon as ffmpeg closes it."""
    for rendition in renditions:
        rendition_dir = out_dir / rendition.name
        rendition_dir.mkdir(parents=True, exist_ok=True)
        for stale in rendition_dir.glob("seg_*.ts"):
            stale.unlink()  # a previous, interrupted attempt: start from a clean directory
    demuxer = source_demuxer(info.format_name, shown_name(source))
    args = chunk_args(
        source, renditions, chunk, out_dir, segment_seconds,
        has_audio=info.audio is not None, demuxer=demuxer, audio=audio,
        temp_files=seal is not None,
    )
    length = chunk.duration if chunk.duration is not None else info.duration - chunk.start
    if seal is None:
        run_ffmpeg(args, duration=length, timeout=timeout, on_progress=on_progress)
    else:
        [rendition] = renditions
        with seal.sealing(out_dir / rendition.name, chunk.first_segment):
            run_ffmpeg(args, duration=length, timeout=timeout, on_progress=on_progress)
    plain_sizes = seal.plain_sizes() if seal is not None else None
    return {
        rendition.name: _describe(rendition, out_dir / rendition.name, chunk, info, plain_sizes)
        for rendition in renditions
    }


def _describe(
    rendition: Rendition, rendition_dir: Path, chunk: Chunk, info: MediaInfo,
    plain_sizes: Mapping[str, int] | None = None,
) -> SegmentedRendition:
    segments = parse_plain_playlist(rendition_dir, chunk.first_segment, plain_sizes)
    if chunk.segments is not None and len(segments) != chunk.segments:
        # The next chunk's segments are numbered after this one's planned count; a different
        # count would break the media sequence (and with it every IV) at the join.
        raise UnsupportedMedia(
            f"chunk {chunk.name} of {rendition.name} made {len(segments)} segments where "
            f"{chunk.segments} were planned: the source's video has gaps or a variable frame "
            "rate; set HLSVAULT_CHUNK_SECONDS=0 to transcode it in one piece"
        )
    if rendition.copy:
        # A remux moves the same H.264 and AAC bitstreams into MPEG-TS: size, profile, level
        # and audio profile are the source's, so its probe describes the output (and saves an
        # ffprobe process, ~0.08 s). Rotation, the one thing TS cannot carry, rules out a copy.
        video, audio = info.video, info.audio
    else:
        # A transcode's CODECS must be measured from what the encoder actually produced.
        first = rendition_dir / segments[0].name
        produced = probe(str(first), shown=f"segment {segments[0].name}")
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
