"""Benchmark: the key server's key, variant and master routes against nginx serving the same
bytes (a 16-byte key, the playlists) as static files; ``--bare`` adds bare ASGI and RSGI apps.

Both servers run on this machine with one worker each, and `wrk` (one thread, 50 connections
by default) loads them in turn, alternating round by round after an untimed warm-up of each:

- nginx:    `nginx` with a generated minimal config in ``bench/.work/keyserver/nginx/``
            (worker_processes 1, access_log off, daemon off, listen 127.0.0.1:<free port>),
            serving a 16-byte file: the floor for answering a small GET over HTTP/1.1.
- hlsvault: `hlsvault serve --port P --server S`, once with each of uvicorn, granian (ASGI)
            and granian-rsgi (``--servers``), one worker each, over a short
            generated clip packaged with `hlsvault package clip.mp4 --asset bench --ladder copy`
            in ``HLSVAULT_DATA_DIR=bench/.work/ks-data``. wrk fetches the key URL named by the
            variant playlist, token in the query string: every request verifies the JWT (HS256),
            checks the rate limiter, reads the cached asset state and key, and writes an access
            log line and an audit line. Rate limits are off (HLSVAULT_RATE_LIMIT_TOKEN=0,
            HLSVAULT_RATE_LIMIT_IP=0), since wrk hammers with one token from one address. The
            server's stderr (JSON log lines) goes to a file, as a production log shipper's would.

A second part loads the **variant playlist** endpoint of two `hlsvault serve` processes over the
same data directory, one without and one with CloudFront signing (a generated RSA 2048 key,
HLSVAULT_CLOUDFRONT_KEY_PAIR_ID/HLSVAULT_CLOUDFRONT_PRIVATE_KEY, a CDN URL of
https://cdn.bench.example), alternating round by round: every signed response carries one
custom-policy signature on each segment URI. wrk presents one token, so after the first request
the signature comes from the cache: the common case of a player's requests. The cost of a
signature that is not cached (one RSA-2048 SHA-1 signature) is measured apart and printed.
Reported: both medians and the ratio signed / unsigned (target >= 0.9: signing costs at most
10 %).

A wrk run with any non-2xx response, or any connect or timeout error, fails the benchmark.
Reported: median requests per second of each, hlsvault's median p99 latency (wrk --latency),
and the median of the per-round ratios hlsvault rps / nginx rps. Each round also reports the
server's CPU time per request (from /proc), which other load on the machine disturbs less than
the request rate does.

`wrk` and `nginx` are benchmark-only tools (the tests need neither); when missing they are
installed with apt-get, which needs root. ``--profile`` adds one more hlsvault run under
`py-spy record` (``.venv/bin/pip install py-spy``) and prints where the time goes.

    python bench/bench_keyserver.py [--rounds N] [--duration S] [--warmup S]
                                    [--connections N] [--profile] [--only-signing]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from machine import REPO_DIR, describe
from sample_clip import WORK_DIR

VENV_BIN = Path(sys.executable).parent
HLSVAULT = str(VENV_BIN / "hlsvault")
PY_SPY = VENV_BIN / "py-spy"
SCRATCH = WORK_DIR / "keyserver"
DATA_DIR = WORK_DIR / "ks-data"
ASSET = "bench"
CLIP_SECONDS = 2

#: The key route's 99th percentile latency under 50 connections: at most 5 ms.
TARGET_P99_MS = 5.0
DEFAULT_ROUNDS = 3
DEFAULT_DURATION_S = 10
DEFAULT_WARMUP_S = 5
DEFAULT_CONNECTIONS = 50
#: CDN signing may cost at most 10 % of the variant playlist's request rate.
TARGET_SIGNING_RATIO = 0.9
SIGNING_CDN_URL = "https://cdn.bench.example"
SIGNING_KEY_PAIR_ID = "KBENCHKEYPAIR"
#: One wrk thread: on a 2-core machine wrk gets one core and the server the other.
WRK_THREADS = 1
START_TIMEOUT_S = 20.0

NGINX_NAME = "nginx"
#: The bare apps of ``--bare``: name -> (module:app, granian interface).
BARE_APPS = {"bare-asgi": ("bare_asgi:app", "ASGI"), "bare-rsgi": ("bare_rsgi:app", "RSGI")}
#: The servers `hlsvault serve --server` offers, compared side by side.
SERVERS = ("uvicorn", "granian", "granian-rsgi")
#: The routes loaded: the key, and the two playlists a player fetches first.
ROUTES = ("key", "variant", "master")
#: The issue's targets per route: the key at half nginx's rate, the playlists at a quarter.
TARGET_RATIOS = {"key": 0.5, "variant": 0.25, "master": 0.25}


@dataclass
class WrkRun:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: str
    cpu_us_per_request: float


class BenchFailed(Exception):
    pass


# --- tools -------------------------------------------------------------------------------------


def ensure_tools() -> None:
    """wrk and nginx, installed with apt-get when missing (bench-only tools)."""
    wanted = {"wrk": "wrk", "nginx": "nginx-light"}
    missing = [tool for tool in wanted
               if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if not missing:
        return
    packages = [wanted[tool] for tool in missing]
    print(f"{', '.join(missing)} not found: installing {' '.join(packages)} with apt-get "
          "(benchmark-only tools; the tests do not need them)", flush=True)
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        raise BenchFailed(f"install {' '.join(packages)} first (apt-get as root is not available)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *packages], check=True, env=env)


def nginx_binary() -> str:
    return shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(url: str, process: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchFailed(f"{name} exited with {process.returncode} while starting")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise BenchFailed(f"{name} did not answer {url} within {START_TIMEOUT_S:.0f} s")


def fetch(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - loopback
        return response.status, response.read()


def redact(url: str) -> str:
    return re.sub(r"token=[^&]+", "token=…", url)


def stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- CPU time from /proc -----------------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (nginx: master and worker)."""
    found = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in children:
        found.extend(process_tree(int(child)))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` and its descendants, all threads included."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def loaded_libraries(pid: int, names: tuple[str, ...]) -> list[str]:
    """Which of ``names`` (extension modules) the process has mapped: uvloop, httptools."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return []
    return [name for name in names if f"/{name}/" in maps]


# --- wrk ---------------------------------------------------------------------------------------

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(output: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([0-9.]+)(us|ms|s|m)\s*$", output, re.M)
    if match is None:
        raise BenchFailed(f"wrk printed no {percentile}% latency:\n{output}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def run_wrk(url: str, seconds: int, connections: int, server_pid: int) -> WrkRun:
    before = cpu_seconds(server_pid)
    done = subprocess.run(
        ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True, text=True, timeout=seconds + 60, check=False,
    )
    cpu = cpu_seconds(server_pid) - before
    output = done.stdout
    if done.returncode != 0:
        raise BenchFailed(f"wrk exited with {done.returncode}: {done.stderr.strip()}")
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", output, re.M)
    total = re.search(r"^\s*([0-9]+) requests in", output, re.M)
    if rps is None or total is None:
        raise BenchFailed(f"could not read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+([0-9]+)", output)
    errors = re.search(
        r"Socket errors: connect ([0-9]+), read ([0-9]+), write ([0-9]+), timeout ([0-9]+)", output
    )
    run = WrkRun(
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(output, "50"),
        p99_ms=_latency_ms(output, "99"),
        requests=int(total.group(1)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=errors.group(0) if errors else "",
        cpu_us_per_request=cpu / max(1, int(total.group(1))) * 1e6,
    )
    if run.non_2xx:
        raise BenchFailed(f"{run.non_2xx} non-2xx responses from {redact(url)}:\n"
                          f"{redact(output)}")
    if errors and (int(errors.group(1)) or int(errors.group(4))):
        raise BenchFailed(f"wrk socket errors against {redact(url)}: {errors.group(0)}")
    return run


# --- the two servers ---------------------------------------------------------------------------


def start_nginx(port: int, files: dict[str, bytes]) -> tuple[subprocess.Popen[bytes], str]:
    """nginx serving a random 16-byte ``key`` and ``files`` (name -> bytes) from one
    directory; the process and its base URL."""
    root = SCRATCH / "nginx"
    shutil.rmtree(root, ignore_errors=True)
    (root / "html").mkdir(parents=True)
    (root / "html" / "key").write_bytes(secrets.token_bytes(16))
    for name, body in files.items():
        (root / "html" / name).write_bytes(body)
    config = root / "nginx.conf"
    config.write_text(f"""\
worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/client_body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location / {{ root {root}/html; }}
    }}
}}
""")
    log = (root / "stderr.log").open("wb")
    process = subprocess.Popen(
        [nginx_binary(), "-p", str(root), "-e", str(root / "error.log"), "-c", str(config)],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    base = f"http://127.0.0.1:{port}"
    wait_for(f"{base}/key", process, "nginx")
    status, body = fetch(f"{base}/key")
    if status != 200 or len(body) != 16:
        raise BenchFailed(f"nginx answered {status} with {len(body)} bytes")
    return process, base


def hlsvault_env(port: int) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith("HLSVAULT_") and name != "REDIS_URL"}
    env.update(
        HLSVAULT_DATA_DIR=str(DATA_DIR),
        HLSVAULT_PUBLIC_URL=f"http://127.0.0.1:{port}",
        HLSVAULT_RATE_LIMIT_TOKEN="0",  # noqa: S106 - a rate limit, not a secret
        HLSVAULT_RATE_LIMIT_IP="0",
    )
    return env


def package_clip(env: dict[str, str]) -> None:
    """A fresh data dir holding the 2 s clip, packaged and published as asset ``bench``."""
    clip = SCRATCH / f"clip-{CLIP_SECONDS}s.mp4"
    if not clip.is_file():
        subprocess.run(
            ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
             "-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=30:duration={CLIP_SECONDS}",
             "-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={CLIP_SECONDS}",
             "-c:v", "libx264", "-preset", "veryfast", "-g", "30", "-pix_fmt", "yuv420p",
             "-c:a", "aac", "-shortest", str(clip)],
            check=True, timeout=300,
        )
    shutil.rmtree(DATA_DIR, ignore_errors=True)
    subprocess.run(
        [HLSVAULT, "package", str(clip), "--asset", ASSET, "--ladder", "copy", "--json"],
        check=True, env=env, stdout=subprocess.DEVNULL, timeout=300,
    )


def serve_variant(
    env: dict[str, str], port: int, log_path: Path, what: str, server: str = "uvicorn"
) -> tuple[subprocess.Popen[bytes], str, int, bytes]:
    """`hlsvault serve --server S` on ``env``'s data dir, logging to ``log_path``; the process,
    the URL of the packaged asset's first variant playlist, and that playlist as fetched."""
    log = log_path.open("wb")
    process = subprocess.Popen(
        [HLSVAULT, "serve", "--port", str(port), "--server", server],
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
    )
    wait_for(f"http://127.0.0.1:{port}/healthz", process, what)
    master_url = subprocess.run(
        [HLSVAULT, "url", ASSET, "--ttl", "3600"],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    ).stdout.strip()
    status, master = fetch(master_url)
    variants = [line for line in master.decode().splitlines() if line and line[0] != "#"]
    if status != 200 or not variants:
        raise BenchFailed(f"master playlist ({what}): {status}, no variant")
    status, variant = fetch(variants[0])
    return process, variants[0], status, variant


def start_hlsvault(port: int, server: str) -> tuple[subprocess.Popen[bytes], dict[str, str], Path]:
    """`hlsvault serve --server S` over the packaged clip; the process, the URLs of its key,
    variant and master routes (one token), its log."""
    env = hlsvault_env(port)
    log_path = SCRATCH / f"keyserver-{server}.log"
    process, variant_url, status, variant = serve_variant(
        env, port, log_path, f"hlsvault serve --server {server}", server
    )
    key_uri = re.search(r'#EXT-X-KEY:METHOD=AES-128,URI="([^"]+)"', variant.decode())
    if status != 200 or key_uri is None:
        raise BenchFailed(f"variant playlist: {status}, no EXT-X-KEY URI")
    key_url = key_uri.group(1)
    status, key = fetch(key_url)
    if status != 200 or len(key) != 16:
        raise BenchFailed(f"key: {status} with {len(key)} bytes")
    master_url = f"{variant_url.split('/v1/assets/')[0]}/v1/assets/{ASSET}/master.m3u8?" + (
        variant_url.partition("?")[2])
    return process, {"key": key_url, "variant": variant_url, "master": master_url}, log_path


# --- variant playlists, with and without CDN signing -------------------------------------------


def signing_env(port: int) -> dict[str, str]:
    """hlsvault_env plus CloudFront signing with a key generated for the benchmark."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key_file = SCRATCH / "cloudfront-bench.pem"
    if not key_file.is_file():
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_file.write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        key_file.chmod(0o600)
    env = hlsvault_env(port)
    env.update(HLSVAULT_CDN_URL=SIGNING_CDN_URL,
               HLSVAULT_CLOUDFRONT_KEY_PAIR_ID=SIGNING_KEY_PAIR_ID,
               HLSVAULT_CLOUDFRONT_PRIVATE_KEY=str(key_file))
    return env


def start_variant_server(env: dict[str, str], port: int, name: str) -> tuple[
    subprocess.Popen[bytes], str
]:
    """`hlsvault serve` on the packaged data dir; the URL of its variant playlist."""
    process, variant_url, status, variant = serve_variant(
        env, port, SCRATCH / f"variant-{name}.log", f"hlsvault serve ({name})"
    )
    segments = [line for line in variant.decode().splitlines() if line and line[0] != "#"]
    signed = all("Signature=" in line for line in segments)
    if status != 200 or not segments or signed != (name == "signed"):
        raise BenchFailed(f"variant playlist ({name}): {status}, segments signed: {signed}")
    return process, variant_url


def uncached_signature_ms(env: dict[str, str], count: int = 200) -> float:
    """Milliseconds per signature made anew (distinct resources: no cache hit)."""
    from pipeline.cdnsign import CdnSigner

    pem = Path(env["HLSVAULT_CLOUDFRONT_PRIVATE_KEY"]).read_text()
    signer = CdnSigner(SIGNING_KEY_PAIR_ID, pem, ttl_s=3600, max_cached=count)
    started = time.perf_counter()
    for n in range(count):
        signer.policy(f"{SIGNING_CDN_URL}/assets/a/v/r{n}/*", expires_at=2_000_000_000)
    return (time.perf_counter() - started) * 1000 / count


def run_signing(args: argparse.Namespace) -> float:
    """Variant playlists per second without and with signing; the ratio signed / unsigned."""
    plain = signed = None
    try:
        plain_port = free_port()
        package_clip(hlsvault_env(plain_port))
        plain, plain_url = start_variant_server(hlsvault_env(plain_port), plain_port, "unsigned")
        signed_port = free_port()
        env = signing_env(signed_port)
        signed, signed_url = start_variant_server(env, signed_port, "signed")
        servers = {"unsigned": (plain.pid, plain_url), "signed": (signed.pid, signed_url)}
        print(f"variant playlists: GET {redact(plain_url)} of two `hlsvault serve` processes, "
              f"one signing every segment URI for {SIGNING_CDN_URL} (CloudFront custom policy)")
        for name in servers:
            pid, url = servers[name]
            run_wrk(url, args.warmup, args.connections, pid)
        results: dict[str, list[WrkRun]] = {"unsigned": [], "signed": []}
        ratios: list[float] = []
        print(f"{'round':<7}{'unsigned rps':>13}{'p99 ms':>8}{'CPU us/req':>11}"
              f"{'signed rps':>12}{'p99 ms':>8}{'CPU us/req':>11}{'ratio':>7}   order")
        for index in range(args.rounds):
            order = ["unsigned", "signed"] if index % 2 == 0 else ["signed", "unsigned"]
            for name in order:
                pid, url = servers[name]
                results[name].append(run_wrk(url, args.duration, args.connections, pid))
            un, si = results["unsigned"][-1], results["signed"][-1]
            ratios.append(si.rps / un.rps)
            print(f"{index + 1:<7}{un.rps:>13.0f}{un.p99_ms:>8.2f}{un.cpu_us_per_request:>11.0f}"
                  f"{si.rps:>12.0f}{si.p99_ms:>8.2f}{si.cpu_us_per_request:>11.0f}"
                  f"{ratios[-1]:>7.3f}   {' > '.join(order)}")
        un_rps = statistics.median(r.rps for r in results["unsigned"])
        si_rps = statistics.median(r.rps for r in results["signed"])
        ratio = statistics.median(ratios)
        print(f"{'median':<7}{un_rps:>13.0f}{'':>19}{si_rps:>12.0f}{'':>19}{ratio:>7.3f}")
        print(f"an uncached signature (RSA-2048, SHA-1) costs {uncached_signature_ms(env):.2f} ms; "
              "cached ones are looked up per (rendition, expiry bucket, address)")
        met = ratio >= TARGET_SIGNING_RATIO
        print(f"RESULT cdn signing: variant playlists unsigned {un_rps:.0f} rps, signed "
              f"{si_rps:.0f} rps, ratio {ratio:.3f} (target >= {TARGET_SIGNING_RATIO}: "
              f"{'met' if met else 'MISSED'})")
        return ratio
    finally:
        stop(plain)
        stop(signed)


# --- profile -----------------------------------------------------------------------------------

#: Functions worth naming in the profile summary: the request path, logging and the thread hop.
_PROFILE_FOCUS = (
    "KeyServer.", "ViewerRoutes.", "Credentials.", "TokenVerifier.", "PyJWT.decode",
    "AccessLog.", "CORSMiddleware.", "LineWriter.", "JsonLinesSink.", "structlog_sink",
    "redact_processor", "StreamHandler.emit", "run_sync", "MemoryRateLimiter.hit",
    "VaultView.", "KeyRequestStats.", "ViewerRouter.", "json_fields", "parse_qsl",
    "Starlette.__call__", "Router.", "RequestResponseCycle.send", "ProxyHeadersMiddleware",
    "BoundLogger.", "ProcessorFormatter.format", "JSONRenderer", "dumps",
)


def profile(key_url: str, pid: int, seconds: int, connections: int) -> None:
    if not PY_SPY.exists():
        print(f"--profile: {PY_SPY} not found; install it with .venv/bin/pip install py-spy")
        return
    out = SCRATCH / "profile.txt"
    wrk = subprocess.Popen(
        ["wrk", f"-t{WRK_THREADS}", f"-c{connections}", f"-d{seconds + 2}s", key_url],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1)
    subprocess.run(
        [str(PY_SPY), "record", "-p", str(pid), "-d", str(seconds), "-r", "250", "-f", "raw",
         "--nonblocking", "--subprocesses", "-o", str(out)],
        check=True, capture_output=True, timeout=seconds + 60,
    )
    wrk.wait()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "WorkerThread.run" in stack and "Condition.wait" in stack:
            continue  # an idle thread-pool thread
        total += int(count)
        names = {frame.split(" (")[0] for frame in stack.split(";")}
        for name in names:
            if name.startswith(_PROFILE_FOCUS):
                inclusive[name] += int(count)
    print(f"profile: py-spy, {total} samples of busy threads over {seconds} s "
          f"(raw stacks in {out.relative_to(REPO_DIR)});"
          " inclusive share of samples:")
    for name, samples in inclusive.most_common(20):
        print(f"  {100 * samples / max(1, total):5.1f}%  {name}")


# --- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--duration", type=int, default=DEFAULT_DURATION_S, help="s per wrk run")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP_S, help="s, untimed")
    parser.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS)
    parser.add_argument("--profile", action="store_true", help="add a py-spy run of hlsvault")
    parser.add_argument("--only-signing", action="store_true",
                        help="only the variant playlists with and without CDN signing")
    parser.add_argument("--no-signing", action="store_true",
                        help="skip the variant playlists with and without CDN signing")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="ASGI servers to compare, comma-separated (default: both)")
    parser.add_argument("--bare", action="store_true",
                        help="also load bare ASGI and RSGI apps under granian on the key route")
    parser.add_argument("--routes", default=",".join(ROUTES),
                        help="routes to load, comma-separated (default: key,variant,master)")
    args = parser.parse_args(argv)
    try:
        ensure_tools()
        if args.only_signing:
            SCRATCH.mkdir(parents=True, exist_ok=True)
            print(describe())
            run_signing(args)
            return 0
        code = run(args)
        if not args.no_signing:
            run_signing(args)
        return code
    except BenchFailed as error:
        print(f"bench_keyserver: FAILED: {error}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace) -> int:
    SCRATCH.mkdir(parents=True, exist_ok=True)
    servers = [name for name in args.servers.split(",") if name]
    routes = [name for name in args.routes.split(",") if name]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        package_clip(hlsvault_env(free_port()))
        urls: dict[str, dict[str, tuple[int, str]]] = {route: {} for route in routes}
        log_paths: dict[str, Path] = {}
        first: dict[str, str] = {}
        for server in servers:
            process, server_urls, log_paths[server] = start_hlsvault(free_port(), server)
            processes.append(process)
            first = first or server_urls
            for route in routes:
                urls[route][server] = (process.pid, server_urls[route])
        # nginx serves the very playlists the first server answered, as static files.
        files = {f"{route}.m3u8": fetch(first[route])[1] for route in ("variant", "master")}
        nginx, nginx_base = start_nginx(free_port(), files)
        processes.append(nginx)
        for route in routes:
            path = "/key" if route == "key" else f"/{route}.m3u8"
            urls[route][NGINX_NAME] = (nginx.pid, f"{nginx_base}{path}")
        bare_apps = BARE_APPS if args.bare and "key" in urls else {}
        for name, (target, interface) in bare_apps.items():
            bare, bare_url = start_bare(free_port(), name, target, interface)
            processes.insert(0, bare)
            urls["key"][name] = (bare.pid, bare_url)
        print_setup(args, servers, processes[len(bare_apps):], log_paths)
        for name, (target, interface) in bare_apps.items():
            print(f"{name}: bench/{target.split(':')[0]}.py (16 bytes, no checks) under "
                  f"granian's {interface} interface, one worker: the ceiling of an {interface} "
                  "app on one core")
        code = 0
        for route in routes:
            code |= run_route(args, route, urls[route], servers)
        if args.profile:
            pid, url = urls[routes[0]][servers[0]]
            profile(url, pid, args.duration, args.connections)
        return code
    finally:
        for process in processes[:-1]:
            stop(process)
        if processes:
            stop(processes[-1], signal.SIGQUIT)


def start_bare(port: int, name: str, target: str, interface: str) -> tuple[
    subprocess.Popen[bytes], str
]:
    """A bare app under granian with `hlsvault serve`'s options; the process and its URL."""
    code = (
        "from granian.constants import HTTPModes, Interfaces, Loops\n"
        "from pathlib import Path\n"
        "from granian.server import Server\n"
        f"Server({target!r}, address='127.0.0.1', port={port}, "
        f"interface=Interfaces.{interface}, workers=1, loop=Loops.uvloop, "
        "http=HTTPModes.http1, websockets=False, log_access=False,"
        f" working_dir=Path({str(Path(__file__).parent)!r})).serve()\n"
    )
    log = (SCRATCH / f"{name}.log").open("wb")
    process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.DEVNULL,
                               stdout=log, stderr=log, cwd=Path(__file__).parent)
    url = f"http://127.0.0.1:{port}/key"
    wait_for(url, process, name)
    return process, url


def print_setup(
    args: argparse.Namespace, servers: list[str], processes: list[subprocess.Popen[bytes]],
    log_paths: dict[str, Path],
) -> None:
    nginx_version = subprocess.run(
        [nginx_binary(), "-v"], capture_output=True, text=True, check=False
    ).stderr.strip()
    wrk_version = subprocess.run(
        ["wrk", "-v"], capture_output=True, text=True, check=False
    ).stdout.split("\n")[0]
    print(describe())
    print(f"{wrk_version}; {nginx_version}; wrk -t{WRK_THREADS} -c{args.connections} "
          f"-d{args.duration}s --latency; {args.rounds} rounds after a {args.warmup} s "
          "warm-up of each, the order rotating round by round")
    for server, process in zip(servers, processes, strict=False):
        fast = loaded_libraries(process.pid, ("uvloop", "httptools", "granian"))
        for child in process_tree(process.pid)[1:]:
            fast += [n for n in loaded_libraries(child, ("uvloop", "granian")) if n not in fast]
        print(f"hlsvault serve --server {server}: one worker; {', '.join(fast) or 'nothing'} "
              f"loaded; log lines to {log_paths[server].relative_to(REPO_DIR)}")
    print("nginx: the same key (16 random bytes) and playlists as static files; "
          "worker_processes 1; access_log off")


def run_route(
    args: argparse.Namespace, route: str, targets: dict[str, tuple[int, str]],
    servers: list[str],
) -> int:
    """wrk on one route of every server and of nginx, alternating; a RESULT line per server."""
    names = [*servers, *(name for name in BARE_APPS if name in targets), NGINX_NAME]
    print(f"\n{route}: GET {redact(targets[servers[0]][1])} (HS256 token in the query string)")
    for name in names:
        pid, url = targets[name]
        run_wrk(url, args.warmup, args.connections, pid)
    results: dict[str, list[WrkRun]] = {name: [] for name in names}
    ratios: dict[str, list[float]] = {name: [] for name in names if name != NGINX_NAME}
    print(f"{'round':<7}" + "".join(f"{name + ' rps':>14}{'p99 ms':>8}{'CPU us':>8}"
                                     for name in names) + "   ratios")
    for index in range(args.rounds):
        order = names[index % len(names):] + names[:index % len(names)]
        for name in order:
            pid, url = targets[name]
            results[name].append(run_wrk(url, args.duration, args.connections, pid))
        nginx = results[NGINX_NAME][-1]
        for server in ratios:
            ratios[server].append(results[server][-1].rps / nginx.rps)
        print(f"{index + 1:<7}" + "".join(
            f"{results[n][-1].rps:>14.0f}{results[n][-1].p99_ms:>8.2f}"
            f"{results[n][-1].cpu_us_per_request:>8.0f}" for n in names)
            + "   " + " ".join(f"{ratios[s][-1]:.3f}" for s in ratios))

    def median(name: str, field: str) -> float:
        return float(statistics.median(getattr(run, field) for run in results[name]))

    print(f"{'median':<7}" + "".join(
        f"{median(n, 'rps'):>14.0f}{median(n, 'p99_ms'):>8.2f}"
        f"{median(n, 'cpu_us_per_request'):>8.0f}" for n in names))
    target = TARGET_RATIOS[route]
    for name, (_, interface) in BARE_APPS.items():
        if name in ratios:
            print(f"RESULT keyserver {route} (bare {interface} app under granian, the ceiling): "
                  f"{median(name, 'rps'):.0f} rps, ratio {statistics.median(ratios[name]):.3f}")
    for server in servers:
        ratio = statistics.median(ratios[server])
        p99 = median(server, "p99_ms")
        met = ratio >= target and (route != "key" or p99 <= TARGET_P99_MS)
        p99_target = f", p99 <= {TARGET_P99_MS:.0f} ms" if route == "key" else ""
        print(f"RESULT keyserver {route} ({server}): hlsvault {median(server, 'rps'):.0f} rps "
              f"p99 {p99:.1f} ms, nginx {median(NGINX_NAME, 'rps'):.0f} rps, ratio {ratio:.3f} "
              f"(target >= {target}{p99_target}: {'met' if met else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
