"""Content keys: created from the OS CSPRNG, kept wrapped in the vault, got-or-created idempotently.

A content key is wrapped with AES-256-GCM under the master key (the KEK). The associated data
binds the wrapped blob to ``asset/version/index``, so a wrapped key copied to another asset's
path fails to unwrap instead of decrypting the wrong video.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigurationError, TransientError
from .layout import asset_keys_prefix, key_path, version_keys_prefix
from .storage import ObjectNotFound, Store

KEY_BYTES = 16
#: Blob layout: format byte, 12-byte nonce, ciphertext + 16-byte tag.
_FORMAT = b"\x01"
_NONCE_BYTES = 12

class KeyUnwrapError(ConfigurationError):
    """A wrapped key did not authenticate: wrong master key, or a blob moved between assets.
    Neither retrying nor the caller can mend it; an operator must (a stage fails its job, the
    key server logs it and answers 500)."""


class KeyVault:
    """Wrapped content keys in the vault store."""

    def __init__(self, store: Store, master_key: bytes) -> None:
        if len(master_key) != 32:
            raise ConfigurationError("the master key must be 32 bytes (AES-256)")
        self.store = store
        self._aead = AESGCM(master_key)

    @staticmethod
    def _aad(asset: str, version: str, index: int) -> bytes:
        return f"hlsvault-key-v1/{asset}/{version}/{index}".encode()

    def wrap(self, key: bytes, asset: str, version: str, index: int) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, key, self._aad(asset, version, index))
        return _FORMAT + nonce + sealed

    def unwrap(self, blob: bytes, asset: str, version: str, index: int) -> bytes:
        if not blob.startswith(_FORMAT) or len(blob) != 1 + _NONCE_BYTES + KEY_BYTES + 16:
            raise KeyUnwrapError(f"malformed wrapped key for {asset}/{version}/{index}")
        nonce, sealed = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, sealed, self._aad(asset, version, index))
        except InvalidTag:
            raise KeyUnwrapError(
                f"wrapped key {asset}/{version}/{index} does not authenticate: "
                "wrong HLSVAULT_MASTER_KEY, or the blob was moved"
            ) from None

    def get_or_create(self, asset: str, version: str, index: int) -> bytes:
        """The content key for ``(asset, version, index)``, creating it if it does not exist.

        Creation is a conditional write, tried first (a version's keys are new when its first
        chunk is encrypted, so a read first would be one more round trip that finds nothing):
        when it loses, to a racing worker or to this stage's own earlier attempt, the key that
        won is read, so every segment of the index is encrypted under the same key.
        """
        path = key_path(asset, version, index)
        key = os.urandom(KEY_BYTES)
        if self.store.put_bytes_if(path, self.wrap(key, asset, version, index), match=None):
            return key
        try:
            won = self.store.get_bytes(path)
        except ObjectNotFound:
            # S3 answers 409 ConditionalRequestConflict while the racing write is still in
            # flight, so the winner may not be readable yet: a redelivery will find it.
            raise TransientError(
                f"key {asset}/{version}/{index} is being created by another worker; try again"
            ) from None
        return self.unwrap(won, asset, version, index)

    def get(self, asset: str, version: str, index: int) -> bytes:
        """An existing key; :class:`~pipeline.storage.ObjectNotFound` when there is none."""
        path = key_path(asset, version, index)
        return self.unwrap(self.store.get_bytes(path), asset, version, index)

    def delete_version(self, asset: str, version: str) -> int:
        """Crypto-shred every key of one version; returns how many were deleted."""
        return self.store.delete_prefix(version_keys_prefix(asset, version))

    def delete_asset(self, asset: str) -> int:
        """Crypto-shred every key of every version of ``asset``; returns how many."""
        return self.store.delete_prefix(asset_keys_prefix(asset))
