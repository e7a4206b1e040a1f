"""Viewer tokens: short-lived JWTs that the customer's backend mints and the key server checks.

Claims: ``sub`` is the asset id; ``exp`` is required and may lie at most the configured maximum
TTL ahead (``exp - iat`` too, when ``iat`` is given); ``nbf`` is honoured; ``sid`` optionally
binds the token to the viewer's session and ``ip`` to one client address; ``offline: true``
lets it fetch a version's keys as one bundle (``/v1/offline/…``), and gives it its own, longer
lifetime cap (``HLSVAULT_OFFLINE_MAX_TTL``), since a downloaded film is watched later.

Session binding is one way: a token minted with a ``sid`` serves only requests that present
the same sid (the key server reads it from ``?sid=`` or the ``X-Hlsvault-Sid`` header); a token
minted without one is bound to no session, and whatever sid a request presents is ignored.

Algorithms: HS256 with a shared secret, or EdDSA (Ed25519) / RS256, where the key server holds
only the public key and the customer's backend alone can mint. A verifier accepts exactly one
algorithm, so a token signed with another (``none``, or HS256 keyed with the public key) fails.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import jwt

from .errors import ConfigurationError, Forbidden, Unauthenticated
from .settings import TOKEN_ALGORITHMS, Settings

#: Clocks of the minting backend and the key server may disagree by this much.
CLOCK_SKEW_LEEWAY_S = 30
#: Bounds on claims we copy into logs and URLs, and on what we parse at all.
MAX_SID_LENGTH = 128
MAX_TOKEN_LENGTH = 4096
#: Tokens whose signature was verified, remembered so a player's next requests skip the
#: cryptography: one entry per concurrently playing viewer of this process is plenty.
VERIFIED_CACHE_SIZE = 4096


#: The header a request presents its session in, when not as ``?sid=``.
SID_HEADER = "X-Hlsvault-Sid"
#: 403 messages of a session-bound token: what the client must send to be served.
SESSION_MISSING = f"token is bound to a session: send its sid as ?sid=… or the {SID_HEADER} header"
SESSION_MISMATCH = f"token is bound to another session than the sid sent (?sid= or {SID_HEADER})"


class TokenRejected(Unauthenticated):
    """The token is missing, malformed, forged, expired or not yet valid: answer 401."""


class TokenForbidden(Forbidden):
    """The token is genuine but does not entitle this request (asset, session, IP): 403."""


#: A verified token's expiry, subject, sid and ip claims as it holds them, and its TokenClaims.
_Verified = tuple[Any, Any, Any, Any, "TokenClaims"]


@dataclass(frozen=True)
class TokenClaims:
    asset: str
    expires_at: int
    sid: str | None
    ip: str | None
    offline: bool = False


class TokenVerifier:
    """Verifies tokens for one algorithm and key; built once from settings."""

    def __init__(
        self, algorithm: str, key: Any, *, max_ttl_s: int, offline_max_ttl_s: int | None = None
    ) -> None:
        if algorithm not in TOKEN_ALGORITHMS:
            raise ValueError(f"unsupported token algorithm {algorithm!r}")
        self.algorithm = algorithm
        self.key = key
        self.max_ttl_s = max_ttl_s
        self.offline_max_ttl_s = max_ttl_s if offline_max_ttl_s is None else offline_max_ttl_s
        #: token -> what verifying it once established: its expiry and the claims every
        #: request is checked against (subject, session, address), and the TokenClaims an
        #: entitled request gets. All are the token's alone, so they are kept; what depends on
        #: the request or the clock (expiry, asset, session, address) is checked every time.
        self._verified: OrderedDict[str, _Verified] = OrderedDict()
        self._lock = threading.Lock()

    def verify(
        self, token: str, *, asset: str, client_ip: str | None = None, sid: str | None = None
    ) -> TokenClaims:
        """The claims of ``token`` if it entitles its holder to ``asset`` from ``client_ip``
        with the session ``sid`` the request presents (which only a token minted with a sid
        looks at); else :class:`TokenRejected` (401) or :class:`TokenForbidden` (403)."""
        if not token:
            raise TokenRejected("missing token")
        if len(token) > MAX_TOKEN_LENGTH:
            raise TokenRejected("invalid token: too long")
        now = time.time()
        with self._lock:
            verified = self._verified.get(token)
            if verified is not None:
                self._verified.move_to_end(token)  # least recently used is evicted first
        if verified is None:
            claims = self._decode(token)
            self._check_lifetime(claims, now)
            # A player presents one token for every key and playlist: its signature and
            # lifetime are checked once; expiry and entitlement on every request below.
            verified = (claims["exp"], claims["sub"], claims.get("sid"), claims.get("ip"),
                        _token_claims(claims))
            with self._lock:
                self._verified[token] = verified
                if len(self._verified) > VERIFIED_CACHE_SIZE:
                    self._verified.popitem(last=False)
        exp, subject, token_sid, token_ip, entitled = verified
        if exp < now - CLOCK_SKEW_LEEWAY_S:
            raise TokenRejected("token expired")
        if subject != asset:
            raise TokenForbidden("token is for another asset")
        # One way only: a sid in the token must be presented with it, so a token copied out of
        # one session's traffic is useless without the session; a token minted without a sid
        # was meant to be bound to none, and a player passing ?sid= along must not break it.
        if token_sid is not None and token_sid != sid:
            raise TokenForbidden(SESSION_MISSING if sid is None else SESSION_MISMATCH)
        if token_ip is not None and token_ip != client_ip:
            raise TokenForbidden("token is bound to another client address")
        return entitled

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                options={"require": ["exp", "sub"]},
                leeway=CLOCK_SKEW_LEEWAY_S,
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("token expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("token not yet valid") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected(f"invalid token: InvalidSignatureError: {self._mend()}") from None
        except jwt.InvalidTokenError as error:
            raise TokenRejected(f"invalid token: {type(error).__name__}") from None
        return claims

    def _mend(self) -> str:
        """What to check when a well-formed token's signature does not verify."""
        if self.algorithm == "HS256":
            return ("it was not signed with this key server's token secret: mint it with the "
                    "same HLSVAULT_TOKEN_SECRET (embedded mode: the data directory's "
                    "secrets/token_secret, so run `hlsvault token` with the same "
                    "HLSVAULT_DATA_DIR as `hlsvault serve`)")
        return (f"it was not signed with the private key whose public half is this key server's "
                f"HLSVAULT_TOKEN_PUBLIC_KEY ({self.algorithm})")

    def _check_lifetime(self, claims: dict[str, Any], now: float) -> None:
        exp, iat = claims["exp"], claims.get("iat")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise TokenRejected("invalid token: exp is not a number")
        offline = claims.get("offline", False)
        if not isinstance(offline, bool):
            raise TokenRejected("invalid token: offline is not true or false")
        cap = self.offline_max_ttl_s if offline else self.max_ttl_s
        kind = "offline " if offline else ""
        if exp - now > cap + CLOCK_SKEW_LEEWAY_S:
            raise TokenRejected(f"token lives longer than the maximum {kind}TTL ({cap} s)")
        if isinstance(iat, int | float) and exp - iat > cap:
            raise TokenRejected(f"token was minted to live longer than the maximum {kind}TTL "
                                f"({cap} s)")
        token_sid = claims.get("sid")
        if token_sid is not None and (
            not isinstance(token_sid, str) or len(token_sid) > MAX_SID_LENGTH
        ):
            raise TokenRejected("invalid token: malformed sid")


def _token_claims(claims: dict[str, Any]) -> TokenClaims:
    """What a request entitled by ``claims`` is told of them (its asset is ``sub``, which the
    entitlement check holds equal to the asset asked for)."""
    token_ip = claims.get("ip")
    return TokenClaims(
        asset=claims["sub"],
        expires_at=int(claims["exp"]),
        sid=claims.get("sid"),
        ip=str(token_ip) if token_ip is not None else None,
        offline=claims.get("offline") is True,
    )


def mint_token(
    key: Any,
    asset: str,
    ttl_s: int,
    *,
    algorithm: str = "HS256",
    sid: str | None = None,
    ip: str | None = None,
    offline: bool = False,
    now: float | None = None,
) -> str:
    """A signed token letting its holder play ``asset`` for ``ttl_s`` seconds (and, with
    ``offline``, fetch its offline bundle). ``key`` is the shared secret (HS256) or the private
    key (EdDSA, RS256)."""
    issued = int(time.time() if now is None else now)
    claims: dict[str, object] = {"sub": asset, "iat": issued, "exp": issued + ttl_s}
    if sid:
        claims["sid"] = sid
    if ip:
        claims["ip"] = ip
    if offline:
        claims["offline"] = True
    return jwt.encode(claims, key, algorithm=algorithm)


def _shared_secret(settings: Settings) -> str:
    if settings.token_secret is None:  # load_settings sets it whenever HS256 is chosen
        raise ConfigurationError("HS256 tokens need HLSVAULT_TOKEN_SECRET")
    return settings.token_secret


def verifier_for(settings: Settings) -> TokenVerifier:
    """The verifier a key server built from ``settings`` uses."""
    if settings.token_algorithm == "HS256":
        return TokenVerifier("HS256", _shared_secret(settings), max_ttl_s=settings.token_max_ttl_s,
                             offline_max_ttl_s=settings.offline_max_ttl_s)
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    if settings.token_public_key is None:
        raise ConfigurationError(
            f"{settings.token_algorithm} tokens need HLSVAULT_TOKEN_PUBLIC_KEY"
        )
    key = load_pem_public_key(settings.token_public_key.encode())
    return TokenVerifier(settings.token_algorithm, key, max_ttl_s=settings.token_max_ttl_s,
                         offline_max_ttl_s=settings.offline_max_ttl_s)


def minting_key(settings: Settings) -> Any:
    """The key `hlsvault token` signs with: the shared secret, or the private key."""
    if settings.token_algorithm == "HS256":
        return _shared_secret(settings)
    if settings.token_private_key is None:
        raise ConfigurationError(
            f"minting {settings.token_algorithm} tokens needs HLSVAULT_TOKEN_PRIVATE_KEY; the key "
            "server itself holds only the public key, so mint on your backend"
        )
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    return load_pem_private_key(settings.token_private_key.encode(), password=None)
