"""Content keys in the vault: created once, wrapped under the master key, bound to their place."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.errors import BadSpec, ConfigurationError
from pipeline.keys import KEY_BYTES, KeyUnwrapError, KeyVault
from pipeline.layout import MAX_KEY_INDEX, check_asset_id, check_version, key_path
from pipeline.storage import LocalStore, ObjectNotFound

ASSET = "film-1"
VERSION = "v1"
#: Workers racing for one key: more threads than cores, so creation really interleaves.
RACERS = 8


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "vault"


@pytest.fixture
def master_key() -> bytes:
    return os.urandom(32)


@pytest.fixture
def vault(root: Path, master_key: bytes) -> KeyVault:
    return KeyVault(LocalStore(root), master_key)


def key_files(root: Path) -> list[str]:
    """Every file under the vault root, temporary ones included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


class TestGetOrCreate:
    def test_second_call_returns_the_first_key_and_one_file(
        self, vault: KeyVault, root: Path
    ) -> None:
        """get_or_create is idempotent: the same 16 bytes twice, stored as exactly one file."""
        first = vault.get_or_create(ASSET, VERSION, 0)
        second = vault.get_or_create(ASSET, VERSION, 0)

        assert len(first) == KEY_BYTES
        assert second == first
        assert key_files(root) == [f"keys/{ASSET}/{VERSION}/000000.key"]

    def test_key_survives_a_new_vault_instance(
        self, vault: KeyVault, root: Path, master_key: bytes
    ) -> None:
        """The key is persisted, not cached: another process with the same master key reads it."""
        created = vault.get_or_create(ASSET, VERSION, 3)
        reopened = KeyVault(LocalStore(root), master_key)

        assert reopened.get(ASSET, VERSION, 3) == created
        assert reopened.get_or_create(ASSET, VERSION, 3) == created

    def test_each_asset_version_and_index_has_its_own_key_and_file(
        self, vault: KeyVault, root: Path
    ) -> None:
        """Different (asset, version, index) triples get different keys, one file each."""
        places = [
            (ASSET, VERSION, 0), (ASSET, VERSION, 1), (ASSET, "v2", 0), ("film-2", VERSION, 0)
        ]
        keys = {vault.get_or_create(*place) for place in places}

        assert len(keys) == len(places)
        assert key_files(root) == sorted(
            f"keys/{asset}/{version}/{index:06d}.key" for asset, version, index in places
        )

    def test_get_of_a_key_never_created_is_object_not_found(self, vault: KeyVault) -> None:
        """get does not create: a key server asked for an unknown key answers 404, not a new key."""
        with pytest.raises(ObjectNotFound):
            vault.get(ASSET, VERSION, 0)

    def test_racing_workers_all_get_the_one_key(self, root: Path, master_key: bytes) -> None:
        """Eight workers creating the same key at once all come back with the winner's key, and
        the vault holds one file per key and no temporary file."""
        # Given: one vault instance per thread, as separate workers would have
        vaults = [KeyVault(LocalStore(root), master_key) for _ in range(RACERS)]
        rounds = 10
        results: list[list[bytes]] = [[] for _ in range(rounds)]
        errors: list[BaseException] = []
        barrier = threading.Barrier(RACERS)

        def race(vault: KeyVault) -> None:
            for index in range(rounds):
                barrier.wait(timeout=10)
                try:
                    results[index].append(vault.get_or_create(ASSET, VERSION, index))
                except BaseException as error:  # re-raised below, in the test's thread
                    errors.append(error)

        # When: every thread asks for the same ten keys, released together for each one
        threads = [threading.Thread(target=race, args=(v,)) for v in vaults]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)

        # Then: one key per index, shared by all, and exactly one stored file each
        assert errors == []
        assert [len(keys) for keys in results] == [RACERS] * rounds
        assert [len(set(keys)) for keys in results] == [1] * rounds
        assert key_files(root) == [f"keys/{ASSET}/{VERSION}/{i:06d}.key" for i in range(rounds)]
        assert vaults[0].get(ASSET, VERSION, 4) == results[4][0]


class TestWrapping:
    def test_blob_moved_to_another_asset_does_not_unwrap(self, vault: KeyVault, root: Path) -> None:
        """A wrapped key copied to another asset's path fails authentication (the AAD names the
        asset), and get_or_create there refuses rather than hand out the wrong key."""
        vault.get_or_create(ASSET, VERSION, 0)
        blob = (root / key_path(ASSET, VERSION, 0)).read_bytes()
        moved = root / key_path("film-2", VERSION, 0)
        moved.parent.mkdir(parents=True)
        moved.write_bytes(blob)

        with pytest.raises(KeyUnwrapError, match="does not authenticate"):
            vault.get("film-2", VERSION, 0)
        with pytest.raises(KeyUnwrapError):
            vault.get_or_create("film-2", VERSION, 0)
        assert moved.read_bytes() == blob

    @pytest.mark.parametrize(("version", "index"), [("v2", 0), (VERSION, 1)])
    def test_blob_moved_to_another_version_or_index_does_not_unwrap(
        self, vault: KeyVault, version: str, index: int
    ) -> None:
        """The AAD binds version and index too: a blob is only valid at its own place."""
        blob = vault.wrap(os.urandom(KEY_BYTES), ASSET, VERSION, 0)
        with pytest.raises(KeyUnwrapError):
            vault.unwrap(blob, ASSET, version, index)

    def test_wrong_master_key_does_not_unwrap_nor_overwrite(
        self, vault: KeyVault, root: Path
    ) -> None:
        """A vault opened with another master key cannot read a key, and get_or_create does not
        replace the stored key with a new one it could read."""
        vault.get_or_create(ASSET, VERSION, 0)
        stored = (root / key_path(ASSET, VERSION, 0)).read_bytes()
        impostor = KeyVault(LocalStore(root), os.urandom(32))

        with pytest.raises(KeyUnwrapError):
            impostor.get(ASSET, VERSION, 0)
        with pytest.raises(KeyUnwrapError):
            impostor.get_or_create(ASSET, VERSION, 0)
        assert (root / key_path(ASSET, VERSION, 0)).read_bytes() == stored

    def test_key_bytes_are_not_in_the_wrapped_blob(self, vault: KeyVault, root: Path) -> None:
        """The stored blob is ciphertext: neither the raw key nor its hex appears in it."""
        key = vault.get_or_create(ASSET, VERSION, 0)
        blob = (root / key_path(ASSET, VERSION, 0)).read_bytes()

        assert key not in blob
        assert key.hex().encode() not in blob
        assert vault.unwrap(blob, ASSET, VERSION, 0) == key

    def test_wrapping_twice_gives_different_blobs(self, vault: KeyVault) -> None:
        """Each wrap draws a fresh nonce, so GCM never reuses one under the master key."""
        key = os.urandom(KEY_BYTES)
        first = vault.wrap(key, ASSET, VERSION, 0)
        second = vault.wrap(key, ASSET, VERSION, 0)

        assert first != second
        assert vault.unwrap(first, ASSET, VERSION, 0) == vault.unwrap(second, ASSET, VERSION, 0)

    @pytest.mark.parametrize(
        "damage",
        [lambda b: b[:-1], lambda b: b + b"\x00", lambda b: b"\x02" + b[1:],
         lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: b""],
        ids=["truncated", "extended", "unknown-format", "flipped-tag-bit", "empty"],
    )
    def test_damaged_blob_is_a_key_unwrap_error(
        self, vault: KeyVault, damage: Callable[[bytes], bytes]
    ) -> None:
        """A truncated, extended, unknown-format or bit-flipped blob is refused as such."""
        blob = vault.wrap(os.urandom(KEY_BYTES), ASSET, VERSION, 0)
        with pytest.raises(KeyUnwrapError):
            vault.unwrap(damage(blob), ASSET, VERSION, 0)

    @pytest.mark.parametrize("length", [0, 16, 31, 33])
    def test_master_key_must_be_32_bytes(self, root: Path, length: int) -> None:
        """A master key that is not AES-256 fails at construction, naming the requirement."""
        with pytest.raises(ConfigurationError, match="32 bytes"):
            KeyVault(LocalStore(root), b"\x00" * length)


class TestPlaceValidation:
    @pytest.mark.parametrize(
        "asset",
        ["../x", "a/b", "", "a" * 200, "a" * 129, "..", ".", "-a", "_a", "a b", "a.b", "a\\b",
         "a\x00b", "ä"],
    )
    def test_invalid_asset_ids_raise_bad_spec_and_write_nothing(
        self, vault: KeyVault, tmp_path: Path, asset: str
    ) -> None:
        """Asset ids that could escape the vault or break a URL are refused before any write."""
        with pytest.raises(BadSpec, match="invalid asset id"):
            vault.get_or_create(asset, VERSION, 0)
        with pytest.raises(BadSpec):
            check_asset_id(asset)
        assert sorted(p.name for p in tmp_path.rglob("*")) == []

    def test_asset_ids_up_to_128_characters_are_accepted(self, vault: KeyVault) -> None:
        """The documented bound is inclusive: 128 characters is a valid asset id."""
        assert len(vault.get_or_create("a" * 128, VERSION, 0)) == KEY_BYTES

    @pytest.mark.parametrize("version", ["../x", "a/b", "", "v" * 65, "..", "-v"])
    def test_invalid_versions_raise_bad_spec(self, vault: KeyVault, version: str) -> None:
        """Versions are path components too and are refused the same way."""
        with pytest.raises(BadSpec, match="invalid version"):
            vault.get_or_create(ASSET, version, 0)

    @pytest.mark.parametrize("index", [-1, MAX_KEY_INDEX + 1])
    def test_out_of_range_indexes_raise_bad_spec(self, vault: KeyVault, index: int) -> None:
        """A negative or absurd key index is refused instead of naming an odd file."""
        with pytest.raises(BadSpec, match="out of range"):
            vault.get_or_create(ASSET, VERSION, index)

    @pytest.mark.parametrize("check", [check_asset_id, check_version], ids=["asset", "version"])
    def test_trailing_newline_is_refused(self, check: Callable[[str], str]) -> None:
        """An id ending in a newline is not a safe URL path or storage key component."""
        with pytest.raises(BadSpec):
            check("film\n")
