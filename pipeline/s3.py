"""The S3 store: ``s3://bucket/prefix`` through boto3, honouring the standard AWS configuration.

Credentials, region and ``AWS_ENDPOINT_URL`` come from boto3's own chain. Every request has a
connect and read timeout and a bounded number of retries (botocore's adaptive mode), so a
stalled endpoint surfaces as a :class:`~pipeline.errors.TransientError` instead of a hang.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from .errors import InvalidSource, TransientError
from .storage import ObjectNotFound, Store, check_key

#: Seconds to open a connection; S3 answers in milliseconds when it is up.
CONNECT_TIMEOUT_S = 5
#: Seconds to wait for a response byte; generous for multi-megabyte segment uploads.
READ_TIMEOUT_S = 60
#: botocore's own retry bound for throttling and 5xx, before the stage's retries take over.
MAX_ATTEMPTS = 5
#: Parallel connections per client; uploads run this many segments at once.
MAX_POOL_CONNECTIONS = 32

_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_PERMANENT = {"AccessDenied", "NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch"}


_CONFIG = Config(
    connect_timeout=CONNECT_TIMEOUT_S,
    read_timeout=READ_TIMEOUT_S,
    retries={"max_attempts": MAX_ATTEMPTS, "mode": "adaptive"},
    max_pool_connections=MAX_POOL_CONNECTIONS,
)
_sessions: dict[int, boto3.session.Session] = {}
_sessions_lock = threading.Lock()


def make_client(service: str = "s3") -> Any:
    """A boto3 client with hlsvault's timeouts and retry bound.

    Clients come from one session per process (a fresh session costs ~60 ms; a client from a
    warm one ~4 ms). Sessions are not thread-safe to create clients from, hence the lock, and
    not fork-safe, hence one per process id (dramatiq forks its worker processes)."""
    with _sessions_lock:
        session = _sessions.get(os.getpid())
        if session is None:
            session = _sessions[os.getpid()] = boto3.session.Session()
        # The service name is chosen at run time; boto3-stubs type only literal names.
        return session.client(service, config=_CONFIG)  # type: ignore[call-overload]


def translate(error: Exception, what: str) -> Exception:
    """Map a botocore error onto the hlsvault tree: permanent for 4xx we cannot fix by waiting."""
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        if code in _NOT_FOUND:
            return ObjectNotFound(what)
        if code in _PERMANENT:
            return InvalidSource(f"S3 refused {what}: {code}; check the bucket name and IAM policy")
        return TransientError(f"S3 error on {what}: {code}")
    return TransientError(f"S3 unreachable on {what}: {type(error).__name__}")


class S3Store:
    """A store under ``s3://bucket/prefix``."""

    def __init__(self, bucket: str, prefix: str, *, client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.client = client if client is not None else make_client()

    @classmethod
    def from_url(cls, url: str, *, client: Any | None = None) -> S3Store:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return cls(bucket, prefix, client=client)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _extra(self, content_type: str | None, cache_control: str | None) -> dict[str, str]:
        extra = {}
        if content_type:
            extra["ContentType"] = content_type
        if cache_control:
            extra["CacheControl"] = cache_control
        return extra

    def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        try:
            with path.open("rb") as body:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=body,
                    **self._extra(content_type, cache_control),
                )
        except (ClientError, BotoCoreError) as error:
            raise translate(error, key) from None

    def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        cache_control: str | None = None,
    ) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                **self._extra(content_type, cache_control),
            )
        except (ClientError, BotoCoreError) as error:
            raise translate(error, key) from None

    def put_bytes_if_absent(self, key: str, data: bytes) -> bool:
        try:
            # S3 conditional write: of two racing PUTs with If-None-Match exactly one succeeds.
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*"
            )
            return True
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise translate(error, key) from None
        except BotoCoreError as error:
            raise translate(error, key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(response["Body"].read())
        except (ClientError, BotoCoreError) as error:
            raise translate(error, key) from None

    def get_file(self, key: str, path: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except (ClientError, BotoCoreError) as error:
            raise translate(error, key) from None

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as error:
            translated = translate(error, key)
            if isinstance(translated, ObjectNotFound):
                return False
            raise translated from None
        except BotoCoreError as error:
            raise translate(error, key) from None

    def list(self, prefix: str) -> list[str]:
        full = (
            self._key(prefix.strip("/")) + "/"
            if prefix.strip("/")
            else (f"{self.prefix}/" if self.prefix else "")
        )
        strip = len(f"{self.prefix}/") if self.prefix else 0
        keys: list[str] = []
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                keys.extend(item["Key"][strip:] for item in page.get("Contents", []))
        except (ClientError, BotoCoreError) as error:
            raise translate(error, prefix) from None
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            except (ClientError, BotoCoreError) as error:
                raise translate(error, prefix) from None
        return len(keys)

    def local_path(self, key: str) -> Path | None:
        return None

    def copy_from(
        self, source: Store, source_key: str, key: str, *, content_type: str | None = None,
        cache_control: str | None = None,
    ) -> bool:
        if not isinstance(source, S3Store):
            path = source.local_path(source_key)
            if path is None:
                return False
            self.put_file(key, path, content_type=content_type, cache_control=cache_control)
            return True
        try:
            # Server-side copy: the bytes never leave S3; headers are replaced, not inherited.
            self.client.copy_object(
                Bucket=self.bucket, Key=self._key(key),
                CopySource={"Bucket": source.bucket, "Key": source._key(source_key)},
                MetadataDirective="REPLACE", **self._extra(content_type, cache_control),
            )
        except (ClientError, BotoCoreError) as error:
            raise translate(error, key) from None
        return True
