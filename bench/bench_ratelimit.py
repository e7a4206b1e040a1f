"""Benchmark: what a flood of garbage tokens does to a real viewer's key request.

The key server's app is built in-process by ``keyserver.create_app`` with the in-memory rate
limiter (one key server, no Redis) over the 2 s clip that ``bench_keyserver.py`` packages (its
data dir, ``bench/.work/ks-data``, is rebuilt). Requests are plain ASGI calls
(``keyserver.testing.get``), with no HTTP stack in between, so the figures are the app's own
cost per request:

1. a viewer's key request (genuine HS256 token in the query) with an empty limiter;
2. ``--garbage`` key requests (default 100,000), each with a distinct garbage token from a
   distinct client address, as a flood from many addresses would be;
3. the viewer's key request again.

Both limits are on but high (so every request is counted and none refused). Printed: the
median µs per request of 1 and 3 and their ratio, the µs per request of the first and last
thousand garbage requests, and how many buckets the limiter holds after the flood. Log lines
below WARNING are dropped, so the figures are the limiter's and the app's, not the log's.

    python bench/bench_ratelimit.py [--garbage N] [--samples N]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import secrets
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench_keyserver import ASSET, SCRATCH, hlsvault_env, package_clip
from machine import describe

from keyserver import create_app
from keyserver.ratelimit import MemoryRateLimiter
from keyserver.testing import get
from pipeline.catalog import Catalog
from pipeline.logs import configure_logging
from pipeline.settings import load_settings
from pipeline.storage import LocalStore
from pipeline.tokens import mint_token

DEFAULT_GARBAGE = 100_000
DEFAULT_SAMPLES = 2000
#: Counted on every request and never reached: the bench measures counting, not refusing.
HIGH_LIMIT = "1000000000"
VIEWER_IP = "198.51.100.20"


def garbage_address(i: int) -> str:
    return f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"


async def timed(app: Any, requests: Sequence[tuple[str, str, str]], expect: int) -> list[float]:
    """µs per request, in order; any other status than ``expect`` fails the run."""
    spent = []
    for path, query, ip in requests:
        started = time.perf_counter()
        status = (await get(app, path, query=query, client_ip=ip)).status
        spent.append((time.perf_counter() - started) * 1e6)
        if status != expect:
            raise SystemExit(f"bench_ratelimit: FAILED: {path} answered {status}, not {expect}")
    return spent


async def run(garbage: int, samples: int) -> None:
    env = {**hlsvault_env(8000), "HLSVAULT_RATE_LIMIT_TOKEN": HIGH_LIMIT,
           "HLSVAULT_RATE_LIMIT_IP": HIGH_LIMIT}
    SCRATCH.mkdir(parents=True, exist_ok=True)
    package_clip(env)
    settings = load_settings(env)
    vault = LocalStore(Path(settings.vault))
    version = Catalog(vault).current_version(ASSET)
    assert version is not None, "the packaged clip was not published"
    limiter = MemoryRateLimiter()
    app = create_app(settings, vault=vault, limiter=limiter)
    token = mint_token(settings.token_secret, ASSET, 3600)
    viewer = [(f"/v1/keys/{ASSET}/{version}/0", f"token={token}", VIEWER_IP)] * samples
    flood = [
        (f"/v1/keys/{ASSET}/{version}/0", f"token=eyJ{secrets.token_urlsafe(24)}.x.y",
         garbage_address(i))
        for i in range(garbage)
    ]
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    await timed(app, viewer[:200], 200)  # warm-up: caches filled, code paths loaded
    empty = statistics.median(await timed(app, viewer, 200))
    spent = await timed(app, flood, 401)
    full = statistics.median(await timed(app, viewer, 200))

    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(describe())
    rows = [
        (f"viewer key request, empty limiter (median of {samples})", f"{empty:.1f} µs"),
        ("garbage requests, first 1000 (median)", f"{statistics.median(spent[:1000]):.1f} µs"),
        ("garbage requests, last 1000 (median)", f"{statistics.median(spent[-1000:]):.1f} µs"),
        (f"viewer key request, after {garbage} garbage (median)", f"{full:.1f} µs"),
        ("ratio after / empty", f"{full / empty:.2f}"),
        ("buckets the limiter holds after the flood", f"{len(limiter)}"),
        ("peak RSS growth during the run", f"{(rss_after - rss_before) / 1024:.1f} MiB"),
    ]
    for label, value in rows:
        print(f"{label:<56} {value:>12}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--garbage", type=int, default=DEFAULT_GARBAGE)
    parser.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    args = parser.parse_args(argv)
    configure_logging(json=True, level=30)  # WARNING: info lines (audit, access) dropped
    asyncio.run(run(args.garbage, args.samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
