"""What `hlsvault serve` tells its operator and what it bounds: rate limits that multiply with
--workers when nothing shares their count, and the connections granian closes for idling or
for sending a request head too slowly."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from keyserver.ratelimit import per_process_limits
from keyserver.serving import KEEP_ALIVE_S
from pipeline.settings import load_settings

from support import HLSVAULT, Hlsvault, free_port, serving, wait_for_http

#: How long the worker processes may take to start.
START_TIMEOUT_S = 30.0
#: What the warning says, in part.
WARNING = "rate limits are counted per worker process without Redis"


class TestPerProcessLimits:
    def test_several_workers_without_redis_are_warned_of(self, hlsvault: Hlsvault) -> None:
        settings = load_settings(hlsvault.env)
        warning = per_process_limits(settings, 3)
        assert warning is not None
        assert WARNING in warning and "up to 3 times" in warning and "REDIS_URL" in warning

    def test_one_worker_redis_or_no_limits_is_not(self, hlsvault: Hlsvault) -> None:
        settings = load_settings(hlsvault.env)
        assert per_process_limits(settings, 1) is None
        shared = dataclasses.replace(settings, redis_url="redis://127.0.0.1:6379/0")
        assert per_process_limits(shared, 4) is None
        unlimited = load_settings({**hlsvault.env, "HLSVAULT_RATE_LIMIT_TOKEN": "0",
                                   "HLSVAULT_RATE_LIMIT_IP": "0"})
        assert per_process_limits(unlimited, 4) is None

    def test_serve_prints_the_warning_before_listening(
        self, hlsvault: Hlsvault, tmp_path: Path
    ) -> None:
        """`hlsvault serve --workers 2` in embedded mode says so on stderr, and serves."""
        log = tmp_path / "serve.log"
        with log.open("w") as output:
            # uvicorn: granian's supervisor sometimes leaves a worker running after SIGTERM
            # (main's code too), and the warning comes before either server starts.
            process = subprocess.Popen(
                [*HLSVAULT, "serve", "--port", str(hlsvault.port), "--workers", "2",
                 "--server", "uvicorn"],
                env=hlsvault.env, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                wait_for_http(f"{hlsvault.public_url}/healthz", timeout=START_TIMEOUT_S)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)  # the workers too
                    process.wait(timeout=10)
        assert WARNING in log.read_text()


@pytest.mark.slow
@pytest.mark.parametrize("server", ["granian", "granian-rsgi"])
def test_idle_and_slow_connections_are_closed(
    server: str, hlsvault: Hlsvault, tmp_path: Path
) -> None:
    """A kept-alive connection left idle, and one that sends half a request head and stops,
    are both closed by the server after KEEP_ALIVE_S (not held for ever)."""
    port = free_port()
    with serving(hlsvault.env, port, tmp_path / "serve.log", "--server", server):
        idle = socket.create_connection(("127.0.0.1", port), timeout=KEEP_ALIVE_S * 3)
        idle.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        assert idle.recv(65536).startswith(b"HTTP/1.1 200")
        slow = socket.create_connection(("127.0.0.1", port), timeout=KEEP_ALIVE_S * 3)
        slow.sendall(b"GET /healthz HTTP/1.1\r\nhos")
        started = time.monotonic()
        closed = [connection.recv(65536) for connection in (idle, slow)]
        waited = time.monotonic() - started
        idle.close()
        slow.close()
    assert closed[0] == b""
    assert not closed[1] or closed[1].startswith(b"HTTP/1.1 408")
    assert waited < KEEP_ALIVE_S + 2
