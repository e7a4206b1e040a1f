"""The asset catalog: which versions of an asset exist, and which one players get.

It lives in the vault, never on the CDN origin. A version's description is written once and
never changed. Per asset, one small state document says which version is current, whether the
asset was revoked, and which older versions are retired (their keys shredded after a grace
period); it is replaced in one atomic write, and a publish moves it last.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .keys import check_asset_id, check_version
from .playlists import AssetVersion
from .storage import ObjectNotFound, Store


@dataclass(frozen=True)
class AssetState:
    """What the key server needs to know about an asset besides its version descriptions."""

    version: str | None = None
    job_id: str | None = None
    published_at: float | None = None
    revoked_at: float | None = None
    #: version -> when its keys stop being served (and are deleted)
    retired: dict[str, float] = field(default_factory=dict)

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None

    def key_withdrawn(self, version: str, *, now: float | None = None) -> bool:
        """Whether keys of ``version`` must no longer be served."""
        if self.revoked:
            return True
        deadline = self.retired.get(version)
        return deadline is not None and (time.time() if now is None else now) >= deadline

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "job_id": self.job_id,
            "published_at": self.published_at,
            "revoked_at": self.revoked_at,
            "retired": self.retired,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AssetState:
        return cls(
            version=data.get("version"),
            job_id=data.get("job_id"),
            published_at=data.get("published_at"),
            revoked_at=data.get("revoked_at"),
            retired={str(k): float(v) for k, v in (data.get("retired") or {}).items()},
        )


class Catalog:
    """Asset versions and per-asset state documents in the vault store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @staticmethod
    def _version_key(asset: str, version: str) -> str:
        return f"catalog/{check_asset_id(asset)}/versions/{check_version(version)}.json"

    @staticmethod
    def _state_key(asset: str) -> str:
        return f"catalog/{check_asset_id(asset)}/current.json"

    def put_version(self, described: AssetVersion) -> None:
        """Record a version's description (idempotent: a rerun writes the same document)."""
        body = json.dumps(described.to_dict(), sort_keys=True).encode()
        self.store.put_bytes(self._version_key(described.asset, described.version), body)

    def get_version(self, asset: str, version: str) -> AssetVersion:
        """A recorded version; :class:`~pipeline.storage.ObjectNotFound` when unknown."""
        data = json.loads(self.store.get_bytes(self._version_key(asset, version)))
        return AssetVersion.from_dict(data)

    def versions(self, asset: str) -> list[str]:
        prefix = f"catalog/{check_asset_id(asset)}/versions"
        return [key.rsplit("/", 1)[-1].removesuffix(".json") for key in self.store.list(prefix)]

    def state(self, asset: str) -> AssetState | None:
        """The asset's state, or None when it was never published."""
        try:
            return AssetState.from_dict(json.loads(self.store.get_bytes(self._state_key(asset))))
        except ObjectNotFound:
            return None

    def _write_state(self, asset: str, state: AssetState) -> None:
        self.store.put_bytes(self._state_key(asset), json.dumps(state.to_dict()).encode())

    def publish(self, asset: str, version: str, *, job_id: str) -> None:
        """Make ``version`` the one players get, in one atomic write: a reader sees the old
        state or the new one, each naming a complete version. Publishing lifts a revocation."""
        state = self.state(asset) or AssetState()
        retired = {v: t for v, t in state.retired.items() if v != version}
        self._write_state(
            asset,
            replace(
                state,
                version=check_version(version),
                job_id=job_id,
                published_at=time.time(),
                revoked_at=None,
                retired=retired,
            ),
        )

    def retire(self, asset: str, version: str, *, delete_after: float) -> None:
        """Schedule ``version``'s keys to stop being served (and be shredded) at a time."""
        state = self.state(asset) or AssetState()
        retired = {**state.retired, check_version(version): delete_after}
        self._write_state(asset, replace(state, retired=retired))

    def revoke(self, asset: str) -> None:
        """Mark the asset revoked: the key server answers 410 Gone for it from now on."""
        state = self.state(asset) or AssetState()
        self._write_state(asset, replace(state, revoked_at=time.time()))

    def current_version(self, asset: str) -> str | None:
        """The published version of ``asset``, or None (never published, or revoked)."""
        state = self.state(asset)
        if state is None or state.revoked:
            return None
        return state.version

    def current(self, asset: str) -> AssetVersion | None:
        version = self.current_version(asset)
        return None if version is None else self.get_version(asset, version)
