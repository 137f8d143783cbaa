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

Allocation is cheap however many records there are: the pool is numbered
in order (its ranges one after the other) and a cursor marks the first
address never looked at; every address from the cursor on that is neither
recorded nor reserved is never-used, so a new client costs O(1) amortised.
An address behind the cursor that loses its record (a quarantine that
ended, say) goes into a heap of "holes", lowest first, so that the
never-used address handed out is always the first one in pool order, as a
walk of the whole pool would find.  Only when neither cursor nor holes
have an address left does a remembered record give up its address: the
one free the longest, found through two heaps of records ordered by
``(expires, address)`` (records in a holding state, which are free once
their time is up, and released or expired ones, free already).  The heaps
are lazy: a change pushes the record again and entries that no longer
describe their record are dropped when they come to the top, or all at once
when they outnumber the records.
``pool`` and ``reserved`` may be replaced (which renumbers) but not changed
in place (``reserved`` is a frozenset).

``save()`` writes every record to a JSON file atomically (a temporary file
in the same directory, fsynced, then renamed over the old one: a failed
write leaves the old file as it was); ``load()`` reads it back at start so
leases survive restarts.  Mutating methods set ``dirty`` (a new offer alone does
not: losing it in a restart is harmless); the caller decides when to save
(the service saves after each datagram that set it).  Time is wall-clock seconds (``time.time()``) because it is
persisted.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import tempfile
from bisect import bisect_right
from dataclasses import dataclass
from ipaddress import IPv4Address
from itertools import count
from json.encoder import encode_basestring_ascii  # type: ignore[attr-defined]
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


def _record_line(lease: Lease) -> str:
    """``json.dumps(lease.to_json())``, the same text, in a third of the time."""
    expires = lease.expires
    return _RECORD % (
        _json_string(lease.mac),
        lease.ip,
        _json_string(lease.state),
        float.__repr__(expires) if type(expires) is float and math.isfinite(expires) else json.dumps(expires),
        _json_string(lease.hostname),
        _json_string(lease.vendor_class),
    )


_RECORD = '{"mac": %s, "ip": "%s", "state": %s, "expires": %s, "hostname": %s, "vendor_class": %s}'
_json_string = encode_basestring_ascii


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

    heap_slack = 64
    """Stale heap entries tolerated beyond one per record before the heaps are rebuilt."""

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
        self._by_mac: dict[str, Lease] = {}
        self._by_ip: dict[IPv4Address, Lease] = {}
        self._pool: list[PoolRange] = []
        self._reserved: frozenset[IPv4Address] = frozenset()
        self.pool = pool
        self.reserved = frozenset(reserved)
        self.lease_time = lease_time
        self.path = path
        self.offer_time = offer_time
        self.decline_time = decline_time
        self.dirty = False
        self.dropped: list[Lease] = []
        """Records read from the file whose address is no longer in the pool."""
        self.skipped: list[str] = []
        """Reasons for unreadable entries of the file."""

    @property
    def pool(self) -> list[PoolRange]:
        return self._pool

    @pool.setter
    def pool(self, pool: Sequence[PoolRange]) -> None:
        self._pool = list(pool)
        self._renumber()

    @property
    def reserved(self) -> frozenset[IPv4Address]:
        """Addresses never handed out (the server's own, the router)."""
        return self._reserved

    @reserved.setter
    def reserved(self, reserved: Iterable[IPv4Address]) -> None:
        self._reserved = frozenset(reserved)
        self._renumber()

    def _renumber(self) -> None:
        """(Re)build the pool numbering and restart the never-used cursor."""
        self._ranges: list[tuple[int, int]] = []
        self._offsets: list[int] = []
        """Number of the first address of each range: the ranges one after the other."""
        total = 0
        for r in self._pool:
            start, end = int(r.start), int(r.end)
            if end < start:
                continue
            self._ranges.append((start, end))
            self._offsets.append(total)
            total += end - start + 1
        self._total = total
        self._cursor = 0
        """Every address numbered from here on that is neither recorded nor reserved is free."""
        self._holes: list[int] = []
        """Heap of numbers below the cursor whose record went away (may hold stale ones)."""
        self._hole_set: set[int] = set()
        self._rebuild_heaps()

    def _rebuild_heaps(self) -> None:
        """The heaps of remembered records, from the records alone (dropping stale entries)."""
        self._held: list[tuple[float, int, int, Lease]] = []
        """(expires, address, tie-break, record) of records offered, bound or declined."""
        self._freed: list[tuple[float, int, int, Lease]] = []
        """The same for released and expired records."""
        self._tie = count()
        for lease in self._by_ip.values():
            heap = self._held if lease.state in _HOLDING else self._freed
            heap.append((lease.expires, int(lease.ip), next(self._tie), lease))
        heapq.heapify(self._held)
        heapq.heapify(self._freed)

    def _track(self, lease: Lease) -> None:
        """``lease`` changed state or time: (re)enter it in its heap."""
        heap = self._held if lease.state in _HOLDING else self._freed
        heapq.heappush(heap, (lease.expires, int(lease.ip), next(self._tie), lease))
        if len(self._held) + len(self._freed) > 2 * len(self._by_ip) + self.heap_slack:
            self._rebuild_heaps()

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
        db._rebuild_heaps()
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
        return sorted(self._by_ip.values(), key=lambda l: int(l.ip))

    def held_by_other(self, ip: IPv4Address, mac: str, now: float) -> bool:
        """Is ``ip`` currently offered, bound or declined to anyone but ``mac``?"""
        lease = self._by_ip.get(ip)
        if lease is None or not lease.active(now):
            return False
        return lease.state == DECLINED or lease.mac != mac

    def _available(self, ip: IPv4Address, mac: str, now: float) -> bool:
        return self.in_pool(ip) and ip not in self.reserved and not self.held_by_other(ip, mac, now)

    def _number(self, value: int) -> int | None:
        """The number of an address (as an integer) in pool order; None if outside the pool."""
        for offset, (start, end) in zip(self._offsets, self._ranges):
            if start <= value <= end:
                return offset + value - start
        return None

    def _address(self, number: int) -> IPv4Address:
        i = bisect_right(self._offsets, number) - 1
        return IPv4Address(self._ranges[i][0] + number - self._offsets[i])

    def _unused_address(self) -> IPv4Address | None:
        """The first address in pool order that is neither recorded nor reserved.

        What a walk of the whole pool would find, in O(1) amortised: the
        lowest valid hole (every hole is below the cursor), else the cursor,
        moved past recorded and reserved addresses (it never moves back).
        """
        by_ip, reserved, holes = self._by_ip, self._reserved, self._holes
        while holes:
            ip = self._address(holes[0])
            if ip not in by_ip and ip not in reserved:
                return ip
            self._hole_set.discard(heapq.heappop(holes))  # taken again since it was freed
        while self._cursor < self._total:
            ip = self._address(self._cursor)
            if ip not in by_ip and ip not in reserved:
                return ip
            self._cursor += 1
        return None

    def _forget_address(self, ip: IPv4Address) -> None:
        """``ip`` lost its record: behind the cursor, it becomes a hole."""
        number = self._number(int(ip))
        if number is not None and number < self._cursor and number not in self._hole_set:
            self._hole_set.add(number)
            heapq.heappush(self._holes, number)

    def _remembered_address(self, now: float) -> IPv4Address | None:
        """The address of the record free the longest: least ``(expires, address)``.

        A record is free if it does not hold its address (released,
        expired, or offered/bound/declined but past its time) and its
        address is in the pool and not reserved.  (The client asking cannot
        own such a record: its own record, if usable, was taken before.)
        """
        best: tuple[float, int, int, Lease] | None = None
        for heap, holding in ((self._held, True), (self._freed, False)):
            while heap:
                entry = heap[0]
                expires, _, _, lease = entry
                if (self._by_ip.get(lease.ip) is not lease or lease.expires is not expires
                        or (lease.state in _HOLDING) != holding):
                    heapq.heappop(heap)  # stale: the record changed or went since
                    continue
                if lease.ip in self._reserved or not self.in_pool(lease.ip):
                    heapq.heappop(heap)  # never free (until pool or reserved change, which rebuilds)
                    continue
                if holding and not expires <= now:
                    break  # the first to end still holds its address: so do all the others
                if best is None or entry[:2] < best[:2]:
                    best = entry
                break
        return None if best is None else best[3].ip

    def _free_address(self, mac: str, now: float) -> IPv4Address | None:
        """A never-used address first, else the longest-free remembered one."""
        ip = self._unused_address()
        if ip is not None:
            return ip
        return self._remembered_address(now)

    # Changes -------------------------------------------------------------

    def _remove(self, lease: Lease | None) -> None:
        if lease is None:
            return
        if self._by_ip.get(lease.ip) is lease:
            del self._by_ip[lease.ip]
            self._forget_address(lease.ip)
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
        self._track(lease)
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
        self._track(lease)
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
        self._track(lease)
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
        self._track(lease)
        self.dirty = True
        return True

    def cancel_offer(self, mac: str, now: float) -> bool:
        """The client took another server's offer: free ours at once."""
        lease = self._by_mac.get(mac)
        if lease is None or lease.state != OFFERED:
            return False
        lease.state = EXPIRED
        lease.expires = now
        self._track(lease)
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
                self._track(lease)
                changed.append(lease)
            elif lease.state == DECLINED:
                self._remove(lease)
                changed.append(lease)
        if changed:
            self.dirty = True
        return changed

    # Persistence ---------------------------------------------------------

    def dumps(self) -> bytes:
        """The file: a JSON object, one lease record a line.

        Written without ``indent`` (which would take the pure-Python
        encoder, several times slower with tens of thousands of records);
        one record a line still reads and diffs well.
        """
        head = json.dumps({"format": FILE_FORMAT, "version": FILE_VERSION})[:-1]
        records = ",\n".join(map(_record_line, self.leases()))
        if not records:
            return (head + ', "leases": []}\n').encode("utf-8")
        return (head + ', "leases": [\n' + records + "\n]}\n").encode("utf-8")

    def save(self) -> None:
        """Write the file atomically; raise OSError (old file intact) on failure."""
        if self.path is None:
            self.dirty = False
            return
        write_atomically(self.path, self.dumps())
        self.dirty = False
