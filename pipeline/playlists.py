"""Playlists: the measured description of a packaged version, and its rendering as RFC 8216 text.

A packaged version is described once, privately, as an :class:`AssetVersion` (attributes
measured from the produced segments). The key server renders it per viewer, so that key URIs
carry that viewer's token and segment URIs point at the CDN; nothing here knows about tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any, ClassVar

from . import layout
from .errors import ConfigurationError
from .plan import AudioRendition
from .records import IN_A_DESCRIPTION, Kept, an_object, each_known, from_known, required
from .segment import SegmentedRendition
from .thumbnails import Thumbnails

#: EXT-X-VERSION 3: decimal EXTINF durations; everything else MPEG-TS uses is version 1.
HLS_VERSION = 3
#: EXT-X-VERSION of fMP4: EXT-X-MAP in a media playlist needs 6; 7 as the CMAF packaging
#: of Apple's authoring specification declares.
FMP4_HLS_VERSION = 7
#: EXT-X-I-FRAMES-ONLY needs EXT-X-VERSION 4 (RFC 8216 4.3.3.6).
IFRAMES_HLS_VERSION = 4

_H264_PROFILES = {
    # profile name → (profile_idc, constraint flags byte) as RFC 6381 avc1.PPCCLL wants them
    "Baseline": (0x42, 0x00),
    "Constrained Baseline": (0x42, 0xE0),
    "Main": (0x4D, 0x40),
    "Extended": (0x58, 0x00),
    "High": (0x64, 0x00),
}
_AAC_OBJECT_TYPES = {"LC": 2, "HE-AAC": 5, "HE-AACv2": 29, "Main": 1}


def video_codec_tag(profile: str | None, level: int | None) -> str:
    """RFC 6381 codec string for H.264 (``avc1.64001f`` for High@3.1)."""
    profile_idc, constraints = _H264_PROFILES.get(profile or "High", (0x64, 0x00))
    return f"avc1.{profile_idc:02x}{constraints:02x}{(level or 40):02x}"


def audio_codec_tag(codec: str | None, profile: str | None) -> str | None:
    if codec is None:
        return None
    if codec == "aac":
        return f"mp4a.40.{_AAC_OBJECT_TYPES.get(profile or 'LC', 2)}"
    if codec == "mp3":
        return "mp4a.40.34"
    if codec == "ac3":
        return "ac-3"
    if codec == "eac3":
        return "ec-3"
    return None


def key_index(sequence: int, rotation_segments: int) -> int:
    """Which key encrypts segment ``sequence``: one key per ``rotation_segments`` segments."""
    return sequence // rotation_segments if rotation_segments > 0 else 0


@dataclass(frozen=True)
class PublishedSegment:
    #: Read from a version's description: a damaged one is packaged again.
    KEPT_IN: ClassVar[Kept] = IN_A_DESCRIPTION

    sequence: int
    name: str
    duration: float
    size: int  # ciphertext bytes: what a player downloads
    key: int


@dataclass(frozen=True)
class RenditionEntry:
    #: Read from a version's description: a damaged one is packaged again.
    KEPT_IN: ClassVar[Kept] = IN_A_DESCRIPTION

    name: str
    width: int
    height: int
    frame_rate: str
    codecs: str
    bandwidth: int
    average_bandwidth: int
    segments: tuple[PublishedSegment, ...]
    #: fMP4's init segment (EXT-X-MAP), served clear beside the segments; None for MPEG-TS.
    init: str | None = None
    #: "video": a variant (EXT-X-STREAM-INF); "audio": a rendition of the audio group
    #: (EXT-X-MEDIA TYPE=AUDIO); "subtitles": a WebVTT rendition of the subtitles group
    #: (EXT-X-MEDIA TYPE=SUBTITLES). Video variants reference ``group`` with AUDIO=, audio
    #: and subtitle renditions belong to theirs. "iframes": trick play's I-frame rendition
    #: (EXT-X-I-FRAME-STREAM-INF, :mod:`pipeline.trickplay`).
    media: str = "video"
    group: str | None = None
    language: str | None = None
    title: str | None = None
    default: bool = False
    channels: int | None = None
    #: A subtitle rendition that only translates what the audio does not say (FORCED=YES).
    forced: bool = False

    @property
    def target_duration(self) -> int:
        # RFC 8216 §4.3.3.1: each EXTINF rounded to the nearest integer must be <= the target.
        # Half rounds up (6.5 -> 7); Python's round() would give 6, and a strict player refuses.
        return max(1, max(math.floor(segment.duration + 0.5) for segment in self.segments))


@dataclass(frozen=True)
class DownloadEntry:
    """A version's MP4 download: which rendition it is, and its size in bytes."""

    rendition: str
    size: int
    key: str  # its origin key (pipeline.layout.download_key)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DownloadEntry:
        return cls(rendition=str(data["rendition"]), size=int(data["size"]), key=str(data["key"]))


#: The version description format this hlsvault writes and reads. Raise it, and set a new
#: version's ``reader`` to it, only for a change an older reader would get wrong by ignoring a
#: field it does not know (a new key method, IV rule or container); a field that older
#: readers may leave out keeps ``reader`` as it is.
DESCRIPTION_FORMAT = 1


@dataclass(frozen=True)
class AssetVersion:
    """Everything a key server needs to render the playlists of one packaged version."""

    #: Read from a version's description: a damaged one is packaged again.
    KEPT_IN: ClassVar[Kept] = IN_A_DESCRIPTION

    asset: str
    version: str
    job_id: str
    created_at: float
    key_rotation_segments: int
    renditions: tuple[RenditionEntry, ...]
    #: The key server's public URL when the version was packaged: what the static cookie-mode
    #: playlists on the origin name as key URIs (None for versions packaged before it was kept).
    key_server: str | None = None
    #: The MP4 download made with ``--download``, if any (None for versions without one).
    download: DownloadEntry | None = None
    #: Segment container (layout.CONTAINERS).
    container: str = "ts"
    #: Whether the master offers an audio-only variant (the audio group without video).
    audio_only: bool = False
    #: Trick play's thumbnail track (None without trick play).
    thumbnails: Thumbnails | None = None
    #: The oldest description format a reader must know to serve this version correctly
    #: (:data:`DESCRIPTION_FORMAT`); absent in descriptions written before it was kept (1).
    reader: int = 1

    @property
    def key_count(self) -> int:
        return 1 + max(seg.key for r in self.renditions for seg in r.segments)

    def rendition(self, name: str) -> RenditionEntry | None:
        return next((r for r in self.renditions if r.name == name), None)

    @property
    def variants(self) -> tuple[RenditionEntry, ...]:
        """The video renditions: each an EXT-X-STREAM-INF of the master."""
        return tuple(r for r in self.renditions if r.media == "video")

    def audio_group(self, group: str | None) -> tuple[RenditionEntry, ...]:
        """The audio renditions of ``group`` (none for None)."""
        return tuple(r for r in self.renditions if r.media == "audio" and r.group == group)

    @property
    def subtitles(self) -> tuple[RenditionEntry, ...]:
        """The subtitle renditions (one group, which every video variant references)."""
        return tuple(r for r in self.renditions if r.media == "subtitles")

    @property
    def iframes(self) -> tuple[RenditionEntry, ...]:
        """The I-frame renditions: each an EXT-X-I-FRAME-STREAM-INF of the master."""
        return tuple(r for r in self.renditions if r.media == "iframes")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["thumbnails"] = self.thumbnails.to_dict() if self.thumbnails else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AssetVersion:
        """The version a packager described, which may be a newer hlsvault than this key
        server: fields this version does not know are left out at every level
        (:func:`pipeline.records.from_known`), one it needs and does not find is an error,
        and so is a version whose ``reader`` says it needs a newer format than this one
        knows (a field whose meaning a reader cannot ignore)."""
        reader = an_object(cls, data).get("reader", 1)
        named = repr(str(data.get("version"))[:64])
        if not isinstance(reader, int) or isinstance(reader, bool) or reader < 1:
            raise ConfigurationError(f"version {named} has an unreadable description format")
        if reader > DESCRIPTION_FORMAT:
            raise ConfigurationError(
                f"version {named} was packaged by a newer hlsvault (description format "
                f"{reader}; this one reads up to {DESCRIPTION_FORMAT}): upgrade the key servers "
                "and the ops app before the packagers (README, Upgrading a fleet)")
        renditions = tuple(
            from_known(RenditionEntry, r,
                       segments=each_known(PublishedSegment, required(RenditionEntry, r,
                                                                     "segments")))
            for r in required(cls, data, "renditions")
        )
        return from_known(
            cls, data,
            renditions=renditions,
            download=DownloadEntry.from_dict(data["download"]) if data.get("download") else None,
            audio_only=bool(data.get("audio_only", False)),
            thumbnails=Thumbnails.from_dict(data["thumbnails"]) if data.get("thumbnails")
            else None,
        )


def describe_rendition(
    produced: SegmentedRendition, encrypted_sizes: Sequence[int], rotation_segments: int,
    *, audio: AudioRendition | None = None, group: str | None = None,
) -> RenditionEntry:
    """Measure one rendition's master-playlist attributes from what was produced; ``audio``
    is the plan of an audio rendition (its language, name and default), ``group`` the audio
    group of the version (None when its audio is muxed)."""
    segments = tuple(
        PublishedSegment(
            s.sequence, s.name, s.duration, size, key_index(s.sequence, rotation_segments)
        )
        for s, size in zip(produced.segments, encrypted_sizes, strict=True)
    )
    total_bits = sum(s.size for s in segments) * 8
    total_duration = sum(s.duration for s in segments) or 1.0
    # BANDWIDTH is the peak segment bit rate (RFC 8216 §4.3.4.2). A tail segment shorter than a
    # second says little about the peak (its rate is mostly container overhead), so it is
    # measured over the whole segment time it would occupy.
    peak = max(s.size * 8 / max(s.duration, min(1.0, total_duration)) for s in segments)
    codecs = []
    if produced.media in ("video", "iframes"):
        codecs.append(
            produced.video_tag or video_codec_tag(produced.video_profile, produced.video_level)
        )
    audio_tag = audio_codec_tag(produced.audio_codec, produced.audio_profile)
    if audio_tag:
        codecs.append(audio_tag)
    return RenditionEntry(
        name=produced.rendition,
        width=produced.width,
        height=produced.height,
        frame_rate=produced.frame_rate,
        codecs=",".join(codecs),
        bandwidth=math.ceil(peak),
        average_bandwidth=math.ceil(total_bits / total_duration),
        segments=segments,
        init=produced.init,
        media=produced.media,
        group=group,
        language=audio.language if audio else None,
        title=audio.title if audio else None,
        default=audio.default if audio else False,
        channels=produced.channels if produced.media == "audio" else None,
    )


def render_variant(
    version: AssetVersion,
    rendition: RenditionEntry,
    *,
    segment_uri: Callable[[PublishedSegment], str],
    key_uri: Callable[[int], str],
    init_uri: Callable[[str], str] | None = None,
) -> str:
    """A VOD media playlist: one EXT-X-KEY wherever the key changes, IV = media sequence.
    An fMP4 rendition's init segment (``init_uri`` of its name) is declared first, before any
    EXT-X-KEY: it is clear, and a key tag before it would declare it encrypted. An I-frame
    rendition's is marked EXT-X-I-FRAMES-ONLY: each of its segments is one picture."""
    iframes = rendition.media == "iframes"
    version_number = FMP4_HLS_VERSION if rendition.init else HLS_VERSION
    if iframes:
        version_number = max(version_number, IFRAMES_HLS_VERSION)
    lines = [
        "#EXTM3U",
        f"#EXT-X-VERSION:{version_number}",
        f"#EXT-X-TARGETDURATION:{rendition.target_duration}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        "#EXT-X-PLAYLIST-TYPE:VOD",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    if iframes:
        lines.append("#EXT-X-I-FRAMES-ONLY")
    if rendition.init is not None:
        if init_uri is None:
            raise ValueError(f"rendition {rendition.name} is fMP4: its init segment needs a URI")
        lines.append(f'#EXT-X-MAP:URI="{init_uri(rendition.init)}"')
    current_key: int | None = None
    for segment in rendition.segments:
        if segment.key != current_key:
            current_key = segment.key
            # No IV attribute: the player uses the media sequence number, which is what the
            # encrypt stage used (RFC 8216 §5.2).
            lines.append(f'#EXT-X-KEY:METHOD=AES-128,URI="{key_uri(segment.key)}"')
        lines.append(f"#EXTINF:{segment.duration:.6f},")
        lines.append(segment_uri(segment))
    lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def render_master(version: AssetVersion, *, variant_uri: Callable[[RenditionEntry], str]) -> str:
    """The master playlist: the audio group's renditions (EXT-X-MEDIA), the subtitle group's,
    then the video variants from the highest bandwidth down (each naming both groups), then
    the audio-only variant if asked for, then trick play's I-frame stream.

    A variant's BANDWIDTH and AVERAGE-BANDWIDTH include its audio and its subtitles: each
    group's highest, as a player may pick any of its renditions (RFC 8216 4.3.4.2); CODECS
    name video and audio."""
    fmp4 = any(r.init for r in version.renditions)
    lines = ["#EXTM3U", f"#EXT-X-VERSION:{FMP4_HLS_VERSION if fmp4 else HLS_VERSION}",
             "#EXT-X-INDEPENDENT-SEGMENTS"]
    groups = sorted({r.group for r in version.renditions if r.media == "audio" and r.group})
    for group in groups:
        for audio in version.audio_group(group):
            channels = [f'CHANNELS="{audio.channels}"'] if audio.channels else []
            lines.append(_media_tag("AUDIO", audio, variant_uri(audio), channels))
    # Subtitles: DEFAULT only for the track the source marks default (else they are off
    # until the viewer picks one), FORCED from its disposition.
    lines += [
        _media_tag("SUBTITLES", track, variant_uri(track),
                   [f"FORCED={'YES' if track.forced else 'NO'}"])
        for track in version.subtitles
    ]
    subtitle_peak = max((t.bandwidth for t in version.subtitles), default=0)
    subtitle_average = max((t.average_bandwidth for t in version.subtitles), default=0)
    for rendition in sorted(version.variants, key=lambda r: r.bandwidth, reverse=True):
        members = version.audio_group(rendition.group)
        fps = float(Fraction(rendition.frame_rate)) if rendition.frame_rate != "0/0" else 0.0
        peak = max((a.bandwidth for a in members), default=0) + subtitle_peak
        average = max((a.average_bandwidth for a in members), default=0) + subtitle_average
        attributes = [
            f"BANDWIDTH={rendition.bandwidth + peak}",
            f"AVERAGE-BANDWIDTH={rendition.average_bandwidth + average}",
            f"RESOLUTION={rendition.width}x{rendition.height}",
        ]
        if fps:
            attributes.append(f"FRAME-RATE={fps:.3f}")
        attributes.append(f'CODECS="{_codecs(rendition, members)}"')
        if members:
            attributes.append(f'AUDIO="{rendition.group}"')
        if version.subtitles:
            attributes.append(f'SUBTITLES="{version.subtitles[0].group}"')
        lines.append(f"#EXT-X-STREAM-INF:{','.join(attributes)}")
        lines.append(variant_uri(rendition))
    if version.audio_only:
        for group in groups:
            audios = version.audio_group(group)
            chosen = next((a for a in audios if a.default), audios[0])
            attributes = [
                f"BANDWIDTH={max(a.bandwidth for a in audios)}",
                f"AVERAGE-BANDWIDTH={max(a.average_bandwidth for a in audios)}",
                f'CODECS="{_codecs(None, audios)}"',
                f'AUDIO="{group}"',
            ]
            # The audio-only variant plays the group's default rendition; a player switches
            # language within the group as for every other variant.
            lines.append(f"#EXT-X-STREAM-INF:{','.join(attributes)}")
            lines.append(variant_uri(chosen))
    lines += [_iframe_stream(iframes, variant_uri(iframes)) for iframes in version.iframes]
    return "\n".join(lines) + "\n"


def _media_tag(kind: str, rendition: RenditionEntry, uri: str, extra: Sequence[str]) -> str:
    """An EXT-X-MEDIA line: TYPE, GROUP-ID, LANGUAGE (when known), NAME, DEFAULT,
    AUTOSELECT=YES (a player may pick by the viewer's language), ``extra``, URI."""
    attributes = [f"TYPE={kind}", f'GROUP-ID="{rendition.group}"']
    if rendition.language:
        attributes.append(f'LANGUAGE="{rendition.language}"')
    attributes += [
        f'NAME="{_quoted(rendition.title or rendition.name)}"',
        f"DEFAULT={'YES' if rendition.default else 'NO'}",
        "AUTOSELECT=YES",
        *extra,
        f'URI="{uri}"',
    ]
    return f"#EXT-X-MEDIA:{','.join(attributes)}"


def _iframe_stream(iframes: RenditionEntry, uri: str) -> str:
    """The master's EXT-X-I-FRAME-STREAM-INF of an I-frame rendition: its URI an attribute,
    BANDWIDTH the peak rate of its I-frame segments over their EXTINF (RFC 8216 4.3.4.3)."""
    attributes = [
        f"BANDWIDTH={iframes.bandwidth}",
        f"AVERAGE-BANDWIDTH={iframes.average_bandwidth}",
        f"RESOLUTION={iframes.width}x{iframes.height}",
        f'CODECS="{iframes.codecs}"',
        f'URI="{uri}"',
    ]
    return f"#EXT-X-I-FRAME-STREAM-INF:{','.join(attributes)}"


def _codecs(video: RenditionEntry | None, group: Sequence[RenditionEntry]) -> str:
    """A variant's CODECS: its own (video, and muxed audio), then each distinct codec of its
    audio group."""
    tags: list[str] = video.codecs.split(",") if video is not None else []
    for audio in group:
        for tag in audio.codecs.split(","):
            if tag and tag not in tags:
                tags.append(tag)
    return ",".join(tags)


def _quoted(value: str) -> str:
    """A quoted-string attribute value: no double quote, CR or LF (RFC 8216 4.2)."""
    return value.replace('"', "'").replace("\r", " ").replace("\n", " ")


def static_playlists(described: AssetVersion) -> dict[str, str]:
    """Cookie mode's playlists, for the CDN origin: origin key -> playlist text.

    Variant playlists live beside their segments under the versioned path (immutable); their
    key URIs name the key server the version was packaged for (``described.key_server``) and
    carry no token, since the player presents the cookie. The asset's stable ``master.m3u8``
    names the current version's variants and is what a publish invalidates.
    """
    asset, version = described.asset, described.version
    if described.key_server is None:
        raise ValueError("static playlists need the key server's URL (AssetVersion.key_server)")
    key_server = described.key_server

    def key_uri(index: int) -> str:
        return layout.key_url(key_server, asset, version, index)

    def segment_uri_under(prefix: str) -> Callable[[PublishedSegment], str]:
        return lambda segment: f"{prefix}/{segment.name}"

    def init_uri_under(prefix: str) -> Callable[[str], str]:
        return lambda init: f"{prefix}/{init}"

    files = {}
    for rendition in described.renditions:
        files[layout.static_variant_key(asset, version, rendition.name)] = render_variant(
            described,
            rendition,
            segment_uri=segment_uri_under(rendition.name),
            key_uri=key_uri,
            init_uri=init_uri_under(rendition.name),
        )
    files[layout.static_master_key(asset)] = render_master(
        described,
        variant_uri=lambda rendition: layout.static_variant_uri_from_master(
            version, rendition.name
        ),
    )
    return files
