"""Who may fetch what: access policies and scan detection, as pure logic.

``[access]`` sets, per group of files (generic, per_mac, zoiper, firmware)
and per protocol, which client addresses may fetch them; per-MAC files can
further require a URL key, HTTP Basic/Digest credentials (per device or one
shared pair) and a client certificate that carries the requested MAC.

``ScanDetector`` counts misses per client address: distinct unknown MACs
and failed credentials.  An address with ``max_misses`` of them within
``window`` seconds is refused for ``ban`` seconds; a phone that is merely
not registered yet asks for its own MAC again and again and counts once.
"""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Iterable

from zprovd.backends import Device
from zprovd.config import AccessConfig, GroupAccess, Network, ScanConfig
from zprovd.httpauth import Credentials, NonceSource, challenges, verify

MAX_TRACKED = 100_000
_MAC_IN_TEXT = re.compile(r"(?<![0-9a-f])((?:[0-9a-f]{2}[:-]?){5}[0-9a-f]{2})(?![0-9a-f])", re.IGNORECASE)

# Device variables that hold access settings, not template variables.
DEVICE_HTTP_USER = "http_user"
DEVICE_HTTP_HA1_SHA256 = "http_ha1_sha256"
DEVICE_HTTP_HA1_MD5 = "http_ha1_md5"
DEVICE_URL_KEY = "url_key"


@dataclass(frozen=True)
class Refusal:
    status: int  # HTTP status; TFTP answers 404 with "file not found", the rest with "access violation"
    reason: str
    headers: tuple[tuple[str, str], ...] = ()
    miss: bool = False  # counts towards scan detection


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def in_networks(address: str, networks: Iterable[Network]) -> bool:
    parsed = _address(address)
    return parsed is not None and any(parsed in network for network in networks)


def client_address(peer: str, forwarded_for: str, trusted_proxies: list[Network]) -> str:
    """The real client: X-Forwarded-For is believed only from trusted proxies,
    read right to left up to the first address that is not a trusted proxy."""
    if not forwarded_for or not in_networks(peer, trusted_proxies):
        return peer
    for hop in reversed([h.strip() for h in forwarded_for.split(",") if h.strip()]):
        if _address(hop) is None:
            return peer  # a garbled header proves nothing
        if not in_networks(hop, trusted_proxies):
            return str(_address(hop))
    return peer


def macs_in_certificate_names(names: Iterable[str]) -> set[str]:
    """Canonical MACs found in certificate subject and SAN strings
    (Yealink and Polycom use the MAC as CN; Cisco ``SEP<MAC>``)."""
    found = set()
    for name in names:
        for m in _MAC_IN_TEXT.finditer(name):
            found.add(re.sub(r"[:-]", "", m.group(1)).lower())
    return found


def device_credentials(device: Device) -> Credentials | None:
    v = device.vars
    if v.get(DEVICE_HTTP_USER) and v.get(DEVICE_HTTP_HA1_SHA256) and v.get(DEVICE_HTTP_HA1_MD5):
        return Credentials(str(v[DEVICE_HTTP_USER]), str(v[DEVICE_HTTP_HA1_SHA256]), str(v[DEVICE_HTTP_HA1_MD5]))
    return None


class ScanDetector:
    def __init__(self, config: ScanConfig):
        self.config = config
        self._misses: OrderedDict[str, deque] = OrderedDict()
        self._banned: OrderedDict[str, float] = OrderedDict()

    def banned_for(self, address: str, now: float) -> float:
        until = self._banned.get(address)
        if until is None:
            return 0.0
        if until <= now:
            del self._banned[address]
            return 0.0
        return until - now

    def miss(self, address: str, key: str, now: float) -> bool:
        """Count a miss (``key``: what was missed); True if the address is now banned."""
        c = self.config
        if not c.enabled or in_networks(address, c.never_ban):
            return False
        window = self._misses.pop(address, None) or deque()
        self._misses[address] = window
        while window and window[0][0] <= now - c.window:
            window.popleft()
        if all(k != key for _, k in window):
            window.append((now, key))
        while len(self._misses) > MAX_TRACKED:
            self._misses.popitem(last=False)
        if len(window) >= c.max_misses:
            window.clear()
            self._banned[address] = now + c.ban
            while len(self._banned) > MAX_TRACKED:
                self._banned.popitem(last=False)
            return True
        return False


KNOWN_VERDICTS = 100_000
"""Address verdicts remembered (the configuration is fixed for a Policy's life)."""


@dataclass
class Policy:
    access: AccessConfig
    nonces: NonceSource = field(default_factory=NonceSource)

    def __post_init__(self) -> None:
        p = self.access.per_mac
        self.shared = Credentials.from_password(p.http_user, p.http_password) if p.http_user else None
        self.scans = ScanDetector(self.access.scan)
        self._verdicts: dict[tuple[str, str, str], Refusal | None] = {}
        self.per_mac_open = not p.url_key and p.auth == "none" and not p.client_certificate
        """No install-wide URL key, credentials or certificates for per-MAC files."""
        self.install_url_key = frozenset((p.url_key,)) if p.url_key else frozenset()
        """The path segment every per-MAC path must hold (none, or one key)."""

    def device_is_open(self, device: Device) -> bool:
        """Whether this device's per-MAC files need no URL key, credentials or
        certificate (then ``url_key_refusal``, ``auth_refusal`` and
        ``certificate_refusal`` would all say None)."""
        return self.per_mac_open and DEVICE_URL_KEY not in device.vars

    def group(self, name: str) -> GroupAccess:
        return getattr(self.access, name)

    def address_refusal(self, group: str, protocol: str, client: str) -> Refusal | None:
        key = (group, protocol, client)
        try:
            return self._verdicts[key]  # parsing the address costs more than the request
        except KeyError:
            pass
        g = self.group(group)
        allowed = g.tftp_allow if protocol == "tftp" else g.allow
        verdict = None
        if not in_networks(client, allowed):
            verdict = Refusal(403, f"address not allowed for {group.replace('_', '-')} files over {protocol}")
        if len(self._verdicts) >= KNOWN_VERDICTS:
            self._verdicts.clear()
        self._verdicts[key] = verdict
        return verdict

    def device_url_key(self, device: Device) -> frozenset[str]:
        """The device's own URL key, if it has one (see ``install_url_key``)."""
        key = device.vars.get(DEVICE_URL_KEY)
        return frozenset((key,)) if key else frozenset()

    def url_key_refusal(self, prefix: tuple[str, ...], device: Device | None) -> Refusal | None:
        keys = self.install_url_key | self.device_url_key(device) if device else self.install_url_key
        if any(k not in prefix for k in keys):
            return Refusal(404, "missing URL key", miss=True)
        return None

    def auth_refusal(self, protocol: str, method: str, authorization: str, device: Device | None, now: float) -> Refusal | None:
        """HTTP credentials for a per-MAC file (TFTP is handled by tftp_allow)."""
        mode = self.access.per_mac.auth
        if mode == "none" or protocol == "tftp":
            return None
        candidates = [c for c in (device_credentials(device) if device else None, self.shared) if c]
        basic, digest = mode in ("basic", "any"), mode in ("digest", "any")
        algorithms = tuple(self.access.per_mac.digest_algorithms)
        verdict = verify(authorization, method, candidates, self.nonces, now, basic, digest, algorithms)
        if verdict.ok:
            return None
        offered = challenges(self.nonces, now, verdict.stale, basic, digest, algorithms)
        headers = tuple(("WWW-Authenticate", v) for v in offered)
        tried = bool(authorization) and not verdict.stale
        return Refusal(401, "wrong HTTP credentials" if tried else "HTTP credentials required", headers, miss=tried)

    def certificate_refusal(self, protocol: str, mac: str, certificate_macs: frozenset[str] | None) -> Refusal | None:
        if not self.access.per_mac.client_certificate or protocol == "tftp":
            return None
        if protocol != "https" or certificate_macs is None:
            return Refusal(403, "client certificate required")
        if mac not in certificate_macs:
            return Refusal(403, "client certificate of another device", miss=True)
        return None
