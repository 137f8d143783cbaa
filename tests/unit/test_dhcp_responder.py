"""The responder: what each mode answers, to whom, with which options."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest

from zprovd.dhcp.config import DHCPConfig, MatchRule, PoolRange
from zprovd.dhcp.leases import BOUND, DECLINED, RELEASED, LeaseDatabase
from zprovd.dhcp.packets import (
    ACK,
    BOOTREPLY,
    BROADCAST_FLAG,
    DECLINE,
    DISCOVER,
    INFORM,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    DHCPMessage,
    decode,
    encode,
)
from zprovd.dhcp.responder import BROADCAST, Responder

SERVER_IP = IPv4Address("10.0.0.1")
OTHER_SERVER = IPv4Address("10.0.0.254")
YEALINK = "001565000001"
POLYCOM = "0004f2000002"
OTHER = "020000000003"
T0 = 1_700_000_000.0
ZERO = IPv4Address(0)


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)


def config(mode: str = "inform", **kwargs) -> DHCPConfig:
    values = dict(
        enabled=True,
        interface="zpt-nosuch0",  # never a real interface, even by mistake
        mode=mode,
        answer="matching",
        pool=[PoolRange(ip("10.0.0.100"), ip("10.0.0.102"))],
        subnet_mask=ip("255.255.255.0"),
        router=ip("10.0.0.254"),
        lease_time=600,
        rate_limit=0,
        options={
            1: ip("255.255.255.0").packed,
            3: ip("10.0.0.254").packed,
            6: ip("10.0.0.53").packed,
            42: ip("10.0.0.123").packed,
            66: b"tftp.example.com",
        },
        matches=[
            MatchRule(options={66: b"yealink.example.com", 150: ip("10.0.0.2").packed, 160: b"http://prov/y/"},
                      vendor_class="Yealink"),
            MatchRule(options={160: b"http://prov/p/"}, oui="0004f2"),
            MatchRule(options={67: b"first-wins"}, vendor_class="Yea"),
        ],
    )
    values.update(kwargs)
    return DHCPConfig(**values)


def responder(mode: str = "inform", **kwargs) -> Responder:
    cfg = config(mode, **kwargs)
    leases = LeaseDatabase(cfg.pool, cfg.lease_time, reserved=[SERVER_IP]) if mode == "server" else None
    return Responder(cfg, leases, SERVER_IP)


def message(kind: int, mac: str = YEALINK, vendor: str | None = "Yealink SIP-T46S", params=(1, 3, 6, 66, 150, 160),
            **fields) -> DHCPMessage:
    options = dict(fields.pop("options", {}))
    if params is not None:
        options[55] = bytes(params)
    if vendor is not None:
        options[60] = vendor.encode()
    for code, key in ((50, "requested"), (54, "server_id")):
        value = fields.pop(key, None)
        if value is not None:
            options[code] = ip(value).packed if isinstance(value, str) else value.packed
    msg = DHCPMessage(op=1, xid=0x42, chaddr=mac, message_type=kind, options=options, **fields)
    return decode(encode(msg))  # what the server would really see


def only(replies):
    assert len(replies) == 1, replies
    return replies[0]


def notes(r: Responder) -> str:
    return "\n".join(f"{n.level}: {n.text}" for n in r.notes)


# Inform mode -----------------------------------------------------------------


def test_inform_is_answered_to_ciaddr_with_options_and_no_address():
    r = responder("inform")
    reply = only(r.handle(message(INFORM, ciaddr=ip("10.0.0.50")), T0))
    m = reply.message
    assert m.op == BOOTREPLY and m.message_type == ACK and m.xid == 0x42 and m.chaddr == YEALINK
    assert m.yiaddr == ZERO and m.ciaddr == ip("10.0.0.50")
    assert (reply.address, reply.port) == (ip("10.0.0.50"), 68)
    assert m.options[54] == SERVER_IP.packed
    assert m.options[66] == b"yealink.example.com"  # the match overrides [dhcp.options]
    assert m.options[150] == ip("10.0.0.2").packed
    assert m.options[160] == b"http://prov/y/"
    assert 51 not in m.options and 58 not in m.options  # never lease times for DHCPINFORM
    assert "DHCPACK to 00:15:65:00:00:01 (vendor class 'Yealink SIP-T46S') [vendor_class 'Yealink']" in reply.log
    assert "via 10.0.0.50:68" in reply.log and "66(tftp-server-name)=yealink.example.com" in reply.log


def test_inform_mode_ignores_everything_else():
    r = responder("inform")
    for kind in (DISCOVER, REQUEST, RELEASE, DECLINE):
        assert r.handle(message(kind, server_id=SERVER_IP, requested="10.0.0.100"), T0) == []
        assert "inform mode answers DHCPINFORM only" in notes(r)


def test_non_matching_client_is_ignored():
    r = responder("inform")
    assert r.handle(message(INFORM, mac=OTHER, vendor="Grandstream", ciaddr=ip("10.0.0.9")), T0) == []
    assert "no [[dhcp.match]] selects this client" in notes(r)
    assert r.handle(message(INFORM, mac=OTHER, vendor=None, ciaddr=ip("10.0.0.9")), T0) == []


def test_answer_all_gives_base_options_to_anyone():
    r = responder("inform", answer="all")
    m = only(r.handle(message(INFORM, mac=OTHER, vendor="Grandstream", ciaddr=ip("10.0.0.9")), T0)).message
    assert m.options[66] == b"tftp.example.com"
    assert 150 not in m.options and 160 not in m.options


def test_oui_match():
    r = responder("inform")
    m = only(r.handle(message(INFORM, mac=POLYCOM, vendor="Polycom-VVX", ciaddr=ip("10.0.0.9")), T0)).message
    assert m.options[160] == b"http://prov/p/"
    assert m.options[66] == b"tftp.example.com"


def test_first_matching_rule_wins():
    r = responder("inform")
    m = only(r.handle(message(INFORM, params=(66, 67), ciaddr=ip("10.0.0.9")), T0)).message
    assert 67 not in m.options  # the third rule also matches "Yea" but comes later


def test_only_requested_options_are_sent():
    r = responder("inform")
    m = only(r.handle(message(INFORM, params=(42, 150), ciaddr=ip("10.0.0.9")), T0)).message
    assert set(m.options) == {54, 42, 150}
    m = only(r.handle(message(INFORM, params=(), ciaddr=ip("10.0.0.9")), T0)).message
    assert set(m.options) == {54}


def test_no_parameter_list_gets_every_configured_option():
    r = responder("inform")
    m = only(r.handle(message(INFORM, params=None, ciaddr=ip("10.0.0.9")), T0)).message
    assert set(m.options) == {54, 1, 3, 6, 42, 66, 150, 160}


def test_inform_without_ciaddr_is_broadcast():
    r = responder("inform")
    reply = only(r.handle(message(INFORM), T0))
    assert reply.broadcast and (reply.address, reply.port) == (BROADCAST, 68)


def test_relayed_inform_goes_straight_to_ciaddr():
    r = responder("inform")
    reply = only(r.handle(message(INFORM, ciaddr=ip("10.5.0.9"), giaddr=ip("10.5.0.1")), T0))
    assert (reply.address, reply.port) == (ip("10.5.0.9"), 68)


def test_replies_and_plain_bootp_are_ignored():
    r = responder("inform", answer="all")
    reply_msg = message(INFORM, ciaddr=ip("10.0.0.9"))
    reply_msg.op = BOOTREPLY
    assert r.handle(reply_msg, T0) == []
    bootp = message(INFORM, ciaddr=ip("10.0.0.9"))
    bootp.message_type = None
    assert r.handle(bootp, T0) == []
    assert "plain BOOTP" in notes(r)


def test_size_limit_drops_low_priority_options_but_keeps_provisioning_ones():
    big = {code: bytes(120) for code in (120, 121, 122)}
    r = responder("inform", answer="all", matches=[], options={**big, 66: b"t" * 200, 150: bytes(8), 43: bytes(60)})
    m = only(r.handle(message(INFORM, params=(120, 121, 122, 66, 150, 43), ciaddr=ip("10.0.0.9")), T0)).message
    assert {66, 150, 43} <= set(m.options)
    assert {120, 121, 122}.isdisjoint(m.options)
    assert len(encode(m)) <= 576 - 28
    assert "no room within 576 bytes" in notes(r)
    # A client that accepts more gets everything.
    m = only(r.handle(message(INFORM, params=(120, 121, 122, 66, 150, 43), ciaddr=ip("10.0.0.9"),
                              options={57: struct.pack("!H", 1500)}), T0)).message
    assert {120, 121, 122, 66, 150, 43} <= set(m.options)


# Proxy mode ------------------------------------------------------------------


def test_proxy_offers_options_without_an_address():
    r = responder("proxy")
    reply = only(r.handle(message(DISCOVER, flags=BROADCAST_FLAG), T0))
    m = reply.message
    assert m.message_type == OFFER and m.yiaddr == ZERO
    assert reply.broadcast
    assert m.options[54] == SERVER_IP.packed and m.options[66] == b"yealink.example.com"
    assert 51 not in m.options
    assert m.flags == BROADCAST_FLAG


def test_proxy_acks_requests_naming_it():
    r = responder("proxy")
    m = only(r.handle(message(REQUEST, server_id=SERVER_IP, requested="0.0.0.0"), T0)).message
    assert m.message_type == ACK and m.yiaddr == ZERO and m.options[160] == b"http://prov/y/"


def test_proxy_ignores_other_requests_and_lease_messages():
    r = responder("proxy")
    assert r.handle(message(REQUEST, server_id=OTHER_SERVER, requested="10.0.0.100"), T0) == []
    assert r.handle(message(REQUEST, requested="10.0.0.100"), T0) == []
    assert r.handle(message(RELEASE, ciaddr=ip("10.0.0.100")), T0) == []
    assert "proxy mode gives no addresses" in notes(r)


def test_proxy_answers_inform():
    r = responder("proxy")
    assert only(r.handle(message(INFORM, ciaddr=ip("10.0.0.9")), T0)).message.message_type == ACK


# Server mode -----------------------------------------------------------------


def discover_request(r: Responder, mac: str = YEALINK, when: float = T0):
    offer = only(r.handle(message(DISCOVER, mac=mac), when)).message
    ack = only(r.handle(message(REQUEST, mac=mac, server_id=SERVER_IP, requested=offer.yiaddr), when + 1))
    return offer, ack


def test_server_discover_offers_a_pool_address_with_mandatory_options():
    r = responder("server")
    reply = only(r.handle(message(DISCOVER, params=(66, 150)), T0))
    m = reply.message
    assert m.message_type == OFFER and m.yiaddr == ip("10.0.0.100")
    assert reply.broadcast
    assert struct.unpack("!I", m.options[51])[0] == 600
    assert struct.unpack("!I", m.options[58])[0] == 300
    assert struct.unpack("!I", m.options[59])[0] == 525
    assert m.options[1] == ip("255.255.255.0").packed and m.options[3] == ip("10.0.0.254").packed
    assert 6 not in m.options  # DNS was not asked for
    assert set(m.options) == {54, 51, 58, 59, 1, 3, 66, 150}
    assert "address 10.0.0.100, lease 600 s" in reply.log


def test_server_full_exchange_binds_the_lease():
    r = responder("server")
    offer, ack = discover_request(r)
    assert ack.message.message_type == ACK and ack.message.yiaddr == offer.yiaddr
    assert ack.message.options[66] == b"yealink.example.com"
    assert ack.broadcast
    lease = r.leases.lease_for(YEALINK)
    assert lease.state == BOUND and lease.expires == T0 + 1 + 600
    assert lease.vendor_class == "Yealink SIP-T46S"


def test_server_honours_the_requested_address_in_discover():
    r = responder("server")
    assert only(r.handle(message(DISCOVER, requested="10.0.0.102"), T0)).message.yiaddr == ip("10.0.0.102")


def test_server_renewing_is_acked_to_ciaddr():
    r = responder("server")
    offer, _ = discover_request(r)
    reply = only(r.handle(message(REQUEST, ciaddr=offer.yiaddr), T0 + 300))
    assert reply.message.message_type == ACK and reply.message.yiaddr == offer.yiaddr
    assert reply.message.ciaddr == offer.yiaddr
    assert (reply.address, reply.port) == (offer.yiaddr, 68)
    assert r.leases.lease_for(YEALINK).expires == T0 + 300 + 600
    assert "(renewing)" in reply.log


def test_server_init_reboot_of_a_known_lease():
    r = responder("server")
    offer, _ = discover_request(r)
    reply = only(r.handle(message(REQUEST, requested=offer.yiaddr), T0 + 1000))
    assert reply.message.message_type == ACK and "(init-reboot)" in reply.log


def test_server_selecting_a_wrong_address_is_nakked():
    r = responder("server")
    only(r.handle(message(DISCOVER), T0))
    reply = only(r.handle(message(REQUEST, server_id=SERVER_IP, requested="10.0.0.101"), T0))
    assert reply.message.message_type == NAK and reply.broadcast
    assert reply.message.yiaddr == ZERO
    assert b"not offered to this client" in reply.message.options[56]
    assert set(reply.message.options) == {54, 56}


def test_server_is_silent_for_leases_it_did_not_give():
    r = responder("server")
    # Unknown client, address in the pool and free: another server's business.
    assert r.handle(message(REQUEST, requested="10.0.0.101"), T0) == []
    assert "not a lease this server gave" in notes(r)
    # Address outside the pool: never NAK.
    assert r.handle(message(REQUEST, requested="192.168.1.50"), T0) == []
    assert r.handle(message(REQUEST, ciaddr=ip("192.168.1.50")), T0) == []
    assert "not from this server's pool" in notes(r)


def test_server_naks_an_address_it_knows_belongs_elsewhere():
    r = responder("server")
    discover_request(r, mac=YEALINK)  # 10.0.0.100
    # Another client claims YEALINK's address.
    reply = only(r.handle(message(REQUEST, mac=POLYCOM, requested="10.0.0.100"), T0 + 5))
    assert reply.message.message_type == NAK and b"leased to another client" in reply.message.options[56]
    # YEALINK asks for a different pool address than the one it has here.
    reply = only(r.handle(message(REQUEST, mac=YEALINK, requested="10.0.0.102"), T0 + 5))
    assert reply.message.message_type == NAK and b"address here is 10.0.0.100" in reply.message.options[56]


def test_server_ignores_requests_for_another_server_and_frees_its_offer():
    r = responder("server", pool=[PoolRange(ip("10.0.0.100"), ip("10.0.0.100"))])
    only(r.handle(message(DISCOVER, mac=YEALINK), T0))
    assert r.handle(message(REQUEST, mac=YEALINK, server_id=OTHER_SERVER, requested="172.16.0.5"), T0) == []
    assert "addressed to another server (10.0.0.254)" in notes(r)
    # The single address is free again for another client.
    assert only(r.handle(message(DISCOVER, mac=POLYCOM), T0 + 1)).message.yiaddr == ip("10.0.0.100")


def test_server_release():
    r = responder("server")
    offer, _ = discover_request(r)
    assert r.handle(message(RELEASE, ciaddr=offer.yiaddr, server_id=SERVER_IP), T0 + 10) == []
    assert r.leases.lease_for(YEALINK).state == RELEASED
    assert "released 10.0.0.100" in notes(r)
    # A release for someone else's address or naming another server changes nothing.
    discover_request(r, mac=POLYCOM)
    assert r.handle(message(RELEASE, mac=YEALINK, ciaddr=ip("10.0.0.101")), T0 + 11) == []
    assert r.handle(message(RELEASE, mac=POLYCOM, ciaddr=ip("10.0.0.101"), server_id=OTHER_SERVER), T0 + 11) == []
    assert r.leases.lease_for(POLYCOM).state == BOUND


def test_server_decline_quarantines_and_offers_another_address():
    r = responder("server")
    offer = only(r.handle(message(DISCOVER), T0)).message
    assert r.handle(message(DECLINE, requested=offer.yiaddr, server_id=SERVER_IP), T0 + 1) == []
    assert any(n.level == "warning" and "declined 10.0.0.100" in n.text for n in r.notes)
    assert r.leases.lease_at(offer.yiaddr).state == DECLINED
    assert only(r.handle(message(DISCOVER), T0 + 2)).message.yiaddr == ip("10.0.0.101")


def test_server_pool_exhausted_is_a_warning():
    r = responder("server", pool=[PoolRange(ip("10.0.0.100"), ip("10.0.0.100"))])
    only(r.handle(message(DISCOVER, mac=YEALINK), T0))
    assert r.handle(message(DISCOVER, mac=POLYCOM), T0) == []
    assert any(n.level == "warning" and "pool is exhausted (1 addresses)" in n.text for n in r.notes)


def test_server_non_matching_client_gets_nothing():
    r = responder("server")
    assert r.handle(message(DISCOVER, mac=OTHER, vendor="Android"), T0) == []
    assert r.leases.leases() == []


def test_server_inform_has_no_lease_options():
    r = responder("server")
    m = only(r.handle(message(INFORM, ciaddr=ip("10.0.0.77")), T0)).message
    assert m.yiaddr == ZERO and 51 not in m.options and m.options[1] == ip("255.255.255.0").packed


def test_server_relayed_discover_goes_to_the_relay_with_option_82():
    r = responder("server")
    relay_info = b"\x01\x04port"
    reply = only(r.handle(message(DISCOVER, giaddr=ip("10.0.0.250"), options={82: relay_info}), T0))
    assert (reply.address, reply.port) == (ip("10.0.0.250"), 67)
    assert reply.message.giaddr == ip("10.0.0.250")
    assert reply.message.options[82] == relay_info
    # ... and so is the ACK, and a NAK carries the broadcast flag.
    ack = only(r.handle(message(REQUEST, giaddr=ip("10.0.0.250"), server_id=SERVER_IP,
                                requested=reply.message.yiaddr), T0))
    assert (ack.address, ack.port) == (ip("10.0.0.250"), 67)
    nak = only(r.handle(message(REQUEST, mac=POLYCOM, giaddr=ip("10.0.0.250"), server_id=SERVER_IP,
                                requested="10.0.0.101"), T0))
    assert nak.message.message_type == NAK and nak.message.flags & BROADCAST_FLAG
    assert (nak.address, nak.port) == (ip("10.0.0.250"), 67)


def test_server_ignores_relays_from_other_subnets():
    r = responder("server")
    assert r.handle(message(DISCOVER, giaddr=ip("10.7.0.1")), T0) == []
    assert "outside the pool's subnet 10.0.0.0/24" in notes(r)


def test_server_mode_needs_a_lease_database():
    with pytest.raises(ValueError):
        Responder(config("server"), None, SERVER_IP)


# Rate limiting ---------------------------------------------------------------


def test_rate_limit_per_client():
    r = responder("inform", rate_limit=3)
    inform = message(INFORM, ciaddr=ip("10.0.0.9"))
    assert [len(r.handle(inform, T0 + i)) for i in range(5)] == [1, 1, 1, 0, 0]
    assert any(n.level == "info" and "rate limit: 3 replies in 10 s" in n.text for n in r.notes)
    # Another client is not affected.
    assert len(r.handle(message(INFORM, mac=POLYCOM, vendor="Polycom", ciaddr=ip("10.0.0.8")), T0 + 4)) == 1
    # The window slides.
    assert len(r.handle(inform, T0 + 10.5)) == 1
    assert len(r.handle(inform, T0 + 10.6)) == 0
    assert len(r.handle(inform, T0 + 12.1)) == 1


def test_rate_limit_zero_means_unlimited():
    r = responder("inform", rate_limit=0)
    inform = message(INFORM, ciaddr=ip("10.0.0.9"))
    assert all(len(r.handle(inform, T0)) == 1 for _ in range(50))


def test_rate_limit_table_is_pruned():
    r = responder("inform", rate_limit=2, answer="all")
    for i in range(4200):
        mac = f"02{i:010x}"
        r.handle(message(INFORM, mac=mac, vendor=None, ciaddr=ip("10.0.0.9")), T0 + i * 0.01)
    assert len(r._sent) < 4200


# The service's datagram path, with a fake port and clock (no sockets) --------

from twisted.internet.task import Clock  # noqa: E402

from zprovd.dhcp.leases import LEASE_FILE_NAME, read_lease_file  # noqa: E402
from zprovd.dhcp.service import DHCPService, DHCPStartError  # noqa: E402


class FakePort:
    def __init__(self, fail: bool = False):
        self.sent: list[tuple[bytes, tuple[str, int]]] = []
        self.fail = fail
        self.stopped = False

    def write(self, data: bytes, address: tuple[str, int]) -> None:
        if self.fail:
            raise OSError(101, "Network is unreachable")
        self.sent.append((data, address))

    def stopListening(self) -> None:
        self.stopped = True


def wired_service(tmp_path, mode: str = "inform", port: FakePort | None = None) -> DHCPService:
    """A DHCPService as startService would leave it, minus the socket."""
    cfg = config(mode)
    clock = Clock()
    clock.advance(T0)
    service = DHCPService(cfg, tmp_path, reactor=clock)
    if mode == "server":
        service.leases = LeaseDatabase(cfg.pool, cfg.lease_time, tmp_path / LEASE_FILE_NAME, reserved=[SERVER_IP])
    service.responder = Responder(cfg, service.leases, SERVER_IP)
    service.port = port or FakePort()
    return service


def test_service_counts_malformed_datagrams_and_never_raises(tmp_path):
    service = wired_service(tmp_path)
    for junk in (b"", b"\x01" * 100, bytes(236) + b"\x63\x82\x53\x63" + bytes([53, 9])):
        service.datagram_received(junk, ("10.0.0.9", 68))
    assert service.stats["malformed"] == 3 and service.stats["received"] == 3
    assert service.port.sent == []


def test_service_sends_replies_where_the_responder_says(tmp_path):
    service = wired_service(tmp_path)
    service.datagram_received(encode(message(INFORM, ciaddr=ip("10.0.0.50"))), ("10.0.0.50", 68))
    [(data, address)] = service.port.sent
    assert address == ("10.0.0.50", 68)
    assert decode(data).message_type == ACK
    assert service.stats["replies"] == 1
    service.datagram_received(encode(message(INFORM, mac=OTHER, vendor="x", ciaddr=ip("10.0.0.51"))), ("x", 68))
    assert service.stats["ignored"] == 1 and len(service.port.sent) == 1


def test_service_saves_leases_within_a_second_of_a_change(tmp_path):
    service = wired_service(tmp_path, "server")
    service.datagram_received(encode(message(DISCOVER)), ("0.0.0.0", 68))
    [(data, address)] = service.port.sent
    assert address == ("255.255.255.255", 68)
    offer = decode(data)
    service.datagram_received(
        encode(message(REQUEST, server_id=SERVER_IP, requested=offer.yiaddr)), ("0.0.0.0", 68))
    assert not (tmp_path / LEASE_FILE_NAME).exists()  # coalesced: not one write per reply
    service.reactor.advance(service.save_delay)
    leases, _ = read_lease_file(tmp_path / LEASE_FILE_NAME)
    assert [(l.mac, l.state, l.ip) for l in leases] == [(YEALINK, BOUND, offer.yiaddr)]
    # Expiry runs on the service's clock and is saved too.
    service.reactor.advance(601)
    service._expire()
    service.reactor.advance(service.save_delay)
    leases, _ = read_lease_file(tmp_path / LEASE_FILE_NAME)
    assert [l.state for l in leases] == ["expired"]


def test_service_survives_send_and_save_errors(tmp_path, monkeypatch):
    service = wired_service(tmp_path, "server", port=FakePort(fail=True))

    def failing_write(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("zprovd.dhcp.service.write_atomically", failing_write)
    service.datagram_received(encode(message(DISCOVER)), ("0.0.0.0", 68))
    offered = service.leases.lease_for(YEALINK).ip
    service.datagram_received(encode(message(REQUEST, server_id=SERVER_IP, requested=offered)), ("0.0.0.0", 68))
    service.reactor.advance(service.save_delay)
    assert service.stats["send_errors"] == 2 and service.stats["save_errors"] == 1
    assert service.leases.dirty  # retried at the next change


def test_service_stop_saves_and_closes(tmp_path):
    service = wired_service(tmp_path, "server")
    service.leases.commit(YEALINK, service.leases.offer(YEALINK, T0).ip, T0)
    port = service.port
    service.stopService()
    assert port.stopped and (tmp_path / LEASE_FILE_NAME).exists()


def test_service_start_errors_are_one_line(tmp_path):
    with pytest.raises(DHCPStartError, match="interface is not set"):
        DHCPService(config("inform", interface=""), tmp_path, reactor=Clock()).startService()
    with pytest.raises(DHCPStartError, match="interface zpt-nosuch0 does not exist or has no IPv4 address"):
        DHCPService(config("inform", interface="zpt-nosuch0"), tmp_path, reactor=Clock()).startService()


def test_service_refuses_an_unreadable_lease_file(tmp_path):
    (tmp_path / LEASE_FILE_NAME).write_text("{broken")
    service = DHCPService(config("server", server_address=SERVER_IP), tmp_path, reactor=Clock())
    with pytest.raises(DHCPStartError, match="not a lease file .*move it away"):
        service.startService()
    assert not service.running


# Logging: replies at debug, a summary at info ------------------------------------

import os  # noqa: E402
import socket  # noqa: E402

from twisted.logger import LogLevel, Logger, formatEvent  # noqa: E402

from zprovd.dhcp import service as service_module  # noqa: E402


@pytest.fixture
def events(monkeypatch):
    captured: list[dict] = []
    monkeypatch.setattr(service_module, "log", Logger(namespace="zprovd.dhcp", observer=captured.append))
    return captured


def info_lines(events) -> list[str]:
    return [formatEvent(e) for e in events if e["log_level"] >= LogLevel.info]


def test_replies_are_logged_at_debug_and_summed_up_at_info(tmp_path, events):
    service = wired_service(tmp_path, "server")
    service._start_summary()
    service.datagram_received(encode(message(DISCOVER)), ("0.0.0.0", 68))
    offer = decode(service.port.sent[-1][0])
    service.datagram_received(
        encode(message(REQUEST, server_id=SERVER_IP, requested=offer.yiaddr)), ("0.0.0.0", 68))
    service.datagram_received(encode(message(DISCOVER, mac=OTHER, vendor="x")), ("0.0.0.0", 68))  # no match
    service.datagram_received(b"junk", ("10.0.0.9", 68))
    replies = [formatEvent(e) for e in events if "DHCPOFFER to" in formatEvent(e) or "DHCPACK to" in formatEvent(e)]
    assert len(replies) == 2
    assert all(e["log_level"] == LogLevel.debug for e in events if formatEvent(e) in replies)
    assert info_lines(events) == []
    service.reactor.advance(service.summary_interval)
    assert info_lines(events) == [
        "DHCP: last 10 s: received 4; replies 1 DHCPACK, 1 DHCPOFFER; ignored 1; malformed 1"]
    # Nothing happened since: no line.
    service.reactor.advance(service.summary_interval * 3)
    assert len(info_lines(events)) == 1
    service.datagram_received(encode(message(INFORM, ciaddr=ip("10.0.0.50"))), ("10.0.0.50", 68))
    service.reactor.advance(service.summary_interval)
    assert info_lines(events)[1] == "DHCP: last 10 s: received 1; replies 1 DHCPACK"
    # /metrics keeps the totals.
    assert dict(service.replies_by_type) == {"DHCPOFFER": 1, "DHCPACK": 2}


def test_summary_counts_send_errors(tmp_path, events):
    service = wired_service(tmp_path, "inform", port=FakePort(fail=True))
    service._start_summary()
    service.datagram_received(encode(message(INFORM, ciaddr=ip("10.0.0.50"))), ("10.0.0.50", 68))
    service.reactor.advance(service.summary_interval)
    assert info_lines(events)[-1] == "DHCP: last 10 s: received 1; replies 0; send errors 1"


def test_summary_stops_with_the_service_after_a_last_line(tmp_path, events):
    service = wired_service(tmp_path, "inform")
    service._start_summary()
    service.reactor.advance(4)
    service.datagram_received(encode(message(INFORM, ciaddr=ip("10.0.0.50"))), ("10.0.0.50", 68))
    service.reactor.advance(2)
    service.stopService()
    assert info_lines(events) == ["DHCP: last 6 s: received 1; replies 1 DHCPACK"]
    assert service.reactor.getDelayedCalls() == []  # nothing left scheduled
    service.reactor.advance(100)
    assert len(info_lines(events)) == 1


def test_summary_reports_datagrams_the_kernel_dropped(tmp_path, events, monkeypatch):
    class PortWithFd(FakePort):
        def fileno(self):
            return 7

    drops = iter([0, 5, 5, 12])
    monkeypatch.setattr(service_module, "socket_drops", lambda fd: next(drops) if fd == 7 else None)
    service = wired_service(tmp_path, "inform", port=PortWithFd())
    service._start_summary()
    for _ in range(4):
        service.datagram_received(b"junk", ("10.0.0.9", 68))
        service.reactor.advance(service.summary_interval)
    assert info_lines(events) == [
        "DHCP: last 10 s: received 1; replies 0; malformed 1",
        "DHCP: last 10 s: received 1; replies 0; malformed 1; dropped by the kernel (receive buffer full) 5",
        "DHCP: last 10 s: received 1; replies 0; malformed 1",
        "DHCP: last 10 s: received 1; replies 0; malformed 1; dropped by the kernel (receive buffer full) 7",
    ]
    assert service.stats["kernel_drops"] == 12


# The socket: receive buffer and drop counter -------------------------------------


def test_set_receive_buffer_grows_the_buffer_and_reports_it():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        small = service_module.receive_buffer_size(sock)
        granted = service_module.set_receive_buffer(sock, 1024 * 1024)
        assert granted == service_module.receive_buffer_size(sock)
        assert granted > small  # how much more depends on net.core.rmem_max and privileges


def test_set_receive_buffer_ignores_failures():
    class Refusing:
        def setsockopt(self, *args):
            raise OSError(1, "Operation not permitted")

        def getsockopt(self, *args):
            return 2 * 212992

    assert service_module.set_receive_buffer(Refusing(), 4 * 1024 * 1024) == 212992


def test_socket_drops_reads_the_drop_counter(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        inode = os.fstat(sock.fileno()).st_ino
        table = tmp_path / "udp"
        table.write_text(
            "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n"
            "   1: 00000000:0044 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 3\n"
            f"   2: 00000000:0043 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 {inode} 2 0000000000000000 42\n"
        )
        assert service_module.socket_drops(sock.fileno(), str(table)) == 42
        table.write_text(table.read_text().splitlines()[0] + "\n")
        assert service_module.socket_drops(sock.fileno(), str(table)) is None
        assert service_module.socket_drops(sock.fileno(), str(tmp_path / "missing")) is None
    assert service_module.socket_drops(9999) is None  # not an open descriptor


def test_socket_drops_counts_real_drops_on_loopback():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)  # the kernel's minimum
        receiver.bind(("127.0.0.1", 0))
        if service_module.socket_drops(receiver.fileno()) is None:
            pytest.skip("no /proc/net/udp here")
        assert service_module.socket_drops(receiver.fileno()) == 0
        for _ in range(200):
            sender.sendto(bytes(1000), receiver.getsockname())
        drops = service_module.socket_drops(receiver.fileno())
        assert drops is not None and drops > 0


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_BINDTODEVICE and SO_RCVBUFFORCE need root")
def test_dhcp_socket_gets_a_large_receive_buffer():
    with service_module.open_dhcp_socket("lo", 0) as sock:
        assert service_module.receive_buffer_size(sock) >= service_module.RECEIVE_BUFFER
    with service_module.open_dhcp_socket("lo", 0, receive_buffer=0) as sock:
        assert service_module.receive_buffer_size(sock) < service_module.RECEIVE_BUFFER
