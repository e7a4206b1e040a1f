"""The key server's answers: playlists, keys, and errors as JSON that no cache keeps.

An :class:`Answer` is what a route decided, free of any web framework: a status, the raw
header list in the order it goes on the wire, and the body. The viewer routes produce Answers
(:mod:`keyserver.viewer`); the fast path sends them as they are and the Starlette routes wrap
them in :func:`to_response`, so both paths put the same bytes on the wire.
"""

from __future__ import annotations

import http.cookies
import json
from typing import NamedTuple

from starlette.responses import Response

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
WEBVTT_TYPE = "text/vtt; charset=utf-8"
#: Every playlist, key and error is per viewer (or about one): no shared cache may keep it.
NO_STORE = {"Cache-Control": "no-store"}

Headers = list[tuple[bytes, bytes]]


class Answer(NamedTuple):
    status: int
    headers: Headers
    body: bytes


def _headers(extra: dict[str, str], body: bytes, content_type: bytes) -> Headers:
    """``extra`` first, then Content-Length and Content-Type: Starlette's order."""
    raw = [(name.lower().encode("latin-1"), value.encode("latin-1"))
           for name, value in extra.items()]
    raw.append((b"content-length", str(len(body)).encode("latin-1")))
    raw.append((b"content-type", content_type))
    return raw


def error_answer(status: int, message: str, headers: dict[str, str] | None = None) -> Answer:
    """``{"error": message}`` with ``status``, never cached."""
    body = json.dumps(
        {"error": message}, ensure_ascii=False, allow_nan=False, separators=(",", ":")
    ).encode("utf-8")
    return Answer(status, _headers({**NO_STORE, **(headers or {})}, body, b"application/json"),
                  body)


def playlist_answer(text: str, cookies: list[bytes] | None = None) -> Answer:
    """A playlist, never cached, with ``cookies`` (Set-Cookie values) after its headers."""
    body = text.encode("utf-8")
    headers = _headers(NO_STORE, body, PLAYLIST_TYPE.encode("latin-1"))
    headers.extend((b"set-cookie", cookie) for cookie in cookies or ())
    return Answer(200, headers, body)


def webvtt_answer(text: str) -> Answer:
    """A WebVTT track, never cached (its URIs are signed for one viewer)."""
    body = text.encode("utf-8")
    return Answer(200, _headers(NO_STORE, body, WEBVTT_TYPE.encode("latin-1")), body)


#: Every key is 16 bytes: its headers are built once (senders copy the list, never change it).
KEY_HEADERS = _headers(NO_STORE, bytes(16), b"application/octet-stream")


def key_answer(key: bytes) -> Answer:
    if len(key) == 16:
        return Answer(200, KEY_HEADERS, key)
    return Answer(200, _headers(NO_STORE, key, b"application/octet-stream"), key)


def set_cookie_value(
    name: str, value: str, *, max_age: int, path: str, domain: str | None = None
) -> bytes:
    """A Set-Cookie value for a cookie only HTTPS requests carry, out of reach of scripts, sent
    cross-site (the player's page and the key server are rarely one site)."""
    cookie: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
    cookie[name] = value
    morsel = cookie[name]
    morsel["max-age"] = max_age
    morsel["path"] = path
    if domain is not None:
        morsel["domain"] = domain
    morsel["secure"] = True
    morsel["httponly"] = True
    morsel["samesite"] = "none"
    return cookie.output(header="").strip().encode("latin-1")


class AnswerResponse(Response):
    """An :class:`Answer` as a Starlette response: its status, headers and body unchanged."""

    def __init__(self, answer: Answer) -> None:
        self.status_code = answer.status
        self.background = None
        self.body = answer.body
        self.raw_headers = list(answer.headers)


def to_response(answer: Answer) -> Response:
    return AnswerResponse(answer)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """``{"error": message}`` with ``status``, never cached, as a Starlette response."""
    return to_response(error_answer(status, message, headers))


def playlist(body: str) -> Response:
    return to_response(playlist_answer(body))
