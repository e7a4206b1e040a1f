"""AES-128-CBC with PKCS#7 padding over caller-owned buffers, encrypted in place.

The cipher is the system libcrypto's EVP interface called through :mod:`ctypes`
(``EVP_EncryptInit_ex``, ``EVP_EncryptUpdate``, ``EVP_EncryptFinal_ex``). Three things make it
fast enough to keep up with a remux:

- a ctypes call into a shared library releases the GIL for as long as it runs, so threads that
  encrypt different segments run on different cores;
- one call covers megabytes, so its fixed cost (about a microsecond) vanishes next to AES;
- the plaintext is replaced by its ciphertext in the same buffer, which the caller reuses from
  one segment to the next: no allocation, no copy, no fresh pages.

Where libcrypto cannot be loaded (no OpenSSL 3 or 1.1 shared library, or one that fails the
known-answer test below), the ``cryptography`` package does the same work, through a scratch
buffer. Both produce the bytes ``openssl enc -aes-128-cbc`` produces.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from typing import Protocol

BLOCK = 16

#: Shared-library names tried in order. Only versioned names: macOS aborts a process that
#: loads its unversioned system libcrypto, and an unversioned name could be any ABI.
LIBCRYPTO_NAMES = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib")

#: NIST SP 800-38A, F.2.1 (CBC-AES128.Encrypt), first block: a library that does not give this
#: answer is not used, whatever it calls itself.
_KAT_KEY = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
_KAT_IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
_KAT_PLAIN = bytes.fromhex("6bc1bee22e409f96e93d7e117393172a")
_KAT_CIPHER = bytes.fromhex("7649abac8119b246cee98e9b12e9197d")


class CbcEncryptor(Protocol):
    """One CBC stream under one key and IV, encrypted piece by piece in place."""

    def update(self, buf: memoryview) -> None:
        """Encrypt ``buf`` in place; its length must be a multiple of 16 (a middle piece)."""

    def finish(self, buf: memoryview, length: int) -> int:
        """Encrypt the last piece, ``buf[:length]``, in place and pad it: the padding goes into
        ``buf[length:]``, which must hold 16 more bytes. Returns the ciphertext length."""

    def close(self) -> None:
        """Free what the encryptor holds; it cannot be used afterwards."""


class Backend(Protocol):
    name: str

    def encryptor(self, key: bytes, iv: bytes) -> CbcEncryptor:
        """A new CBC stream under ``key`` and ``iv`` (16 bytes each)."""


def check_key_iv(key: bytes, iv: bytes) -> None:
    if len(key) != BLOCK or len(iv) != BLOCK:
        raise ValueError("AES-128 needs a 16-byte key and a 16-byte IV")


def padded_length(length: int) -> int:
    """PKCS#7 always adds 1 to 16 bytes: a whole block when ``length`` is already aligned."""
    return length + BLOCK - length % BLOCK


def _address(buf: memoryview) -> int:
    # The buffer's own memory (no copy); from_buffer refuses read-only and non-contiguous ones.
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class _LibcryptoEncryptor:
    def __init__(self, lib: ctypes.CDLL, cipher: int, key: bytes, iv: bytes) -> None:
        self._lib = lib
        self._ctx = lib.EVP_CIPHER_CTX_new()
        if not self._ctx:
            raise MemoryError("EVP_CIPHER_CTX_new failed")
        self._outl = ctypes.c_int()
        if lib.EVP_EncryptInit_ex(self._ctx, cipher, None, key, iv) != 1:
            self.close()
            raise RuntimeError("EVP_EncryptInit_ex failed")

    def _update(self, address: int, length: int) -> int:
        # EVP allows the output to be exactly the input; the GIL is released during the call.
        if self._lib.EVP_EncryptUpdate(
            self._ctx, address, ctypes.byref(self._outl), address, length
        ) != 1:
            raise RuntimeError("EVP_EncryptUpdate failed")
        return self._outl.value

    def update(self, buf: memoryview) -> None:
        if len(buf) % BLOCK:
            raise ValueError("a middle piece of a CBC stream must be whole 16-byte blocks")
        if len(buf):
            self._update(_address(buf), len(buf))

    def finish(self, buf: memoryview, length: int) -> int:
        total = padded_length(length)
        if len(buf) < total:
            raise ValueError(f"the last piece needs {total} bytes of buffer, has {len(buf)}")
        address = _address(buf)
        done = self._update(address, length) if length else 0
        # The partial block EVP kept back, padded, written right after the whole blocks.
        if self._lib.EVP_EncryptFinal_ex(self._ctx, address + done, ctypes.byref(self._outl)) != 1:
            raise RuntimeError("EVP_EncryptFinal_ex failed")
        return done + self._outl.value

    def close(self) -> None:
        if self._ctx:
            self._lib.EVP_CIPHER_CTX_free(self._ctx)
            self._ctx = None


class LibcryptoBackend:
    """The system libcrypto through ctypes: in place, without the GIL."""

    name = "libcrypto"

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._lib = lib
        void_p, c_int = ctypes.c_void_p, ctypes.c_int
        lib.EVP_CIPHER_CTX_new.restype = void_p
        lib.EVP_CIPHER_CTX_new.argtypes = []
        lib.EVP_CIPHER_CTX_free.restype = None
        lib.EVP_CIPHER_CTX_free.argtypes = [void_p]
        lib.EVP_aes_128_cbc.restype = void_p
        lib.EVP_aes_128_cbc.argtypes = []
        lib.EVP_EncryptInit_ex.restype = c_int
        lib.EVP_EncryptInit_ex.argtypes = [void_p, void_p, void_p, ctypes.c_char_p,
                                           ctypes.c_char_p]
        lib.EVP_EncryptUpdate.restype = c_int
        lib.EVP_EncryptUpdate.argtypes = [void_p, void_p, ctypes.POINTER(c_int), void_p, c_int]
        lib.EVP_EncryptFinal_ex.restype = c_int
        lib.EVP_EncryptFinal_ex.argtypes = [void_p, void_p, ctypes.POINTER(c_int)]
        cipher = lib.EVP_aes_128_cbc()
        if not cipher:
            raise OSError(f"{path} has no AES-128-CBC")
        self._cipher: int = cipher

    def encryptor(self, key: bytes, iv: bytes) -> CbcEncryptor:
        check_key_iv(key, iv)
        return _LibcryptoEncryptor(self._lib, self._cipher, key, iv)


class _CryptographyEncryptor:
    def __init__(self, key: bytes, iv: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        self._scratch = bytearray()

    def update(self, buf: memoryview) -> None:
        if len(buf) % BLOCK:
            raise ValueError("a middle piece of a CBC stream must be whole 16-byte blocks")
        if len(self._scratch) < len(buf) + BLOCK:
            self._scratch = bytearray(len(buf) + BLOCK)
        # cryptography refuses overlapping input and output: through a scratch buffer.
        produced = self._encryptor.update_into(buf, self._scratch)
        buf[:produced] = memoryview(self._scratch)[:produced]

    def finish(self, buf: memoryview, length: int) -> int:
        total = padded_length(length)
        if len(buf) < total:
            raise ValueError(f"the last piece needs {total} bytes of buffer, has {len(buf)}")
        pad = total - length
        buf[length:total] = bytes([pad]) * pad
        self.update(buf[:total])
        self._encryptor.finalize()
        return total

    def close(self) -> None:
        self._scratch = bytearray()


class CryptographyBackend:
    """The ``cryptography`` package: the fallback where libcrypto cannot be loaded."""

    name = "cryptography"

    def encryptor(self, key: bytes, iv: bytes) -> CbcEncryptor:
        check_key_iv(key, iv)
        return _CryptographyEncryptor(key, iv)


def _passes_known_answer(backend: Backend) -> bool:
    buf = bytearray(_KAT_PLAIN) + bytearray(BLOCK)
    encryptor = backend.encryptor(_KAT_KEY, _KAT_IV)
    try:
        encryptor.finish(memoryview(buf), BLOCK)
    finally:
        encryptor.close()
    return bytes(buf[:BLOCK]) == _KAT_CIPHER


def load_backend(names: Sequence[str] = LIBCRYPTO_NAMES) -> Backend:
    """The first of ``names`` that loads and encrypts the known answer, else ``cryptography``."""
    for name in names:
        try:
            backend: Backend = LibcryptoBackend(ctypes.CDLL(name), name)
        except (OSError, AttributeError):
            continue  # not there, or not an OpenSSL with the EVP functions
        if _passes_known_answer(backend):
            return backend
    return CryptographyBackend()


_default: Backend | None = None
_default_lock = threading.Lock()


def default_backend() -> Backend:
    """The backend every stage uses, loaded on first use (not at import: the CLI's start-up
    should not pay for a library the command may never need)."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                _default = load_backend()
    return _default


def encrypt_in_place(
    buf: bytearray | memoryview, length: int, key: bytes, iv: bytes,
    *, backend: Backend | None = None,
) -> int:
    """Replace ``buf[:length]`` with its AES-128-CBC ciphertext, PKCS#7 padding written into
    the 1-16 bytes after it (``buf`` must hold them); returns the ciphertext length."""
    encryptor = (backend or default_backend()).encryptor(key, iv)
    try:
        return encryptor.finish(memoryview(buf), length)
    finally:
        encryptor.close()
