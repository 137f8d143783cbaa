"""HTTP Basic and Digest (RFC 7616, MD5 and SHA-256) for per-MAC files.

Pure: credentials in, a verdict out.  What is stored per device is never a
password but its HA1 for each algorithm (``H(user:realm:password)``), which
verifies both Digest responses and Basic passwords.  Nonces are stateless:
a timestamp and an HMAC of it under a per-process key, valid for
``NONCE_LIFETIME`` seconds (an expired one is answered with ``stale=true``
so the phone retries without prompting).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
from dataclasses import dataclass

REALM = "zprovd"
NONCE_LIFETIME = 300
ALGORITHMS = {"SHA-256": hashlib.sha256, "MD5": hashlib.md5}
MAX_HEADER = 4096


def _h(algorithm: str, text: str) -> str:
    return ALGORITHMS[algorithm](text.encode("utf-8")).hexdigest()


def ha1(algorithm: str, user: str, password: str, realm: str = REALM) -> str:
    return _h(algorithm, f"{user}:{realm}:{password}")


@dataclass(frozen=True)
class Credentials:
    """What a device (or the shared pair) is checked against."""

    user: str
    ha1_sha256: str
    ha1_md5: str

    @classmethod
    def from_password(cls, user: str, password: str) -> "Credentials":
        return cls(user, ha1("SHA-256", user, password), ha1("MD5", user, password))

    def ha1_for(self, algorithm: str) -> str:
        return self.ha1_sha256 if algorithm == "SHA-256" else self.ha1_md5


_PARAM = re.compile(r'\s*([A-Za-z0-9_-]+)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))\s*(?:,|$)')


def parse_digest(header: str) -> dict[str, str] | None:
    """The parameters of a ``Digest ...`` Authorization header, or None."""
    if len(header) > MAX_HEADER:
        return None
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        return None
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        m = _PARAM.match(rest, position)
        if not m or m.end() == position:
            return None
        value = m.group(2) if m.group(2) is not None else m.group(3)
        params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
        position = m.end()
    return params


class NonceSource:
    def __init__(self, key: bytes | None = None, lifetime: int = NONCE_LIFETIME):
        self.key = key or os.urandom(32)
        self.lifetime = lifetime

    def make(self, now: float) -> str:
        stamp = f"{int(now):x}"
        mac = hmac.new(self.key, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        return f"{stamp}.{mac}"

    def check(self, nonce: str, now: float) -> str:
        """ "ok", "stale" or "bad"."""
        stamp, _, mac = nonce.partition(".")
        expected = hmac.new(self.key, stamp.encode(), hashlib.sha256).hexdigest()[:32]
        if not hmac.compare_digest(mac.encode("utf-8", "surrogatepass"), expected.encode()):
            return "bad"
        try:
            age = now - int(stamp, 16)
        except ValueError:
            return "bad"
        return "ok" if -5 <= age <= self.lifetime else "stale"


def challenges(
    nonces: NonceSource, now: float, stale: bool = False, basic: bool = True, digest: bool = True,
    algorithms: tuple[str, ...] = tuple(ALGORITHMS),
) -> list[str]:
    """WWW-Authenticate header values, in the order given (strongest first by default)."""
    values = []
    if digest:
        nonce = nonces.make(now)
        for algorithm in algorithms:
            values.append(
                f'Digest realm="{REALM}", qop="auth", algorithm={algorithm}, nonce="{nonce}"'
                + (", stale=true" if stale else "")
            )
    if basic:
        values.append(f'Basic realm="{REALM}", charset="UTF-8"')
    return values


@dataclass(frozen=True)
class Verdict:
    ok: bool
    user: str = ""
    stale: bool = False
    reason: str = ""


def verify(
    header: str, method: str, candidates: list[Credentials], nonces: NonceSource, now: float,
    basic: bool = True, digest: bool = True, algorithms: tuple[str, ...] = tuple(ALGORITHMS),
) -> Verdict:
    """Check an Authorization header against any of the candidate credentials."""
    if not header:
        return Verdict(False, reason="no credentials")
    scheme = header.strip().partition(" ")[0].lower()
    if scheme == "basic" and basic:
        from zprovd.routing import basic_credentials

        pair = basic_credentials(header)
        if pair is None:
            return Verdict(False, reason="malformed Basic credentials")
        user, password = pair
        for c in candidates:
            if hmac.compare_digest(c.user.encode(), user.encode()) and hmac.compare_digest(
                c.ha1_sha256, ha1("SHA-256", user, password)
            ):
                return Verdict(True, user)
        return Verdict(False, user, reason="wrong credentials")
    if scheme == "digest" and digest:
        p = parse_digest(header)
        if p is None or not all(k in p for k in ("username", "realm", "nonce", "uri", "response")):
            return Verdict(False, reason="malformed Digest credentials")
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in algorithms or p["realm"] != REALM:
            return Verdict(False, p["username"], reason="unsupported Digest parameters")
        freshness = nonces.check(p["nonce"], now)
        if freshness == "bad":
            return Verdict(False, p["username"], reason="forged nonce")
        qop = p.get("qop", "")
        if qop not in ("", "auth"):
            return Verdict(False, p["username"], reason="unsupported qop")
        ha2 = _h(algorithm, f"{method}:{p['uri']}")
        for c in candidates:
            if not hmac.compare_digest(c.user.encode(), p["username"].encode()):
                continue
            if qop:
                expected = _h(algorithm, f"{c.ha1_for(algorithm)}:{p['nonce']}:{p.get('nc', '')}:{p.get('cnonce', '')}:{qop}:{ha2}")
            else:
                expected = _h(algorithm, f"{c.ha1_for(algorithm)}:{p['nonce']}:{ha2}")
            if hmac.compare_digest(expected.encode(), p["response"].lower().encode("utf-8", "surrogatepass")):
                if freshness == "stale":
                    return Verdict(False, p["username"], stale=True, reason="stale nonce")
                return Verdict(True, p["username"])
        return Verdict(False, p["username"], reason="wrong credentials")
    return Verdict(False, reason="unsupported authentication scheme")


def basic_header(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
