"""Planning: which renditions a source becomes under a ladder, and the time chunks a transcode
is cut into (each chunk whole segments, so a chunk boundary is always a segment boundary)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

from . import layout
from .errors import BadSpec, UnsupportedMedia
from .media import MediaInfo
from .records import from_known

LADDERS = ("copy", "default")

#: (height, video kbit/s, audio kbit/s): close to Apple's HLS authoring guide for 30 fps H.264.
DEFAULT_RUNGS: tuple[tuple[int, int, int], ...] = (
    (1080, 5000, 128),
    (720, 2800, 128),
    (480, 1400, 96),
    (360, 800, 96),
)
#: Peak rate allowed to the encoder's VBV, as a multiple of the target: bounds BANDWIDTH.
MAX_RATE_FACTOR = 1.5
#: Above this, frame rate is halved: players and phones choke on 100+ fps HLS.
MAX_FPS = 60.0
#: Pixel formats every HLS player decodes; others (10-bit, 4:2:2) need a transcode.
PLAYABLE_PIX_FMTS = ("yuv420p", "yuvj420p")
#: H.264 profiles browsers and devices decode (High 10 and 4:2:2/4:4:4 profiles are not).
PLAYABLE_H264_PROFILES = ("Baseline", "Constrained Baseline", "Main", "High")
#: HEVC reaches H.264's quality at about this share of its bitrate (the usual rule of thumb
#: for x265 against x264 at the same preset), so an HEVC ladder's rungs are scaled by it.
HEVC_RATE_FACTOR = 0.7
#: Separate audio renditions of a transcode: stereo AAC at the top rung's audio rate (one
#: rendition per source track; a player picks a language, not a bitrate).
GROUP_AUDIO_KBPS = 128
#: A language tag as HLS's LANGUAGE takes it (RFC 5646 as players meet it): a 2-3 letter
#: language, then subtags (``pt-BR``, ``zh-Hant``, ``sr-Latn-RS``). The one rule for source
#: tracks and sidecars alike.
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(-[A-Za-z0-9]{1,8}){0,4}")
#: ISO 639-2 codes (what MP4 and Matroska tag) of common languages, as the RFC 5646 tags HLS
#: wants (their ISO 639-1 two-letter form). Others pass as tagged: 639-2 codes are valid
#: RFC 5646 tags too.
_TWO_LETTER = {
    "eng": "en", "deu": "de", "ger": "de", "fra": "fr", "fre": "fr", "spa": "es",
    "ita": "it", "por": "pt", "nld": "nl", "dut": "nl", "jpn": "ja", "zho": "zh",
    "chi": "zh", "kor": "ko", "rus": "ru", "pol": "pl", "swe": "sv", "nor": "no",
    "dan": "da", "fin": "fi", "tur": "tr", "ara": "ar", "hin": "hi", "ces": "cs",
    "cze": "cs", "ell": "el", "gre": "el", "heb": "he", "hun": "hu", "ukr": "uk",
}
_LANGUAGE_NAMES = {
    "en": "English", "de": "Deutsch", "fr": "Français", "es": "Español", "it": "Italiano",
    "pt": "Português", "nl": "Nederlands", "ja": "日本語", "zh": "中文", "ko": "한국어",
    "ru": "Русский", "pl": "Polski", "sv": "Svenska",
}
MIN_SEGMENT_SECONDS = 1.0
MAX_SEGMENT_SECONDS = 30.0


@dataclass(frozen=True)
class Rendition:
    """One variant stream of the output."""

    name: str
    width: int
    height: int
    copy: bool
    video_kbps: int | None  # target for transcodes; None when copied
    audio_kbps: int | None
    frame_rate: str
    gop_frames: int | None
    codec: str = layout.DEFAULT_VIDEO_CODEC  # the encoder of a transcode: h264 or hevc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rendition:
        return from_known(cls, data)


@dataclass(frozen=True)
class AudioRendition:
    """One audio track of the source as an ``EXT-X-MEDIA TYPE=AUDIO`` rendition."""

    name: str  # layout.audio_rendition_name
    track: int  # the source's audio stream (ffmpeg's a:<track>)
    copy: bool  # remuxed as it is (the copy ladder), else encoded to AAC at ``kbps``
    kbps: int | None
    language: str | None  # RFC 5646, or None when the source does not say
    title: str  # the NAME players show
    default: bool  # exactly one of a group
    channels: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AudioRendition:
        return from_known(cls, data)


def hls_language(tag: str | None) -> str | None:
    """A stream's language tag as HLS's LANGUAGE (:data:`LANGUAGE_TAG`): ``eng`` → ``en``;
    None for what is not a tag."""
    if not tag:
        return None
    cleaned = tag.strip().replace("_", "-")
    language = _TWO_LETTER.get(cleaned.lower(), cleaned)
    return language if LANGUAGE_TAG.fullmatch(language) else None


#: The longest NAME taken from a source's track title (the rest is cut).
MAX_TITLE_CHARS = 64


def _shown_title(title: str | None) -> str:
    """A source track's title as a NAME players show: printable characters only, whitespace
    collapsed, at most :data:`MAX_TITLE_CHARS` (the source is not trusted)."""
    if not title:
        return ""
    printable = "".join(ch if ch.isprintable() else " " for ch in title)
    return " ".join(printable.split())[:MAX_TITLE_CHARS].strip()


def track_name(title: str | None, language: str | None, fallback: str, taken: set[str]) -> str:
    """The NAME players show for a track: its title (cleaned), else its language's name, else
    ``fallback``; made unique among ``taken`` (RFC 8216 4.3.4.1.1: NAME is unique within a
    group), which it joins."""
    name = _shown_title(title) or _LANGUAGE_NAMES.get(language or "", language or "") or fallback
    while name in taken:
        name = f"{name} ({len(taken) + 1})"
    taken.add(name)
    return name


def separate_audio(info: MediaInfo, container: str, audio_only: bool) -> bool:
    """Whether the source's audio becomes renditions of its own (an audio group) instead of
    being muxed into every video rendition: always in fMP4 (CMAF holds one track per file),
    for a source with several audio tracks (a player switches between them), and for an
    audio-only variant (which plays the group's rendition)."""
    if not info.audio_tracks:
        return False
    return container == "fmp4" or audio_only or len(info.audio_tracks) > 1


def plan_audio(info: MediaInfo, ladder: str) -> list[AudioRendition]:
    """One audio rendition per audio track of the source, in its order; the default is the
    track the source marks default, else the first."""
    tracks = info.audio_tracks
    chosen = next((t.index for t in tracks if t.default), tracks[0].index if tracks else 0)
    planned: list[AudioRendition] = []
    names: set[str] = set()
    for track in tracks:
        language = hls_language(track.language)
        title = track_name(track.title, language, f"Audio {track.index + 1}", names)
        copy = ladder == "copy"
        planned.append(
            AudioRendition(
                name=layout.audio_rendition_name(track.index, language),
                track=track.index,
                copy=copy,
                kbps=None if copy else GROUP_AUDIO_KBPS,
                language=language,
                title=title,
                default=track.index == chosen,
                channels=track.channels if copy else min(2, track.channels or 2),
            )
        )
    return planned


def check_segment_seconds(seconds: float) -> float:
    # Named both ways: the CLI's option, and the field of a webhook or S3-event job request.
    if not MIN_SEGMENT_SECONDS <= seconds <= MAX_SEGMENT_SECONDS:
        shown = f"{seconds:g}" if abs(seconds) < 1e9 else "a huge number"
        raise BadSpec(
            f"segment seconds (--segment-seconds, \"segment_seconds\") {shown} is out of "
            f"range; use {MIN_SEGMENT_SECONDS:g} to {MAX_SEGMENT_SECONDS:g} (6 is what Apple "
            "recommends)"
        )
    return seconds


def plan_renditions(
    info: MediaInfo, ladder: str, segment_seconds: float,
    codec: str = layout.DEFAULT_VIDEO_CODEC,
) -> list[Rendition]:
    """The renditions ``info`` becomes under ``ladder``, largest first."""
    check_segment_seconds(segment_seconds)
    if ladder == "copy":
        return [plan_copy(info)]
    if ladder == "default":
        return plan_default(info, segment_seconds, codec)
    raise BadSpec(f"unknown ladder {ladder!r}; choose one of {', '.join(LADDERS)}")


def copy_obstacle(info: MediaInfo) -> str | None:
    """Why the source cannot be remuxed to HLS without re-encoding, or None when it can."""
    v, a = info.video, info.audio
    if v.codec != "h264":
        return f"its video is {v.codec}, not H.264"
    if v.profile and v.profile not in PLAYABLE_H264_PROFILES:
        return f"its H.264 profile is {v.profile}, which browsers and phones cannot decode"
    if v.pix_fmt and v.pix_fmt not in PLAYABLE_PIX_FMTS:
        return f"its pixel format is {v.pix_fmt}, not 8-bit 4:2:0"
    if v.rotation:
        return f"it is rotated {v.rotation} degrees, which MPEG-TS cannot carry"
    if a is not None and a.codec != "aac":
        return f"its audio is {a.codec}, not AAC"
    for track in info.audio_tracks:
        if track.codec != "aac":
            return f"its audio track {track.index + 1} is {track.codec}, not AAC"
    return None


def plan_copy(info: MediaInfo) -> Rendition:
    obstacle = copy_obstacle(info)
    if obstacle:
        raise UnsupportedMedia(
            f"--ladder copy cannot remux this source cleanly: {obstacle}; "
            "use --ladder default to transcode it"
        )
    v = info.video
    return Rendition(
        name=f"{v.height}p",
        width=v.width,
        height=v.height,
        copy=True,
        video_kbps=None,
        audio_kbps=None,
        frame_rate=v.frame_rate,
        gop_frames=None,
    )


def _even(value: float) -> int:
    return max(2, round(value / 2.0) * 2)


def plan_default(
    info: MediaInfo, segment_seconds: float, codec: str = layout.DEFAULT_VIDEO_CODEC
) -> list[Rendition]:
    width, height = info.video.display_size
    rate = Fraction(info.video.frame_rate) if info.video.fps else Fraction(30)
    if rate > MAX_FPS:
        rate /= 2
    fps = float(rate)
    frame_rate = str(rate)
    # One keyframe every segment, at the same instants in every rendition, so a player can
    # switch renditions at any segment boundary.
    gop = max(1, round(fps * segment_seconds))
    rungs = [rung for rung in DEFAULT_RUNGS if rung[0] <= height]
    if not rungs:
        # Smaller than the smallest rung: one rendition at the source's own size, never upscaled.
        rungs = [(height, DEFAULT_RUNGS[-1][1] * height // DEFAULT_RUNGS[-1][0], 64)]
    renditions = []
    for rung_height, video_kbps, audio_kbps in rungs:
        rung_width = _even(width * rung_height / height)
        renditions.append(
            Rendition(
                name=f"{rung_height}p",
                width=rung_width,
                height=_even(rung_height),
                copy=False,
                video_kbps=round(video_kbps * HEVC_RATE_FACTOR) if codec == "hevc"
                else video_kbps,
                audio_kbps=audio_kbps if info.audio is not None else None,
                frame_rate=frame_rate,
                gop_frames=gop,
                codec=codec,
            )
        )
    return renditions


@dataclass(frozen=True)
class Chunk:
    """A time range of the source that one segment message transcodes for every rendition."""

    index: int
    start: float  # seconds from the source's start
    duration: float | None  # None: to the source's end (the last chunk)
    first_segment: int  # media sequence number of its first segment
    segments: int | None  # whole segments it makes; None for the last chunk (up to the end)

    @property
    def name(self) -> str:
        return layout.chunk_name(self.index)

    @property
    def end(self) -> float | None:
        return None if self.duration is None else self.start + self.duration

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Chunk:
        return from_known(cls, data)


def plan_chunks(
    duration: float, segment_seconds: float, chunk_seconds: float, *, copy: bool
) -> list[Chunk]:
    """The chunks a source of ``duration`` seconds is transcoded in: whole segments of
    ``segment_seconds`` about ``chunk_seconds`` long, the remainder joined to the last chunk
    (so no chunk is shorter than one), and a single chunk for a remux (one cheap pass), for
    ``chunk_seconds`` 0 and for a source shorter than two chunks."""
    per_chunk = max(1, round(chunk_seconds / segment_seconds)) if chunk_seconds > 0 else 0
    length = per_chunk * segment_seconds
    count = 1 if copy or per_chunk == 0 else max(1, math.floor(duration / length + 1e-9))
    if count > layout.MAX_CHUNKS:
        raise BadSpec(
            f"a {duration:.0f} s source in {length:g} s chunks makes {count} chunks, more than "
            f"{layout.MAX_CHUNKS}; raise HLSVAULT_CHUNK_SECONDS"
        )
    return [
        Chunk(
            index=index,
            start=index * length,
            duration=None if index == count - 1 else length,
            first_segment=index * per_chunk,
            segments=None if index == count - 1 else per_chunk,
        )
        for index in range(count)
    ]


def chunks_progress(planned: int, stages: Iterable[tuple[str, str, float]]) -> tuple[int, float]:
    """How far a job's chunks are: how many are segmented, and the mean progress of all
    ``planned`` (a chunk not started yet counts 0), from ``(stage, status, progress)`` rows
    of its record."""
    parts = {
        name: 1.0 if status == "done" else min(1.0, progress)
        for name, status, progress in stages
        if name.startswith("segment:c")
    }
    done = sum(1 for value in parts.values() if value >= 1.0)
    return done, (sum(parts.values()) / planned if planned else 0.0)
