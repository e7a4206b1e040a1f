"""CDN invalidation: only stable paths are ever invalidated; versioned segments never change."""

from __future__ import annotations

import time
from typing import Any

from .jobs import JobSpec
from .services import Services

#: CloudFront usually completes an invalidation in under a minute; past this we stop waiting
#: (the invalidation itself carries on) rather than hold a worker thread.
INVALIDATION_WAIT_S = 300
POLL_INTERVAL_S = 5


def stable_paths(asset: str) -> list[str]:
    """Paths whose content changes when a new version is published: the static playlists
    that cookie-mode players fetch from the CDN. Everything else is versioned."""
    return [f"/assets/{asset}/*.m3u8"]


def invalidate(svc: Services, spec: JobSpec, *, client: Any | None = None) -> dict[str, Any]:
    """Invalidate the asset's stable paths on CloudFront, or record why it was skipped."""
    distribution = svc.settings.cloudfront_distribution_id
    if not distribution:
        return {"status": "skipped", "reason": "no CloudFront distribution configured"}
    if client is None:
        from .s3 import make_client

        client = make_client("cloudfront")
    paths = stable_paths(spec.asset)
    # The caller reference is the job's own: a retried stage re-submits the same request, and
    # CloudFront answers with the invalidation it already has instead of creating a second.
    response = client.create_invalidation(
        DistributionId=distribution,
        InvalidationBatch={
            "Paths": {"Quantity": len(paths), "Items": paths},
            "CallerReference": f"hlsvault-{spec.job_id}",
        },
    )
    invalidation_id = response["Invalidation"]["Id"]
    deadline = time.monotonic() + INVALIDATION_WAIT_S
    status = response["Invalidation"]["Status"]
    # CloudFront says "Completed"; some implementations of its API say "COMPLETED".
    while status.lower() != "completed" and time.monotonic() < deadline:
        time.sleep(POLL_INTERVAL_S)
        status = client.get_invalidation(DistributionId=distribution, Id=invalidation_id)[
            "Invalidation"
        ]["Status"]
    return {
        "status": "done" if status == "Completed" else "submitted",
        "invalidation_id": invalidation_id,
        "paths": paths,
    }
