"""The ``ops`` process: ``python -m dashboard [--host H] [--port P]`` serves the ops app.

Without ``HLSVAULT_OPS_PASSWORD`` it says once what to set and stays up serving only /healthz
and the webhook: ``honcho start`` stops every process when one exits, and one optional process
must not take the fleet down. Settings that cannot be loaded at all exit with status 78
(EX_CONFIG), as every process does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pipeline.errors import ConfigurationError, exit_code

from .auth import DISABLED

#: uvicorn drops an idle keep-alive connection after this long.
KEEP_ALIVE_S = 5


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from pipeline.logs import ensure_logging
    from pipeline.settings import load_settings

    from .app import create_app

    parser = argparse.ArgumentParser(prog="python -m dashboard",
                                     description="Serve the hlsvault ops app.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=None, help="port (default: $OPS_PORT, 8001)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings()
        app = create_app(settings)
    except ConfigurationError as error:
        print(f"hlsvault ops: {error}", file=sys.stderr)
        return exit_code(error)
    if not settings.ops_password:
        print(f"hlsvault ops: {DISABLED}", file=sys.stderr, flush=True)
    ensure_logging()
    uvicorn.run(
        app,
        host=args.host,
        port=args.port if args.port is not None else settings.ops_port,
        access_log=False,
        log_config=None,
        timeout_keep_alive=KEEP_ALIVE_S,
    )
    return 0
