"""Re-keying and revoking a published asset, through the real CLI and key server."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pipeline import aes, layout
from pipeline.catalog import Catalog
from pipeline.crypto import iv_for_sequence
from pipeline.errors import PermanentError
from pipeline.jobs import new_job_spec
from pipeline.lifecycle import new_rekey_spec, rekey
from pipeline.services import build_services
from pipeline.settings import load_settings
from pipeline.storage import LocalStore
from workers.embedded import run_embedded
from workers.runtime import build_runtime

from support import Hlsvault, RemoteStandIn, decrypt_bytes, frame_hashes, framemd5, lavfi_clip


def status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return str(response.read().decode())


def key_uris(master_url: str) -> list[str]:
    variant_url = next(line for line in fetch(master_url).splitlines() if line[:1] != "#")
    return [
        line.split('URI="', 1)[1].rstrip('"')
        for line in fetch(variant_url).splitlines()
        if line.startswith("#EXT-X-KEY")
    ]


def eventually(check: Callable[[], None], timeout: float = 10.0) -> None:
    """Retry ``check`` (a callable asserting something) past the key server's state cache."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class TestRekey:
    def test_rekey_withdraws_the_old_keys_and_plays_under_new_ones(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """After `hlsvault rekey --grace 0` the old version's key is refused, the new version
        plays frame for frame equal to the source, and nothing was transcoded again."""
        # Given a published asset and the key URI a viewer's player already holds
        done = keyserver.package(str(copy_clip), "--asset", "film", "--ladder", "copy",
                                 "--segment-seconds", "2", "--key-rotation-segments", "2")
        assert done.returncode == 0, done.stderr
        url = keyserver.url("film")
        [old_key_uri, *_] = key_uris(url)
        assert status_of(old_key_uri) == 200
        with urllib.request.urlopen(old_key_uri, timeout=10) as response:
            old_key = response.read()

        # When it is re-keyed with no grace period
        rekeyed = keyserver.run("rekey", "film", "--grace", "0", "--json")
        assert rekeyed.returncode == 0, rekeyed.stderr
        summary = json.loads(rekeyed.stdout)
        assert summary["status"] == "succeeded"
        record = json.loads(keyserver.run("status", summary["job_id"], "--json").stdout)
        assert [s["name"] for s in record["stages"]] == ["rekey", "upload", "invalidate"]

        # Then the old key is gone: 410, from the vault too
        eventually(lambda: _assert_equal(status_of(old_key_uri), 410))
        old_version = old_key_uri.split("/v1/keys/film/")[1].split("/")[0]
        assert not list((keyserver.vault / "keys" / "film" / old_version).glob("*.key"))

        # and a fresh URL plays the new version under different keys, equal to the source
        new_url = keyserver.url("film")
        new_key_uris = key_uris(new_url)
        assert len(new_key_uris) == 2 and old_version not in new_key_uris[0]
        with urllib.request.urlopen(new_key_uris[0], timeout=10) as response:
            assert response.read() != old_key
        assert frame_hashes(framemd5(new_url)) == frame_hashes(framemd5(str(copy_clip)))

    def test_rekey_of_a_sealed_chunked_transcode_plays_as_before(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """A transcode in 2 s chunks, sealed by its segment stages, re-keys: the new version
        decodes frame for frame as the packaged one, under keys that are not the old ones."""
        keyserver.env["HLSVAULT_CHUNK_SECONDS"] = "2"
        done = keyserver.package(str(copy_clip), "--asset", "coded", "--ladder", "default",
                                 "--segment-seconds", "1", "--key-rotation-segments", "3")
        assert done.returncode == 0, done.stderr
        url = keyserver.url("coded")
        packaged = frame_hashes(framemd5(url))
        old_keys = key_uris(url)
        assert len(packaged) == 180 and len(old_keys) == 2

        rekeyed = keyserver.run("rekey", "coded", "--grace", "0", "--json")
        assert rekeyed.returncode == 0, rekeyed.stderr

        # past the key server's state cache: the old version's keys are gone
        eventually(lambda: _assert_equal(status_of(old_keys[0]), 410))
        new_url = keyserver.url("coded")
        new_keys = key_uris(new_url)
        old_version = old_keys[0].split("/v1/keys/coded/")[1].split("/")[0]
        assert len(new_keys) == 2 and all(old_version not in uri for uri in new_keys)
        assert frame_hashes(framemd5(new_url)) == packaged

    def test_rekey_of_an_unknown_asset_says_what_to_do(
        self, hlsvault: Hlsvault, copy_clip: Path
    ) -> None:
        """Re-keying what was never published fails with a reason, and no job runs."""
        packaged = hlsvault.package(str(copy_clip), "--asset", "other", "--ladder", "copy")
        assert packaged.returncode == 0, packaged.stderr
        jobs_before = sorted((hlsvault.data_dir / "jobs").glob("*.json"))

        done = hlsvault.run("rekey", "nothing")

        assert done.returncode == 1
        assert "asset nothing is not published" in done.stderr
        assert sorted((hlsvault.data_dir / "jobs").glob("*.json")) == jobs_before


class TestRekeyScratch:
    def test_a_rekey_through_remote_stores_holds_one_batch_in_scratch(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Given a published asset of six batches' segments (two lanes: a batch is two) on
        stores that are not local, when it is re-keyed, then its scratch holds no more files
        than a batch has segments whenever one is fetched or put (each is fetched, decrypted
        into a copy of its own, which is re-encrypted in place; the fetched file goes once
        decrypted), and every new segment decrypts, under the new version's key, to what the
        old one decrypted to under the old key."""
        services = build_services(load_settings({"HLSVAULT_DATA_DIR": str(tmp_path / "data")}))
        clip = lavfi_clip("twelve-seconds.mp4", seconds=12)
        spec = new_job_spec(str(clip), asset="film", ladder="copy", segment_seconds=1)
        record = run_embedded(build_runtime(services.settings, services=services), spec)
        assert record.status == "succeeded", record.error
        monkeypatch.setattr(aes, "LANES", 2)
        work, origin = RemoteStandIn(services.work), RemoteStandIn(services.origin)
        remote = replace(services, work=work, origin=origin)

        rekey_spec = new_rekey_spec(remote, "film")
        described = rekey(remote, rekey_spec)

        old = services.catalog.get_version("film", spec.version)
        assert sum(len(r.segments) for r in old.renditions) >= 6 * 2
        assert 0 < max(work.most_in_scratch, origin.most_in_scratch) <= 2
        for before, after in zip(old.renditions, described.renditions, strict=True):
            for was, now in zip(before.segments, after.segments, strict=True):
                iv = iv_for_sequence(was.sequence)
                old_bytes = services.origin.get_bytes(
                    layout.segment_key("film", old.version, before.name, was.name))
                new_bytes = services.work.get_bytes(
                    layout.encrypted_key(rekey_spec.job_id, after.name, now.name))
                old_key = services.keys.get("film", old.version, was.key)
                new_key = services.keys.get("film", rekey_spec.version, now.key)
                assert new_key != old_key
                assert decrypt_bytes(new_bytes, new_key, iv) == decrypt_bytes(
                    old_bytes, old_key, iv)


class TestRevoke:
    def test_revoked_asset_answers_410_and_its_keys_are_shredded(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """`hlsvault revoke` deletes every key of the asset and the key server answers 410 Gone
        for its playlists and keys, even with a valid token."""
        done = keyserver.package(str(copy_clip), "--asset", "gone", "--ladder", "copy")
        assert done.returncode == 0, done.stderr
        url = keyserver.url("gone")
        [key_uri] = key_uris(url)
        variant_url = next(line for line in fetch(url).splitlines() if line[:1] != "#")

        revoked = keyserver.run("revoke", "gone", "--json")
        assert revoked.returncode == 0, revoked.stderr
        assert json.loads(revoked.stdout)["keys_deleted"] == 1

        def all_gone() -> None:
            assert [status_of(u) for u in (url, variant_url, key_uri)] == [410, 410, 410]

        eventually(all_gone)
        assert not list((keyserver.vault / "keys" / "gone").rglob("*.key"))
        refused = keyserver.run("url", "gone")
        assert refused.returncode == 1 and "not published (or was revoked)" in refused.stderr


def _assert_equal(left: object, right: object) -> None:
    assert left == right


class TestRepackage:
    def test_a_new_packaging_retires_the_replaced_version_after_a_grace_period(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """Packaging an asset again publishes a new version; the old one's keys keep being
        served (players mid-film finish) and are scheduled for shredding an hour later."""
        first = keyserver.package(str(copy_clip), "--asset", "again", "--ladder", "copy", "--json")
        assert first.returncode == 0, first.stderr
        [old_key_uri] = key_uris(keyserver.url("again"))

        second = keyserver.package(str(copy_clip), "--asset", "again", "--ladder", "copy",
                                   "--json")
        assert second.returncode == 0, second.stderr
        old_version = json.loads(first.stdout)["version"]

        state = json.loads((keyserver.vault / "catalog" / "again" / "current.json").read_text())
        assert state["version"] == json.loads(second.stdout)["version"]
        assert 3500 < state["retired"][old_version] - time.time() <= 3600
        assert status_of(old_key_uri) == 200


class TestRevokeThenRepublish:
    def test_a_republished_asset_never_serves_the_revoked_versions_keys(
        self, keyserver: Hlsvault, copy_clip: Path
    ) -> None:
        """Keys a running key server had cached stay refused after a revocation, even once the
        asset is packaged anew: only the current version (and retired ones in their grace
        period) are ever served."""
        first = keyserver.package(str(copy_clip), "--asset", "phoenix", "--ladder", "copy")
        assert first.returncode == 0, first.stderr
        [old_key_uri] = key_uris(keyserver.url("phoenix"))
        assert status_of(old_key_uri) == 200  # now in the key server's memory

        assert keyserver.run("revoke", "phoenix").returncode == 0
        eventually(lambda: _assert_equal(status_of(old_key_uri), 410))
        again = keyserver.package(str(copy_clip), "--asset", "phoenix", "--ladder", "copy")
        assert again.returncode == 0, again.stderr

        new_url = keyserver.url("phoenix")
        eventually(lambda: _assert_equal(status_of(new_url), 200))  # past the state cache
        assert status_of(key_uris(new_url)[0]) == 200
        old_version = old_key_uri.split("/v1/keys/phoenix/")[1].split("/")[0]
        fresh_token = new_url.split("token=", 1)[1]
        old_with_fresh_token = old_key_uri.split("?", 1)[0] + f"?token={fresh_token}"
        assert old_version not in new_url
        assert status_of(old_with_fresh_token) == 410


def test_a_job_started_before_a_revocation_cannot_publish(tmp_path: Path) -> None:
    """Work in flight when an operator revokes an asset fails instead of un-revoking it."""
    catalog = Catalog(LocalStore(tmp_path))
    catalog.publish("film", "v1", job_id="a", started_at=time.time() - 10, grace_s=0)
    started = time.time()
    time.sleep(0.01)
    catalog.revoke("film")

    with pytest.raises(PermanentError, match="revoked after this job started"):
        catalog.publish("film", "v2", job_id="b", started_at=started, grace_s=0)
    assert catalog.current_version("film") is None

    catalog.publish("film", "v3", job_id="c", started_at=time.time(), grace_s=0)
    assert catalog.current_version("film") == "v3"
    state = catalog.state("film")
    assert state is not None
    assert not state.key_servable("v1") and state.key_servable("v3")


def test_two_deleters_of_one_prefix_both_finish(tmp_path: Path) -> None:
    """An embedded re-key shreds what is due while the worker's delayed shred of the same
    version runs: both delete one prefix at once, and neither fails on what the other took."""
    import threading

    store = LocalStore(tmp_path)
    for attempt in range(20):
        prefix = f"thumbnails/film/v{attempt}"
        for index in range(200):
            store.put_bytes(f"{prefix}/d{index % 20}/sheet_{index:03d}.jpg", b"x")
        errors: list[BaseException] = []
        barrier = threading.Barrier(4)

        def delete(prefix: str = prefix, barrier: threading.Barrier = barrier,
                   errors: list[BaseException] = errors) -> None:
            barrier.wait()
            try:
                store.delete_prefix(prefix)
            except BaseException as error:
                errors.append(error)

        threads = [threading.Thread(target=delete) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        assert errors == [], attempt
        assert not (tmp_path / prefix).exists()
