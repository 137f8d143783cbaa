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
