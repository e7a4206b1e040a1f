"""Conditional writes and the asset state document: two racing publishes of one asset both
keep their retirements, on the local store (flock compare-and-swap) and on S3 (If-Match, through
the moto server over HTTP), and a stale writer is told it lost."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pipeline.catalog import Catalog
from pipeline.errors import Conflict
from pipeline.storage import LocalStore, Store
from pipeline.storage.s3 import S3Store

from fleet import MotoServer

#: Publishes racing for one asset: more threads than cores, so the writes really interleave.
RACERS = 8


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield LocalStore(tmp_path / "vault")
        return
    moto: MotoServer = request.getfixturevalue("moto_server")
    bucket = f"vault-{uuid.uuid4().hex[:8]}"
    client = moto.client("s3")
    client.create_bucket(Bucket=bucket)
    yield S3Store(bucket, "vault", client=client)


class TestConditionalWrites:
    def test_a_write_against_a_stale_tag_loses(self, store: Store) -> None:
        """Two writers read the same version; the first to write wins, the second is told."""
        assert store.put_bytes_if("doc.json", b"one", match=None)
        _, tag = store.get_tagged("doc.json")

        assert store.put_bytes_if("doc.json", b"two", match=tag)
        assert not store.put_bytes_if("doc.json", b"three", match=tag)
        assert store.get_bytes("doc.json") == b"two"

    def test_create_only_when_absent(self, store: Store) -> None:
        assert store.put_bytes_if("new.json", b"first", match=None)
        assert not store.put_bytes_if("new.json", b"second", match=None)
        assert store.get_bytes("new.json") == b"first"

    def test_the_tag_changes_with_every_write(self, store: Store) -> None:
        store.put_bytes("doc.json", b"a")
        _, first = store.get_tagged("doc.json")
        store.put_bytes("doc.json", b"b")
        _, second = store.get_tagged("doc.json")
        assert first != second


def _publish_all(catalog: Catalog, asset: str, versions: list[str]) -> list[Any]:
    """Publish every version at once from its own thread; returns what each raised, if anything."""
    barrier = threading.Barrier(len(versions))
    outcomes: list[Any] = [None] * len(versions)

    def publish(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            catalog.publish(asset, versions[i], job_id=f"job{i}", started_at=1.0, grace_s=3600)
        except Exception as error:
            outcomes[i] = error

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(len(versions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return outcomes


class TestRacingPublishes:
    def test_every_replaced_version_is_retired_and_one_is_current(self, store: Store) -> None:
        """Given a published v0, when eight publishes race, then exactly one version is current
        and every other one — v0 included — is retired: none was lost to a blind overwrite."""
        catalog = Catalog(store)
        catalog.publish("film", "v0", job_id="job", started_at=1.0, grace_s=3600)
        versions = [f"v{i}" for i in range(1, RACERS + 1)]

        outcomes = _publish_all(catalog, "film", versions)

        assert outcomes == [None] * RACERS
        state = catalog.state("film")
        assert state is not None and state.version in versions
        assert set(state.retired) == {"v0", *versions} - {state.version}

    def test_a_rekey_publish_over_a_changed_asset_is_refused(self, store: Store) -> None:
        """A re-key publishes over the version it re-keyed or not at all."""
        catalog = Catalog(store)
        catalog.publish("film", "v1", job_id="a", started_at=1.0, grace_s=0)
        catalog.publish("film", "v2", job_id="b", started_at=1.0, grace_s=0)

        with pytest.raises(Conflict, match="changed while this job ran"):
            catalog.publish("film", "v3", job_id="c", started_at=1.0, grace_s=0,
                            expected_previous=("v1", "v3"))
        state = catalog.state("film")
        assert state is not None and state.version == "v2"


class TestAnnouncements:
    def test_every_state_change_is_announced(self, tmp_path: Path) -> None:
        """Publishing and revoking each tell the announcer which asset changed."""
        heard: list[str] = []

        class Recorder:
            def announce(self, asset: str) -> int:
                heard.append(asset)
                return 1

        catalog = Catalog(LocalStore(tmp_path / "vault"), bus=Recorder())
        catalog.publish("film", "v1", job_id="a", started_at=1.0, grace_s=0)
        catalog.revoke("film")

        assert heard == ["film", "film"]


class TestRevokeAgainstPublish:
    def test_a_publish_that_read_the_state_before_a_revoke_cannot_undo_it(
        self, tmp_path: Path
    ) -> None:
        """Given a publish that has read the asset's state, when a revocation lands before the
        publish writes, then the publish is refused and the asset stays revoked (its keys are
        being shredded: flipping it back on would serve playlists with no keys)."""
        store = LocalStore(tmp_path / "vault")
        catalog = Catalog(store)
        catalog.publish("film", "v1", job_id="a", started_at=1.0, grace_s=0)

        class RevokedMidway(LocalStore):
            """The vault as the publishing worker sees it: the revocation lands just after
            the worker read the state document."""

            landed = False

            def get_tagged(self, key: str) -> tuple[bytes, str]:
                answer = super().get_tagged(key)
                if key.endswith("current.json") and not self.landed:
                    self.landed = True
                    catalog.revoke("film")
                return answer

        with pytest.raises(Conflict, match="revoked after this job started"):
            Catalog(RevokedMidway(tmp_path / "vault")).publish(
                "film", "v2", job_id="b", started_at=2.0, grace_s=0
            )
        state = catalog.state("film")
        assert state is not None and state.revoked and state.version == "v1"
