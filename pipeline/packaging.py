"""The stages of packaging, as plain functions over :class:`~pipeline.services.Services`.

Each stage reads what the previous one left in the work store under ``jobs/<job_id>/`` (the
layout is :mod:`pipeline.layout`'s) and a stage delivered twice leaves the same result.

A segment attempt writes into a directory of its own and then names it in ``produced.json``
with one atomic write, so a redelivered segment stage that overlaps a still-running encrypt of
the same rendition can never hand it a half-written segment: encrypt reads only the attempt
that ``produced.json`` names, and that attempt is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import layout
from .crypto import encrypt_file, iv_for_sequence
from .errors import InvalidSource
from .jobs import JobSpec
from .media import MediaInfo, probe
from .plan import Rendition, plan_renditions
from .playlists import AssetVersion, describe_rendition, key_index, static_playlists
from .segment import PROGRESS_INTERVAL_S, Segment, SegmentedRendition, segment_rendition
from .services import Services
from .sources import ffmpeg_target

SEGMENT_CONTENT_TYPE = "video/mp2t"
PLAYLIST_CONTENT_TYPE = "application/vnd.apple.mpegurl"
#: Segment paths are versioned and never rewritten, so caches may keep them for a year.
IMMUTABLE = "public, max-age=31536000, immutable"
#: Segments of one rendition encrypted at once. OpenSSL releases the GIL while it encrypts, so
#: each thread keeps a core busy; capped because renditions are encrypted side by side too.
ENCRYPT_THREADS = min(os.cpu_count() or 1, 4)
#: The stable master playlist changes with each publish; edges revalidate it after a minute
#: even if an invalidation is lost.
STABLE_PLAYLIST = "public, max-age=60"
#: Concurrent segment uploads per job: enough to hide S3 latency, few enough not to be throttled.
UPLOAD_CONCURRENCY = 16

Progress = Callable[[float], None]


def _ignore(_: float) -> None:
    pass


def _rate_limited(on_progress: Progress) -> Progress:
    """``on_progress`` called at most every PROGRESS_INTERVAL_S, and always for 1.0: each call
    is a job-record write, and a stage of many small segments would otherwise make hundreds."""
    last = 0.0

    def report(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if fraction >= 1.0 or now - last >= PROGRESS_INTERVAL_S:
            last = now
            on_progress(fraction)

    return report


def segment_timeout(duration: float, copy: bool) -> float:
    """ffmpeg's own time limit: a remux reads at disk speed, a transcode may be slower than
    real time on a small machine. Always shorter than the segment actor's time limit."""
    return 120 + duration * (1.0 if copy else 6.0)


def probe_source(svc: Services, spec: JobSpec) -> list[Rendition]:
    """Probe the source and plan its renditions; both are kept in the job record."""
    target, shown = ffmpeg_target(spec.source)
    info = probe(target, shown=shown)
    renditions = plan_renditions(info, spec.ladder, spec.segment_seconds)
    svc.jobs.set_json(spec.job_id, "media", info.to_dict())
    svc.jobs.set_json(spec.job_id, "renditions", [r.to_dict() for r in renditions])
    return renditions


def _job_renditions(svc: Services, spec: JobSpec) -> dict[str, Rendition]:
    record = svc.jobs.get(spec.job_id)
    planned = record.json_field("renditions") or []
    return {item["name"]: Rendition.from_dict(item) for item in planned}


def _media(svc: Services, spec: JobSpec) -> MediaInfo:
    data = svc.jobs.get(spec.job_id).json_field("media")
    if data is None:
        raise InvalidSource("the job has no probe result; it must be probed before segmenting")
    return MediaInfo.from_dict(data)


@contextmanager
def _work_dir(svc: Services, prefix: str) -> Iterator[tuple[Path, bool]]:
    """A local directory for ``prefix`` in the work store: the store's own when it is local,
    else a temporary one, whose files the stage uploads, removed however the stage ends (a
    segment host would otherwise keep a film's worth of plain segments per rendition)."""
    local = svc.work.local_dir(prefix)
    if local is not None:
        yield local, True
        return
    with tempfile.TemporaryDirectory(prefix="hlsvault-") as scratch:
        yield Path(scratch), False


def segment(svc: Services, spec: JobSpec, name: str, on_progress: Progress = _ignore) -> int:
    """Cut one rendition into plain segments; returns how many were produced."""
    rendition = _job_renditions(svc, spec)[name]
    info = _media(svc, spec)
    target, _ = ffmpeg_target(spec.source)
    attempt = uuid.uuid4().hex[:12]
    prefix = layout.plain_attempt_prefix(spec.job_id, name, attempt)
    with _work_dir(svc, prefix) as (out_dir, is_local):
        produced = segment_rendition(
            target,
            rendition,
            out_dir,
            info=info,
            segment_seconds=spec.segment_seconds,
            timeout=segment_timeout(info.duration, rendition.copy),
            on_progress=on_progress,
        )
        if not is_local:
            for seg in produced.segments:
                svc.work.put_file(layout.plain_segment_key(prefix, seg.name), out_dir / seg.name)
    # The switch: from here on, encrypt reads this attempt (whole) and no other.
    record = {"attempt": attempt, "produced": produced.to_dict()}
    svc.work.put_bytes(layout.produced_key(spec.job_id, name), json.dumps(record).encode())
    return len(produced.segments)


def _produced(svc: Services, spec: JobSpec, name: str) -> tuple[str, SegmentedRendition]:
    """The segment attempt that won for rendition ``name``: its work-store prefix and output."""
    record = json.loads(svc.work.get_bytes(layout.produced_key(spec.job_id, name)))
    prefix = layout.plain_attempt_prefix(spec.job_id, name, record["attempt"])
    return prefix, SegmentedRendition.from_dict(record["produced"])


def encrypt(svc: Services, spec: JobSpec, name: str, on_progress: Progress = _ignore) -> int:
    """Encrypt one rendition's segments with the version's keys; returns bytes written."""
    plain_prefix, produced = _produced(svc, spec, name)
    report = _rate_limited(on_progress)
    enc_prefix = layout.encrypted_prefix(spec.job_id, name)
    # Every key the rendition needs, fetched or created before any thread starts, one at a time.
    keys: dict[int, bytes] = {}
    for seg in produced.segments:
        index = key_index(seg.sequence, spec.key_rotation_segments)
        if index not in keys:
            keys[index] = svc.keys.get_or_create(spec.asset, spec.version, index)

    with _work_dir(svc, enc_prefix) as (enc_dir, is_local):

        def encrypt_segment(seg: Segment) -> int:
            plain_key = layout.plain_segment_key(plain_prefix, seg.name)
            plain = svc.work.local_path(plain_key)
            if plain is None:
                # The temporary encrypted directory holds the plain copy too, for a moment.
                plain = enc_dir / f"plain-{seg.name}"
                svc.work.get_file(plain_key, plain)
            index = key_index(seg.sequence, spec.key_rotation_segments)
            written = encrypt_file(
                plain, enc_dir / seg.name, keys[index], iv_for_sequence(seg.sequence)
            )
            if not is_local:
                svc.work.put_file(layout.encrypted_key(spec.job_id, name, seg.name),
                                  enc_dir / seg.name)
                (enc_dir / seg.name).unlink()
                plain.unlink()
            return written

        sizes: list[int] = []
        with ThreadPoolExecutor(max_workers=ENCRYPT_THREADS) as pool:
            # map yields in segment order, whichever thread finishes first.
            for written in pool.map(encrypt_segment, produced.segments):
                sizes.append(written)
                report(len(sizes) / len(produced.segments))
    svc.work.put_bytes(layout.sizes_key(spec.job_id, name), json.dumps(sizes).encode())
    return sum(sizes)


def rotation_warning(spec: JobSpec, segments: int) -> str | None:
    """What to tell the user when key rotation was asked for but cannot happen."""
    rotation = spec.key_rotation_segments
    if rotation <= 0 or segments > rotation:
        return None
    return (
        f"--key-rotation-segments {rotation} asked for a new key every {rotation} segments, but "
        f"the source made only {segments} segment(s) (segments start at keyframes), so the "
        "version has one key; use --ladder default, or a source with more frequent keyframes"
    )


def build_playlists(svc: Services, spec: JobSpec) -> AssetVersion:
    """Describe the version from every rendition's measured output and record it, privately,
    in the catalog. It is not visible to players until the upload stage flips it current."""
    entries = []
    for name in _job_renditions(svc, spec):
        _, produced = _produced(svc, spec, name)
        sizes = json.loads(svc.work.get_bytes(layout.sizes_key(spec.job_id, name)))
        entries.append(describe_rendition(produced, sizes, spec.key_rotation_segments))
    warning = rotation_warning(spec, min(len(e.segments) for e in entries))
    if warning is not None:
        svc.jobs.set_json(spec.job_id, "warnings", [warning])
    described = AssetVersion(
        asset=spec.asset,
        version=spec.version,
        job_id=spec.job_id,
        created_at=time.time(),
        key_rotation_segments=spec.key_rotation_segments,
        renditions=tuple(sorted(entries, key=lambda e: e.bandwidth, reverse=True)),
        key_server=svc.settings.public_url,
    )
    svc.catalog.put_version(described)
    return described


def upload(svc: Services, spec: JobSpec, on_progress: Progress = _ignore) -> dict[str, Any]:
    """Publish: segments to the origin first, then the catalog pointer, so that no player is
    ever handed a playlist naming a segment that is not there yet."""
    described = svc.catalog.get_version(spec.asset, spec.version)
    report = _rate_limited(on_progress)
    items = [
        (rendition.name, seg.name)
        for rendition in described.renditions
        for seg in rendition.segments
    ]
    done = 0

    def put(item: tuple[str, str]) -> None:
        rendition, name = item
        key = layout.segment_key(spec.asset, spec.version, rendition, name)
        work_key = layout.encrypted_key(spec.job_id, rendition, name)
        headers = {"content_type": SEGMENT_CONTENT_TYPE, "cache_control": IMMUTABLE}
        if svc.origin.copy_from(svc.work, work_key, key, **headers):
            return
        with tempfile.TemporaryDirectory(prefix="hlsvault-") as scratch:
            local = Path(scratch) / name
            svc.work.get_file(work_key, local)
            svc.origin.put_file(key, local, **headers)

    with ThreadPoolExecutor(max_workers=UPLOAD_CONCURRENCY) as pool:
        for _ in pool.map(put, items):
            done += 1
            report(done / len(items))
    # Cookie mode's static playlists: the versioned variants, then the stable master.
    for key, text in static_playlists(described).items():
        svc.origin.put_bytes(
            key, text.encode(), content_type=PLAYLIST_CONTENT_TYPE,
            cache_control=STABLE_PLAYLIST if layout.is_stable_key(key) else IMMUTABLE,
        )
    previous = svc.catalog.current_version(spec.asset)
    # Remembered before the flip, so that a retry after it still knows what it replaced.
    if previous is not None and previous != spec.version:
        svc.jobs.set_json(spec.job_id, "replaced", previous)
    replaced = svc.catalog.publish(
        spec.asset, spec.version, job_id=spec.job_id, started_at=spec.created_at,
        grace_s=replaced_grace(spec),
        # A re-key publishes over the version it re-keyed, or not at all.
        expected_previous=(spec.previous_version, spec.version) if spec.kind == "rekey" else None,
    )
    if replaced is not None and replaced != previous:
        svc.jobs.set_json(spec.job_id, "replaced", replaced)  # a racing publish came between
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
    """Remove a job's scratch files; the job's outcome no longer needs them."""
    svc.work.delete_prefix(layout.job_prefix(job_id))
