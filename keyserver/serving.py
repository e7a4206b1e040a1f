"""Running the key server: `hlsvault serve` hands one of two ASGI servers the app factory
below, which each worker process calls to build its own app from the environment.

- **uvicorn** (httptools and uvloop), the default: one process per worker.
- **granian** (Rust HTTP/1.1 and TLS, ASGI interface, uvloop), when installed
  (``pip install 'hlsvault[granian]'``).

``docs/benchmarks.md`` (bench_keyserver) compares the two, one worker each, and says why the
default is what it is.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigurationError

#: What the worker processes import and call to build their app.
APP_FACTORY = "keyserver.serving:app_from_environment"
SERVERS = ("uvicorn", "granian")
DEFAULT_SERVER = "uvicorn"
#: An idle keep-alive connection is closed after this long (a player asks again in seconds).
KEEP_ALIVE_S = 5


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
    lines = LineWriter(sink=JsonLinesSink(sys.stderr)) if json_lines else LineWriter()
    return create_app(load_settings(create=True), lines=lines)


def serve(options: ServeOptions) -> None:
    """Serve until interrupted."""
    if options.workers < 1:
        raise ConfigurationError("--workers must be at least 1")
    if options.server == "granian":
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
        access_log=False, log_config=None, timeout_keep_alive=KEEP_ALIVE_S, **tls,
    )


def _serve_granian(options: ServeOptions) -> None:
    try:
        from granian.constants import HTTPModes, Interfaces, Loops
        from granian.server import Server
    except ImportError:
        raise ConfigurationError(
            "--server granian needs granian: pip install 'hlsvault[granian]'"
        ) from None
    tls: dict[str, Any] = {}
    if options.certfile and options.keyfile:
        tls.update(ssl_cert=Path(options.certfile), ssl_key=Path(options.keyfile))
    Server(
        APP_FACTORY, factory=True, address=options.host, port=options.port,
        interface=Interfaces.ASGI, workers=options.workers, loop=Loops.uvloop,
        http=HTTPModes.http1, log_access=False, **tls,
    ).serve()
