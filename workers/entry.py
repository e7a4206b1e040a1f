"""The ``dramatiq`` command line's entry module: ``dramatiq workers.entry --queues segment``.

It is a process's edge, so it is the one module here that loads settings on import: dramatiq
imports it in every worker process it forks, then looks the broker up. A misconfigured
deployment gets one line that says what to set, not a traceback per process.
"""

from __future__ import annotations

import os
import sys

from pipeline.errors import ConfigurationError
from pipeline.logs import configure_logging
from pipeline.settings import load_settings

from .runtime import install

#: The exit status dramatiq's parent reports for a worker that could not start (sysexits
#: EX_CONFIG).
EXIT_CONFIG = 78

configure_logging()
try:
    runtime = install(load_settings())
except ConfigurationError as error:
    print(f"hlsvault worker: {error}", file=sys.stderr, flush=True)
    # os._exit, not sys.exit: dramatiq turns an exception raised while importing the entry
    # module into a traceback per worker process.
    os._exit(EXIT_CONFIG)

__all__ = ["runtime"]
