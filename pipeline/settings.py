"""Settings: the one place that reads the environment.

Every process (CLI, worker, key server) calls :func:`load_settings` once at its edge and passes
the frozen result down. Nothing below reads ``os.environ``.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ConfigurationError
from .storage import check_store_url

#: Where the embedded mode keeps its three stores, job records and generated secrets.
DEFAULT_DATA_DIR = "./hlsvault-data"
#: The key server's address as players reach it; `hlsvault serve` listens here by default.
DEFAULT_PUBLIC_URL = "http://127.0.0.1:8000"
#: Token signing algorithms the key server verifies: a shared secret, or a public key only.
TOKEN_ALGORITHMS = ("HS256", "EdDSA", "RS256")
#: HMAC secrets shorter than this are guessable offline from one captured token.
MIN_TOKEN_SECRET_LENGTH = 32
#: A dead worker's messages come back after this long without a heartbeat (dramatiq's default).
DEFAULT_HEARTBEAT_TIMEOUT_MS = 60_000
#: Per million dispatches, how often the broker requeues dead workers' messages (its default).
DEFAULT_MAINTENANCE_CHANCE = 1000
#: Deliveries of one stage before its job is declared poison: retries of ordinary failures are
#: bounded by dramatiq, this bounds redeliveries after a worker died mid-stage (never counted).
DEFAULT_MAX_DELIVERIES = 8
#: Key requests per token per minute: a player fetches one key per rotation period, plus retries
#: and seeks; far above that is a token being shared or scraped.
DEFAULT_RATE_LIMIT_TOKEN_PER_MIN = 120
#: Key requests per client address per minute: room for a household or an office behind NAT.
DEFAULT_RATE_LIMIT_IP_PER_MIN = 600
#: The ops app (dashboard, job API, webhook, metrics) listens here unless OPS_PORT says otherwise.
DEFAULT_OPS_PORT = 8001
#: Tokens minted by `hlsvault url` live this long unless told otherwise: long enough for a film.
DEFAULT_TOKEN_TTL_S = 4 * 3600
#: No token is accepted that was minted to live longer than this.
DEFAULT_TOKEN_MAX_TTL_S = 24 * 3600
#: Offline tokens (claim ``offline``) may live this long: a downloaded film is watched later.
DEFAULT_OFFLINE_MAX_TTL_S = 30 * 24 * 3600
#: A CDN signature lives as long as the viewer's token, but never longer than this: a signed
#: URL copied out of a playlist stops working within a film's length or two.
DEFAULT_CDN_SIGNATURE_TTL_S = 6 * 3600
#: CloudFront accepts only 2048-bit RSA keys in a trusted key group.
CLOUDFRONT_KEY_BITS = 2048
_GENERATE_CLOUDFRONT_KEY = (
    "openssl genrsa -out private_key.pem 2048 && "
    "openssl rsa -pubout -in private_key.pem -out public_key.pem"
)
#: A transcode is cut into time chunks this long (whole segments), each encoded for every
#: rendition by one ffmpeg on any segment worker. A minute of a 1080p ladder keeps a core busy
#: for minutes, so a chunk's fixed costs (a few Redis and S3 calls, a seek, an encoder start)
#: stay near 1 % of it, while a 2-hour film still spreads over 120 machines. 0: never cut.
DEFAULT_CHUNK_SECONDS = 60

_GENERATE_MASTER_KEY = (
    "python3 -c 'import base64,os; print(base64.b64encode(os.urandom(32)).decode())'"
)
_GENERATE_TOKEN_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(48))'"


@dataclass(frozen=True)
class Settings:
    """Everything a hlsvault process needs to know about its deployment."""

    data_dir: Path
    public_url: str
    cdn_url: str
    work: str
    origin: str
    vault: str
    token_secret: str | None = field(repr=False)  # None with EdDSA/RS256 tokens
    master_key: bytes = field(repr=False)
    redis_url: str | None = field(default=None, repr=False)
    cloudfront_distribution_id: str | None = None
    heartbeat_timeout_ms: int = DEFAULT_HEARTBEAT_TIMEOUT_MS
    maintenance_chance: int = DEFAULT_MAINTENANCE_CHANCE
    token_max_ttl_s: int = DEFAULT_TOKEN_MAX_TTL_S
    max_deliveries: int = DEFAULT_MAX_DELIVERIES
    token_algorithm: str = "HS256"
    token_public_key: str | None = None
    token_private_key: str | None = field(default=None, repr=False)
    cors_origins: tuple[str, ...] = ()
    rate_limit_token_per_min: int = DEFAULT_RATE_LIMIT_TOKEN_PER_MIN
    rate_limit_ip_per_min: int = DEFAULT_RATE_LIMIT_IP_PER_MIN
    webhook_secret: str | None = field(default=None, repr=False)
    source_buckets: tuple[str, ...] = ()
    ingest_queue_url: str | None = None
    ops_password: str | None = field(default=None, repr=False)
    ops_port: int = DEFAULT_OPS_PORT
    #: Signed CDN access: both or neither (the id of the public key in a CloudFront trusted key
    #: group, and the RSA private key as PEM text).
    cloudfront_key_pair_id: str | None = None
    cloudfront_private_key: str | None = field(default=None, repr=False)
    cdn_signature_ttl_s: int = DEFAULT_CDN_SIGNATURE_TTL_S
    cdn_cookie_domain: str | None = None
    offline_max_ttl_s: int = DEFAULT_OFFLINE_MAX_TTL_S

    @property
    def cdn_signing(self) -> bool:
        """True when the key server signs CDN access (CloudFront policies and cookies)."""
        return self.cloudfront_key_pair_id is not None and self.cloudfront_private_key is not None
    chunk_seconds: int = DEFAULT_CHUNK_SECONDS

    @property
    def embedded(self) -> bool:
        """True when no Redis is configured: one process, in-memory broker, local stores."""
        return self.redis_url is None

    @property
    def jobs_dir(self) -> Path:
        """Where the embedded mode keeps job records."""
        return self.data_dir / "jobs"


def load_settings(
    environ: Mapping[str, str] | None = None, *, create: bool = True,
    require_fleet: str | None = None,
) -> Settings:
    """Build :class:`Settings` from environment variables.

    In embedded mode a missing token secret or master key is generated on first use into the
    data directory (mode 0600) — only when ``create`` is true: a command that reads what an
    earlier one made (``hlsvault token``, ``url``, ``status``) refuses instead, since a secret
    made anew would sign tokens no running key server accepts. With ``REDIS_URL`` set every
    process of the fleet must share them, so their absence is an error naming the variable.
    ``require_fleet`` names what needs ``REDIS_URL`` (a command that only makes sense on a
    fleet), which is then an error to leave unset.
    """
    env = os.environ if environ is None else environ
    redis_url = env.get("REDIS_URL") or None
    if require_fleet is not None and redis_url is None:
        raise ConfigurationError(f"{require_fleet}: set REDIS_URL")
    data_dir = Path(env.get("HLSVAULT_DATA_DIR") or DEFAULT_DATA_DIR).resolve()
    # Checked before any secret is generated: a refused start leaves nothing behind.
    work = _store_url(env, "HLSVAULT_WORK", data_dir / "work")
    origin = _store_url(env, "HLSVAULT_ORIGIN", data_dir / "origin")
    vault = _store_url(env, "HLSVAULT_VAULT", data_dir / "vault")
    public_url = (env.get("HLSVAULT_PUBLIC_URL") or DEFAULT_PUBLIC_URL).rstrip("/")
    cdn_url = (env.get("HLSVAULT_CDN_URL") or "").rstrip("/")
    if not cdn_url:
        if redis_url is not None:
            raise ConfigurationError(
                "HLSVAULT_CDN_URL is not set: with REDIS_URL set, segments are served by your "
                "CDN; set it to the CloudFront (or origin bucket) URL, e.g. https://d123.cloudfront.net"
            )
        cdn_url = f"{public_url}/cdn"

    algorithm = env.get("HLSVAULT_TOKEN_ALGORITHM") or "HS256"
    if algorithm not in TOKEN_ALGORITHMS:
        raise ConfigurationError(
            f"HLSVAULT_TOKEN_ALGORITHM={algorithm!r} is not supported; use "
            f"{', '.join(TOKEN_ALGORITHMS)}"
        )
    public_key = _pem(env, "HLSVAULT_TOKEN_PUBLIC_KEY")
    private_key = _pem(env, "HLSVAULT_TOKEN_PRIVATE_KEY")
    if algorithm != "HS256":
        for name, pem in (("HLSVAULT_TOKEN_PUBLIC_KEY", public_key),
                          ("HLSVAULT_TOKEN_PRIVATE_KEY", private_key)):
            if pem is not None:
                _check_token_key(name, pem, algorithm)
    if algorithm != "HS256" and public_key is None:
        raise ConfigurationError(
            f"HLSVAULT_TOKEN_PUBLIC_KEY is not set: with HLSVAULT_TOKEN_ALGORITHM={algorithm} the "
            "key server verifies tokens with your backend's public key (PEM text or a file path)"
        )
    # With EdDSA/RS256 only the customer's backend holds the signing key: no shared secret.
    needed = (
        ["HLSVAULT_TOKEN_SECRET", "HLSVAULT_MASTER_KEY"]
        if algorithm == "HS256"
        else ["HLSVAULT_MASTER_KEY"]
    )
    if redis_url is None:
        token_secret: str | None = None
        if algorithm == "HS256":
            token_secret = env.get("HLSVAULT_TOKEN_SECRET") or _embedded_secret(
                data_dir, "token_secret", _new_token_secret, env, create=create
            )
        master_key_text = env.get("HLSVAULT_MASTER_KEY") or _embedded_secret(
            data_dir, "master_key", lambda: base64.b64encode(os.urandom(32)).decode(), env,
            create=create,
        )
    else:
        missing = [name for name in needed if not env.get(name)]
        if missing:
            raise ConfigurationError(
                f"{' and '.join(missing)} not set: with REDIS_URL set every process must share "
                f"them. Generate a master key with {_GENERATE_MASTER_KEY} and a token secret "
                f"with {_GENERATE_TOKEN_SECRET}"
            )
        token_secret = env["HLSVAULT_TOKEN_SECRET"] if algorithm == "HS256" else None
        master_key_text = env["HLSVAULT_MASTER_KEY"]

    key_pair_id, cloudfront_key = _cloudfront_signing(env, cdn_url)

    if token_secret is not None and len(token_secret) < MIN_TOKEN_SECRET_LENGTH:
        raise ConfigurationError(
            f"HLSVAULT_TOKEN_SECRET is {len(token_secret)} characters; it must be at least "
            f"{MIN_TOKEN_SECRET_LENGTH}. Generate one with {_GENERATE_TOKEN_SECRET}"
        )

    return Settings(
        data_dir=data_dir,
        public_url=public_url,
        cdn_url=cdn_url,
        work=work,
        origin=origin,
        vault=vault,
        token_secret=token_secret,
        master_key=decode_master_key(master_key_text),
        redis_url=redis_url,
        cloudfront_distribution_id=env.get("HLSVAULT_CLOUDFRONT_DISTRIBUTION_ID") or None,
        heartbeat_timeout_ms=_int(
            env, "HLSVAULT_HEARTBEAT_TIMEOUT_MS", DEFAULT_HEARTBEAT_TIMEOUT_MS
        ),
        maintenance_chance=_int(env, "HLSVAULT_MAINTENANCE_CHANCE", DEFAULT_MAINTENANCE_CHANCE),
        token_max_ttl_s=_int(env, "HLSVAULT_TOKEN_MAX_TTL", DEFAULT_TOKEN_MAX_TTL_S),
        max_deliveries=max(1, _int(env, "HLSVAULT_MAX_DELIVERIES", DEFAULT_MAX_DELIVERIES)),
        token_algorithm=algorithm,
        token_public_key=public_key,
        token_private_key=private_key,
        cors_origins=_origins(env.get("HLSVAULT_CORS_ORIGINS") or ""),
        rate_limit_token_per_min=_int(
            env, "HLSVAULT_RATE_LIMIT_TOKEN", DEFAULT_RATE_LIMIT_TOKEN_PER_MIN
        ),
        rate_limit_ip_per_min=_int(env, "HLSVAULT_RATE_LIMIT_IP", DEFAULT_RATE_LIMIT_IP_PER_MIN),
        webhook_secret=env.get("HLSVAULT_WEBHOOK_SECRET") or None,
        source_buckets=tuple(
            b.strip() for b in (env.get("HLSVAULT_SOURCE_BUCKETS") or "").split(",") if b.strip()
        ),
        ingest_queue_url=env.get("HLSVAULT_INGEST_QUEUE_URL") or None,
        ops_password=env.get("HLSVAULT_OPS_PASSWORD") or None,
        ops_port=_int(env, "OPS_PORT", DEFAULT_OPS_PORT),
        cloudfront_key_pair_id=key_pair_id,
        cloudfront_private_key=cloudfront_key,
        cdn_signature_ttl_s=max(
            1, _int(env, "HLSVAULT_CDN_SIGNATURE_TTL", DEFAULT_CDN_SIGNATURE_TTL_S)
        ),
        cdn_cookie_domain=(env.get("HLSVAULT_CDN_COOKIE_DOMAIN") or "").strip() or None,
        offline_max_ttl_s=_int(env, "HLSVAULT_OFFLINE_MAX_TTL", DEFAULT_OFFLINE_MAX_TTL_S),
        chunk_seconds=_int(env, "HLSVAULT_CHUNK_SECONDS", DEFAULT_CHUNK_SECONDS),
    )


def _cloudfront_signing(env: Mapping[str, str], cdn_url: str) -> tuple[str | None, str | None]:
    """The CloudFront key pair id and private key, both or neither, the key checked to be what
    CloudFront verifies (RSA 2048) and the CDN URL one it can sign (absolute)."""
    key_pair_id = (env.get("HLSVAULT_CLOUDFRONT_KEY_PAIR_ID") or "").strip() or None
    pem = _pem(env, "HLSVAULT_CLOUDFRONT_PRIVATE_KEY")
    if key_pair_id is None and pem is None:
        return None, None
    if key_pair_id is None:
        raise ConfigurationError(
            "HLSVAULT_CLOUDFRONT_PRIVATE_KEY is set but HLSVAULT_CLOUDFRONT_KEY_PAIR_ID is not: "
            "set it to the id CloudFront gave the public key (K…, in the trusted key group), "
            "or unset the private key to serve the CDN unsigned"
        )
    if pem is None:
        raise ConfigurationError(
            "HLSVAULT_CLOUDFRONT_KEY_PAIR_ID is set but HLSVAULT_CLOUDFRONT_PRIVATE_KEY is not: "
            "set it to the RSA private key (PEM text or a file path) whose public key has that "
            f"id, or unset the key pair id. Make a key pair with {_GENERATE_CLOUDFRONT_KEY}"
        )
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        raise ConfigurationError(
            "HLSVAULT_CLOUDFRONT_PRIVATE_KEY is not an unencrypted PEM private key; "
            f"make one with {_GENERATE_CLOUDFRONT_KEY}"
        ) from None
    if not isinstance(key, RSAPrivateKey) or key.key_size != CLOUDFRONT_KEY_BITS:
        kind = f"RSA {key.key_size}" if isinstance(key, RSAPrivateKey) else type(key).__name__
        raise ConfigurationError(
            f"HLSVAULT_CLOUDFRONT_PRIVATE_KEY is a {kind} key; CloudFront verifies only RSA "
            f"{CLOUDFRONT_KEY_BITS} signatures: make one with {_GENERATE_CLOUDFRONT_KEY}"
        )
    parts = urlsplit(cdn_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"HLSVAULT_CDN_URL {cdn_url[:80]!r} is not an absolute URL: CloudFront signatures "
            "name the URL a player fetches; set it like https://d123.cloudfront.net"
        )
    return key_pair_id, pem


def _missing_data_dir(data_dir: Path, env: Mapping[str, str]) -> ConfigurationError:
    """Why a reading command refuses a data directory that was never set up."""
    origin = "HLSVAULT_DATA_DIR" if env.get("HLSVAULT_DATA_DIR") else (
        f"the default {DEFAULT_DATA_DIR}, relative to the current directory"
    )
    return ConfigurationError(
        f"no hlsvault data in {data_dir} ({origin}): run this command where you ran "
        "`hlsvault package`, or set HLSVAULT_DATA_DIR to that data directory"
    )


def decode_master_key(text: str) -> bytes:
    """Decode a base64 master key (standard or URL-safe alphabet) that must hold 32 bytes."""
    cleaned = text.strip()
    padded = cleaned + "=" * (-len(cleaned) % 4)
    try:
        if "-" in padded or "_" in padded:
            key = base64.urlsafe_b64decode(padded)
        else:
            key = base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != 32:
        raise ConfigurationError(
            "HLSVAULT_MASTER_KEY must be base64 of exactly 32 random bytes; "
            f"generate one with {_GENERATE_MASTER_KEY}"
        )
    return key


def _check_token_key(name: str, pem: str, algorithm: str) -> None:
    """Refuse, at start, a PEM that does not parse or is not a key of ``algorithm``'s type: it
    would otherwise fail every request (a 500 from the key server, a traceback from the CLI)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )
    from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, RSAPublicKey
    from cryptography.hazmat.primitives.serialization import (
        load_pem_private_key,
        load_pem_public_key,
    )

    private = name.endswith("PRIVATE_KEY")
    try:
        key: object = (
            load_pem_private_key(pem.encode(), password=None)
            if private
            else load_pem_public_key(pem.encode())
        )
    except (ValueError, TypeError):
        kind = "an unencrypted private" if private else "a public"
        raise ConfigurationError(
            f"{name} is not {kind} key in PEM form; give the PEM text or the path of a .pem "
            "file (openssl pkey -in key.pem -pubout prints the public one)"
        ) from None
    wanted = {
        "EdDSA": (Ed25519PrivateKey if private else Ed25519PublicKey, "an Ed25519"),
        "RS256": (RSAPrivateKey if private else RSAPublicKey, "an RSA"),
    }[algorithm]
    if not isinstance(key, wanted[0]):
        raise ConfigurationError(
            f"{name} holds a {type(key).__name__.removeprefix('_')}, but "
            f"HLSVAULT_TOKEN_ALGORITHM={algorithm} needs {wanted[1]} key"
        )


def _pem(env: Mapping[str, str], name: str) -> str | None:
    """A PEM key given inline or as a path to a file holding it."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return None
    if raw.startswith("-----BEGIN"):
        return raw
    path = Path(raw)
    if not path.is_file():
        raise ConfigurationError(f"{name} is neither PEM text nor a readable file: {raw[:60]}")
    return path.read_text()


def _store_url(env: Mapping[str, str], name: str, default: Path) -> str:
    """A store's URL, checked at start by every process: a process that never opens the store
    (a key server that signs no downloads from it) would otherwise run on a URL no other
    process can open."""
    return check_store_url(env.get(name) or str(default), setting=name)


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in raw.split(",") if o.strip())
    for origin in origins:
        if origin == "*":
            raise ConfigurationError(
                "HLSVAULT_CORS_ORIGINS must list origins: '*' cannot be combined with the "
                "credentials that cookie mode needs"
            )
        if not origin.startswith(("http://", "https://")):
            raise ConfigurationError(
                f"HLSVAULT_CORS_ORIGINS entry {origin!r} is not an origin like https://app.example"
            )
    return origins


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a whole number, got {raw!r}") from None
    if value < 0:
        raise ConfigurationError(f"{name} must not be negative, got {value}")
    return value


def _new_token_secret() -> str:
    # Imported here: secrets brings hmac and hashlib, which no command needs before
    # `hlsvault package` has started its remux (pipeline.headstart), unless it makes a secret.
    import secrets

    return secrets.token_urlsafe(48)


def _embedded_secret(
    data_dir: Path, name: str, generate: Callable[[], str], env: Mapping[str, str], *,
    create: bool,
) -> str:
    """Read a generated secret from the data directory, creating it (mode 0600) on first use
    when ``create`` allows."""
    secrets_dir = data_dir / "secrets"
    path = secrets_dir / name
    if path.exists():
        return path.read_text().strip()
    if not create:
        raise _missing_data_dir(data_dir, env)
    secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    value = generate()
    # Written aside then linked into place: two processes starting at once end up sharing one
    # secret (link fails for the loser), and nobody ever reads a half-written file.
    tmp = secrets_dir / f".{name}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    try:
        os.link(tmp, path)
    except FileExistsError:
        value = path.read_text().strip()
    finally:
        tmp.unlink()
    return value
