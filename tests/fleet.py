"""The distributed fleet for tests: a private redis-server, a moto server speaking the real S3,
CloudFront and SQS HTTP APIs, and worker processes started from the Procfile's own commands."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import signal
import subprocess
import uuid
from pathlib import Path
from typing import IO, Any

import boto3
import redis

from support import ROOT, VENV_BIN, free_port, wait_for_port

#: Dead workers' messages come back this fast in tests (a minute in production).
TEST_HEARTBEAT_MS = 3000
#: Maintenance (requeueing dead workers' messages) on every dispatch call, in tests.
TEST_MAINTENANCE_CHANCE = 1_000_000


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Signal a process group started with start_new_session, then reap it (bounded)."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=15)


class RedisServer:
    """A redis-server of the test's own, with AOF so that a restart loses nothing."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--appendonly", "yes", "--appendfsync", "always",
             "--save", "", "--logfile", str(self.directory / "redis.log")],
            start_new_session=True,
        )
        wait_for_port(self.port)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            stop_process(self.process, sig)
            self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)


class MotoServer:
    """moto in server mode: boto3 talks HTTP to it, as it would to AWS."""

    def __init__(self, log: Path) -> None:
        self.port = free_port()
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._log_file = self.log.open("wb")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None
        if self._log_file is not None:
            self._log_file.close()

    def client(self, service: str) -> Any:
        return boto3.session.Session().client(
            service, endpoint_url=self.endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )


def procfile_commands(path: Path = ROOT / "Procfile") -> dict[str, str]:
    """The process types of the Procfile, as honcho reads them: ``name: command``."""
    commands = {}
    for line in path.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_-]+):\s*(.+)$", line)
        if match:
            commands[match.group(1)] = match.group(2)
    return commands


class Fleet:
    """Every Procfile process type, started against a test's Redis and moto, each killable."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.commands = procfile_commands()
        self.processes: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.web_port = int(env["PORT"])

    def start(self, kind: str, *, count: int = 1) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for _ in range(count):
            index = len(self.processes.get(kind, []))
            log = (self.logs / f"{kind}.{index}.log").open("ab")
            process = subprocess.Popen(
                ["bash", "-c", f"exec {self.commands[kind]}"], env=self.env, cwd=ROOT,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
            log.close()
            self.processes.setdefault(kind, []).append(process)
        if kind == "web":
            wait_for_port(self.web_port)

    def kill(self, kind: str, sig: int = signal.SIGKILL) -> None:
        for process in self.processes.pop(kind, []):
            stop_process(process, sig)

    def start_all(self) -> None:
        for kind in ("web", "upload", "segment", "encrypt"):
            self.start(kind)

    def stop(self) -> None:
        for kind in list(self.processes):
            self.kill(kind, signal.SIGTERM)

    def log_text(self) -> str:
        return "\n".join(
            f"== {path.name}\n{path.read_text(errors='replace')}"
            for path in sorted(self.logs.glob("*.log"))
        )

    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(VENV_BIN / "hlsvault"), *args], env=self.env, cwd=ROOT, capture_output=True,
            text=True, timeout=timeout, check=False,
        )


def fleet_environment(
    tmp: Path, redis_server: RedisServer, moto: MotoServer, *, endpoint: str | None = None
) -> dict[str, str]:
    """Buckets of the test's own, and the environment every fleet process gets."""
    tag = uuid.uuid4().hex[:8]
    buckets = {name: f"hv-{name}-{tag}" for name in ("work", "origin", "vault")}
    s3 = moto.client("s3")
    for bucket in buckets.values():
        s3.create_bucket(Bucket=bucket)
    # The origin stands in for CloudFront: anyone may GET from it, as players do from a CDN.
    s3.put_bucket_policy(Bucket=buckets["origin"], Policy=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
            "Resource": f"arn:aws:s3:::{buckets['origin']}/*",
        }],
    }))
    cloudfront = moto.client("cloudfront")
    distribution = cloudfront.create_distribution(
        DistributionConfig={
            "CallerReference": tag,
            "Origins": {"Quantity": 1, "Items": [{
                "Id": "origin", "DomainName": f"{buckets['origin']}.s3.amazonaws.com",
                "S3OriginConfig": {"OriginAccessIdentity": ""},
            }]},
            "DefaultCacheBehavior": {
                "TargetOriginId": "origin", "ViewerProtocolPolicy": "allow-all",
            },
            "Comment": "hlsvault test", "Enabled": True,
        }
    )["Distribution"]["Id"]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "AWS_"))}
    env.update(
        PATH=f"{VENV_BIN}:{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        PORT=str(port),
        REDIS_URL=redis_server.url,
        AWS_ENDPOINT_URL=endpoint or moto.endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        HLSVAULT_DATA_DIR=str(tmp / "data"),
        HLSVAULT_WORK=f"s3://{buckets['work']}/work",
        HLSVAULT_ORIGIN=f"s3://{buckets['origin']}",
        HLSVAULT_VAULT=f"s3://{buckets['vault']}/vault",
        # The moto endpoint stands in for CloudFront: segments are fetched from it over HTTP.
        HLSVAULT_CDN_URL=f"{moto.endpoint}/{buckets['origin']}",
        HLSVAULT_PUBLIC_URL=f"http://127.0.0.1:{port}",
        HLSVAULT_CLOUDFRONT_DISTRIBUTION_ID=distribution,
        HLSVAULT_TOKEN_SECRET=base64.urlsafe_b64encode(os.urandom(36)).decode(),
        HLSVAULT_MASTER_KEY=base64.b64encode(os.urandom(32)).decode(),
        HLSVAULT_OPS_PASSWORD=base64.urlsafe_b64encode(os.urandom(18)).decode(),
        OPS_PORT=str(free_port()),
        HLSVAULT_HEARTBEAT_TIMEOUT_MS=str(TEST_HEARTBEAT_MS),
        HLSVAULT_MAINTENANCE_CHANCE=str(TEST_MAINTENANCE_CHANCE),
        TEST_BUCKET_WORK=buckets["work"],
        TEST_BUCKET_ORIGIN=buckets["origin"],
        TEST_BUCKET_VAULT=buckets["vault"],
    )
    return env
