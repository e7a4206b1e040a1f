"""Where a request's credentials come from: the token (``?token=``, an ``Authorization: Bearer``
header, or cookie mode's cookie), the session it presents (``?sid=`` or ``X-Hlsvault-Sid``) and
the client address. Nothing here checks them; :mod:`pipeline.tokens` does.

:class:`Credentials` reads them from an ASGI scope, the one place that does, so the fast path
and the Starlette routes see the same values: the query parsed as Starlette parses it (the last
of repeated names wins), the first ``Authorization`` and ``X-Hlsvault-Sid`` header, and the
cookie from every ``Cookie`` header (the last of repeated names wins).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from http.cookies import _unquote  # the stdlib's cookie unquoting (what Starlette uses)
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from starlette.requests import Request

from pipeline.tokens import SID_HEADER, VERIFIED_CACHE_SIZE

if TYPE_CHECKING:
    from uvicorn.middleware.proxy_headers import _TrustedHosts

#: Cookie mode: the token travels in this cookie, scoped to one asset's key (and, when the key
#: server serves its variants, playlist) path.
COOKIE_NAME = "hlsvault_token"
_SID_NAME = SID_HEADER.lower()
_SID_HEADER = _SID_NAME.encode("latin-1")
_NO_QUERY: Mapping[str, str] = {}


def _cookie(headers: list[str], name: str) -> str:
    """The value of cookie ``name`` across ``headers``, as browsers and Starlette read it."""
    found = ""
    for header in headers:
        for chunk in header.split(";"):
            key, equals, value = chunk.partition("=")
            if equals and key.strip() == name:
                found = _unquote(value.strip())
    return found


def _parse_query(text: str) -> dict[str, str]:
    """``dict(parse_qsl(text, keep_blank_values=True))``, which is what Starlette reads, split
    by hand when there is nothing to unquote (a token's query: no '%', no '+'), 4x faster."""
    if "%" in text or "+" in text:
        return dict(parse_qsl(text, keep_blank_values=True))
    query = {}
    for part in text.split("&"):
        if part:
            name, _, value = part.partition("=")
            query[name] = value
    return query


#: Query strings whose parse is remembered at most, and the longest one remembered: a player
#: sends the same query (its token, its sid) with every request. ~4 MB at worst.
MAX_KNOWN_QUERIES = 4096
MAX_KNOWN_QUERY_CHARS = 1024
_known_queries: dict[str, Mapping[str, str]] = {}


def _query(text: str) -> Mapping[str, str]:
    """:func:`_parse_query`'s answer, remembered for short queries. Shared by every request
    that sends the same query: read only (hence a Mapping)."""
    query = _known_queries.get(text)
    if query is None:
        query = _parse_query(text)
        if len(text) <= MAX_KNOWN_QUERY_CHARS:
            if len(_known_queries) >= MAX_KNOWN_QUERIES:
                _known_queries.clear()
            _known_queries[text] = query
    return query


class Credentials:
    """The query parameters, headers and client address a viewer route reads: from an ASGI
    scope (``Credentials(scope)``) or an RSGI one (:meth:`from_rsgi`), to the same values."""

    __slots__ = ("_cookies", "_forwarded_for", "authorization", "client_ip", "query", "sid_header")

    def __init__(self, scope: Mapping[str, Any]) -> None:
        raw_query: bytes = scope.get("query_string", b"")
        authorization = sid = None
        cookies: list[str] = []
        forwarded_for: list[str] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif name == b"cookie":
                cookies.append(value.decode("latin-1"))
            elif name == _SID_HEADER and sid is None:
                sid = value.decode("latin-1")
            elif name == b"x-forwarded-for":
                forwarded_for.append(value.decode("latin-1"))
        client = scope.get("client")
        self._set(raw_query.decode("latin-1"), authorization, sid, cookies, forwarded_for,
                  client[0] if client else None)

    @classmethod
    def from_rsgi(cls, scope: Any) -> Credentials:
        """The same values from granian's RSGI scope (query a str, headers a mapping that
        keeps repeated names, client ``"address:port"``, IPv6 in brackets). A header value that
        is not visible ASCII is invisible there (granian hands the app only text), where ASGI
        passes its bytes: such a request may get another 4xx message, never another status
        class."""
        creds = cls.__new__(cls)
        headers = scope.headers
        client: str = scope.client
        address = client.rpartition(":")[0] if client else ""
        if address.startswith("["):
            address = address[1:-1]
        creds._set(scope.query_string, headers.get("authorization"), headers.get(_SID_NAME),
                   headers.get_all("cookie"), headers.get_all("x-forwarded-for"),
                   address or None)
        return creds

    def _set(
        self, query: str, authorization: str | None, sid: str | None, cookies: list[str],
        forwarded_for: list[str], client_ip: str | None,
    ) -> None:
        self.query: Mapping[str, str] = _query(query) if query else _NO_QUERY
        self.authorization = authorization or ""
        self.sid_header = sid
        self._cookies = cookies
        self._forwarded_for = forwarded_for
        self.client_ip: str | None = client_ip

    def trust_proxies(self, trusted: _TrustedHosts) -> None:
        """The client address behind a trusted proxy: uvicorn's FORWARDED_ALLOW_IPS rule (its
        ProxyHeadersMiddleware's, README "Behind a proxy"), read here, where the headers are
        read anyway, rather than by a middleware in front of every request. A no-op without an
        X-Forwarded-For header or from a peer outside ``trusted``."""
        if self._forwarded_for and self.client_ip in trusted:
            forwarded = ", ".join(self._forwarded_for)
            host, _ = trusted.get_trusted_client_address(forwarded)
            if host:  # an empty header leaves the peer's address, as uvicorn does
                self.client_ip = host

    def token(self, *, cookie: bool = False) -> str:
        """The token, in the order the docs promise: query, Bearer, cookie."""
        token = self.query.get("token", "")
        if not token:
            auth = self.authorization
            if auth[:7].lower() == "bearer ":
                token = auth[7:].strip()
        if not token and cookie and self._cookies:
            token = _cookie(self._cookies, COOKIE_NAME)
        return token

    @property
    def sid(self) -> str | None:
        return self.query.get("sid") or self.sid_header or None


def credentials(request: Request) -> Credentials:
    return Credentials(request.scope)


def request_token(request: Request, *, cookie: bool = False) -> str:
    return credentials(request).token(cookie=cookie)


def request_sid(request: Request) -> str | None:
    return credentials(request).sid


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


@functools.lru_cache(maxsize=VERIFIED_CACHE_SIZE)  # as many as verified tokens are kept
def token_bucket(token: str) -> str:
    """The rate-limit bucket of a (verified) token. PyJWT accepts a '='-padded signature as the
    same token: the canonical form is counted, or padding would buy a fresh allowance. Hashed,
    so that no limiter (or Redis key) ever holds a token; remembered, since a player presents
    one token for every request."""
    head, dot, signature = token.rpartition(".")
    canonical = f"{head}{dot}{signature.rstrip('=')}" if dot else token
    return "token:" + hashlib.sha256(canonical.encode()).hexdigest()[:24]


def ip_bucket(ip: str | None) -> str:
    return f"ip:{ip or 'unknown'}"
