"""In-memory caches of the vault: the key server stays stateless and reads the vault rarely.

An asset's state (current version, retirements, revocation) is cached for at most
:data:`STATE_TTL_S`. In a fleet, publishers announce each change on the state bus
(:mod:`pipeline.statebus`) and :mod:`keyserver.statesync` makes the view :meth:`~VaultView.forget`
the asset at once; the TTL is the bound when an announcement is lost.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from pipeline.catalog import STATE_CACHE_TTL_S, AssetState, Catalog
from pipeline.keys import KeyVault
from pipeline.playlists import AssetVersion
from pipeline.storage import ObjectNotFound

#: The longest a key server answers from a cached asset state (one place: the catalog).
STATE_TTL_S = STATE_CACHE_TTL_S
#: Version descriptions and content keys never change, so they are kept until evicted.
MAX_VERSIONS = 1024
MAX_KEYS = 65_536


#: :meth:`VaultView.fresh_state`'s answer when the cached state is missing or too old.
STALE = object()


class VaultView:
    """Asset states (briefly cached), version descriptions and content keys (kept)."""

    def __init__(self, catalog: Catalog, keys: KeyVault, *, ttl_s: float = STATE_TTL_S) -> None:
        self.catalog = catalog
        self.keys = keys
        self.ttl_s = ttl_s
        self._states: dict[str, tuple[float, AssetState | None]] = {}
        self._versions: OrderedDict[tuple[str, str], AssetVersion] = OrderedDict()
        self._keys: OrderedDict[tuple[str, str, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        # Bumped by every forget: a vault read that began before it may have read the state
        # from before the change, so its result serves that one request but is not cached.
        self._epoch = 0

    def fresh_state(self, asset: str) -> AssetState | object | None:
        """The cached state while it is fresh, without touching the vault (cheap enough for
        the event loop); :data:`STALE` when :meth:`state` has to read the catalog."""
        cached = self._states.get(asset)
        if cached is not None and time.monotonic() - cached[0] <= self.ttl_s:
            return cached[1]
        return STALE

    def state(self, asset: str) -> AssetState | None:
        now = time.monotonic()
        with self._lock:
            cached = self._states.get(asset)
            epoch = self._epoch
        if cached is not None and now - cached[0] <= self.ttl_s:
            return cached[1]
        state = self.catalog.state(asset)
        with self._lock:
            if epoch == self._epoch:
                self._states[asset] = (now, state)
                if len(self._states) > MAX_VERSIONS * 4:
                    self._states.pop(next(iter(self._states)))
        return state

    def forget(self, asset: str) -> None:
        """Drop what is cached of ``asset``'s state and keys: the next request reads the vault.
        Called when a publish, rekey or revoke of the asset is announced."""
        with self._lock:
            self._epoch += 1
            self._states.pop(asset, None)
            for cached in [k for k in self._keys if k[0] == asset]:
                del self._keys[cached]

    def forget_states(self) -> None:
        """Drop every cached state, as after announcements may have been missed. Keys stay:
        none is served without a fresh state saying it may be, and re-reading them all from
        the vault at once would be a stampede for nothing."""
        with self._lock:
            self._epoch += 1
            self._states.clear()

    def cached_version(self, asset: str, version: str) -> AssetVersion | None:
        """The version's description if it is in memory (cheap enough for the event loop)."""
        with self._lock:
            found = self._versions.get((asset, version))
            if found is not None:
                self._versions.move_to_end((asset, version))
            return found

    def version(self, asset: str, version: str) -> AssetVersion | None:
        found = self.cached_version(asset, version)
        if found is not None:
            return found
        try:
            described = self.catalog.get_version(asset, version)
        except ObjectNotFound:
            return None
        with self._lock:
            self._versions[(asset, version)] = described
            if len(self._versions) > MAX_VERSIONS:
                self._versions.popitem(last=False)
        return described

    def cached_key(self, asset: str, version: str, index: int) -> bytes | None:
        with self._lock:
            return self._keys.get((asset, version, index))

    def forget_keys(self, asset: str, version: str) -> None:
        """Drop a withdrawn version's keys from memory."""
        with self._lock:
            for cached in [k for k in self._keys if k[0] == asset and k[1] == version]:
                del self._keys[cached]

    def key(self, asset: str, version: str, index: int) -> bytes:
        """A content key; :class:`~pipeline.storage.ObjectNotFound` when there is none.
        Callers check the asset's state first: a cached key outlives nothing it should not."""
        found = self.cached_key(asset, version, index)
        if found is not None:
            return found
        with self._lock:
            epoch = self._epoch
        key = self.keys.get(asset, version, index)
        with self._lock:
            if epoch == self._epoch:  # else the asset may have been shredded meanwhile
                self._keys[(asset, version, index)] = key
                if len(self._keys) > MAX_KEYS:
                    self._keys.popitem(last=False)
        return key
