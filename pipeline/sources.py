"""Sources: turn a job's source (a local path, an http(s) URL or ``s3://bucket/key``) into
something ffmpeg can open, refusing with a clear reason what cannot be read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InvalidSource
from .media import check_local_source

#: A presigned source URL must outlive the longest ffmpeg run of the segment stage.
PRESIGN_EXPIRY_S = 12 * 3600


def split_s3_url(url: str) -> tuple[str, str]:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    if not bucket or not key:
        raise InvalidSource(f"source {url} is not of the form s3://bucket/key")
    return bucket, key


def s3_source_url(source: str, *, client: Any | None = None) -> str:
    """Check an ``s3://`` source exists and is readable; return a presigned GET URL for it."""
    from botocore.exceptions import BotoCoreError, ClientError

    from .aws import make_client
    from .errors import TransientError

    bucket, key = split_s3_url(source)
    client = client if client is not None else make_client()
    try:
        head = client.head_object(Bucket=bucket, Key=key)
    except ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
            raise InvalidSource(
                f"source {source} not found; check the bucket and key (S3 keys are case-sensitive)"
            ) from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise InvalidSource(
                f"source {source} is not readable by the worker's AWS credentials (403); "
                "grant s3:GetObject on it"
            ) from None
        raise TransientError(f"S3 error reading {source}: {code}") from None
    except BotoCoreError as error:
        raise TransientError(f"S3 unreachable reading {source}: {type(error).__name__}") from None
    if int(head.get("ContentLength", 0)) == 0:
        raise InvalidSource(f"source {source} is empty (0 bytes); upload it again")
    url: str = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=PRESIGN_EXPIRY_S
    )
    return url


def ffmpeg_target(source: str) -> tuple[str, str]:
    """What ffmpeg should open for ``source``, and how to name it in messages (a presigned
    URL's query string is a credential and is never shown)."""
    if source.startswith("s3://"):
        return s3_source_url(source), source
    if source.startswith(("http://", "https://")):
        return source, source.split("?", 1)[0]
    check_local_source(Path(source), source)
    return source, source
