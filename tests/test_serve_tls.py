"""`hlsvault serve --certfile --keyfile` serves keys and playlists over HTTPS."""

from __future__ import annotations

import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from support import HLSVAULT, Hlsvault

#: How long the HTTPS server may take to start listening.
START_TIMEOUT_S = 20.0


def fetch_when_up(url: str, context: ssl.SSLContext) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5, context=context) as response:
                return str(response.read().decode())
        except ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
        except urllib.error.URLError as error:
            if not isinstance(error.reason, ConnectionError) or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_serve_speaks_tls_with_the_given_certificate(
    hlsvault: Hlsvault, copy_clip: Path, tmp_path: Path
) -> None:
    """With a certificate and key the key server answers over HTTPS, and a player trusting
    that certificate gets the master playlist, whose URIs are https too."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )
    hlsvault.env["HLSVAULT_PUBLIC_URL"] = f"https://127.0.0.1:{hlsvault.port}"
    done = hlsvault.package(str(copy_clip), "--asset", "tls", "--ladder", "copy")
    assert done.returncode == 0, done.stderr
    url = hlsvault.url("tls")
    assert url.startswith("https://")
    server = subprocess.Popen(
        [*HLSVAULT, "serve", "--port", str(hlsvault.port), "--certfile", str(cert),
         "--keyfile", str(key)],
        env=hlsvault.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        body = fetch_when_up(url, ssl.create_default_context(cafile=str(cert)))
    finally:
        server.terminate()
        server.wait(timeout=10)
    assert body.startswith("#EXTM3U")
    assert f"https://127.0.0.1:{hlsvault.port}/v1/assets/tls/" in body
