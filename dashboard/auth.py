"""Who may use the ops app: HTTP Basic auth as ``ops``, and CSRF-safe forms.

Without ``HLSVAULT_OPS_PASSWORD`` nothing but the public paths is served: every other path
answers 503 saying what to set, so that the ``ops`` process can run (and stay up, under
``honcho start``) in a fleet that has no dashboard configured.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from collections.abc import Sequence
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

OPS_USER = "ops"
REALM = "hlsvault ops"
#: Paths served without Basic auth: the load balancer's health check, and the webhook, which
#: authenticates each request with its own HMAC signature.
PUBLIC_PATHS = ("/healthz", "/v1/jobs")
#: What the ops process says, once at start and on every page, when it has no password.
DISABLED = (
    "the ops dashboard is disabled: set HLSVAULT_OPS_PASSWORD to serve it behind HTTP Basic "
    "auth as user 'ops' (generate one with python3 -c 'import secrets; "
    "print(secrets.token_urlsafe(24))'); until then only /healthz and the webhook are served"
)


class BasicAuth:
    """HTTP Basic auth for every path but :data:`PUBLIC_PATHS`, compared in constant time;
    with ``password`` None, every other path answers 503 with :data:`DISABLED`."""

    def __init__(
        self, app: ASGIApp, *, password: str | None, public_paths: Sequence[str] = PUBLIC_PATHS
    ) -> None:
        self.app = app
        self.expected = None if password is None else f"{OPS_USER}:{password}".encode()
        self.public_paths = tuple(public_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths:
            await self.app(scope, receive, send)
            return
        if self.expected is None:
            response = PlainTextResponse(DISABLED + "\n", status_code=503)
        elif self._authorised(dict(scope["headers"]).get(b"authorization", b"")):
            await self.app(scope, receive, send)
            return
        else:
            response = PlainTextResponse(
                "authentication required: log in as user 'ops' with HLSVAULT_OPS_PASSWORD\n",
                status_code=401,
                headers={"WWW-Authenticate": f'Basic realm="{REALM}", charset="UTF-8"'},
            )
        await response(scope, receive, send)

    def _authorised(self, header: bytes) -> bool:
        scheme, _, encoded = header.partition(b" ")
        if scheme.lower() != b"basic" or self.expected is None:
            return False
        try:
            given = base64.b64decode(encoded.strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return hmac.compare_digest(given, self.expected)


class CsrfTokens:
    """Per action and job, an HMAC under a key derived from the ops password: a page's form
    carries its token, and a form posted from anywhere else has none."""

    def __init__(self, password: str) -> None:
        self._key = hmac.new(password.encode(), b"hlsvault-ops-csrf", "sha256").digest()

    def token(self, action: str, job_id: str) -> str:
        return hmac.new(self._key, f"{action}:{job_id}".encode(), "sha256").hexdigest()

    def valid(self, given: str, action: str, job_id: str) -> bool:
        return hmac.compare_digest(given, self.token(action, job_id))


def cross_origin(request: Request) -> Response | None:
    """403 when the browser says the form was posted from another origin."""
    origin = request.headers.get("origin") or request.headers.get("referer")
    if origin is None:
        return None  # the CSRF token alone decides
    if urlsplit(origin).netloc != request.headers.get("host", ""):
        return PlainTextResponse("cross-origin form post refused; use the ops app's own page\n",
                                 status_code=403)
    return None
