"""TFTP packets: encode and decode (RFC 1350, RFC 2347 options).

Every packet type is a frozen dataclass with an ``encode()`` method; the
module-level :func:`decode` turns a datagram into one of them.  Decoding is
strict and total: any input that is not a well-formed packet raises
:class:`MalformedPacket` (a ``ValueError``) and nothing else.  The exception
carries ``error_code``, the TFTP error code a server should answer with
(4 "illegal operation" for structural problems, 8 "option refused" for bad
options).

Decoding rules worth knowing:

* Request mode strings and option names are case-insensitive in the RFCs;
  :func:`decode` returns them lower-cased.  Option values keep their case.
* Options keep their order (``dict`` preserves insertion order); a repeated
  option name is malformed.
* Trailing NUL padding after the last complete field of a request or OACK is
  tolerated (some embedded clients pad); anything else after it is not.
* The values of the numeric options this server understands (``blksize``,
  ``timeout``, ``tsize``, ``windowsize``) must be plain decimal numbers of at
  most :data:`MAX_NUMERIC_DIGITS` digits; ``blksize=abc`` or ``10**30`` is
  malformed with code 8.  Range checks (blksize 8..65464 ...) are a
  negotiation matter, see :mod:`zprovd.tftp.session`.
* An ACK longer than 4 bytes is accepted (the tail is ignored); an ERROR
  without the terminating NUL is accepted (its message is only logged).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Mapping, Union

__all__ = [
    "Opcode",
    "ErrorCode",
    "MalformedPacket",
    "ReadRequest",
    "WriteRequest",
    "Data",
    "Ack",
    "Error",
    "OptionAck",
    "Packet",
    "decode",
    "peek_opcode",
    "parse_numeric_option",
    "NUMERIC_OPTIONS",
    "MAX_NUMERIC_DIGITS",
    "MAX_OPTIONS",
    "MAX_OPTION_NAME",
    "MAX_OPTION_VALUE",
    "MAX_BLOCK_PAYLOAD",
]


class Opcode(enum.IntEnum):
    RRQ = 1
    WRQ = 2
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6


class ErrorCode(enum.IntEnum):
    NOT_DEFINED = 0
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8


#: Options whose values must be decimal numbers.
NUMERIC_OPTIONS = frozenset({"blksize", "timeout", "tsize", "windowsize"})
#: A numeric option value with more digits than this is absurd (2**64 has 20).
MAX_NUMERIC_DIGITS = 20
#: At most this many options in one request or OACK.
MAX_OPTIONS = 32
#: Longest accepted option name and value, in bytes.
MAX_OPTION_NAME = 64
MAX_OPTION_VALUE = 255
#: Largest DATA payload any TFTP packet may carry (RFC 2348 blksize limit).
MAX_BLOCK_PAYLOAD = 65464

_U16 = struct.Struct("!H")
_U16U16 = struct.Struct("!HH")


class MalformedPacket(ValueError):
    """The datagram is not a well-formed TFTP packet.

    ``reason`` says why (for logs); ``error_code`` is the TFTP error code an
    answer should carry (4 or 8).
    """

    def __init__(self, reason: str, error_code: int = ErrorCode.ILLEGAL_OPERATION):
        super().__init__(reason)
        self.reason = reason
        self.error_code = int(error_code)


def _check_u16(name: str, value: int) -> None:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"{name} must be an integer in 0..65535, got {value!r}")


def _check_text(name: str, value: str) -> None:
    if "\x00" in value:
        raise ValueError(f"{name} must not contain NUL")


def _is_printable_ascii(raw: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in raw)


def _encode_options(options: Mapping[str, str]) -> bytes:
    out = bytearray()
    for name, value in options.items():
        _check_text("option name", name)
        _check_text("option value", value)
        if not name:
            raise ValueError("option names must not be empty")
        out += name.encode("ascii") + b"\x00" + value.encode("ascii") + b"\x00"
    return bytes(out)


@dataclass(frozen=True)
class _Request:
    filename: str
    mode: str = "octet"
    options: Mapping[str, str] = field(default_factory=dict)

    opcode = Opcode.RRQ  # overridden

    def encode(self) -> bytes:
        _check_text("filename", self.filename)
        _check_text("mode", self.mode)
        if not self.mode:
            raise ValueError("mode must not be empty")
        return (
            _U16.pack(self.opcode)
            + self.filename.encode("utf-8")
            + b"\x00"
            + self.mode.encode("ascii")
            + b"\x00"
            + _encode_options(self.options)
        )


@dataclass(frozen=True)
class ReadRequest(_Request):
    """RRQ: the client wants to read ``filename``."""

    opcode = Opcode.RRQ


@dataclass(frozen=True)
class WriteRequest(_Request):
    """WRQ: the client wants to write ``filename``."""

    opcode = Opcode.WRQ


@dataclass(frozen=True)
class Data:
    """DATA: one block (wire block number 0..65535, payload <= 65464 bytes)."""

    block: int
    payload: bytes = b""

    opcode = Opcode.DATA

    def encode(self) -> bytes:
        _check_u16("block", self.block)
        if len(self.payload) > MAX_BLOCK_PAYLOAD:
            raise ValueError("payload larger than 65464 bytes")
        return _U16U16.pack(Opcode.DATA, self.block) + bytes(self.payload)


@dataclass(frozen=True)
class Ack:
    """ACK of wire block number ``block`` (0 acknowledges a WRQ or OACK)."""

    block: int

    opcode = Opcode.ACK

    def encode(self) -> bytes:
        _check_u16("block", self.block)
        return _U16U16.pack(Opcode.ACK, self.block)


@dataclass(frozen=True)
class Error:
    """ERROR with a numeric code and a human-readable ASCII message."""

    code: int
    message: str = ""

    opcode = Opcode.ERROR

    def encode(self) -> bytes:
        _check_u16("code", self.code)
        _check_text("message", self.message)
        return _U16U16.pack(Opcode.ERROR, self.code) + self.message.encode("ascii", "replace") + b"\x00"


@dataclass(frozen=True)
class OptionAck:
    """OACK (RFC 2347): the options the server accepted, with their values."""

    options: Mapping[str, str]

    opcode = Opcode.OACK

    def encode(self) -> bytes:
        if not self.options:
            raise ValueError("an OACK needs at least one option")
        return _U16.pack(Opcode.OACK) + _encode_options(self.options)


Packet = Union[ReadRequest, WriteRequest, Data, Ack, Error, OptionAck]


def peek_opcode(datagram: bytes) -> int | None:
    """The opcode field of a datagram (any value), or None if it is too short."""
    if len(datagram) < 2:
        return None
    return int(_U16.unpack_from(datagram)[0])


def parse_numeric_option(value: str) -> int | None:
    """The value of a numeric option, or None if it is not a sane decimal number."""
    if not value or len(value) > MAX_NUMERIC_DIGITS or not value.isascii() or not value.isdigit():
        return None
    return int(value)


def _split_fields(body: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings of ``body``; the body must end with NUL."""
    if not body.endswith(b"\x00"):
        raise MalformedPacket(f"{what}: last field is not NUL-terminated")
    return body[:-1].split(b"\x00")


def _decode_options(fields: list[bytes], what: str) -> dict[str, str]:
    # Tolerate NUL padding: drop empty strings at the very end, but keep an
    # empty *value* (atftp sends "multicast" with an empty value).
    while fields and fields[-1] == b"" and (len(fields) % 2 == 1 or fields[-2] == b""):
        fields = fields[:-1]
    if len(fields) % 2:
        raise MalformedPacket(f"{what}: option {fields[-1][:32]!r} has no value", ErrorCode.OPTION_REFUSED)
    if len(fields) // 2 > MAX_OPTIONS:
        raise MalformedPacket(f"{what}: more than {MAX_OPTIONS} options", ErrorCode.OPTION_REFUSED)
    options: dict[str, str] = {}
    for i in range(0, len(fields), 2):
        raw_name, raw_value = fields[i], fields[i + 1]
        if not raw_name:
            raise MalformedPacket(f"{what}: empty option name", ErrorCode.OPTION_REFUSED)
        if len(raw_name) > MAX_OPTION_NAME or len(raw_value) > MAX_OPTION_VALUE:
            raise MalformedPacket(f"{what}: option name or value too long", ErrorCode.OPTION_REFUSED)
        if not (_is_printable_ascii(raw_name) and _is_printable_ascii(raw_value)):
            raise MalformedPacket(f"{what}: option is not printable ASCII", ErrorCode.OPTION_REFUSED)
        name = raw_name.decode("ascii").lower()
        value = raw_value.decode("ascii")
        if name in options:
            raise MalformedPacket(f"{what}: option {name!r} repeated", ErrorCode.OPTION_REFUSED)
        if name in NUMERIC_OPTIONS and parse_numeric_option(value) is None:
            raise MalformedPacket(f"{what}: option {name}={value[:32]!r} is not a sane number", ErrorCode.OPTION_REFUSED)
        options[name] = value
    return options


def _decode_request(opcode: int, body: bytes) -> ReadRequest | WriteRequest:
    what = "RRQ" if opcode == Opcode.RRQ else "WRQ"
    fields = _split_fields(body, what)
    if len(fields) < 2:
        raise MalformedPacket(f"{what}: no mode field")
    raw_name, raw_mode = fields[0], fields[1]
    try:
        filename = raw_name.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedPacket(f"{what}: filename is not UTF-8") from None
    if not raw_mode or len(raw_mode) > 32 or not _is_printable_ascii(raw_mode):
        raise MalformedPacket(f"{what}: bad mode {raw_mode[:32]!r}")
    mode = raw_mode.decode("ascii").lower()
    options = _decode_options(fields[2:], what)
    cls = ReadRequest if opcode == Opcode.RRQ else WriteRequest
    return cls(filename=filename, mode=mode, options=options)


def decode(datagram: bytes) -> Packet:
    """Decode one datagram; raise MalformedPacket for anything malformed."""
    try:
        datagram = bytes(datagram)
    except Exception:  # pragma: no cover - defensive: not a bytes-like object
        raise MalformedPacket("not a bytes-like object") from None
    opcode = peek_opcode(datagram)
    if opcode is None:
        raise MalformedPacket("truncated: shorter than an opcode")
    body = datagram[2:]
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        return _decode_request(opcode, body)
    if opcode == Opcode.DATA:
        if len(body) < 2:
            raise MalformedPacket("DATA: truncated block number")
        if len(body) - 2 > MAX_BLOCK_PAYLOAD:
            raise MalformedPacket("DATA: payload larger than 65464 bytes")
        return Data(block=_U16.unpack_from(body)[0], payload=body[2:])
    if opcode == Opcode.ACK:
        if len(body) < 2:
            raise MalformedPacket("ACK: truncated block number")
        return Ack(block=_U16.unpack_from(body)[0])
    if opcode == Opcode.ERROR:
        if len(body) < 2:
            raise MalformedPacket("ERROR: truncated error code")
        code = _U16.unpack_from(body)[0]
        raw = body[2:]
        end = raw.find(b"\x00")
        if end >= 0:
            raw = raw[:end]
        return Error(code=code, message=raw.decode("ascii", "replace"))
    if opcode == Opcode.OACK:
        options = _decode_options(_split_fields(body, "OACK"), "OACK")
        if not options:
            raise MalformedPacket("OACK: no options", ErrorCode.OPTION_REFUSED)
        return OptionAck(options=options)
    raise MalformedPacket(f"unknown opcode {opcode}")
