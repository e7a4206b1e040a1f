"""In-memory caches of the catalog: the key server stays stateless and reads the vault rarely."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from pipeline.catalog import Catalog
from pipeline.playlists import AssetVersion
from pipeline.storage import ObjectNotFound

#: How stale a current-version pointer may be: a newly published version reaches viewers
#: within this many seconds, and the vault sees at most one read per asset per period.
CURRENT_TTL_S = 2.0
#: Version descriptions never change, so they are kept until evicted by this bound.
MAX_VERSIONS = 1024


class VersionCache:
    """The current version of each asset, as the catalog says, cached briefly."""

    def __init__(self, catalog: Catalog, *, ttl_s: float = CURRENT_TTL_S) -> None:
        self.catalog = catalog
        self.ttl_s = ttl_s
        self._pointers: dict[str, tuple[float, str | None]] = {}
        self._versions: OrderedDict[tuple[str, str], AssetVersion] = OrderedDict()
        self._lock = threading.Lock()

    def current(self, asset: str) -> AssetVersion | None:
        now = time.monotonic()
        with self._lock:
            cached = self._pointers.get(asset)
        if cached is None or now - cached[0] > self.ttl_s:
            version = self.catalog.current_version(asset)
            with self._lock:
                self._pointers[asset] = (now, version)
                while len(self._pointers) > MAX_VERSIONS * 4:
                    self._pointers.pop(next(iter(self._pointers)))
        else:
            version = cached[1]
        return None if version is None else self.version(asset, version)

    def version(self, asset: str, version: str) -> AssetVersion | None:
        with self._lock:
            found = self._versions.get((asset, version))
            if found is not None:
                self._versions.move_to_end((asset, version))
                return found
        try:
            described = self.catalog.get_version(asset, version)
        except ObjectNotFound:
            return None
        with self._lock:
            self._versions[(asset, version)] = described
            while len(self._versions) > MAX_VERSIONS:
                self._versions.popitem(last=False)
        return described
