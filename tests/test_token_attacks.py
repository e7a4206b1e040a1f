"""Bad tokens against the real key server, in-process: well over a thousand generated forgeries,
confusions and misuses, every one refused, none answered with a key.

One clip is packaged with the real CLI once for the module; three apps built by
``keyserver.create_app`` serve its vault: HS256 (shared secret), EdDSA and RS256 (public key
only). Rate limits are off for them, so every refusal below is the token's doing. The positive
controls at the end prove the same clients, paths and delivery channels do get the key when
the token is good: a server that refuses everything fails this module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import random
import string
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import jwt
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from keyserver import create_app
from pipeline.errors import ConfigurationError
from pipeline.keys import KeyVault
from pipeline.settings import Settings, load_settings
from pipeline.storage import LocalStore
from pipeline.tokens import CLOCK_SKEW_LEEWAY_S, MAX_SID_LENGTH, minting_key

from support import HLSVAULT, ROOT

ASSET = "film"
#: Where every attacker's request comes from (TEST-NET-3); tokens bound elsewhere must fail.
CLIENT_IP = "203.0.113.7"
#: A short maximum TTL keeps the over-the-maximum tokens close to the boundary.
MAX_TTL_S = 3600
#: Fixed, so a failure names the same generated token on the next run (keys aside).
SEED = 20_240_607
#: The sweep must send at least this many bad tokens.
MIN_ATTACKS = 1000
SERVERS = ("HS256", "EdDSA", "RS256")
B64URL = string.ascii_letters + string.digits + "-_"
#: Replacement characters for flips: the alphabet plus the JWS structure and padding characters.
FLIP_CHARS = B64URL + ".=+/~!*"
REFUSED = frozenset({401})
FORBIDDEN = frozenset({403})
_MISSING = object()


# -- token construction ---------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    return b64(json.dumps(value, separators=(",", ":")).encode())


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for ASSET (ten minutes), with overrides; a value of _MISSING deletes."""
    now = int(time.time())
    body: dict[str, Any] = {"sub": ASSET, "iat": now, "exp": now + 600}
    for name, value in overrides.items():
        if value is _MISSING:
            body.pop(name, None)
        else:
            body[name] = value
    return body


def hmac_token(
    payload: Any, secret: bytes, *, alg: str = "HS256", header: dict[str, Any] | None = None
) -> str:
    """A JWS signed by hand with HMAC (any payload, any header: PyJWT refuses to build some)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    head = header if header is not None else {"alg": alg, "typ": "JWT"}
    signing_input = f"{segment(head)}.{segment(payload)}"
    mac = hmac.new(secret, signing_input.encode(), digest.get(alg, hashlib.sha256)).digest()
    return f"{signing_input}.{b64(mac)}"


def unsigned_token(payload: Any, alg: str = "none", *, dot: bool = True) -> str:
    return f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(payload)}" + ("." if dot else "")


@dataclass(frozen=True)
class Keys:
    """The keys of the module: the servers' and an attacker's."""

    secret: str
    ed_private: ed25519.Ed25519PrivateKey
    rsa_private: rsa.RSAPrivateKey
    ed_other: ed25519.Ed25519PrivateKey
    rsa_other: rsa.RSAPrivateKey
    ec_other: ec.EllipticCurvePrivateKey

    def sign(self, server: str, payload: dict[str, Any]) -> str:
        """A genuine token for ``server``: signed with the key that server trusts."""
        key: Any = {"HS256": self.secret, "EdDSA": self.ed_private, "RS256": self.rsa_private}
        return jwt.encode(payload, key[server], algorithm=server)


def public_pem(private: Any) -> bytes:
    return bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def public_key_forms(private: Any) -> list[bytes]:
    """Every encoding of a public key an algorithm-confusion attacker might HMAC with."""
    public = private.public_key()
    pem = public_pem(private)
    forms = [
        pem,
        pem.strip(),
        pem.replace(b"\n", b""),
        public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
    ]
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        forms.append(raw)
    else:
        forms.append(
            public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1)
        )
    return forms


class AppClient:
    """httpx over ASGITransport into the app, from one client address, called synchronously
    through an anyio portal: one event loop for the client's whole life."""

    def __init__(self, app: Any, *, client_ip: str, base_url: str = "https://keys.test") -> None:
        transport = httpx.ASGITransport(app=app, client=(client_ip, 50000))
        self.http = httpx.AsyncClient(
            transport=transport, base_url=base_url, follow_redirects=False, timeout=10
        )
        self._stack = ExitStack()
        self._portal: BlockingPortal | None = None

    def __enter__(self) -> AppClient:
        self._portal = self._stack.enter_context(start_blocking_portal())
        self._stack.callback(self._portal.call, self.http.aclose)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stack.close()

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        assert self._portal is not None, "use AppClient as a context manager"
        return self._portal.call(partial(self.http.request, method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)


# -- the packaged asset and the three servers -----------------------------------------------


@dataclass
class Packaged:
    env: dict[str, str]
    data_dir: Path
    version: str
    rendition: str
    keys: dict[int, bytes]


@pytest.fixture(scope="module")
def packaged(tmp_path_factory: pytest.TempPathFactory, copy_clip: Path) -> Packaged:
    """copy_clip packaged once as ASSET: three 2 s segments, two keys."""
    data_dir = tmp_path_factory.mktemp("attacks") / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HLSVAULT_", "REDIS_URL"))}
    env.update(HLSVAULT_DATA_DIR=str(data_dir), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [*HLSVAULT, "package", str(copy_clip), "--asset", ASSET, "--ladder", "copy",
         "--key-rotation-segments", "2", "--segment-seconds", "2", "--json"],
        env=env, capture_output=True, text=True, timeout=300, check=False, cwd=data_dir.parent,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    version = summary["version"]
    settings = load_settings(env)
    vault = KeyVault(LocalStore(Path(settings.vault)), settings.master_key)
    keys = {index: vault.get(ASSET, version, index) for index in (0, 1)}
    return Packaged(env=env, data_dir=data_dir, version=version,
                    rendition=summary["renditions"][0]["name"], keys=keys)


@pytest.fixture(scope="module")
def keys(packaged: Packaged) -> Keys:
    return Keys(
        secret=load_settings(packaged.env).token_secret,
        ed_private=ed25519.Ed25519PrivateKey.generate(),
        rsa_private=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ed_other=ed25519.Ed25519PrivateKey.generate(),
        rsa_other=rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec_other=ec.generate_private_key(ec.SECP256R1()),
    )


def server_settings(packaged: Packaged, keys: Keys, algorithm: str) -> Settings:
    env = {
        **packaged.env,
        "HLSVAULT_TOKEN_ALGORITHM": algorithm,
        "HLSVAULT_TOKEN_MAX_TTL": str(MAX_TTL_S),
        "HLSVAULT_RATE_LIMIT_TOKEN": "0",
        "HLSVAULT_RATE_LIMIT_IP": "0",
    }
    if algorithm == "EdDSA":
        env["HLSVAULT_TOKEN_PUBLIC_KEY"] = public_pem(keys.ed_private).decode()
    elif algorithm == "RS256":
        # As a file path, the other form the setting takes.
        path = packaged.data_dir.parent / "rs256-public.pem"
        path.write_bytes(public_pem(keys.rsa_private))
        env["HLSVAULT_TOKEN_PUBLIC_KEY"] = str(path)
    return load_settings(env)


@pytest.fixture(scope="module")
def servers(packaged: Packaged, keys: Keys) -> Iterator[dict[str, AppClient]]:
    """One in-process key server per algorithm, reached from CLIENT_IP over https."""
    with ExitStack() as stack:
        clients = {}
        for algorithm in SERVERS:
            settings = server_settings(packaged, keys, algorithm)
            app = create_app(settings, vault=LocalStore(Path(settings.vault)))
            clients[algorithm] = stack.enter_context(AppClient(app, client_ip=CLIENT_IP))
        yield clients


# -- one request of the sweep --------------------------------------------------------------


@dataclass(frozen=True)
class Attack:
    """One request with a bad token (or a good token on a bad path)."""

    family: str
    server: str
    token: str
    via: str = "query"  # query | bearer | cookie
    path: str | None = None  # None: the genuine path of key 0
    params: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    allowed: frozenset[int] = REFUSED
    #: For tokens defined relative to the clock: mints the token afresh at sending time, so
    #: "two seconds past the leeway" still is when the request arrives.
    fresh: Callable[[], str] | None = None

    def current_token(self) -> str:
        return self.fresh() if self.fresh is not None else self.token


def header_safe(token: str) -> bool:
    return all(33 <= ord(c) < 127 and c not in ";,\\\"" for c in token)


def send(client: AppClient, attack: Attack, path: str) -> httpx.Response:
    params = dict(attack.params)
    headers = dict(attack.headers)
    token = attack.current_token()
    if attack.via == "query":
        params["token"] = token
    elif attack.via == "bearer":
        headers["Authorization"] = f"Bearer {token}"
    elif attack.via == "cookie":
        headers["Cookie"] = f"hlsvault_token={token}"
    else:
        raise AssertionError(f"unknown delivery {attack.via}")
    return client.get(attack.path or path, params=params, headers=headers)


def leaks_key(body: bytes, keys: dict[int, bytes]) -> bool:
    text = body.lower()
    return any(key in body or key.hex().encode() in text for key in keys.values())


# -- the attack families ---------------------------------------------------------------------


@dataclass
class Corpus:
    keys: Keys
    version: str
    rng: random.Random
    attacks: list[Attack] = field(default_factory=list)

    def add(self, family: str, server: str, token: str, **kwargs: Any) -> None:
        via = kwargs.pop("via", None)
        if via is None:
            via = self.rng.choice(("query", "query", "bearer", "cookie"))
        if via != "query" and not header_safe(token):
            via = "query"
        self.attacks.append(Attack(family, server, token, via=via, **kwargs))

    def add_timed(
        self, family: str, server: str, payload_at: Callable[[int], dict[str, Any]]
    ) -> None:
        """A genuine signature over claims computed from the current second when sent."""

        def mint() -> str:
            return self.keys.sign(server, payload_at(int(time.time())))

        self.add(family, server, mint(), fresh=mint)

    def genuine(self, server: str) -> list[str]:
        """Valid tokens for ``server`` to mutate: plain, session-bound and address-bound."""
        return [
            self.keys.sign(server, claims()),
            self.keys.sign(server, claims(sid="sess-1")),
            self.keys.sign(server, claims(ip=CLIENT_IP, sid="sess-2")),
        ]


def flipped(corpus: Corpus) -> None:
    """One character replaced, anywhere: header, payload, signature or a dot."""
    for server, count in (("HS256", 300), ("EdDSA", 80), ("RS256", 80)):
        sources = corpus.genuine(server)
        for _ in range(count):
            token = corpus.rng.choice(sources)
            i = corpus.rng.randrange(len(token))
            new = corpus.rng.choice(FLIP_CHARS.replace(token[i], ""))
            corpus.add("flipped character", server, token[:i] + new + token[i + 1 :])


def bit_flipped(corpus: Corpus) -> None:
    """One bit of one character flipped: control characters and non-alphabet bytes too."""
    for server, count in (("HS256", 80), ("EdDSA", 20), ("RS256", 20)):
        sources = corpus.genuine(server)
        for _ in range(count):
            token = corpus.rng.choice(sources)
            i = corpus.rng.randrange(len(token))
            new = chr(ord(token[i]) ^ (1 << corpus.rng.randrange(7)))
            corpus.add("flipped bit", server, token[:i] + new + token[i + 1 :], via="query")


def truncated(corpus: Corpus) -> None:
    for server in SERVERS:
        token = corpus.genuine(server)[0]
        head, payload, signature = token.split(".")
        cuts = {0, 1, len(head), len(head) + 1, len(token) - len(signature) - 1,
                len(token) - len(signature), len(token) - 1, len(token) - 2}
        cuts |= {corpus.rng.randrange(1, len(token)) for _ in range(40)}
        for n in sorted(cuts):
            corpus.add("truncated", server, token[:n])
        for n in sorted({corpus.rng.randrange(1, len(token)) for _ in range(10)}):
            corpus.add("truncated", server, token[n:])
        corpus.add("truncated", server, f"{head}.{payload}")
        corpus.add("truncated", server, f"{payload}.{signature}")


def alg_none(corpus: Corpus) -> None:
    for server in SERVERS:
        signature = corpus.genuine(server)[0].rsplit(".", 1)[1]
        for alg in ("none", "None", "NONE", "nOnE", ""):
            for payload in (claims(), claims(sid="s"), claims(exp=int(time.time()) + 60)):
                corpus.add("alg none", server, unsigned_token(payload, alg, dot=True))
                corpus.add("alg none", server, unsigned_token(payload, alg, dot=False))
            corpus.add("alg none", server, unsigned_token(claims(), alg) + signature)


def wrong_algorithm(corpus: Corpus) -> None:
    """Genuine-looking tokens in an algorithm the server does not accept."""
    k = corpus.keys
    secret = k.secret.encode()
    for payload in (claims(), claims(sid="s"), claims(exp=int(time.time()) + 120)):
        for alg in ("HS384", "HS512"):
            corpus.add("wrong algorithm", "HS256", jwt.encode(payload, k.secret, algorithm=alg))
        for alg in ("hs256", "HS256 ", "HMAC", "HS-256"):
            corpus.add("wrong algorithm", "HS256", hmac_token(payload, secret, alg=alg))
        for alg, key in (("RS256", k.rsa_other), ("RS512", k.rsa_other), ("PS256", k.rsa_other),
                         ("EdDSA", k.ed_other), ("ES256", k.ec_other)):
            corpus.add("wrong algorithm", "HS256", jwt.encode(payload, key, algorithm=alg))
        # Genuine tokens of the other servers, presented to a server of another algorithm.
        corpus.add("wrong algorithm", "HS256", k.sign("EdDSA", payload))
        corpus.add("wrong algorithm", "HS256", k.sign("RS256", payload))
        corpus.add("wrong algorithm", "EdDSA", k.sign("RS256", payload))
        corpus.add("wrong algorithm", "EdDSA", k.sign("HS256", payload))
        corpus.add("wrong algorithm", "RS256", k.sign("EdDSA", payload))
        corpus.add("wrong algorithm", "RS256", k.sign("HS256", payload))
        corpus.add("wrong algorithm", "RS256",
                   jwt.encode(payload, k.rsa_private, algorithm="RS512"))
        corpus.add("wrong algorithm", "RS256",
                   jwt.encode(payload, k.rsa_private, algorithm="PS256"))


def algorithm_confusion(corpus: Corpus) -> None:
    """HS256/384/512 keyed with the server's own public key, in every encoding."""
    for server, private in (("EdDSA", corpus.keys.ed_private), ("RS256", corpus.keys.rsa_private)):
        for form in public_key_forms(private):
            for alg in ("HS256", "HS384", "HS512"):
                for payload in (claims(), claims(sid="s")):
                    corpus.add("algorithm confusion", server, hmac_token(payload, form, alg=alg))
            # The header claims the server's algorithm; the signature is an HMAC.
            corpus.add("algorithm confusion", server,
                       hmac_token(claims(), form, header={"alg": server, "typ": "JWT"}))
        # With these algorithms load_settings puts a placeholder in the unused shared secret.
        corpus.add("algorithm confusion", server, hmac_token(claims(), b"-" * 32))


def wrong_key(corpus: Corpus) -> None:
    k = corpus.keys
    near = [k.secret[:-1], k.secret + "x", k.secret.upper(), k.secret[::-1], "", "secret"]
    randoms = ["".join(corpus.rng.choices(B64URL, k=64)) for _ in range(80)]
    for secret in near + randoms:
        corpus.add("wrong key", "HS256", hmac_token(claims(), secret.encode()))
    for _ in range(15):
        other = ed25519.Ed25519PrivateKey.generate()
        corpus.add("wrong key", "EdDSA", jwt.encode(claims(), other, algorithm="EdDSA"))
    for payload in (claims(), claims(sid="a"), claims(sid="b"), claims(ip=CLIENT_IP)):
        corpus.add("wrong key", "RS256", jwt.encode(payload, k.rsa_other, algorithm="RS256"))
        corpus.add("wrong key", "EdDSA", jwt.encode(payload, k.ed_other, algorithm="EdDSA"))
    # An embedded JWK naming the attacker's key must not be trusted.
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(k.rsa_other.public_key()))
    for header in ({"jwk": jwk}, {"kid": "../secrets/token_secret"}, {"jku": "https://evil.test/k"}):
        corpus.add("wrong key", "RS256",
                   jwt.encode(claims(), k.rsa_other, algorithm="RS256", headers=header))


def expired(corpus: Corpus) -> None:
    leeway = CLOCK_SKEW_LEEWAY_S
    for server in SERVERS:
        for past in (1, 2, 5, 30, 61, 600, 3600, 86_400, 10**7):
            corpus.add_timed("expired", server, lambda now, p=past: claims(
                exp=now - leeway - p, iat=now - leeway - p - 60))
            corpus.add_timed("expired", server, lambda now, p=past: claims(
                exp=now - leeway - p, iat=_MISSING))
        for exp in (0, -1, 1):
            corpus.add("expired", server, corpus.keys.sign(server, claims(exp=exp, iat=_MISSING)))


def not_yet_valid(corpus: Corpus) -> None:
    leeway = CLOCK_SKEW_LEEWAY_S
    for server in SERVERS:
        for ahead in (2, 5, 60, 1200, 86_400):
            corpus.add_timed("not yet valid", server, lambda now, a=ahead: claims(
                nbf=now + leeway + a))
            corpus.add_timed("not yet valid", server, lambda now, a=ahead: claims(
                iat=now + leeway + a, exp=now + leeway + a + 600))


def missing_claims(corpus: Corpus) -> None:
    for server in SERVERS:
        sign = corpus.keys.sign
        for payload in (claims(exp=_MISSING), claims(sub=_MISSING),
                        claims(exp=_MISSING, sub=_MISSING), {}, {"asset": ASSET, "exp": 2**31},
                        claims(exp=_MISSING, sid="s"), claims(sub=_MISSING, ip=CLIENT_IP)):
            corpus.add("missing claims", server, sign(server, payload))
    # Signed payloads that are not JSON objects at all.
    secret = corpus.keys.secret.encode()
    for payload in ([ASSET], ASSET, 42, None, [claims()]):
        corpus.add("missing claims", "HS256", hmac_token(payload, secret))


def malformed_claims(corpus: Corpus) -> None:
    now = int(time.time())
    bad = [
        {"exp": str(now + 600)}, {"exp": f"{now + 600}.0"}, {"exp": "soon"}, {"exp": True},
        {"exp": None}, {"exp": [now + 600]}, {"exp": {"at": now + 600}}, {"exp": float("nan")},
        {"exp": float("inf")}, {"exp": float("-inf")}, {"nbf": "later"}, {"nbf": [0]},
        {"iat": "now"}, {"iat": float("inf")}, {"sub": 7}, {"sub": [ASSET]}, {"sub": None},
        {"sub": {"id": ASSET}}, {"sid": 7}, {"sid": ["s"]}, {"sid": "s" * (MAX_SID_LENGTH + 1)},
    ]
    for server in SERVERS:
        for override in bad:
            corpus.add("malformed claims", server, corpus.keys.sign(server, claims(**override)),
                       allowed=frozenset({401, 403}) if "sub" in override else REFUSED)


def over_max_ttl(corpus: Corpus) -> None:
    leeway = CLOCK_SKEW_LEEWAY_S
    for server in SERVERS:
        for extra in (leeway + 2, leeway + 5, 600, 86_400, 10**9):
            corpus.add_timed("ttl over max", server, lambda now, e=extra: claims(
                exp=now + MAX_TTL_S + e, iat=_MISSING))
        for extra in (1, 2, 60, 3600):
            # exp lies within the maximum from now, but the token was minted to live longer.
            corpus.add_timed("ttl over max", server, lambda now, e=extra: claims(
                iat=now - e - 10, exp=now - 10 + MAX_TTL_S))


def other_asset(corpus: Corpus) -> None:
    subjects = ["film-b", "Film", "FILM", "film ", " film", "film\n", "film\x00", "film/..",
                "../film", "film-1", "", "*", "film,film-b"]
    subjects += ["".join(corpus.rng.choices(B64URL, k=corpus.rng.randint(1, 40)))
                 for _ in range(12)]
    subjects = [sub for sub in subjects if sub != ASSET]
    for server in SERVERS:
        for sub in subjects:
            corpus.add("another asset", server, corpus.keys.sign(server, claims(sub=sub)),
                       allowed=FORBIDDEN)


def wrong_session(corpus: Corpus) -> None:
    for server in SERVERS:
        for _ in range(20):
            token_sid = corpus.rng.choice(["sess-1", "a", "x" * MAX_SID_LENGTH, None])
            asked = corpus.rng.choice(["sess-2", "SESS-1", "sess-1 ", "b", "x" * 129])
            token = corpus.keys.sign(server, claims(sid=token_sid or _MISSING))
            # A header value's edge whitespace is not the client's to keep: only in the query.
            if asked != asked.strip() or corpus.rng.random() < 0.5:
                corpus.add("wrong session", server, token, params={"sid": asked},
                           allowed=FORBIDDEN)
            else:
                corpus.add("wrong session", server, token,
                           headers={"X-Hlsvault-Sid": asked}, allowed=FORBIDDEN)


def wrong_address(corpus: Corpus) -> None:
    addresses = ["198.51.100.1", "203.0.113.70", "203.0.113.8", "203.000.113.007",
                 "::ffff:203.0.113.7", "203.0.113.7 ", "2001:db8::7", "127.0.0.1", "testclient",
                 "", "192.0.2.1"]
    spoofs = [{}, {"X-Forwarded-For": "{ip}"}, {"X-Real-IP": "{ip}"},
              {"Forwarded": "for={ip}"}, {"X-Forwarded-For": "{ip}, " + CLIENT_IP}]
    for server in SERVERS:
        for address in addresses:
            spoof = corpus.rng.choice(spoofs)
            headers = {name: value.format(ip=address) for name, value in spoof.items()}
            corpus.add("wrong address", server, corpus.keys.sign(server, claims(ip=address)),
                       headers=headers, allowed=FORBIDDEN)
        corpus.add("wrong address", server, corpus.keys.sign(server, claims(ip=7)),
                   allowed=FORBIDDEN)


def garbage(corpus: Corpus) -> None:
    rng = corpus.rng
    tokens = ["", " ", ".", "..", "...", "null", "undefined", "Bearer", "eyJ", "eyJ.eyJ.eyJ",
              "a" * 5000, "A" * 4097, ".".join(["eyJhbGciOiJIUzI1NiJ9"] * 60),
              json.dumps(claims()), "\u00e9\u00e8\u20ac", "%00", "'; DROP TABLE keys; --"]
    for _ in range(60):
        parts = rng.randint(1, 5)
        tokens.append(".".join(
            b64(rng.randbytes(rng.randint(0, 120))) for _ in range(parts)))
    for _ in range(15):
        tokens.append("".join(rng.choices(string.printable, k=rng.randint(1, 200))))
    # 5 KB of well-formed JWS whose payload is padded out.
    tokens.append(hmac_token(claims(pad="x" * 5000), corpus.keys.secret.encode()))
    for token in tokens:
        corpus.add("garbage", rng.choice(SERVERS), token)
    # Credentials in a scheme the server does not take.
    genuine = corpus.genuine("HS256")[0]
    for scheme in ("Basic", "Token", "JWT", "Bearer:", "Bearer\t"):
        corpus.add("garbage", "HS256", "", via="query", params={},
                   headers={"Authorization": f"{scheme} {genuine}"})


def tampered_path(corpus: Corpus) -> None:
    """A genuine token, aimed at a path that is not a key of its asset."""
    version = corpus.version
    other_version = version[:-1] + ("0" if version[-1] != "0" else "1")
    paths = [
        f"/v1/keys/film-b/{version}/0", f"/v1/keys/Film/{version}/0",
        f"/v1/keys/{ASSET}/{other_version}/0", f"/v1/keys/{ASSET}/{version.upper()}/0",
        f"/v1/keys/{ASSET}/{version}x/0", f"/v1/keys/{ASSET}/v1/0",
        f"/v1/keys/{ASSET}/{version}/00", f"/v1/keys/{ASSET}/{version}/01",
        f"/v1/keys/{ASSET}/{version}/+1", f"/v1/keys/{ASSET}/{version}/1.0",
        f"/v1/keys/{ASSET}/{version}/-0", f"/v1/keys/{ASSET}/{version}/0x0",
        f"/v1/keys/{ASSET}/{version}/%EF%BC%90", f"/v1/keys/{ASSET}/{version}/%200",
        f"/v1/keys/{ASSET}/{version}/0%20", f"/v1/keys/{ASSET}/{version}/0%0A",
        f"/v1/keys/{ASSET}/{version}/1000001", f"/v1/keys/{ASSET}/{version}/99999999",
        f"/v1/keys/{ASSET}/%2e%2e/0", f"/v1/keys/%2e%2e/{version}/0",
        f"/v1/keys/{ASSET}/{version}/..%2f..%2fsecrets%2fmaster_key",
        f"/v1/keys/{ASSET}/{version}%2f..%2f{version}/0",
    ]
    paths += [f"/v1/keys/{ASSET}/{version}/{n}" for n in (2, 3, 17, 999_999, 1_000_000)]
    for server in SERVERS:
        token = corpus.genuine(server)[0]
        for path in paths:
            corpus.add("tampered key path", server, token, path=path,
                       allowed=frozenset({400, 403, 404}))


FAMILIES: list[Callable[[Corpus], None]] = [
    flipped, bit_flipped, truncated, alg_none, wrong_algorithm, algorithm_confusion, wrong_key,
    expired, not_yet_valid, missing_claims, malformed_claims, over_max_ttl, other_asset,
    wrong_session, wrong_address, garbage, tampered_path,
]


@pytest.fixture(scope="module")
def corpus(keys: Keys, packaged: Packaged) -> list[Attack]:
    built = Corpus(keys=keys, version=packaged.version, rng=random.Random(SEED))
    for family in FAMILIES:
        family(built)
    return built.attacks


def key_path(packaged: Packaged, index: int = 0) -> str:
    return f"/v1/keys/{ASSET}/{packaged.version}/{index}"


# -- the tests ------------------------------------------------------------------------------


def test_over_a_thousand_bad_tokens_are_refused_and_never_given_a_key(
    servers: dict[str, AppClient], corpus: list[Attack], packaged: Packaged
) -> None:
    """Every generated attack (17 families, three servers, token in query, Bearer header or
    cookie) is answered with its family's refusal status and no response carries a key."""
    # Given: the corpus and the genuine path of key 0
    path = key_path(packaged)
    sent: Counter[str] = Counter()
    wrong_status = []
    leaked = []

    # When: each attack is sent to its server
    for attack in corpus:
        response = send(servers[attack.server], attack, path)
        sent[attack.family] += 1
        if response.status_code not in attack.allowed:
            wrong_status.append((attack.family, attack.server, attack.via, response.status_code,
                                 attack.token[:80], attack.path, response.text[:80]))
        if leaks_key(response.content, packaged.keys):
            leaked.append((attack.family, attack.server, attack.token[:80]))

    # Then: all refused with the expected status, nothing leaked, and enough of them sent
    assert leaked == []
    assert wrong_status == []
    assert sum(sent.values()) >= MIN_ATTACKS, sent
    assert len(sent) == len(FAMILIES)
    assert min(sent.values()) >= 20, sent


def test_bad_tokens_get_no_playlist_either(
    servers: dict[str, AppClient], corpus: list[Attack], packaged: Packaged
) -> None:
    """A sample of the token attacks sent to the master and variant playlists is refused with
    the family's status, and no refusal is a playlist."""
    rng = random.Random(SEED + 1)
    token_attacks = [a for a in corpus if a.path is None and a.token]
    sample = rng.sample(token_attacks, 200)
    paths = [f"/v1/assets/{ASSET}/master.m3u8", f"/v1/assets/{ASSET}/{packaged.rendition}.m3u8"]
    wrong = []
    for attack in sample:
        # Playlists read the token from the query or a Bearer header, never the cookie.
        via = "query" if attack.via == "cookie" else attack.via
        for path in paths:
            response = send(servers[attack.server], replace(attack, via=via), path)
            if response.status_code not in attack.allowed or b"#EXTM3U" in response.content:
                wrong.append((attack.family, attack.server, path, response.status_code))
    assert wrong == []


class TestPositiveControls:
    """The sweep's clients, paths and channels do deliver keys to good tokens."""

    @pytest.mark.parametrize("server", SERVERS)
    @pytest.mark.parametrize("via", ["query", "bearer", "cookie"])
    def test_a_genuine_token_gets_the_right_key(
        self, servers: dict[str, AppClient], keys: Keys, packaged: Packaged, server: str,
        via: str,
    ) -> None:
        """A token signed with the key the server trusts gets 200 and the vault's key bytes for
        both key indexes, however it is delivered."""
        token = keys.sign(server, claims())
        for index in (0, 1):
            attack = Attack("control", server, token, via=via)
            response = send(servers[server], attack, key_path(packaged, index))
            assert response.status_code == 200, response.text
            assert response.content == packaged.keys[index]

    @pytest.mark.parametrize("server", SERVERS)
    def test_bound_token_with_its_session_and_address_gets_the_key(
        self, servers: dict[str, AppClient], keys: Keys, packaged: Packaged, server: str
    ) -> None:
        """A token bound to sid and client address gets the key when the request names that
        sid (query or header) and comes from that address."""
        token = keys.sign(server, claims(sid="sess-9", ip=CLIENT_IP))
        client = servers[server]
        by_query = send(client, Attack("control", server, token, params={"sid": "sess-9"}),
                        key_path(packaged))
        by_header = send(client, Attack("control", server, token, via="bearer",
                                        headers={"X-Hlsvault-Sid": "sess-9"}),
                         key_path(packaged))
        assert (by_query.status_code, by_header.status_code) == (200, 200)
        assert by_query.content == by_header.content == packaged.keys[0]

    @pytest.mark.parametrize("server", SERVERS)
    def test_tokens_just_inside_each_boundary_get_the_key(
        self, servers: dict[str, AppClient], keys: Keys, packaged: Packaged, server: str
    ) -> None:
        """Expired or not-yet-valid within the clock-skew leeway, and a lifetime of exactly the
        maximum TTL, are accepted: the sweep's refusals are at the boundaries, not before."""
        now = int(time.time())
        margin = 10
        edge = {
            "expired within leeway": claims(exp=now - CLOCK_SKEW_LEEWAY_S + margin,
                                            iat=now - 600),
            "nbf within leeway": claims(nbf=now + CLOCK_SKEW_LEEWAY_S - margin),
            "lifetime of the maximum": claims(iat=now, exp=now + MAX_TTL_S),
        }
        statuses = {
            name: send(servers[server], Attack("control", server, keys.sign(server, payload)),
                       key_path(packaged)).status_code
            for name, payload in edge.items()
        }
        assert statuses == dict.fromkeys(edge, 200)

    def test_asymmetric_servers_hold_only_the_public_key(
        self, keys: Keys, packaged: Packaged
    ) -> None:
        """The EdDSA and RS256 servers are configured with no private key, so they could not
        mint what they accept."""
        for algorithm in ("EdDSA", "RS256"):
            settings = server_settings(packaged, keys, algorithm)
            assert settings.token_private_key is None
            assert settings.token_public_key is not None
            assert "PRIVATE" not in settings.token_public_key
            with pytest.raises(ConfigurationError, match="PRIVATE_KEY"):
                minting_key(settings)
