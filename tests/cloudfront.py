"""A CloudFront stand-in: an HTTP server of our own (127.0.0.1, a free port) in front of an S3
origin (the moto server), enforcing what CloudFront documents for a behaviour restricted to a
trusted key group, with the public keys only:

- a signed URL (``Policy`` or ``Expires``, with ``Signature`` and ``Key-Pair-Id`` in the query
  string), else signed cookies (``CloudFront-Policy`` or ``CloudFront-Expires``,
  ``CloudFront-Signature``, ``CloudFront-Key-Pair-Id``); the URL wins when a request has both;
- the values in CloudFront's URL-safe base64 (``+`` ``=`` ``/`` sent as ``-`` ``_`` ``~``), the
  signature RSA-SHA1 PKCS#1 v1.5 over the policy JSON, the key pair id one of the group's;
- a canned policy is rebuilt from the request URL and ``Expires`` (exact resource); a custom
  policy has one statement whose ``Resource`` matches the request URL (without the signing
  parameters) with ``*`` as any run of characters and ``?`` as one, ``DateLessThan`` in the
  future (required), ``DateGreaterThan`` (optional) passed, and the client address inside
  ``IpAddress``/``AWS:SourceIp`` (optional);
- anything else is 403, and nothing reaches the origin.

What passes is fetched from the origin bucket with SigV4-signed S3 requests (as Origin Access
Control does: the bucket itself refuses anonymous reads), without the signing parameters (as a
behaviour whose cache policy leaves query strings and cookies out forwards it), ``Range``
included, and answered with the origin's status and headers. CORS is answered for the
configured origins, with credentials, as a response headers policy would. Every answer is
recorded in :attr:`CloudFrontStandIn.served` (path, status, reason) for the tests to read.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

#: The signing parameters CloudFront reads, and never passes to the origin.
SIGNING_PARAMS = ("Policy", "Expires", "Signature", "Key-Pair-Id")
COOKIE_PREFIX = "CloudFront-"
#: Headers passed back from the origin: S3's response field -> HTTP header.
PASSED_HEADERS = {
    "ContentType": "Content-Type", "ContentLength": "Content-Length",
    "ContentRange": "Content-Range", "AcceptRanges": "Accept-Ranges",
    "ContentDisposition": "Content-Disposition", "CacheControl": "Cache-Control",
    "ETag": "ETag",
}


def cloudfront_b64decode(text: str) -> bytes:
    standard = text.replace("-", "+").replace("_", "=").replace("~", "/")
    return base64.b64decode(standard, validate=True)


def resource_matches(pattern: str, url: str) -> bool:
    """CloudFront's wildcards: ``*`` any run of characters (none too), ``?`` exactly one."""
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern
    )
    return re.fullmatch(regex, url, flags=re.DOTALL) is not None


@dataclass(frozen=True)
class Served:
    path: str
    status: int
    reason: str


class Refusal(Exception):
    """Why a request is answered 403."""


class CloudFrontStandIn:
    """The stand-in, on ``http://127.0.0.1:<port>``; :attr:`url` is the CDN URL to configure."""

    def __init__(
        self, s3: Any, bucket: str, public_keys: dict[str, str], *,
        protected: Iterable[str] = ("/assets/", "/downloads/"),
        cors_origins: Iterable[str] = (),
    ) -> None:
        """``s3``: a boto3 S3 client (with its timeouts) for the origin ``bucket``."""
        self.s3 = s3
        self.bucket = bucket
        self.keys: dict[str, RSAPublicKey] = {}
        for key_id, pem in public_keys.items():
            key = load_pem_public_key(pem.encode())
            assert isinstance(key, RSAPublicKey)
            self.keys[key_id] = key
        self.protected = tuple(protected)
        self.cors_origins = set(cors_origins)
        self.served: list[Served] = []
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                standin._handle(self, head=False)

            def do_HEAD(self) -> None:
                standin._handle(self, head=True)

            def do_OPTIONS(self) -> None:
                standin._preflight(self)

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: :attr:`served` records every answer."""

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="cloudfront-standin", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> CloudFrontStandIn:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def refusals(self) -> list[Served]:
        with self._lock:
            return [s for s in self.served if s.status == 403]

    # -- the checks ------------------------------------------------------------------------------

    def check(self, url: str, query: list[tuple[str, str]], cookies: dict[str, str],
              client_ip: str, *, now: float | None = None) -> None:
        """Raise :class:`Refusal` unless the request is signed as CloudFront requires."""
        moment = time.time() if now is None else now
        params = dict(query)
        if "Signature" in params or "Key-Pair-Id" in params:
            source = {k: params.get(k) for k in SIGNING_PARAMS}
        elif any(name.startswith(COOKIE_PREFIX) for name in cookies):
            source = {k: cookies.get(COOKIE_PREFIX + k) for k in SIGNING_PARAMS}
        else:
            raise Refusal("missing signature")
        key_id, signature = source["Key-Pair-Id"], source["Signature"]
        if not key_id or not signature:
            raise Refusal("incomplete signature")
        key = self.keys.get(key_id)
        if key is None:
            raise Refusal("unknown key pair id")
        try:
            signature_bytes = cloudfront_b64decode(signature)
        except ValueError:
            raise Refusal("signature is not CloudFront base64") from None
        resource_url = self._resource_url(url, query)
        if source["Policy"]:
            try:
                policy = cloudfront_b64decode(source["Policy"])
            except ValueError:
                raise Refusal("policy is not CloudFront base64") from None
        elif source["Expires"]:
            expires = source["Expires"]
            if not expires.isdigit():
                raise Refusal("malformed Expires")
            # The canned policy CloudFront rebuilds: exactly this text, no whitespace.
            condition = '{"DateLessThan":{"AWS:EpochTime":' + expires + "}}"
            policy = (
                '{"Statement":[{"Resource":"' + resource_url + '","Condition":' + condition + "}]}"
            ).encode()
        else:
            raise Refusal("neither Policy nor Expires")
        try:
            # SHA-1: what CloudFront verifies with.
            key.verify(signature_bytes, policy, padding.PKCS1v15(), hashes.SHA1())  # noqa: S303
        except InvalidSignature:
            raise Refusal("signature does not match the policy") from None
        self._check_policy(policy, resource_url, client_ip, moment)

    @staticmethod
    def _resource_url(url: str, query: list[tuple[str, str]]) -> str:
        kept = [(k, v) for k, v in query if k not in SIGNING_PARAMS]
        return url + (f"?{urlencode(kept)}" if kept else "")

    @staticmethod
    def _check_policy(policy: bytes, resource_url: str, client_ip: str, now: float) -> None:
        try:
            document = json.loads(policy)
            (statement,) = document["Statement"]
            resource = statement["Resource"]
            condition = statement["Condition"]
            less_than = int(condition["DateLessThan"]["AWS:EpochTime"])
        except (ValueError, KeyError, TypeError):
            raise Refusal("malformed policy") from None
        if not isinstance(resource, str) or not resource_matches(resource, resource_url):
            raise Refusal("resource does not match")
        if now >= less_than:
            raise Refusal("expired")
        greater = condition.get("DateGreaterThan")
        if greater is not None and now < int(greater["AWS:EpochTime"]):
            raise Refusal("not yet valid")
        allowed = condition.get("IpAddress")
        if allowed is not None:
            network = ipaddress.ip_network(allowed["AWS:SourceIp"], strict=False)
            if ipaddress.ip_address(client_ip) not in network:
                raise Refusal("another client address")

    # -- HTTP --------------------------------------------------------------------------------

    def _cors(self, handler: BaseHTTPRequestHandler) -> list[tuple[str, str]]:
        origin = handler.headers.get("Origin")
        if origin is None or origin not in self.cors_origins:
            return []
        return [("Access-Control-Allow-Origin", origin),
                ("Access-Control-Allow-Credentials", "true"),
                ("Access-Control-Expose-Headers", "Content-Length, Content-Range"),
                ("Vary", "Origin")]

    def _preflight(self, handler: BaseHTTPRequestHandler) -> None:
        headers = [
            *self._cors(handler),
            ("Access-Control-Allow-Methods", "GET, HEAD"),
            ("Access-Control-Allow-Headers", "Range"),
            ("Content-Length", "0"),
        ]
        self._answer(handler, 204, headers, b"", path=handler.path, reason="preflight")

    def _answer(self, handler: BaseHTTPRequestHandler, status: int,
                headers: list[tuple[str, str]], body: bytes, *, path: str, reason: str,
                head: bool = False) -> None:
        with self._lock:
            self.served.append(Served(path, status, reason))
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def _handle(self, handler: BaseHTTPRequestHandler, *, head: bool) -> None:
        parts = urlsplit(handler.path)
        query = parse_qsl(parts.query, keep_blank_values=True)
        cors = self._cors(handler)
        if parts.path.startswith(self.protected):
            cookies: dict[str, str] = {}
            try:
                jar: SimpleCookie = SimpleCookie(handler.headers.get("Cookie", ""))
                cookies = {name: morsel.value for name, morsel in jar.items()}
            except CookieError:
                pass
            try:
                self.check(f"{self.url}{parts.path}", query, cookies, handler.client_address[0])
            except Refusal as refusal:
                body = b"<Error><Code>AccessDenied</Code></Error>"
                self._answer(handler, 403, [*cors, ("Content-Type", "text/xml"),
                                            ("Content-Length", str(len(body)))],
                             body, path=parts.path, reason=str(refusal), head=head)
                return
        from botocore.exceptions import ClientError

        request: dict[str, Any] = {"Bucket": self.bucket, "Key": unquote(parts.path[1:])}
        if handler.headers.get("Range"):
            request["Range"] = handler.headers["Range"]
        try:
            found = (self.s3.head_object if head else self.s3.get_object)(**request)
        except ClientError as failed:
            status = int(failed.response["ResponseMetadata"]["HTTPStatusCode"])
            self._answer(handler, status, [*cors, ("Content-Length", "0")], b"",
                         path=parts.path, reason="origin refused", head=head)
            return
        body = b"" if head else found["Body"].read()
        status = int(found["ResponseMetadata"]["HTTPStatusCode"])
        headers = [(header, str(found[field])) for field, header in PASSED_HEADERS.items()
                   if found.get(field) not in (None, "")]
        self._answer(handler, status, [*cors, *headers], body, path=parts.path,
                     reason="signed" if parts.path.startswith(self.protected) else "public",
                     head=head)
