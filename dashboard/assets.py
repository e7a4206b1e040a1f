"""The ops app's static files: its stylesheet and scripts, and hls.js for the preview player.

hls.js is installed by ``scripts/setup.sh`` with ``npm ci --prefix dashboard/static`` (pinned by
``dashboard/static/package-lock.json``, never committed) and served from here only: the
Content-Security-Policy allows no script from anywhere else. Only the files named in
:data:`STATIC_FILES` are served, not the directory.
"""

from __future__ import annotations

from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
#: hls.js as `npm ci --prefix dashboard/static` installs it; the browser tests load it too.
HLS_JS = STATIC_DIR / "node_modules" / "hls.js" / "dist" / "hls.min.js"
_JS = "text/javascript; charset=utf-8"
STATIC_FILES: dict[str, tuple[Path, str]] = {
    "ops.css": (STATIC_DIR / "ops.css", "text/css; charset=utf-8"),
    "live.js": (STATIC_DIR / "live.js", _JS),
    "preview.js": (STATIC_DIR / "preview.js", _JS),
    "hls.min.js": (HLS_JS, _JS),
}
HLS_JS_MISSING = (
    f"hls.js is not installed at {HLS_JS}; run scripts/setup.sh "
    "(npm ci --prefix dashboard/static) to install it"
)


def hls_js_missing() -> str | None:
    """Why the preview player cannot run, when hls.js is not installed."""
    return None if HLS_JS.is_file() else HLS_JS_MISSING


def static_file(request: Request) -> Response:
    named = STATIC_FILES.get(request.path_params["name"])
    if named is None:
        return PlainTextResponse("no such static file\n", status_code=404)
    path, media_type = named
    if not path.is_file():
        missing = HLS_JS_MISSING if path == HLS_JS else f"{path} is missing; reinstall hlsvault"
        return PlainTextResponse(missing + "\n", status_code=503)
    # Revalidated on every load: a deploy's new script is picked up without a stale copy.
    return FileResponse(path, media_type=media_type, headers={"Cache-Control": "no-cache"})
