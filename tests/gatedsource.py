"""A source served over HTTP (as a URL source is read) whose tail a test can hold back: while
held, no byte from ``hold_from`` on is sent, so an ffmpeg reading it cannot finish until the
test lets it. A test can then prove that something happened *before* the encoder could have
finished, by an event instead of a race against the clock."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: How long a held read waits before it is served anyway: a stage that never lets the rest
#: through then ends, and its test fails on what it asserts instead of hanging.
HOLD_BOUND_S = 120.0
#: Bytes sent per write: the hold is checked before each.
BLOCK = 64 * 1024
_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class GatedSource:
    """``path`` served at :attr:`url` with byte ranges; inside :meth:`holding`, the bytes from
    ``hold_from`` on wait until :meth:`release` (or HOLD_BOUND_S)."""

    def __init__(self, path: Path, hold_from: int) -> None:
        self.path = path
        self.hold_from = hold_from
        self._gate = threading.Event()
        self._gate.set()
        #: Whether a held read was served because HOLD_BOUND_S passed, not by release().
        self.bound_passed = False
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/{self.path.name}"

    @property
    def held(self) -> bool:
        """Whether no byte from ``hold_from`` on has been let through yet."""
        return not self._gate.is_set()

    def release(self) -> None:
        self._gate.set()

    @contextmanager
    def holding(self) -> Iterator[None]:
        self._gate.clear()
        try:
            yield
        finally:
            self._gate.set()

    def _wait_for_gate(self) -> None:
        if not self._gate.wait(HOLD_BOUND_S):
            self.bound_passed = True
            self._gate.set()

    def start(self) -> None:
        source = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                self._answer(body=False)

            def do_GET(self) -> None:
                self._answer(body=True)

            def _answer(self, *, body: bool) -> None:
                size = source.path.stat().st_size
                first, last = 0, size - 1
                wanted = _RANGE.match(self.headers.get("Range", ""))
                if wanted is not None:
                    first = int(wanted.group(1))
                    last = min(int(wanted.group(2)), last) if wanted.group(2) else last
                if first > last:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.end_headers()
                    return
                self.send_response(206 if wanted is not None else 200)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(last - first + 1))
                if wanted is not None:
                    self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
                self.end_headers()
                if not body:
                    return
                with source.path.open("rb") as data:
                    data.seek(first)
                    at = first
                    while at <= last:
                        block = data.read(min(BLOCK, last + 1 - at))
                        if at + len(block) > source.hold_from:
                            source._wait_for_gate()
                        try:
                            self.wfile.write(block)
                        except (BrokenPipeError, ConnectionResetError):
                            return  # the reader moved on (a seek)
                        at += len(block)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._gate.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

