"""Signed CDN access, through the CloudFront stand-in in front of a private S3 origin.

Tokenized mode: every segment URI of a variant playlist carries one custom-policy signature of
the rendition; ffmpeg plays the rotated asset through the stand-in with the source's frames,
and the stand-in refuses the same segment unsigned, with another asset's or version's
signature, an expired or tampered policy, or from another address. Cookie mode: hls.js in
Chromium plays on the CloudFront cookies the master response sets (tests/test_cdn_browser.py).
"""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from keyserver import create_app
from pipeline import layout
from pipeline.cdnsign import EXPIRY_BUCKET_S, CdnSigner, signature_expiry
from pipeline.settings import load_settings
from pipeline.tokens import mint_token

from cdn_support import (
    ASSET,
    KEY_PAIR_ID,
    OTHER,
    CdnLibrary,
    encode_policy,
    policy_of,
    rsa_key_pair,
    signing_query,
)
from cloudfront import resource_matches
from keyserver_support import AppClient, uris
from support import frame_hashes, framemd5, serving

#: The stand-in sees every request from the loopback address.
LOOPBACK = "127.0.0.1"
ELSEWHERE = "198.51.100.77"


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.read()


def token(library: CdnLibrary, asset: str = ASSET, *, ttl: int = 600, **claims: object) -> str:
    secret = library.env["HLSVAULT_TOKEN_SECRET"]
    return mint_token(secret, asset, ttl, **claims)  # type: ignore[arg-type]


def variant(library: CdnLibrary, asset: str = ASSET, *, client_ip: str = LOOPBACK,
            **claims: object) -> str:
    """The variant playlist the key server renders for a viewer at ``client_ip``."""
    app = create_app(load_settings(library.env))
    with AppClient(app, client_ip=client_ip, base_url=library.public_url) as client:
        query = f"?token={token(library, asset, **claims)}"
        response = client.get(layout.variant_url("", asset, library.rendition, query))
    assert response.status_code == 200, response.text
    return response.text


def segment_urls(library: CdnLibrary, asset: str = ASSET, **kwargs: object) -> list[str]:
    return uris(variant(library, asset, **kwargs))  # type: ignore[arg-type]


def with_query(url: str, query: str) -> str:
    return f"{url.split('?', 1)[0]}?{query}" if query else url.split("?", 1)[0]


class TestTokenizedPlayback:
    def test_ffmpeg_plays_the_rotated_asset_with_the_source_frames(
        self, cdn_library: CdnLibrary, copy_clip: Path, tmp_path: Path
    ) -> None:
        # Given the key server of a deployment that signs CDN access
        with serving(cdn_library.env, cdn_library.port, tmp_path / "serve.log") as base:
            master = layout.master_url(base, ASSET, f"?token={token(cdn_library)}")
            before = len(cdn_library.cdn.served)

            # When ffmpeg plays the master playlist through the CloudFront stand-in
            played = frame_hashes(framemd5(master))

        # Then every frame is the source's, and every segment came signed, none refused
        assert played == frame_hashes(framemd5(str(copy_clip)))
        served = cdn_library.cdn.served[before:]
        segments = [s for s in served if s.path.endswith(".ts")]
        assert len(segments) == 6 and {s.reason for s in segments} == {"signed"}, served
        assert not [s for s in served if s.status == 403], served


class TestSegmentSignatures:
    """One signature per rendition: the rendition's segments and nothing else, until the token
    ends (capped), from the token's address when it is bound to one."""

    def test_every_segment_uri_carries_one_signature_of_the_rendition(
        self, cdn_library: CdnLibrary
    ) -> None:
        urls = segment_urls(cdn_library)
        assert len(urls) == 6
        assert len({signing_query(url) for url in urls}) == 1
        (statement,) = policy_of(urls[0])["Statement"]
        version = cdn_library.version()
        assert statement["Resource"] == layout.rendition_resource(
            cdn_library.cdn.url, ASSET, version, cdn_library.rendition)
        assert "IpAddress" not in statement["Condition"]
        assert all(resource_matches(statement["Resource"], url.split("?")[0]) for url in urls)

    def test_the_signature_ends_with_the_token(self, cdn_library: CdnLibrary) -> None:
        before = int(time.time())
        urls = segment_urls(cdn_library, ttl=1800)
        (statement,) = policy_of(urls[0])["Statement"]
        expiry = statement["Condition"]["DateLessThan"]["AWS:EpochTime"]
        assert before + 1800 - EXPIRY_BUCKET_S <= expiry <= before + 1800 + 2

    def test_signed_segments_are_served_with_the_origins_bytes(
        self, cdn_library: CdnLibrary
    ) -> None:
        """The positive control of every refusal below."""
        url = segment_urls(cdn_library)[0]
        status, body = fetch(url)
        key = urlsplit(url).path.lstrip("/")
        assert status == 200
        assert body == cdn_library.origin_object(key)

    def test_unsigned_is_refused(self, cdn_library: CdnLibrary) -> None:
        url = segment_urls(cdn_library)[0]
        assert fetch(with_query(url, ""))[0] == 403
        assert cdn_library.cdn.refusals()[-1].reason == "missing signature"

    def test_another_assets_signature_is_refused(self, cdn_library: CdnLibrary) -> None:
        ours = segment_urls(cdn_library)[0]
        theirs = segment_urls(cdn_library, OTHER)[0]
        assert fetch(theirs)[0] == 200
        assert fetch(with_query(theirs, signing_query(ours)))[0] == 403
        assert cdn_library.cdn.refusals()[-1].reason == "resource does not match"

    def test_another_versions_signature_is_refused(self, cdn_library: CdnLibrary) -> None:
        current = segment_urls(cdn_library)[0]
        old_version = cdn_library.versions[ASSET][0]
        old_segment = current.split("?")[0].replace(cdn_library.version(), old_version)
        assert fetch(with_query(old_segment, signing_query(current)))[0] == 403
        assert cdn_library.cdn.refusals()[-1].reason == "resource does not match"

    def test_an_expired_policy_is_refused(self, cdn_library: CdnLibrary) -> None:
        url = segment_urls(cdn_library)[0]
        signer = CdnSigner(KEY_PAIR_ID, cdn_library.keys.private_pem, ttl_s=3600)
        (statement,) = policy_of(url)["Statement"]
        fresh = signer.policy(statement["Resource"], expires_at=int(time.time()) + 60)
        stale = signer.policy(statement["Resource"], expires_at=int(time.time()) - 1)
        assert fetch(with_query(url, fresh.query))[0] == 200
        assert fetch(with_query(url, stale.query))[0] == 403
        assert cdn_library.cdn.refusals()[-1].reason == "expired"

    def test_a_tampered_policy_is_refused(self, cdn_library: CdnLibrary) -> None:
        """Widening the resource to the whole CDN keeps the signature of the narrow one."""
        url = segment_urls(cdn_library)[0]
        document = policy_of(url)
        document["Statement"][0]["Resource"] = f"{cdn_library.cdn.url}/*"
        query = signing_query(url).split("&")
        tampered = "&".join(
            f"Policy={encode_policy(document)}" if part.startswith("Policy=") else part
            for part in query
        )
        assert fetch(with_query(url, tampered))[0] == 403
        assert cdn_library.cdn.refusals()[-1].reason == "signature does not match the policy"

    def test_a_key_outside_the_key_group_is_refused(self, cdn_library: CdnLibrary) -> None:
        url = segment_urls(cdn_library)[0]
        (statement,) = policy_of(url)["Statement"]
        stranger = CdnSigner(KEY_PAIR_ID, rsa_key_pair().private_pem, ttl_s=3600)
        forged = stranger.policy(statement["Resource"], expires_at=int(time.time()) + 60)
        assert fetch(with_query(url, forged.query))[0] == 403

    def test_another_address_is_refused(self, cdn_library: CdnLibrary) -> None:
        # Given tokens bound to an address: the key server signs for that address only
        bound_here = segment_urls(cdn_library, client_ip=LOOPBACK, ip=LOOPBACK)[0]
        bound_elsewhere = segment_urls(cdn_library, client_ip=ELSEWHERE, ip=ELSEWHERE)[0]
        (statement,) = policy_of(bound_elsewhere)["Statement"]
        assert statement["Condition"]["IpAddress"] == {"AWS:SourceIp": f"{ELSEWHERE}/32"}
        # Then the stand-in (reached from the loopback) serves the one, not the other
        assert fetch(bound_here)[0] == 200
        assert fetch(bound_elsewhere)[0] == 403
        assert cdn_library.cdn.refusals()[-1].reason == "another client address"

    def test_date_greater_than_is_enforced(self, cdn_library: CdnLibrary) -> None:
        """Our signer never sets DateGreaterThan; the stand-in still checks it as CloudFront
        does, so a policy that is not yet valid would be caught."""
        from botocore.signers import CloudFrontSigner
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding
        from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

        key = serialization.load_pem_private_key(cdn_library.keys.private_pem.encode(), None)
        assert isinstance(key, RSAPrivateKey)

        def rsa_sign(message: bytes) -> bytes:
            return key.sign(message, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303

        signer = CloudFrontSigner(KEY_PAIR_ID, rsa_sign)
        url = segment_urls(cdn_library)[0].split("?")[0]
        now = time.time()

        def signed(starts: float) -> str:
            policy = signer.build_policy(
                url, datetime.fromtimestamp(now + 120, tz=UTC),
                date_greater_than=datetime.fromtimestamp(starts, tz=UTC),
            )
            return str(signer.generate_presigned_url(url, policy=policy))

        assert fetch(signed(now - 60))[0] == 200
        assert fetch(signed(now + 60))[0] == 403
        assert cdn_library.cdn.refusals()[-1].reason == "not yet valid"


class TestSignatureCache:
    def test_viewers_in_one_expiry_bucket_cost_one_rsa_operation(self) -> None:
        signer = CdnSigner(KEY_PAIR_ID, rsa_key_pair().private_pem, ttl_s=6 * 3600)
        now = 1_800_000_000 - 1_800_000_000 % EXPIRY_BUCKET_S
        ends = [now + 3600 + offset for offset in (10, 20, 290)]
        expiries = {signature_expiry(end, ttl_s=signer.ttl_s, now=now) for end in ends}
        assert expiries == {now + 3600}
        for expiry in expiries:
            for _ in range(3):
                signer.policy("https://cdn.test/assets/a/v/r/*", expires_at=expiry)
        assert signer.signed == 1

    def test_the_cache_is_bounded(self) -> None:
        signer = CdnSigner(KEY_PAIR_ID, rsa_key_pair().private_pem, ttl_s=3600, max_cached=4)
        for n in range(10):
            signer.policy(f"https://cdn.test/assets/a{n}/*", expires_at=2_000_000_000)
        assert len(signer._cache) == 4

    def test_a_signature_never_outlives_its_token_or_the_ttl(self) -> None:
        now = 1_800_000_123
        assert signature_expiry(now + 100, ttl_s=3600, now=now) == now + 100
        assert signature_expiry(now + 10 * 3600, ttl_s=3600, now=now) <= now + 3600
        assert signature_expiry(now + 5000, ttl_s=6 * 3600, now=now) <= now + 5000
