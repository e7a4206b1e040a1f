"""CDN invalidation. Segments and variant playlists live under versioned, immutable paths, so
a publish invalidates only the asset's one stable path: the static cookie-mode master playlist.
A revocation purges everything of the asset from the edges."""

from __future__ import annotations

import time
from typing import Any

from .jobs import JobSpec
from .services import Services

#: CloudFront usually completes an invalidation in under a minute; past this we stop waiting
#: and record it as submitted (it carries on) rather than hold a publish thread any longer.
INVALIDATION_WAIT_S = 60
POLL_INTERVAL_S = 5


def stable_paths(asset: str) -> list[str]:
    """Paths whose content changes when a new version is published."""
    return [f"/assets/{asset}/master.m3u8"]


def invalidate(svc: Services, spec: JobSpec, *, client: Any | None = None) -> dict[str, Any]:
    """Invalidate the asset's stable paths after a publish, or record why it was skipped.

    The caller reference is the job's own: a retried stage re-submits the same request, and
    CloudFront answers with the invalidation it already has instead of creating a second."""
    return _invalidate(svc, stable_paths(spec.asset), f"hlsvault-{spec.job_id}", client)


def purge_asset(svc: Services, asset: str, *, client: Any | None = None) -> dict[str, Any]:
    """Invalidate every path of ``asset`` (after a revocation)."""
    return _invalidate(
        svc, [f"/assets/{asset}/*"], f"hlsvault-revoke-{asset}-{time.time_ns()}", client
    )


def _invalidate(
    svc: Services, paths: list[str], reference: str, client: Any | None
) -> dict[str, Any]:
    distribution = svc.settings.cloudfront_distribution_id
    if not distribution:
        return {"status": "skipped", "reason": "no CloudFront distribution configured"}
    if client is None:
        from .s3 import make_client

        client = make_client("cloudfront")
    response = client.create_invalidation(
        DistributionId=distribution,
        InvalidationBatch={
            "Paths": {"Quantity": len(paths), "Items": paths},
            "CallerReference": reference,
        },
    )
    invalidation_id = response["Invalidation"]["Id"]
    deadline = time.monotonic() + INVALIDATION_WAIT_S
    status = str(response["Invalidation"]["Status"])
    # CloudFront says "Completed"; some implementations of its API say "COMPLETED".
    while status.lower() != "completed" and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        status = str(
            client.get_invalidation(DistributionId=distribution, Id=invalidation_id)[
                "Invalidation"
            ]["Status"]
        )
    return {
        "status": "done" if status.lower() == "completed" else "submitted",
        "invalidation_id": invalidation_id,
        "paths": paths,
    }
