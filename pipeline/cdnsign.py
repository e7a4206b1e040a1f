"""Signed CDN access: CloudFront custom-policy signatures, signed cookies and canned-policy URLs.

CloudFront verifies an RSA-SHA1 (PKCS#1 v1.5) signature of a JSON policy with the public key of
a trusted key group; the policy, the signature and the key's id travel as ``Policy``,
``Signature`` and ``Key-Pair-Id`` (query parameters or ``CloudFront-*`` cookies), each in
CloudFront's URL-safe base64. botocore's :class:`~botocore.signers.CloudFrontSigner` builds the
policy and the encoding; ``cryptography`` makes the signature.

A tokenized variant playlist carries one signature for all of its segments (a wildcard
resource), so the key server signs once per viewer and rendition at most. Signatures are cached
per (resource, expiry, client address): the expiry is the viewer's token's, rounded down to a
bucket of :data:`EXPIRY_BUCKET_S` so that viewers whose tokens end in the same few minutes share
one, and a variant request costs no RSA operation in the common case.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from . import layout
from .settings import Settings

#: Signature expiries are rounded down to a multiple of this, so that tokens ending within the
#: same five minutes share a cached signature. A signature never outlives its token.
EXPIRY_BUCKET_S = 300
#: Below this much life left, the bucket would end (too) soon: the exact expiry is used.
MIN_BUCKETED_LIFE_S = 2 * EXPIRY_BUCKET_S
#: Signatures kept: one per (rendition, expiry bucket, IP-bound viewer) that is playing.
MAX_CACHED_SIGNATURES = 16_384
#: The three query parameters, and cookie names, of a CloudFront signature.
SIGNATURE_PARAMS = ("Policy", "Signature", "Key-Pair-Id")
CANNED_PARAMS = ("Expires", "Signature", "Key-Pair-Id")
COOKIE_PREFIX = "CloudFront-"


@dataclass(frozen=True)
class Signature:
    """One signed policy: its three values, as query string and as cookies."""

    policy: str
    signature: str
    key_pair_id: str
    expires_at: int

    @property
    def query(self) -> str:
        return f"Policy={self.policy}&Signature={self.signature}&Key-Pair-Id={self.key_pair_id}"

    def cookies(self) -> dict[str, str]:
        return {
            f"{COOKIE_PREFIX}Policy": self.policy,
            f"{COOKIE_PREFIX}Signature": self.signature,
            f"{COOKIE_PREFIX}Key-Pair-Id": self.key_pair_id,
        }


def signature_expiry(token_expires_at: int, *, ttl_s: int, now: float | None = None) -> int:
    """When a signature made for a token ending at ``token_expires_at`` expires: the token's
    end capped by ``ttl_s`` from now, rounded down to a bucket while enough life is left."""
    moment = int(time.time() if now is None else now)
    expiry = min(int(token_expires_at), moment + ttl_s)
    bucketed = expiry - expiry % EXPIRY_BUCKET_S
    return bucketed if bucketed - moment >= MIN_BUCKETED_LIFE_S else expiry


class CdnSigner:
    """Signs CDN access with one CloudFront key; built once per process from settings."""

    def __init__(
        self, key_pair_id: str, private_key_pem: str, *, ttl_s: int,
        max_cached: int = MAX_CACHED_SIGNATURES,
    ) -> None:
        from botocore.signers import CloudFrontSigner
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        key = load_pem_private_key(private_key_pem.encode(), password=None)
        if not isinstance(key, RSAPrivateKey):  # load_settings refuses such keys first
            raise TypeError("CloudFront signs with RSA keys only")

        def rsa_sign(message: bytes) -> bytes:
            # SHA-1 is what CloudFront verifies signed URLs and cookies with.
            return key.sign(message, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303

        self.key_pair_id = key_pair_id
        self.ttl_s = ttl_s
        self.max_cached = max_cached
        self._signer = CloudFrontSigner(key_pair_id, rsa_sign)
        self._cache: OrderedDict[tuple[str, int, str | None], Signature] = OrderedDict()
        self._lock = threading.Lock()
        #: RSA operations made (the rest were answered from the cache): for tests and benchmarks.
        self.signed = 0

    def expiry_for(self, token_expires_at: int, *, now: float | None = None) -> int:
        return signature_expiry(token_expires_at, ttl_s=self.ttl_s, now=now)

    def policy(self, resource: str, *, expires_at: int, ip: str | None = None) -> Signature:
        """A custom-policy signature of ``resource`` (wildcards allowed) until ``expires_at``,
        from ``ip`` only when given; from the cache when this one was made before."""
        cache_key = (resource, expires_at, ip)
        with self._lock:
            found = self._cache.get(cache_key)
            if found is not None:
                self._cache.move_to_end(cache_key)
                return found
        policy = self._signer.build_policy(
            resource, datetime.fromtimestamp(expires_at, tz=UTC), ip_address=ip
        )
        # CloudFrontSigner renders the three parameters; the base URL is only a carrier.
        values = _params(self._signer.generate_presigned_url(resource, policy=policy))
        made = Signature(values["Policy"], values["Signature"], values["Key-Pair-Id"], expires_at)
        with self._lock:
            self.signed += 1
            self._cache[cache_key] = made
            if len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return made

    def rendition_query(
        self, cdn: str, asset: str, version: str, rendition: str, *, token_expires_at: int,
        ip: str | None,
    ) -> str:
        """What a tokenized variant appends to each segment URI."""
        resource = layout.rendition_resource(cdn, asset, version, rendition)
        return self.policy(resource, expires_at=self.expiry_for(token_expires_at), ip=ip).query

    def asset_cookies(
        self, cdn: str, asset: str, *, token_expires_at: int, ip: str | None
    ) -> Signature:
        """Cookie mode's signature: everything of the asset on the CDN."""
        resource = layout.asset_resource(cdn, asset)
        return self.policy(resource, expires_at=self.expiry_for(token_expires_at), ip=ip)

    def canned_url(self, url: str, *, expires_at: int) -> str:
        """``url`` signed with a canned policy (one exact URL, one expiry): for downloads."""
        signed: str = self._signer.generate_presigned_url(
            url, date_less_than=datetime.fromtimestamp(expires_at, tz=UTC)
        )
        with self._lock:
            self.signed += 1
        return signed


def _params(url: str) -> dict[str, str]:
    return dict(parse_qsl(url.split("?", 1)[1], keep_blank_values=True))


def signer_for(settings: Settings) -> CdnSigner | None:
    """The signer of a deployment that signs CDN access, else None."""
    if settings.cloudfront_key_pair_id is None or settings.cloudfront_private_key is None:
        return None
    return CdnSigner(
        settings.cloudfront_key_pair_id, settings.cloudfront_private_key,
        ttl_s=settings.cdn_signature_ttl_s,
    )


def describe(signer: CdnSigner | None) -> dict[str, Any]:
    """What /healthz says about signing (never the key)."""
    if signer is None:
        return {"cdn_signing": "off"}
    return {"cdn_signing": "on", "cdn_key_pair_id": signer.key_pair_id}
