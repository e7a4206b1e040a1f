"""`hlsvault serve --server granian-rsgi` gives exactly the answers of `--server granian`
(ASGI): the fast path's request matrix and its garbage, sent over HTTP to both servers bound
to 127.0.0.1, each answer compared on the wire (status line, every header in order but the
Date, body), and both servers' access and audit lines compared field by field."""

from __future__ import annotations

import json
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import test_keyserver_fastpath as fastpath
from keyserver_support import OTHER_IP, VIEWER_IP, Library, wait_for_fresh_window
from support import free_port, serving

#: The fast path's fixture: the same library, CORS, CDN signing and rate limits.
library = fastpath.library

#: One answer as a client reads it: status line, headers (lower-cased names, Date left out,
#: since it follows the clock), body.
Wire = tuple[str, list[tuple[str, str]], bytes]
#: How long one request may take on the wire.
REQUEST_TIMEOUT_S = 10.0
#: The loggers whose lines both servers must write alike.
LOGGERS = ("hlsvault.audit", "hlsvault.keyserver")


def request(
    port: int, method: str, path: str, query: str | bytes = "",
    headers: Sequence[tuple[str, str | bytes]] = (),
) -> Wire:
    """One HTTP/1.1 request on a connection of its own, read to its end."""
    target = path.encode() + (b"?" + (query if isinstance(query, bytes) else query.encode())
                              if query else b"")
    head = [method.encode() + b" " + target + b" HTTP/1.1", b"host: 127.0.0.1",
            b"connection: close"]
    head += [name.encode() + b": " + (value if isinstance(value, bytes) else value.encode())
             for name, value in headers]
    with socket.create_connection(("127.0.0.1", port), timeout=REQUEST_TIMEOUT_S) as sock:
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        received = bytearray()
        while chunk := sock.recv(65536):
            received.extend(chunk)
    top, _, body = bytes(received).partition(b"\r\n\r\n")
    status, *fields = top.decode("latin-1").split("\r\n")
    pairs = [(name.strip().lower(), value.strip())
             for name, _, value in (field.partition(":") for field in fields)]
    return status, [pair for pair in pairs if pair[0] != "date"], body


def log_lines(path: Path) -> Counter[str]:
    """The key server's own JSON lines in ``path``, without what follows the clock, counted.
    Counted, not listed: the queued lines (access, audit) and the ones logged at once (a
    failure's warning) reach the file from two threads, in no fixed order."""
    lines: Counter[str] = Counter()
    for text in path.read_text().splitlines():
        try:
            line = json.loads(text)
        except ValueError:
            continue
        # /healthz is polled until each server answers: as often as each took to start.
        if (isinstance(line, dict) and line.get("logger") in LOGGERS
                and line.get("path") != "/healthz"):
            kept = {k: v for k, v in line.items() if k not in ("timestamp", "ms")}
            lines[json.dumps(kept, sort_keys=True)] += 1
    return lines


@pytest.fixture
def servers(library: Library, tmp_path: Path) -> Iterator[dict[str, tuple[int, Path]]]:
    """`hlsvault serve` under granian's ASGI and RSGI interfaces over the same library:
    server name -> (port, log file)."""
    started = {}
    # One hash seed for both: Starlette joins a 405's Allow header from a set, whose order
    # follows the process's string hashing.
    env = {**library.env, "PYTHONHASHSEED": "0"}
    with ExitStack() as stack:
        for server in ("granian", "granian-rsgi"):
            port, log = free_port(), tmp_path / f"{server}.log"
            stack.enter_context(serving(env, port, log, "--server", server))
            started[server] = (port, log)
        yield started


def both(servers: dict[str, tuple[int, Path]], *args: Any, **kwargs: Any) -> tuple[Wire, Wire]:
    """The same request to the ASGI server, then the RSGI one."""
    return (request(servers["granian"][0], *args, **kwargs),
            request(servers["granian-rsgi"][0], *args, **kwargs))


class TestRsgiEquivalence:
    def test_every_answer_and_log_line_is_the_asgi_servers(
        self, library: Library, servers: dict[str, tuple[int, Path]]
    ) -> None:
        """Each request of the fast path's matrix (client address forwarded by the trusted
        local proxy, as X-Forwarded-For), sent to both servers in turn, gets the same status
        line, headers and body; the servers then write the same access and audit lines.
        Max-Age, Retry-After and signature expiries follow the clock, so a pair that differs
        is asked once more (both servers again, so their rate limits stay level)."""
        wait_for_fresh_window()
        differences, statuses = [], set()
        for method, path, query, ip, headers in fastpath.matrix(library):
            forwarded = [*headers, ("X-Forwarded-For", ip)]
            for attempt in range(2):
                asgi, rsgi = both(servers, method, path, query, forwarded)
                if asgi == rsgi:
                    break
                if attempt == 1:
                    differences.append((method, path, asgi, rsgi))
            statuses.add(int(asgi[0].split()[1]))
        assert differences == []
        assert {200, 307, 400, 401, 403, 404, 405, 410, 429, 500} <= statuses, statuses
        time.sleep(0.5)  # the writers' flush interval is 50 ms: every line is out by now
        asgi_lines = log_lines(servers["granian"][1])
        rsgi_lines = log_lines(servers["granian-rsgi"][1])
        events = {json.loads(line)["event"] for line in asgi_lines}
        assert {"key request", "request"} <= events, events
        assert rsgi_lines == asgi_lines

    def test_garbage_is_refused_alike_on_the_wire(
        self, library: Library, servers: dict[str, tuple[int, Path]]
    ) -> None:
        """The fast path's hostile requests (oversized and non-UTF-8 tokens, traversal, huge
        ids and headers) get the same answers from both servers, never a 5xx."""
        for path, query, headers in fastpath.TestGarbage.garbage(library):
            asgi, rsgi = both(servers, "GET", path, query, headers)
            assert asgi == rsgi, path[:60]
            assert 400 <= int(asgi[0].split()[1]) < 500, (path[:60], asgi[0])

    def test_origin_files_whole_ranged_and_head_cross_the_bridge_unchanged(
        self, library: Library, servers: dict[str, tuple[int, Path]]
    ) -> None:
        """The embedded /cdn/ (Starlette's static files, through the RSGI server's ASGI
        bridge): a segment whole, a byte range of it, its HEAD, and a missing file."""
        segment = next(library.origin.rglob("*.ts"))
        path = "/cdn/" + segment.relative_to(library.origin).as_posix()
        requests: list[tuple[str, str, list[tuple[str, str]]]] = [
            ("GET", path, []),
            ("GET", path, [("Range", "bytes=100-1099")]),
            ("GET", path, [("Range", "bytes=-10")]),
            ("HEAD", path, []),
            ("GET", path + ".missing", []),
        ]
        answers = [both(servers, method, target, "", headers)
                   for method, target, headers in requests]
        for asgi, rsgi in answers:
            assert asgi == rsgi
        statuses = [asgi[0].split()[1] for asgi, _ in answers]
        assert statuses == ["200", "206", "206", "200", "404"]
        assert answers[0][0][2] == segment.read_bytes()
        assert answers[1][0][2] == segment.read_bytes()[100:1100]

    def test_a_forwarded_address_binds_the_token_on_both(
        self, library: Library, servers: dict[str, tuple[int, Path]]
    ) -> None:
        """A token bound to the viewer's address is served when the trusted local proxy
        forwards that address, refused (403) when it forwards another."""
        query = f"token={library.token(ip=VIEWER_IP)}"
        for forwarded, expected in ((VIEWER_IP, 200), (OTHER_IP, 403)):
            asgi, rsgi = both(servers, "GET", library.key_path(0), query,
                              [("X-Forwarded-For", forwarded)])
            assert asgi == rsgi
            assert asgi[0].split()[1] == str(expected)

    def test_header_values_that_are_not_ascii_get_a_4xx_from_both(
        self, library: Library, servers: dict[str, tuple[int, Path]]
    ) -> None:
        """granian gives an RSGI app no value for a header that is not visible ASCII, where
        ASGI passes its bytes: the one documented difference. A token, session, cookie or
        forwarded address sent that way is refused by both with the same status class (the
        message may differ: "missing token" against "invalid token")."""
        token = library.token()
        cases: list[tuple[str, str, list[tuple[str, str | bytes]]]] = [
            (library.key_path(0), "", [("Authorization", b"Bearer \xe9" + token.encode())]),
            (library.key_path(0), "", [("Cookie", b"hlsvault_token=\xff" + token.encode())]),
            (library.master_path(), f"token={library.token(sid='s1')}",
             [("X-Hlsvault-Sid", b"s\xe91")]),
            (library.master_path(), f"token={library.token(ip=VIEWER_IP)}",
             [("X-Forwarded-For", b"\xff" + VIEWER_IP.encode())]),
        ]
        for path, query, headers in cases:
            asgi, rsgi = both(servers, "GET", path, query, headers)
            assert asgi[0] == rsgi[0], (path, asgi, rsgi)
            assert 400 <= int(asgi[0].split()[1]) < 500, asgi
