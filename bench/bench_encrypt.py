"""Benchmark: the encrypt stage on real segment files against `openssl speed`, one and two threads.

The bench clip (``sample_clip.py``: 120 s of 1080p30 at ~15.5 Mbit/s, ~236 MB) is cut once
into its 6 s MPEG-TS segments, as the segment stage cuts a remux. Then, round by round in a
rotating order:

- openssl:    ``openssl speed -evp aes-128-cbc -bytes 16384 -seconds 3``, the 16384-byte
              column: the system OpenSSL on a buffer that stays in L1, one core (openssl speed
              counts user CPU time, so other load on the machine hardly moves it).
- stage-1t, stage-2t: what the encrypt stage does with a chunk's plain segments:
              ``encrypt_files`` over all of them, each into a new file (a piece of each of up
              to LANES files read into the thread's buffers, encrypted side by side in one
              call, written, each file renamed when done), IV = sequence number, on 1 and 2
              threads.
- inplace-1t, inplace-2t: the same loop in place (``encrypt_files_in_place``): each file's
              own page-cache pages are read and written back, no new page. This is what the
              encrypt stage does on a remote work store with each copy it has fetched into
              scratch (the fetch, a download that writes new pages, is not timed: it is the
              network's part), and what rekey does there with each decrypted copy; sealing
              (every segment stage) is in place too, one segment at a time as ffmpeg closes
              them.
- copy-1t, copy-2t: the stage's file side alone, no cipher: each segment read in CHUNK pieces
              into a reused buffer and written into a new file, on 1 and 2 threads. The
              stage on a local work store cannot be faster than this: it is the ceiling a new
              file's pages put on this machine.
- single-1t:  one segment at a time, ``encrypt_file`` per segment on one thread: what the
              stage did before the lanes, and what sealing still does per segment.
- core:       the cipher alone, no file I/O, no page faults: the segments LANES at a time in
              reused buffers, each group encrypted side by side in one call, one thread.
- core-1:     the cipher alone one segment at a time (one CBC chain: what openssl speed
              measures).

MB is 10^6 bytes; each figure is the segment set's bytes over the wall clock of encrypting it.

The memory-mode effect of this VM, and how it is controlled. The VM hands memory the guest frees
back to the host (virtio-balloon free page reporting, 2 MiB blocks). A page the host took back
costs a hypervisor fault the next time the guest writes it, so anything that writes *new* pages
(a new file) runs in one of two modes depending on whether the pages it gets were reported. The
benchmark controls it: (1) the plain segments are written and read once before any timing; (2)
each stage-* measure deletes its previous output immediately before it starts, so its new files
take the pages just freed (warm); (3) in-place measures write no new pages at all. It shows it:
``--cold S`` adds a ``stage-1t-cold`` measure that frees the previous output, waits S seconds
for the reporter to hand the pages back, and then encrypts; and every measure's column
``reported`` says how many MiB the guest reported to the host while it ran (read from
``/sys/module/page_reporting/parameters/reported_kib`` when the kernel has it).

    python bench/bench_encrypt.py [--rounds N] [--where shm|disk] [--cold S]
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

from machine import describe, reported_mib
from sample_clip import WORK_DIR, ensure_clip

from pipeline import aes
from pipeline.aes import BLOCK
from pipeline.crypto import (
    CHUNK,
    SegmentFile,
    encrypt_file,
    encrypt_files,
    encrypt_files_in_place,
    iv_for_sequence,
)

#: The issue: one thread at least 0.9 of openssl speed, two threads (two cores) at least 1.7.
TARGET_ONE = 0.9
TARGET_TWO = 1.7
DEFAULT_ROUNDS = 7
OPENSSL_SECONDS = 3
OPENSSL_BLOCK_BYTES = 16384
#: openssl speed runs for its -seconds plus set-up; anything near this is a hang.
OPENSSL_TIMEOUT_S = 120
SEGMENT_SECONDS = 6
MB = 1e6

OPENSSL = "openssl"
STAGE_1 = "stage-1t"
STAGE_2 = "stage-2t"
INPLACE_1 = "inplace-1t"
INPLACE_2 = "inplace-2t"
COPY_1 = "copy-1t"
#: What the in-place RESULT lines time: the encryption step of the remote stage and rekey.
FETCHED_IN_PLACE = "in place (remote store, rekey: encrypting the fetched copy; the fetch untimed)"
COPY_2 = "copy-2t"
SINGLE_1 = "single-1t"
CORE = "core"
CORE_1 = "core-1"
STAGE_1_COLD = "stage-1t-cold"


def scratch_root(where: str) -> Path:
    """tmpfs (/dev/shm: no disk, page cache only) or the disk (bench/.work, ext4 here)."""
    if where == "shm":
        shm = Path("/dev/shm")
        if shm.is_dir() and os.access(shm, os.W_OK):
            return shm
        sys.exit("bench_encrypt: no writable /dev/shm; use --where disk")
    WORK_DIR.mkdir(parents=True, exist_ok=True)
    return WORK_DIR


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


def cut_segments(out_dir: Path) -> list[Path]:
    """The bench clip remuxed into plain 6 s MPEG-TS segments, as the segment stage cuts it."""
    out_dir.mkdir(parents=True)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y", "-i",
         str(ensure_clip()), "-c", "copy", "-f", "hls", "-hls_time", str(SEGMENT_SECONDS),
         "-hls_playlist_type", "vod", "-hls_segment_filename", str(out_dir / "seg_%05d.ts"),
         str(out_dir / "plain.m3u8")],
        check=True, timeout=600,
    )
    segments = sorted(out_dir.glob("seg_*.ts"))
    for segment in segments:
        segment.read_bytes()  # every page of the plain set faulted in before any timing
    return segments


#: One measure's figures: MB/s over the wall clock, and MB per CPU-second of this process
#: (user + system, every thread): the unit `openssl speed` counts in (user CPU time), which
#: other sessions' load hardly moves.
Figure = tuple[float, float]


def timed_pool(threads: int, count: int, work: Callable[[int], int]) -> tuple[float, float]:
    """Wall and CPU seconds of running ``work`` over ``range(count)`` on ``threads`` threads."""
    cpu = time.process_time()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(work, range(count)))
    return time.perf_counter() - started, time.process_time() - cpu


class Measures:
    def __init__(self, segments: list[Path], scratch: Path, key: bytes) -> None:
        self.segments = segments
        self.total = sum(s.stat().st_size for s in segments)
        self.scratch = scratch
        self.key = key
        self.out_dir = scratch / "encrypted"
        self.sealed_dir = scratch / "sealed"
        largest = max(s.stat().st_size for s in segments) + BLOCK
        self.core_bufs = [memoryview(bytearray(largest)) for _ in range(aes.LANES)]

    def rate(self, seconds: tuple[float, float]) -> Figure:
        wall, cpu = seconds
        return self.total / wall / MB, self.total / cpu / MB

    def _fresh_out_dir(self, cold_wait: float) -> None:
        # Freed immediately before: the new files reuse these pages (see the docstring).
        shutil.rmtree(self.out_dir, ignore_errors=True)
        if cold_wait:
            time.sleep(cold_wait)
        self.out_dir.mkdir()

    def stage(self, threads: int, *, cold_wait: float = 0.0) -> Figure:
        self._fresh_out_dir(cold_wait)
        jobs = [SegmentFile(s, self.out_dir / s.name, self.key, iv_for_sequence(n))
                for n, s in enumerate(self.segments)]
        cpu = time.process_time()
        started = time.perf_counter()
        encrypt_files(jobs, threads=threads)
        return self.rate((time.perf_counter() - started, time.process_time() - cpu))

    def single(self) -> Figure:
        self._fresh_out_dir(0.0)

        def work(n: int) -> int:
            segment = self.segments[n]
            return encrypt_file(segment, self.out_dir / segment.name, self.key,
                                iv_for_sequence(n))

        return self.rate(timed_pool(1, len(self.segments), work))

    def copy(self, threads: int) -> Figure:
        """The stage's file side without the cipher: every segment into a new file."""
        self._fresh_out_dir(0.0)

        def work(first: int) -> int:
            buf = memoryview(bytearray(CHUNK))
            for segment in self.segments[first::threads]:
                fd_in = os.open(segment, os.O_RDONLY)
                fd_out = os.open(self.out_dir / segment.name, os.O_WRONLY | os.O_CREAT, 0o666)
                try:
                    offset = 0
                    while read := os.preadv(fd_in, [buf], offset):
                        done = 0
                        while done < read:
                            done += os.pwrite(fd_out, buf[done:read], offset + done)
                        offset += read
                finally:
                    os.close(fd_out)
                    os.close(fd_in)
            return 0

        return self.rate(timed_pool(threads, threads, work))

    def in_place(self, threads: int) -> Figure:
        # Untimed: a fresh plain copy to seal, its pages written just before (as ffmpeg's are).
        shutil.rmtree(self.sealed_dir, ignore_errors=True)
        self.sealed_dir.mkdir()
        copies = [shutil.copyfile(s, self.sealed_dir / s.name) for s in self.segments]
        jobs = [SegmentFile(c, c, self.key, iv_for_sequence(n)) for n, c in enumerate(copies)]
        cpu = time.process_time()
        started = time.perf_counter()
        encrypt_files_in_place(jobs, threads=threads)
        return self.rate((time.perf_counter() - started, time.process_time() - cpu))

    def core(self, width: int) -> Figure:
        """The segments ``width`` at a time, read (untimed) into reused buffers, each group
        encrypted in one call of ``width`` lanes."""
        backend = aes.default_backend()
        elapsed = cpu = 0.0
        for first in range(0, len(self.segments), width):
            group = self.segments[first : first + width]
            sizes = []
            for buf, segment in zip(self.core_bufs, group, strict=False):
                with segment.open("rb") as handle:
                    sizes.append(handle.readinto(buf))
            lanes = backend.lanes(len(group))
            started, used = time.perf_counter(), time.thread_time()
            for lane in range(len(group)):
                lanes.start(lane, self.key, iv_for_sequence(first + lane))
            lanes.encrypt([aes.Piece(lane, self.core_bufs[lane], size, True)
                           for lane, size in enumerate(sizes)])
            elapsed += time.perf_counter() - started
            cpu += time.thread_time() - used
            lanes.close()
        return self.rate((elapsed, cpu))

    def check(self) -> None:
        """Every file path writes what the reference cipher writes, before anything is timed."""
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        expected = []
        for n, segment in enumerate(self.segments):
            data = segment.read_bytes()
            pad = BLOCK - len(data) % BLOCK
            encryptor = Cipher(algorithms.AES(self.key), modes.CBC(iv_for_sequence(n))).encryptor()
            expected.append(encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize())
        measures: tuple[Callable[[], Figure], ...] = (
            lambda: self.stage(2), self.single, lambda: self.in_place(2))
        for measure in measures:
            measure()
            for segment, want in zip(self.segments, expected, strict=True):
                for produced in (self.out_dir / segment.name, self.sealed_dir / segment.name):
                    if produced.exists() and produced.read_bytes() != want:
                        sys.exit(f"bench_encrypt: {produced} is not the reference ciphertext")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="timed rounds")
    parser.add_argument("--where", choices=("shm", "disk"), default="shm",
                        help="segment files in tmpfs (/dev/shm) or on disk (bench/.work)")
    parser.add_argument("--openssl-seconds", type=int, default=OPENSSL_SECONDS,
                        help="openssl speed -seconds")
    parser.add_argument("--cold", type=float, default=0.0, metavar="S",
                        help="also measure stage-1t after waiting S seconds for the VM to take "
                             "the freed pages back (the slow memory mode)")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.openssl_seconds < 1 or args.cold < 0:
        parser.error("--rounds and --openssl-seconds must be at least 1, --cold not negative")

    scratch = Path(tempfile.mkdtemp(prefix="hlsvault-bench-", dir=scratch_root(args.where)))
    try:
        return run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> int:
    segments = cut_segments(scratch / "plain")
    measures = Measures(segments, scratch, os.urandom(BLOCK))
    measures.check()

    def openssl() -> Figure:
        rate = openssl_mb_per_s(args.openssl_seconds)
        return rate, rate

    table: dict[str, Callable[[], Figure]] = {
        OPENSSL: openssl,
        STAGE_1: lambda: measures.stage(1),
        STAGE_2: lambda: measures.stage(2),
        INPLACE_1: lambda: measures.in_place(1),
        INPLACE_2: lambda: measures.in_place(2),
        COPY_1: lambda: measures.copy(1),
        COPY_2: lambda: measures.copy(2),
        SINGLE_1: measures.single,
        CORE: lambda: measures.core(aes.LANES),
        CORE_1: lambda: measures.core(1),
    }
    if args.cold:
        table[STAGE_1_COLD] = lambda: measures.stage(1, cold_wait=args.cold)
    names = tuple(table)

    backend = aes.default_backend()
    system = subprocess.run(["openssl", "version"], capture_output=True, text=True, check=True)
    print(describe())
    print(f"AES-128-CBC, MB/s (10^6 bytes/s), higher is better; {len(segments)} real .ts "
          f"segments, {measures.total / MB:.1f} MB, in {scratch.parent} ({args.where}); "
          f"{CHUNK >> 10} KiB pieces, {aes.LANES} lanes a thread; openssl speed -bytes "
          f"{OPENSSL_BLOCK_BYTES} -seconds {args.openssl_seconds}")
    print(f"system {system.stdout.strip()}; pipeline.aes backend: {backend.name} "
          f"({getattr(backend, 'path', 'cryptography')})")
    print("outputs checked against the reference cipher; 'reported' = MiB the guest handed "
          "back to the host during the measure")
    print(f"{'round':<7}" + "".join(f"{n:>15}" for n in names) + "   reported MiB   order")
    results: dict[str, list[float]] = {n: [] for n in names}
    per_cpu: dict[str, list[float]] = {n: [] for n in names}
    reported: dict[str, list[float]] = {n: [] for n in names}
    for index in range(args.rounds):
        shift = index % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            before = reported_mib()
            wall, cpu = table[name]()
            results[name].append(wall)
            per_cpu[name].append(cpu)
            after = reported_mib()
            if before is not None and after is not None:
                reported[name].append(after - before)
        given = " ".join(f"{sum(reported[n][-1:]):.0f}" for n in names)
        print(f"{index + 1:<7}" + "".join(f"{results[n][-1]:>15.0f}" for n in names)
              + f"   {given:<14} {' > '.join(order)}", flush=True)

    medians = {n: statistics.median(v) for n, v in results.items()}
    print(f"{'median':<7}" + "".join(f"{medians[n]:>15.0f}" for n in names))
    print(f"load average after: {', '.join(f'{v:.2f}' for v in os.getloadavg())}")
    base = medians[OPENSSL]
    print(f"cipher alone, one thread / openssl: {aes.LANES} segments side by side "
          f"{medians[CORE] / base:.2f}, one segment at a time {medians[CORE_1] / base:.2f}; "
          f"in place / openssl: 1 thread {medians[INPLACE_1] / base:.2f}, "
          f"2 threads {medians[INPLACE_2] / base:.2f}; one segment at a time (before the "
          f"lanes) / openssl: {medians[SINGLE_1] / base:.2f}")
    cpu_medians = {n: statistics.median(v) for n, v in per_cpu.items()}
    print(f"per CPU-second (openssl speed's unit, unmoved by other load) / openssl: stage "
          f"1 thread {cpu_medians[STAGE_1] / base:.2f}, 2 threads "
          f"{cpu_medians[STAGE_2] / base:.2f} per core; in place 1 thread "
          f"{cpu_medians[INPLACE_1] / base:.2f}, 2 threads {cpu_medians[INPLACE_2] / base:.2f} "
          f"per core")
    if args.cold:
        print(f"slow memory mode: stage-1t after a {args.cold:g} s wait / warm stage-1t: "
              f"{medians[STAGE_1_COLD] / medians[STAGE_1]:.2f}")
    print(f"the file side alone (copy into new files, no cipher) / openssl: 1 thread "
          f"{medians[COPY_1] / base:.2f}, 2 threads {medians[COPY_2] / base:.2f}: the ceiling "
          f"of the stage on a local store; stage / that ceiling: 1 thread "
          f"{medians[STAGE_1] / medians[COPY_1]:.2f}, 2 threads "
          f"{medians[STAGE_2] / medians[COPY_2]:.2f}")
    for label, name, target in (
        ("1 thread, local store (new files)", STAGE_1, TARGET_ONE),
        ("2 threads, local store (new files)", STAGE_2, TARGET_TWO),
        (f"1 thread, {FETCHED_IN_PLACE}", INPLACE_1, TARGET_ONE),
        (f"2 threads, {FETCHED_IN_PLACE}", INPLACE_2, TARGET_TWO),
    ):
        ratio = medians[name] / base
        verdict = "met" if ratio >= target else "MISSED"
        print(f"RESULT encrypt {label}: hlsvault {medians[name]:.0f} MB/s, openssl (one core) "
              f"{base:.0f} MB/s, ratio {ratio:.2f} (target >= {target}: {verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
