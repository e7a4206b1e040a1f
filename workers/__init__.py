"""The dramatiq shell around :mod:`pipeline`: broker, actors, the flow between them, middleware.

Importing :mod:`workers.actors` configures the broker from the environment, as the ``dramatiq``
command line requires: ``dramatiq workers.actors --queues segment``.
"""
