"""The in-place AES-128-CBC of pipeline.aes: the lane library (AES-NI, several streams side by
side), the libcrypto backend and its `cryptography` fallback each produce exactly the reference
ciphertext (and OpenSSL's command line's), at every size where padding changes shape, in one
piece or streamed, one stream or many at once; and the next backend is taken when one is not
usable. On an x86-64 machine with AES-NI the lane library must be the one in use: a missing
build fails here rather than being skipped."""

from __future__ import annotations

import gc
import os
import platform
import random
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from pipeline import aes
from pipeline.aes import (
    BLOCK,
    Backend,
    CryptographyBackend,
    LanesBackend,
    LibcryptoBackend,
    Piece,
    load_backend,
)

from support import encrypt_bytes

KEY = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
IV = bytes.fromhex("a0a1a2a3a4a5a6a7a8a9aaabacadaeaf")
#: Empty, under, at and over one and two blocks, and sizes around a megabyte.
SIZES = [0, 1, 15, 16, 17, 31, 32, 33, 1000, (1 << 20) - 1, 1 << 20, (1 << 20) + 17]


def plaintext(size: int) -> bytes:
    # A repeating, position-dependent pattern: a cipher that skipped or reordered blocks shows.
    return bytes((i * 7 + i // 251) & 0xFF for i in range(size))


def has_aesni() -> bool:
    """What the CPU says, read independently of the library (x86-64 Linux: /proc/cpuinfo)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        return False
    return "aes" in flags.split()


def lanes_backend() -> Backend:
    """The lane library, which must be built and in use wherever the CPU has AES-NI."""
    if not has_aesni():
        pytest.skip("no AES-NI on this CPU: the lane library is not used here")
    loaded = aes.default_backend()
    assert isinstance(loaded, LanesBackend), (
        f"this CPU has AES-NI but the backend in use is {loaded.name}: "
        f"{aes.LANES_LIBRARY} was not built (scripts/setup.sh builds it)"
    )
    return loaded


def libcrypto_backend() -> Backend:
    loaded = load_backend(lanes_library=None)
    assert isinstance(loaded, LibcryptoBackend), "this machine's libcrypto did not load"
    return loaded


BACKENDS = {
    "aesni-lanes": lanes_backend,
    "libcrypto": libcrypto_backend,
    "cryptography": CryptographyBackend,
}


def encrypt_in_place(buf: bytearray, length: int, key: bytes, iv: bytes,
                     backend: Backend | None = None) -> int:
    """``buf[:length]`` encrypted in place as one stream in one lane, padding included, as the
    segment encryption of pipeline.crypto does it; returns the ciphertext length."""
    lanes = (backend or aes.default_backend()).lanes(1)
    try:
        lanes.start(0, key, iv)
        return lanes.encrypt([Piece(0, memoryview(buf), length, True)])[0]
    finally:
        lanes.close()


@pytest.fixture(params=list(BACKENDS))
def backend(request: pytest.FixtureRequest) -> Backend:
    return BACKENDS[request.param]()


class TestCiphertext:
    @pytest.mark.parametrize("size", SIZES)
    def test_in_place_matches_the_reference_at_every_size(
        self, backend: Backend, size: int
    ) -> None:
        """The buffer ends up holding the reference ciphertext, PKCS#7 padding included."""
        data = plaintext(size)
        buf = bytearray(data) + bytearray(BLOCK)

        length = encrypt_in_place(buf, size, KEY, IV, backend)

        assert length == size + BLOCK - size % BLOCK
        assert bytes(buf[:length]) == encrypt_bytes(data, KEY, IV)

    @pytest.mark.parametrize("size", [0, 17, 4096 + 5])
    def test_matches_openssl_enc(self, backend: Backend, size: int) -> None:
        """What a player's decryptor expects: `openssl enc -aes-128-cbc` gives the same bytes."""
        data = plaintext(size)
        buf = bytearray(data) + bytearray(BLOCK)
        length = encrypt_in_place(buf, size, KEY, IV, backend)
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
        lanes = backend.lanes(1)
        lanes.start(0, KEY, IV)
        offset = 0
        for piece in pieces:
            lanes.encrypt([Piece(0, view[offset : offset + piece], piece, False)])
            offset += piece
        length = offset + lanes.encrypt([Piece(0, view[offset:], tail, True)])[0]
        lanes.close()

        assert bytes(buf[:length]) == encrypt_bytes(data, KEY, IV)

    def test_threads_encrypting_at_once_do_not_mix_streams(self) -> None:
        """Each lane is its own stream: 16 buffers under 16 keys and IVs, each in lanes of its
        own, encrypted on 4 threads at once (every backend's library call releases the GIL),
        all match the reference."""
        jobs = [(bytes([n]) * 16, bytes([255 - n]) * 16, plaintext(65536 + n)) for n in range(16)]

        def encrypt(job: tuple[bytes, bytes, bytes]) -> bytes:
            key, iv, data = job
            buf = bytearray(data) + bytearray(BLOCK)
            return bytes(buf[: encrypt_in_place(buf, len(data), key, iv)])

        with ThreadPoolExecutor(max_workers=4) as pool:
            results = list(pool.map(encrypt, jobs))
        assert results == [encrypt_bytes(data, key, iv) for key, iv, data in jobs]


class TestRefusals:
    @pytest.mark.parametrize(("size", "length", "last", "says"), [
        # A middle piece of 17 bytes would shift every later block: refused, not mis-encrypted.
        (32, 17, False, "16-byte blocks"),
        # -16 bytes (whole blocks, to %) is not handed to the library as nearly 2**64 to write.
        (64, -BLOCK, False, "16-byte blocks"),
        # No write past the caller's buffer: 16 bytes of plaintext need 32 bytes of room.
        (16, 16, True, "needs 32 bytes"),
    ], ids=["middle-not-whole-blocks", "negative-length", "no-room-for-the-padding"])
    def test_a_piece_that_cannot_be_encrypted_as_given_is_refused(
        self, backend: Backend, size: int, length: int, last: bool, says: str
    ) -> None:
        """A piece whose length breaks the CBC chain or the caller's buffer is refused with
        the reason, before any byte is written."""
        buf = bytearray(size)
        lanes = backend.lanes(1)
        try:
            lanes.start(0, KEY, IV)
            with pytest.raises(ValueError, match=says):
                lanes.encrypt([Piece(0, memoryview(buf), length, last)])
        finally:
            lanes.close()
        assert buf == bytearray(size)

    @pytest.mark.parametrize(("key", "iv"), [(KEY[:15], IV), (KEY + b"\x00", IV), (KEY, IV[:8])])
    def test_key_and_iv_must_be_16_bytes(self, backend: Backend, key: bytes, iv: bytes) -> None:
        """No AES-192/256 by accident, no short IV."""
        lanes = backend.lanes(1)
        try:
            with pytest.raises(ValueError, match="16-byte"):
                lanes.start(0, key, iv)
        finally:
            lanes.close()

    @pytest.mark.parametrize("lane", [-1, -2, 2])
    def test_a_lane_outside_the_width_is_refused(self, backend: Backend, lane: int) -> None:
        """Lane -1 of two is not lane 1: a stream started there would overwrite another's
        key and chain."""
        lanes = backend.lanes(2)
        try:
            with pytest.raises(ValueError, match="lanes are numbered 0 to 1"):
                lanes.start(lane, KEY, IV)
        finally:
            lanes.close()


class TestLoading:
    def test_this_machine_uses_the_lane_library_where_the_cpu_has_aes_ni(self) -> None:
        """The fastest backend is the one in use: the lane library on a CPU with AES-NI
        (failing, not skipping, when it was not built), else the system libcrypto."""
        expected = "aesni-lanes" if has_aesni() else "libcrypto"
        assert aes.default_backend().name == expected

    def test_without_the_lane_library_the_system_libcrypto_is_used(self) -> None:
        """A lane library that was never built is passed over for the system libcrypto, which
        still encrypts correctly, one stream and several lanes alike."""
        backend = load_backend(lanes_library=Path("/nonexistent/libcbclanes.so"))
        assert backend.name == "libcrypto"
        data = plaintext(100)
        buf = bytearray(data) + bytearray(BLOCK)
        length = encrypt_in_place(buf, len(data), KEY, IV, backend)
        assert bytes(buf[:length]) == encrypt_bytes(data, KEY, IV)

    def test_a_library_that_is_not_the_lane_library_is_passed_over(self) -> None:
        """A file at the lane library's path without its functions (here libc) is not used."""
        libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
        assert libc.is_file()  # a library that loads, not one missing (another test's case)
        backend = load_backend(lanes_library=libc)
        assert backend.name == "libcrypto"

    @pytest.mark.parametrize(
        "names",
        [("libhlsvault-no-such-library.so.9",), ("libc.so.6",), ()],
        ids=["missing", "not-openssl", "none"],
    )
    def test_falls_back_to_cryptography(self, names: tuple[str, ...]) -> None:
        """A library that is missing, or loads but has no EVP functions, is skipped, and the
        fallback still encrypts correctly."""
        backend = load_backend(names, lanes_library=None)
        assert backend.name == "cryptography"
        data = plaintext(100)
        buf = bytearray(data) + bytearray(BLOCK)
        length = encrypt_in_place(buf, len(data), KEY, IV, backend)
        assert bytes(buf[:length]) == encrypt_bytes(data, KEY, IV)

    def test_a_library_that_fails_while_answering_is_passed_over_with_a_warning(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A lane library that raises something other than OSError while it gives the known
        answer (a broken build) is passed over for libcrypto, and the warning says why,
        instead of every encryption failing."""
        lanes_backend()
        answer = aes.passes_known_answer

        def broken(backend: Backend) -> bool:
            if isinstance(backend, LanesBackend):
                raise RuntimeError("the lane library refused to run")
            return answer(backend)

        monkeypatch.setattr(aes, "passes_known_answer", broken)
        monkeypatch.setattr(aes, "_default", None)
        with capture_logs() as logs:
            backend = aes.default_backend()
        assert backend.name == "libcrypto"
        [line] = [entry for entry in logs if entry["event"] == "aes backend"]
        assert line["log_level"] == "warning"
        assert "refused to run" in line["passed_over"]

    def test_first_library_that_loads_wins(self) -> None:
        """A missing name before the real one does not prevent loading it."""
        backend = load_backend(("libhlsvault-no-such-library.so.9", *aes.LIBCRYPTO_NAMES),
                               lanes_library=None)
        assert backend.name == "libcrypto"


class TestLanes:
    """Several independent streams at once (what the lane library is for), on every backend:
    each lane's bytes are exactly its own stream's reference ciphertext."""

    def test_nist_sp_800_38a_cbc_known_answer_in_every_lane(self, backend: Backend) -> None:
        """F.2.1 CBC-AES128.Encrypt: the four blocks, in eight lanes at once, each split into
        pieces at a different place."""
        lanes = backend.lanes(8)
        plain = aes.KAT_PLAIN
        bufs = [memoryview(bytearray(plain) + bytearray(BLOCK)) for _ in range(8)]
        for lane in range(8):
            lanes.start(lane, aes.KAT_KEY, aes.KAT_IV)
        # Lane n: a first middle piece of n % 4 blocks, then the rest as its last piece.
        firsts = [BLOCK * (lane % 4) for lane in range(8)]
        lanes.encrypt([Piece(lane, bufs[lane][:first], first, False)
                       for lane, first in enumerate(firsts)])
        lanes.encrypt([Piece(lane, bufs[lane][first:], len(plain) - first, True)
                       for lane, first in enumerate(firsts)])
        lanes.close()
        for buf in bufs:
            assert bytes(buf[: len(plain)]) == aes.KAT_CIPHER
        assert aes.passes_known_answer(backend)

    @pytest.mark.parametrize("seed", range(4))
    def test_random_keys_ivs_and_lengths_match_the_reference(
        self, backend: Backend, seed: int
    ) -> None:
        """Twelve lanes (more than the library interleaves), each with its own random key, IV
        and length, among them 0, 1, 15, 16, 17, 4095 and over a megabyte, encrypted in pieces
        of random whole-block sizes: every lane ends with its own stream's ciphertext."""
        rng = random.Random(seed)
        lengths = [0, 1, 15, 16, 17, 4095, (1 << 20) + 5, *(rng.randrange(1, 70000)
                                                              for _ in range(5))]
        rng.shuffle(lengths)
        streams = [(rng.randbytes(16), rng.randbytes(16), rng.randbytes(n)) for n in lengths]
        lanes = backend.lanes(len(streams))
        bufs = [memoryview(bytearray(data) + bytearray(BLOCK)) for _, _, data in streams]
        offsets = [0] * len(streams)
        for lane, (key, iv, _) in enumerate(streams):
            lanes.start(lane, key, iv)
        results: list[bytes | None] = [None] * len(streams)
        while any(result is None for result in results):
            pieces = []
            for lane, (_, _, data) in enumerate(streams):
                if results[lane] is not None or rng.random() < 0.2:
                    continue  # done, or sitting this call out (lanes need not move together)
                left = len(data) - offsets[lane]
                size = BLOCK * rng.randrange(0, 4096)
                last = size >= left
                length = left if last else size
                pieces.append(Piece(lane, bufs[lane][offsets[lane]:], length, last))
            for piece, length in zip(pieces, lanes.encrypt(pieces), strict=True):
                offsets[piece.lane] += length
                if piece.last:
                    results[piece.lane] = bytes(bufs[piece.lane][: offsets[piece.lane]])
        lanes.close()
        assert results == [encrypt_bytes(data, key, iv) for key, iv, data in streams]

    def test_a_lane_is_reused_for_a_new_stream_after_its_last_piece(
        self, backend: Backend
    ) -> None:
        """A lane that finished one segment starts the next under a new key and IV, with no
        trace of the first stream's chain."""
        lanes = backend.lanes(2)
        first, second = plaintext(4096 + 3), plaintext(100)
        buf = memoryview(bytearray(4096 + 3 + BLOCK))
        lanes.start(1, KEY, IV)
        buf[: len(first)] = first
        done = lanes.encrypt([Piece(1, buf, len(first), True)])[0]
        assert bytes(buf[:done]) == encrypt_bytes(first, KEY, IV)
        other_key, other_iv = bytes(range(16, 32)), bytes(16)
        lanes.start(1, other_key, other_iv)
        buf[: len(second)] = second
        done = lanes.encrypt([Piece(1, buf, len(second), True)])[0]
        lanes.close()
        assert bytes(buf[:done]) == encrypt_bytes(second, other_key, other_iv)

    def test_lanes_on_two_threads_do_not_mix(self, backend: Backend) -> None:
        """Two threads, each with its own eight lanes under their own keys, at once: every
        stream matches the reference (the library keeps no state between calls)."""

        def run(seed: int) -> bool:
            rng = random.Random(seed)
            streams = [(rng.randbytes(16), rng.randbytes(16), rng.randbytes(200_000 + n))
                       for n in range(8)]
            lanes = backend.lanes(8)
            bufs = [memoryview(bytearray(d) + bytearray(BLOCK)) for _, _, d in streams]
            for lane, (key, iv, _) in enumerate(streams):
                lanes.start(lane, key, iv)
            lanes.encrypt([Piece(n, bufs[n], len(streams[n][2]), True) for n in range(8)])
            lanes.close()
            return all(bytes(bufs[n][: aes.padded_length(len(d))]) == encrypt_bytes(d, k, i)
                       for n, (k, i, d) in enumerate(streams))

        with ThreadPoolExecutor(max_workers=2) as pool:
            assert all(pool.map(run, range(6)))

    def test_one_piece_per_lane_in_a_call(self, backend: Backend) -> None:
        """Two pieces of one stream in one call would have no defined chain: refused."""
        lanes = backend.lanes(2)
        lanes.start(0, KEY, IV)
        buf = memoryview(bytearray(64))
        with pytest.raises(ValueError, match="one piece per lane"):
            lanes.encrypt([Piece(0, buf[:16], 16, False), Piece(0, buf[16:], 16, False)])
        lanes.close()

    def test_a_lane_without_a_stream_is_refused(self, backend: Backend) -> None:
        """A lane whose stream ended (or never started) has no key: refused, not encrypted
        under a stale or zero key."""
        lanes = backend.lanes(2)
        lanes.start(0, KEY, IV)
        buf = memoryview(bytearray(32))
        lanes.encrypt([Piece(0, buf, 16, True)])
        with pytest.raises(ValueError, match="no stream"):
            lanes.encrypt([Piece(0, buf, 16, True)])
        with pytest.raises(ValueError, match="no stream"):
            lanes.encrypt([Piece(1, buf, 16, True)])
        lanes.close()


class TestLaneLibrary:
    def test_the_key_and_chain_held_are_wiped_when_a_stream_ends(self) -> None:
        """Keys do not linger in the lanes' own memory: after a stream's last piece, and after
        close, the key and chain bytes the lanes held are zero."""
        backend = lanes_backend()
        lanes = backend.lanes(2)
        lanes.start(0, KEY, IV)
        lanes.start(1, KEY, IV)
        held = lanes._keys, lanes._chains  # type: ignore[attr-defined]
        assert KEY in bytes(held[0])
        buf = memoryview(bytearray(32))
        lanes.encrypt([Piece(0, buf, 5, True)])
        assert bytes(held[0])[:BLOCK] == bytes(BLOCK) and bytes(held[1])[:BLOCK] == bytes(BLOCK)
        lanes.close()
        assert bytes(held[0]) == bytes(2 * BLOCK) and bytes(held[1]) == bytes(2 * BLOCK)

    def test_lanes_dropped_without_close_are_wiped(self) -> None:
        """Lanes that are let go without close (an exception between start and close in a
        caller) still wipe the keys and chains they held."""
        lanes = lanes_backend().lanes(2)
        lanes.start(1, KEY, IV)
        held = lanes._keys, lanes._chains  # type: ignore[attr-defined]
        assert KEY in bytes(held[0])
        del lanes
        gc.collect()
        assert bytes(held[0]) == bytes(2 * BLOCK) and bytes(held[1]) == bytes(2 * BLOCK)

    def test_a_build_of_another_interface_is_not_used(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A stale library (another ABI number) is passed over for libcrypto, not called with
        arguments it does not expect."""
        lanes_backend()
        monkeypatch.setattr(aes, "LANES_ABI", aes.LANES_ABI + 1)
        assert load_backend().name == "libcrypto"


def test_the_build_is_the_source_of_this_checkout() -> None:
    """setup.sh rebuilds the library when cbclanes.c is newer: the built file is not older
    than its source (a stale library would be tested instead of the code under review)."""
    if not has_aesni():
        pytest.skip("no AES-NI on this CPU: the lane library is not built here")
    source = Path(aes.__file__).with_name("cbclanes.c")
    assert aes.LANES_LIBRARY.exists(), "scripts/setup.sh did not build the lane library"
    assert os.stat(aes.LANES_LIBRARY).st_mtime >= os.stat(source).st_mtime
