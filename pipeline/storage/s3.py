"""The S3 store: ``s3://bucket/prefix`` through boto3, honouring the standard AWS configuration.

Credentials, region and ``AWS_ENDPOINT_URL`` come from boto3's own chain. Every request has a
connect and read timeout and a bounded number of retries (:func:`pipeline.aws.make_client`), so
a stalled endpoint surfaces as a :class:`~pipeline.errors.TransientError` instead of a hang, and
a refusal (AccessDenied, NoSuchBucket) as a :class:`~pipeline.errors.StorageRefused` naming the
store, never as a fault of the job's source.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from .. import aws
from ..aws import Outcome, classify, make_client
from ..errors import HlsvaultError
from . import S3_SCHEME, ObjectNotFound, Store, check_key, check_store_url, s3_parts

_BOTO_ERRORS = (ClientError, BotoCoreError)
#: Bytes copied at a time from a GET's body to a file.
_STREAM_CHUNK = 1024 * 1024


def translate(error: Exception, store: str, key: str) -> HlsvaultError:
    """Map a botocore error onto the hlsvault tree, naming the store and the key."""
    if classify(error) is Outcome.NOT_FOUND:
        return ObjectNotFound(key)
    return aws.translate(error, f"S3 request for {key} in {store}")


class S3Store:
    """A store under ``s3://bucket/prefix``."""

    is_local = False

    def __init__(self, bucket: str, prefix: str, *, client: Any | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"{S3_SCHEME}{bucket}/{self.prefix}" if self.prefix else f"{S3_SCHEME}{bucket}"
        self.client = client if client is not None else make_client()

    @classmethod
    def from_url(cls, url: str, *, client: Any | None = None) -> S3Store:
        bucket, prefix = s3_parts(check_store_url(url))
        return cls(bucket, prefix, client=client)

    def _translate(self, error: Exception, what: str) -> HlsvaultError:
        return translate(error, self.url, what)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def presigned_get(
        self, key: str, *, expires_in: int, content_disposition: str | None = None
    ) -> str:
        """A presigned GET of ``key`` (computed locally, no request), answered with
        ``content_disposition`` when given."""
        params = {"Bucket": self.bucket, "Key": self._key(key)}
        if content_disposition is not None:
            params["ResponseContentDisposition"] = content_disposition
        try:
            url: str = self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires_in,
            )
        except _BOTO_ERRORS as error:  # no credentials to sign with
            raise self._translate(error, key) from None
        return url

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
        content_disposition: str | None = None,
    ) -> None:
        extra = self._extra(content_type, cache_control)
        if content_disposition:
            extra["ContentDisposition"] = content_disposition
        try:
            with path.open("rb") as body:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=body,
                    **extra,
                )
        except _BOTO_ERRORS as error:
            raise self._translate(error, key) from None

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
        except _BOTO_ERRORS as error:
            raise self._translate(error, key) from None

    def put_bytes_if(self, key: str, data: bytes, *, match: str | None) -> bool:
        # S3 conditional writes: of two racing PUTs with the same condition exactly one wins.
        condition = {"IfNoneMatch": "*"} if match is None else {"IfMatch": match}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
            return True
        except _BOTO_ERRORS as error:
            outcome = classify(error)
            # If-Match on an object deleted meanwhile answers 404: that writer lost too.
            if outcome is Outcome.PRECONDITION or (match and outcome is Outcome.NOT_FOUND):
                return False
            raise self._translate(error, key) from None

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(response["Body"].read()), str(response["ETag"])
        except _BOTO_ERRORS as error:
            raise self._translate(error, key) from None

    def get_bytes(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return bytes(response["Body"].read())
        except _BOTO_ERRORS as error:
            raise self._translate(error, key) from None

    def get_file(self, key: str, path: Path) -> None:
        # One GET, streamed to a file beside ``path`` and renamed: boto3's download_file would
        # send a HEAD first (to choose between one GET and ranged ones), doubling the round
        # trips of every segment a stage fetches.
        partial = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            try:
                with partial.open("wb") as out:
                    shutil.copyfileobj(body, out, _STREAM_CHUNK)
            finally:
                body.close()
            os.replace(partial, path)
        except _BOTO_ERRORS as error:
            partial.unlink(missing_ok=True)
            raise self._translate(error, key) from None
        except BaseException:
            partial.unlink(missing_ok=True)  # a full disk, an interrupt: no partial left behind
            raise

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except _BOTO_ERRORS as error:
            translated = self._translate(error, key)
            if isinstance(translated, ObjectNotFound):
                return False
            raise translated from None

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
        except _BOTO_ERRORS as error:
            raise self._translate(error, prefix) from None
        return sorted(keys)

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(prefix)
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            try:
                self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch})
            except _BOTO_ERRORS as error:
                raise self._translate(error, prefix) from None
        return len(keys)

    def local_path(self, key: str) -> Path | None:
        return None

    def local_dir(self, prefix: str) -> Path | None:
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
        except _BOTO_ERRORS as error:
            raise self._translate(error, key) from None
        return True
