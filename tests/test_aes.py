"""The in-place AES-128-CBC of pipeline.aes: the libcrypto backend and its `cryptography`
fallback each produce exactly the reference ciphertext (and OpenSSL's command line's), at every
size where padding changes shape, in one piece or streamed; and the fallback is taken when no
usable libcrypto loads."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from pipeline import aes
from pipeline.aes import BLOCK, Backend, CryptographyBackend, LibcryptoBackend, load_backend

from support import encrypt_bytes

KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
IV = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
#: Empty, under, at and over one and two blocks, and sizes around a megabyte.
SIZES = [0, 1, 15, 16, 17, 31, 32, 33, 1000, (1 << 20) - 1, 1 << 20, (1 << 20) + 17]


def plaintext(size: int) -> bytes:
    # A repeating, position-dependent pattern: a cipher that skipped or reordered blocks shows.
    return bytes((i * 7 + i // 251) & 0xFF for i in range(size))


@pytest.fixture(params=["libcrypto", "cryptography"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "libcrypto":
        loaded = aes.default_backend()
        assert isinstance(loaded, LibcryptoBackend), "this machine's libcrypto did not load"
        return loaded
    return CryptographyBackend()


class TestCiphertext:
    @pytest.mark.parametrize("size", SIZES)
    def test_in_place_matches_the_reference_at_every_size(
        self, backend: Backend, size: int
    ) -> None:
        """The buffer ends up holding the reference ciphertext, PKCS#7 padding included."""
        data = plaintext(size)
        buf = bytearray(data) + bytearray(BLOCK)

        length = aes.encrypt_in_place(buf, size, KEY, IV, backend=backend)

        assert length == size + BLOCK - size % BLOCK
        assert bytes(buf[:length]) == encrypt_bytes(data, KEY, IV)

    @pytest.mark.parametrize("size", [0, 17, 4096 + 5])
    def test_matches_openssl_enc(self, backend: Backend, size: int) -> None:
        """What a player's decryptor expects: `openssl enc -aes-128-cbc` gives the same bytes."""
        data = plaintext(size)
        buf = bytearray(data) + bytearray(BLOCK)
        length = aes.encrypt_in_place(buf, size, KEY, IV, backend=backend)
        done = subprocess.run(
            ["openssl", "enc", "-aes-128-cbc", "-K", KEY.hex(), "-iv", IV.hex()],
            input=data, capture_output=True, timeout=30, check=True,
        )
        assert bytes(buf[:length]) == done.stdout

    @pytest.mark.parametrize("pieces", [[16], [16, 32], [4096, 4096, 16], [1 << 20, 48]])
    def test_streamed_in_pieces_equals_one_piece(
        self, backend: Backend, pieces: list[int]
    ) -> None:
        """A segment encrypted piece by piece (whole blocks, then a last piece with padding) is
        the same CBC stream as the segment encrypted at once."""
        tail = 5
        data = plaintext(sum(pieces) + tail)
        buf = bytearray(data) + bytearray(BLOCK)
        view = memoryview(buf)
        encryptor = backend.encryptor(KEY, IV)
        offset = 0
        for piece in pieces:
            encryptor.update(view[offset : offset + piece])
            offset += piece
        length = offset + encryptor.finish(view[offset:], tail)
        encryptor.close()

        assert bytes(buf[:length]) == encrypt_bytes(data, KEY, IV)

    def test_threads_encrypting_at_once_do_not_mix_streams(self) -> None:
        """Each encryptor is its own stream: 16 buffers under 16 keys and IVs, encrypted on 4
        threads at once (the libcrypto backend releases the GIL), all match the reference."""
        jobs = [(bytes([n]) * 16, bytes([255 - n]) * 16, plaintext(65536 + n)) for n in range(16)]

        def encrypt(job: tuple[bytes, bytes, bytes]) -> bytes:
            key, iv, data = job
            buf = bytearray(data) + bytearray(BLOCK)
            return bytes(buf[: aes.encrypt_in_place(buf, len(data), key, iv)])

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(encrypt, jobs))
        assert results == [encrypt_bytes(data, key, iv) for key, iv, data in jobs]


class TestRefusals:
    def test_middle_piece_must_be_whole_blocks(self, backend: Backend) -> None:
        """A middle piece of 17 bytes would shift every later block: refused, not mis-encrypted."""
        encryptor = backend.encryptor(KEY, IV)
        with pytest.raises(ValueError, match="16-byte blocks"):
            encryptor.update(memoryview(bytearray(17)))
        encryptor.close()

    def test_last_piece_needs_room_for_the_padding(self, backend: Backend) -> None:
        """No write past the caller's buffer: 16 bytes of plaintext need 32 bytes of room."""
        encryptor = backend.encryptor(KEY, IV)
        with pytest.raises(ValueError, match="needs 32 bytes"):
            encryptor.finish(memoryview(bytearray(16)), 16)
        encryptor.close()

    @pytest.mark.parametrize(("key", "iv"), [(KEY[:15], IV), (KEY + b"\x00", IV), (KEY, IV[:8])])
    def test_key_and_iv_must_be_16_bytes(self, backend: Backend, key: bytes, iv: bytes) -> None:
        """No AES-192/256 by accident, no short IV."""
        with pytest.raises(ValueError, match="16-byte"):
            backend.encryptor(key, iv)


class TestLoading:
    def test_this_machine_uses_the_system_libcrypto(self) -> None:
        """The fast path is the one in use here (Debian's libcrypto.so.3)."""
        assert aes.default_backend().name == "libcrypto"

    @pytest.mark.parametrize(
        "names",
        [("libhlsvault-no-such-library.so.9",), ("libc.so.6",), ()],
        ids=["missing", "not-openssl", "none"],
    )
    def test_falls_back_to_cryptography(self, names: tuple[str, ...]) -> None:
        """A library that is missing, or loads but has no EVP functions, is skipped, and the
        fallback still encrypts correctly."""
        backend = load_backend(names)
        assert backend.name == "cryptography"
        data = plaintext(100)
        buf = bytearray(data) + bytearray(BLOCK)
        length = aes.encrypt_in_place(buf, len(data), KEY, IV, backend=backend)
        assert bytes(buf[:length]) == encrypt_bytes(data, KEY, IV)

    def test_first_library_that_loads_wins(self) -> None:
        """A missing name before the real one does not prevent loading it."""
        backend = load_backend(("libhlsvault-no-such-library.so.9", *aes.LIBCRYPTO_NAMES))
        assert backend.name == "libcrypto"
