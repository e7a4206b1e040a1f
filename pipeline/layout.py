"""Every name, path and URL rule of hlsvault, and the defaults a job starts from.

One module owns them so that a stage, the key server, the CLI and the ops app can never disagree
about where a thing lives or what it is called. Nothing else formats a storage key or a URL.

Stores (keys are ``/``-separated, relative)::

    work    jobs/<job>/audio/<attempt>/c003-128k.aac             a chunk's share of the job's audio
            jobs/<job>/plain/c003/<attempt>/<rendition>/seg_00030.ts  a chunk attempt's output
            jobs/<job>/audio/<attempt>/audio0-en/seg_00003.m4s   an audio rendition (separate
                                                                 audio), encrypted (init clear)
            jobs/<job>/enc/<rendition>/seg_00030.ts              encrypted, awaiting upload
            jobs/<job>/enc/<rendition>/init.mp4                  fMP4's init segment (clear)
            jobs/<job>/subtitles/subs0-en.json                   a text track's cues, checked
            jobs/<job>/subtitles/<attempt>/subs0-en/seg_00000.vtt  its WebVTT segments, plain
            jobs/<job>/trickplay/<attempt>/iframes/seg_00003.ts  a plain I-frame segment
            jobs/<job>/enc/thumbnails/sheet_000.jpg              a thumbnail sheet, awaiting upload
            sources/<job>/<file name>                            a local source sent to the fleet
            sources/<job>/subtitles/0.vtt                        a local sidecar sent to the fleet
    origin  assets/<asset>/master.m3u8                           cookie mode's stable master
            assets/<asset>/<version>/<rendition>.m3u8            cookie mode's static variant
            assets/<asset>/<version>/<rendition>/seg_00000.ts    immutable segments (.m4s: fMP4)
            assets/<asset>/<version>/<rendition>/init.mp4        fMP4's init segment (EXT-X-MAP)
            assets/<asset>/<version>/subs0-en/seg_00000.vtt      WebVTT segments (encrypted)
            assets/<asset>/<version>/iframes/seg_00000.ts        trick play: one I-frame each
            downloads/<asset>/<version>/<asset>.mp4              a private download (never public)
            thumbnails/<asset>/<version>/sheet_000.jpg           trick play's sprites (never public)
    vault   keys/<asset>/<version>/000000.key                    wrapped content keys
            catalog/<asset>/current.json                         the asset's state document
            catalog/<asset>/revoked.json                         its revocation, if any
            catalog/<asset>/versions/<version>.json              a version's description

A job's outputs (small JSON a stage leaves for the next, kept beside the job record by
:mod:`pipeline.jobs`, so a hop reads them in one round trip to it, not one to S3 per chunk)::

    produced.c003    names the chunk attempt that won (the first), with its segments
    sizes.c003       a chunk's ciphertext sizes, per rendition in segment order
    audio.c003       names the audio attempt whose pieces the chunk muxes (the first released)
    audio.group      names the audio group's attempt that won (the first), with its sizes

Key server URLs (under ``HLSVAULT_PUBLIC_URL``)::

    /v1/assets/<asset>/master.m3u8   /v1/assets/<asset>/<rendition>.m3u8
    /v1/assets/<asset>/thumbnails.vtt   the thumbnail track (trick play), short-lived signed
                                        sprite URLs (as downloads are signed)
    /v1/keys/<asset>/<version>/<index>
    /v1/downloads/<asset>            302 to a signed URL of the current version's MP4
    /v1/offline/<asset>              the current version's playlists and keys, for offline HLS

Signed CDN access (CloudFront policies and cookies) covers a rendition's segments
(``<cdn>/assets/<asset>/<version>/<rendition>/*``) in tokenized mode, the whole asset
(``<cdn>/assets/<asset>/*``) in cookie mode, and one download URL or one thumbnail sheet URL
(canned policy). ``downloads/`` and ``thumbnails/`` are the origin's private prefixes: clear
files served only through signed URLs, never by the public CDN path.
"""

from __future__ import annotations

import re
import time
import unicodedata
from pathlib import PurePosixPath
from urllib.parse import quote, urlsplit

from .errors import BadSpec

# -- defaults ----------------------------------------------------------------------------------

#: What a job is packaged as unless it says otherwise, from every entry point (CLI, webhook,
#: S3 events): the adaptive ladder, since a single remuxed rendition only suits sources that
#: already are what every player decodes.
DEFAULT_LADDER = "default"
#: Servers `hlsvault serve --server` can run the key server under (granian-rsgi: granian's RSGI
#: interface for the viewer routes, keyserver/rsgi.py); granian answered
#: about 1.25–1.9x uvicorn's requests per core in bench_keyserver.
SERVERS = ("uvicorn", "granian", "granian-rsgi")
DEFAULT_SERVER = "granian"
#: Apple's recommended segment length (HLS authoring specification).
DEFAULT_SEGMENT_SECONDS = 6.0
#: One key for the whole version unless rotation is asked for.
DEFAULT_KEY_ROTATION_SEGMENTS = 0
#: How long a replaced version's keys stay servable after a re-package or a re-key: players
#: part-way through a film finish it.
DEFAULT_GRACE_S = 3600.0
#: The longest grace a re-key may ask for.
MAX_GRACE_S = 7 * 24 * 3600.0
#: ``--download`` without a rendition, and ``"download": true`` in a job request: the rendition
#: with the highest bandwidth (no ladder names a rendition this way: they are ``<height>p``).
DOWNLOAD_TOP = "top"
#: Segment containers: MPEG-TS (every HLS player) or fragmented MP4 / CMAF (HLS version 7,
#: what HEVC and one-track-per-file packaging need).
CONTAINERS = ("ts", "fmp4")
DEFAULT_CONTAINER = "ts"
#: The one ffmpeg demuxer that reads hlsvault's own plain segments of each container (an fMP4
#: media segment after its init segment).
CONTAINER_DEMUXERS = {"ts": "mpegts", "fmp4": "mov"}
#: Video codecs of the default ladder; HEVC only in fMP4 (browsers that decode HEVC in HLS,
#: Safari among them, take it tagged ``hvc1`` in fMP4, not in MPEG-TS).
VIDEO_CODECS = ("h264", "hevc")
DEFAULT_VIDEO_CODEC = "h264"
#: Trick play (an I-frame rendition, thumbnail sprites and their WebVTT track) is asked for
#: per job (``--trick-play``, ``"trick_play": true``): it adds a stage and storage to every
#: asset, so a packaging keeps the shape it always had unless the job wants scrubbing.
DEFAULT_TRICK_PLAY = False
#: The I-frame rendition's id (in paths and URLs; no ladder names a rendition so) and the
#: directory of the thumbnail sprites beside the renditions.
IFRAME_RENDITION = "iframes"
THUMBNAILS_DIR = "thumbnails"
#: Thumbnail tiles: 160 px wide (what web players show above the seek bar), 10 x 10 per sheet
#: (a sheet of a 2-hour film at 6 s segments holds 10 minutes; 12 sheets of ~100 KB).
THUMBNAIL_WIDTH = 160
THUMBNAIL_COLUMNS = 10
THUMBNAIL_ROWS = 10
#: The GROUP-ID of the audio renditions every video variant references with ``AUDIO=``.
AUDIO_GROUP = "audio"
#: The GROUP-ID of the subtitle renditions every video variant references with ``SUBTITLES=``.
SUBTITLES_GROUP = "subs"
#: Chunks are numbered in three digits (c000…): a 2-hour film in 60 s chunks is 120, and
#: storage listings sort in time order up to this many.
MAX_CHUNKS = 1000

# -- identifiers -------------------------------------------------------------------------------

#: Asset ids are used in URLs, storage keys and cookie paths: a conservative alphabet and length.
ASSET_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
MAX_ASSET_ID = 128
VERSION_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
RENDITION_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: A rotation every segment of a 24 h video at 1 s segments stays well below this.
MAX_KEY_INDEX = 1_000_000
_NOT_ASSET_CHAR = re.compile(r"[^A-Za-z0-9_-]+")


def check_asset_id(asset: str) -> str:
    """Refuse asset ids that would not be safe in a URL path or a storage key."""
    if not isinstance(asset, str) or not ASSET_ID_PATTERN.fullmatch(asset):
        shown = asset[:40] if isinstance(asset, str) else type(asset).__name__
        raise BadSpec(
            f"invalid asset id {shown!r}: use 1-128 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )
    return asset


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_PATTERN.fullmatch(version):
        raise BadSpec(f"invalid version {str(version)[:40]!r}")
    return version


def check_key_index(index: int) -> int:
    if not 0 <= index <= MAX_KEY_INDEX:
        raise BadSpec(f"key index {index} out of range (0 to {MAX_KEY_INDEX})")
    return index


def asset_from_name(name: str) -> str | None:
    """The asset id a file or object name gives when none is asked for, or None when it gives
    none: the file name without its last extension, accents dropped (``é`` → ``e``), every run
    of other characters outside ``[A-Za-z0-9_-]`` made one ``-``, leading and trailing ``-`` and
    ``_`` dropped, cut to 128 characters. Always a valid asset id when not None.

    ``uploads/2024/Café (final).mp4`` → ``Cafe-final``.
    """
    stem = PurePosixPath(name.rstrip("/")).stem
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    asset = _NOT_ASSET_CHAR.sub("-", ascii_stem).strip("-_")[:MAX_ASSET_ID].strip("-_")
    return asset or None


def new_version(job_id: str, *, now: float | None = None) -> str:
    """The version a job publishes: sorts by time, and carries a piece of the job id so that
    two jobs started in the same second differ."""
    moment = time.time() if now is None else now
    return time.strftime("v%Y%m%dT%H%M%SZ", time.gmtime(moment)) + f"-{job_id[:8]}"


# -- work store --------------------------------------------------------------------------------


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def chunk_name(index: int) -> str:
    """A time chunk's name in keys, messages and stage names: ``c003``."""
    if not 0 <= index < MAX_CHUNKS:
        raise BadSpec(f"chunk index {index} out of range (0 to {MAX_CHUNKS - 1})")
    return f"c{index:03d}"


def chunk_index(name: str) -> int:
    """The index of a chunk named by :func:`chunk_name`; refuses anything else."""
    if not re.fullmatch(r"c[0-9]{3}", name):
        raise BadSpec(f"invalid chunk name {name[:40]!r}")
    return int(name[1:])


def segment_pattern(container: str) -> str:
    """ffmpeg's segment file name pattern for ``container``; the number is the media sequence."""
    return "seg_%05d.m4s" if container == "fmp4" else "seg_%05d.ts"


#: fMP4's init segment (``EXT-X-MAP``), one per rendition beside its media segments.
INIT_SEGMENT = "init.mp4"
#: Content types of what the origin serves, by file extension.
_CONTENT_TYPES = {".ts": "video/mp2t", ".m4s": "video/iso.segment", ".mp4": "video/mp4",
                  ".vtt": "text/vtt", ".jpg": "image/jpeg"}


def segment_content_type(name: str) -> str:
    """The ``Content-Type`` a segment (or init segment) named ``name`` is served with."""
    return _CONTENT_TYPES.get(PurePosixPath(name).suffix, "application/octet-stream")


def asset_thumbnails_prefix(asset: str) -> str:
    """Where every thumbnail sheet of an asset lives in the origin: private, like downloads
    (clear pictures, served only through short-lived signed URLs)."""
    return f"{THUMBNAILS_DIR}/{check_asset_id(asset)}"


def thumbnails_prefix(asset: str, version: str) -> str:
    """Where a version's thumbnail sheets live in the origin."""
    return f"{asset_thumbnails_prefix(asset)}/{check_version(version)}"


def thumbnail_sheet_key(asset: str, version: str, sheet: str) -> str:
    """The origin key of one of a version's thumbnail sheets."""
    return f"{thumbnails_prefix(asset, version)}/{sheet}"


def thumbnail_sheet_name(index: int) -> str:
    """The ``index``-th thumbnail sprite sheet of a version: ``sheet_000.jpg``."""
    return f"sheet_{index:03d}.jpg"


def audio_rendition_name(position: int, language: str | None) -> str:
    """An audio rendition's id (in paths and URLs): ``audio0-en``, ``audio1`` without a
    language. ``position`` is the source's audio stream order, so names never collide."""
    return _with_language(f"audio{position}", language)


def _with_language(name: str, language: str | None) -> str:
    """``name`` followed by a path-safe form of ``language``, if it has one."""
    tag = re.sub(r"[^a-z0-9-]", "", (language or "").lower())[:16]
    return f"{name}-{tag}" if tag else name


def subtitle_rendition_name(position: int, language: str | None) -> str:
    """A subtitle rendition's id (in paths and URLs): ``subs0-en``. ``position`` counts the
    source's text tracks first, then the sidecar files in the order given."""
    return _with_language(f"subs{position}", language)


def subtitle_segment_name(sequence: int) -> str:
    """A WebVTT segment's name: the media sequence number of the video segment it spans."""
    return f"seg_{sequence:05d}.vtt"


def subtitle_cues_key(job_id: str, rendition: str) -> str:
    """A text track's cues as the probe read and checked them (JSON), for the playlist stage."""
    return f"jobs/{job_id}/subtitles/{rendition}.json"


def subtitle_attempt_prefix(job_id: str, attempt: str) -> str:
    """Where one delivery of the playlist stage writes plain WebVTT segments, per rendition."""
    return f"jobs/{job_id}/subtitles/{attempt}"


def uploaded_sidecar_key(job_id: str, position: int, suffix: str) -> str:
    """A local sidecar subtitle file sent to the fleet: named by its position, never by the
    name the user gave it (``suffix`` is ``.vtt`` or ``.srt``)."""
    return f"sources/{job_id}/subtitles/{position}{suffix}"


def audio_group_output() -> str:
    """The job output naming the audio stage's attempt of separate audio renditions that won,
    with their segments and ciphertext sizes (claimed by the first delivery to finish its cut:
    only that attempt's files are placed)."""
    return "audio.group"


def plain_segment_key(attempt_prefix: str, segment: str) -> str:
    """A plain segment of one segment attempt (``attempt_prefix`` from
    :func:`plain_attempt_prefix`)."""
    return f"{attempt_prefix}/{segment}"


def chunk_prefix(job_id: str, chunk: str) -> str:
    return f"jobs/{job_id}/plain/{chunk}"


def chunk_attempt_prefix(job_id: str, chunk: str, attempt: str) -> str:
    """Where one delivery of a chunk's segment stage writes, every rendition under it: never
    read until the chunk's :func:`produced_output` names it."""
    return f"{chunk_prefix(job_id, chunk)}/{attempt}"


def chunk_rendition_prefix(job_id: str, chunk: str, attempt: str, rendition: str) -> str:
    return f"{chunk_attempt_prefix(job_id, chunk, attempt)}/{rendition}"


def produced_output(chunk: str) -> str:
    """The job output naming the attempt of ``chunk`` that encrypt reads (claimed once the
    attempt is complete: the first delivery to claim it wins)."""
    return f"produced.{chunk}"


def audio_attempt_prefix(job_id: str, attempt: str) -> str:
    """Where one delivery of the audio stage writes its per-chunk pieces."""
    return f"jobs/{job_id}/audio/{attempt}"


def audio_piece_name(chunk: str, kbps: int) -> str:
    """One chunk's share of the job's audio at one bitrate: raw AAC frames (ADTS)."""
    return f"{chunk}-{kbps}k.aac"


def encrypted_prefix(job_id: str, rendition: str) -> str:
    return f"jobs/{job_id}/enc/{rendition}"


def encrypted_key(job_id: str, rendition: str, segment: str) -> str:
    return f"{encrypted_prefix(job_id, rendition)}/{segment}"


def trick_play_attempt_prefix(job_id: str, attempt: str) -> str:
    """Where one delivery of the trick play stage puts its plain I-frame segments, under
    :data:`IFRAME_RENDITION`."""
    return f"jobs/{job_id}/trickplay/{attempt}"


def audio_output(chunk: str) -> str:
    """The job output naming the audio attempt whose pieces ``chunk`` muxes, with where each
    piece's first frame starts (claimed once the chunk's audio is released: the first
    delivery to release it wins)."""
    return f"audio.{chunk}"


def sizes_output(chunk: str) -> str:
    """The job output holding a chunk's ciphertext sizes, per rendition in segment order."""
    return f"sizes.{chunk}"


def uploaded_source_key(job_id: str, file_name: str) -> str:
    return f"sources/{job_id}/{file_name}"


# -- origin (what the CDN serves) ----------------------------------------------------------------


def asset_prefix(asset: str) -> str:
    return f"assets/{check_asset_id(asset)}"


def segment_key(asset: str, version: str, rendition: str, segment: str) -> str:
    return f"assets/{asset}/{version}/{rendition}/{segment}"


def static_variant_key(asset: str, version: str, rendition: str) -> str:
    return f"assets/{asset}/{version}/{rendition}.m3u8"


def static_master_key(asset: str) -> str:
    return f"assets/{asset}/master.m3u8"


def is_stable_key(key: str) -> bool:
    """Whether an origin key is rewritten by later publishes (only the static master is)."""
    return key.startswith("assets/") and key.count("/") == 2


def static_variant_uri_from_master(version: str, rendition: str) -> str:
    """A static variant as the static master names it: relative to ``assets/<asset>/``."""
    return f"{version}/{rendition}.m3u8"


def stable_cdn_paths(asset: str) -> list[str]:
    """CDN paths whose content changes with each publish: what a publish invalidates."""
    return [f"/{static_master_key(asset)}"]


def asset_cdn_paths(asset: str) -> list[str]:
    """Every CDN path of an asset: what a revocation purges (its downloads and thumbnail
    sheets too)."""
    return [f"/{asset_prefix(asset)}/*", f"/{downloads_prefix(asset)}/*",
            f"/{asset_thumbnails_prefix(asset)}/*"]


def downloads_prefix(asset: str) -> str:
    return f"downloads/{check_asset_id(asset)}"


def version_downloads_prefix(asset: str, version: str) -> str:
    return f"{downloads_prefix(asset)}/{check_version(version)}"


def download_key(asset: str, version: str) -> str:
    """Where a version's MP4 download lives in the origin: private, served only through a
    signed URL the key server hands out."""
    return f"{version_downloads_prefix(asset, version)}/{asset}.mp4"


def download_file_name(asset: str) -> str:
    """The file name a browser saves a download as (``Content-Disposition``)."""
    return f"{asset}.mp4"


def download_disposition(asset: str) -> str:
    """The ``Content-Disposition`` of a download: saved, never shown inline."""
    return f'attachment; filename="{download_file_name(asset)}"'


def is_download_key(key: str) -> bool:
    return key.startswith("downloads/")


#: The origin's private top-level directories: served only through signed URLs, never by the
#: public CDN path (the embedded /cdn/ static files refuse them).
PRIVATE_ORIGIN_DIRS = ("downloads", THUMBNAILS_DIR)


def rendition_resource(cdn: str, asset: str, version: str, rendition: str) -> str:
    """The wildcard resource of a tokenized variant's signature: every segment of it."""
    return f"{cdn_url(cdn, f'assets/{asset}/{version}/{rendition}')}/*"


def asset_resource(cdn: str, asset: str) -> str:
    """The wildcard resource of cookie mode's CloudFront cookies: everything of the asset."""
    return f"{cdn_url(cdn, asset_prefix(asset))}/*"


def cdn_cookie_path(cdn: str, asset: str) -> str:
    """The ``Path`` of cookie mode's CloudFront cookies: the asset's directory on the CDN,
    under any path prefix of the CDN URL."""
    return f"{urlsplit(cdn).path.rstrip('/')}/{asset_prefix(asset)}/"


def cdn_url(cdn: str, key: str) -> str:
    """The CDN URL of an origin key."""
    return f"{cdn.rstrip('/')}/{key}"


# -- vault ---------------------------------------------------------------------------------------


def key_path(asset: str, version: str, index: int) -> str:
    """Where a wrapped content key lives in the vault."""
    check_key_index(index)
    return f"{version_keys_prefix(asset, version)}/{index:06d}.key"


def version_keys_prefix(asset: str, version: str) -> str:
    return f"keys/{check_asset_id(asset)}/{check_version(version)}"


def asset_keys_prefix(asset: str) -> str:
    return f"keys/{check_asset_id(asset)}"


def version_description_key(asset: str, version: str) -> str:
    return f"{versions_prefix(asset)}/{check_version(version)}.json"


def versions_prefix(asset: str) -> str:
    return f"catalog/{check_asset_id(asset)}/versions"


def state_key(asset: str) -> str:
    return f"catalog/{check_asset_id(asset)}/current.json"


def revoked_key(asset: str) -> str:
    return f"catalog/{check_asset_id(asset)}/revoked.json"


# -- Redis --------------------------------------------------------------------------------------

#: dramatiq's key namespace in Redis (queues, heartbeats); the ops app reads queue depths under it.
BROKER_NAMESPACE = "hlsvault"
#: The hash where key servers count key requests by outcome, for the ops app's metrics.
KEY_REQUESTS_HASH = "hlsvault:stats:key_requests"
#: A counter: audit and access lines the key servers dropped because their log sink fell
#: behind (keyserver/auditlog.py); the ops app exports it.
LOG_LINES_DROPPED_KEY = "hlsvault:stats:log_lines_dropped"

# -- key server URLs -----------------------------------------------------------------------------

MASTER_ROUTE = "/v1/assets/{asset}/master.m3u8"
VARIANT_ROUTE = "/v1/assets/{asset}/{rendition}.m3u8"
KEY_ROUTE = "/v1/keys/{asset}/{version}/{index}"
THUMBNAILS_ROUTE = "/v1/assets/{asset}/thumbnails.vtt"
DOWNLOAD_ROUTE = "/v1/downloads/{asset}"
OFFLINE_ROUTE = "/v1/offline/{asset}"
#: Embedded mode only: the origin's downloads, each request checked against a signature the
#: key server made (the rest of /cdn/ is public, as a CDN is).
EMBEDDED_DOWNLOAD_ROUTE = "/cdn/downloads/{asset}/{version}/{name}"
#: ...and its thumbnail sheets, the same way.
EMBEDDED_THUMBNAIL_ROUTE = "/cdn/thumbnails/{asset}/{version}/{name}"
#: Every request under this prefix writes an audit line of its own.
KEYS_PATH_PREFIX = "/v1/keys/"
#: ...and under these: key, download and offline requests.
AUDITED_PATH_PREFIXES = (KEYS_PATH_PREFIX, "/v1/downloads/", "/v1/offline/")


def master_url(public_url: str, asset: str, query: str = "") -> str:
    return f"{public_url}/v1/assets/{quote(asset, safe='')}/master.m3u8{query}"


def variant_url(public_url: str, asset: str, rendition: str, query: str = "") -> str:
    return f"{public_url}/v1/assets/{asset}/{rendition}.m3u8{query}"


def thumbnails_url(public_url: str, asset: str, query: str = "") -> str:
    return f"{public_url}/v1/assets/{quote(asset, safe='')}/thumbnails.vtt{query}"


def key_url(public_url: str, asset: str, version: str, index: int, query: str = "") -> str:
    return f"{public_url}/v1/keys/{asset}/{version}/{index}{query}"


def download_url(public_url: str, asset: str, query: str = "") -> str:
    return f"{public_url}/v1/downloads/{asset}{query}"


def offline_url(public_url: str, asset: str, query: str = "") -> str:
    return f"{public_url}/v1/offline/{asset}{query}"


def embedded_origin_url(public_url: str, key: str, query: str) -> str:
    """The embedded server's URL of a private origin file (a download, a thumbnail sheet),
    with the signature query it checks."""
    return f"{public_url}/cdn/{key}{query}"


#: Offline bundles name their keys with this scheme, which no player fetches by itself: an
#: AVAssetResourceLoaderDelegate (iOS) or a Media3 DataSource answers it from stored keys.
OFFLINE_KEY_SCHEME = "hlsvault-key"


def offline_key_uri(asset: str, version: str, index: int) -> str:
    return f"{OFFLINE_KEY_SCHEME}://{asset}/{version}/{index}"


def key_cookie_path(public_url: str, asset: str) -> str:
    """The path of cookie mode's cookie: the asset's keys as the browser sees them, under any
    path prefix of the public URL."""
    return f"{urlsplit(public_url).path.rstrip('/')}/v1/keys/{asset}/"
