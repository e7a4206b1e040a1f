"""Benchmark: the CPU one viewer request costs the key server's own Python, in-process.

The app is built by ``keyserver.create_app`` over the 2 s clip that ``bench_keyserver.py``
packages (``bench/.work/ks-data``, rebuilt), with that benchmark's settings (rate limits off)
and the log line writer of `hlsvault serve` without its thread: every access and audit line
is rendered as a JSON line (``JsonLinesSink``, to /dev/null) inside the request, so its cost
is counted where the server's writer thread would spend it. Each route (key, variant, master)
is called ``--requests`` times per round:

- **asgi**: the ASGI app called with a scope dict, as granian's or uvicorn's ASGI interface
  would (one ``http.response.start`` and one ``http.response.body`` to a no-op send);
- **rsgi**: :class:`keyserver.rsgi.RsgiKeyServer` called with a stand-in of granian's RSGI
  scope and protocol objects (the same attributes; ``response_bytes`` does nothing).

Neither counts the HTTP server's own work (parsing, the socket, granian's scope building):
``bench_keyserver.py`` measures that, end to end. Printed: the median µs of CPU (process
time) per request of each route and interface over the rounds, and the spread; with
``--profile ROUTE``, cProfile's top functions for that route under ASGI. Last, how long a
full garbage collection takes over the process's objects, and once those alive are frozen
(``gc.freeze()``, as `hlsvault serve` does after building the app): what a request that
triggers one waits (p99).

    python bench/bench_keyserver_cpu.py [--requests N] [--rounds N] [--profile key]
                                        [--interfaces asgi,rsgi]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench_keyserver import ASSET, SCRATCH, hlsvault_env, package_clip
from machine import describe

from keyserver import create_app
from keyserver.auditlog import JsonLinesSink, LineWriter
from keyserver.testing import get_scope, no_body
from pipeline.catalog import Catalog
from pipeline.logs import configure_logging
from pipeline.settings import load_settings
from pipeline.storage import LocalStore
from pipeline.tokens import mint_token

DEFAULT_REQUESTS = 20_000
DEFAULT_ROUNDS = 5
ROUTES = ("key", "variant", "master")
CLIENT = ("127.0.0.1", 50000)


class RsgiHeaders:
    """What granian's RSGIHeaders offers the app: get, get_all, items, ``in``."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str, default: Any = None) -> Any:
        return next((value for key, value in self.pairs if key == name), default)

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key == name]

    def items(self) -> list[tuple[str, str]]:
        return list(self.pairs)

    def __contains__(self, name: str) -> bool:
        return any(key == name for key, _ in self.pairs)


class RsgiScope:
    proto = "http"
    http_version = "1.1"
    rsgi_version = "1.5"
    scheme = "http"
    method = "GET"
    server = "127.0.0.1:8000"
    client = f"{CLIENT[0]}:{CLIENT[1]}"

    def __init__(self, path: str, query: str, headers: list[tuple[str, str]]) -> None:
        self.path = path
        self.query_string = query
        self.headers = RsgiHeaders(headers)


class RsgiProto:
    def __init__(self) -> None:
        self.status = 0

    def response_bytes(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status


def asgi_call(app: Any, path: str, query: str) -> Callable[[], Awaitable[int]]:
    scope = get_scope(path, query=query, client_ip=CLIENT[0], headers=[("user-agent", "wrk")])
    status = 0

    async def send(message: Any) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    async def call() -> int:
        # A fresh scope per request, as a server builds one (the app may write into it).
        await app(dict(scope), no_body, send)
        return status

    return call


def rsgi_call(app: Any, path: str, query: str) -> Callable[[], Awaitable[int]]:
    headers = [("host", "127.0.0.1:8000"), ("user-agent", "wrk")]

    async def call() -> int:
        proto = RsgiProto()
        await app.__rsgi__(RsgiScope(path, query, headers), proto)
        return proto.status

    return call


def full_collection_ms(repeat: int = 5) -> float:
    """The median ms of ``gc.collect()``: what one request waits when it triggers one."""
    spent = []
    for _ in range(repeat):
        started = time.perf_counter()
        gc.collect()
        spent.append((time.perf_counter() - started) * 1000)
    return statistics.median(spent)


async def cpu_us(call: Callable[[], Awaitable[int]], requests: int) -> float:
    """µs of process CPU per request over ``requests`` calls; any status but 200 fails."""
    started = time.process_time()
    for _ in range(requests):
        status = await call()
        if status != 200:
            raise SystemExit(f"bench_keyserver_cpu: FAILED: a request answered {status}")
    return (time.process_time() - started) * 1e6 / requests


async def run(args: argparse.Namespace) -> None:
    env = hlsvault_env(8000)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    package_clip(env)
    settings = load_settings(env)
    vault = LocalStore(Path(settings.vault))
    catalog = Catalog(vault)
    version = catalog.current_version(ASSET)
    assert version is not None, "the packaged clip was not published"
    rendition = catalog.get_version(ASSET, version).renditions[0].name
    devnull = open("/dev/null", "w")  # noqa: SIM115 - open for the whole run
    lines = LineWriter(sink=JsonLinesSink(devnull), autostart=False)
    app = create_app(settings, vault=vault, lines=lines,
                     forwarded_allow_ips="127.0.0.1,::1")
    query = f"token={mint_token(settings.token_secret, ASSET, 3600)}"
    paths = {"key": f"/v1/keys/{ASSET}/{version}/0",
             "variant": f"/v1/assets/{ASSET}/{rendition}.m3u8",
             "master": f"/v1/assets/{ASSET}/master.m3u8"}
    calls = {(route, "asgi"): asgi_call(app, paths[route], query) for route in ROUTES}
    if "rsgi" in args.interfaces:
        from keyserver.rsgi import RsgiKeyServer  # not in the commits before it existed

        rsgi = RsgiKeyServer(app)
        calls.update({(route, "rsgi"): rsgi_call(rsgi, paths[route], query)
                      for route in ROUTES})
    for call in calls.values():
        await cpu_us(call, 500)  # warm-up: caches filled, code paths loaded
    results: dict[tuple[str, str], list[float]] = {name: [] for name in calls}
    for _ in range(args.rounds):
        for name, call in calls.items():
            results[name].append(await cpu_us(call, args.requests))
    print(describe())
    print(f"{args.requests} requests per route and interface per round, {args.rounds} rounds; "
          "audit and access lines rendered in the request (JsonLinesSink to /dev/null)")
    interfaces = [name for name in ("asgi", "rsgi") if name in args.interfaces]
    print(f"{'route':<9}" + "".join(f"{name + ' us':>9}{'spread':>15}" for name in interfaces))
    for route in ROUTES:
        cells = ""
        for interface in interfaces:
            spent = results[(route, interface)]
            cells += (f"{statistics.median(spent):>9.1f}"
                      f"{f'{min(spent):.1f}–{max(spent):.1f}':>15}")
        print(f"{route:<9}{cells}")
    for route in ROUTES:
        figures = ", ".join(f"{name} {statistics.median(results[(route, name)]):.1f} µs"
                            for name in interfaces)
        print(f"RESULT keyserver cpu {route}: {figures} per request (in-process, the app's "
              "own Python)")
    unfrozen = full_collection_ms()
    gc.collect()
    gc.freeze()  # what `hlsvault serve` does once the app is built (keyserver.serving)
    frozen = full_collection_ms()
    gc.unfreeze()
    print(f"RESULT keyserver gc: a full collection takes {unfrozen:.2f} ms over this process's "
          f"objects, {frozen:.3f} ms once those alive at startup are frozen")
    if args.profile:
        profile = cProfile.Profile()
        call = calls[(args.profile, "asgi")]
        profile.enable()
        await cpu_us(call, args.requests)
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(25)
        print(out.getvalue())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=DEFAULT_REQUESTS)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--profile", choices=ROUTES, help="cProfile one route under ASGI")
    parser.add_argument("--interfaces", default="asgi,rsgi",
                        help="asgi, rsgi or both, comma-separated (asgi alone for commits "
                             "before keyserver/rsgi.py)")
    args = parser.parse_args(argv)
    configure_logging(json=True)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
