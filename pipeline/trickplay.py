"""Trick play: an I-frame rendition (``EXT-X-I-FRAMES-ONLY``) and thumbnail sprites with their
WebVTT track, made from a packaged version before it is published.

**What an I-frame segment is.** One per media segment of the version's smallest video
rendition: that segment's first picture, which is a keyframe (the hls muxer starts every
segment on one, and the default ladder forces one at every segment boundary). The I-frame
playlist therefore has exactly as many segments as that rendition, each with the media
segment's duration as its EXTINF (RFC 8216 4.3.3.6: the time until the next I-frame of the
playlist) and its media sequence number. The smallest rendition because trick play shows
pictures for a moment while seeking: a 360p keyframe is a few KB, and a player fetches one per
step.

**Why separate files, each encrypted whole.** The usual I-frame playlist names byte ranges of
the media segments (``EXT-X-BYTERANGE``). Under METHOD=AES-128 a media segment is one CBC
ciphertext (RFC 8216 5.2): to decrypt a range starting at byte ``n``, a player needs the
ciphertext block before ``n`` as its IV, and the range ends without PKCS#7 padding. RFC 8216
says nothing of either; the draft that follows it (rfc8216bis, 6.3.6) has players widen the
range to fetch the block before it, which hls.js does not do (it plays no I-frame playlist at
all), and even a segment's first I-frame starts after its PAT and PMT, at byte 376, not on a
block boundary. So every I-frame is its own small file (``iframes/seg_00007.ts``, or a
one-sample ``.m4s`` under its own clear init segment for fMP4), encrypted whole with PKCS#7,
IV = its media sequence number, under the key of the media segment it was taken from: any
player that plays the variants decrypts it the same way.

The keyframe's packet is copied, not re-encoded (one ffmpeg per 10 segments, reading the start
of each, on the decrypted bytes of the published segments: sealed and unsealed chunks alike),
so the rendition's CODECS and RESOLUTION are the source rendition's, measured when it was
cut. The thumbnails are those pictures, decoded once more and tiled
(:mod:`pipeline.thumbnails`): tile ``i`` shows the first picture of media segment ``i``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import ffmpeg

from . import layout
from .errors import UnsupportedMedia
from .jobs import JobSpec
from .packaging import decrypt_work_segment, encrypt_renditions
from .playlists import AssetVersion, PublishedSegment, RenditionEntry, describe_rendition
from .segment import (
    PLAIN_PLAYLIST,
    Segment,
    SegmentedRendition,
    hls_options,
    parse_plain_playlist,
    run_ffmpeg,
)
from .services import Services
from .sources import ffmpeg_command, work_input
from .thumbnails import Thumbnails, plan_thumbnails, sprite_args

#: ffmpegs copying I-frames at once: each is mostly process start and reading headers.
IFRAME_THREADS = min(os.cpu_count() or 1, 4)
#: Segments per ffmpeg: one process copies the first picture of each of them (one input and
#: one output each), so a film of 1200 segments starts 120 processes, not 1200; and at most
#: this many decrypted segments per thread sit in scratch at once (a 6 s segment of a
#: 15 Mbit/s remux is 11 MB).
IFRAMES_PER_FFMPEG = 10
#: One such ffmpeg reads the start of each of its segments on local disk: seconds at most.
IFRAME_TIMEOUT_S = 120.0
#: The sprite ffmpeg decodes one small picture per segment: this plus a second per 100.
SPRITE_BASE_TIMEOUT_S = 60.0
_DEMUXERS = {"ts": "mpegts", "fmp4": "mov"}


def iframe_source(described: AssetVersion) -> RenditionEntry:
    """The rendition the I-frames are taken from: the smallest video rendition."""
    return min(described.variants, key=lambda r: (r.width * r.height, r.bandwidth))


def iframe_args(segments: Sequence[tuple[Path, int, Path]], container: str) -> list[str]:
    """The one ffmpeg command that copies, for each ``(segment, sequence, out_dir)``, the
    first video packet of ``segment`` (a plain media segment; fMP4: preceded by its init
    segment) into ``out_dir`` as a one-picture segment of media sequence ``sequence``, its
    timestamps kept (``-copyts``)."""
    outputs = []
    for segment, sequence, out_dir in segments:
        name, options = work_input(str(segment), demuxer=_DEMUXERS[container])
        video = ffmpeg.input(name, **options)["v:0"]
        hls = hls_options(out_dir, 1.0, container, sequence)
        if container == "fmp4":
            # The MP4 muxer would start the fragment's time at 0; keep the picture's own.
            hls["hls_segment_options"] = "movflags=+frag_discont"
        outputs.append(ffmpeg.output(video, str(out_dir / PLAIN_PLAYLIST), c="copy",
                                     copyts=None, **{"frames:v": 1}, **hls))
    return ffmpeg_command(outputs)


def make_trick_play(svc: Services, spec: JobSpec) -> AssetVersion:
    """Make the version's I-frame rendition and thumbnails from its encrypted segments in the
    work store, put them beside the segments (awaiting upload) and add them to the version's
    description in the catalog. Delivered twice, it describes the same thing again."""
    described = svc.catalog.get_version(spec.asset, spec.version)
    base = replace(
        described, renditions=tuple(r for r in described.renditions if r.media != "iframes"),
        thumbnails=None,
    )
    source = iframe_source(base)
    attempt = uuid.uuid4().hex[:12]
    prefix = layout.trick_play_attempt_prefix(spec.job_id, attempt)
    with tempfile.TemporaryDirectory(prefix="hlsvault-trick-") as scratch:
        work = Path(scratch)
        iframes_dir = work / layout.IFRAME_RENDITION
        iframes_dir.mkdir()
        try:
            segments = _extract_iframes(svc, spec, base, source, work, iframes_dir)
        except UnsupportedMedia as error:
            raise UnsupportedMedia(
                f"trick play: the I-frames of {source.name} could not be copied ({error}); "
                "package without --trick-play"
            ) from None
        produced = SegmentedRendition(
            rendition=layout.IFRAME_RENDITION, segments=tuple(segments), width=source.width,
            height=source.height, frame_rate=source.frame_rate, video_profile=None,
            video_level=None, audio_codec=None, audio_profile=None,
            init=layout.INIT_SEGMENT if source.init else None, media="iframes",
            # The packets are the source rendition's own: its measured video codec.
            video_tag=source.codecs.split(",")[0],
        )
        for file_name in ([produced.init] if produced.init else []) + [s.name for s in segments]:
            svc.work.put_file(f"{prefix}/{layout.IFRAME_RENDITION}/{file_name}",
                              iframes_dir / file_name)
        sizes = encrypt_renditions(svc, spec, prefix, {produced.rendition: produced},
                                   first_chunk=True)
        try:
            thumbnails = _make_sprites(svc, spec, produced, iframes_dir, work)
        except UnsupportedMedia as error:
            raise UnsupportedMedia(
                f"trick play: the thumbnails could not be made ({error}); package without "
                "--trick-play"
            ) from None
    entry = describe_rendition(produced, sizes[produced.rendition], spec.key_rotation_segments)
    with_trick_play = replace(base, renditions=(*base.renditions, entry), thumbnails=thumbnails)
    svc.catalog.put_version(with_trick_play)
    return with_trick_play


def _extract_iframes(
    svc: Services, spec: JobSpec, described: AssetVersion, source: RenditionEntry, work: Path,
    iframes_dir: Path,
) -> list[Segment]:
    """Every media segment of ``source`` decrypted and its first picture copied into
    ``iframes_dir`` (with the init segment, fMP4); the I-frame segments in order, each with
    its media segment's sequence number and duration and its own plain size."""
    container = described.container
    init: bytes | None = None
    if source.init is not None:
        init = svc.work.get_bytes(layout.encrypted_key(spec.job_id, source.name, source.init))
    keys: dict[int, bytes] = {}
    for segment in source.segments:
        if segment.key not in keys:
            keys[segment.key] = svc.keys.get(spec.asset, spec.version, segment.key)

    def plain_segment(segment: PublishedSegment, own: Path) -> Path:
        """The media segment decrypted into ``own`` (fMP4: after its init segment)."""
        plain = decrypt_work_segment(svc, spec.job_id, source.name, segment, keys[segment.key],
                                     own)
        if init is None:
            return plain
        # An fMP4 media segment parses only after its init segment.
        joined = own / "joined.mp4"
        with joined.open("wb") as out:
            out.write(init)
            with plain.open("rb") as body:
                shutil.copyfileobj(body, out)
        return joined

    def extract(batch: Sequence[int]) -> list[Segment]:
        items = []
        for index in batch:
            segment = source.segments[index]
            own = work / f"x{segment.sequence}"
            (own / "out").mkdir(parents=True)
            items.append((plain_segment(segment, own), segment.sequence, own / "out"))
        run_ffmpeg(iframe_args(items, container), duration=0.0, timeout=IFRAME_TIMEOUT_S,
                   on_progress=None)
        found = []
        for index, (_, sequence, out_dir) in zip(batch, items, strict=True):
            segment = source.segments[index]
            made = parse_plain_playlist(out_dir, sequence)
            if len(made) != 1:
                raise UnsupportedMedia(f"the I-frame of {source.name}/{segment.name} came out "
                                       f"as {len(made)} segments")
            os.replace(out_dir / made[0].name, iframes_dir / made[0].name)
            if index == 0 and init is not None:
                os.replace(out_dir / layout.INIT_SEGMENT, iframes_dir / layout.INIT_SEGMENT)
            shutil.rmtree(out_dir.parent)
            # EXTINF of an I-frame: the time until the next one, the media segment's.
            found.append(replace(made[0], duration=segment.duration))
        return found

    indices = range(len(source.segments))
    batches = [indices[at:at + IFRAMES_PER_FFMPEG]
               for at in range(0, len(indices), IFRAMES_PER_FFMPEG)]
    with ThreadPoolExecutor(max_workers=IFRAME_THREADS) as pool:
        return [segment for done in pool.map(extract, batches) for segment in done]


def _make_sprites(
    svc: Services, spec: JobSpec, iframes: SegmentedRendition, iframes_dir: Path, work: Path
) -> Thumbnails:
    """The thumbnail sheets of the I-frames (plain, in ``iframes_dir``), put beside the
    encrypted segments in the work store (awaiting upload, as they are: see
    :mod:`pipeline.thumbnails`)."""
    plan = plan_thumbnails(iframes.width, iframes.height,
                           [segment.duration for segment in iframes.segments])
    joined = work / "iframes-joined"
    with joined.open("wb") as out:
        # MPEG-TS files join by concatenation; fragments join after their init segment.
        for name in ([iframes.init] if iframes.init else []) + [s.name for s in iframes.segments]:
            with (iframes_dir / name).open("rb") as part:
                shutil.copyfileobj(part, out)
    sheets_dir = work / layout.THUMBNAILS_DIR
    sheets_dir.mkdir()
    container = "fmp4" if iframes.init else "ts"
    run_ffmpeg(sprite_args(joined, _DEMUXERS[container], plan, sheets_dir), duration=0.0,
               timeout=SPRITE_BASE_TIMEOUT_S + len(iframes.segments) / 100, on_progress=None)
    made = sorted(path.name for path in sheets_dir.glob("sheet_*.jpg"))
    if made != list(plan.sheets):
        raise UnsupportedMedia(
            f"ffmpeg made {len(made)} thumbnail sheets of {len(iframes.segments)} I-frames, "
            f"where {len(plan.sheets)} were planned"
        )
    for name in made:
        svc.work.put_file(layout.encrypted_key(spec.job_id, layout.THUMBNAILS_DIR, name),
                          sheets_dir / name)
    return plan
