"""CDN invalidation. Segments and variant playlists live under versioned, immutable paths, so
a publish invalidates only the asset's one stable path: the static cookie-mode master playlist.
A revocation purges everything of the asset from the edges."""

from __future__ import annotations

import time
from typing import Any

from . import aws, layout
from .aws import shared_client
from .errors import HlsvaultError, TransientError
from .jobs import JobSpec
from .services import Services


def invalidate(svc: Services, spec: JobSpec, *, client: Any | None = None) -> dict[str, Any]:
    """Invalidate the asset's stable paths after a publish, or record why it was skipped.

    The caller reference is the job's own: a retried stage re-submits the same request, and
    CloudFront answers with the invalidation it already has instead of creating a second.

    One request, not waited on: CloudFront finishes an invalidation within a minute or so on
    its own, and the stable master's max-age (a minute) bounds how long an edge serves the
    old one anyway. Polling until it completes would hold a publish thread and the job's end
    for that long and tell a viewer nothing; the outcome says ``submitted`` (or ``done`` when
    CloudFront answers that it already completed).

    The asset is already published when this runs, so a refusal (a wrong distribution id, a
    policy without cloudfront:CreateInvalidation) does not fail the job: it is reported as
    ``failed`` with the reason, and the stable master expires from the edges within its
    max-age anyway. Transient errors are retried as in every stage."""
    try:
        return _invalidate(
            svc, layout.stable_cdn_paths(spec.asset), f"hlsvault-{spec.job_id}", client
        )
    except TransientError:
        raise
    except HlsvaultError as error:
        return {"status": "failed", "reason": str(error)}


def purge_asset(svc: Services, asset: str, *, client: Any | None = None) -> dict[str, Any]:
    """Invalidate every path of ``asset`` (after a revocation)."""
    return _invalidate(
        svc, layout.asset_cdn_paths(asset), f"hlsvault-revoke-{asset}-{time.time_ns()}", client
    )


def _invalidate(
    svc: Services, paths: list[str], reference: str, client: Any | None
) -> dict[str, Any]:
    distribution = svc.settings.cloudfront_distribution_id
    if not distribution:
        return {"status": "skipped", "reason": "no CloudFront distribution configured"}
    if client is None:
        client = shared_client("cloudfront")
    what = f"CloudFront invalidation on distribution {distribution}"
    try:
        response = client.create_invalidation(
            DistributionId=distribution,
            InvalidationBatch={
                "Paths": {"Quantity": len(paths), "Items": paths},
                "CallerReference": reference,
            },
        )
        invalidation_id = response["Invalidation"]["Id"]
        status = str(response["Invalidation"]["Status"])
    except aws.botocore_errors() as error:
        raise aws.translate(error, what) from None
    return {
        # CloudFront says "Completed"; some implementations of its API say "COMPLETED".
        "status": "done" if status.lower() == "completed" else "submitted",
        "invalidation_id": invalidation_id,
        "paths": paths,
    }
