"""Unit tests for zprovd.tftp.packets: round trips and malformed input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zprovd.tftp.packets import (
    MAX_OPTION_VALUE,
    Ack,
    Data,
    Error,
    ErrorCode,
    MalformedPacket,
    OptionAck,
    ReadRequest,
    WriteRequest,
    decode,
    parse_numeric_option,
    peek_opcode,
)

# -- strategies ---------------------------------------------------------------

printable = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
u16 = st.integers(0, 0xFFFF)
filenames = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=80)
modes = st.sampled_from(["octet", "netascii", "mail"])
numeric_names = st.sampled_from(["blksize", "timeout", "tsize", "windowsize"])
other_names = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E).map(str.lower), min_size=1, max_size=20).filter(
    lambda s: s not in ("blksize", "timeout", "tsize", "windowsize") and s == s.lower()
)


@st.composite
def option_dicts(draw: st.DrawFn, min_size: int = 0) -> dict[str, str]:
    options: dict[str, str] = {}
    for name in draw(st.lists(st.one_of(numeric_names, other_names), min_size=min_size, max_size=8, unique=True)):
        if name in ("blksize", "timeout", "tsize", "windowsize"):
            options[name] = str(draw(st.integers(0, 10**19)))
        else:
            options[name] = draw(st.text(printable, max_size=40))
    return options


packets = st.one_of(
    st.builds(ReadRequest, filename=filenames, mode=modes, options=option_dicts()),
    st.builds(WriteRequest, filename=filenames, mode=modes, options=option_dicts()),
    st.builds(Data, block=u16, payload=st.binary(max_size=2000)),
    st.builds(Ack, block=u16),
    st.builds(Error, code=u16, message=st.text(printable, max_size=100)),
    st.builds(OptionAck, options=option_dicts(min_size=1)),
)


# -- round trips ----------------------------------------------------------------


@given(packets)
def test_round_trip(packet: object) -> None:
    assert decode(packet.encode()) == packet  # type: ignore[attr-defined]


@given(option_dicts())
def test_option_dict_round_trip_keeps_order(options: dict[str, str]) -> None:
    decoded = decode(ReadRequest("f", "octet", options).encode())
    assert isinstance(decoded, ReadRequest)
    assert list(decoded.options.items()) == list(options.items())


@given(st.binary(max_size=65464), u16)
def test_data_round_trip_any_payload(payload: bytes, block: int) -> None:
    assert decode(Data(block, payload).encode()) == Data(block, payload)


def test_known_encodings() -> None:
    assert ReadRequest("a.cfg", "octet", {"blksize": "1468"}).encode() == b"\x00\x01a.cfg\x00octet\x00blksize\x001468\x00"
    assert WriteRequest("x", "netascii").encode() == b"\x00\x02x\x00netascii\x00"
    assert Data(65535, b"hi").encode() == b"\x00\x03\xff\xffhi"
    assert Ack(0).encode() == b"\x00\x04\x00\x00"
    assert Error(1, "file not found").encode() == b"\x00\x05\x00\x01file not found\x00"
    assert OptionAck({"tsize": "7"}).encode() == b"\x00\x06tsize\x007\x00"


def test_mode_and_option_names_are_lowercased() -> None:
    p = decode(b"\x00\x01File.CFG\x00OcTeT\x00BLKSIZE\x001024\x00WindowSize\x004\x00")
    assert p == ReadRequest("File.CFG", "octet", {"blksize": "1024", "windowsize": "4"})


def test_trailing_nul_padding_is_tolerated() -> None:
    for padding in (b"\x00", b"\x00\x00", b"\x00\x00\x00"):
        p = decode(b"\x00\x01f\x00octet\x00tsize\x000\x00" + padding)
        assert p == ReadRequest("f", "octet", {"tsize": "0"})
        assert decode(b"\x00\x01f\x00octet\x00" + padding) == ReadRequest("f", "octet", {})
    # An empty value is a value, not padding.
    assert decode(b"\x00\x01f\x00octet\x00multicast\x00\x00") == ReadRequest("f", "octet", {"multicast": ""})


def test_lenient_ack_and_error() -> None:
    assert decode(b"\x00\x04\x00\x07junk") == Ack(7)
    assert decode(b"\x00\x05\x00\x08no terminator") == Error(8, "no terminator")
    assert decode(b"\x00\x05\x00\x00\xff\x00") == Error(0, "\ufffd")


def test_encode_rejects_bad_fields() -> None:
    with pytest.raises(ValueError):
        Data(65536, b"").encode()
    with pytest.raises(ValueError):
        Ack(-1).encode()
    with pytest.raises(ValueError):
        ReadRequest("a\x00b").encode()
    with pytest.raises(ValueError):
        OptionAck({}).encode()
    with pytest.raises(ValueError):
        Data(1, b"x" * 65465).encode()


# -- malformed input ------------------------------------------------------------

MALFORMED = [
    (b"", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x00", ErrorCode.ILLEGAL_OPERATION),  # opcode 0
    (b"\x00\x07abc", ErrorCode.ILLEGAL_OPERATION),  # opcode 7
    (b"\xff\xff", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x01", ErrorCode.ILLEGAL_OPERATION),  # RRQ without anything
    (b"\x00\x01file", ErrorCode.ILLEGAL_OPERATION),  # no NUL
    (b"\x00\x01file\x00", ErrorCode.ILLEGAL_OPERATION),  # no mode
    (b"\x00\x01file\x00octet", ErrorCode.ILLEGAL_OPERATION),  # mode not terminated
    (b"\x00\x01file\x00\x00", ErrorCode.ILLEGAL_OPERATION),  # empty mode
    (b"\x00\x01file\x00oc\xfftet\x00", ErrorCode.ILLEGAL_OPERATION),  # non-ASCII mode
    (b"\x00\x01\xff\xfe\x00octet\x00", ErrorCode.ILLEGAL_OPERATION),  # filename not UTF-8
    (b"\x00\x02file\x00octet\x00blksize\x00", ErrorCode.OPTION_REFUSED),  # option without value
    (b"\x00\x01file\x00octet\x00blksize\x00abc\x00", ErrorCode.OPTION_REFUSED),
    (b"\x00\x01file\x00octet\x00blksize\x00" + str(10**30).encode() + b"\x00", ErrorCode.OPTION_REFUSED),
    (b"\x00\x01file\x00octet\x00timeout\x00-1\x00", ErrorCode.OPTION_REFUSED),
    (b"\x00\x01file\x00octet\x00tsize\x00 1\x00", ErrorCode.OPTION_REFUSED),
    (b"\x00\x01file\x00octet\x00windowsize\x00\x00", ErrorCode.OPTION_REFUSED),  # empty number
    (b"\x00\x01file\x00octet\x00blksize\x00\xd9\xa1\x00", ErrorCode.OPTION_REFUSED),  # non-ASCII digit
    (b"\x00\x01file\x00octet\x00\x00512\x00", ErrorCode.OPTION_REFUSED),  # empty option name
    (b"\x00\x01file\x00octet\x00x\x00caf\xc3\xa9\x00", ErrorCode.OPTION_REFUSED),  # non-ASCII value
    (b"\x00\x01file\x00octet\x00x\x00" + b"a" * (MAX_OPTION_VALUE + 1) + b"\x00", ErrorCode.OPTION_REFUSED),
    (b"\x00\x01file\x00octet\x00tsize\x001\x00TSIZE\x002\x00", ErrorCode.OPTION_REFUSED),  # repeated
    (b"\x00\x01f\x00octet\x00" + b"".join(b"o%d\x00v\x00" % i for i in range(33)), ErrorCode.OPTION_REFUSED),
    (b"\x00\x03", ErrorCode.ILLEGAL_OPERATION),  # DATA without block
    (b"\x00\x03\x00", ErrorCode.ILLEGAL_OPERATION),
    (b"\x00\x03\x00\x01" + b"x" * 65465, ErrorCode.ILLEGAL_OPERATION),  # payload too big
    (b"\x00\x04\x00", ErrorCode.ILLEGAL_OPERATION),  # ACK truncated
    (b"\x00\x05\x00", ErrorCode.ILLEGAL_OPERATION),  # ERROR truncated
    (b"\x00\x06", ErrorCode.ILLEGAL_OPERATION),  # OACK without options
    (b"\x00\x06\x00", ErrorCode.OPTION_REFUSED),  # OACK with only padding
    (b"\x00\x06blksize\x00512", ErrorCode.ILLEGAL_OPERATION),  # not terminated
]


@pytest.mark.parametrize("datagram,code", MALFORMED)
def test_malformed(datagram: bytes, code: int) -> None:
    with pytest.raises(MalformedPacket) as info:
        decode(datagram)
    assert info.value.error_code == code
    assert info.value.reason
    assert isinstance(info.value, ValueError)


@settings(max_examples=500)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_never_raise_anything_else(datagram: bytes) -> None:
    try:
        decode(datagram)
    except MalformedPacket:
        pass


@settings(max_examples=300)
@given(st.sampled_from([b"\x00\x01", b"\x00\x02", b"\x00\x06"]), st.lists(st.binary(max_size=12), max_size=8))
def test_structured_garbage_never_raises_anything_else(opcode: bytes, fields: list[bytes]) -> None:
    # NUL-separated fields exercise the option parser far more than raw bytes.
    try:
        decode(opcode + b"\x00".join(fields) + b"\x00")
    except MalformedPacket:
        pass


def test_peek_opcode_and_parse_numeric_option() -> None:
    assert peek_opcode(b"") is None
    assert peek_opcode(b"\x00\x05zz") == 5
    assert parse_numeric_option("0042") == 42
    assert parse_numeric_option("99999999999999999999") == 10**20 - 1
    for bad in ["", "abc", "-1", "+1", "1.5", " 1", "1" * 21, "\u0661"]:
        assert parse_numeric_option(bad) is None


def test_malformed_packet_is_a_value_error_with_reason() -> None:
    e = MalformedPacket("why")
    assert str(e) == "why" and e.reason == "why" and e.error_code == 4
