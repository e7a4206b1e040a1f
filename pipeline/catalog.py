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

from .errors import PermanentError
from .keys import check_asset_id, check_version
from .playlists import AssetVersion
from .storage import ObjectNotFound, Store


@dataclass(frozen=True)
class AssetState:
    """What the key server needs to know about an asset besides its version descriptions."""

    version: str | None = None
    job_id: str | None = None
    published_at: float | None = None
    #: version -> until when its keys are still served (then refused, and shredded)
    retired: dict[str, float] = field(default_factory=dict)
    #: when the asset was last revoked (kept in a document of its own; see Catalog.revoke)
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        """Revoked, and not published again since by a job started after the revocation."""
        if self.revoked_at is None:
            return False
        return self.published_at is None or self.published_at <= self.revoked_at

    def key_servable(self, version: str, *, now: float | None = None) -> bool:
        """Whether keys of ``version`` may be served: only the current version's, and a
        replaced version's during its grace period. Everything else is refused, so a key that
        lingers in some cache after a revocation or a shred is never served again."""
        if self.revoked:
            return False
        if version == self.version:
            return True
        deadline = self.retired.get(version)
        return deadline is not None and (time.time() if now is None else now) < deadline

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "job_id": self.job_id,
            "published_at": self.published_at,
            "retired": self.retired,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, revoked_at: float | None = None) -> AssetState:
        return cls(
            version=data.get("version"),
            job_id=data.get("job_id"),
            published_at=data.get("published_at"),
            retired={str(k): float(v) for k, v in (data.get("retired") or {}).items()},
            revoked_at=revoked_at,
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

    @staticmethod
    def _revoked_key(asset: str) -> str:
        return f"catalog/{check_asset_id(asset)}/revoked.json"

    def state(self, asset: str) -> AssetState | None:
        """The asset's state, or None when it was never published."""
        try:
            revoked_at = float(json.loads(self.store.get_bytes(self._revoked_key(asset)))["at"])
        except ObjectNotFound:
            revoked_at = None
        try:
            data = json.loads(self.store.get_bytes(self._state_key(asset)))
        except ObjectNotFound:
            return None if revoked_at is None else AssetState(revoked_at=revoked_at)
        return AssetState.from_dict(data, revoked_at=revoked_at)

    def _write_state(self, asset: str, state: AssetState) -> None:
        self.store.put_bytes(self._state_key(asset), json.dumps(state.to_dict()).encode())

    def publish(
        self, asset: str, version: str, *, job_id: str, started_at: float, grace_s: float
    ) -> str | None:
        """Make ``version`` the one players get, and retire the version it replaces (its keys
        served ``grace_s`` longer), in one atomic write: a reader sees the old state or the
        new one, each naming a complete version. Returns the replaced version.

        A job started before the asset's last revocation may not publish: an operator's
        revocation is not undone by work that was already in flight."""
        state = self.state(asset) or AssetState()
        if state.revoked_at is not None and started_at <= state.revoked_at:
            raise PermanentError(
                f"asset {asset} was revoked after this job started; submit it again to "
                "publish the asset anew"
            )
        now = time.time()
        retired = {v: t for v, t in state.retired.items() if v != version}
        replaced = state.version if state.version not in (None, version) else None
        if state.revoked and state.revoked_at is not None:
            # Publishing anew after a revocation: every earlier version's keys were shredded
            # and stay withdrawn (410), with no grace period.
            retired = {v: min(t, state.revoked_at) for v, t in retired.items()}
            if replaced is not None:
                retired[replaced] = state.revoked_at
        elif replaced is not None:
            retired[replaced] = now + grace_s
        self._write_state(
            asset,
            replace(state, version=check_version(version), job_id=job_id, published_at=now,
                    retired=retired),
        )
        return replaced

    def retire(self, asset: str, version: str, *, delete_after: float) -> None:
        """Serve ``version``'s keys only until ``delete_after``."""
        state = self.state(asset) or AssetState()
        retired = {**state.retired, check_version(version): delete_after}
        self._write_state(asset, replace(state, retired=retired))

    def revoke(self, asset: str) -> None:
        """Mark the asset revoked: the key server answers 410 Gone for it from now on. The
        mark is a document of its own that only revocation writes, so no concurrent publish
        or retirement can write it away."""
        self.store.put_bytes(self._revoked_key(asset), json.dumps({"at": time.time()}).encode())

    def current_version(self, asset: str) -> str | None:
        """The published version of ``asset``, or None (never published, or revoked)."""
        state = self.state(asset)
        if state is None or state.revoked:
            return None
        return state.version

    def current(self, asset: str) -> AssetVersion | None:
        version = self.current_version(asset)
        return None if version is None else self.get_version(asset, version)
