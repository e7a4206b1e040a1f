"""What the CDN, download and offline tests share: a CloudFront key pair, a private S3 origin on
the moto server behind the CloudFront stand-in (tests/cloudfront.py), and one library packaged
into it once per session by the real CLI (embedded mode: local work and vault, the S3 origin).

The library: ``film`` twice (an older and a current version) and ``film-b`` and ``gone`` once,
each the 6 s copy clip in 1 s segments with a new key every two (six segments, three keys) and
an MP4 download; ``gone`` is the one a test revokes. Tests only read the rest.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from cloudfront import CloudFrontStandIn
from fleet import MotoServer
from keyserver_support import isolated_env
from support import CLI_TIMEOUT_S, HLSVAULT, free_port

ASSET, OTHER, GONE = "film", "film-b", "gone"
KEY_PAIR_ID = "K2HLSVAULTTEST"
#: Six 1 s segments under three keys, and the top rendition as an MP4.
PACKAGE_OPTIONS = (
    "--ladder", "copy", "--segment-seconds", "1", "--key-rotation-segments", "2", "--download",
)
CLOUDFRONT_SETTINGS = ("HLSVAULT_CLOUDFRONT_KEY_PAIR_ID", "HLSVAULT_CLOUDFRONT_PRIVATE_KEY")


@dataclass(frozen=True)
class KeyPair:
    private_pem: str
    public_pem: str


def rsa_key_pair(bits: int = 2048) -> KeyPair:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return KeyPair(private, public)


@dataclass(frozen=True)
class CdnLibrary:
    """The session's library in the S3 origin, and the stand-in serving it."""

    env: dict[str, str]
    data_dir: Path
    bucket: str
    cdn: CloudFrontStandIn
    moto: MotoServer
    keys: KeyPair
    versions: dict[str, list[str]]  # asset -> versions, oldest first
    rendition: str
    port: int

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def version(self, asset: str = ASSET) -> str:
        return self.versions[asset][-1]

    def unsigned_env(self) -> dict[str, str]:
        """The same deployment without CloudFront signing (downloads: S3 presigned GETs)."""
        return {k: v for k, v in self.env.items() if k not in CLOUDFRONT_SETTINGS}

    def origin_object(self, key: str) -> bytes:
        body: bytes = self.moto.client("s3").get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return body


def package(env: dict[str, str], clip: Path, asset: str, *options: str) -> dict[str, Any]:
    done = subprocess.run(
        [*HLSVAULT, "package", str(clip), "--asset", asset, *options, "--json"],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False,
        cwd=Path(env["HLSVAULT_DATA_DIR"]).parent,
    )
    assert done.returncode == 0, done.stderr
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


def s3_environment(moto: MotoServer, data_dir: Path, bucket: str) -> dict[str, str]:
    env = isolated_env(data_dir)
    env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
    env.update(
        AWS_ENDPOINT_URL=moto.endpoint, AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
        HLSVAULT_ORIGIN=f"s3://{bucket}",
    )
    return env


@functools.cache  # one per session: the session's base temp directory is the argument
def cdn_library(session_dir: Path, moto: MotoServer, clip: Path) -> CdnLibrary:
    directory = session_dir / "cdn-library"
    directory.mkdir(parents=True, exist_ok=True)
    bucket = f"hv-cdn-origin-{uuid.uuid4().hex[:8]}"
    # A private origin: no bucket policy at all; only the stand-in (as CloudFront's OAC) reads.
    moto.client("s3").create_bucket(Bucket=bucket)
    keys = rsa_key_pair()
    key_file = directory / "cloudfront-private.pem"
    key_file.write_text(keys.private_pem)
    os.chmod(key_file, 0o600)
    cdn = CloudFrontStandIn(moto.client("s3"), bucket, {KEY_PAIR_ID: keys.public_pem}).start()
    port = free_port()
    env = s3_environment(moto, directory / "data", bucket)
    env.update(
        HLSVAULT_PUBLIC_URL=f"http://127.0.0.1:{port}",
        HLSVAULT_CDN_URL=cdn.url,
        HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=KEY_PAIR_ID,
        HLSVAULT_CLOUDFRONT_PRIVATE_KEY=str(key_file),
        HLSVAULT_TOKEN_SECRET=base64.urlsafe_b64encode(os.urandom(36)).decode(),
        HLSVAULT_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
    )
    versions: dict[str, list[str]] = {}
    rendition = ""
    for asset in (ASSET, ASSET, OTHER, GONE):
        summary = package(env, clip, asset, *PACKAGE_OPTIONS)
        versions.setdefault(asset, []).append(summary["version"])
        rendition = summary["renditions"][0]["name"]
    return CdnLibrary(env=env, data_dir=directory / "data", bucket=bucket, cdn=cdn, moto=moto,
                      keys=keys, versions=versions, rendition=rendition, port=port)


# -- reading signed URLs -------------------------------------------------------------------------


def signing_query(url: str) -> str:
    return urlsplit(url).query


def policy_of(url: str) -> dict[str, Any]:
    """The decoded custom policy a signed URL carries."""
    (encoded,) = parse_qs(urlsplit(url).query)["Policy"]
    standard = encoded.replace("-", "+").replace("_", "=").replace("~", "/")
    document: dict[str, Any] = json.loads(base64.b64decode(standard))
    return document


def encode_policy(document: dict[str, Any]) -> str:
    raw = base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()
    return raw.replace("+", "-").replace("=", "_").replace("/", "~")
