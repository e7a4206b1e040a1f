"""The deployment's stores and records, opened once from :class:`~pipeline.settings.Settings`."""

from __future__ import annotations

from dataclasses import dataclass

from .catalog import Catalog
from .jobs import JobStore, RecordBackend
from .jobs.file import FileRecordBackend
from .keys import KeyVault
from .settings import Settings
from .statebus import NullStateBus, StateBus
from .storage import Store, open_store


@dataclass(frozen=True)
class Services:
    """What stages need to do their work: passed in, never looked up globally."""

    settings: Settings
    work: Store
    origin: Store
    vault: Store
    keys: KeyVault
    catalog: Catalog
    jobs: JobStore


def build_services(settings: Settings, *, job_backend: RecordBackend | None = None) -> Services:
    """Open the stores named by ``settings``; job records go to Redis or to the data dir."""
    if job_backend is None:
        if settings.redis_url is not None:
            from .jobs.redis import RedisRecordBackend

            job_backend = RedisRecordBackend.from_url(settings.redis_url)
        else:
            job_backend = FileRecordBackend(settings.jobs_dir)
    vault = open_store(settings.vault)
    bus: StateBus = NullStateBus()
    if settings.redis_url is not None:
        from .statebus import RedisStateBus

        bus = RedisStateBus.from_url(settings.redis_url)
    return Services(
        settings=settings,
        work=open_store(settings.work),
        origin=open_store(settings.origin),
        vault=vault,
        keys=KeyVault(vault, settings.master_key),
        catalog=Catalog(vault, bus=bus),
        jobs=JobStore(job_backend),
    )
