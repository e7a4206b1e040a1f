"""The asset catalog: which versions of an asset exist, and which one players get.

It lives in the vault, never on the CDN origin. A version's description is written once and
never changed; the ``current`` pointer is the only thing that moves, and it moves last.
"""

from __future__ import annotations

import json
import time

from .keys import check_asset_id, check_version
from .playlists import AssetVersion
from .storage import ObjectNotFound, Store


class Catalog:
    """Asset versions and current-version pointers in the vault store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _version_key(asset: str, version: str) -> str:
        return f"catalog/{check_asset_id(asset)}/versions/{check_version(version)}.json"

    @staticmethod
    def _current_key(asset: str) -> str:
        return f"catalog/{check_asset_id(asset)}/current.json"

    def put_version(self, described: AssetVersion) -> None:
        """Record a version's description (idempotent: a rerun writes the same document)."""
        body = json.dumps(described.to_dict(), sort_keys=True).encode()
        self.store.put_bytes(self._version_key(described.asset, described.version), body)

    def get_version(self, asset: str, version: str) -> AssetVersion:
        """A recorded version; :class:`~pipeline.storage.ObjectNotFound` when unknown."""
        data = json.loads(self.store.get_bytes(self._version_key(asset, version)))
        return AssetVersion.from_dict(data)

    def publish(self, asset: str, version: str, *, job_id: str) -> None:
        """Make ``version`` the one players get. Written in one atomic put: a reader sees the
        old pointer or the new one, each naming a version that is complete."""
        pointer = {"version": check_version(version), "job_id": job_id, "published_at": time.time()}
        self.store.put_bytes(self._current_key(asset), json.dumps(pointer).encode())

    def current_version(self, asset: str) -> str | None:
        """The published version of ``asset``, or None when it has never been published."""
        try:
            pointer = json.loads(self.store.get_bytes(self._current_key(asset)))
        except ObjectNotFound:
            return None
        version: str = pointer["version"]
        return version

    def current(self, asset: str) -> AssetVersion | None:
        version = self.current_version(asset)
        return None if version is None else self.get_version(asset, version)
