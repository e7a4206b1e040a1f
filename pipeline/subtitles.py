"""Subtitles: the source's text tracks and sidecar files, checked, then cut into segmented
WebVTT aligned with the video.

A subtitle rendition comes from a text track of the source (``mov_text`` in MP4, SubRip or
ASS/SSA in Matroska, WebVTT; ffmpeg converts each to WebVTT) or from a sidecar file (WebVTT or
SubRip, ``--subtitles en=talk.en.vtt``). Every one is read and checked in the probe stage, so a
bad file fails the job before anything is transcoded; its cues wait in the work store. The
playlist stage cuts them into one WebVTT segment per video segment (same media sequence
numbers, same durations), each opening with::

    WEBVTT
    X-TIMESTAMP-MAP=MPEGTS:<n>,LOCAL:00:00:00.000

Cue times stay the source's own (seconds from its start, as ffmpeg reads it; a sidecar's
times are taken the same way), and ``<n>`` is where that start lies on the video's
timeline, in 90 kHz units: measured from the first video segment as produced (its first
frame's presentation time, less where the first frame lay in the source). Measured on the
test clip (30 fps H.264 with B-frames): MPEG-TS 126000 for a transcode (ffmpeg's muxer starts
at 1.4 s) and 132000 for a copy (the source's two-frame B-frame delay kept); fMP4 0 for a
transcode and 5941 (66 ms) for a copy, in the track's presentation time scaled to 90 kHz
(RFC 8216 3.5 maps MPEGTS onto fMP4's timeline the same way). Whatever the muxers do, the map
follows what was produced.

Segments are encrypted like every other segment (AES-128, IV = media sequence number, the
video's keys): subtitles of a private video are private too. hls.js decrypts AES-128 WebVTT
(its subtitle stream controller; the browser tests play it) and RFC 8216 4.3.2.4 applies
EXT-X-KEY to every media segment, WebVTT ones included; see docs/players.md for which players
were checked and what a player that cannot decrypt them shows (the video, without subtitles).

Everything read here is hostile input: a sidecar or an extracted track is bounded in size,
cue count and cue length, must decode as UTF-8 and parse as WebVTT or SubRip, and its
language tag must be an RFC 5646 tag; a sidecar is a local file or an ``s3://`` object,
never a URL a worker would fetch. Cue settings and tags are kept only as WebVTT defines them
(the rest escaped as text), cues end with the video, and what the segments will hold is
bounded at the probe (a cue is repeated in every segment it is shown in).
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ffmpeg

from . import layout
from .aws import botocore_errors, shared_client, translate
from .errors import BadSpec, InvalidSource, NotFound, StageTimeout, UnsupportedMedia
from .media import MediaInfo, run_ffprobe
from .plan import LANGUAGE_TAG, hls_language, track_name
from .playlists import RenditionEntry
from .records import from_known
from .segment import Segment, SegmentedRendition, run_ffmpeg
from .sources import ffmpeg_command, ffmpeg_input, scheme_refusal, source_demuxer, split_s3_url
from .storage import is_s3_url, shown_url, url_scheme
from .webvtt import timestamp
from .worksegments import decrypt_work_segment, work_init

if TYPE_CHECKING:  # the job spec checks sidecars here, and services import the job store
    from .services import Services

#: A film's SubRip is a few hundred KB; heavily styled ASS converted to WebVTT a few MB.
MAX_SUBTITLE_BYTES = 8 * 1024 * 1024
#: Three hours of dense dialogue is about 3000 cues.
MAX_CUES = 50_000
#: A cue is read at a glance: a few lines. Far longer text is not a subtitle.
MAX_CUE_CHARS = 2000
#: Sidecar files one job may name (``--subtitles``, ``"subtitles"``).
MAX_SIDECARS = 16
#: A file name as common filesystems allow it.
MAX_SIDECAR_NAME = 255
#: Text tracks of the source that become renditions; more fail the job (a source with dozens
#: of text tracks is better split).
MAX_TEXT_TRACKS = 32
#: Subtitle codecs ffmpeg converts to WebVTT. Picture subtitles (PGS, VobSub, DVB) are not
#: text and are skipped with a warning.
TEXT_CODECS = frozenset({"mov_text", "subrip", "srt", "ass", "ssa", "webvtt", "text"})
#: Segmented WebVTT repeats every cue in each segment it is shown in, so a small file whose
#: long cues span the whole video grows by the segment count. The probe estimates what a
#: rendition's segments will hold and fails the job above these bounds: a segment of dense
#: dialogue holds a few KB, a whole film's rendition well under a MB.
MAX_SEGMENT_BYTES = 1024 * 1024
MAX_RENDITION_BYTES = 64 * 1024 * 1024
#: MPEG-TS timestamps are 33 bits.
PTS_WRAP = 1 << 33
PTS_HZ = 90_000

_VTT_TIME = r"(?:(\d{1,3}):)?(\d{2}):(\d{2})\.(\d{3})"
_VTT_TIMING = re.compile(rf"^{_VTT_TIME}[ \t]+-->[ \t]+{_VTT_TIME}(?:[ \t]+(.*))?$")
_SRT_TIME = r"(\d{1,3}):(\d{1,2}):(\d{1,2})[,.](\d{1,3})"
_SRT_TIMING = re.compile(rf"^{_SRT_TIME}[ \t]*-->[ \t]*{_SRT_TIME}(?:[ \t].*)?$")
#: WebVTT's cue settings, each with the values it takes; any other is dropped. ``region``
#: goes too: the REGION blocks it names are not carried into the segments.
_PERCENT = r"(?:100(?:\.0+)?|\d{1,2}(?:\.\d+)?)%"
_SETTINGS = {
    "vertical": re.compile(r"rl|lr"),
    "line": re.compile(rf"(?:-?\d{{1,4}}|{_PERCENT})(?:,(?:start|center|end))?"),
    "position": re.compile(rf"{_PERCENT}(?:,(?:line-left|center|line-right))?"),
    "size": re.compile(_PERCENT),
    "align": re.compile(r"start|center|end|left|right"),
}
#: WebVTT's own cue text tags (class, italic, bold, underline, ruby, voice, language) and
#: timestamp tags; every other ``<`` in WebVTT cue text is escaped.
_WEBVTT_TAG = re.compile(
    r"</?(?:[cibu]|ruby|rt|v|lang)(?:\.[\w-]+)*(?:[ \t][^<>&]*)?>"
    r"|<(?:\d{1,3}:)?\d{2}:\d{2}\.\d{3}>"
)
#: What stays of an ``&`` in cue text: an entity WebVTT readers know.
_ENTITY = re.compile(r"&(?!(?:amp|lt|gt|lrm|rlm|nbsp|#\d{1,7}|#x[0-9A-Fa-f]{1,6});)")
#: SubRip's formatting tags that WebVTT has too; every other ``<`` is escaped.
_SRT_TAGS = re.compile(r"&lt;(/?)([ibu])&gt;", re.IGNORECASE)
#: ASS override blocks some SubRip files carry (``{\an8}``): not text.
_ASS_OVERRIDE = re.compile(r"\{\\[^}]*\}")


@dataclass(frozen=True)
class Cue:
    """One cue: seconds on the source's timeline, WebVTT cue settings and cue text."""

    start: float
    end: float
    text: str
    settings: str = ""


@dataclass(frozen=True)
class SubtitleTrack:
    """One subtitle rendition as the probe planned it."""

    name: str  # layout.subtitle_rendition_name
    language: str | None  # RFC 5646
    title: str  # the NAME players show
    default: bool  # the source marks it default (at most one)
    forced: bool  # the source marks it forced (FORCED=YES)
    track: int | None = None  # the source's subtitle stream (ffmpeg's s:<track>) …
    sidecar: str | None = None  # … or the sidecar file it comes from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubtitleTrack:
        return from_known(cls, data)


# -- the job spec's sidecars -----------------------------------------------------------------


def check_language(tag: str) -> str:
    """A sidecar's language tag, checked: RFC 5646 (``en``, ``de``, ``pt-BR``)."""
    if not isinstance(tag, str) or not LANGUAGE_TAG.fullmatch(tag):
        shown = tag[:20] if isinstance(tag, str) else type(tag).__name__
        raise BadSpec(
            f"subtitle language {shown!r} is not a language tag; give an RFC 5646 tag such as "
            "en, de or pt-BR (--subtitles en=talk.en.vtt)"
        )
    return tag


def check_sidecar_source(source: str, *, s3_only: bool = False) -> str:
    """A sidecar's location, checked: an ``s3://bucket/key`` object or an absolute local path
    (the CLI makes paths absolute), never a URL or anything a worker would fetch elsewhere;
    only an S3 object if ``s3_only`` (a job request's: a sender cannot name the workers'
    files)."""
    if not isinstance(source, str) or not source or "\x00" in source or len(source) > 4096:
        raise BadSpec("a subtitle file must be named by a path or s3://bucket/key")
    if is_s3_url(source):
        try:
            split_s3_url(source, what="subtitle file")
        except InvalidSource as error:  # the spec's fault, refused as its other faults are
            raise BadSpec(str(error)) from None
        return source
    # A refused URL is shown by its scheme alone: the rest may hold a credential.
    scheme = url_scheme(source)
    if s3_only:
        shown = "" if scheme is None else f" {shown_url(source)}"
        raise BadSpec(f"subtitle file{shown}: a job request names a subtitle file as an S3 "
                      "object like its source (s3://bucket/key)")
    if scheme is not None:
        refusal = scheme_refusal(source, what="subtitle file")
        if scheme.lower() in ("s3", "file") and refusal is not None:
            raise BadSpec(refusal)
        raise BadSpec(f"subtitle file {shown_url(source)} must be a local file or "
                      "s3://bucket/key (URLs are not fetched)")
    if not source.startswith("/"):
        raise BadSpec(f"subtitle file {source[:80]!r} must be an absolute path or "
                      "s3://bucket/key")
    return source


def check_sidecars(
    sidecars: Sequence[tuple[str, str]], *, s3_only: bool = False
) -> tuple[tuple[str, str], ...]:
    """The ``(language, source)`` pairs of a job spec, each checked (S3 objects only if
    ``s3_only``, see :func:`check_sidecar_source`)."""
    if len(sidecars) > MAX_SIDECARS:
        raise BadSpec(f"{len(sidecars)} subtitle files; a job takes at most {MAX_SIDECARS}")
    return tuple((check_language(language), check_sidecar_source(source, s3_only=s3_only))
                 for language, source in sidecars)


def check_sidecar_names(
    names: Sequence[str], sidecars: Sequence[tuple[str, str]]
) -> tuple[str, ...]:
    """The file names a user gave the sidecars, one per sidecar in order, checked: errors
    show them (a sidecar the CLI sent to the fleet is stored as ``0.vtt``). Each is a bare
    file name of printable text, or empty where the source's own name is shown."""
    if not names:
        return ()
    if len(names) != len(sidecars):
        raise BadSpec(f"{len(names)} subtitle file names for {len(sidecars)} subtitle files")
    for name in names:
        if (not isinstance(name, str) or len(name) > MAX_SIDECAR_NAME or name in (".", "..")
                or any(ch in "/\\" or unicodedata.category(ch).startswith("C")
                       for ch in name)):
            raise BadSpec("a subtitle file's name must be a bare file name of printable text; "
                          "rename the file")
    return tuple(names)


# -- parsing -----------------------------------------------------------------------------------


def parse_subtitles(data: bytes, shown: str, *, allow_empty: bool = False) -> list[Cue]:
    """The cues of a WebVTT or SubRip file (told apart by the ``WEBVTT`` signature), checked
    against the bounds above; :class:`InvalidSource` naming ``shown`` and what is wrong. A
    file without a cue is refused unless ``allow_empty`` (a text track of the source may be
    empty: it becomes a rendition with no cue)."""
    if len(data) > MAX_SUBTITLE_BYTES:
        raise InvalidSource(_too_large(shown, len(data)))
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as error:
        raise InvalidSource(
            f"{shown} is not UTF-8 text (byte {error.start}); give a WebVTT or SubRip file, "
            "saved as UTF-8"
        ) from None
    if any(ord(ch) < 0x20 and ch not in "\t\n\r" for ch in text):
        raise InvalidSource(f"{shown} holds control characters: it is not a subtitle file")
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines[0].startswith("WEBVTT"):
        cues = _parse_webvtt(lines, shown)
    else:
        cues = _parse_srt(lines, shown)
    if not cues and not allow_empty:
        raise InvalidSource(f"{shown} holds no cue; give a WebVTT or SubRip file with subtitles")
    if len(cues) > MAX_CUES:
        raise InvalidSource(f"{shown} holds {len(cues)} cues, more than {MAX_CUES}")
    return sorted(cues, key=lambda cue: (cue.start, cue.end))


def _too_large(shown: str, size: int) -> str:
    return (f"{shown} is {size / 1e6:.1f} MB, more than the {MAX_SUBTITLE_BYTES / 1e6:.0f} MB "
            "a subtitle file may be; check it is the subtitle file")


def _blocks(lines: list[str], first: int) -> list[tuple[int, list[str]]]:
    """Blank-line separated blocks of ``lines`` from ``first``, with their 1-based line."""
    blocks: list[tuple[int, list[str]]] = []
    current: list[str] = []
    start = first
    for number, line in enumerate(lines[first:], start=first + 1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            blocks.append((start, current))
            current = []
    if current:
        blocks.append((start, current))
    return blocks


def _parse_webvtt(lines: list[str], shown: str) -> list[Cue]:
    if not re.fullmatch(r"WEBVTT([ \t].*)?", lines[0]):
        raise InvalidSource(f"{shown}: the first line is not a WEBVTT signature")
    header_end = next((i for i, line in enumerate(lines) if not line.strip()), len(lines))
    cues = []
    for number, block in _blocks(lines, header_end):
        if re.match(r"(NOTE|STYLE|REGION)([ \t]|$)", block[0]):
            continue  # comments, and styles and regions players apply per file, not per cue
        timing_at = 0 if "-->" in block[0] or len(block) == 1 else 1
        found = _VTT_TIMING.match(block[timing_at].strip())
        if found is None:
            raise InvalidSource(
                f"{shown} line {number + timing_at}: {block[timing_at][:60]!r} is not a WebVTT "
                "cue timing (00:00:01.000 --> 00:00:03.500)"
            )
        cues.append(_cue(shown, number, _seconds(found.groups()[:4]),
                         _seconds(found.groups()[4:8]), block[timing_at + 1:], _webvtt_text,
                         found.group(9) or ""))
    return [cue for cue in cues if cue is not None]


def _parse_srt(lines: list[str], shown: str) -> list[Cue]:
    cues = []
    for number, block in _blocks(lines, 0):
        timing_at = 1 if block[0].strip().isdigit() and len(block) > 1 else 0
        found = _SRT_TIMING.match(block[timing_at].strip())
        if found is None:
            raise InvalidSource(
                f"{shown} line {number + timing_at}: {block[timing_at][:60]!r} is neither a "
                "SubRip cue timing (00:00:01,000 --> 00:00:03,500) nor the WEBVTT signature; "
                "give a WebVTT or SubRip file"
            )
        cues.append(_cue(shown, number, _seconds(found.groups()[:4]),
                         _seconds(found.groups()[4:8]), block[timing_at + 1:], _srt_text, ""))
    return [cue for cue in cues if cue is not None]


def _srt_text(line: str) -> str:
    """A SubRip text line as WebVTT cue text: ``&``, ``<`` and ``>`` escaped, but for the
    italic, bold and underline tags both formats share."""
    escaped = _ASS_OVERRIDE.sub("", line).replace("&", "&amp;").replace("<", "&lt;")
    return _SRT_TAGS.sub(r"<\1\2>", escaped.replace(">", "&gt;"))


def _webvtt_text(line: str) -> str:
    """A WebVTT cue text line with its own tags and entities kept and every other ``<``,
    ``>`` and ``&`` escaped (``<script>`` becomes text)."""
    pieces = re.split(r"(<[^<>]*>)", line)
    return "".join(
        piece if index % 2 and _WEBVTT_TAG.fullmatch(piece)
        else _ENTITY.sub("&amp;", piece).replace("<", "&lt;").replace(">", "&gt;")
        for index, piece in enumerate(pieces)
    )


def _cue_settings(settings: str) -> str:
    """The cue settings of a timing line WebVTT defines, with values they take."""
    kept = []
    for setting in settings.split():
        name, _, value = setting.partition(":")
        pattern = _SETTINGS.get(name)
        if pattern is not None and pattern.fullmatch(value):
            kept.append(setting)
    return " ".join(kept)


def _seconds(parts: Sequence[str | None]) -> float:
    hours, minutes, seconds, fraction = parts
    return (int(hours or 0) * 3600 + int(minutes or 0) * 60 + int(seconds or 0)
            + int((fraction or "0").ljust(3, "0")) / 1000)


def _cue(
    shown: str, number: int, start: float, end: float, text: list[str],
    as_webvtt: Callable[[str], str], settings: str,
) -> Cue | None:
    """A checked cue, its text lines made WebVTT cue text by ``as_webvtt``, or None for one
    that shows nothing or for no time (some files have them; ffmpeg's mov_text decoder makes
    an empty one of every gap between cues)."""
    if any("-->" in line for line in text):
        raise InvalidSource(f"{shown} line {number}: cue text holds '-->'")
    body = "\n".join(as_webvtt(line).rstrip() for line in text).strip("\n")
    if len(body) > MAX_CUE_CHARS:
        raise InvalidSource(
            f"{shown} line {number}: a cue of {len(body)} characters, more than {MAX_CUE_CHARS}"
        )
    if end <= start or not body.strip():
        return None
    return Cue(start=start, end=end, text=body, settings=_cue_settings(settings))


# -- reading sidecars and text tracks ----------------------------------------------------------


def read_sidecar(source: str, shown: str) -> bytes:
    """A sidecar's bytes, at most :data:`MAX_SUBTITLE_BYTES` (a larger file is refused before
    it is read), from a local regular file or an S3 object."""
    check_sidecar_source(source)
    if is_s3_url(source):
        return _read_s3(source, shown)
    path = Path(source)
    if not path.exists():
        raise InvalidSource(f"{shown} not found; check the path")
    if not path.is_file():
        raise InvalidSource(f"{shown} is not a regular file; give the subtitle file itself")
    size = path.stat().st_size
    if size > MAX_SUBTITLE_BYTES:
        raise InvalidSource(_too_large(shown, size))
    with path.open("rb") as handle:
        return handle.read(MAX_SUBTITLE_BYTES + 1)


def _read_s3(source: str, shown: str) -> bytes:
    bucket, key = split_s3_url(source, what="subtitle file")
    client = shared_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
        if int(head.get("ContentLength", 0)) > MAX_SUBTITLE_BYTES:
            raise InvalidSource(_too_large(shown, int(head["ContentLength"])))
        body = client.get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{MAX_SUBTITLE_BYTES}")
        data: bytes = body["Body"].read(MAX_SUBTITLE_BYTES + 1)
    except botocore_errors() as error:
        translated = translate(error, f"reading subtitle file {source}")
        if isinstance(translated, NotFound):
            raise InvalidSource(f"{shown} not found; check the bucket and key") from None
        raise translated from None
    return data


def plan_subtitles(
    info: MediaInfo, sidecars: Sequence[tuple[str, str]]
) -> tuple[list[SubtitleTrack], list[str]]:
    """The subtitle renditions of a job: the source's text tracks in its order, then the
    sidecars in the order given; and a warning for each picture track skipped."""
    planned: list[SubtitleTrack] = []
    warnings: list[str] = []
    names: set[str] = set()
    text_tracks = [t for t in info.subtitle_tracks if t.codec in TEXT_CODECS]
    if len(text_tracks) > MAX_TEXT_TRACKS:
        raise InvalidSource(
            f"the source has {len(text_tracks)} text tracks, more than {MAX_TEXT_TRACKS}"
        )
    for skipped in (t for t in info.subtitle_tracks if t.codec not in TEXT_CODECS):
        warnings.append(f"subtitle track {skipped.index + 1} is {skipped.codec} (pictures, not "
                        "text), which WebVTT cannot carry; it was left out")
    chosen = next((t.index for t in text_tracks if t.default), None)
    for track in text_tracks:
        language = hls_language(track.language)
        planned.append(SubtitleTrack(
            name=layout.subtitle_rendition_name(len(planned), language), language=language,
            title=track_name(track.title, language, f"Subtitles {len(planned) + 1}", names),
            default=track.index == chosen, forced=track.forced, track=track.index,
        ))
    for tag, source in sidecars:
        language = hls_language(tag)
        planned.append(SubtitleTrack(
            name=layout.subtitle_rendition_name(len(planned), language), language=language,
            title=track_name(None, language, f"Subtitles {len(planned) + 1}", names),
            default=False, forced=False, sidecar=source,
        ))
    return planned, warnings


def extraction_timeout(duration: float, deadline: float) -> float:
    """ffmpeg's limit for reading the text tracks: it demuxes the source (MP4: only the text
    samples; Matroska: every cluster) and decodes none of its audio or video; never past
    ``deadline`` (:func:`time.monotonic`), what the probe stage leaves it."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise StageTimeout("probing the source left no time to read its text tracks; package "
                           "a copy of the source without them, and give them as --subtitles "
                           "files")
    return min(120 + duration * 0.5, left)


def extract_text_tracks(
    target: str, info: MediaInfo, tracks: Sequence[SubtitleTrack], out_dir: Path,
    *, shown: str, deadline: float,
) -> dict[str, bytes]:
    """Every text track of ``tracks`` converted to WebVTT by one ffmpeg reading the source
    once (under the source allow-lists, with the probe's demuxer), by rendition name; stopped
    at ``deadline`` (:func:`time.monotonic`) with a reason."""
    embedded = [t for t in tracks if t.track is not None]
    if not embedded:
        return {}
    name, options = ffmpeg_input(target, demuxer=source_demuxer(info.format_name, shown))
    stream = ffmpeg.input(name, **options)
    outputs = [
        # -fs stops a track that converts to more than a subtitle file may hold.
        ffmpeg.output(stream[f"s:{t.track}"], str(out_dir / f"{t.name}.vtt"), format="webvtt",
                      fs=MAX_SUBTITLE_BYTES + 1, **{"c:s": "webvtt"})
        for t in embedded
    ]
    timeout = extraction_timeout(info.duration, deadline)
    try:
        run_ffmpeg(ffmpeg_command(outputs), duration=info.duration, timeout=timeout,
                   on_progress=None)
    except StageTimeout:
        raise StageTimeout(
            f"reading the source's text tracks took longer than {timeout:.0f} s, what the probe "
            "stage had left; package a copy of the source without them, and give them as "
            "--subtitles files"
        ) from None
    except UnsupportedMedia as error:
        raise UnsupportedMedia(
            f"the source's text tracks could not be converted to WebVTT ({error}); package a "
            "copy of the source without them, and give them as --subtitles files"
        ) from None
    return {t.name: (out_dir / f"{t.name}.vtt").read_bytes() for t in embedded}


def prepare_subtitles(
    svc: Services, job_id: str, info: MediaInfo, target: str, shown: str,
    sidecars: Sequence[tuple[str, str]], segment_seconds: float,
    sidecar_names: Sequence[str] = (), *, deadline: float,
) -> tuple[list[SubtitleTrack], list[str]]:
    """Plan, read and check every subtitle rendition of a job (its cues clipped to the video
    and their segmented size bounded), and keep each one's cues in the work store for the
    playlist stage; returns the plan and its warnings. The text tracks are read before
    ``deadline`` (:func:`time.monotonic`). A sidecar is named in errors by ``sidecar_names``
    (what the user gave, :func:`check_sidecar_names`) or else by its source's file name."""
    planned, warnings = plan_subtitles(info, sidecars)
    given = dict(zip((source for _, source in sidecars), sidecar_names, strict=False))
    if not planned:
        return planned, warnings
    with tempfile.TemporaryDirectory(prefix="hlsvault-subs-") as scratch:
        extracted = extract_text_tracks(target, info, planned, Path(scratch), shown=shown,
                                        deadline=deadline)
        for track in planned:
            if track.sidecar is not None:
                name = given.get(track.sidecar) or Path(track.sidecar).name
                where = f"subtitle file {name} ({track.language})"
                data = read_sidecar(track.sidecar, where)
            else:
                where = f"subtitle track {(track.track or 0) + 1} of source {shown}"
                data = extracted[track.name]
            cues = clip_cues(parse_subtitles(data, where, allow_empty=track.sidecar is None),
                             info)
            check_segmented_size(cues, info, segment_seconds, where)
            document = [[c.start, c.end, c.text, c.settings] for c in cues]
            svc.work.put_bytes(layout.subtitle_cues_key(job_id, track.name),
                               json.dumps(document).encode())
    return planned, warnings


def stored_cues(svc: Services, job_id: str, rendition: str) -> list[Cue]:
    """The cues :func:`prepare_subtitles` kept for ``rendition``."""
    document = json.loads(svc.work.get_bytes(layout.subtitle_cues_key(job_id, rendition)))
    return [Cue(start, end, text, settings) for start, end, text, settings in document]


# -- segmented WebVTT --------------------------------------------------------------------------


def webvtt_segments(
    cues: Sequence[Cue], durations: Sequence[float], mpegts: int, start: float = 0.0
) -> Iterator[bytes]:
    """One WebVTT segment per video segment of ``durations``, made one at a time: each holds
    every cue shown during its time (a cue across a boundary is in both, as RFC 8216 3.5 asks;
    players keep it once), the last one every cue to the end. ``start`` is where the first
    video segment begins on the cues' timeline (:attr:`MediaInfo.video_start`)."""
    header = f"WEBVTT\nX-TIMESTAMP-MAP=MPEGTS:{mpegts % PTS_WRAP},LOCAL:00:00:00.000\n"
    ordered = iter(sorted(cues, key=lambda cue: (cue.start, cue.end)))
    waiting = next(ordered, None)
    active: list[Cue] = []  # begun before the segment's end, in start order
    for position, duration in enumerate(durations):
        end = start + duration if position < len(durations) - 1 else float("inf")
        while waiting is not None and waiting.start < end:
            active.append(waiting)
            waiting = next(ordered, None)
        active = [cue for cue in active if cue.end > start]
        blocks = [
            f"{timestamp(cue.start)} --> {timestamp(cue.end)}"
            f"{' ' + cue.settings if cue.settings else ''}\n{cue.text}\n"
            for cue in active
        ]
        yield "\n".join([header, *blocks]).encode()
        start = end


def _cue_bytes(cue: Cue) -> int:
    """What a cue takes in a WebVTT segment: timing line, settings, text, blank line."""
    return 32 + len(cue.settings.encode()) + len(cue.text.encode())


def check_segmented_size(
    cues: Sequence[Cue], info: MediaInfo, segment_seconds: float, shown: str
) -> None:
    """Fail the job when ``cues`` cut into segments of ``segment_seconds`` would hold more
    than :data:`MAX_SEGMENT_BYTES` in a segment or :data:`MAX_RENDITION_BYTES` in all: every
    cue counts once for each segment it is shown in (cue times as :func:`clip_cues` left
    them, segments from the video's first frame)."""
    count = max(1, math.ceil(info.duration / segment_seconds))
    added = [0] * (count + 1)  # per-segment sums, as differences
    for cue in cues:
        first = min(count - 1, max(0, int((cue.start - info.video_start) // segment_seconds)))
        last = min(count - 1, max(first, math.ceil((cue.end - info.video_start)
                                                   / segment_seconds) - 1))
        added[first] += _cue_bytes(cue)
        added[last + 1] -= _cue_bytes(cue)
    largest = total = running = 0
    for step in added[:count]:
        running += step
        largest, total = max(largest, running), total + running
    if largest > MAX_SEGMENT_BYTES or total > MAX_RENDITION_BYTES:
        raise InvalidSource(
            f"{shown} would make {total / 1e6:.1f} MB of WebVTT segments, {largest / 1e6:.1f} "
            f"MB in its largest (a rendition may hold {MAX_RENDITION_BYTES / 1e6:.0f} MB, a "
            f"segment {MAX_SEGMENT_BYTES / 1e6:.0f} MB): its cues are too long or shown "
            "for too long; a cue is repeated in every segment it is shown in, so check its "
            "cue times and text"
        )


def clip_cues(cues: Sequence[Cue], info: MediaInfo) -> list[Cue]:
    """``cues`` ending at the latest where the video ends; those starting after it left out."""
    ends = info.video_start + info.duration
    return [replace(cue, end=min(cue.end, ends)) for cue in cues if cue.start < ends]


def measured_timestamp_map(svc: Services, job_id: str, asset: str, version: str,
                           video: RenditionEntry, info: MediaInfo) -> int:
    """The X-TIMESTAMP-MAP MPEGTS value of a version: the presentation time (90 kHz) at which
    the source's start lies in the video as produced, read from its first segment (decrypted
    in scratch, with its init segment for fMP4)."""
    first = video.segments[0]
    # Read only: the encrypt stage made this key, and a missing one is an error, not a new key.
    key = svc.keys.get(asset, version, first.key)
    with tempfile.TemporaryDirectory(prefix="hlsvault-subs-") as scratch:
        joined = decrypt_work_segment(svc, job_id, video.name, first, key, Path(scratch),
                                      init=work_init(svc, job_id, video))
        raw = run_ffprobe(str(joined), shown=f"segment {first.name} of {video.name}")
    starts = [float(s["start_time"]) for s in raw.get("streams", [])
              if s.get("codec_type") == "video" and s.get("start_time") not in (None, "N/A")]
    if not starts:
        raise InvalidSource(f"the first segment of {video.name} has no video start time")
    return round((starts[0] - info.video_start) * PTS_HZ) % PTS_WRAP


def subtitle_rendition(
    svc: Services, job_id: str, attempt_prefix: str, track: SubtitleTrack,
    video: RenditionEntry, mpegts: int, start: float,
) -> SegmentedRendition:
    """Write ``track``'s plain WebVTT segments under ``attempt_prefix``, one per segment of
    ``video`` with its sequence number and duration (the first beginning at ``start`` on the
    cues' timeline), and describe them."""
    cues = stored_cues(svc, job_id, track.name)
    segments = []
    pieces = webvtt_segments(cues, [s.duration for s in video.segments], mpegts, start)
    for aligned, data in zip(video.segments, pieces, strict=True):
        name = layout.subtitle_segment_name(aligned.sequence)
        svc.work.put_bytes(layout.plain_segment_key(f"{attempt_prefix}/{track.name}", name),
                           data)
        segments.append(Segment(aligned.sequence, name, aligned.duration, len(data)))
    return SegmentedRendition(
        rendition=track.name, segments=tuple(segments), width=0, height=0, frame_rate="0/0",
        video_profile=None, video_level=None, audio_codec=None, audio_profile=None,
        media="subtitles",
    )
