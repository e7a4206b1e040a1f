"""The asset catalog: which versions of an asset exist, and which one players get.

It lives in the vault, never on the CDN origin. A version's description is written once and
never changed. Per asset, one small state document says which version is current, whether the
asset was revoked, and which older versions are retired (their keys shredded after a grace
period); it is replaced in one conditional write (the store's If-Match), so that two racing
publishes of one asset cannot lose each other's retirements; a publish moves it last. Every
change of an asset's state is announced (:class:`StateAnnouncer`) so that running key servers
drop what they cached at once instead of after :data:`STATE_CACHE_TTL_S` (:mod:`.statebus`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from . import layout
from .errors import ConfigurationError, Conflict, CorruptRecord, TransientError
from .playlists import AssetVersion
from .statebus import NullStateBus, StateBus
from .storage import ObjectNotFound, Store

#: Reads the revocation document beside the state document (one round trip's wait, not two);
#: shared by every catalog of the process, bounded.
_READS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="hlsvault-catalog")

#: How long a key server may answer from an asset state it cached: the longest a change takes
#: to reach one that missed its announcement.
STATE_CACHE_TTL_S = 2.0
#: Conditional state writes lost to a racing writer before giving up; each retry re-reads the
#: state and re-applies the change, so only a storm of writers to one asset exhausts it.
MAX_STATE_WRITE_ATTEMPTS = 8


@dataclass(frozen=True)
class AssetState:
    """What the key server needs to know about an asset besides its version descriptions."""

    version: str | None = None
    job_id: str | None = None
    published_at: float | None = None
    #: version -> until when its keys are still served (then refused, and shredded)
    retired: dict[str, float] = field(default_factory=dict)
    #: when the asset was last revoked (in the state document, and in a document of its own
    #: that only revocation writes; see Catalog.revoke)
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
            "revoked_at": self.revoked_at,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, revoked_at: float | None = None) -> AssetState:
        """The state in ``data``, revoked at the later of its own mark and ``revoked_at``."""
        marks = [t for t in (data.get("revoked_at"), revoked_at) if t is not None]
        return cls(
            version=data.get("version"),
            job_id=data.get("job_id"),
            published_at=data.get("published_at"),
            retired={str(k): float(v) for k, v in (data.get("retired") or {}).items()},
            revoked_at=max(marks) if marks else None,
        )


class Catalog:
    """Asset versions and per-asset state documents in the vault store."""

    def __init__(self, store: Store, *, bus: StateBus | None = None) -> None:
        self.store = store
        self.bus = bus if bus is not None else NullStateBus()

    def put_version(self, described: AssetVersion) -> None:
        """Record a version's description (idempotent: a rerun writes the same document)."""
        body = json.dumps(described.to_dict(), sort_keys=True).encode()
        self.store.put_bytes(
            layout.version_description_key(described.asset, described.version), body
        )

    def get_version(self, asset: str, version: str) -> AssetVersion:
        """A recorded version; :class:`~pipeline.storage.ObjectNotFound` when unknown,
        :class:`~pipeline.errors.ConfigurationError` when its description cannot be read (not
        JSON, or a field of the wrong kind: a damaged or hand-edited vault)."""
        raw = self.store.get_bytes(layout.version_description_key(asset, version))
        try:
            return AssetVersion.from_dict(json.loads(raw))
        except (CorruptRecord, ValueError, TypeError, KeyError, AttributeError,
                RecursionError) as error:
            raise ConfigurationError(
                f"the description of {asset} version {version} is unreadable "
                f"({type(error).__name__}); package the asset again") from None

    def assets(self, *, limit: int) -> list[str]:
        """Every published (or revoked) asset id, sorted, at most ``limit`` of them. Reads the
        catalog's listing: fine for the ops app's page at thousands of assets, not more."""
        found: list[str] = []
        for key in self.store.list("catalog"):
            parts = key.split("/")
            if len(parts) == 3 and parts[2] in ("current.json", "revoked.json"):
                if not found or found[-1] != parts[1]:
                    found.append(parts[1])
                if len(found) > limit:
                    return found[:limit]
        return found

    def _revoked_at(self, asset: str) -> float | None:
        try:
            return float(json.loads(self.store.get_bytes(layout.revoked_key(asset)))["at"])
        except ObjectNotFound:
            return None

    def _tagged_state(self, asset: str) -> tuple[AssetState | None, str | None]:
        """The state document (None when never written) and its tag, for a conditional write."""
        # The two documents are read at once: one round trip's wait instead of two.
        revoked = _READS.submit(self._revoked_at, asset)
        try:
            raw, tag = self.store.get_tagged(layout.state_key(asset))
        except ObjectNotFound:
            raw, tag = None, None
        revoked_at = revoked.result()
        if raw is None or tag is None:
            state = None if revoked_at is None else AssetState(revoked_at=revoked_at)
            return state, None
        return AssetState.from_dict(json.loads(raw), revoked_at=revoked_at), tag

    def state(self, asset: str) -> AssetState | None:
        """The asset's state, or None when it was never published."""
        return self._tagged_state(asset)[0]

    def _update_state(
        self, asset: str, change: Callable[[AssetState], AssetState]
    ) -> tuple[AssetState, AssetState]:
        """Apply ``change`` to the state document with a conditional write, re-reading and
        re-applying it when another writer got there first. Returns (before, after)."""
        for _ in range(MAX_STATE_WRITE_ATTEMPTS):
            before, tag = self._tagged_state(asset)
            before = before or AssetState()
            after = change(before)
            body = json.dumps(after.to_dict()).encode()
            if self.store.put_bytes_if(layout.state_key(asset), body, match=tag):
                self.bus.announce(asset)
                return before, after
        raise TransientError(
            f"the state of asset {asset} kept changing under {MAX_STATE_WRITE_ATTEMPTS} "
            "attempts to update it; the stage is retried"
        )

    def publish(
        self, asset: str, version: str, *, job_id: str, started_at: float, grace_s: float,
        expected_previous: tuple[str | None, ...] | None = None,
        on_replacing: Callable[[str], None] | None = None,
    ) -> str | None:
        """Make ``version`` the one players get, and retire the version it replaces (its keys
        served ``grace_s`` longer), in one conditional write: a reader sees the old state or
        the new one, each naming a complete version, and a racing publish is re-applied on
        top instead of overwritten. Returns the replaced version.

        A job started before the asset's last revocation may not publish: an operator's
        revocation is not undone by work that was already in flight. With
        ``expected_previous``, the publish is refused (:class:`~pipeline.errors.Conflict`)
        unless the current version is one of those (a re-key publishes over what it re-keyed).
        ``on_replacing(version)`` is called before the write that would retire ``version``
        (again if that write loses a race and is re-applied), so that a caller can remember
        what it replaced before the flip: a retry after the flip no longer sees it.
        """
        layout.check_version(version)

        def change(state: AssetState) -> AssetState:
            if state.revoked_at is not None and started_at <= state.revoked_at:
                raise Conflict(
                    f"asset {asset} was revoked after this job started; submit it again to "
                    "publish the asset anew"
                )
            if expected_previous is not None and state.version not in expected_previous:
                raise Conflict(
                    f"asset {asset} changed while this job ran (now version {state.version}); "
                    "run it again"
                )
            now = time.time()
            retired = {v: t for v, t in state.retired.items() if v != version}
            replaced = state.version if state.version not in (None, version) else None
            if state.revoked and state.revoked_at is not None:
                # Publishing anew after a revocation: every earlier version's keys were
                # shredded and stay withdrawn (410), with no grace period.
                retired = {v: min(t, state.revoked_at) for v, t in retired.items()}
                if replaced is not None:
                    retired[replaced] = state.revoked_at
            elif replaced is not None:
                retired[replaced] = now + grace_s
            if replaced is not None and on_replacing is not None:
                on_replacing(replaced)
            return replace(state, version=version, job_id=job_id, published_at=now,
                           retired=retired)

        before, _ = self._update_state(asset, change)
        return before.version if before.version not in (None, version) else None

    def revoke(self, asset: str) -> float:
        """Mark the asset revoked: every key server answers 410 Gone for it from the time
        returned on (now for those that heard the announcement).

        The mark goes into a document of its own, which no publish writes, and then into the
        state document by a conditional write: a publish that read the state before the
        revocation loses its own conditional write, re-reads, and is refused, instead of
        flipping the asset back on after its keys were shredded."""
        now = time.time()
        self.store.put_bytes(layout.revoked_key(asset), json.dumps({"at": now}).encode())
        self._update_state(asset, lambda state: replace(state, revoked_at=now))
        return now + STATE_CACHE_TTL_S

    def current_version(self, asset: str) -> str | None:
        """The published version of ``asset``, or None (never published, or revoked)."""
        state = self.state(asset)
        if state is None or state.revoked:
            return None
        return state.version

    def current(self, asset: str) -> AssetVersion | None:
        version = self.current_version(asset)
        return None if version is None else self.get_version(asset, version)
