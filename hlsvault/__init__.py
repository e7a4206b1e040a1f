"""hlsvault: private HLS. Encrypted segments on any CDN, keys only for authorised viewers."""

import sys

__version__ = "0.1.0"

# structlog's dev module imports rich's traceback and pretty-printer at import time whenever
# rich is installed: ~70 ms of every `hlsvault` command, for features hlsvault does not use
# (its log lines format exceptions with format_exc_info). Importing structlog while rich is
# hidden keeps that out; rich itself is imported later, and only to draw progress bars.
if "structlog" not in sys.modules and "rich" not in sys.modules:
    sys.modules["rich"] = None  # type: ignore[assignment]
    try:
        import structlog  # noqa: F401
    finally:
        del sys.modules["rich"]
