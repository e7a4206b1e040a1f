"""Viewer tokens: short-lived JWTs that the customer's backend mints and the key server checks.

Claims: ``sub`` is the asset id, ``exp`` is required and may lie at most the configured maximum
TTL in the future, ``iat`` is set by :func:`mint_token`, ``sid`` optionally names a session.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

#: Clocks of the minting backend and the key server may disagree by this much.
CLOCK_SKEW_LEEWAY_S = 30
ALGORITHM = "HS256"


class TokenRejected(Exception):
    """The token is missing, malformed, forged or expired: answer 401."""


class TokenForbidden(TokenRejected):
    """The token is valid, but not for this asset: answer 403."""


@dataclass(frozen=True)
class TokenClaims:
    asset: str
    expires_at: int
    sid: str | None


def mint_token(
    secret: str, asset: str, ttl_s: int, *, sid: str | None = None, now: float | None = None
) -> str:
    """A signed token letting its holder play ``asset`` for ``ttl_s`` seconds."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"sub": asset, "iat": issued, "exp": issued + ttl_s}
    if sid:
        claims["sid"] = sid
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify_token(token: str, secret: str, *, asset: str, max_ttl_s: int) -> TokenClaims:
    """Check ``token`` for ``asset``; raise :class:`TokenRejected` or :class:`TokenForbidden`."""
    if not token:
        raise TokenRejected("missing token")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "sub"]},
            leeway=CLOCK_SKEW_LEEWAY_S,
        )
    except jwt.ExpiredSignatureError:
        raise TokenRejected("token expired") from None
    except jwt.InvalidTokenError as error:
        raise TokenRejected(f"invalid token: {type(error).__name__}") from None
    exp = claims["exp"]
    if not isinstance(exp, int | float):
        raise TokenRejected("invalid token: exp is not a number")
    if exp - time.time() > max_ttl_s + CLOCK_SKEW_LEEWAY_S:
        raise TokenRejected("token lives longer than the maximum TTL")
    if claims["sub"] != asset:
        raise TokenForbidden("token is for another asset")
    sid = claims.get("sid")
    return TokenClaims(asset=asset, expires_at=int(exp), sid=str(sid) if sid else None)
