"""Probing: what is in the source, as ffprobe sees it, or a reason it cannot be packaged."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from .errors import InvalidSource, StageTimeout

#: ffprobe reads headers only; a minute covers a slow network source, not a hung one.
PROBE_TIMEOUT_S = 60


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


@dataclass(frozen=True)
class MediaInfo:
    """The facts about a source that planning and playlists need."""

    format_name: str
    duration: float
    size: int | None
    bit_rate: int | None
    video: VideoStream
    audio: AudioStream | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MediaInfo:
        audio = data.get("audio")
        return cls(
            format_name=data["format_name"],
            duration=data["duration"],
            size=data.get("size"),
            bit_rate=data.get("bit_rate"),
            video=VideoStream(**data["video"]),
            audio=AudioStream(**audio) if audio else None,
        )


def check_local_source(path: Path, shown: str) -> None:
    """Refuse a local source that cannot be a video before ffprobe is asked."""
    if not path.exists():
        raise InvalidSource(
            f"source not found: {shown}; check the path (a relative path is resolved from the "
            "directory hlsvault was started in)"
        )
    if path.is_dir():
        raise InvalidSource(f"source {shown} is a directory; pass the path of a video file")
    if not path.is_file():
        raise InvalidSource(f"source {shown} is not a regular file; pass the path of a video file")
    if path.stat().st_size == 0:
        raise InvalidSource(
            f"source {shown} is empty (0 bytes); the copy or upload probably failed, copy it again"
        )


def run_ffprobe(target: str, *, timeout: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """ffprobe's JSON for ``target`` (a path or URL).

    ffmpeg-python's ``probe`` offers no timeout, so the same command is run here with one.
    """
    args = [
        "ffprobe",
        "-v",
        "error",
        "-show_format",
        "-show_streams",
        "-of",
        "json",
        target,
    ]
    try:
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise StageTimeout(f"ffprobe did not answer within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise InvalidSource(f"not a media file ffprobe can read ({_ffprobe_reason(done.stderr)})")
    result: dict[str, Any] = json.loads(done.stdout or b"{}")
    return result


def _ffprobe_reason(stderr: bytes) -> str:
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    if not lines:
        return "no diagnostic"
    reason = lines[-1]
    # ffprobe prefixes the target path, which can be a presigned URL: keep only its complaint.
    if ": " in reason:
        reason = reason.rsplit(": ", 1)[-1]
    if any("moov atom not found" in line for line in lines):
        reason = "moov atom not found: the MP4 is truncated or still being written"
    return reason


def probe(target: str, *, shown: str | None = None, timeout: float = PROBE_TIMEOUT_S) -> MediaInfo:
    """Probe a source and return its :class:`MediaInfo`, or raise
    :class:`~pipeline.errors.InvalidSource` with a reason a user can act on."""
    shown = shown or target
    try:
        raw = run_ffprobe(target, timeout=timeout)
    except InvalidSource as error:
        detail = str(error)
        header = _local_header(target)
        if header is not None and b"ftyp" not in header[:12]:
            kind = "text" if _looks_like_text(header) else "data"
            detail = f"not a media file ffprobe can read (it holds {kind}, not a video container)"
        raise InvalidSource(
            f"source {shown} is {detail}; check it is a complete video file"
        ) from None
    return parse_probe(raw, shown)


def _local_header(target: str) -> bytes | None:
    if "://" in target:
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
    audio = None
    if audios:
        a = audios[0]
        audio = AudioStream(
            codec=str(a.get("codec_name")),
            profile=a.get("profile"),
            channels=int(a.get("channels") or 0),
            sample_rate=int(a.get("sample_rate") or 0),
            bit_rate=_int(a.get("bit_rate")),
        )
    return MediaInfo(
        format_name=str(fmt.get("format_name", "")),
        duration=duration,
        size=_int(fmt.get("size")),
        bit_rate=_int(fmt.get("bit_rate")),
        video=video,
        audio=audio,
    )


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
