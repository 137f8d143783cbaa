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


# The struct encoder and decoder against scapy ----------------------------------
#
# encode() and decode() used scapy's BOOTP and DHCP layers; they now use
# struct.  The scapy versions are kept here as the reference: same bytes
# out of encode, same message (or MalformedPacket) out of decode.

from scapy.layers.dhcp import DHCPOptions, dhcpmagic  # noqa: E402

from zprovd.dhcp.packets import BOOTREPLY, BOOTREQUEST, HEADER_LENGTH, MIN_MESSAGE_LENGTH  # noqa: E402
from zprovd.dhcp.packets import _HEADER, _parse_options  # noqa: E402


def scapy_encode(msg: DHCPMessage) -> bytes:
    """encode() as it was written with scapy."""
    bootp = BOOTP(
        op=msg.op, htype=1, hlen=6, hops=msg.hops, xid=msg.xid, secs=msg.secs, flags=msg.flags,
        ciaddr=str(msg.ciaddr), yiaddr=str(msg.yiaddr), siaddr=str(msg.siaddr), giaddr=str(msg.giaddr),
        chaddr=bytes.fromhex(msg.chaddr) + bytes(10), options=dhcpmagic,
    )
    items: list = []
    if msg.message_type is not None:
        items.append((53, bytes([msg.message_type])))
    for code in sorted(msg.options, key=lambda code: (code != 54, code)):
        if code in (0, 53, 255):
            continue
        value = msg.options[code]
        items.extend([(code, value[i : i + 255]) for i in range(0, len(value), 255)] or [(code, b"")])
    items.append("end")
    data = bytes(bootp / DHCP(options=items))
    return data + bytes(max(0, MIN_MESSAGE_LENGTH - len(data)))


def scapy_decode(data: bytes) -> DHCPMessage:
    """decode() as it was written with scapy (the header through BOOTP)."""
    try:
        if len(data) < 240 or len(data) > 65507 or data[236:240] != dhcpmagic:
            raise MalformedPacket("header")
        bootp = BOOTP(data[:240])
        if bootp.op not in (1, 2) or bootp.htype != 1 or bootp.hlen != 6:
            raise MalformedPacket("header")
        options = _parse_options(data[240:], "options")
        overload = options.get(52)
        if overload is not None:
            if len(overload) != 1 or overload[0] not in (1, 2, 3):
                raise MalformedPacket("overload")
            extra: dict[int, bytes] = {}
            for bit, field in ((1, bytes(bootp.file)), (2, bytes(bootp.sname))):
                if overload[0] & bit:
                    for code, value in _parse_options(field, "field").items():
                        extra[code] = extra.get(code, b"") + value
            for code, value in extra.items():
                options[code] = options.get(code, b"") + value
            del options[52]
        type_data = options.pop(53, None)
        if type_data is not None and (len(type_data) != 1 or not 1 <= type_data[0] <= 18):
            raise MalformedPacket("type")
        if any(code in options and len(options[code]) != 4 for code in (50, 54)):
            raise MalformedPacket("50/54")
        return DHCPMessage(
            op=bootp.op, xid=bootp.xid, chaddr=bytes(bootp.chaddr)[:6].hex(),
            message_type=None if type_data is None else type_data[0], flags=int(bootp.flags),
            ciaddr=IPv4Address(bootp.ciaddr), yiaddr=IPv4Address(bootp.yiaddr), siaddr=IPv4Address(bootp.siaddr),
            giaddr=IPv4Address(bootp.giaddr), hops=bootp.hops, secs=bootp.secs, options=options,
        )
    except MalformedPacket:
        raise
    except Exception as exc:
        raise MalformedPacket(str(exc)) from None


addresses = st.integers(min_value=0, max_value=2**32 - 1).map(IPv4Address)
values = st.one_of(  # short ones mostly, but long ones (split in 255-byte pieces) often enough
    st.binary(max_size=40), st.integers(min_value=250, max_value=700).flatmap(lambda n: st.binary(min_size=n, max_size=n))
)
option_codes = st.integers(min_value=0, max_value=255)
messages = st.builds(
    DHCPMessage,
    op=st.sampled_from([BOOTREQUEST, BOOTREPLY]),
    xid=st.integers(min_value=0, max_value=2**32 - 1),
    chaddr=st.binary(min_size=6, max_size=6).map(bytes.hex),
    message_type=st.one_of(st.none(), st.integers(min_value=1, max_value=18)),
    flags=st.integers(min_value=0, max_value=0xFFFF),
    ciaddr=addresses, yiaddr=addresses, siaddr=addresses, giaddr=addresses,
    hops=st.integers(min_value=0, max_value=255),
    secs=st.integers(min_value=0, max_value=0xFFFF),
    options=st.dictionaries(option_codes, values, max_size=10),
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_encode_gives_the_bytes_scapy_gave(msg):
    assert encode(msg) == scapy_encode(msg)


def decodable(msg: DHCPMessage) -> DHCPMessage:
    """``msg`` with what decode() gives back: no 0/52/53/255 options, 50 and 54 four bytes."""
    options = {c: v for c, v in msg.options.items() if c not in (0, 52, 53, 255)}
    for code in (50, 54):
        if code in options:
            options[code] = (options[code] + bytes(4))[:4]
    msg.options = options
    return msg


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages.map(decodable))
def test_decode_of_encode_is_the_message(msg):
    assert decode(encode(msg)) == msg


# Options scapy keeps as raw bytes (no type of its own to parse them into).
UNTYPED = sorted(c for c in range(1, 255) if c not in DHCPOptions or isinstance(DHCPOptions[c], str))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    messages,
    st.dictionaries(st.sampled_from(UNTYPED), values, max_size=8),
    st.one_of(st.none(), addresses),
)
def test_scapy_reads_our_replies(msg, options, server_id):
    msg.options = dict(options)
    if server_id is not None:
        msg.options[54] = server_id.packed
    parsed = BOOTP(encode(msg))
    assert (parsed.op, parsed.htype, parsed.hlen, parsed.xid, parsed.flags, parsed.hops, parsed.secs) == (
        msg.op, 1, 6, msg.xid, msg.flags, msg.hops, msg.secs)
    assert [parsed.ciaddr, parsed.yiaddr, parsed.siaddr, parsed.giaddr] == [
        str(msg.ciaddr), str(msg.yiaddr), str(msg.siaddr), str(msg.giaddr)]
    assert bytes(parsed.chaddr) == bytes.fromhex(msg.chaddr) + bytes(10)
    assert bytes(parsed.sname) == bytes(64) and bytes(parsed.file) == bytes(128)
    expected: list = []
    if msg.message_type is not None:
        expected.append(("message-type", msg.message_type))
    if server_id is not None:
        expected.append(("server_id", str(server_id)))
    for code, value in sorted(options.items()):
        name = DHCPOptions.get(code, code)
        expected += [(name, value[i : i + 255]) for i in range(0, len(value), 255)] or [(name, b"")]
    items = [item for item in parsed[DHCP].options if item != "pad"]
    assert items == [*expected, "end"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages.map(decodable))
def test_decode_reads_what_scapy_builds(msg):
    data = scapy_encode(msg)
    assert decode(data) == scapy_decode(data) == msg


option_bytes = st.lists(st.one_of(
    st.tuples(st.integers(1, 254).filter(lambda c: c not in (50, 52, 53, 54)), st.binary(max_size=20)).map(
        lambda t: bytes([t[0], len(t[1])]) + t[1]),
    st.sampled_from([bytes([53, 1, 1]), bytes([54, 4, 10, 0, 0, 1]), bytes([52, 1, 1]), b"\xff", b"\0"]),
    st.binary(max_size=5),
), max_size=8).map(b"".join)


@st.composite
def datagrams(draw):
    """Valid headers with arbitrary fields, options, sname and file; sometimes a bad header, mutated or cut bytes."""
    valid = draw(st.integers(0, 3)) > 0
    header = struct.pack(
        "!BBBBIHH4s4s4s4s16s64s128s",
        draw(st.sampled_from([1, 2] if valid else [0, 1, 2, 3])),
        draw(st.sampled_from([1] if valid else [1, 6])),
        draw(st.sampled_from([6] if valid else [6, 16])),
        draw(st.integers(0, 255)), draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 0xFFFF)),
        draw(st.integers(0, 0xFFFF)), *(draw(st.binary(min_size=4, max_size=4)) for _ in range(4)),
        draw(st.binary(max_size=16)),
        draw(st.one_of(option_bytes.filter(lambda b: len(b) <= 64), st.binary(max_size=64))),
        draw(st.one_of(option_bytes.filter(lambda b: len(b) <= 128), st.binary(max_size=128))),
    )
    overload = draw(st.sampled_from([b"", b"", bytes([52, 1, 1]), bytes([52, 1, 2]), bytes([52, 1, 3])]))
    data = bytearray(header + (dhcpmagic if valid else draw(st.sampled_from([dhcpmagic, b"abcd"])))
                     + overload + draw(option_bytes))
    if not valid:
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)),
                                             max_size=3)):
            data[position] = value
        return bytes(data[: draw(st.integers(0, len(data)))])
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(datagrams())
def test_decode_agrees_with_scapy_on_anything(data):
    try:
        expected = scapy_decode(data)
    except MalformedPacket:
        with pytest.raises(MalformedPacket):
            decode(data)
        return
    assert decode(data) == expected


def test_header_layout():
    assert HEADER_LENGTH == 236 == _HEADER.size
    data = encode(DHCPMessage(op=2, xid=0x01020304, chaddr="0a0b0c0d0e0f", message_type=None, flags=0x8000,
                              ciaddr=IPv4Address("1.2.3.4"), yiaddr=IPv4Address("5.6.7.8"),
                              siaddr=IPv4Address("9.10.11.12"), giaddr=IPv4Address("13.14.15.16"), hops=3, secs=258))
    assert data[:28] == bytes([2, 1, 6, 3, 1, 2, 3, 4, 1, 2, 0x80, 0]) + bytes(range(1, 17))
    assert data[28:44] == bytes.fromhex("0a0b0c0d0e0f") + bytes(10)
    assert data[44:236] == bytes(192)
    assert data[236:241] == dhcpmagic + b"\xff"
    assert len(data) == MIN_MESSAGE_LENGTH and data[241:] == bytes(59)
