"""Decoding and encoding DHCP messages."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from zprovd.dhcp.packets import (
    ACK,
    DISCOVER,
    INFORM,
    OFFER,
    DHCPMessage,
    MalformedPacket,
    decode,
    describe_option,
    describe_options,
    encode,
    encoded_options_length,
    redact,
)

MAGIC = b"\x63\x82\x53\x63"


def raw_message(options: bytes, *, op: int = 1, htype: int = 1, hlen: int = 6, sname: bytes = b"",
                file: bytes = b"", chaddr: bytes = bytes.fromhex("001565aabbcc")) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s", op, htype, hlen, 0, 0xDEADBEEF, 3, 0x8000,
                         bytes(4), bytes(4), bytes(4), bytes([10, 0, 0, 1]))
    return header + chaddr.ljust(16, b"\0") + sname.ljust(64, b"\0") + file.ljust(128, b"\0") + MAGIC + options


def test_decode_a_scapy_built_discover():
    packet = BOOTP(op=1, xid=0x1234, chaddr=bytes.fromhex("001565aabbcc") + bytes(10), flags=0x8000) / DHCP(
        options=[
            ("message-type", "discover"),
            ("param_req_list", [1, 3, 66, 150, 160]),
            ("vendor_class_id", b"Yealink SIP-T46S 66.86.0.15"),
            ("client_id", b"\x01\x00\x15\x65\xaa\xbb\xcc"),
            ("hostname", b"phone1"),
            ("requested_addr", "10.0.0.7"),
            ("max_dhcp_size", 1500),
            "end",
        ]
    )
    msg = decode(bytes(packet))
    assert msg.op == 1 and msg.xid == 0x1234
    assert msg.chaddr == "001565aabbcc"
    assert msg.message_type == DISCOVER and msg.type_name == "DHCPDISCOVER"
    assert msg.broadcast
    assert msg.requested_params == [1, 3, 66, 150, 160]
    assert msg.vendor_class == "Yealink SIP-T46S 66.86.0.15"
    assert msg.client_id == b"\x01\x00\x15\x65\xaa\xbb\xcc"
    assert msg.hostname == "phone1"
    assert msg.requested_ip == IPv4Address("10.0.0.7")
    assert msg.server_id is None
    assert msg.max_message_size == 1500
    assert 53 not in msg.options


def test_decode_from_a_full_frame_payload():
    frame = Ether() / IP() / UDP(sport=68, dport=67) / BOOTP(chaddr=b"\x00\x04\xf2\x01\x02\x03") / DHCP(
        options=[("message-type", "inform"), "end"]
    )
    msg = decode(bytes(frame[UDP].payload))
    assert msg.message_type == INFORM and msg.chaddr == "0004f2010203"


def test_round_trip():
    msg = DHCPMessage(
        op=2, xid=77, chaddr="0004f2aabbcc", message_type=OFFER, flags=0x8000,
        ciaddr=IPv4Address("0.0.0.0"), yiaddr=IPv4Address("10.0.0.100"), giaddr=IPv4Address("10.9.0.1"),
        options={54: bytes([10, 0, 0, 1]), 66: b"tftp.example.com", 150: bytes([10, 0, 0, 2, 10, 0, 0, 3]),
                 160: b"http://x/", 43: b"\x01\x02ab", 200: b""},
    )
    data = encode(msg)
    assert len(data) >= 300
    assert decode(data) == msg


def test_encoded_reply_is_readable_by_scapy_and_ordered():
    msg = DHCPMessage(op=2, xid=1, chaddr="001565aabbcc", message_type=ACK,
                      options={66: b"t", 54: bytes([10, 0, 0, 1]), 1: bytes([255, 255, 255, 0])})
    data = encode(msg)
    parsed = BOOTP(data)
    options = parsed[DHCP].options
    assert options[0] == ("message-type", 5)
    assert options[1] == ("server_id", "10.0.0.1")
    assert options[2] == ("subnet_mask", "255.255.255.0")
    assert parsed.chaddr[:6] == bytes.fromhex("001565aabbcc")
    assert MAGIC + bytes([53, 1, 5, 54, 4]) in data


def test_long_option_is_split_and_concatenated_back():
    msg = DHCPMessage(op=2, xid=1, chaddr="001565aabbcc", message_type=ACK, options={43: bytes(range(256)) * 2})
    data = encode(msg)
    assert data.count(bytes([43, 255])) == 2
    assert decode(data).options[43] == bytes(range(256)) * 2
    assert encoded_options_length({43: bytes(512)}) == 512 + 6


def test_repeated_options_are_concatenated():
    options = bytes([53, 1, 1, 12, 3]) + b"abc" + bytes([12, 2]) + b"de" + b"\xff"
    assert decode(raw_message(options)).hostname == "abcde"


def test_pad_options_and_missing_end_are_tolerated():
    msg = decode(raw_message(bytes([0, 0, 53, 1, 8, 0, 60, 2]) + b"ab"))
    assert msg.message_type == INFORM and msg.vendor_class == "ab"


def test_option_overload_reads_file_and_sname():
    file_options = bytes([66, 3]) + b"tft" + b"\xff"
    sname_options = bytes([67, 2]) + b"bf" + b"\xff"
    msg = decode(raw_message(bytes([53, 1, 1, 52, 1, 3, 255]), file=file_options, sname=sname_options))
    assert msg.options == {66: b"tft", 67: b"bf"}


def test_bootp_without_message_type():
    msg = decode(raw_message(b"\xff"))
    assert msg.message_type is None and msg.type_name == "BOOTP"


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "too short"),
        (raw_message(b"")[:239], "too short"),
        (raw_message(b"")[:236] + b"abcd", "no DHCP magic cookie"),
        (raw_message(b"\xff", op=3), "op 3"),
        (raw_message(b"\xff", htype=6), "not Ethernet"),
        (raw_message(b"\xff", hlen=16), "not Ethernet"),
        (raw_message(bytes([53, 1])), "truncated"),
        (raw_message(bytes([53])), "has no length"),
        (raw_message(bytes([53, 2, 1, 1, 255])), "bad message type"),
        (raw_message(bytes([53, 1, 0, 255])), "bad message type"),
        (raw_message(bytes([53, 1, 1, 50, 3, 1, 2, 3, 255])), "option 50 must be 4 bytes"),
        (raw_message(bytes([53, 1, 3, 54, 5, 1, 2, 3, 4, 5, 255])), "option 54 must be 4 bytes"),
        (raw_message(bytes([53, 1, 1, 52, 1, 9, 255])), "bad option overload"),
        (raw_message(bytes([53, 1, 1, 52, 1, 1, 255]), file=bytes(125) + bytes([66, 9, 1])), "in the file field is truncated"),
        (bytes(70000), "too long"),
    ],
)
def test_malformed(data, reason):
    with pytest.raises(MalformedPacket, match=reason):
        decode(data)


def test_malformed_is_a_value_error():
    assert issubclass(MalformedPacket, ValueError)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=700))
def test_arbitrary_bytes_only_raise_malformed(data):
    try:
        msg = decode(data)
    except MalformedPacket:
        return
    assert isinstance(msg, DHCPMessage)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400), st.integers(min_value=1, max_value=2))
def test_arbitrary_options_after_a_valid_header_only_raise_malformed(options, op):
    try:
        msg = decode(raw_message(options, op=op))
    except MalformedPacket:
        return
    # Whatever decodes must encode again without error.
    encode(msg)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=240, max_size=600), st.integers(min_value=0, max_value=599), st.integers(0, 255))
def test_mutated_valid_message_only_raises_malformed(_, position, value):
    base = bytearray(raw_message(bytes([53, 1, 1, 55, 3, 1, 3, 66, 60, 3]) + b"abc" + b"\xff"))
    if position < len(base):
        base[position] = value
    try:
        decode(bytes(base))
    except MalformedPacket:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.integers(min_value=1, max_value=254).filter(lambda c: c not in (52, 53)),
        st.binary(max_size=600),
        max_size=8,
    ),
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_round_trip_any_options(options, xid):
    for code in (50, 54):  # these must be 4 bytes to decode
        if code in options:
            options[code] = (options[code] + bytes(4))[:4]
    msg = DHCPMessage(op=2, xid=xid, chaddr="020000000001", message_type=ACK, options=options)
    assert decode(encode(msg)) == msg


def test_describe_options():
    assert describe_option(66, b"tftp.example.com") == "66(tftp-server-name)=tftp.example.com"
    assert describe_option(150, bytes([10, 0, 0, 1, 10, 0, 0, 2])) == "150(tftp-server-address)=10.0.0.1,10.0.0.2"
    assert describe_option(1, bytes([255, 255, 255, 0])) == "1(subnet-mask)=255.255.255.0"
    assert describe_option(43, b"\x01\x02ab") == "43(vendor-encapsulated-options)=hex:01026162"
    assert describe_option(51, struct.pack("!I", 3600)) == "51=3600"
    assert describe_option(55, bytes([1, 3, 66])) == "55=1,3,66"
    assert describe_option(200, b"\x00\x01") == "200=hex:0001"
    assert describe_options({66: b"a", 54: bytes(4)}, skip=(54,)) == "66(tftp-server-name)=a"


def test_urls_with_credentials_are_redacted_in_logs():
    assert redact("https://admin:secret@prov.example.com/x") == "https://***@prov.example.com/x"
    assert describe_option(160, b"http://u:p@h/") == "160(provisioning-url)=http://***@h/"
    assert redact("http://prov.example.com/") == "http://prov.example.com/"
