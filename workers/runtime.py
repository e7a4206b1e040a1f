"""The one wiring call of every process that runs or enqueues jobs: :func:`install`.

    settings ─► install(settings) ─► Runtime(settings, broker, services) ─► runtime.enqueue(spec)

``install`` builds the broker (Redis when ``REDIS_URL`` is set, else dramatiq's in-memory one),
opens the stores and job records once, declares the actors on that broker and makes it
dramatiq's global broker (the ``dramatiq`` command line looks it up there). It is idempotent:
a second call with the same settings returns the same runtime, with other settings it refuses.
Importing this module does nothing. The Procfile's entry module is :mod:`workers.entry`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries

from pipeline import layout
from pipeline.errors import ConfigurationError
from pipeline.jobs import JobSpec
from pipeline.services import Services, build_services
from pipeline.settings import Settings


@dataclass(frozen=True)
class Runtime:
    """What a stage needs to run and to say what runs next."""

    settings: Settings
    broker: dramatiq.Broker
    services: Services

    def send(self, actor_name: str, *args: Any, delay_ms: int | None = None) -> None:
        """Enqueue a message for ``actor_name`` on this runtime's broker."""
        actor = self.broker.get_actor(actor_name)
        if delay_ms is None:
            actor.send(*args)
        else:
            actor.send_with_options(args=args, delay=delay_ms)

    def enqueue(self, spec: JobSpec) -> None:
        """Record a new job and enqueue its first stage."""
        from . import flow

        flow.start(self, spec)


def build_broker(settings: Settings) -> dramatiq.Broker:
    """The Redis broker whose idle consumers wake when a message arrives
    (:mod:`workers.broker`) when ``REDIS_URL`` is set, else dramatiq's in-memory broker."""
    if settings.redis_url is None:
        return StubBroker()
    from pipeline.redisconn import connect

    from .broker import WakingRedisBroker

    # dramatiq's RedisBroker constructor carries no annotations.
    broker: dramatiq.Broker = WakingRedisBroker(  # type: ignore[no-untyped-call]
        client=connect(settings.redis_url, decode_responses=False),
        namespace=layout.BROKER_NAMESPACE,
        heartbeat_timeout=settings.heartbeat_timeout_ms,
        maintenance_chance=settings.maintenance_chance,
    )
    return broker


def build_runtime(
    settings: Settings, *, services: Services | None = None, broker: dramatiq.Broker | None = None
) -> Runtime:
    """A runtime of its own: a new broker (``broker``, else :func:`build_broker`'s) with the
    actors declared on it. Touches no global state, so tests may build several; processes call
    :func:`install`."""
    from . import actors
    from .middleware import JobOutcome, LogContext

    broker = broker if broker is not None else build_broker(settings)
    runtime = Runtime(settings, broker, services or build_services(settings))
    broker.add_middleware(LogContext())
    # emit_after runs middleware in reverse: placed before Retries, JobOutcome sees the
    # message after Retries has decided whether it failed for good.
    broker.add_middleware(JobOutcome(runtime), before=Retries)
    actors.declare(runtime)
    return runtime


_installed: Runtime | None = None
_lock = threading.Lock()


def install(settings: Settings, *, services: Services | None = None) -> Runtime:
    """The process's runtime for ``settings``, built on first call (see the module docstring)."""
    global _installed
    with _lock:
        if _installed is not None:
            if _installed.settings != settings:
                raise ConfigurationError(
                    "hlsvault is already installed in this process with other settings; "
                    "load the settings once at the process's edge and pass them down"
                )
            return _installed
        runtime = build_runtime(settings, services=services)
        dramatiq.set_broker(runtime.broker)
        _installed = runtime
        return runtime


def installed() -> Runtime:
    """The runtime :func:`install` built; refuses loudly when nothing was installed."""
    if _installed is None:
        raise ConfigurationError(
            "hlsvault's workers are not installed in this process: call "
            "workers.install(load_settings()) at its edge (the Procfile runs workers.entry)"
        )
    return _installed
