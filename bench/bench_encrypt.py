"""Benchmark: the encrypt stage's `pipeline.crypto.encrypt_file` against `openssl speed`.

Three measurements, alternated round by round in a rotating order:

- openssl:      ``openssl speed -evp aes-128-cbc -bytes 16384 -seconds 3``, the 16384-byte
                column (openssl prints 1000s of bytes per second): AES-128-CBC with the
                system OpenSSL on a buffer that stays in cache, the ceiling for one core.
- encrypt_file: ``pipeline.crypto.encrypt_file`` on a file of random bytes in /dev/shm to a
                file in /dev/shm, so that the disk is not measured but the read/write syscalls,
                page copies and the atomic rename are.
- core:         the same ``update_into`` loop with the same 1 MiB chunks over the same bytes
                held in memory, with no file I/O: where encrypt_file's time goes.

With ``--segments`` it also encrypts a real segment set (the bench clip cut into 6 s MPEG-TS
segments in /dev/shm) as the encrypt stage does: one encrypt_file call per segment, on a pool of
``pipeline.packaging.ENCRYPT_THREADS`` threads. MB is 10^6 bytes throughout.
Reported: median MB/s of each, and ``median(encrypt_file) / median(openssl)``.

    python bench/bench_encrypt.py [--rounds N] [--size-mib N] [--segments]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography.hazmat.backends.openssl.backend import backend as openssl_backend
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from machine import describe

from pipeline.crypto import BLOCK, CHUNK, encrypt_file, iv_for_sequence
from pipeline.packaging import ENCRYPT_THREADS

#: The brief: encrypt_file should reach at least 80 % of OpenSSL's own AES-128-CBC rate.
TARGET_RATIO = 0.8
DEFAULT_ROUNDS = 5
#: Large enough that per-call costs vanish and the file dwarfs every CPU cache.
DEFAULT_SIZE_MIB = 256
OPENSSL_SECONDS = 3
OPENSSL_BLOCK_BYTES = 16384
#: openssl speed runs for its -seconds plus set-up; anything near this is a hang.
OPENSSL_TIMEOUT_S = 120
SEGMENT_SECONDS = 6
MB = 1e6

OPENSSL = "openssl"
ENCRYPT_FILE = "encrypt_file"
CORE = "core"
SEGMENTS = "segments"


def scratch_root() -> Path:
    """/dev/shm when the machine has it (RAM, so no disk is timed), else the temp dir."""
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def write_random_file(path: Path, size: int) -> None:
    piece = 16 << 20
    with path.open("wb") as out:
        for offset in range(0, size, piece):
            out.write(os.urandom(min(piece, size - offset)))


def openssl_mb_per_s(seconds: int) -> float:
    """AES-128-CBC throughput of `openssl speed` on 16384-byte blocks, in MB/s."""
    done = subprocess.run(
        ["openssl", "speed", "-evp", "aes-128-cbc", "-bytes", str(OPENSSL_BLOCK_BYTES),
         "-seconds", str(seconds)],
        capture_output=True, text=True, timeout=OPENSSL_TIMEOUT_S, check=True,
    )
    # The table's last line reads "AES-128-CBC    1434195.78k": 1000s of bytes per second.
    match = re.search(r"(?im)^aes-128-cbc\s+([0-9.]+)k\s*$", done.stdout)
    if match is None:
        sys.exit(f"bench_encrypt: cannot read openssl speed's output:\n{done.stdout}")
    return float(match.group(1)) * 1000 / MB


def core_seconds(data: memoryview, key: bytes, iv: bytes) -> tuple[float, bytes]:
    """encrypt_file's loop over ``data`` in memory; returns seconds and the first output chunk."""
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    outbuf = bytearray(CHUNK + BLOCK - 1)
    first = b""
    started = time.perf_counter()
    for offset in range(0, len(data), CHUNK):
        produced = encryptor.update_into(data[offset : offset + CHUNK], outbuf)
        if not first:
            first = bytes(outbuf[:produced])
    pad = BLOCK - len(data) % BLOCK
    encryptor.update(bytes([pad]) * pad)
    encryptor.finalize()
    return time.perf_counter() - started, first


def encrypt_file_seconds(src: Path, dst: Path, key: bytes, iv: bytes) -> float:
    size = src.stat().st_size
    started = time.perf_counter()
    written = encrypt_file(src, dst, key, iv)
    elapsed = time.perf_counter() - started
    if written != size + BLOCK - size % BLOCK:
        sys.exit(f"bench_encrypt: encrypt_file wrote {written} bytes for {size}")
    return elapsed


def cut_segments(out_dir: Path) -> list[Path]:
    """The bench clip remuxed into plain 6 s MPEG-TS segments, as the segment stage cuts it."""
    from sample_clip import ensure_clip

    clip = ensure_clip()
    out_dir.mkdir(parents=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i", str(clip),
         "-c", "copy", "-f", "hls", "-hls_time", str(SEGMENT_SECONDS), "-hls_playlist_type",
         "vod", "-hls_segment_filename", str(out_dir / "seg_%05d.ts"),
         str(out_dir / "plain.m3u8")],
        check=True, timeout=600,
    )
    return sorted(out_dir.glob("seg_*.ts"))


def segments_seconds(segments: list[Path], out_dir: Path, key: bytes) -> float:
    """The encrypt stage's inner loop: one encrypt_file per segment, IV = sequence number, on
    the stage's pool of threads."""
    out_dir.mkdir(exist_ok=True)

    def encrypt_segment(sequence: int) -> int:
        segment = segments[sequence]
        return encrypt_file(segment, out_dir / segment.name, key, iv_for_sequence(sequence))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=ENCRYPT_THREADS) as pool:
        list(pool.map(encrypt_segment, range(len(segments))))
    elapsed = time.perf_counter() - started
    shutil.rmtree(out_dir)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds")
    parser.add_argument("--size-mib", type=int, default=DEFAULT_SIZE_MIB,
                        help="size of the random file, MiB")
    parser.add_argument("--openssl-seconds", type=int, default=OPENSSL_SECONDS,
                        help="openssl speed -seconds")
    parser.add_argument("--segments", action="store_true",
                        help="also encrypt the bench clip cut into real .ts segments")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.size_mib < 1 or args.openssl_seconds < 1:
        parser.error("--rounds, --size-mib and --openssl-seconds must be at least 1")

    scratch = Path(tempfile.mkdtemp(prefix="hlsvault-bench-", dir=scratch_root()))
    try:
        return run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> int:
    size = args.size_mib << 20
    src, dst = scratch / "plain.bin", scratch / "enc.bin"
    write_random_file(src, size)
    data = memoryview(src.read_bytes())
    key, iv = os.urandom(BLOCK), iv_for_sequence(0)

    measures: dict[str, Callable[[], float]] = {
        OPENSSL: lambda: openssl_mb_per_s(args.openssl_seconds),
        ENCRYPT_FILE: lambda: size / encrypt_file_seconds(src, dst, key, iv) / MB,
        CORE: lambda: size / core_seconds(data, key, iv)[0] / MB,
    }
    segment_bytes = 0
    if args.segments:
        segments = cut_segments(scratch / "segments")
        segment_bytes = sum(s.stat().st_size for s in segments)
        measures[SEGMENTS] = lambda: (
            segment_bytes / segments_seconds(segments, scratch / "segments-enc", key) / MB
        )
    names = tuple(measures)

    # The file encrypted once and compared with the in-memory loop: both compute the same thing.
    encrypt_file(src, dst, key, iv)
    with dst.open("rb") as enc:
        if enc.read(CHUNK) != core_seconds(data[:CHUNK], key, iv)[1]:
            sys.exit("bench_encrypt: encrypt_file and the in-memory loop disagree")
    dst.unlink()

    print(describe())
    print(f"AES-128-CBC, MB/s (10^6 bytes/s), higher is better; random file {args.size_mib} MiB "
          f"in {scratch.parent}, {CHUNK >> 10} KiB chunks; openssl speed "
          f"-bytes {OPENSSL_BLOCK_BYTES} -seconds {args.openssl_seconds}")
    if args.segments:
        print(f"segments: the bench clip cut into {len(segments)} .ts files, "
              f"{segment_bytes / MB:.1f} MB, encrypted on {ENCRYPT_THREADS} threads")
    system = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True)
    print(f"system {system.stdout.strip()}; "
          f"python cryptography uses {openssl_backend.openssl_version_text()}")
    print(f"{'round':<7}" + "".join(f"{n:>14}" for n in names) + "   order")
    results: dict[str, list[float]] = {n: [] for n in names}
    for index in range(args.rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            results[name].append(measures[name]())
            dst.unlink(missing_ok=True)
        print(f"{index + 1:<7}" + "".join(f"{results[n][-1]:>14.0f}" for n in names)
              + f"   {' > '.join(order)}", flush=True)

    medians = {n: statistics.median(v) for n, v in results.items()}
    print(f"{'median':<7}" + "".join(f"{medians[n]:>14.0f}" for n in names))
    print(f"core (in memory, no file I/O) / openssl: {medians[CORE] / medians[OPENSSL]:.2f}; "
          f"encrypt_file / core: {medians[ENCRYPT_FILE] / medians[CORE]:.2f} "
          f"(the rest is file I/O: read, write, rename on {scratch.parent})")
    if args.segments:
        print(f"segment set on {ENCRYPT_THREADS} threads / openssl (one core): "
              f"{medians[SEGMENTS] / medians[OPENSSL]:.2f}")
    ratio = medians[ENCRYPT_FILE] / medians[OPENSSL]
    verdict = "met" if ratio >= TARGET_RATIO else "MISSED"
    print(f"RESULT encrypt: hlsvault {medians[ENCRYPT_FILE]:.0f} MB/s, "
          f"openssl {medians[OPENSSL]:.0f} MB/s, ratio {ratio:.2f} "
          f"(target >= {TARGET_RATIO}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
