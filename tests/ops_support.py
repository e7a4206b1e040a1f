"""Helpers the ops-app tests share: HTTP with Basic auth, Prometheus text, the ops app
in-process over embedded stores, and what its pages carry (CSRF tokens)."""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from email.message import Message

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from starlette.testclient import TestClient

from dashboard.app import create_app
from pipeline.jobs import JobSpec, new_job_spec
from pipeline.services import Services, build_services
from pipeline.settings import Settings

PASSWORD = "correct horse battery staple"


def get(url: str, *, password: str | None = PASSWORD) -> tuple[int, Message, str]:
    """GET ``url`` as ``ops`` (or without credentials): status, headers, body."""
    request = urllib.request.Request(url)
    if password is not None:
        request.add_header(
            "Authorization", "Basic " + base64.b64encode(f"ops:{password}".encode()).decode()
        )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode()


def series(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the Prometheus text ``text``, or None if absent."""
    for line in text.splitlines():
        match = re.match(r"^([a-z_]+)(?:\{(.*)\})? (\S+)$", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(3))
    return None



@dataclass
class LocalOps:
    """The ops app in-process on embedded-mode stores (no Redis), with a recording submitter."""

    client: TestClient
    services: Services
    submitted: list[JobSpec]


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"ops:{password}".encode()).decode()


def local_ops_for(settings: Settings) -> LocalOps:
    services = build_services(settings)
    submitted: list[JobSpec] = []

    def submit(spec: JobSpec) -> None:
        services.jobs.create(spec)
        submitted.append(spec)

    app = create_app(settings, services=services, submit=submit)
    client = TestClient(app, base_url="http://ops.test", headers={"Authorization": basic(PASSWORD)})
    return LocalOps(client, services, submitted)


def csrf_token(client: TestClient, job_id: str, action: str) -> str:
    """The CSRF token of the ``action`` form on the job's page ("" if there is no such form)."""
    match = re.search(
        rf'action="/jobs/\w+/{action}"><input type=hidden name=csrf value="(\w+)"',
        client.get(f"/jobs/{job_id}").text,
    )
    return match.group(1) if match else ""


def succeeded_job(services: Services, asset: str = "film") -> JobSpec:
    spec = new_job_spec(f"/videos/{asset}.mp4", asset=asset)
    services.jobs.create(spec)
    services.jobs.succeed(spec.job_id, {})
    return spec


def ed25519_pems() -> tuple[str, str]:
    """A fresh Ed25519 key pair as (public PEM, private PEM)."""
    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return public.decode(), private.decode()
