"""The lease database of server mode: pure, with time passed in as ``now``.

One record per address the server has handed out, keyed by client MAC:

``offered``
    sent in a DHCPOFFER, held for ``offer_time`` seconds.
``bound``
    acknowledged, valid until ``expires``.
``released`` / ``expired``
    free again, but remembered, so that a client coming back gets its old
    address if nobody took it meanwhile.  Never-used addresses are handed
    out before remembered ones, and remembered ones oldest first.
``declined``
    a client reported the address in use (DHCPDECLINE); not handed out
    for ``decline_time`` seconds.  Belongs to no client.

``save()`` writes every record to a JSON file atomically (a temporary file
in the same directory, fsynced, then renamed over the old one: a failed
write leaves the old file as it was); ``load()`` reads it back at start so
leases survive restarts.  Mutating methods set ``dirty`` (a new offer alone does
not: losing it in a restart is harmless); the caller decides when to save
(the service saves after each datagram that set it).  Time is wall-clock seconds (``time.time()``) because it is
persisted.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Iterable, Sequence

from zprovd.dhcp.config import PoolRange
from zprovd.mac import InvalidMAC, normalize_mac

LEASE_FILE_NAME = "dhcp-leases.json"
FILE_FORMAT = "zprovd-dhcp-leases"
FILE_VERSION = 1

OFFERED, BOUND, RELEASED, EXPIRED, DECLINED = "offered", "bound", "released", "expired", "declined"
STATES = (OFFERED, BOUND, RELEASED, EXPIRED, DECLINED)
_HOLDING = (OFFERED, BOUND, DECLINED)


class LeaseFileError(Exception):
    """The lease file exists but cannot be read as one."""


@dataclass
class Lease:
    mac: str
    ip: IPv4Address
    state: str
    expires: float
    hostname: str = ""
    vendor_class: str = ""

    def active(self, now: float) -> bool:
        """Does this record still hold its address?"""
        return self.state in _HOLDING and self.expires > now

    def to_json(self) -> dict[str, Any]:
        return {
            "mac": self.mac,
            "ip": str(self.ip),
            "state": self.state,
            "expires": self.expires,
            "hostname": self.hostname,
            "vendor_class": self.vendor_class,
        }

    @classmethod
    def from_json(cls, item: Any) -> Lease:
        """Raise ValueError with a reason if ``item`` is not a lease record."""
        if not isinstance(item, dict):
            raise ValueError("not an object")
        try:
            mac = normalize_mac(str(item["mac"])) if item.get("mac") else ""
            ip = IPv4Address(str(item["ip"]))
            state = item["state"]
            expires = item["expires"]
        except KeyError as exc:
            raise ValueError(f"missing {exc.args[0]!r}") from None
        except (InvalidMAC, ValueError) as exc:
            raise ValueError(str(exc)) from None
        if state not in STATES:
            raise ValueError(f"unknown state {state!r}")
        if isinstance(expires, bool) or not isinstance(expires, (int, float)):
            raise ValueError("expires is not a number")
        if not mac and state != DECLINED:
            raise ValueError("no MAC")
        hostname = item.get("hostname", "")
        vendor_class = item.get("vendor_class", "")
        return cls(
            mac=mac,
            ip=ip,
            state=state,
            expires=float(expires),
            hostname=hostname if isinstance(hostname, str) else "",
            vendor_class=vendor_class if isinstance(vendor_class, str) else "",
        )


def read_lease_file(path: Path) -> tuple[list[Lease], list[str]]:
    """The records of a lease file and the reasons for the entries skipped.

    A missing file holds no leases; an unreadable one raises LeaseFileError.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return [], []
    except (OSError, UnicodeDecodeError) as exc:
        raise LeaseFileError(f"{path}: cannot read the lease file: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LeaseFileError(f"{path}: not a lease file (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or data.get("format") != FILE_FORMAT or not isinstance(data.get("leases"), list):
        raise LeaseFileError(f"{path}: not a zprovd DHCP lease file")
    if data.get("version") != FILE_VERSION:
        raise LeaseFileError(f"{path}: lease file version {data.get('version')!r} is not {FILE_VERSION}")
    leases: list[Lease] = []
    skipped: list[str] = []
    for index, item in enumerate(data["leases"]):
        try:
            leases.append(Lease.from_json(item))
        except ValueError as exc:
            skipped.append(f"entry {index}: {exc}")
    return leases, skipped


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that readers see the old or the new file, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise
    try:  # make the rename itself durable; not fatal where unsupported
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


class LeaseDatabase:
    """Address allocation over a pool; see the module docstring."""

    def __init__(
        self,
        pool: Sequence[PoolRange],
        lease_time: int,
        path: Path | None = None,
        *,
        offer_time: float = 60.0,
        decline_time: float = 3600.0,
        reserved: Iterable[IPv4Address] = (),
    ):
        self.pool = list(pool)
        self.lease_time = lease_time
        self.path = path
        self.offer_time = offer_time
        self.decline_time = decline_time
        self.reserved = set(reserved)
        self.dirty = False
        self.dropped: list[Lease] = []
        """Records read from the file whose address is no longer in the pool."""
        self.skipped: list[str] = []
        """Reasons for unreadable entries of the file."""
        self._by_mac: dict[str, Lease] = {}
        self._by_ip: dict[IPv4Address, Lease] = {}

    @classmethod
    def load(cls, path: Path, pool: Sequence[PoolRange], lease_time: int, **kwargs: Any) -> LeaseDatabase:
        """A database holding the records of ``path`` (if it exists) that fit the pool."""
        db = cls(pool, lease_time, path, **kwargs)
        records, db.skipped = read_lease_file(path)
        for lease in sorted(records, key=lambda l: l.expires):  # later records win
            if not db.in_pool(lease.ip):
                db.dropped.append(lease)
                continue
            db._remove(db._by_ip.get(lease.ip))
            if lease.state != DECLINED:
                db._remove(db._by_mac.get(lease.mac))
                db._by_mac[lease.mac] = lease
            db._by_ip[lease.ip] = lease
        db.dirty = False
        return db

    # Queries -------------------------------------------------------------

    def in_pool(self, ip: IPv4Address) -> bool:
        return any(ip in r for r in self.pool)

    def lease_for(self, mac: str) -> Lease | None:
        """The record of a client (any state but declined)."""
        return self._by_mac.get(mac)

    def lease_at(self, ip: IPv4Address) -> Lease | None:
        return self._by_ip.get(ip)

    def leases(self) -> list[Lease]:
        return sorted(self._by_ip.values(), key=lambda l: l.ip)

    def held_by_other(self, ip: IPv4Address, mac: str, now: float) -> bool:
        """Is ``ip`` currently offered, bound or declined to anyone but ``mac``?"""
        lease = self._by_ip.get(ip)
        if lease is None or not lease.active(now):
            return False
        return lease.state == DECLINED or lease.mac != mac

    def _available(self, ip: IPv4Address, mac: str, now: float) -> bool:
        return self.in_pool(ip) and ip not in self.reserved and not self.held_by_other(ip, mac, now)

    def _addresses(self) -> Iterable[IPv4Address]:
        for r in self.pool:
            for value in range(int(r.start), int(r.end) + 1):
                yield IPv4Address(value)

    def _free_address(self, mac: str, now: float) -> IPv4Address | None:
        """A never-used address first, else the longest-free remembered one."""
        for ip in self._addresses():
            if ip not in self._by_ip and ip not in self.reserved:
                return ip
        candidates = [l for l in self._by_ip.values() if self._available(l.ip, mac, now)]
        if not candidates:
            return None
        return min(candidates, key=lambda l: (l.expires, l.ip)).ip

    # Changes -------------------------------------------------------------

    def _remove(self, lease: Lease | None) -> None:
        if lease is None:
            return
        if self._by_ip.get(lease.ip) is lease:
            del self._by_ip[lease.ip]
        if self._by_mac.get(lease.mac) is lease:
            del self._by_mac[lease.mac]
        self.dirty = True

    def offer(
        self,
        mac: str,
        now: float,
        requested: IPv4Address | None = None,
        hostname: str = "",
        vendor_class: str = "",
    ) -> Lease | None:
        """Choose an address for ``mac`` and hold it; None if the pool is exhausted.

        The client's current or remembered address comes first, then the
        address it asked for (option 50), then a free one.  A client that
        is bound keeps its lease as it is.
        """
        current = self._by_mac.get(mac)
        if current is not None and self._available(current.ip, mac, now):
            ip = current.ip
        elif requested is not None and self._available(requested, mac, now):
            ip = requested
        else:
            found = self._free_address(mac, now)
            if found is None:
                return None
            ip = found
        if current is not None and current.ip == ip and current.state == BOUND and current.active(now):
            return current
        if current is not None and current.ip != ip:
            self._remove(current)
        other = self._by_ip.get(ip)
        if other is not None and other is not current:
            self._remove(other)
        lease = current if current is not None and current.ip == ip else Lease(mac, ip, OFFERED, 0.0)
        # An offer alone need not reach the disk (it is lost harmlessly in a
        # restart); replacing a remembered or bound record must.
        if lease.state != OFFERED:
            self.dirty = True
        lease.state = OFFERED
        lease.expires = now + self.offer_time
        lease.hostname = hostname or lease.hostname
        lease.vendor_class = vendor_class or lease.vendor_class
        self._by_mac[mac] = lease
        self._by_ip[ip] = lease
        return lease

    def commit(
        self, mac: str, ip: IPv4Address, now: float, hostname: str = "", vendor_class: str = ""
    ) -> Lease | None:
        """Bind (or renew) ``ip`` to ``mac`` if it is this client's address; else None."""
        lease = self._by_mac.get(mac)
        if lease is None or lease.ip != ip or ip in self.reserved:
            return None
        lease.state = BOUND
        lease.expires = now + self.lease_time
        lease.hostname = hostname or lease.hostname
        lease.vendor_class = vendor_class or lease.vendor_class
        self.dirty = True
        return lease

    def release(self, mac: str, ip: IPv4Address, now: float) -> bool:
        """DHCPRELEASE: free the address but remember it for this client."""
        lease = self._by_mac.get(mac)
        if lease is None or lease.ip != ip or lease.state not in (OFFERED, BOUND):
            return False
        lease.state = RELEASED
        lease.expires = now
        self.dirty = True
        return True

    def decline(self, mac: str, ip: IPv4Address, now: float) -> bool:
        """DHCPDECLINE: the address is in use by someone else; quarantine it."""
        lease = self._by_mac.get(mac)
        if lease is None or lease.ip != ip:
            return False
        del self._by_mac[mac]
        lease.state = DECLINED
        lease.expires = now + self.decline_time
        self.dirty = True
        return True

    def cancel_offer(self, mac: str, now: float) -> bool:
        """The client took another server's offer: free ours at once."""
        lease = self._by_mac.get(mac)
        if lease is None or lease.state != OFFERED:
            return False
        lease.state = EXPIRED
        lease.expires = now
        self.dirty = True
        return True

    def expire(self, now: float) -> list[Lease]:
        """Free offers and leases whose time is up, end quarantines; return what changed."""
        changed = []
        for lease in list(self._by_ip.values()):
            if lease.expires > now:
                continue
            if lease.state in (OFFERED, BOUND):
                lease.state = EXPIRED
                changed.append(lease)
            elif lease.state == DECLINED:
                self._remove(lease)
                changed.append(lease)
        if changed:
            self.dirty = True
        return changed

    # Persistence ---------------------------------------------------------

    def dumps(self) -> bytes:
        data = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "leases": [lease.to_json() for lease in self.leases()],
        }
        return (json.dumps(data, indent=1) + "\n").encode("utf-8")

    def save(self) -> None:
        """Write the file atomically; raise OSError (old file intact) on failure."""
        if self.path is None:
            self.dirty = False
            return
        write_atomically(self.path, self.dumps())
        self.dirty = False
