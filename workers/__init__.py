"""The dramatiq shell around :mod:`pipeline`: broker, actors, the flow between them, middleware.

Every process calls :func:`install` once with its settings; the ``dramatiq`` command line
imports :mod:`workers.entry`, which does that: ``dramatiq workers.entry --queues segment``.
"""

from .runtime import Runtime, install, installed

__all__ = ["Runtime", "install", "installed"]
