"""Running the key server: `hlsvault serve` hands a server one of the app factories below,
which each worker process calls to build its own app from the environment.

- **granian** (HTTP/1.1 and TLS in Rust, the ASGI interface, uvloop), the default: on the
  key route it answers about twice uvicorn's requests per second on one core
  (``docs/benchmarks.md``, bench_keyserver, which compares them in every run).
- **granian-rsgi**: granian's RSGI interface, the viewer routes answered without ASGI
  (:mod:`keyserver.rsgi`), every other route through the same ASGI app.
- **uvicorn** (httptools and uvloop), ``--server uvicorn``.

Both close a keep-alive connection left idle for :data:`KEEP_ALIVE_S`; granian also closes
one that has not sent a whole request head by then (hyper's header read timeout, which bounds
both waits; uvicorn has no such timeout).
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from pipeline import layout
from pipeline.errors import ConfigurationError
from pipeline.settings import Settings

from .ratelimit import per_process_limits

log = structlog.get_logger("hlsvault.keyserver")

#: What the worker processes import and call to build their app (ASGI, RSGI).
APP_FACTORY = "keyserver.serving:app_from_environment"
RSGI_APP_FACTORY = "keyserver.serving:rsgi_app_from_environment"
SERVERS, DEFAULT_SERVER = layout.SERVERS, layout.DEFAULT_SERVER
#: The proxies whose X-Forwarded-For is believed unless FORWARDED_ALLOW_IPS says otherwise
#: (uvicorn's default).
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"
#: An idle keep-alive connection is closed after this long (a player asks again in seconds),
#: and so is one that has not sent a whole request head by then (slow clients, slowloris).
KEEP_ALIVE_S = 5


#: granian's own lines (start, stop, errors) go to the root logger, which
#: :func:`pipeline.logs.configure_logging` set up: JSON lines like every other.
_GRANIAN_LOGGING: dict[str, Any] = {
    "handlers": {},
    "loggers": {"_granian": {"propagate": True}, "granian.access": {"propagate": True}},
}


@dataclass(frozen=True)
class ServeOptions:
    host: str
    port: int
    workers: int = 1
    server: str = DEFAULT_SERVER
    certfile: str | None = None
    keyfile: str | None = None


def app_from_environment() -> Any:
    """The key server of this process's settings (each worker process calls this)."""
    from pipeline.logs import configure_logging
    from pipeline.settings import load_settings

    from .app import create_app
    from .auditlog import JsonLinesSink, LineWriter

    json_lines = not sys.stderr.isatty()
    configure_logging(json=json_lines, level=logging.INFO)
    # JSON lines (what a log shipper reads): the writer renders and writes them in batches;
    # on a terminal, structlog's coloured lines, one by one.
    lines = LineWriter(sink=JsonLinesSink(sys.stderr), autostart=False) if json_lines else (
        LineWriter(autostart=False)
    )
    # The client address behind a trusted proxy, the same way under either server: uvicorn's
    # FORWARDED_ALLOW_IPS rule (README "Behind a proxy"), applied by the app itself.
    trusted = os.environ.get("FORWARDED_ALLOW_IPS", DEFAULT_FORWARDED_ALLOW_IPS)
    app = create_app(load_settings(create=True), lines=lines, forwarded_allow_ips=trusted)
    # What is alive now (modules, settings, the app) lives as long as the process: frozen, it
    # is left out of every later collection, so the full collections that requests' garbage
    # triggers walk only what came after (bench_keyserver_cpu prints both durations).
    gc.collect()
    gc.freeze()
    return app


def rsgi_app_from_environment() -> Any:
    """The same key server for granian's RSGI interface (each worker process calls this)."""
    from .rsgi import RsgiKeyServer

    return RsgiKeyServer(app_from_environment())


def serve(options: ServeOptions, *, settings: Settings | None = None) -> None:
    """Serve until interrupted. With ``settings`` (the parent's), what the workers will do
    with them is checked first: rate limits counted per process are said to multiply."""
    if options.workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    if settings is not None and (warning := per_process_limits(settings, options.workers)):
        log.warning(warning, workers=options.workers)
    if options.server in ("granian", "granian-rsgi"):
        _serve_granian(options)
    elif options.server == "uvicorn":
        _serve_uvicorn(options)
    else:
        raise ConfigurationError(f"unknown server {options.server!r}: use one of {SERVERS}")


def _serve_uvicorn(options: ServeOptions) -> None:
    import uvicorn

    tls: dict[str, Any] = {}
    if options.certfile:
        tls.update(ssl_certfile=options.certfile, ssl_keyfile=options.keyfile)
    uvicorn.run(
        APP_FACTORY, factory=True, host=options.host, port=options.port,
        workers=options.workers, loop="uvloop", http="httptools",
        access_log=False, log_config=None, timeout_keep_alive=KEEP_ALIVE_S,
        proxy_headers=False,  # the app applies them itself (app_from_environment)
        **tls,
    )


def _serve_granian(options: ServeOptions) -> None:
    from granian.constants import HTTPModes, Interfaces, Loops
    from granian.http import HTTP1Settings
    from granian.server import Server

    tls: dict[str, Any] = {}
    if options.certfile and options.keyfile:
        tls.update(ssl_cert=Path(options.certfile), ssl_key=Path(options.keyfile))
    rsgi = options.server == "granian-rsgi"
    Server(
        RSGI_APP_FACTORY if rsgi else APP_FACTORY, factory=True, address=options.host,
        port=options.port, interface=Interfaces.RSGI if rsgi else Interfaces.ASGI,
        workers=options.workers, loop=Loops.uvloop, http=HTTPModes.http1, websockets=False,
        http1_settings=HTTP1Settings(header_read_timeout=KEEP_ALIVE_S * 1000, keep_alive=True),
        log_access=False, log_dictconfig=_GRANIAN_LOGGING, **tls,
    ).serve()
