"""Probing: what is in the source, as ffprobe sees it, or a reason it cannot be packaged."""

from __future__ import annotations

import atexit
import json
import math
import re
import subprocess
import threading
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from .errors import InvalidSource, StageTimeout
from .records import each_known, from_known, required
from .sources import ffmpeg_input, format_refusal, shown_name, source_demuxer
from .storage import url_scheme

#: ffprobe reads headers only; a minute covers a slow network source, not a hung one.
PROBE_TIMEOUT_S = 60
_FORMAT_REFUSED = re.compile(r"\[([\w,]+) @ 0x[0-9a-fA-F]+\] Format not on whitelist")


@dataclass(frozen=True)
class VideoStream:
    codec: str
    profile: str | None
    level: int | None
    width: int
    height: int
    frame_rate: str  # exact rational, e.g. "30000/1001"
    pix_fmt: str | None
    rotation: int  # degrees clockwise the picture must be turned for display
    bit_rate: int | None

    @property
    def fps(self) -> float:
        return float(Fraction(self.frame_rate)) if self.frame_rate != "0/0" else 0.0

    @property
    def display_size(self) -> tuple[int, int]:
        """Width and height as shown, after rotation."""
        if self.rotation % 180:
            return self.height, self.width
        return self.width, self.height


@dataclass(frozen=True)
class AudioStream:
    codec: str
    profile: str | None
    channels: int
    sample_rate: int
    bit_rate: int | None
    #: Which audio stream of the source this is (ffmpeg's ``a:<index>``), and what its
    #: metadata says: language (as tagged, often ISO 639-2), title, default disposition.
    index: int = 0
    language: str | None = None
    title: str | None = None
    default: bool = False
    #: Where the stream's sound ends, in seconds from the source's start (ffmpeg's zero);
    #: None when the container does not say (or the source was probed before this was kept).
    end: float | None = None


@dataclass(frozen=True)
class SubtitleStream:
    """A subtitle stream of the source: which one (ffmpeg's ``s:<index>``), its codec, and
    what its metadata says (language as tagged, title, default and forced dispositions)."""

    index: int
    codec: str
    language: str | None = None
    title: str | None = None
    default: bool = False
    forced: bool = False


@dataclass(frozen=True)
class MediaInfo:
    """The facts about a source that planning and playlists need."""

    format_name: str
    duration: float
    size: int | None
    bit_rate: int | None
    video: VideoStream
    audio: AudioStream | None  # the first audio stream: what a muxed rendition carries
    #: Every audio stream, in the source's order (separate audio renditions: one each).
    audio_tracks: tuple[AudioStream, ...] = ()
    #: Every subtitle stream, in the source's order (text ones become WebVTT renditions).
    subtitle_tracks: tuple[SubtitleStream, ...] = ()
    #: Where the video's first frame lies after the source's start (ffmpeg's zero), seconds.
    video_start: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MediaInfo:
        video = from_known(VideoStream, required(cls, data, "video"))
        audio = from_known(AudioStream, data["audio"]) if data.get("audio") else None
        tracks = each_known(AudioStream, data.get("audio_tracks") or ())
        if not tracks and audio:
            tracks = (audio,)  # probed before every track was kept
        # Older records may lack (or have None for) the fields read with a default here.
        start = data.get("video_start") or 0.0
        return from_known(
            cls, {"size": None, "bit_rate": None, **data, "video_start": start},
            video=video,
            audio=audio,
            audio_tracks=tracks,
            subtitle_tracks=each_known(SubtitleStream, data.get("subtitle_tracks") or ()),
        )


def run_ffprobe(
    target: str, *, shown: str | None = None, timeout: float = PROBE_TIMEOUT_S
) -> dict[str, Any]:
    """ffprobe's JSON for ``target`` (a path or URL), opened under the source allow-lists of
    :func:`~pipeline.sources.ffmpeg_input`, or :class:`~pipeline.errors.InvalidSource` naming
    the source as ``shown`` (by default ``target``, less a URL's query string).

    ffmpeg-python's ``probe`` offers no timeout, so the same command is run here with one.
    """
    shown = shown or shown_name(target)
    args = _ffprobe_args(target)
    with _prefetch_lock:
        started = _prefetched.pop(tuple(args), None)
    try:
        if started is not None:
            stdout, stderr = started.communicate(timeout=timeout)
            returncode = started.returncode
        else:
            done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
            stdout, stderr, returncode = done.stdout, done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        if started is not None:
            started.kill()
            started.wait()
        raise StageTimeout(f"ffprobe did not answer within {timeout:.0f} s") from None
    if returncode != 0:
        refused = _refused_format(stderr)
        if refused is not None:
            raise InvalidSource(format_refusal(refused, shown))
        raise InvalidSource(
            f"source {shown} is {_unreadable(target, stderr)}; check it is a complete "
            "video file"
        )
    result: dict[str, Any] = json.loads(stdout or b"{}")
    return result


def _ffprobe_args(target: str) -> list[str]:
    name, options = ffmpeg_input(target)
    return [
        "ffprobe",
        "-v",
        "error",
        *[arg for option, value in options.items() for arg in (f"-{option}", value)],
        "-show_format",
        "-show_streams",
        "-of",
        "json",
        name,
    ]


#: ffprobe processes started ahead of their probe, by command line: at most one is kept.
_prefetched: dict[tuple[str, ...], subprocess.Popen[bytes]] = {}
_prefetch_lock = threading.Lock()


def prefetch_probe(target: str) -> None:
    """Start ffprobe on ``target`` now, for a :func:`run_ffprobe` of the same target later in
    this process to collect: its ~0.1 s of process start and library loading then overlaps
    whatever the process does meanwhile (the CLI imports and starts its in-process worker).
    The command is the one run_ffprobe would run, under the same allow-lists."""
    args = _ffprobe_args(target)
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL)
    with _prefetch_lock:
        for stale in _prefetched.values():
            stale.kill()
            stale.communicate()
        _prefetched.clear()
        _prefetched[tuple(args)] = process


@atexit.register
def _discard_prefetched() -> None:
    # A prefetch nobody collected (the command failed before probing) ends with the process.
    with _prefetch_lock:
        for process in _prefetched.values():
            process.kill()
            process.communicate()
        _prefetched.clear()


def _refused_format(stderr: bytes) -> str | None:
    """The format ffprobe detected and refused under ``format_whitelist``: it logs the refusal
    in the demuxer's name, ``[hls @ 0x55…] Format not on whitelist '…'``."""
    found = _FORMAT_REFUSED.search(stderr.decode(errors="replace"))
    return found.group(1) if found else None


def _unreadable(target: str, stderr: bytes) -> str:
    """Why ffprobe could not read ``target``, in words that fit "source X is …"."""
    header = _local_header(target)
    if header is not None and b"ftyp" not in header[:12]:
        kind = "text" if _looks_like_text(header) else "data"
        return f"not a media file ffprobe can read (it holds {kind}, not a video container)"
    return f"not a media file ffprobe can read ({ffmpeg_reason(stderr)})"


def ffmpeg_reason(stderr: bytes) -> str:
    """The complaint of ffmpeg's or ffprobe's last error line, without the input's name."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return "no diagnostic"
    reason = lines[-1]
    # ffmpeg prefixes the input's name, which can be a presigned URL: keep only its complaint.
    if ": " in reason:
        reason = reason.rsplit(": ", 1)[-1]
    if any("moov atom not found" in line for line in lines):
        reason = "moov atom not found: the MP4 is truncated or still being written"
    return reason


def probe(target: str, *, shown: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> MediaInfo:
    """Probe a source and return its :class:`MediaInfo`, or raise
    :class:`~pipeline.errors.InvalidSource` with a reason a user can act on."""
    shown = shown or shown_name(target)
    return parse_probe(run_ffprobe(target, shown=shown, timeout=timeout), shown)


def _local_header(target: str) -> bytes | None:
    if url_scheme(target) is not None:
        return None
    try:
        with open(target, "rb") as handle:
            return handle.read(512)
    except OSError:
        return None


def _looks_like_text(header: bytes) -> bool:
    try:
        header.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(ch >= 0x20 or ch in (0x09, 0x0A, 0x0D) for ch in header)


def parse_probe(raw: dict[str, Any], shown: str) -> MediaInfo:
    streams = raw.get("streams", [])
    fmt = raw.get("format", {})
    format_name = str(fmt.get("format_name", ""))
    source_demuxer(format_name, shown)  # ffprobe ran under the allow-list; this keeps it true
    videos = [
        s
        for s in streams
        if s.get("codec_type") == "video" and not s.get("disposition", {}).get("attached_pic")
    ]
    audios = [s for s in streams if s.get("codec_type") == "audio"]
    if not videos:
        found = ", ".join(f"{s.get('codec_type')} {s.get('codec_name')}" for s in streams) or "none"
        raise InvalidSource(
            f"source {shown} has no video stream (streams found: {found}); hlsvault packages "
            "video, so pass a file with a video track"
        )
    duration = _float(fmt.get("duration")) or _float(videos[0].get("duration")) or 0.0
    if duration <= 0:
        raise InvalidSource(
            f"source {shown} has zero duration; it holds no playable frames, export it again"
        )
    v = videos[0]
    width, height = int(v.get("width") or 0), int(v.get("height") or 0)
    if width <= 0 or height <= 0:
        raise InvalidSource(f"source {shown} has a video stream without a picture size")
    video = VideoStream(
        codec=str(v.get("codec_name")),
        profile=v.get("profile"),
        level=int(v["level"]) if isinstance(v.get("level"), int) and v["level"] > 0 else None,
        width=width,
        height=height,
        frame_rate=_frame_rate(v),
        pix_fmt=v.get("pix_fmt"),
        rotation=_rotation(v),
        bit_rate=_int(v.get("bit_rate")),
    )
    start, video_first = _float(fmt.get("start_time")), _float(v.get("start_time"))
    tracks = tuple(audio_stream(position, a, origin=start or 0.0)
                   for position, a in enumerate(audios))
    audio = tracks[0] if tracks else None
    subtitles = [s for s in streams if s.get("codec_type") == "subtitle"]
    return MediaInfo(
        format_name=format_name,
        duration=duration,
        size=_int(fmt.get("size")),
        bit_rate=_int(fmt.get("bit_rate")),
        video=video,
        audio=audio,
        audio_tracks=tracks,
        subtitle_tracks=tuple(
            subtitle_stream(position, s, default_flag="matroska" in format_name.split(","))
            for position, s in enumerate(subtitles)
        ),
        video_start=video_first - start if start is not None and video_first is not None
        else 0.0,
    )


def _language_and_title(stream: dict[str, Any]) -> tuple[str | None, str | None]:
    """A stream's language and title tags as ffprobe reports them (``und``: none)."""
    tags = {str(k).lower(): v for k, v in (stream.get("tags") or {}).items()}
    language = str(tags.get("language") or "").strip() or None
    title = str(tags.get("title") or "").strip() or None
    return (None if language == "und" else language), title


def subtitle_stream(
    position: int, stream: dict[str, Any], *, default_flag: bool
) -> SubtitleStream:
    """A subtitle stream of ffprobe's JSON, the ``position``-th of its source. Its default
    disposition is taken only where the container says it (``default_flag``: Matroska's
    FlagDefault); ffmpeg's MP4 reader reports every enabled track default, and its muxer
    enables the first text track whatever ``-disposition`` asked, so MP4 never tells."""
    language, title = _language_and_title(stream)
    disposition = stream.get("disposition") or {}
    return SubtitleStream(
        index=position, codec=str(stream.get("codec_name")), language=language, title=title,
        default=default_flag and bool(disposition.get("default")),
        forced=bool(disposition.get("forced")),
    )


def audio_stream(position: int, stream: dict[str, Any], *, origin: float = 0.0) -> AudioStream:
    """An audio stream of ffprobe's JSON, the ``position``-th of its source, whose start time
    is ``origin`` (the format's: ffmpeg's zero)."""
    language, title = _language_and_title(stream)
    length = _float(stream.get("duration"))
    if length is None:
        # Matroska keeps it in a tag ("00:01:02.500000000"), which some muxers count from the
        # stream's start and ffmpeg's from zero: counted from the start here, the later of
        # the two ends, so that what the end refuses (audio.check_audio_covers) is certain.
        tags = {str(k).upper(): v for k, v in (stream.get("tags") or {}).items()}
        length = _clock(str(tags.get("DURATION") or ""))
    first = _float(stream.get("start_time"))
    end = None if length is None else (origin if first is None else first) - origin + length
    if end is not None and not (math.isfinite(end) and end >= 0):
        end = None  # a length no stream can have says nothing: the cutter reads the frames
    return AudioStream(
        codec=str(stream.get("codec_name")),
        profile=stream.get("profile"),
        channels=int(stream.get("channels") or 0),
        sample_rate=int(stream.get("sample_rate") or 0),
        bit_rate=_int(stream.get("bit_rate")),
        index=position,
        language=language,
        title=title,
        default=bool((stream.get("disposition") or {}).get("default")),
        end=end,
    )


def _clock(value: str) -> float | None:
    """Seconds of an ``H:MM:SS.fraction`` clock, or None."""
    parts = value.split(":")
    if len(parts) != 3:
        return None
    try:
        return int(parts[0]) * 3600 + int(parts[1]) * 60 + float(parts[2])
    except ValueError:
        return None


def _frame_rate(stream: dict[str, Any]) -> str:
    for field in ("avg_frame_rate", "r_frame_rate"):
        value = str(stream.get(field) or "0/0")
        if value != "0/0" and not value.endswith("/0"):
            return str(Fraction(value))
    return "0/0"


def _rotation(stream: dict[str, Any]) -> int:
    for side in stream.get("side_data_list", []) or []:
        if "rotation" in side:
            # ffprobe reports the display matrix angle counter-clockwise; players turn clockwise.
            return int(-float(side["rotation"])) % 360
    rotate = stream.get("tags", {}).get("rotate")
    return int(rotate) % 360 if rotate else 0


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
