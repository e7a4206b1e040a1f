"""Viewer tokens: a TokenVerifier accepts exactly the unexpired HS256 tokens of the right asset."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest

from pipeline.tokens import (
    CLOCK_SKEW_LEEWAY_S,
    TokenClaims,
    TokenForbidden,
    TokenRejected,
    TokenVerifier,
    mint_token,
)

SECRET = "test-token-secret-" + "x" * 46  # 64 characters: long enough for HS512 too
ASSET = "film-1"
MAX_TTL_S = 3600
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def verify(token: str) -> TokenClaims:
    return TokenVerifier("HS256", SECRET, max_ttl_s=MAX_TTL_S).verify(token, asset=ASSET)


def assert_rejected(token: str, match: str | None = None) -> None:
    """Rejected as a 401, which is TokenRejected itself and not its TokenForbidden subclass."""
    with pytest.raises(TokenRejected, match=match) as caught:
        verify(token)
    assert type(caught.value) is TokenRejected


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_json(value: dict[str, object]) -> str:
    return b64url(json.dumps(value).encode())


def encode(claims: dict[str, object], *, secret: str = SECRET, algorithm: str = "HS256") -> str:
    return jwt.encode(claims, secret, algorithm=algorithm)


def test_valid_token_yields_its_claims() -> None:
    """A token minted for the asset is accepted and says which asset, until when, which session."""
    now = time.time()
    token = mint_token(SECRET, ASSET, 600, sid="session-7", now=now)
    claims = TokenVerifier("HS256", SECRET, max_ttl_s=MAX_TTL_S).verify(
        token, asset=ASSET, sid="session-7"
    )
    assert claims == TokenClaims(asset=ASSET, expires_at=int(now) + 600, sid="session-7", ip=None)


def test_a_session_bound_token_needs_its_session() -> None:
    """A token minted with a sid is refused (403) for a request naming no session or another."""
    token = mint_token(SECRET, ASSET, 600, sid="session-7")
    verifier = TokenVerifier("HS256", SECRET, max_ttl_s=MAX_TTL_S)
    for presented in (None, "session-8"):
        with pytest.raises(TokenForbidden, match="bound to"):
            verifier.verify(token, asset=ASSET, sid=presented)


def test_valid_token_without_session_has_no_sid() -> None:
    """sid is optional and absent when not minted."""
    assert verify(mint_token(SECRET, ASSET, 600)).sid is None


@pytest.mark.parametrize("token", ["", "not-a-jwt", "a.b.c", "eyJ.eyJ.x"])
def test_missing_or_malformed_token_is_rejected(token: str) -> None:
    """No token, or something that is not a JWT, is a 401."""
    assert_rejected(token)


def test_every_single_character_change_is_rejected() -> None:
    """Changing any one character of header, payload or signature breaks the signature.

    Each character is replaced by the one whose 6-bit value differs in the top bit, so even the
    last signature character (whose low bits are only padding) really changes the bytes."""
    token = mint_token(SECRET, ASSET, 600)
    verify(token)
    positions = [i for i, char in enumerate(token) if char != "."]
    accepted = []
    for i in positions:
        flipped = _ALPHABET[_ALPHABET.index(token[i]) ^ 32]
        forged = token[:i] + flipped + token[i + 1 :]
        try:
            verify(forged)
        except TokenRejected as error:
            assert type(error) is TokenRejected, f"position {i}: {error!r}"
        else:
            accepted.append(i)
    assert accepted == [], f"forged tokens accepted at positions {accepted}"


def test_payload_swapped_under_the_original_signature_is_rejected() -> None:
    """A viewer who rewrites the payload (a longer exp) keeps a signature that no longer fits."""
    header, _, signature = mint_token(SECRET, ASSET, 600).split(".")
    payload = b64url_json({"sub": ASSET, "iat": int(time.time()), "exp": int(time.time()) + 3000})
    assert_rejected(f"{header}.{payload}.{signature}", match="InvalidSignatureError")


def test_token_signed_with_another_secret_is_rejected() -> None:
    """Only the key server's secret makes a valid signature."""
    assert_rejected(mint_token("another-secret-that-is-also-long-enough-xx", ASSET, 600))


def test_alg_none_token_is_rejected() -> None:
    """An unsigned token (alg "none") is never accepted, whatever its claims."""
    exp = int(time.time()) + 600
    header = b64url_json({"alg": "none", "typ": "JWT"})
    unsigned = f"{header}.{b64url_json({'sub': ASSET, 'exp': exp})}."
    assert_rejected(unsigned)
    assert_rejected(encode({"sub": ASSET, "exp": exp}, secret="", algorithm="none"))


def test_token_of_another_hmac_algorithm_is_rejected() -> None:
    """The algorithm is pinned to HS256: a token signed HS512 with the same secret is refused."""
    assert_rejected(encode({"sub": ASSET, "exp": int(time.time()) + 600}, algorithm="HS512"))


def test_token_expired_beyond_the_leeway_is_rejected() -> None:
    """A token whose exp lies further in the past than the clock-skew leeway is a 401."""
    minted = time.time() - 600 - CLOCK_SKEW_LEEWAY_S - 30
    assert_rejected(mint_token(SECRET, ASSET, 600, now=minted), match="expired")


def test_token_expired_within_the_leeway_is_accepted() -> None:
    """Clocks may disagree: a token that expired less than the leeway ago still plays."""
    minted = time.time() - 600 - CLOCK_SKEW_LEEWAY_S / 3
    assert verify(mint_token(SECRET, ASSET, 600, now=minted)).asset == ASSET


def test_token_of_another_asset_is_forbidden() -> None:
    """A valid token for another asset is a 403 (TokenForbidden), not a 401."""
    with pytest.raises(TokenForbidden, match="another asset"):
        verify(mint_token(SECRET, "other", 600))


def test_expired_token_of_another_asset_is_rejected_not_forbidden() -> None:
    """An expired token proves nothing, so it is a 401 even when it names another asset."""
    assert_rejected(mint_token(SECRET, "other", 60, now=time.time() - 3600))


@pytest.mark.parametrize(
    "claims",
    [{"sub": ASSET}, {"sub": ASSET, "exp": None}, {"sub": ASSET, "exp": "tomorrow"}],
    ids=["no-exp", "null-exp", "text-exp"],
)
def test_token_without_a_numeric_exp_is_rejected(claims: dict[str, object]) -> None:
    """exp is required: a token that never expires is not accepted."""
    assert_rejected(encode(claims))


def test_token_without_sub_is_rejected() -> None:
    """A token that names no asset is a 401, not a pass for every asset."""
    assert_rejected(encode({"exp": int(time.time()) + 600}))


def test_token_living_longer_than_the_max_ttl_is_rejected() -> None:
    """A token minted to live beyond the maximum TTL (plus leeway) is refused."""
    too_long = MAX_TTL_S + CLOCK_SKEW_LEEWAY_S + 60
    assert_rejected(mint_token(SECRET, ASSET, too_long), match="maximum")


def test_token_living_exactly_the_max_ttl_is_accepted() -> None:
    """The maximum TTL itself is allowed."""
    assert verify(mint_token(SECRET, ASSET, MAX_TTL_S)).asset == ASSET


def test_token_issued_in_the_future_is_rejected() -> None:
    """An iat beyond the leeway in the future means a wrong clock or a forged token: 401."""
    assert_rejected(mint_token(SECRET, ASSET, 600, now=time.time() + 300))


def test_a_token_signed_with_another_secret_says_which_secret_to_check() -> None:
    """The first-run trap (a token minted in another data directory): the refusal says which
    secret the key server verifies with and how to mint with it."""
    token = mint_token("another-secret-" + "y" * 40, ASSET, 60)
    with pytest.raises(TokenRejected) as refused:
        verify(token)
    assert "HLSVAULT_TOKEN_SECRET" in str(refused.value)
    assert "HLSVAULT_DATA_DIR" in str(refused.value)
