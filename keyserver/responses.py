"""The key server's answers: playlists, and errors as JSON that no cache keeps."""

from __future__ import annotations

from starlette.responses import JSONResponse, PlainTextResponse, Response

PLAYLIST_TYPE = "application/vnd.apple.mpegurl"
#: Every playlist, key and error is per viewer (or about one): no shared cache may keep it.
NO_STORE = {"Cache-Control": "no-store"}


def error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    """``{"error": message}`` with ``status``, never cached."""
    return JSONResponse(
        {"error": message}, status_code=status, headers={**NO_STORE, **(headers or {})}
    )


def playlist(body: str) -> Response:
    return PlainTextResponse(body, media_type=PLAYLIST_TYPE, headers=NO_STORE)
