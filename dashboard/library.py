"""What the Assets page reads: every asset's state and versions from the catalog, key requests
per asset from Redis, and whether the key server signs CDN access (its /healthz says).

CDN signing is a property of the key server's settings, not of a version: the ops process does
not hold the CloudFront private key, so it asks the key server (bounded by a timeout, the answer
cached briefly) instead of guessing from its own settings.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass

from pipeline import keystats
from pipeline.catalog import AssetState
from pipeline.playlists import AssetVersion
from pipeline.services import Services
from pipeline.storage import ObjectNotFound

#: The Assets page lists at most this many assets.
MAX_LISTED_ASSETS = 500
#: Asking the key server whether it signs: never holds a page longer than this...
HEALTHZ_TIMEOUT_S = 1.0
#: ...and is asked again at most this often.
HEALTHZ_CACHE_S = 30.0


@dataclass(frozen=True)
class VersionRow:
    version: str
    created_at: float
    renditions: tuple[str, ...]
    download: str | None  # the download's rendition
    #: None for the current version; for a retired one, when its keys are (were) shredded
    shred_at: float | None


@dataclass(frozen=True)
class AssetRow:
    asset: str
    state: AssetState
    current: VersionRow | None
    retired: tuple[VersionRow, ...]
    requests: dict[str, int] | None  # key requests by outcome, last hour; None without Redis

    @property
    def status(self) -> str:
        if self.state.revoked:
            return "revoked"
        return "published" if self.current is not None else "unpublished"


def _row(described: AssetVersion, shred_at: float | None) -> VersionRow:
    return VersionRow(
        version=described.version,
        created_at=described.created_at,
        renditions=tuple(r.name for r in described.renditions),
        download=described.download.rendition if described.download else None,
        shred_at=shred_at,
    )


class LibraryReader:
    """Reads the catalog (and Redis, when there is one) for the Assets page."""

    def __init__(self, services: Services, *, redis_client: object | None,
                 key_server_url: str) -> None:
        self.catalog = services.catalog
        self.redis = redis_client
        self.key_server_url = key_server_url
        self._signing: tuple[float, str] | None = None
        self._lock = threading.Lock()

    def _version(self, asset: str, version: str, shred_at: float | None) -> VersionRow | None:
        try:
            return _row(self.catalog.get_version(asset, version), shred_at)
        except ObjectNotFound:
            return None

    def asset(self, asset: str, *, requests: dict[str, int] | None = None) -> AssetRow | None:
        state = self.catalog.state(asset)
        if state is None:
            return None
        current = self._version(asset, state.version, None) if state.version else None
        retired = tuple(
            row for version, deadline in sorted(state.retired.items(), key=lambda i: -i[1])
            if (row := self._version(asset, version, deadline)) is not None
        )
        if requests is None and self.redis is not None:
            requests = keystats.last_hour(self.redis, [asset]).get(asset, {})
        return AssetRow(asset, state, current, retired, requests)

    def assets(self) -> list[AssetRow]:
        names = self.catalog.assets(limit=MAX_LISTED_ASSETS)
        counts = keystats.last_hour(self.redis, names) if self.redis is not None else {}
        rows = [self.asset(name, requests=counts.get(name, {}) if counts else None)
                for name in names]
        return [row for row in rows if row is not None]

    def cdn_signing(self) -> str:
        """``on``, ``off``, or ``unknown (…)`` when the key server does not answer."""
        now = time.monotonic()
        with self._lock:
            if self._signing is not None and now - self._signing[0] < HEALTHZ_CACHE_S:
                return self._signing[1]
        try:
            url = f"{self.key_server_url}/healthz"
            with urllib.request.urlopen(url, timeout=HEALTHZ_TIMEOUT_S) as response:  # noqa: S310 - our own key server's configured URL
                answer = str(json.loads(response.read()).get("cdn_signing", "unknown"))
        except (OSError, ValueError):
            answer = "unknown (the key server did not answer)"
        with self._lock:
            self._signing = (now, answer)
        return answer
