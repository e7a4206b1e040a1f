"""Publishing: a packaged version onto the CDN origin, then the flip that makes it current.

Segments go first, then cookie mode's static playlists, then the asset's state document in one
conditional write (:meth:`pipeline.catalog.Catalog.publish`): no player is ever handed a
playlist that names a segment not there yet. When the job ends, however it ends, its scratch
in the work store is discarded.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import layout
from .jobs import JobSpec
from .packaging import Progress, no_progress, rate_limited
from .playlists import static_playlists
from .services import Services

PLAYLIST_CONTENT_TYPE = "application/vnd.apple.mpegurl"
#: Segment paths are versioned and never rewritten, so caches may keep them for a year.
IMMUTABLE = "public, max-age=31536000, immutable"
#: ...but a private file (a thumbnail sheet, fetched with a signed URL) in no shared cache.
PRIVATE_IMMUTABLE = "private, max-age=31536000, immutable"
#: The stable master playlist changes with each publish; edges revalidate it after a minute
#: even if an invalidation is lost.
STABLE_PLAYLIST = "public, max-age=60"
#: Concurrent segment uploads per job: enough to hide S3 latency, few enough not to be throttled.
UPLOAD_CONCURRENCY = 16


def upload(svc: Services, spec: JobSpec, on_progress: Progress = no_progress) -> dict[str, Any]:
    """Publish: segments to the origin first, then the catalog pointer, so that no player is
    ever handed a playlist naming a segment that is not there yet."""
    described = svc.catalog.get_version(spec.asset, spec.version)
    report = rate_limited(on_progress)
    items = [
        (rendition.name, name, layout.segment_key(spec.asset, spec.version, rendition.name, name))
        for rendition in described.renditions
        for name in ([rendition.init] if rendition.init else [])
        + [seg.name for seg in rendition.segments]
    ]
    if described.thumbnails is not None:
        # Trick play's sprites, clear pictures, go to the origin's private thumbnails/ prefix
        # (pipeline.thumbnails); a job that fails from here on deletes them again.
        items += [(layout.THUMBNAILS_DIR, name,
                   layout.thumbnail_sheet_key(spec.asset, spec.version, name))
                  for name in described.thumbnails.sheets]
    done = 0

    def put(item: tuple[str, str, str]) -> None:
        rendition, name, key = item
        work_key = layout.encrypted_key(spec.job_id, rendition, name)
        private = rendition == layout.THUMBNAILS_DIR
        headers = {"content_type": layout.segment_content_type(name),
                   "cache_control": PRIVATE_IMMUTABLE if private else IMMUTABLE}
        if svc.origin.copy_from(svc.work, work_key, key, **headers):
            return
        with tempfile.TemporaryDirectory(prefix="hlsvault-") as scratch:
            local = Path(scratch) / name
            svc.work.get_file(work_key, local)
            svc.origin.put_file(key, local, **headers)

    def put_playlist(key: str, text: str) -> None:
        svc.origin.put_bytes(
            key, text.encode(), content_type=PLAYLIST_CONTENT_TYPE,
            cache_control=STABLE_PLAYLIST if layout.is_stable_key(key) else IMMUTABLE,
        )

    # Cookie mode's static playlists: the versioned variants go up beside the segments (nothing
    # names them until the stable master does), the master after both.
    playlists = static_playlists(described)
    stable = {key: text for key, text in playlists.items() if layout.is_stable_key(key)}
    with ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY) as pool:
        variants = [pool.submit(put_playlist, key, text)
                    for key, text in playlists.items() if key not in stable]
        for _ in pool.map(put, items):
            done += 1
            report(done / len(items))
        for variant in variants:
            variant.result()
    for key, text in stable.items():
        put_playlist(key, text)

    def remember(replaced: str) -> None:
        # Before the flip, so that a retry after it still knows what it replaced.
        svc.jobs.set_json(spec.job_id, "replaced", replaced)

    svc.catalog.publish(
        spec.asset, spec.version, job_id=spec.job_id, started_at=spec.created_at,
        grace_s=replaced_grace(spec),
        # A re-key publishes over the version it re-keyed, or not at all.
        expected_previous=(spec.previous_version, spec.version) if spec.kind == "rekey" else None,
        on_replacing=remember,
    )
    return {
        "asset": spec.asset,
        "version": spec.version,
        "renditions": [r.name for r in described.renditions],
        "segments": len(items),
    }


def replaced_grace(spec: JobSpec) -> float:
    """How long the version a job replaces keeps its keys: what a re-key asked for, an hour
    for a re-package (players mid-film finish)."""
    return spec.grace_s if spec.kind == "rekey" else layout.DEFAULT_GRACE_S


def discard_work(svc: Services, job_id: str) -> None:
    """Remove a job's scratch files and its outputs; the job's outcome no longer needs them."""
    svc.work.delete_prefix(layout.job_prefix(job_id))
    svc.jobs.drop_outputs(job_id)
