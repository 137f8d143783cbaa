"""DHCP messages: decode datagrams into ``DHCPMessage`` and encode replies.

The fixed BOOTP header is read and written with one ``struct`` format
and the options as raw code/length/value bytes: this is the server's hot
path, and scapy's ``BOOTP``/``DHCP`` layers, which built and parsed these
messages before, cost 15 (decoding) to 50 (encoding) times as much.  The
bytes are the same as scapy's: the tests check ours against scapy both ways.
Options are kept as ``{code: bytes}`` rather than through scapy's typed
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
DHCP_MAGIC = b"\x63\x82\x53\x63"
_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")
"""op htype hlen hops xid secs flags ciaddr yiaddr siaddr giaddr chaddr sname file: HEADER_LENGTH bytes."""
_ZERO_PACKED = bytes(4)
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
    except Exception as exc:  # whatever hostile input may cause: one error type out
        raise MalformedPacket(f"cannot decode: {type(exc).__name__}: {exc}") from None


def _decode(data: bytes) -> DHCPMessage:
    if len(data) < HEADER_LENGTH + len(DHCP_MAGIC):
        raise MalformedPacket(f"too short for DHCP ({len(data)} bytes)")
    if len(data) > MAX_DATAGRAM:
        raise MalformedPacket(f"too long ({len(data)} bytes)")
    if data[HEADER_LENGTH : HEADER_LENGTH + 4] != DHCP_MAGIC:
        raise MalformedPacket("no DHCP magic cookie")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
     file) = _HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise MalformedPacket(f"op {op} is neither BOOTREQUEST nor BOOTREPLY")
    if htype != 1 or hlen != 6:
        raise MalformedPacket(f"hardware type {htype}/length {hlen} is not Ethernet")

    options = _parse_options(data[HEADER_LENGTH + 4 :], "options")
    overload = options.get(52)
    if overload is not None:
        if len(overload) != 1 or overload[0] not in (1, 2, 3):
            raise MalformedPacket("bad option overload (52)")
        extra: dict[int, bytes] = {}
        if overload[0] & 1:
            _merge(extra, _parse_options(file, "file field"))
        if overload[0] & 2:
            _merge(extra, _parse_options(sname, "sname field"))
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
        op=op,
        xid=xid,
        chaddr=chaddr[:6].hex(),
        message_type=message_type,
        flags=flags,
        ciaddr=_address(ciaddr),
        yiaddr=_address(yiaddr),
        siaddr=_address(siaddr),
        giaddr=_address(giaddr),
        hops=hops,
        secs=secs,
        options=options,
    )


def _address(packed: bytes) -> IPv4Address:
    return ZERO if packed == _ZERO_PACKED else IPv4Address(packed)


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
    parts = [
        _HEADER.pack(
            msg.op, 1, 6, msg.hops, msg.xid, msg.secs, msg.flags,
            msg.ciaddr.packed, msg.yiaddr.packed, msg.siaddr.packed, msg.giaddr.packed,
            bytes.fromhex(msg.chaddr), b"", b"",
        ),
        DHCP_MAGIC,
    ]
    if msg.message_type is not None:
        parts.append(bytes((53, 1, msg.message_type)))
    options = msg.options
    for code in sorted(options, key=lambda code: (code != 54, code)):
        if code in (0, 53, 255):
            continue
        value = options[code]
        if len(value) <= 255:
            parts.append(bytes((code, len(value))))
            parts.append(value)
        else:  # split into 255-byte pieces (RFC 3396)
            for start in range(0, len(value), 255):
                piece = value[start : start + 255]
                parts.append(bytes((code, len(piece))))
                parts.append(piece)
    parts.append(b"\xff")
    data = b"".join(parts)
    if len(data) < MIN_MESSAGE_LENGTH:
        data += bytes(MIN_MESSAGE_LENGTH - len(data))
    return data


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

