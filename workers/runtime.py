"""The worker process's edge: settings loaded once, logging configured, broker installed.

Imported before any actor is declared (dramatiq binds actors to the global broker).
"""

from __future__ import annotations

import threading

import dramatiq
from dramatiq.brokers.stub import StubBroker
from dramatiq.middleware import Retries

from pipeline.logs import ensure_logging
from pipeline.services import Services, build_services
from pipeline.settings import Settings, load_settings

from .middleware import JobOutcome, LogContext


def build_broker(settings: Settings) -> dramatiq.Broker:
    """Dramatiq's Redis broker when ``REDIS_URL`` is set, else its in-memory broker."""
    broker: dramatiq.Broker
    if settings.redis_url is None:
        broker = StubBroker()
    else:
        from dramatiq.brokers.redis import RedisBroker

        from pipeline.jobs_redis import connect

        # dramatiq's RedisBroker constructor carries no annotations.
        broker = RedisBroker(  # type: ignore[no-untyped-call]
            client=connect(settings.redis_url, decode_responses=False),
            namespace="hlsvault",
            heartbeat_timeout=settings.heartbeat_timeout_ms,
            maintenance_chance=settings.maintenance_chance,
        )
    broker.add_middleware(LogContext())
    # emit_after runs middleware in reverse: placed before Retries, JobOutcome sees the
    # message after Retries has decided whether it failed for good.
    broker.add_middleware(JobOutcome(services), before=Retries)
    return broker


_services: Services | None = None
_services_lock = threading.Lock()


def services() -> Services:
    """The process's stores and job records, opened on first use."""
    global _services
    with _services_lock:
        if _services is None:
            _services = build_services(settings)
        return _services


settings = load_settings()
ensure_logging()
broker = build_broker(settings)
dramatiq.set_broker(broker)
