"""The families of bad tokens the attack sweep sends (tests/test_token_attacks.py): each
function adds its attacks to a :class:`Corpus`, every one with the statuses that count as
refused for it. Randomness comes from the corpus's seeded generator, so a run is repeatable."""

from __future__ import annotations

import json
import random
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ed25519

from pipeline.tokens import CLOCK_SKEW_LEEWAY_S, MAX_SID_LENGTH

from jws import B64URL, MISSING, Keys, b64, claims, hmac_token, public_key_forms, unsigned_token
from keyserver_support import ASSET

#: Where every attacker's request comes from (TEST-NET-3); tokens bound elsewhere must fail.
CLIENT_IP = "203.0.113.7"
#: A short maximum TTL keeps the over-the-maximum tokens close to the boundary.
MAX_TTL_S = 3600
SERVERS = ("HS256", "EdDSA", "RS256")
#: Replacement characters for flips: the alphabet plus the JWS structure and padding characters.
FLIP_CHARS = B64URL + ".=+/~!*"
REFUSED = frozenset({401})
FORBIDDEN = frozenset({403})


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
                exp=now - leeway - p, iat=MISSING))
        for exp in (0, -1, 1):
            corpus.add("expired", server, corpus.keys.sign(server, claims(exp=exp, iat=MISSING)))


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
        for payload in (claims(exp=MISSING), claims(sub=MISSING),
                        claims(exp=MISSING, sub=MISSING), {}, {"asset": ASSET, "exp": 2**31},
                        claims(exp=MISSING, sid="s"), claims(sub=MISSING, ip=CLIENT_IP)):
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
        # The key server expects no audience, so a token naming one is not for it (docs).
        {"aud": "keys.example.com"}, {"aud": [ASSET]},
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
                exp=now + MAX_TTL_S + e, iat=MISSING))
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
    """Session-bound tokens presented with another sid, as ?sid= or X-Hlsvault-Sid, or with
    none. (A token minted without a sid is bound to no session: a positive control.)"""
    for server in SERVERS:
        for _ in range(20):
            token_sid = corpus.rng.choice(["sess-1", "a", "x" * MAX_SID_LENGTH])
            asked = corpus.rng.choice(["sess-2", "SESS-1", "sess-1 ", "b", "x" * 129, None])
            token = corpus.keys.sign(server, claims(sid=token_sid))
            if asked is None:
                corpus.add("wrong session", server, token, allowed=FORBIDDEN)
            # A header value's edge whitespace is not the client's to keep: only in the query.
            elif asked != asked.strip() or corpus.rng.random() < 0.5:
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

