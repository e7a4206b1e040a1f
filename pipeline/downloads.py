"""Private MP4 downloads: one faststart MP4 of a rendition per version, never public.

The download stage runs after the playlist stage has described the version (and before upload
publishes it). It reads what the encrypt stage left, through the version's description only
(segment names, key indices), decrypts the chosen rendition's segments with the version's own
keys, joins them (MPEG-TS segments concatenate byte for byte) and remuxes that into an MP4 with
its index up front, so a player can start before the whole file has arrived. Nothing is
transcoded, so the MP4's frames are the rendition's frames.

The MP4 goes to ``downloads/<asset>/<version>/<asset>.mp4`` in the origin, marked
``attachment``; the version's description, still private, is rewritten with a
:class:`~pipeline.playlists.DownloadEntry` naming it. The key server hands a token holder a
short-lived signed URL of it (:mod:`keyserver.downloads`).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

from . import layout
from .errors import BadSpec, PermanentError, StageTimeout
from .jobs import JobSpec
from .media import ffmpeg_reason
from .packaging import decrypt_work_segment
from .playlists import AssetVersion, DownloadEntry, RenditionEntry
from .services import Services

MP4_CONTENT_TYPE = "video/mp4"
#: Downloads are per version and immutable, but private: no shared cache may keep a copy
#: that outlives the signed URL that fetched it.
DOWNLOAD_CACHE_CONTROL = "private, max-age=86400"
#: ffmpeg's own time limit on the remux: it reads at disk speed, so a minute plus a second per
#: ten seconds of video is far more than it needs. Far shorter than the actor's time limit.
REMUX_BASE_TIMEOUT_S = 60.0
REMUX_TIMEOUT_PER_MEDIA_S = 0.1


def chosen_rendition(described: AssetVersion, wanted: str) -> RenditionEntry:
    """The rendition ``--download`` names: the top one for :data:`layout.DOWNLOAD_TOP`."""
    if described.container != "ts" or any(r.media == "audio" for r in described.renditions):
        raise BadSpec("--download needs MPEG-TS segments with muxed audio; this version is "
                      f"{described.container} with separate audio; package without --download")
    if wanted == layout.DOWNLOAD_TOP:
        return max(described.variants, key=lambda r: r.bandwidth)
    found = described.rendition(wanted)
    if found is None or found.media != "video":
        names = ", ".join(r.name for r in described.variants)
        raise BadSpec(f"--download {wanted}: the version has no such rendition; it has {names}")
    return found


def remux_timeout(rendition: RenditionEntry) -> float:
    duration = sum(segment.duration for segment in rendition.segments)
    return REMUX_BASE_TIMEOUT_S + duration * REMUX_TIMEOUT_PER_MEDIA_S


def remux_to_mp4(joined: Path, out: Path, *, timeout: float) -> None:
    """Remux an MPEG-TS file into a faststart MP4 (no re-encoding)."""
    args = [
        "ffmpeg", "-nostdin", "-v", "error", "-y",
        # The input is our own decrypted segments: MPEG-TS, read from a local file only.
        "-protocol_whitelist", "file", "-f", "mpegts", "-i", str(joined),
        "-map", "0:v:0", "-map", "0:a?", "-c", "copy",
        "-movflags", "+faststart", "-f", "mp4", str(out),
    ]
    try:
        done = subprocess.run(args, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise StageTimeout(f"the MP4 remux took longer than {timeout:.0f} s") from None
    if done.returncode != 0:
        raise PermanentError(
            f"the MP4 remux failed ({ffmpeg_reason(done.stderr)}); package again without "
            "--download, or from another source"
        )


def make_download(svc: Services, spec: JobSpec) -> DownloadEntry | None:
    """Write the job's MP4 download to the origin and record it in the (unpublished) version
    description; None when the job asked for no download. Idempotent: a redelivery writes the
    same object and the same description."""
    if spec.download is None:
        return None
    described = svc.catalog.get_version(spec.asset, spec.version)
    rendition = chosen_rendition(described, spec.download)
    key = layout.download_key(spec.asset, spec.version)
    with tempfile.TemporaryDirectory(prefix="hlsvault-download-") as scratch:
        work_dir = Path(scratch)
        joined = work_dir / "joined.ts"
        keys: dict[int, bytes] = {}
        with joined.open("wb") as out:
            for segment in rendition.segments:
                if segment.key not in keys:
                    keys[segment.key] = svc.keys.get(spec.asset, spec.version, segment.key)
                plain = decrypt_work_segment(svc, spec.job_id, rendition.name, segment,
                                             keys[segment.key], work_dir)
                with plain.open("rb") as part:
                    shutil.copyfileobj(part, out)
                plain.unlink()
        mp4 = work_dir / layout.download_file_name(spec.asset)
        remux_to_mp4(joined, mp4, timeout=remux_timeout(rendition))
        size = mp4.stat().st_size
        put_download(svc, key, mp4, spec.asset)
    entry = DownloadEntry(rendition=rendition.name, size=size, key=key)
    svc.catalog.put_version(replace(described, download=entry))
    return entry


def put_download(svc: Services, key: str, path: Path, asset: str) -> None:
    """Store a download in the origin with the headers it is served with."""
    svc.origin.put_file(
        key, path, content_type=MP4_CONTENT_TYPE, cache_control=DOWNLOAD_CACHE_CONTROL,
        content_disposition=layout.download_disposition(asset),
    )


def carry_download(svc: Services, old: AssetVersion, new_version: str) -> DownloadEntry | None:
    """A re-key's new version gets the old one's download (the MP4 holds no key: it is copied
    under the new version's path, so the old one goes when the old version is shredded)."""
    if old.download is None:
        return None
    key = layout.download_key(old.asset, new_version)
    with tempfile.TemporaryDirectory(prefix="hlsvault-download-") as scratch:
        local = Path(scratch) / layout.download_file_name(old.asset)
        svc.origin.get_file(old.download.key, local)
        put_download(svc, key, local, old.asset)
    return replace(old.download, key=key)


def delete_version_download(svc: Services, asset: str, version: str) -> int:
    return svc.origin.delete_prefix(layout.version_downloads_prefix(asset, version))


def delete_asset_downloads(svc: Services, asset: str) -> int:
    return svc.origin.delete_prefix(layout.downloads_prefix(asset))
