"""AES-128-CBC with PKCS#7 padding over caller-owned buffers, encrypted in place.

CBC encryption is serial within a stream, so one segment encrypts no faster than the latency of
ten AES rounds per block allows (what ``openssl speed -evp aes-128-cbc`` measures). HLS segments
are independent streams, each with its own IV: the fastest backend, ``aesni-lanes``
(``cbclanes.c`` beside this module, built by ``scripts/setup.sh``), runs up to :data:`LANES`
of them side by side on one core, the rounds of one stream filling the gaps the others leave.
:class:`CbcLanes` is that interface: a lane holds one stream, and one call encrypts a piece of
every busy lane. Each stream's bytes are exactly those of a single-stream CBC.

Every backend works in place, on buffers the caller reuses from one segment to the next, and
through a library call that releases the GIL for as long as it runs (a ctypes call), so threads
encrypting different segments also run on different cores. In order of preference:

- ``aesni-lanes``: the lane library, where this CPU has AES-NI and the library was built;
- ``libcrypto``: the system libcrypto's EVP interface (``EVP_EncryptUpdate`` and friends), one
  stream at a time (its lanes are encrypted one after another);
- ``cryptography``: the same work through a scratch buffer, where neither loads.

A library is used only if it encrypts the NIST known answer below. All produce the bytes
``openssl enc -aes-128-cbc`` produces. Which one is in use is logged once, when it loads.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

import structlog

log = structlog.get_logger("hlsvault.aes")

BLOCK = 16

#: Streams one thread encrypts side by side (segment files open at once in
#: :func:`pipeline.crypto.encrypt_files`): what the lane library interleaves on one core.
LANES = 8

#: Shared-library names tried in order. Only versioned names: macOS aborts a process that
#: loads its unversioned system libcrypto, and an unversioned name could be any ABI.
LIBCRYPTO_NAMES = ("libcrypto.so.3", "libcrypto.so.1.1", "libcrypto.3.dylib")

#: The lane library, built from ``cbclanes.c`` by ``scripts/setup.sh`` next to this module.
LANES_LIBRARY = Path(__file__).with_name("libcbclanes.so")
#: The C interface this module speaks (``hlsv_cbclanes_abi``): a stale build is not used.
LANES_ABI = 1

#: NIST SP 800-38A, F.2.1 (CBC-AES128.Encrypt), all four blocks: a library that does not give
#: this answer is not used, whatever it calls itself.
KAT_KEY = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
KAT_IV = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
KAT_PLAIN = bytes.fromhex(
    "6bc1bee22e409f96e93d7e117393172a" "ae2d8a571e03ac9c9eb76fac45af8e51"
    "30c81c46a35ce411e5fbc1191a0a52ef" "f69f2445df4f9b17ad2b417be66c3710"
)
KAT_CIPHER = bytes.fromhex(
    "7649abac8119b246cee98e9b12e9197d" "5086cb9b507219ee95db113a917678b2"
    "73bed6b8e3c1743b7116e69e22229516" "3ff1caa1681fac09120eca307586e1a7"
)


class CbcEncryptor(Protocol):
    """One CBC stream under one key and IV, encrypted piece by piece in place."""

    def update(self, buf: memoryview) -> None:
        """Encrypt ``buf`` in place; its length must be a multiple of 16 (a middle piece)."""

    def finish(self, buf: memoryview, length: int) -> int:
        """Encrypt the last piece, ``buf[:length]``, in place and pad it: the padding goes into
        ``buf[length:]``, which must hold 16 more bytes. Returns the ciphertext length."""

    def close(self) -> None:
        """Free what the encryptor holds; it cannot be used afterwards."""


class Piece(NamedTuple):
    """A piece of the stream in ``lane``: the plaintext ``buf[:length]``, replaced by its
    ciphertext. A middle piece is whole blocks; the ``last`` piece of a stream is padded, into
    ``buf[length:]``, which must hold 16 more bytes."""

    lane: int
    buf: memoryview
    length: int
    last: bool


class CbcLanes(Protocol):
    """``width`` lanes, each holding one CBC stream at a time under its own key and IV; one
    :meth:`encrypt` call takes a piece of any of the busy lanes and encrypts them all."""

    width: int

    def start(self, lane: int, key: bytes, iv: bytes) -> None:
        """Begin a new stream in ``lane`` (free, or whose stream had its last piece)."""

    def encrypt(self, pieces: Sequence[Piece]) -> list[int]:
        """Encrypt each piece in place, at most one per lane; returns each one's ciphertext
        length (a last piece's includes its padding). A lane whose last piece this was is
        free again."""

    def close(self) -> None:
        """Wipe the keys and chain values held; the lanes cannot be used afterwards."""


class Backend(Protocol):
    name: str

    def lanes(self, width: int) -> CbcLanes:
        """``width`` lanes of independent streams (see :class:`CbcLanes`)."""


def check_key_iv(key: bytes, iv: bytes) -> None:
    if len(key) != BLOCK or len(iv) != BLOCK:
        raise ValueError("AES-128 needs a 16-byte key and a 16-byte IV")


def padded_length(length: int) -> int:
    """PKCS#7 always adds 1 to 16 bytes: a whole block when ``length`` is already aligned."""
    return length + BLOCK - length % BLOCK


def _check_middle(buf: memoryview, length: int | None = None) -> None:
    length = len(buf) if length is None else length
    # A negative length is whole blocks by %, and a huge size_t once ctypes passes it on.
    if length < 0 or length % BLOCK or length > len(buf):
        raise ValueError("a middle piece of a CBC stream must be whole 16-byte blocks")


def _check_last(buf: memoryview, length: int) -> int:
    total = padded_length(length)
    if len(buf) < total or length < 0:
        raise ValueError(f"the last piece needs {total} bytes of buffer, has {len(buf)}")
    return total


def _pad(buf: memoryview, length: int) -> int:
    """Write the PKCS#7 padding of the last piece ``buf[:length]`` after it; returns the padded
    length (for a backend whose cipher does not pad)."""
    total = _check_last(buf, length)
    pad = total - length
    buf[length:total] = bytes([pad]) * pad
    return total


def _check_lane(lane: int, width: int) -> None:
    # Refused, not indexed: a negative lane would be another lane to Python's lists.
    if not 0 <= lane < width:
        raise ValueError(f"lanes are numbered 0 to {width - 1}")


def _address(buf: memoryview) -> int:
    # The buffer's own memory (no copy); from_buffer refuses read-only and non-contiguous ones.
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


#: A new CBC stream under a key and an IV (16 bytes each, checked by the caller).
EncryptorFactory = Callable[[bytes, bytes], CbcEncryptor]


class _SerialLanes:
    """Lanes for a backend that encrypts one stream at a time: each lane is an encryptor, and
    the pieces of a call are encrypted one after another."""

    def __init__(self, encryptor: EncryptorFactory, width: int) -> None:
        self.width = width
        self._encryptor = encryptor
        self._streams: list[CbcEncryptor | None] = [None] * width

    def start(self, lane: int, key: bytes, iv: bytes) -> None:
        _check_lane(lane, self.width)
        check_key_iv(key, iv)
        previous = self._streams[lane]
        if previous is not None:
            previous.close()
        self._streams[lane] = self._encryptor(key, iv)

    def encrypt(self, pieces: Sequence[Piece]) -> list[int]:
        _check_lanes(pieces, self.width)
        lengths = []
        for piece in pieces:
            stream = self._streams[piece.lane]
            if stream is None:
                raise ValueError(f"lane {piece.lane} has no stream: start it first")
            if piece.last:
                lengths.append(stream.finish(piece.buf, piece.length))
                stream.close()
                self._streams[piece.lane] = None
            else:
                _check_middle(piece.buf, piece.length)
                if piece.length:
                    stream.update(piece.buf[: piece.length])
                lengths.append(piece.length)
        return lengths

    def close(self) -> None:
        for stream in self._streams:
            if stream is not None:
                stream.close()
        self._streams = [None] * self.width


def _check_lanes(pieces: Sequence[Piece], width: int) -> None:
    lanes = [piece.lane for piece in pieces]
    if len(set(lanes)) != len(lanes):
        raise ValueError("one piece per lane in a call: a stream's pieces are chained")
    for lane in lanes:
        _check_lane(lane, width)


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
        _check_middle(buf)
        if len(buf):
            self._update(_address(buf), len(buf))

    def finish(self, buf: memoryview, length: int) -> int:
        _check_last(buf, length)
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
    """The system libcrypto through ctypes: in place, without the GIL, one stream at a time."""

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

    def _encryptor(self, key: bytes, iv: bytes) -> CbcEncryptor:
        return _LibcryptoEncryptor(self._lib, self._cipher, key, iv)

    def lanes(self, width: int) -> CbcLanes:
        return _SerialLanes(self._encryptor, width)


class _CryptographyEncryptor:
    def __init__(self, key: bytes, iv: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        self._encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
        self._scratch = bytearray()

    def update(self, buf: memoryview) -> None:
        _check_middle(buf)
        if len(self._scratch) < len(buf) + BLOCK:
            self._scratch = bytearray(len(buf) + BLOCK)
        # cryptography refuses overlapping input and output: through a scratch buffer.
        produced = self._encryptor.update_into(buf, self._scratch)
        buf[:produced] = memoryview(self._scratch)[:produced]

    def finish(self, buf: memoryview, length: int) -> int:
        total = _pad(buf, length)
        self.update(buf[:total])
        self._encryptor.finalize()
        return total

    def close(self) -> None:
        self._scratch = bytearray()


class CryptographyBackend:
    """The ``cryptography`` package: the fallback where libcrypto cannot be loaded."""

    name = "cryptography"

    def lanes(self, width: int) -> CbcLanes:
        return _SerialLanes(_CryptographyEncryptor, width)


class _NativeLanes:
    """Lanes of the lane library: each call hands every piece to one C call, which runs them
    side by side on this thread's core."""

    def __init__(self, lib: ctypes.CDLL, width: int) -> None:
        if width < 1:
            raise ValueError("lanes need a width of at least 1")
        self.width = width
        self._lib = lib
        # The keys and chain values live here, in memory this object wipes when it closes
        # (the C side expands each key on its own stack and wipes that before returning).
        self._keys = ctypes.create_string_buffer(BLOCK * width)
        self._chains = ctypes.create_string_buffer(BLOCK * width)
        keys, chains = ctypes.addressof(self._keys), ctypes.addressof(self._chains)
        self._key_at = [keys + BLOCK * lane for lane in range(width)]
        self._chain_at = [chains + BLOCK * lane for lane in range(width)]
        self._busy = [False] * width

    def start(self, lane: int, key: bytes, iv: bytes) -> None:
        _check_lane(lane, self.width)
        check_key_iv(key, iv)
        ctypes.memmove(self._key_at[lane], key, BLOCK)
        ctypes.memmove(self._chain_at[lane], iv, BLOCK)
        self._busy[lane] = True

    def encrypt(self, pieces: Sequence[Piece]) -> list[int]:
        _check_lanes(pieces, self.width)
        count = len(pieces)
        data = (ctypes.c_void_p * count)()
        blocks = (ctypes.c_size_t * count)()
        keys = (ctypes.c_void_p * count)()
        chains = (ctypes.c_void_p * count)()
        lengths = []
        for n, piece in enumerate(pieces):
            if not self._busy[piece.lane]:
                raise ValueError(f"lane {piece.lane} has no stream: start it first")
            if piece.last:
                total = _pad(piece.buf, piece.length)
            else:
                _check_middle(piece.buf, piece.length)
                total = piece.length
            lengths.append(total)
            blocks[n] = total // BLOCK
            data[n] = _address(piece.buf) if total else None
            keys[n] = self._key_at[piece.lane]
            chains[n] = self._chain_at[piece.lane]
        # One C call for every piece; ctypes releases the GIL for as long as it runs.
        if self._lib.hlsv_cbc_encrypt(count, data, blocks, keys, chains) != 0:
            raise RuntimeError("the lane library refused to run: this CPU has no AES-NI")
        for piece in pieces:
            if piece.last:
                self._forget(piece.lane)
        return lengths

    def _forget(self, lane: int) -> None:
        ctypes.memset(self._key_at[lane], 0, BLOCK)
        ctypes.memset(self._chain_at[lane], 0, BLOCK)
        self._busy[lane] = False

    def close(self) -> None:
        ctypes.memset(self._keys, 0, BLOCK * self.width)
        ctypes.memset(self._chains, 0, BLOCK * self.width)
        self._busy = [False] * self.width

    def __del__(self) -> None:
        # A safety net for lanes dropped without close() (every caller closes them in a
        # finally): the keys are wiped before their memory is freed. Not after an __init__
        # that failed before the buffers existed.
        if hasattr(self, "_chains"):
            self.close()


class LanesBackend:
    """The lane library (``cbclanes.c``, AES-NI): several streams side by side on one core."""

    name = "aesni-lanes"

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.path = path
        self._lib = lib
        lib.hlsv_cbclanes_abi.restype = ctypes.c_int
        lib.hlsv_cbclanes_abi.argtypes = []
        lib.hlsv_cbclanes_supported.restype = ctypes.c_int
        lib.hlsv_cbclanes_supported.argtypes = []
        void_pp = ctypes.POINTER(ctypes.c_void_p)
        lib.hlsv_cbc_encrypt.restype = ctypes.c_int
        lib.hlsv_cbc_encrypt.argtypes = [ctypes.c_size_t, void_pp,
                                         ctypes.POINTER(ctypes.c_size_t), void_pp, void_pp]
        abi = lib.hlsv_cbclanes_abi()
        if abi != LANES_ABI:
            raise OSError(f"{path} speaks interface {abi}, not {LANES_ABI}: a stale build; "
                          "run scripts/setup.sh again")
        if not lib.hlsv_cbclanes_supported():
            raise OSError("this CPU has no AES-NI")

    def lanes(self, width: int) -> CbcLanes:
        return _NativeLanes(self._lib, width)


def passes_known_answer(backend: Backend) -> bool:
    """The NIST vector, whole and in pieces, in three lanes at once: every lane must give it."""
    lanes = backend.lanes(3)
    bufs = [memoryview(bytearray(KAT_PLAIN) + bytearray(BLOCK)) for _ in range(3)]
    try:
        for lane in range(3):
            lanes.start(lane, KAT_KEY, KAT_IV)
        # Lane 0 whole; lanes 1 and 2 in two middle pieces of one and two blocks first.
        lanes.encrypt([Piece(1, bufs[1][:BLOCK], BLOCK, False),
                       Piece(2, bufs[2][: 2 * BLOCK], 2 * BLOCK, False)])
        lanes.encrypt([Piece(1, bufs[1][BLOCK : 2 * BLOCK], BLOCK, False),
                       Piece(0, bufs[0], len(KAT_PLAIN), True),
                       Piece(2, bufs[2][2 * BLOCK :], 2 * BLOCK, True)])
        lanes.encrypt([Piece(1, bufs[1][2 * BLOCK :], 2 * BLOCK, True)])
    finally:
        lanes.close()
    return all(bytes(buf[: len(KAT_CIPHER)]) == KAT_CIPHER for buf in bufs)


class _Loaded(NamedTuple):
    backend: Backend
    #: Why the lane library is not the one in use (None: it is).
    passed_over: str | None


def load_backend(
    names: Sequence[str] = LIBCRYPTO_NAMES, *, lanes_library: Path | None = LANES_LIBRARY
) -> Backend:
    """The lane library where it loads and gives the known answer, else the first of
    ``names`` that does, else ``cryptography``."""
    return _load(names, lanes_library).backend


def _load(names: Sequence[str], lanes_library: Path | None) -> _Loaded:
    passed_over = None
    if lanes_library is None:
        passed_over = "no lane library asked for"
    elif not lanes_library.exists():
        passed_over = (f"{lanes_library} was not built: scripts/setup.sh builds it from "
                       "cbclanes.c with cc")
    else:
        # Whatever a broken library raises (not only a failed load: a refusal mid-answer),
        # the next backend is used and the warning says why, rather than every encryption
        # failing.
        try:
            lanes: Backend = LanesBackend(ctypes.CDLL(str(lanes_library)), str(lanes_library))
            answered = passes_known_answer(lanes)
        except Exception as error:
            passed_over = f"{lanes_library} is not usable: {error!r}"
        else:
            if answered:
                return _Loaded(lanes, None)
            passed_over = f"{lanes_library} fails the known answer"
    for name in names:
        try:
            backend: Backend = LibcryptoBackend(ctypes.CDLL(name), name)
            answered = passes_known_answer(backend)
        except Exception:  # noqa: S112 - not there, not an OpenSSL with EVP, or broken
            continue
        if answered:
            return _Loaded(backend, passed_over)
    return _Loaded(CryptographyBackend(), passed_over)


_default: Backend | None = None
_default_lock = threading.Lock()


def default_backend() -> Backend:
    """The backend every stage uses, loaded on first use (not at import: the CLI's start-up
    should not pay for a library the command may never need), and named in one log line."""
    global _default
    if _default is None:
        with _default_lock:
            if _default is None:
                loaded = _load(LIBCRYPTO_NAMES, LANES_LIBRARY)
                path = getattr(loaded.backend, "path", None)
                if loaded.passed_over is None:
                    log.info("aes backend", backend=loaded.backend.name, path=path)
                else:
                    log.warning("aes backend", backend=loaded.backend.name, path=path,
                                passed_over=loaded.passed_over)
                _default = loaded.backend
    return _default
