"""Segment encryption: AES-128-CBC with PKCS#7, checked against OpenSSL's command line as an
independent reference, and the RFC 8216 IV derivation."""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from pipeline import aes
from pipeline.crypto import (
    BLOCK,
    CHUNK,
    SegmentFile,
    decrypt_file,
    encrypt_file,
    encrypt_files,
    encrypt_files_in_place,
    encrypt_in_place,
    iv_for_sequence,
)
from pipeline.errors import PermanentError, TransientError

from support import decrypt_bytes, encrypt_bytes

KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
OTHER_KEY = bytes.fromhex("f0e1d2c3b4a5968778695a4b3c2d1e0f")
IV = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
#: Every size where padding or chunking changes shape: empty, under, at and over one block,
#: and on both sides of the streaming chunk.
SIZES = [0, 1, 15, 16, 17, CHUNK - 1, CHUNK, CHUNK + 5, CHUNK + 16]
#: A segment-like plaintext: the same few 16-byte blocks over and over, which is exactly what
#: ECB, a reused IV or a no-op cipher would leak.
PATTERN = b"\x47\x40\x11\x10" + b"\x00" * 13 + b"hlsvault-segment"


def plaintext(size: int) -> bytes:
    return (PATTERN * (size // len(PATTERN) + 1))[:size]


def openssl(*args: str, data: bytes) -> bytes:
    done = subprocess.run(
        ["openssl", "enc", "-aes-128-cbc", *args], input=data, capture_output=True,
        timeout=30, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    return done.stdout


def openssl_encrypt(data: bytes, key: bytes, iv: bytes) -> bytes:
    return openssl("-K", key.hex(), "-iv", iv.hex(), data=data)


def openssl_decrypt(data: bytes, key: bytes, iv: bytes) -> bytes:
    return openssl("-d", "-K", key.hex(), "-iv", iv.hex(), data=data)


def raw_cbc_decrypt(data: bytes, key: bytes, iv: bytes) -> bytes:
    """Decrypt without unpadding, so the padding itself can be inspected."""
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    return decryptor.update(data) + decryptor.finalize()


def encrypt_via_file(tmp_path: Path, data: bytes, key: bytes = KEY, iv: bytes = IV) -> bytes:
    src, dst = tmp_path / "plain.ts", tmp_path / "enc.ts"
    src.write_bytes(data)
    written = encrypt_file(src, dst, key, iv)
    ciphertext = dst.read_bytes()
    assert written == len(ciphertext)
    return ciphertext


class TestRoundTrip:
    @pytest.mark.parametrize("size", SIZES)
    def test_file_api_round_trips_byte_exact(self, tmp_path: Path, size: int) -> None:
        """encrypt_file then decrypt_file gives back exactly the original bytes, at every size."""
        data = plaintext(size)
        encrypt_via_file(tmp_path, data)

        written = decrypt_file(tmp_path / "enc.ts", tmp_path / "out.ts", KEY, IV)

        assert (tmp_path / "out.ts").read_bytes() == data
        assert written == size

    @pytest.mark.parametrize("size", SIZES)
    def test_bytes_api_round_trips_byte_exact(self, size: int) -> None:
        """encrypt_bytes then decrypt_bytes gives back exactly the original bytes, at every size."""
        data = plaintext(size)
        assert decrypt_bytes(encrypt_bytes(data, KEY, IV), KEY, IV) == data

    @pytest.mark.parametrize("size", SIZES)
    def test_file_and_bytes_apis_produce_the_same_ciphertext(
        self, tmp_path: Path, size: int
    ) -> None:
        """The streaming file API and the buffer API are the same cipher, so either decrypts the
        other's output."""
        data = plaintext(size)
        assert encrypt_via_file(tmp_path, data) == encrypt_bytes(data, KEY, IV)

    def test_file_api_leaves_only_the_output_behind(self, tmp_path: Path) -> None:
        """Both file functions write through a temporary name and leave no temporary file."""
        encrypt_via_file(tmp_path, plaintext(CHUNK + 5))
        decrypt_file(tmp_path / "enc.ts", tmp_path / "out.ts", KEY, IV)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.ts", "out.ts", "plain.ts"]


def backend_named(name: str) -> aes.Backend:
    if name == "default":
        return aes.default_backend()
    if name == "libcrypto":
        return aes.load_backend(lanes_library=None)
    return aes.CryptographyBackend()


class TestManyFilesAtOnce:
    """encrypt_files: a chunk's segments several per thread at once, each file's bytes exactly
    its own reference ciphertext, whichever backend does the work."""

    @pytest.mark.parametrize("backend", ["default", "libcrypto", "cryptography"])
    @pytest.mark.parametrize("threads", [1, 2])
    def test_more_files_than_lanes_of_every_shape(
        self, tmp_path: Path, backend: str, threads: int
    ) -> None:
        """Three times as many files as lanes, of sizes where padding and pieces change shape
        (0, 1, 15, 16, 17, 4095, a piece, over several pieces), each under its own key and
        IV: every output is the reference ciphertext and its length is returned in order."""
        shapes = [0, 1, 15, 16, 17, 4095, CHUNK - 1, CHUNK, CHUNK + 5, 3 * CHUNK + 16]
        count = 3 * aes.LANES
        sizes = [shapes[n % len(shapes)] + 977 * (n // len(shapes)) for n in range(count)]
        jobs = []
        for n, size in enumerate(sizes):
            (tmp_path / f"p{n}").write_bytes(plaintext(size))
            jobs.append(SegmentFile(tmp_path / f"p{n}", tmp_path / f"e{n}",
                                    bytes([n]) * 16, iv_for_sequence(n)))
        told: list[tuple[int, int]] = []

        written = encrypt_files(jobs, threads=threads, backend=backend_named(backend),
                                on_encrypted=lambda i, n: told.append((i, n)))

        expected = [encrypt_bytes(plaintext(size), job.key, job.iv)
                    for size, job in zip(sizes, jobs, strict=True)]
        assert [job.dst.read_bytes() for job in jobs] == expected
        assert written == [len(e) for e in expected]
        assert sorted(told) == list(enumerate(written))
        assert not list(tmp_path.glob(".*.tmp"))

    @pytest.mark.parametrize("backend", ["default", "cryptography"])
    def test_in_place_leaves_what_encrypt_files_writes(self, tmp_path: Path, backend: str) -> None:
        """Files encrypted in place, many at once on two threads, hold exactly what the new-file
        path writes."""
        sizes = [CHUNK * (n % 3) + 977 * n for n in range(2 * aes.LANES + 3)]
        jobs = []
        for n, size in enumerate(sizes):
            (tmp_path / f"s{n}").write_bytes(plaintext(size))
            jobs.append(SegmentFile(tmp_path / f"s{n}", tmp_path / f"s{n}", KEY,
                                    iv_for_sequence(n)))

        written = encrypt_files_in_place(jobs, threads=2, backend=backend_named(backend))

        for n, (size, length) in enumerate(zip(sizes, written, strict=True)):
            expected = encrypt_bytes(plaintext(size), KEY, iv_for_sequence(n))
            assert (tmp_path / f"s{n}").read_bytes() == expected, n
            assert length == len(expected)

    def test_a_missing_file_fails_the_call_and_leaves_no_partial_output(
        self, tmp_path: Path
    ) -> None:
        """One source missing among many: the call raises, and no file of the batch is left
        half written under a temporary or a final name beyond those finished."""
        jobs = []
        for n in range(aes.LANES + 2):
            src = tmp_path / f"p{n}"
            if n != aes.LANES // 2:
                src.write_bytes(plaintext(CHUNK * 2 + n))
            jobs.append(SegmentFile(src, tmp_path / f"e{n}", KEY, iv_for_sequence(n)))

        with pytest.raises(FileNotFoundError):
            encrypt_files(jobs)

        assert not list(tmp_path.glob(".*.tmp"))
        for job in jobs:
            if job.dst.exists():
                assert job.dst.read_bytes() == encrypt_bytes(job.src.read_bytes(), job.key,
                                                             job.iv)

    def test_a_file_that_shrinks_while_encrypted_is_a_transient_error(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A segment cut short under the encryptor is not padded and passed off as whole."""
        src = tmp_path / "p0"
        src.write_bytes(plaintext(CHUNK * 3))
        real_preadv = os.preadv

        def shrinking(fd: int, buffers: list[memoryview], offset: int) -> int:
            if offset >= CHUNK:
                os.truncate(src, CHUNK + 7)
            return real_preadv(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", shrinking)
        with pytest.raises(TransientError, match="shrank"):
            encrypt_files([SegmentFile(src, tmp_path / "e0", KEY, IV)])
        assert not (tmp_path / "e0").exists()


class TestInPlace:
    @pytest.mark.parametrize("size", SIZES)
    def test_in_place_leaves_what_encrypt_file_writes(self, tmp_path: Path, size: int) -> None:
        """A file encrypted in place holds exactly the bytes encrypt_file writes to a new file,
        grown by its padding, and nothing else is left in the directory."""
        data = plaintext(size)
        expected = encrypt_via_file(tmp_path, data)
        (tmp_path / "sealed.ts").write_bytes(data)

        written = encrypt_in_place(tmp_path / "sealed.ts", KEY, IV)

        assert (tmp_path / "sealed.ts").read_bytes() == expected
        assert written == len(expected)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.ts", "plain.ts", "sealed.ts"]

    def test_many_files_on_many_threads(self, tmp_path: Path) -> None:
        """Each thread reuses one buffer of its own: 24 files of different sizes, each under its
        own IV, encrypted by 4 threads at once (new files and in place) are each exactly the
        reference ciphertext."""
        sizes = [CHUNK * (n % 3) + 977 * n for n in range(24)]
        for n, size in enumerate(sizes):
            (tmp_path / f"p{n}").write_bytes(plaintext(size))
            (tmp_path / f"s{n}").write_bytes(plaintext(size))

        def encrypt(n: int) -> None:
            encrypt_file(tmp_path / f"p{n}", tmp_path / f"e{n}", KEY, iv_for_sequence(n))
            encrypt_in_place(tmp_path / f"s{n}", KEY, iv_for_sequence(n))

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(encrypt, range(len(sizes))))
        for n, size in enumerate(sizes):
            expected = encrypt_bytes(plaintext(size), KEY, iv_for_sequence(n))
            assert (tmp_path / f"e{n}").read_bytes() == expected, n
            assert (tmp_path / f"s{n}").read_bytes() == expected, n


class TestCiphertext:
    @pytest.mark.parametrize("size", SIZES)
    def test_ciphertext_is_padded_to_the_next_whole_block(self, size: int) -> None:
        """PKCS#7 always adds 1-16 bytes, each holding the pad length: a full block when the
        plaintext is already a multiple of 16."""
        ciphertext = encrypt_bytes(plaintext(size), KEY, IV)
        pad = BLOCK - size % BLOCK

        assert len(ciphertext) == size + pad
        assert raw_cbc_decrypt(ciphertext, KEY, IV)[size:] == bytes([pad]) * pad

    @pytest.mark.parametrize("size", SIZES)
    def test_ciphertext_leaks_no_plaintext_block(self, size: int) -> None:
        """The ciphertext differs from the plaintext, contains none of its 16-byte blocks, and
        never repeats a block although the plaintext repeats the same few blocks (as ECB or a
        no-op cipher would)."""
        data = plaintext(size)
        ciphertext = encrypt_bytes(data, KEY, IV)

        assert size == 0 or ciphertext[:size] != data
        plain_blocks = {data[i : i + BLOCK] for i in range(0, size - BLOCK + 1, BLOCK)}
        assert not [block for block in plain_blocks if block in ciphertext]
        cipher_blocks = [ciphertext[i : i + BLOCK] for i in range(0, len(ciphertext), BLOCK)]
        assert len(set(cipher_blocks)) == len(cipher_blocks)

    @pytest.mark.parametrize("size", SIZES)
    def test_ciphertext_matches_openssl_byte_for_byte(self, tmp_path: Path, size: int) -> None:
        """What a player's AES-128 decryptor expects: OpenSSL's own aes-128-cbc with PKCS#7
        produces exactly the bytes encrypt_file writes, and decrypts them back."""
        data = plaintext(size)
        ciphertext = encrypt_via_file(tmp_path, data)

        assert ciphertext == openssl_encrypt(data, KEY, IV)
        assert openssl_decrypt(ciphertext, KEY, IV) == data


class TestRefusals:
    @pytest.mark.parametrize("size", [0, 17, CHUNK + 5])
    def test_wrong_key_fails_the_padding_check(self, tmp_path: Path, size: int) -> None:
        """Decrypting with another key fails on the padding check instead of returning garbage
        (a permanent error: a re-key of a corrupted version must not retry forever), and
        decrypt_file leaves neither the output nor a temporary file behind."""
        encrypt_via_file(tmp_path, plaintext(size))

        with pytest.raises(PermanentError, match="padding"):
            decrypt_file(tmp_path / "enc.ts", tmp_path / "out.ts", OTHER_KEY, IV)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["enc.ts", "plain.ts"]

    @pytest.mark.parametrize("length", [0, 15, 17, 33])
    def test_ciphertext_of_no_whole_block_is_refused(self, tmp_path: Path, length: int) -> None:
        """A truncated or empty ciphertext is refused, not a crash or an empty plaintext."""
        (tmp_path / "enc.ts").write_bytes(b"\x00" * length)
        with pytest.raises(PermanentError, match="multiple of 16"):
            decrypt_file(tmp_path / "enc.ts", tmp_path / "out.ts", KEY, IV)

    @pytest.mark.parametrize(("key", "iv"), [(KEY[:15], IV), (KEY + b"\x00", IV), (KEY, IV[:8])])
    def test_key_and_iv_must_be_16_bytes(
        self, tmp_path: Path, key: bytes, iv: bytes
    ) -> None:
        """Any key or IV that is not exactly 16 bytes is refused (no AES-192/256 by accident)."""
        (tmp_path / "plain.ts").write_bytes(b"data")
        with pytest.raises(ValueError, match="16-byte"):
            encrypt_file(tmp_path / "plain.ts", tmp_path / "enc.ts", key, iv)


class TestIvForSequence:
    @pytest.mark.parametrize(
        ("sequence", "expected"),
        [
            (0, "00000000000000000000000000000000"),
            (1, "00000000000000000000000000000001"),
            (0x0102, "00000000000000000000000000000102"),
            (2**64 + 5, "00000000000000010000000000000005"),
            (2**128 - 1, "ffffffffffffffffffffffffffffffff"),
        ],
    )
    def test_iv_is_the_sequence_number_big_endian_in_16_bytes(
        self, sequence: int, expected: str
    ) -> None:
        """RFC 8216 §5.2: without an IV attribute the IV is the media sequence number as a
        big-endian binary number, left-padded to 16 octets."""
        assert iv_for_sequence(sequence).hex() == expected

    @pytest.mark.parametrize("sequence", [-1, 2**128])
    def test_sequence_numbers_that_do_not_fit_128_bits_are_refused(self, sequence: int) -> None:
        """A negative or too large sequence number cannot silently wrap into another IV."""
        with pytest.raises(OverflowError):
            iv_for_sequence(sequence)

    def test_segment_encrypted_for_a_sequence_decrypts_as_a_player_would(self) -> None:
        """A segment encrypted with iv_for_sequence(n) decrypts with OpenSSL given the IV a player
        derives from n itself, and not with the IV of the neighbouring sequence number."""
        data = plaintext(4 * BLOCK)
        ciphertext = encrypt_bytes(data, KEY, iv_for_sequence(7))

        assert openssl_decrypt(ciphertext, KEY, bytes.fromhex(f"{7:032x}")) == data
        assert openssl_decrypt(ciphertext, KEY, bytes.fromhex(f"{6:032x}"))[:BLOCK] != data[:BLOCK]
