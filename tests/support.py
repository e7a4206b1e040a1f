"""Helpers every test module may import: paths, free ports, waiting for servers, generated media,
decoded frames, and an isolated embedded hlsvault driven through the real CLI.

Fixtures live in conftest.py; this module imports no test framework plugin and no browser stack,
so a unit test importing it pulls in nothing heavy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import fcntl
import hashlib
import os
import random
import re
import resource
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from pipeline.jobs import JobSpec
    from pipeline.services import Services

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
MEDIA_CACHE = ROOT / ".cache" / "test-media"
HLSVAULT = [sys.executable, "-m", "hlsvault"]
#: Where tests leave evidence for a person to look at (screenshots, a page's record).
ARTIFACTS = ROOT / "test-artifacts"
#: A file name's length limit is 255 bytes; a long parametrized node id is cut and hashed.
_MAX_STEM = 160
#: A CLI call in a test packages a few seconds of video; a minute means it hung.
CLI_TIMEOUT_S = 300


#: Where the kernel says which ports it hands out by itself (every outgoing connection's, every
#: bind to port 0): its ephemeral range, "low high".
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: The lowest port tests pick: below it lie the registered ports of common services.
_LOWEST_TEST_PORT = 20000
#: Linux's default ephemeral range, assumed when the kernel does not say.
_DEFAULT_EPHEMERAL_LOW, _DEFAULT_EPHEMERAL_HIGH = 32768, 60999
#: Fewer test ports than this cannot serve a session (a few hundred servers per process, two
#: xdist workers, other sessions on the machine).
_MIN_TEST_PORTS = 1000
#: Services that listen on these machines below the ephemeral range, never picked for a test
#: server (which would find the port taken, or take it from the service): RabbitMQ's
#: inter-node port, Redis Sentinel, MongoDB.
SERVICE_PORTS = frozenset({25672, 26379, 27017})


def port_range_for(ephemeral_range: str | None) -> range:
    """The test ports, outside the kernel's ephemeral range (the text of
    ``ip_local_port_range``; Linux's default when None or unreadable), so nothing on the machine
    takes a port picked here between the pick and the server's start: from 20000 up to where
    that range starts or, when too few lie there (a range tuned to start low), from where it
    ends up to 65535. When neither side holds enough, 20000-32767 with a warning: the
    reservations and the check that nothing listens still apply, only an outgoing connection
    may take a port first."""
    try:
        low, high = (int(part) for part in (ephemeral_range or "").split()[:2])
    except ValueError:
        low, high = _DEFAULT_EPHEMERAL_LOW, _DEFAULT_EPHEMERAL_HIGH
    for ports in (range(_LOWEST_TEST_PORT, min(low, 65536)), range(max(high + 1, 1024), 65536)):
        if len(ports) - sum(port in ports for port in SERVICE_PORTS) >= _MIN_TEST_PORTS:
            return ports
    warnings.warn(
        f"the kernel's ephemeral ports ({low}-{high}, {EPHEMERAL_RANGE}) leave fewer than "
        f"{_MIN_TEST_PORTS} ports outside them: the tests pick from {_LOWEST_TEST_PORT}-"
        f"{_DEFAULT_EPHEMERAL_LOW - 1}, where an outgoing connection may take one first",
        stacklevel=2,
    )
    return range(_LOWEST_TEST_PORT, _DEFAULT_EPHEMERAL_LOW)


def _read_ephemeral_range() -> str | None:
    try:
        return EPHEMERAL_RANGE.read_text()
    except OSError:
        return None


TEST_PORTS = port_range_for(_read_ephemeral_range())
#: The directory of the port reservations every test process of this user shares: one per
#: user, since another user's lock files (0600) cannot be opened to take part in theirs.
RESERVATIONS = Path(tempfile.gettempdir()) / f"hlsvault-test-ports-{os.getuid()}"


def _most_reserved() -> int:
    """Ports one test process holds at most: each reservation holds a file descriptor, so a
    quarter of the soft limit (a common 1024 gives 256), leaving the rest to the servers,
    clients and files the tests open; 256 at most. Past it the oldest reservation is let go:
    its server has long started (the port is then taken by listening) or stopped."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(1, min(256, soft // 4))


_MAX_RESERVED = _most_reserved()
_reserved: collections.deque[int] = collections.deque()
_reserving = threading.Lock()


def _reservations_dir(directory: Path) -> Path:
    """``directory``, created private (0700) if absent; refused when it is a symlink, is not
    this user's or others may write in it: whoever could would decide which ports are
    reserved."""
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    status = directory.lstat()
    if (not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid()
            or status.st_mode & 0o022):
        raise RuntimeError(
            f"{directory} (the test port reservations) is not a directory of uid {os.getuid()} "
            "that only it may write (a symlink, another user's, or group/world writable); "
            "remove it and run the tests again"
        )
    return directory


def free_port(*, ports: range = TEST_PORTS, reservations: Path = RESERVATIONS) -> int:
    """A port of ``ports`` nothing listens on, reserved for this process until it exits: no
    other test process (another xdist worker, another checkout's session) is given it, and it
    is outside the range the kernel hands out by itself, so a server started on it later finds
    it free; never one of :data:`SERVICE_PORTS`. Raises when ``ports`` has none left."""
    directory = _reservations_dir(reservations)
    candidates = [port for port in random.sample(ports, len(ports)) if port not in SERVICE_PORTS]
    with _reserving:
        for port in candidates:
            descriptor = -1
            try:
                # O_NOFOLLOW: a symlink put in place of a lock file is never written through.
                descriptor = os.open(directory / str(port),
                                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
                # A lock the kernel drops when the holder exits, however it exits.
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            except OSError as error:  # reserved by another process, or in use
                if descriptor >= 0:
                    os.close(descriptor)
                if error.errno in (errno.EMFILE, errno.ENFILE):
                    raise  # out of file descriptors: every other port would fail alike
                continue
            _reserved.append(descriptor)
            if len(_reserved) > _MAX_RESERVED:
                os.close(_reserved.popleft())
            return port
    raise OSError(f"no free port in {ports.start}-{ports.stop - 1}: every one is in use or "
                  "reserved by another test process")


def evidence_path(kind: str, nodeid: str, suffix: str, *, label: str = "") -> Path:
    """Where the test ``nodeid`` leaves a piece of evidence (``label`` tells a test's several
    apart): ``test-artifacts/<kind>/``, named after the node id (file, class, test and
    parameters), so no two tests write one file whichever xdist process runs them."""
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{nodeid}-{label}" if label else nodeid).strip("_")
    if len(stem) > _MAX_STEM:
        stem = f"{stem[:_MAX_STEM - 13]}-{hashlib.sha256(stem.encode()).hexdigest()[:12]}"
    directory = ARTIFACTS / kind
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{stem}{suffix}"


def generate_media(name: str, ffmpeg_args: list[str]) -> Path:
    """Generate a clip with ffmpeg's lavfi sources once; later runs reuse the cached file."""
    digest = hashlib.sha256(" ".join(ffmpeg_args).encode()).hexdigest()[:12]
    suffix = Path(name).suffix
    path = MEDIA_CACHE / f"{Path(name).stem}-{digest}{suffix}"
    if not path.exists():
        MEDIA_CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
        subprocess.run(
            ["ffmpeg", "-nostdin", "-v", "error", "-y", *ffmpeg_args, str(tmp)],
            check=True, timeout=300,
        )
        os.replace(tmp, path)
    return path


def lavfi_clip(
    name: str, *, seconds: float, size: str = "640x360", rate: int = 30, audio: bool = True,
    gop: int | None = None, vcodec: str = "libx264", extra: list[str] | None = None,
) -> Path:
    args = ["-f", "lavfi", "-i", f"testsrc2=size={size}:rate={rate}"]
    if audio:
        args += ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"]
    args += ["-t", f"{seconds:g}", "-c:v", vcodec, "-pix_fmt", "yuv420p"]
    if vcodec == "libx264":
        args += ["-preset", "veryfast", "-g", str(gop or rate)]
    if audio:
        args += ["-c:a", "aac", "-b:a", "128k"]
    args += extra or []
    return generate_media(name, args)




def ffmpeg_children() -> dict[int, str]:
    """The ffmpeg processes this process started and has not yet reaped (a stage's), by pid,
    with their state (``Z``: exited, not yet waited for)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if comm == "ffmpeg" and int(ppid) == os.getpid():
            found[int(entry.name)] = state
    return found


def work_files(svc: Services, spec: JobSpec) -> dict[str, tuple[int, bytes]]:
    """Every file of the job in the (local) work store: modification time and bytes."""
    from pipeline import layout

    root = svc.work.local_dir(layout.job_prefix(spec.job_id))
    assert root is not None
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in root.rglob("*") if p.is_file()}


def wait_for_port(port: int, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def wait_for_http(url: str, *, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def framemd5(
    target: str, *, extra: list[str] | None = None, stream: str = "0:v:0"
) -> list[str]:
    """The per-frame MD5 lines of one decoded stream of ``target`` (a file or an HLS URL)."""
    done = subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", *(extra or []), "-i", target,
         "-map", stream, "-f", "framemd5", "-"],
        capture_output=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    return [line for line in done.stdout.decode().splitlines() if line and not line.startswith("#")]


def frame_hashes(lines: list[str]) -> list[str]:
    """The hash column of framemd5 lines: what a frame looks like, not when it is shown."""
    return [line.rsplit(",", 1)[-1].strip() for line in lines]


@dataclass
class Hlsvault:
    """An isolated embedded hlsvault: its own data dir and key server port."""

    env: dict[str, str]
    data_dir: Path
    port: int

    @property
    def public_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*HLSVAULT, *args], env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False, cwd=self.data_dir.parent,
        )

    def package(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("package", *args)

    def url(self, asset: str, *args: str) -> str:
        done = self.run("url", asset, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    @property
    def origin(self) -> Path:
        return self.data_dir / "origin"

    @property
    def vault(self) -> Path:
        return self.data_dir / "vault"


class RemoteStandIn:
    """A local store that says it is not local (no ``local_path``, no ``local_dir``), so a
    stage copies through its scratch as it would with S3; each ``get_file`` and ``put_file``
    counts the files then in that scratch (the ``hlsvault-*`` temporary directory the path is
    under), and :attr:`most_in_scratch` is the highest count seen; :attr:`contexts` holds the
    structlog context each of those calls ran in."""

    is_local = False

    def __init__(self, store: Any) -> None:
        self._store = store
        self.most_in_scratch = 0
        self.contexts: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def local_path(self, key: str) -> Path | None:
        return None

    def local_dir(self, prefix: str) -> Path | None:
        return None

    def _count(self, path: Path) -> None:
        import structlog

        scratch = next(p for p in path.parents if p.name.startswith("hlsvault-"))
        files = sum(len(names) for _, _, names in os.walk(scratch))
        with self._lock:
            self.most_in_scratch = max(self.most_in_scratch, files)
            self.contexts.append(structlog.contextvars.get_contextvars())

    def get_file(self, key: str, path: Path) -> None:
        self._store.get_file(key, path)
        self._count(path)

    def put_file(self, key: str, path: Path, **headers: Any) -> None:
        self._count(path)
        self._store.put_file(key, path, **headers)


def encrypt_bytes(data: bytes, key: bytes, iv: bytes) -> bytes:
    """AES-128-CBC with PKCS#7 over a buffer, straight from ``cryptography``: the reference the
    tests hold hlsvault's streaming encryption to."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    pad = 16 - len(data) % 16
    encryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize()


def decrypt_bytes(data: bytes, key: bytes, iv: bytes) -> bytes:
    """The reference decryption; ``ValueError`` when the padding is not valid PKCS#7."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if not data or len(data) % 16:
        raise ValueError("ciphertext length is not a positive multiple of 16")
    decryptor = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    plain = decryptor.update(data) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
        raise ValueError("bad PKCS#7 padding")
    return plain[:-pad]


@contextlib.contextmanager
def serving(env: dict[str, str], port: int, log: Path, *options: str) -> Iterator[str]:
    """`hlsvault serve --port PORT [options]` on ``env``, its output in ``log``; yields its
    base URL."""
    with log.open("w") as output:
        process = subprocess.Popen(
            [*HLSVAULT, "serve", "--port", str(port), *options], env=env,
            stdout=output, stderr=subprocess.STDOUT,
        )
        try:
            wait_for_http(f"http://127.0.0.1:{port}/healthz")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


T = TypeVar("T")


def run_coroutine(coroutine: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a thread of its own: Playwright's sync API keeps an event loop
    running on the main thread while a browser fixture lives, where ``asyncio.run`` refuses."""
    outcome: dict[str, Any] = {}

    def main() -> None:
        try:
            outcome["result"] = asyncio.run(coroutine)
        except BaseException as error:  # handed back to the test's thread
            outcome["error"] = error

    thread = threading.Thread(target=main, name="test-coroutine")
    thread.start()
    thread.join(120)
    if thread.is_alive():
        raise TimeoutError("the coroutine did not finish within 120 s")
    if "error" in outcome:
        raise outcome["error"]
    return cast(T, outcome["result"])
