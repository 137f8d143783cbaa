"""DHCP messages: decode datagrams into ``DHCPMessage`` and encode replies.

scapy's ``BOOTP`` layer reads and writes the fixed BOOTP header and its
``DHCP`` layer writes the options.  Options are read here from the raw
option bytes into ``{code: bytes}`` rather than through scapy's typed
option table, for three reasons: scapy stops decoding at the first option
whose length does not fit its type (hiding every option after it), it
names some vendor codes in its own way (150 is ``tftp_server_address``,
160 ``v4-captive-portal``), and the responder wants the exact bytes.
Options repeated in one message are concatenated (RFC 3396) and option
overload (52) is honoured.

``decode()`` raises ``MalformedPacket`` and nothing else, whatever the
input: it is exposed to every datagram that reaches port 67.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Iterable

from scapy.layers.dhcp import BOOTP, DHCP, dhcpmagic

from zprovd.dhcp.config import OPTIONS_BY_CODE, option_label
from zprovd.mac import format_mac

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_TYPES: dict[int, str] = {
    DISCOVER: "DHCPDISCOVER",
    OFFER: "DHCPOFFER",
    REQUEST: "DHCPREQUEST",
    DECLINE: "DHCPDECLINE",
    ACK: "DHCPACK",
    NAK: "DHCPNAK",
    RELEASE: "DHCPRELEASE",
    INFORM: "DHCPINFORM",
}
BOOTREQUEST, BOOTREPLY = 1, 2
BROADCAST_FLAG = 0x8000
ZERO = IPv4Address(0)

HEADER_LENGTH = 236          # the fixed BOOTP header, up to and excluding the magic cookie
MIN_MESSAGE_LENGTH = 300     # BOOTP's historical minimum; some clients drop shorter replies
MAX_DATAGRAM = 65507


class MalformedPacket(ValueError):
    """The datagram is not a DHCP message this server can read."""


@dataclass
class DHCPMessage:
    """One DHCP message.  ``message_type`` is option 53, kept out of ``options``."""

    op: int
    xid: int
    chaddr: str
    """The client's MAC, canonical (12 lowercase hex digits)."""
    message_type: int | None
    flags: int = 0
    ciaddr: IPv4Address = ZERO
    yiaddr: IPv4Address = ZERO
    siaddr: IPv4Address = ZERO
    giaddr: IPv4Address = ZERO
    hops: int = 0
    secs: int = 0
    options: dict[int, bytes] = field(default_factory=dict)

    # Derived views of common options -------------------------------------

    @property
    def type_name(self) -> str:
        if self.message_type is None:
            return "BOOTP"
        return MESSAGE_TYPES.get(self.message_type, f"DHCP type {self.message_type}")

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & BROADCAST_FLAG)

    @property
    def requested_params(self) -> list[int]:
        """Option 55, in the client's order; empty if absent."""
        return list(self.options.get(55, b""))

    @property
    def vendor_class(self) -> str | None:
        """Option 60 as text (undecodable bytes replaced), or None."""
        data = self.options.get(60)
        return None if data is None else data.decode("utf-8", "replace")

    @property
    def client_id(self) -> bytes | None:
        return self.options.get(61)

    @property
    def hostname(self) -> str | None:
        data = self.options.get(12)
        return None if data is None else data.decode("utf-8", "replace")

    @property
    def requested_ip(self) -> IPv4Address | None:
        return _address_option(self.options.get(50))

    @property
    def server_id(self) -> IPv4Address | None:
        return _address_option(self.options.get(54))

    @property
    def max_message_size(self) -> int | None:
        data = self.options.get(57)
        return struct.unpack("!H", data)[0] if data is not None and len(data) == 2 else None

    def ip_list(self, code: int) -> list[IPv4Address]:
        """An option holding IPv4 addresses, decoded; empty if absent or ill-sized."""
        return ip_list(self.options.get(code, b""))


def _address_option(data: bytes | None) -> IPv4Address | None:
    if data is None or len(data) != 4:
        return None
    return IPv4Address(data)


def ip_list(data: bytes) -> list[IPv4Address]:
    if not data or len(data) % 4:
        return []
    return [IPv4Address(data[i : i + 4]) for i in range(0, len(data), 4)]


# --------------------------------------------------------------------------
# Decoding.


def decode(data: bytes) -> DHCPMessage:
    """Decode one datagram; raise ``MalformedPacket`` for anything unusable."""
    try:
        return _decode(bytes(data))
    except MalformedPacket:
        raise
    except Exception as exc:  # scapy or struct on hostile input: one error type out
        raise MalformedPacket(f"cannot decode: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes) -> DHCPMessage:
    if len(data) < HEADER_LENGTH + len(dhcpmagic):
        raise MalformedPacket(f"too short for DHCP ({len(data)} bytes)")
    if len(data) > MAX_DATAGRAM:
        raise MalformedPacket(f"too long ({len(data)} bytes)")
    if data[HEADER_LENGTH : HEADER_LENGTH + 4] != dhcpmagic:
        raise MalformedPacket("no DHCP magic cookie")
    bootp = BOOTP(data[: HEADER_LENGTH + 4])
    if bootp.op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"op {bootp.op} is neither BOOTREQUEST nor BOOTREPLY")
    if bootp.htype != 1 or bootp.hlen != 6:
        raise MalformedPacket(f"hardware type {bootp.htype}/length {bootp.hlen} is not Ethernet")
    chaddr = bytes(bootp.chaddr)[:6].hex()

    options = _parse_options(data[HEADER_LENGTH + 4 :], "options")
    overload = options.get(52)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket("bad option overload (52)")
        extra: dict[int, bytes] = {}
        if overload[0] & 1:
            _merge(extra, _parse_options(bytes(bootp.file), "file field"))
        if overload[0] & 2:
            _merge(extra, _parse_options(bytes(bootp.sname), "sname field"))
        _merge(options, extra)
        del options[52]

    message_type: int | None = None
    type_data = options.pop(53, None)
    if type_data is not None:
        if len(type_data) != 1 or not 1 <= type_data[0] <= 18:
            raise MalformedPacket("bad message type (53)")
        message_type = type_data[0]
    for code in (50, 54):
        if code in options and len(options[code]) != 4:
            raise MalformedPacket(f"option {code} must be 4 bytes")

    return DHCPMessage(
        op=bootp.op,
        xid=bootp.xid,
        chaddr=chaddr,
        message_type=message_type,
        flags=int(bootp.flags),
        ciaddr=IPv4Address(bootp.ciaddr),
        yiaddr=IPv4Address(bootp.yiaddr),
        siaddr=IPv4Address(bootp.siaddr),
        giaddr=IPv4Address(bootp.giaddr),
        hops=bootp.hops,
        secs=bootp.secs,
        options=options,
    )


def _merge(into: dict[int, bytes], more: dict[int, bytes]) -> None:
    for code, value in more.items():
        into[code] = into.get(code, b"") + value


def _parse_options(data: bytes, where: str) -> dict[int, bytes]:
    """Walk code/length/value triples up to the end option (255)."""
    options: dict[int, bytes] = {}
    i, n = 0, len(data)
    while i < n:
        code = data[i]
        if code == 0:
            i += 1
            continue
        if code == 255:
            return options
        if i + 1 >= n:
            raise MalformedPacket(f"option {code} in the {where} has no length")
        length = data[i + 1]
        end = i + 2 + length
        if end > n:
            raise MalformedPacket(f"option {code} in the {where} is truncated")
        options[code] = options.get(code, b"") + data[i + 2 : end]
        i = end
    return options  # a missing end option is tolerated (some clients omit it)


# --------------------------------------------------------------------------
# Encoding.


def encode(msg: DHCPMessage) -> bytes:
    """The datagram for ``msg``: option 53 first, 54 next, then the rest."""
    mac = bytes.fromhex(msg.chaddr)
    bootp = BOOTP(
        op=msg.op,
        htype=1,
        hlen=6,
        hops=msg.hops,
        xid=msg.xid,
        secs=msg.secs,
        flags=msg.flags,
        ciaddr=str(msg.ciaddr),
        yiaddr=str(msg.yiaddr),
        siaddr=str(msg.siaddr),
        giaddr=str(msg.giaddr),
        chaddr=mac + bytes(10),
        options=dhcpmagic,
    )
    items: list[tuple[int, bytes] | str] = []
    if msg.message_type is not None:
        items.append((53, bytes([msg.message_type])))
    ordered = sorted(msg.options, key=lambda code: (code != 54, code))
    for code in ordered:
        if code in (0, 53, 255):
            continue
        items.extend(_split(code, msg.options[code]))
    items.append("end")
    data = bytes(bootp / DHCP(options=items))
    if len(data) < MIN_MESSAGE_LENGTH:
        data += bytes(MIN_MESSAGE_LENGTH - len(data))
    return data


def _split(code: int, value: bytes) -> Iterable[tuple[int, bytes]]:
    """One option, split into 255-byte pieces if longer (RFC 3396)."""
    if not value:
        yield (code, b"")
        return
    for start in range(0, len(value), 255):
        yield (code, value[start : start + 255])


def encoded_options_length(options: dict[int, bytes]) -> int:
    """Bytes that ``options`` take in a message (with their headers)."""
    return sum(len(v) + 2 * max(1, -(-len(v) // 255)) for v in options.values())


# --------------------------------------------------------------------------
# Human-readable descriptions for logs and the CLI.

_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")


def redact(text: str) -> str:
    """Hide ``user:password@`` in URLs."""
    return _USERINFO.sub("***@", text)


def describe_option(code: int, value: bytes) -> str:
    """``66=tftp.example.com``, ``150=10.0.0.1,10.0.0.2``, ``43=hex:0104...``."""
    spec = OPTIONS_BY_CODE.get(code)
    kind = spec.kind if spec else None
    if code in (1, 28, 50, 54) and len(value) == 4:
        text = str(IPv4Address(value))
    elif kind == "ips" and value and len(value) % 4 == 0:
        text = ",".join(str(a) for a in ip_list(value))
    elif code == 55:
        text = ",".join(str(c) for c in value)
    elif code in (51, 58, 59) and len(value) == 4:
        text = str(struct.unpack("!I", value)[0])
    elif (kind == "text" or kind is None or code == 60) and _printable(value):
        text = redact(value.decode("utf-8"))
    else:
        text = "hex:" + value.hex()
    return f"{option_label(code)}={text}"


def _printable(value: bytes) -> bool:
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(text) and text.isprintable()


def describe_options(options: dict[int, bytes], skip: Iterable[int] = ()) -> str:
    skipped = set(skip)
    return " ".join(describe_option(c, v) for c, v in sorted(options.items()) if c not in skipped)


def mac_text(mac: str) -> str:
    return format_mac(mac, "colon")

