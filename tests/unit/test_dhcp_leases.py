"""The lease database: allocation, life cycle and persistence."""

from __future__ import annotations

import json
import os
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from zprovd.dhcp import leases as leases_module
from zprovd.dhcp.config import PoolRange
from zprovd.dhcp.leases import (
    BOUND,
    DECLINED,
    EXPIRED,
    LEASE_FILE_NAME,
    OFFERED,
    RELEASED,
    LeaseDatabase,
    LeaseFileError,
    read_lease_file,
)

A, B, C, D = "00156500000a", "00156500000b", "00156500000c", "00156500000d"
T0 = 1_700_000_000.0


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def pool(*ranges: str) -> list[PoolRange]:
    result = []
    for r in ranges:
        start, end = r.split("-")
        result.append(PoolRange(ip(start), ip(end)))
    return result


def db(*ranges: str, path: Path | None = None, **kwargs) -> LeaseDatabase:
    return LeaseDatabase(pool(*(ranges or ("10.0.0.10-10.0.0.12",))), 600, path, **kwargs)


# Allocation ------------------------------------------------------------------


def test_offer_hands_out_addresses_in_order_then_none():
    leases = db()
    assert [leases.offer(m, T0).ip for m in (A, B, C)] == [ip("10.0.0.10"), ip("10.0.0.11"), ip("10.0.0.12")]
    assert leases.offer(D, T0) is None  # exhausted


def test_offer_is_stable_for_a_client():
    leases = db()
    first = leases.offer(A, T0)
    assert not leases.dirty  # a new offer need not be saved
    again = leases.offer(A, T0 + 1)
    assert first is again and again.ip == ip("10.0.0.10") and again.state == OFFERED
    assert again.expires == T0 + 1 + leases.offer_time


def test_offer_honours_a_free_requested_address():
    leases = db()
    assert leases.offer(A, T0, requested=ip("10.0.0.12")).ip == ip("10.0.0.12")
    # Taken, or outside the pool: ignored.
    assert leases.offer(B, T0, requested=ip("10.0.0.12")).ip == ip("10.0.0.10")
    assert leases.offer(C, T0, requested=ip("192.168.1.1")).ip == ip("10.0.0.11")


def test_reserved_addresses_are_never_offered():
    leases = db(reserved=[ip("10.0.0.10"), ip("10.0.0.11")])
    assert leases.offer(A, T0).ip == ip("10.0.0.12")
    assert leases.offer(B, T0, requested=ip("10.0.0.10")) is None


def test_multiple_ranges():
    leases = db("10.0.0.10-10.0.0.10", "10.0.0.20-10.0.0.20")
    assert leases.offer(A, T0).ip == ip("10.0.0.10")
    assert leases.offer(B, T0).ip == ip("10.0.0.20")
    assert leases.offer(C, T0) is None


def test_expired_offer_frees_the_address_for_others():
    leases = db("10.0.0.10-10.0.0.10")
    leases.offer(A, T0)
    assert leases.offer(B, T0 + 1) is None
    assert leases.offer(B, T0 + leases.offer_time + 1).ip == ip("10.0.0.10")
    assert leases.lease_for(A) is None  # A's record was reclaimed


def test_never_used_addresses_before_remembered_ones():
    leases = db("10.0.0.10-10.0.0.11")
    leases.offer(A, T0)
    leases.commit(A, ip("10.0.0.10"), T0)
    leases.release(A, ip("10.0.0.10"), T0 + 5)
    assert leases.offer(B, T0 + 6).ip == ip("10.0.0.11")
    # A comes back and gets its old address.
    assert leases.offer(A, T0 + 7).ip == ip("10.0.0.10")


def test_remembered_addresses_reclaimed_oldest_first():
    leases = db("10.0.0.10-10.0.0.11")
    for mac, when in ((A, T0), (B, T0 + 100)):
        lease = leases.offer(mac, when)
        leases.commit(mac, lease.ip, when)
    leases.expire(T0 + 10_000)
    assert {l.state for l in leases.leases()} == {EXPIRED}
    assert leases.offer(C, T0 + 10_001).ip == ip("10.0.0.10")  # A's expired first
    assert leases.offer(D, T0 + 10_001).ip == ip("10.0.0.11")


# Life cycle ------------------------------------------------------------------


def test_commit_binds_and_renews():
    leases = db()
    offered = leases.offer(A, T0, hostname="p1", vendor_class="Yealink")
    bound = leases.commit(A, offered.ip, T0 + 2)
    assert bound.state == BOUND and bound.expires == T0 + 2 + 600
    assert (bound.hostname, bound.vendor_class) == ("p1", "Yealink")
    renewed = leases.commit(A, offered.ip, T0 + 300, hostname="p1b")
    assert renewed.expires == T0 + 900 and renewed.hostname == "p1b"
    assert leases.dirty


def test_commit_refuses_an_address_that_is_not_the_clients():
    leases = db()
    a = leases.offer(A, T0)
    leases.offer(B, T0)
    assert leases.commit(A, ip("10.0.0.11"), T0) is None  # B's
    assert leases.commit(C, a.ip, T0) is None  # unknown client
    assert leases.commit(A, ip("10.9.9.9"), T0) is None


def test_offer_to_a_bound_client_keeps_the_lease():
    leases = db()
    lease = leases.offer(A, T0)
    leases.commit(A, lease.ip, T0)
    again = leases.offer(A, T0 + 10)
    assert again.state == BOUND and again.expires == T0 + 600


def test_bound_lease_expires_and_is_remembered():
    leases = db()
    lease = leases.offer(A, T0)
    leases.commit(A, lease.ip, T0)
    assert leases.expire(T0 + 599) == []
    assert leases.held_by_other(lease.ip, B, T0 + 599)
    changed = leases.expire(T0 + 600)
    assert changed == [lease] and lease.state == EXPIRED
    assert not leases.held_by_other(lease.ip, B, T0 + 600)
    # Renewing an expired lease nobody took is still accepted.
    assert leases.commit(A, lease.ip, T0 + 700).state == BOUND


def test_release():
    leases = db()
    lease = leases.offer(A, T0)
    leases.commit(A, lease.ip, T0)
    assert not leases.release(B, lease.ip, T0 + 1)
    assert not leases.release(A, ip("10.0.0.12"), T0 + 1)
    assert leases.release(A, lease.ip, T0 + 1)
    assert lease.state == RELEASED and lease.expires == T0 + 1
    assert not leases.release(A, lease.ip, T0 + 2)  # twice


def test_decline_quarantines_the_address():
    leases = db("10.0.0.10-10.0.0.11", decline_time=100)
    lease = leases.offer(A, T0)
    assert not leases.decline(B, lease.ip, T0)
    assert leases.decline(A, lease.ip, T0 + 1)
    assert leases.lease_for(A) is None
    assert leases.lease_at(lease.ip).state == DECLINED
    assert leases.held_by_other(lease.ip, A, T0 + 2)
    # The decliner and others get another address meanwhile.
    assert leases.offer(A, T0 + 2).ip == ip("10.0.0.11")
    assert leases.offer(B, T0 + 2) is None
    # After the quarantine, expire() forgets it and it can be offered again.
    leases.commit(A, ip("10.0.0.11"), T0 + 2)
    assert [l.ip for l in leases.expire(T0 + 101)] == [ip("10.0.0.10")]
    assert leases.lease_at(ip("10.0.0.10")) is None
    assert leases.offer(B, T0 + 102).ip == ip("10.0.0.10")


def test_cancel_offer():
    leases = db("10.0.0.10-10.0.0.10")
    lease = leases.offer(A, T0)
    assert leases.cancel_offer(A, T0 + 1)
    assert lease.state == EXPIRED
    assert not leases.cancel_offer(A, T0 + 1)
    assert leases.offer(B, T0 + 2).ip == ip("10.0.0.10")


def test_expire_turns_offers_into_remembered_records():
    leases = db()
    lease = leases.offer(A, T0)
    leases.expire(T0 + leases.offer_time)
    assert lease.state == EXPIRED
    assert leases.offer(A, T0 + 1000).ip == lease.ip


# Persistence -----------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    leases = db(path=path)
    a = leases.offer(A, T0, hostname="desk", vendor_class="Polycom")
    leases.commit(A, a.ip, T0)
    b = leases.offer(B, T0)
    leases.decline(B, b.ip, T0)
    leases.save()
    assert not leases.dirty
    again = LeaseDatabase.load(path, leases.pool, 600)
    assert [l.to_json() for l in again.leases()] == [l.to_json() for l in leases.leases()]
    assert again.lease_for(A).hostname == "desk"
    assert again.lease_for(B) is None
    assert again.lease_at(b.ip).state == DECLINED
    assert not again.dirty
    # The restarted server keeps honouring the client's lease.
    assert again.commit(A, a.ip, T0 + 100).state == BOUND


def test_file_format(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    leases = db(path=path)
    leases.commit(A, leases.offer(A, T0).ip, T0)
    leases.save()
    data = json.loads(path.read_text())
    assert data["format"] == "zprovd-dhcp-leases" and data["version"] == 1
    assert data["leases"] == [{"mac": A, "ip": "10.0.0.10", "state": "bound", "expires": T0 + 600,
                               "hostname": "", "vendor_class": ""}]


def test_missing_file_is_an_empty_database(tmp_path):
    leases = LeaseDatabase.load(tmp_path / "none.json", pool("10.0.0.10-10.0.0.12"), 600)
    assert leases.leases() == []


def test_save_creates_the_directory(tmp_path):
    path = tmp_path / "a" / "b" / LEASE_FILE_NAME
    leases = db(path=path)
    leases.offer(A, T0)
    leases.save()
    assert path.exists()


def test_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / LEASE_FILE_NAME
    leases = db(path=path)
    leases.commit(A, leases.offer(A, T0).ip, T0)
    leases.save()
    before = path.read_bytes()
    leases.commit(B, leases.offer(B, T0).ip, T0)

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(leases_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        leases.save()
    assert path.read_bytes() == before
    assert leases.dirty  # still to be saved
    assert [p.name for p in tmp_path.iterdir()] == [LEASE_FILE_NAME]  # no temporary file left
    monkeypatch.undo()
    leases.save()
    assert len(read_lease_file(path)[0]) == 2


def test_failed_write_of_data_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / LEASE_FILE_NAME
    leases = db(path=path)
    leases.offer(A, T0)
    leases.save()
    before = path.read_bytes()
    real_fsync = os.fsync

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(leases_module.os, "fsync", failing_fsync)
    leases.offer(B, T0)
    with pytest.raises(OSError):
        leases.save()
    monkeypatch.setattr(leases_module.os, "fsync", real_fsync)
    assert path.read_bytes() == before
    assert len(list(tmp_path.iterdir())) == 1


def test_load_drops_records_outside_the_pool(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    leases = db("10.0.0.10-10.0.0.12", path=path)
    leases.commit(A, leases.offer(A, T0).ip, T0)
    leases.commit(B, leases.offer(B, T0).ip, T0)
    leases.save()
    smaller = LeaseDatabase.load(path, pool("10.0.0.11-10.0.0.20"), 600)
    assert [l.mac for l in smaller.dropped] == [A]
    assert [l.mac for l in smaller.leases()] == [B]


def test_load_skips_bad_entries_and_keeps_the_rest(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    good = {"mac": A, "ip": "10.0.0.10", "state": "bound", "expires": T0}
    entries = [
        good,
        {"mac": "nope", "ip": "10.0.0.11", "state": "bound", "expires": T0},
        {"mac": B, "ip": "10.0.0.11", "state": "dancing", "expires": T0},
        {"mac": B, "ip": "10.0.0.11", "state": "bound", "expires": "soon"},
        {"mac": B, "state": "bound", "expires": T0},
        "junk",
    ]
    path.write_text(json.dumps({"format": "zprovd-dhcp-leases", "version": 1, "leases": entries}))
    leases = LeaseDatabase.load(path, pool("10.0.0.10-10.0.0.12"), 600)
    assert [l.mac for l in leases.leases()] == [A]
    assert len(leases.skipped) == 5
    assert any("unknown state 'dancing'" in s for s in leases.skipped)
    assert any("missing 'ip'" in s for s in leases.skipped)


def test_load_duplicate_records_keeps_the_latest(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    entries = [
        {"mac": A, "ip": "10.0.0.10", "state": "bound", "expires": T0 + 50},
        {"mac": A, "ip": "10.0.0.11", "state": "bound", "expires": T0 + 10},
        {"mac": B, "ip": "10.0.0.10", "state": "expired", "expires": T0},
    ]
    path.write_text(json.dumps({"format": "zprovd-dhcp-leases", "version": 1, "leases": entries}))
    leases = LeaseDatabase.load(path, pool("10.0.0.10-10.0.0.12"), 600)
    assert leases.lease_for(A).ip == ip("10.0.0.10")
    assert leases.lease_for(B) is None
    assert [str(l.ip) for l in leases.leases()] == ["10.0.0.10"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        ("[]", "not a zprovd DHCP lease file"),
        ('{"format": "other", "leases": []}', "not a zprovd DHCP lease file"),
        ('{"format": "zprovd-dhcp-leases", "version": 7, "leases": []}', "version 7 is not 1"),
    ],
)
def test_unreadable_file_raises(tmp_path, content, message):
    path = tmp_path / LEASE_FILE_NAME
    path.write_text(content)
    with pytest.raises(LeaseFileError, match=message):
        LeaseDatabase.load(path, pool("10.0.0.10-10.0.0.12"), 600)


def test_save_without_path_only_clears_dirty():
    leases = db()
    leases.offer(A, T0)
    leases.save()
    assert not leases.dirty


# `zprovd dhcp leases` and the argument checks of `zprovd dhcp probe` --------

import io  # noqa: E402
import time  # noqa: E402
from types import SimpleNamespace  # noqa: E402

from zprovd.dhcp.cli import probe, show_leases  # noqa: E402
from zprovd.dhcp.config import DHCPConfig  # noqa: E402


def test_show_leases_prints_a_table(tmp_path):
    leases = db(path=tmp_path / LEASE_FILE_NAME)
    now = time.time()
    a = leases.offer(A, now, hostname="desk-1", vendor_class="Yealink SIP-T46S")
    leases.commit(A, a.ip, now)
    b = leases.offer(B, now - 10_000)
    leases.commit(B, b.ip, now - 10_000)
    leases.save()
    out = io.StringIO()
    assert show_leases(DHCPConfig(mode="server"), tmp_path, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["MAC", "IP", "STATE", "EXPIRES", "HOSTNAME", "VENDOR", "CLASS"]
    assert lines[1].startswith("00:15:65:00:00:0a  10.0.0.10  bound")
    assert "desk-1" in lines[1] and lines[1].endswith("Yealink SIP-T46S")
    assert lines[2].startswith("00:15:65:00:00:0b  10.0.0.11  expired")  # bound but past its time
    assert len(lines) == 3


def test_show_leases_accepts_the_whole_configuration(tmp_path):
    out = io.StringIO()
    whole = SimpleNamespace(extra={"dhcp": DHCPConfig(mode="inform")})
    assert show_leases(whole, tmp_path, out) == 0
    assert "note: [dhcp] mode is 'inform'; only server mode gives leases" in out.getvalue()
    assert f"no DHCP leases in {tmp_path / LEASE_FILE_NAME}" in out.getvalue()


def test_show_leases_reports_an_unreadable_file(tmp_path):
    (tmp_path / LEASE_FILE_NAME).write_text("nonsense")
    out = io.StringIO()
    assert show_leases(DHCPConfig(mode="server"), tmp_path, out) == 2
    assert out.getvalue().startswith("error: ") and "not a lease file" in out.getvalue()


@pytest.mark.parametrize("interface, timeout", [("", 2.0), ("zpt-nosuch0", 0), ("zpt-nosuch0", 61)])
def test_probe_rejects_bad_arguments_before_touching_the_network(interface, timeout):
    out = io.StringIO()
    assert probe(interface, timeout, out) == 2
    assert out.getvalue().startswith("error: ")


def test_probe_reports_a_missing_interface():
    out = io.StringIO()
    assert probe("zpt-nosuch0", 0.2, out) == 2
    assert "error: cannot probe zpt-nosuch0" in out.getvalue()


# Allocation with the never-used cursor: edge cases ---------------------------
#
# New addresses come from a cursor over the pool plus a heap of addresses
# behind it that lost their record ("holes"); these tests pin down that the
# result is what a walk of the whole pool would give.

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def test_full_pool_gives_the_record_free_the_longest_whatever_its_state():
    # B released at +10 (free since then), A's offer lapsed at +60, C's lease at +600.
    leases = db("10.0.0.10-10.0.0.12", offer_time=60)
    leases.offer(A, T0)
    leases.commit(B, leases.offer(B, T0).ip, T0)
    leases.release(B, ip("10.0.0.11"), T0 + 10)
    leases.commit(C, leases.offer(C, T0).ip, T0)
    assert leases.offer(D, T0 + 100).ip == ip("10.0.0.11")
    assert leases.offer("00156500e001", T0 + 100).ip == ip("10.0.0.10")
    assert leases.offer("00156500e002", T0 + 159) is None
    # At +600: the two offers of +100 lapsed at +160, before C's lease ends: lowest address first.
    assert leases.offer("00156500e002", T0 + 600).ip == ip("10.0.0.10")


def test_full_pool_prefers_a_lapsed_offer_to_a_later_release():
    leases = db("10.0.0.10-10.0.0.11", offer_time=60)
    leases.offer(A, T0)
    leases.commit(B, leases.offer(B, T0).ip, T0)
    leases.release(B, ip("10.0.0.11"), T0 + 90)
    assert leases.offer(C, T0 + 100).ip == ip("10.0.0.10")  # free since +60
    assert leases.offer(D, T0 + 100).ip == ip("10.0.0.11")  # free since +90


def test_full_pool_gives_a_bound_lease_past_its_time_before_expire_runs():
    leases = db("10.0.0.10-10.0.0.10")
    leases.commit(A, leases.offer(A, T0).ip, T0)
    assert leases.offer(B, T0 + 599) is None
    assert leases.offer(B, T0 + 600).ip == ip("10.0.0.10")  # no expire() in between


def test_full_pool_never_gives_a_remembered_record_at_a_reserved_address(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    write_leases(path, [
        {"mac": A, "ip": "10.0.0.10", "state": "expired", "expires": T0 - 100},
        {"mac": B, "ip": "10.0.0.11", "state": "expired", "expires": T0 - 50},
    ])
    leases = LeaseDatabase.load(path, pool("10.0.0.10-10.0.0.11"), 600, reserved=[ip("10.0.0.10")])
    assert leases.offer(C, T0).ip == ip("10.0.0.11")
    assert leases.offer(D, T0) is None


class EagerLeaseDatabase(LeaseDatabase):
    """Rebuilds its heaps of remembered records as soon as they hold one stale entry too many."""

    heap_slack = 0


@pytest.mark.parametrize("kind", [LeaseDatabase, EagerLeaseDatabase])
def test_heaps_of_remembered_records_survive_their_rebuilds(kind):
    leases = kind(pool("10.0.0.10-10.0.0.13"), 600, offer_time=60)
    clients = macs(4)
    for mac in clients:
        leases.offer(mac, T0)
    for round_ in range(1, 30):  # renewals leave stale entries behind
        leases.commit(clients[1], ip("10.0.0.11"), T0 + round_)
        leases.commit(clients[3], ip("10.0.0.13"), T0 + round_)
    assert len(leases._held) + len(leases._freed) <= 2 * 4 + kind.heap_slack + 1
    # The offers to clients 0 and 2 lapsed at +60: they go first, lowest address first.
    assert leases.offer(A, T0 + 61).ip == ip("10.0.0.10")
    assert leases.offer(B, T0 + 61).ip == ip("10.0.0.12")
    assert leases.offer(C, T0 + 61) is None
    # Much later every record is free: ordered by when each became so, then by address.
    got = [leases.offer(m, T0 + 700).ip for m in (C, D, *macs(2, 0x200))]
    assert got == [ip("10.0.0.10"), ip("10.0.0.12"), ip("10.0.0.11"), ip("10.0.0.13")]


def write_leases(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps({"format": "zprovd-dhcp-leases", "version": 1, "leases": entries}))


def macs(n: int, first: int = 0x100) -> list[str]:
    return [f"0015650{i:05x}" for i in range(first, first + n)]


def test_cursor_skips_reserved_addresses_between_others():
    leases = db("10.0.0.10-10.0.0.15", reserved=[ip("10.0.0.11"), ip("10.0.0.12"), ip("10.0.0.15")])
    got = [leases.offer(m, T0) for m in macs(4)]
    assert [l.ip if l else None for l in got] == [ip("10.0.0.10"), ip("10.0.0.13"), ip("10.0.0.14"), None]


def test_reserved_is_fixed_and_replacing_it_renumbers():
    leases = db("10.0.0.10-10.0.0.12", reserved=[ip("10.0.0.10")])
    assert leases.offer(A, T0).ip == ip("10.0.0.11")
    with pytest.raises(AttributeError):
        leases.reserved.discard(ip("10.0.0.10"))  # a frozenset: the cursor cannot be fooled
    leases.reserved = []
    assert leases.offer(B, T0).ip == ip("10.0.0.10")  # behind the cursor, found again
    assert leases.offer(C, T0).ip == ip("10.0.0.12")


def test_cursor_skips_requested_addresses_ahead_of_it():
    leases = db("10.0.0.10-10.0.0.14")
    assert leases.offer(A, T0, requested=ip("10.0.0.11")).ip == ip("10.0.0.11")
    assert leases.offer(B, T0, requested=ip("10.0.0.12")).ip == ip("10.0.0.12")
    assert [leases.offer(m, T0).ip for m in macs(3)] == [ip("10.0.0.10"), ip("10.0.0.13"), ip("10.0.0.14")]


def test_declined_address_behind_the_cursor_returns_after_its_quarantine_only():
    leases = db("10.0.0.10-10.0.0.14", decline_time=100)
    a, b = leases.offer(A, T0), leases.offer(B, T0)
    assert leases.decline(A, a.ip, T0)
    assert leases.decline(B, b.ip, T0)
    # During the quarantine the cursor goes on past them.
    assert leases.offer(C, T0 + 1).ip == ip("10.0.0.12")
    leases.expire(T0 + 50)
    assert leases.offer(D, T0 + 50).ip == ip("10.0.0.13")
    # Quarantine over: both are never-used again, lowest first, before the rest of the pool.
    leases.expire(T0 + 101)
    first, second, third = macs(3)
    assert leases.offer(first, T0 + 101).ip == ip("10.0.0.10")
    assert leases.offer(second, T0 + 101).ip == ip("10.0.0.11")
    assert leases.offer(third, T0 + 101).ip == ip("10.0.0.14")


def test_client_moved_off_a_now_reserved_address_does_not_free_it(tmp_path):
    # A's lease is at what became the server's address: A moves, and the
    # address its record leaves behind the cursor stays reserved.
    path = tmp_path / LEASE_FILE_NAME
    write_leases(path, [{"mac": A, "ip": "10.0.0.11", "state": "bound", "expires": T0 + 1000}])
    leases = LeaseDatabase.load(path, pool("10.0.0.10-10.0.0.13"), 600, reserved=[ip("10.0.0.11")])
    assert leases.offer(B, T0).ip == ip("10.0.0.10")
    assert leases.offer(C, T0).ip == ip("10.0.0.12")
    assert leases.offer(A, T0 + 1).ip == ip("10.0.0.13")
    assert leases.lease_at(ip("10.0.0.11")) is None
    assert leases.offer(D, T0 + 2) is None


def test_pool_exhausted_then_released_address_reused():
    leases = db("10.0.0.10-10.0.0.12")
    clients = macs(3)
    for mac in clients:
        leases.commit(mac, leases.offer(mac, T0).ip, T0)
    assert leases.offer(A, T0 + 1) is None
    assert leases.release(clients[1], ip("10.0.0.11"), T0 + 2)
    assert leases.offer(A, T0 + 3).ip == ip("10.0.0.11")
    assert leases.lease_for(clients[1]) is None
    assert leases.offer(B, T0 + 3) is None
    # Two more released: the one free the longest goes first.
    leases.release(clients[2], ip("10.0.0.12"), T0 + 10)
    leases.release(clients[0], ip("10.0.0.10"), T0 + 20)
    assert leases.offer(B, T0 + 30).ip == ip("10.0.0.12")
    assert leases.offer(C, T0 + 30).ip == ip("10.0.0.10")
    assert leases.offer(D, T0 + 30) is None


def test_exhausted_pool_hands_out_a_quarantine_that_ended_before_expire_runs():
    leases = db("10.0.0.10-10.0.0.11", decline_time=100)
    leases.decline(A, leases.offer(A, T0).ip, T0)
    leases.commit(B, leases.offer(B, T0).ip, T0)
    assert leases.offer(C, T0 + 99) is None
    assert leases.offer(C, T0 + 100).ip == ip("10.0.0.10")  # no expire() in between


def test_cursor_crosses_ranges_in_pool_order():
    leases = db("10.0.0.20-10.0.0.21", "10.0.0.10-10.0.0.11", reserved=[ip("10.0.0.21")])
    got = [leases.offer(m, T0).ip for m in macs(3)]
    assert got == [ip("10.0.0.20"), ip("10.0.0.10"), ip("10.0.0.11")]
    leases.decline(macs(3)[0], ip("10.0.0.20"), T0)
    leases.expire(T0 + leases.decline_time)
    # The hole in the first range comes before anything after it.
    assert leases.offer(A, T0 + leases.decline_time).ip == ip("10.0.0.20")


def test_load_with_leases_in_the_middle_of_the_range(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    write_leases(path, [
        {"mac": A, "ip": "10.0.0.12", "state": "bound", "expires": T0 + 1000},
        {"mac": B, "ip": "10.0.0.13", "state": "released", "expires": T0 - 5},
        {"mac": "", "ip": "10.0.0.15", "state": "declined", "expires": T0 + 1000},
    ])
    leases = LeaseDatabase.load(path, pool("10.0.0.10-10.0.0.17"), 600)
    got = [leases.offer(m, T0).ip for m in macs(4)]
    assert got == [ip("10.0.0.10"), ip("10.0.0.11"), ip("10.0.0.14"), ip("10.0.0.16")]
    # B's remembered address waits for B, A keeps its lease.
    assert leases.offer(B, T0 + 1).ip == ip("10.0.0.13")
    assert leases.offer(A, T0 + 1).state == BOUND
    # Then the last never-used one, then nothing (the declined one is quarantined).
    assert leases.offer(C, T0 + 1).ip == ip("10.0.0.17")
    assert leases.offer(D, T0 + 1) is None


def test_load_then_remembered_record_reclaimed_when_the_pool_is_full(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    write_leases(path, [
        {"mac": A, "ip": "10.0.0.11", "state": "expired", "expires": T0 - 100},
        {"mac": B, "ip": "10.0.0.10", "state": "expired", "expires": T0 - 50},
    ])
    leases = LeaseDatabase.load(path, pool("10.0.0.10-10.0.0.12"), 600)
    assert leases.offer(C, T0).ip == ip("10.0.0.12")
    assert leases.offer(D, T0).ip == ip("10.0.0.11")  # A's, free the longest
    assert leases.lease_for(A) is None and leases.lease_for(B).ip == ip("10.0.0.10")


def test_lease_survives_load_and_cursor_starts_after_it(tmp_path):
    path = tmp_path / LEASE_FILE_NAME
    leases = db("10.0.0.10-10.0.0.13", path=path)
    for mac in (A, B):
        leases.commit(mac, leases.offer(mac, T0).ip, T0)
    leases.save()
    again = LeaseDatabase.load(path, leases.pool, 600)
    assert again.offer(A, T0 + 5).ip == ip("10.0.0.10")
    assert again.offer(C, T0 + 5).ip == ip("10.0.0.12")


def test_dumps_is_json_one_record_a_line(tmp_path):
    leases = db("10.0.0.10-10.0.0.12", path=tmp_path / LEASE_FILE_NAME)
    assert json.loads(leases.dumps()) == {"format": "zprovd-dhcp-leases", "version": 1, "leases": []}
    leases.offer(A, T0, hostname='desk "1"\n\\', vendor_class="Snom D785 \u00e9\u2603\U0001f600")
    leases.commit(B, leases.offer(B, T0).ip, 1_700_000_600)  # an int time, as a caller may pass
    lines = leases.dumps().decode("ascii").splitlines()
    assert len(lines) == 4  # head, two records, tail
    assert lines[1] == json.dumps(leases.lease_for(A).to_json()) + ","
    assert lines[2] == json.dumps(leases.lease_for(B).to_json())
    leases.save()
    assert [l.to_json() for l in read_lease_file(leases.path)[0]] == [l.to_json() for l in leases.leases()]


@settings(max_examples=150, deadline=None)
@given(
    st.text(max_size=20),
    st.text(max_size=20),
    st.one_of(st.floats(allow_nan=False), st.integers(-(2**40), 2**40), st.sampled_from([float("inf"), float("-inf")])),
)
def test_dumps_writes_what_json_would(hostname, vendor_class, expires):
    leases = db()
    lease = leases.offer(A, T0, hostname=hostname, vendor_class=vendor_class)
    lease.expires = expires
    data = json.loads(leases.dumps())
    assert data["leases"] == [json.loads(json.dumps(lease.to_json()))]
    assert leases.dumps().decode("ascii").splitlines()[1] == json.dumps(lease.to_json())


# The allocator against a reference that walks the whole pool ------------------


class WalkingLeaseDatabase(LeaseDatabase):
    """The allocation rule written the slow, obvious way (the code before the cursor and heaps)."""

    def _free_address(self, mac, now):
        for r in self.pool:
            for value in range(int(r.start), int(r.end) + 1):
                address = IPv4Address(value)
                if address not in self._by_ip and address not in self.reserved:
                    return address
        candidates = [l for l in self._by_ip.values() if self._available(l.ip, mac, now)]
        if not candidates:
            return None
        return min(candidates, key=lambda l: (l.expires, l.ip)).ip


OPERATIONS = st.lists(
    st.tuples(
        st.sampled_from(["offer", "offer", "offer", "request", "commit", "release", "decline", "decline", "cancel",
                         "expire", "reload"]),
        st.integers(min_value=0, max_value=9),     # client
        st.integers(min_value=0, max_value=13),    # requested address (some outside the pool)
        st.integers(min_value=0, max_value=200),   # seconds to advance
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(OPERATIONS, st.sets(st.integers(min_value=0, max_value=13), max_size=3), st.booleans(),
       st.sampled_from([LeaseDatabase, EagerLeaseDatabase]))
def test_allocation_matches_a_walk_of_the_whole_pool(tmp_path_factory, operations, reserved_at, two_ranges, kind):
    ranges = ("10.0.0.4-10.0.0.8", "10.0.0.0-10.0.0.2") if two_ranges else ("10.0.0.0-10.0.0.8",)
    reserved = [IPv4Address(f"10.0.0.{i}") for i in reserved_at]
    kwargs = {"offer_time": 30, "decline_time": 60, "reserved": reserved}
    fast = kind(pool(*ranges), 120, **kwargs)
    slow = WalkingLeaseDatabase(pool(*ranges), 120, **kwargs)
    path = tmp_path_factory.mktemp("leases") / LEASE_FILE_NAME
    now = T0
    for op, client, address, advance in operations:
        now += advance
        mac = f"00156500{client:04x}"
        wanted = IPv4Address(f"10.0.0.{address}")
        for leases in (fast, slow):
            leases.path = path
        if op in ("offer", "request"):
            requested = wanted if op == "request" else None
            got = [leases.offer(mac, now, requested=requested) for leases in (fast, slow)]
            assert [l.ip if l else None for l in got] == [l.ip if l else None for l in got[1:] + got[:1]]
        elif op == "commit":
            own = slow.lease_for(mac)
            target = own.ip if own is not None and address % 2 else wanted
            assert (fast.commit(mac, target, now) is None) == (slow.commit(mac, target, now) is None)
        elif op == "release":
            own = slow.lease_for(mac)
            target = own.ip if own is not None else wanted
            assert fast.release(mac, target, now) == slow.release(mac, target, now)
        elif op == "decline":
            own = slow.lease_for(mac)
            target = own.ip if own is not None else wanted
            assert fast.decline(mac, target, now) == slow.decline(mac, target, now)
        elif op == "cancel":
            assert fast.cancel_offer(mac, now) == slow.cancel_offer(mac, now)
        elif op == "expire":
            assert [l.ip for l in fast.expire(now)] == [l.ip for l in slow.expire(now)]
        elif op == "reload":
            fast.save()
            fast = kind.load(path, pool(*ranges), 120, **kwargs)
            slow = WalkingLeaseDatabase.load(path, pool(*ranges), 120, **kwargs)
        assert [l.to_json() for l in fast.leases()] == [l.to_json() for l in slow.leases()]
