"""The fast path gives exactly the answers of the Starlette routes: one request matrix (every
status code the viewer routes give, token in the query, a Bearer header or the cookie,
sessions, addresses, CORS, CDN signing, revocation, rate limits) sent to a key server built
with the fast path and to one built without, each answer compared byte for byte (status, the
header list in order, body)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from keyserver import create_app
from pipeline.catalog import Catalog
from pipeline.settings import load_settings
from pipeline.tokens import SID_HEADER, mint_token

from keyserver_support import (
    ASSET,
    OTHER,
    OTHER_IP,
    VIEWER_IP,
    Library,
    shared_library,
    tamper,
    wait_for_fresh_window,
)
from support import run_coroutine

APP_ORIGIN = "https://app.example"
CDN_URL = "https://cdn.fastpath.test"
#: The per-token limit of the matrix: its key requests with one token pass it.
TOKEN_LIMIT = 12

Answer = tuple[int, list[tuple[bytes, bytes]], bytes]


async def call(
    app: Any, method: str, path: str, *, query: str | bytes = "", client_ip: str = VIEWER_IP,
    headers: Sequence[tuple[str, str]] = (),
) -> Answer:
    """One request straight into the ASGI app: status, the raw header list, the body."""
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "https", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": query.encode() if isinstance(query, str) else query,
        "headers": [(b"host", b"keys.test")]
        + [(name.lower().encode(), value.encode()) for name, value in headers],
        "client": (client_ip, 50000), "server": ("keys.test", 443),
    }
    status, answer_headers, body = 0, [], bytearray()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        nonlocal status, answer_headers
        if message["type"] == "http.response.start":
            status, answer_headers = message["status"], list(message["headers"])
        elif message["type"] == "http.response.body":
            body.extend(message.get("body", b""))

    await app(scope, receive, send)
    return status, answer_headers, bytes(body)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Library:
    """A copy of the shared library: ``film``'s old version retired, ``film-b`` revoked, one
    of ``film``'s wrapped keys broken (a 500), and a CloudFront key pair to sign with."""
    directory = tmp_path_factory.mktemp("fastpath")
    library = shared_library(tmp_path_factory, copy_clip).copy(directory)
    library.retire_until(library.old_version, 1.0)
    Catalog(library.vault).revoke(OTHER)
    wrapped = library.data_dir / "vault" / "keys" / ASSET / library.version / "000001.key"
    blob = bytearray(wrapped.read_bytes())
    blob[-1] ^= 1
    wrapped.write_bytes(bytes(blob))
    key_file = directory / "cloudfront.pem"
    key_file.write_bytes(rsa.generate_private_key(public_exponent=65537, key_size=2048)
                         .private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    env = {**library.env, "HLSVAULT_CDN_URL": CDN_URL, "HLSVAULT_CORS_ORIGINS": APP_ORIGIN,
           "HLSVAULT_CLOUDFRONT_KEY_PAIR_ID": "KFASTPATH",
           "HLSVAULT_CLOUDFRONT_PRIVATE_KEY": str(key_file),
           "HLSVAULT_RATE_LIMIT_TOKEN": str(TOKEN_LIMIT), "HLSVAULT_RATE_LIMIT_IP": "0"}
    return Library(env=env, data_dir=library.data_dir, old_version=library.old_version,
                   version=library.version, other_version=library.other_version,
                   rendition=library.rendition, keys=library.keys)


def matrix(library: Library) -> list[tuple[str, str, str, str, list[tuple[str, str]]]]:
    """(method, path, query, client address, headers) of every request compared."""
    token = library.token()
    bound = library.token(sid="sess-1", ip=VIEWER_IP)
    expired = mint_token(library.settings.token_secret, ASSET, -120)
    for_other = library.token(OTHER)
    limited = library.token()  # spent on key requests past its limit
    master, variant = library.master_path(), library.variant_path()
    key0, key1, key7 = library.key_path(0), library.key_path(1), library.key_path(7)
    old_key = library.key_path(0, version=library.old_version)
    q = f"token={token}"
    bearer = [("Authorization", f"Bearer {token}")]
    cookie = [("Cookie", f"other=1; hlsvault_token={token}")]
    origin = [("Origin", APP_ORIGIN)]
    requests: list[tuple[str, str, str, str, list[tuple[str, str]]]] = [
        # master: tokenized, Bearer, sessions, cookie mode (cookies and CloudFront cookies)
        ("GET", master, q, VIEWER_IP, []),
        ("GET", master, "", VIEWER_IP, bearer),
        ("GET", master, f"token={bound}&sid=sess-1", VIEWER_IP, []),
        ("GET", master, f"token={bound}", VIEWER_IP, [(SID_HEADER, "sess-1")]),
        ("GET", master, f"token={bound}", VIEWER_IP, []),  # 403: no session
        ("GET", master, f"token={bound}&sid=sess-2", VIEWER_IP, []),  # 403: another session
        ("GET", master, f"token={bound}&sid=sess-1", OTHER_IP, []),  # 403: another address
        ("GET", master, f"{q}&auth=cookie", VIEWER_IP, []),
        ("GET", master, "", VIEWER_IP, []),  # 401: no token
        ("GET", master, f"token={tamper(token)}", VIEWER_IP, []),  # 401: forged
        ("GET", master, f"token={expired}", VIEWER_IP, []),  # 401: expired
        ("GET", master, f"token={for_other}", VIEWER_IP, []),  # 403: another asset
        ("GET", master, "token=not-a-jwt&token=" + token, VIEWER_IP, []),  # the last one wins
        ("GET", library.master_path(OTHER), f"token={for_other}", VIEWER_IP, []),  # 410
        ("GET", library.master_path("nosuch"), f"token={library.token('nosuch')}", VIEWER_IP,
         []),  # 404
        ("GET", "/v1/assets/bad!id/master.m3u8", q, VIEWER_IP, []),  # 400
        ("GET", master, q, VIEWER_IP, origin),  # CORS on a simple request
        # variant: signed segment URIs, cookie mode, unknown and malformed renditions
        ("GET", variant, q, VIEWER_IP, []),
        ("GET", variant, "", VIEWER_IP, bearer),
        ("GET", variant, "auth=cookie", VIEWER_IP, cookie),
        ("GET", variant, "auth=cookie", VIEWER_IP, []),  # 401: no cookie
        ("GET", variant, "", VIEWER_IP, cookie),  # 401: the cookie counts in cookie mode only
        ("GET", f"/v1/assets/{ASSET}/nosuch.m3u8", q, VIEWER_IP, []),  # 404
        ("GET", f"/v1/assets/{ASSET}/a.b.m3u8", q, VIEWER_IP, []),  # 400
        # keys: query, Bearer, cookie; 400, 401, 403, 404, 410, 500, 429
        ("GET", key0, q, VIEWER_IP, []),
        ("GET", key0, "", VIEWER_IP, bearer),
        ("GET", key0, "", VIEWER_IP, cookie),
        ("GET", key0, f"token={bound}&sid=sess-1", VIEWER_IP, []),
        ("GET", key0, f"token={bound}&sid=sess-1", OTHER_IP, []),  # 403
        ("GET", key0, f"token={expired}", VIEWER_IP, []),  # 401
        ("GET", key0, f"token={tamper(token)}", VIEWER_IP, []),  # 401
        ("GET", key0, "", VIEWER_IP, []),  # 401
        ("GET", f"/v1/keys/{ASSET}/{library.version}/01", q, VIEWER_IP, []),  # 400
        ("GET", f"/v1/keys/{ASSET}/{library.version}/x", q, VIEWER_IP, []),  # 400
        ("GET", key7, q, VIEWER_IP, []),  # 404
        ("GET", old_key, q, VIEWER_IP, []),  # 410: retired
        ("GET", library.key_path(0, asset=OTHER), f"token={for_other}", VIEWER_IP, []),  # 410
        ("GET", key1, q, VIEWER_IP, []),  # 500: the wrapped key does not authenticate
        ("GET", key0, q, VIEWER_IP, origin),
        *[("GET", key0, f"token={limited}", VIEWER_IP, []) for _ in range(TOKEN_LIMIT + 2)],
        # what the fast path leaves to Starlette
        ("OPTIONS", key0, "", VIEWER_IP,
         [*origin, ("Access-Control-Request-Method", "GET"),
          ("Access-Control-Request-Headers", "authorization")]),  # CORS preflight
        ("OPTIONS", key0, "", VIEWER_IP,
         [("Origin", "https://evil.example"), ("Access-Control-Request-Method", "GET")]),
        ("HEAD", key0, q, VIEWER_IP, []),
        ("POST", key0, q, VIEWER_IP, []),  # 405
        ("GET", f"{key0}/", q, VIEWER_IP, []),
        ("GET", f"/v1/keys/{ASSET}", q, VIEWER_IP, []),  # 404
        ("GET", "/healthz", "", VIEWER_IP, []),
        ("GET", f"/v1/downloads/{ASSET}", q, VIEWER_IP, []),
    ]
    return requests


class TestFastPathEquivalence:
    def test_the_fast_path_answers_every_request_as_the_starlette_routes_do(
        self, library: Library
    ) -> None:
        """Each request of the matrix, sent to both servers in turn, gets the same status,
        header list and body. Max-Age, Retry-After and signature expiries follow the clock, so
        a pair that differs is asked once more: only a second boundary in between may excuse
        a difference, and it cannot happen twice in a row."""
        settings = load_settings(library.env)
        fast = create_app(settings, vault=library.vault)
        plain = create_app(settings, vault=library.vault, fast_path=False)
        requests = matrix(library)
        wait_for_fresh_window()

        async def compare() -> tuple[list[Any], set[int]]:
            differences, statuses = [], set()
            for method, path, query, ip, headers in requests:
                for attempt in range(2):
                    kwargs: dict[str, Any] = {"query": query, "client_ip": ip,
                                              "headers": headers}
                    ours = await call(fast, method, path, **kwargs)
                    theirs = await call(plain, method, path, **kwargs)
                    if ours == theirs:
                        break
                    if attempt == 1:
                        differences.append((method, path, ours, theirs))
                statuses.add(ours[0])
            return differences, statuses

        differences, statuses = run_coroutine(compare())
        assert differences == []
        assert {200, 307, 400, 401, 403, 404, 405, 410, 429, 500} <= statuses, statuses

    def test_a_trusted_proxys_forwarded_address_counts_on_both_paths(
        self, library: Library
    ) -> None:
        """With FORWARDED_ALLOW_IPS naming a proxy, a token bound to the viewer's address is
        honoured when that proxy forwards the viewer's address (the rightmost untrusted one),
        and refused when an untrusted peer claims it, or the proxy forwards another address
        or nothing: the same answers on the fast path as through uvicorn's middleware."""
        proxy = "10.9.9.9"
        settings = load_settings(library.env)
        fast = create_app(settings, vault=library.vault, forwarded_allow_ips=proxy)
        plain = create_app(settings, vault=library.vault, fast_path=False,
                           forwarded_allow_ips=proxy)
        query = f"token={library.token(sid='sess-1', ip=VIEWER_IP)}&sid=sess-1"
        cases = [  # (peer, X-Forwarded-For values, expected status)
            (proxy, [VIEWER_IP], 200),
            (proxy, [f"{OTHER_IP}, {VIEWER_IP}"], 200),
            (proxy, [OTHER_IP, VIEWER_IP], 200),
            (proxy, [OTHER_IP], 403),
            (proxy, [VIEWER_IP, OTHER_IP], 403),
            (proxy, [], 403),
            (OTHER_IP, [VIEWER_IP], 403),
            (VIEWER_IP, [OTHER_IP], 200),
        ]

        async def answers() -> list[tuple[int, int, bool]]:
            seen = []
            for peer, forwarded, _ in cases:
                headers = [("X-Forwarded-For", value) for value in forwarded]
                for path in (library.master_path(), library.key_path(0)):
                    kwargs: dict[str, Any] = {"query": query, "client_ip": peer,
                                              "headers": headers}
                    ours = await call(fast, "GET", path, **kwargs)
                    theirs = await call(plain, "GET", path, **kwargs)
                    seen.append((ours[0], theirs[0], ours == theirs))
            return seen

        expected = [(status, status, True) for _, _, status in cases for _ in range(2)]
        assert run_coroutine(answers()) == expected

    def test_the_matrix_tells_answers_apart(self, library: Library) -> None:
        """Positive control: the comparison sees a difference when there is one (a key server
        with another public URL names other URIs in its playlists)."""
        settings = load_settings(library.env)
        moved = load_settings({**library.env, "HLSVAULT_PUBLIC_URL": "https://moved.example"})
        fast = create_app(settings, vault=library.vault)
        other = create_app(moved, vault=library.vault, fast_path=False)
        query = f"token={library.token()}"

        async def both() -> tuple[Answer, Answer]:
            return (await call(fast, "GET", library.master_path(), query=query),
                    await call(other, "GET", library.master_path(), query=query))

        ours, theirs = run_coroutine(both())
        assert ours[0] == theirs[0] == 200
        assert ours != theirs

    def test_errors_are_the_documented_json(self, library: Library) -> None:
        """The fast path's refusals are JSON errors, never cached, as the docs promise."""
        fast = create_app(load_settings(library.env), vault=library.vault)
        status, headers, body = run_coroutine(call(fast, "GET", library.key_path()))
        assert status == 401
        assert (b"cache-control", b"no-store") in headers
        assert (b"content-type", b"application/json") in headers
        assert json.loads(body)["error"] == "missing token"


class TestGarbage:
    """Hostile requests to the viewer routes: each gets a clear 4xx JSON refusal, never a 5xx,
    and the fast path answers exactly as the Starlette routes do."""

    @staticmethod
    def garbage(library: Library) -> list[tuple[str, str | bytes, list[tuple[str, str]]]]:
        master, key0 = library.master_path(), library.key_path(0)
        return [
            (master, "token=" + "A" * 100_000, []),  # oversized token
            (key0, "token=%ff%fe%00", []),  # percent-encoded bytes that are not UTF-8
            (key0, b"token=\xff\xfe\x80", []),  # raw bytes that are not UTF-8
            (master, "token[]=x&token[a][b]=y", []),  # nested, array-style parameters
            (master, "sid=" + "s" * 10_000 + "&token=x", []),
            ("/v1/assets/..%2F..%2Fetc/master.m3u8", f"token={library.token()}", []),
            ("/v1/assets/../vault/master.m3u8", f"token={library.token()}", []),
            (f"/v1/keys/{ASSET}/../../keys/0", f"token={library.token()}", []),
            ("/v1/assets/" + "a" * 5000 + "/master.m3u8", f"token={library.token()}", []),
            (f"/v1/keys/{ASSET}/{library.version}/99999999999999999999999",
             f"token={library.token()}", []),
            (key0, "", [("Authorization", "Bearer")]),
            (key0, "", [("Authorization", "Bearer " + "x" * 50_000)]),
            (key0, "", [("Authorization", "Basic Zm9vOmJhcg==")]),
            (key0, "", [("Cookie", 'hlsvault_token="unterminated; ;;=; =x')]),
            (master, "", [("X-Forwarded-For", "not-an-ip, " + "1.2.3.4, " * 1000)]),
        ]

    def test_garbage_is_refused_the_same_on_both_paths_never_with_a_5xx(
        self, library: Library
    ) -> None:
        settings = load_settings(library.env)
        fast = create_app(settings, vault=library.vault)
        plain = create_app(settings, vault=library.vault, fast_path=False)

        async def both() -> list[tuple[str, Answer, Answer]]:
            answers = []
            async with fast.router.lifespan_context(fast), \
                    plain.router.lifespan_context(plain):
                for path, query, headers in self.garbage(library):
                    ours = await call(fast, "GET", path, query=query, headers=headers)
                    theirs = await call(plain, "GET", path, query=query, headers=headers)
                    answers.append((path[:60], ours, theirs))
            return answers

        for path, ours, theirs in run_coroutine(both()):
            assert ours == theirs, path
            status, headers, body = ours
            assert 400 <= status < 500, (path, status, body[:200])
            if (b"content-type", b"application/json") in headers:
                assert json.loads(body)["error"]


    def test_garbage_to_the_thumbnail_track_and_signed_sheets_is_refused_never_a_5xx(
        self, library: Library
    ) -> None:
        """The thumbnail track (a Starlette route) and the embedded signed sheet route get the
        same kinds of garbage: oversized, not UTF-8, nested parameters, traversal, a huge or
        negative expiry. Each is a 4xx, never a 5xx, and a JSON body says why."""
        app = create_app(load_settings(library.env), vault=library.vault)
        track = f"/v1/assets/{ASSET}/thumbnails.vtt"
        sheet = f"/cdn/thumbnails/{ASSET}/{library.version}/sheet_000.jpg"
        garbage: list[tuple[str, str | bytes, list[tuple[str, str]]]] = [
            (track, "token=" + "A" * 100_000, []),
            (track, b"token=\xff\xfe\x80", []),
            (track, "token[]=x&token[a][b]=y", []),
            (track, f"token={library.token()}", []),  # no trick play: 404, not a crash
            ("/v1/assets/..%2F..%2Fvault/thumbnails.vtt", f"token={library.token()}", []),
            ("/v1/assets/" + "a" * 5000 + "/thumbnails.vtt", f"token={library.token()}", []),
            (track, "", [("Authorization", "Bearer " + "x" * 50_000)]),
            (track, "auth=cookie", [("Cookie", 'hlsvault_token="unterminated; ;;=; =x')]),
            (sheet, "", []),
            (sheet, "expires=abc&signature=00", []),
            (sheet, "expires=" + "9" * 40 + "&signature=00", []),
            (sheet, "expires=-1&signature=00", []),
            (sheet, "expires[]=1&signature[a]=2", []),
            (sheet, b"expires=1\xff&signature=\xfe", []),
            (f"/cdn/thumbnails/{ASSET}/../../keys/{ASSET}/0", "expires=9999999999&signature=0",
             []),
            ("/cdn/thumbnails/" + "a" * 5000 + "/v/sheet_000.jpg", "expires=1&signature=0", []),
        ]

        async def answers() -> list[tuple[str, Answer]]:
            async with app.router.lifespan_context(app):
                return [(path[:60], await call(app, "GET", path, query=query, headers=headers))
                        for path, query, headers in garbage]

        for path, (status, headers, body) in run_coroutine(answers()):
            assert 400 <= status < 500, (path, status, body[:200])
            if (b"content-type", b"application/json") in headers:
                assert json.loads(body)["error"]


class TestQueryParsing:
    @pytest.mark.parametrize("query", [
        "token=a.b.c", "token=a&token=b", "a&b=&=c&&token=x=y", "token=%41%2B+b&sid=s%20t",
        "sid=é&token=ü", "", "&", "token", "=", "token==",
    ])
    def test_queries_are_read_as_starlette_reads_them(self, query: str) -> None:
        """The hand split gives what parse_qsl (Starlette's parser) gives, quoted or not."""
        from starlette.datastructures import QueryParams

        from keyserver.credentials import Credentials

        ours = Credentials({"query_string": query.encode("latin-1"), "headers": []}).query
        theirs = QueryParams(query.encode("latin-1"))
        assert ours == {name: theirs[name] for name in theirs}
        # Asked again, the remembered answer is the same.
        again = Credentials({"query_string": query.encode("latin-1"), "headers": []}).query
        assert again == ours


class TestRememberedRequests:
    def test_a_flood_of_distinct_paths_and_queries_stays_bounded_and_viewers_are_served(
        self, library: Library
    ) -> None:
        """The fast path remembers the routes, key paths and queries players send again and
        again. A flood of distinct ones (more than each memo holds: key paths with garbage
        tokens, malformed indexes, over-long queries) leaves every memo within its bound, and
        a viewer's key requests are answered as before it, with the key bytes; a malformed
        index is still a 400, an over-long query still read right, before and after."""
        from keyserver import credentials, fastpath, server

        app = create_app(load_settings(library.env), vault=library.vault)
        token = library.token()
        long_query = f"pad={'p' * (credentials.MAX_KNOWN_QUERY_CHARS + 10)}&token={token}"
        # Twice the largest memo: each is filled past its bound (a third of the paths are
        # malformed, and never remembered as key paths).
        flood = 2 * max(fastpath.MAX_KNOWN_PATHS, server.MAX_KEY_PATHS,
                        credentials.MAX_KNOWN_QUERIES) + 500
        bad_index = f"/v1/keys/{ASSET}/{library.version}/0{7}"

        async def viewer() -> list[tuple[int, bytes]]:
            return [(answer[0], answer[2]) for answer in [
                await call(app, "GET", library.key_path(0), query=f"token={token}"),
                await call(app, "GET", library.key_path(0), query=long_query),
                await call(app, "GET", bad_index, query=f"token={token}"),
            ]]

        async def scenario() -> tuple[list[tuple[int, bytes]], set[int], list[tuple[int, bytes]]]:
            before = await viewer()
            statuses = set()
            for n in range(flood):
                path = f"/v1/keys/{ASSET}/{library.version}/{n if n % 3 else f'0{n}'}"
                statuses.add((await call(app, "GET", path, query=f"token=eyJ{n}.e.x"))[0])
            return before, statuses, await viewer()

        before, statuses, after = run_coroutine(scenario())
        expected = [(200, library.key(0)), (200, library.key(0))]
        assert before[:2] == after[:2] == expected
        assert before[2][0] == after[2][0] == 400
        assert statuses == {400, 401}
        assert 0 < len(app.viewer.router._known) <= fastpath.MAX_KNOWN_PATHS
        assert 0 < len(app.server._key_paths) <= server.MAX_KEY_PATHS
        assert 0 < len(credentials._known_queries) <= credentials.MAX_KNOWN_QUERIES
        assert long_query not in credentials._known_queries
