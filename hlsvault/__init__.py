"""hlsvault: private HLS. Encrypted segments on any CDN, keys only for authorised viewers."""

import sys

__version__ = "0.1.0"


def import_structlog() -> None:
    """Import structlog with rich hidden: structlog's dev module imports rich's traceback and
    pretty-printer at import time whenever rich is installed, ~70 ms of every `hlsvault`
    command for features hlsvault does not use (its log lines format exceptions with
    format_exc_info). rich itself is imported later, and only to draw progress bars. The CLI
    calls this before anything imports structlog, once its head start (if any) is running."""
    if "structlog" not in sys.modules and "rich" not in sys.modules:
        sys.modules["rich"] = None  # type: ignore[assignment]
        try:
            import structlog  # noqa: F401
        finally:
            del sys.modules["rich"]
