"""`hlsvault serve --workers N` runs N worker processes behind one port, with either server."""

from __future__ import annotations

import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from support import HLSVAULT, Hlsvault, wait_for_http

#: How long the worker processes may take to start.
START_TIMEOUT_S = 30.0


def children(pid: int) -> list[int]:
    """Every descendant process of ``pid``."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            direct = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, direct):
            found += [child, *children(child)]
    return found


def workers_of(pid: int) -> list[int]:
    """The descendants of ``pid`` that import the key server (its worker processes)."""
    found = []
    for child in children(pid):
        try:
            maps = Path(f"/proc/{child}/maps").read_text()
        except OSError:
            continue
        if "/uvloop/" in maps:
            found.append(child)
    return found


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
def test_two_workers_serve_the_master_playlist(
    server: str, hlsvault: Hlsvault, copy_clip: Path
) -> None:
    """With --workers 2 the port is answered (the master playlist of a packaged asset, many
    times over) and two worker processes run the key server."""
    done = hlsvault.package(str(copy_clip), "--asset", "workers", "--ladder", "copy")
    assert done.returncode == 0, done.stderr
    url = hlsvault.url("workers")
    process = subprocess.Popen(
        [*HLSVAULT, "serve", "--port", str(hlsvault.port), "--workers", "2", "--server", server],
        env=hlsvault.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_http(f"{hlsvault.public_url}/healthz", timeout=START_TIMEOUT_S)
        bodies = set()
        for _ in range(20):
            with urllib.request.urlopen(url, timeout=10) as response:
                bodies.add(response.read())
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(workers_of(process.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        workers = workers_of(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert len(bodies) == 1 and next(iter(bodies)).startswith(b"#EXTM3U")
    assert len(workers) == 2, workers


@pytest.mark.parametrize("server", ["granian", "uvicorn"])
def test_a_trusted_proxys_forwarded_address_is_the_client(
    server: str, hlsvault: Hlsvault, copy_clip: Path
) -> None:
    """Behind a proxy on the same host (a trusted address by default), the client address is
    the one X-Forwarded-For names, under either server: a token bound to it is served with
    the header and refused (403) without."""
    done = hlsvault.package(str(copy_clip), "--asset", "proxied", "--ladder", "copy")
    assert done.returncode == 0, done.stderr
    url = hlsvault.url("proxied", "--ip", "203.0.113.7")
    process = subprocess.Popen(
        [*HLSVAULT, "serve", "--port", str(hlsvault.port), "--server", server],
        env=hlsvault.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    statuses = []
    try:
        wait_for_http(f"{hlsvault.public_url}/healthz", timeout=START_TIMEOUT_S)
        for headers in ({"X-Forwarded-For": "203.0.113.7"}, {}):
            request = urllib.request.Request(url, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    statuses.append(response.status)
            except urllib.error.HTTPError as error:
                statuses.append(error.code)
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert statuses == [200, 403]
