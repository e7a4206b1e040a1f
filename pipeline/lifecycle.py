"""An asset after its first publish: re-keying, revoking, and shredding retired keys.

Re-keying writes a new version whose segments are the old ones decrypted and re-encrypted under
new keys; nothing is transcoded again. Its flow is ``rekey → upload → invalidate``: the rekey
stage leaves the work store and the catalog exactly as segment, encrypt and playlist would
have, so publishing is the same code. The old version is then retired: its keys are served
for a grace period (players mid-film finish), then refused with 410 and deleted. A version's
MP4 download (:mod:`.downloads`) and its thumbnail sheets (:mod:`.thumbnails`), both clear,
live and go with its keys: a re-key copies them to the new version, a shred deletes the
retired version's, a revocation every one of the asset. A re-key re-encrypts every segment
kind the same way: video, audio and I-frame renditions alike.
"""

from __future__ import annotations

import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import aes, layout
from .crypto import (
    SegmentFile,
    decrypt_file,
    encrypt_files,
    encrypt_files_in_place,
    iv_for_sequence,
)
from .downloads import carry_download, delete_asset_downloads, delete_version_download
from .errors import BadSpec, ConfigurationError, NotFound
from .jobs import JobSpec
from .playlists import AssetVersion, RenditionEntry, key_index
from .services import Services
from .thumbnails import delete_asset_thumbnails, delete_thumbnails


def new_rekey_spec(
    svc: Services, asset: str, *, grace_s: float = layout.DEFAULT_GRACE_S
) -> JobSpec:
    """A job that re-keys the asset's current version into a new one."""
    layout.check_asset_id(asset)
    if not 0 <= grace_s <= layout.MAX_GRACE_S:
        raise BadSpec(
            f"--grace {grace_s:g} is out of range; use 0 to {layout.MAX_GRACE_S:.0f} seconds"
        )
    current = svc.catalog.current(asset)
    if current is None:
        raise NotFound(f"asset {asset} is not published (or was revoked); nothing to re-key")
    job_id = uuid.uuid4().hex
    now = time.time()
    return JobSpec(
        job_id=job_id,
        asset=asset,
        source=f"rekey:{asset}/{current.version}",
        version=layout.new_version(job_id, now=now),
        ladder="rekey",
        key_rotation_segments=current.key_rotation_segments,
        created_at=now,
        kind="rekey",
        previous_version=current.version,
        grace_s=grace_s,
    )


def rekey(svc: Services, spec: JobSpec) -> AssetVersion:
    """Re-encrypt every segment of the previous version under this version's keys, into the
    work store, and record the new version in the catalog (not yet current)."""
    if spec.previous_version is None:
        raise BadSpec("a rekey job needs the version it re-keys")
    old = svc.catalog.get_version(spec.asset, spec.previous_version)
    old_keys: dict[int, bytes] = {}
    new_keys: dict[int, bytes] = {}
    renditions: list[RenditionEntry] = []
    # One answer for the whole rekey: only a copy in its scratch is ever encrypted in place.
    remote = not svc.work.is_local
    with tempfile.TemporaryDirectory(prefix="hlsvault-rekey-") as scratch:
        work_dir = Path(scratch)
        for rendition in old.renditions:
            segments = []
            # A batch at a time: its segments are re-encrypted side by side on one core
            # (pipeline.crypto.encrypt_files), and the scratch holds no more than a batch.
            for start in range(0, len(rendition.segments), aes.LANES):
                batch = rendition.segments[start : start + aes.LANES]
                jobs = []
                for segment in batch:
                    if segment.key not in old_keys:  # one vault read per key, not per segment
                        old_keys[segment.key] = svc.keys.get(spec.asset, old.version, segment.key)
                    index = key_index(segment.sequence, spec.key_rotation_segments)
                    if index not in new_keys:
                        new_keys[index] = svc.keys.get_or_create(spec.asset, spec.version, index)
                    origin_key = layout.segment_key(
                        spec.asset, old.version, rendition.name, segment.name
                    )
                    encrypted = svc.origin.local_path(origin_key)
                    if encrypted is None:
                        encrypted = work_dir / f"old-{segment.name}"
                        svc.origin.get_file(origin_key, encrypted)
                    plain = work_dir / f"plain-{segment.name}"
                    iv = iv_for_sequence(segment.sequence)
                    decrypt_file(encrypted, plain, old_keys[segment.key], iv)
                    if encrypted.parent == work_dir:  # fetched into scratch: done with it
                        encrypted.unlink()
                    out_key = layout.encrypted_key(spec.job_id, rendition.name, segment.name)
                    # Into the work store's own file when it is local; else the decrypted
                    # copy in scratch (this rekey's own) is encrypted in place and put.
                    out = plain if remote else svc.work.local_path(out_key)
                    if out is None:
                        raise ConfigurationError(
                            "a work store with local directories gave no local path")
                    jobs.append(SegmentFile(plain, out, new_keys[index], iv))
                sizes = (encrypt_files_in_place if remote else encrypt_files)(jobs)
                for segment, job, size in zip(batch, jobs, sizes, strict=True):
                    if remote:  # not the work store's own file: put it
                        svc.work.put_file(
                            layout.encrypted_key(spec.job_id, rendition.name, segment.name),
                            job.dst,
                        )
                    job.src.unlink()
                    segments.append(replace(
                        segment, size=size,
                        key=key_index(segment.sequence, spec.key_rotation_segments),
                    ))
            if rendition.init is not None:
                _carry(svc, spec, layout.segment_key(spec.asset, old.version, rendition.name,
                                                     rendition.init),
                       rendition.name, rendition.init)
            renditions.append(replace(rendition, segments=tuple(segments)))
        for sheet in old.thumbnails.sheets if old.thumbnails else ():
            _carry(svc, spec, layout.thumbnail_sheet_key(spec.asset, old.version, sheet),
                   layout.THUMBNAILS_DIR, sheet)
    described = replace(
        old,
        version=spec.version,
        job_id=spec.job_id,
        created_at=time.time(),
        key_rotation_segments=spec.key_rotation_segments,
        renditions=tuple(renditions),
        key_server=svc.settings.public_url,
        download=carry_download(svc, old, spec.version),
    )
    svc.catalog.put_version(described)
    return described


def _carry(svc: Services, spec: JobSpec, origin_key: str, directory: str, name: str) -> None:
    """A clear file (at ``origin_key``) into the new version as it is: an fMP4 rendition's
    init segment (it holds no sample) or a thumbnail sheet (an image, see
    pipeline.thumbnails), so there is nothing to re-key."""
    data = svc.origin.get_bytes(origin_key)
    svc.work.put_bytes(layout.encrypted_key(spec.job_id, directory, name), data)


def shred_due(svc: Services, asset: str, *, now: float | None = None) -> list[str]:
    """Delete the keys of every retired version of ``asset`` whose grace period is over."""
    state = svc.catalog.state(asset)
    if state is None:
        return []
    moment = time.time() if now is None else now
    shredded = []
    for version, deadline in sorted(state.retired.items()):
        # The retirement stays on record, so that the key server keeps answering 410 Gone
        # (not 404) for the shredded version; deleting nothing again is cheap.
        if deadline <= moment:
            downloads = delete_version_download(svc, asset, version)
            downloads += delete_thumbnails(svc, asset, [version])
            if svc.keys.delete_version(asset, version) or downloads:
                shredded.append(version)
    return shredded


def revoke(svc: Services, asset: str, *, cloudfront: Any | None = None) -> dict[str, Any]:
    """Crypto-shred the asset: mark it revoked (key servers answer 410 from ``in_effect_at``
    on, those that heard the announcement at once), delete every key of every version, every
    MP4 download and every thumbnail sheet (whole prefixes: a version a job uploaded but
    never published too), and purge the CDN's copies of its paths. Everything is deleted
    after the mark, so that nothing a job in flight adds before it is missed (a job adding
    after it cannot publish, and deletes its own sheets when it fails)."""
    from .cdn import purge_asset

    layout.check_asset_id(asset)
    if svc.catalog.state(asset) is None:
        raise NotFound(f"asset {asset} was never published; nothing to revoke")
    in_effect_at = svc.catalog.revoke(asset)
    deleted = svc.keys.delete_asset(asset)
    downloads = delete_asset_downloads(svc, asset)
    thumbnails = delete_asset_thumbnails(svc, asset)
    invalidation = purge_asset(svc, asset, client=cloudfront)
    return {"asset": asset, "status": "revoked", "keys_deleted": deleted,
            "downloads_deleted": downloads, "thumbnails_deleted": thumbnails,
            "invalidation": invalidation,
            "in_effect_at": in_effect_at}
