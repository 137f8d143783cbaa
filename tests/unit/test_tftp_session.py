"""Unit tests for the sans-I/O TFTP sessions (zprovd.tftp.session).

Time is explicit: every call gets ``now``; nothing sleeps.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zprovd.tftp.packets import Ack, Data, Error, ErrorCode, OptionAck, decode
from zprovd.tftp.session import (
    Limits,
    NetasciiDecoder,
    NetasciiEncoder,
    OptionError,
    Output,
    ReadSession,
    WriteSession,
    negotiate,
)
from zprovd.tftp.source import BytesReader


def ack(n: int) -> bytes:
    return Ack(n).encode()


def data_packets(out: Output) -> list[Data]:
    packets = [decode(d) for d in out.send]
    assert all(isinstance(p, Data) for p in packets), packets
    return packets  # type: ignore[return-value]


def blocks(out: Output) -> list[int]:
    return [p.block for p in data_packets(out)]


class TrackingReader(BytesReader):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.close_calls = 0

    def close(self) -> None:
        self.close_calls += 1
        super().close()


class DribblingReader(TrackingReader):
    """Returns at most 3 bytes per read, as a Reader may."""

    def read(self, n: int) -> bytes:
        return super().read(min(n, 3))


# -- plain RFC 1350 flow -------------------------------------------------------------


def test_no_options_starts_with_data_1() -> None:
    reader = TrackingReader(b"x" * 1000)
    s = ReadSession(reader, {}, "octet")
    out = s.start(100.0)
    assert data_packets(out) == [Data(1, b"x" * 512)]
    assert out.deadline == pytest.approx(101.0)  # initial RTO 1 s
    out = s.receive(ack(1), 100.1)
    assert data_packets(out) == [Data(2, b"x" * 488)]
    out = s.receive(ack(2), 100.2)
    assert out.done and out.error is None and out.send == [] and out.deadline is None
    assert reader.close_calls == 1 and s.bytes_sent == 1000


@pytest.mark.parametrize("size", [0, 512, 1024])
def test_exact_multiple_of_blksize_ends_with_empty_block(size: int) -> None:
    s = ReadSession(BytesReader(b"a" * size))
    out = s.start(0)
    n = 1
    while True:
        (p,) = data_packets(out)
        assert p.block == n
        out = s.receive(ack(n), 0)
        if len(p.payload) < 512:
            break
        n += 1
    assert out.done and out.error is None
    assert n == size // 512 + 1


def test_short_reads_are_assembled_into_full_blocks() -> None:
    s = ReadSession(DribblingReader(bytes(range(256)) * 3))
    out = s.start(0)
    assert data_packets(out) == [Data(1, (bytes(range(256)) * 2))]


def test_duplicate_ack_does_not_resend() -> None:
    s = ReadSession(BytesReader(b"y" * 5000))
    s.start(0)
    out = s.receive(ack(1), 0.01)
    assert blocks(out) == [2]
    deadline = out.deadline
    for _ in range(5):
        dup = s.receive(ack(1), 0.02)
        assert dup.send == [] and not dup.done and dup.deadline == deadline
    # An ACK for a block never sent, and a stale one, are ignored too.
    assert s.receive(ack(7), 0.03).send == []
    assert s.receive(ack(0), 0.03).send == []
    assert blocks(s.receive(ack(2), 0.04)) == [3]


def test_every_block_is_sent_once_when_all_acks_are_duplicated() -> None:
    # The Sorcerer's Apprentice scenario: every ACK arrives twice.
    s = ReadSession(BytesReader(bytes(512 * 20 + 7)))
    sent = blocks(s.start(0))
    n = 1
    while not s.done:
        out = s.receive(ack(n), 0)
        sent += blocks(out)
        sent += blocks(s.receive(ack(n), 0))
        n += 1
    assert sent == list(range(1, 22))


def test_block_numbers_roll_over_to_zero() -> None:
    blksize = 8
    payload = bytes(random.Random(1).randbytes(8 * 65536 + 3))
    s = ReadSession(BytesReader(payload), {"blksize": "8"}, limits=Limits(max_blksize=8))
    out = s.start(0)
    assert decode(out.send[0]) == OptionAck({"blksize": "8"})
    out = s.receive(ack(0), 0)
    received = []
    expected_abs = 1
    while not out.done:
        (p,) = data_packets(out)
        assert p.block == expected_abs % 65536
        received.append(p.payload)
        out = s.receive(ack(p.block), 0)
        expected_abs += 1
    assert out.error is None
    assert expected_abs - 1 == 65537  # blocks 65536 (wire 0) and 65537 (wire 1) were sent
    assert b"".join(received) == payload
    assert len(received[-1]) == 3 and blksize == 8


def test_rollover_with_window() -> None:
    payload = bytes(8 * 65540)
    s = ReadSession(BytesReader(payload), {"blksize": "8", "windowsize": "64"}, limits=Limits(max_blksize=8))
    s.start(0)
    out = s.receive(ack(0), 0)
    got = 0
    while not out.done:
        ps = data_packets(out)
        got += sum(len(p.payload) for p in ps)
        out = s.receive(ack(ps[-1].block), 0)
    assert out.error is None and got == len(payload)


# -- timers ----------------------------------------------------------------------


def test_retransmit_after_deadline_only() -> None:
    s = ReadSession(BytesReader(b"z" * 600))
    first = s.start(10.0)
    assert first.deadline == pytest.approx(11.0)
    early = s.timeout(10.5)
    assert early.send == [] and early.deadline == first.deadline
    again = s.timeout(11.0)
    assert again.send == first.send  # the same DATA 1
    assert again.deadline == pytest.approx(13.0)  # backed off: 2 s
    assert s.retransmissions == 1
    assert blocks(s.receive(ack(1), 11.5)) == [2]


def test_drop_after_retries_closes_reader() -> None:
    reader = TrackingReader(b"q" * 2000)
    s = ReadSession(reader, limits=Limits(retries=3))
    out = s.start(0)
    resends = 0
    for _ in range(10):
        out = s.timeout(out.deadline)  # type: ignore[arg-type]
        if out.done:
            break
        assert blocks(out) == [1]
        resends += 1
    assert resends == 3
    assert out.done and out.error and "timed out" in out.error and out.send == []
    assert reader.close_calls == 1
    assert s.receive(ack(1), 100).done  # nothing happens any more
    assert reader.close_calls == 1


def test_adaptive_timeout_follows_rtt_and_is_bounded() -> None:
    s = ReadSession(BytesReader(bytes(512 * 50)))
    out = s.start(0)
    now = 0.0
    for n in range(1, 30):
        now += 0.001
        out = s.receive(ack(n), now)
    assert out.deadline is not None
    assert out.deadline - now == pytest.approx(0.2)  # lower bound
    slow = ReadSession(BytesReader(bytes(512 * 50)))
    out = slow.start(0)
    now = 0.0
    for n in range(1, 30):
        now += 0.9
        out = slow.receive(ack(n), now)
    assert out.deadline is not None
    assert 1.7 <= out.deadline - now <= 5.0  # about 2 x RTT, at most 5 s
    # Back-off doubles but never exceeds 5 s.
    for _ in range(4):
        prev = out.deadline
        out = slow.timeout(out.deadline)
        assert out.deadline - prev <= 5.0 + 1e-9


def test_client_timeout_option_is_used_as_fixed_timeout() -> None:
    s = ReadSession(BytesReader(bytes(2000)), {"timeout": "3"})
    out = s.start(0)
    assert decode(out.send[0]) == OptionAck({"timeout": "3"})
    assert out.deadline == 3
    out = s.timeout(3)
    assert out.deadline == 6 and decode(out.send[0]) == OptionAck({"timeout": "3"})
    out = s.receive(ack(0), 6.01)
    assert blocks(out) == [1] and out.deadline == pytest.approx(9.01)


# -- windows (RFC 7440) -------------------------------------------------------------------


def test_window_sliding() -> None:
    content = bytes(range(100))  # blksize 8: blocks 1..12 full, 13 has 4 bytes
    s = ReadSession(BytesReader(content), {"blksize": "8", "windowsize": "4"}, limits=Limits(max_blksize=8))
    out = s.start(0)
    assert decode(out.send[0]) == OptionAck({"blksize": "8", "windowsize": "4"})
    assert blocks(s.receive(ack(0), 0.1)) == [1, 2, 3, 4]
    # ACK inside the window: the client missed 3, slide to 3.
    assert blocks(s.receive(ack(2), 0.2)) == [3, 4, 5, 6]
    assert s.receive(ack(2), 0.21).send == []  # duplicate: nothing
    assert blocks(s.receive(ack(6), 0.3)) == [7, 8, 9, 10]
    timed = s.timeout(10.0)
    assert blocks(timed) == [7, 8, 9, 10]  # the window from the last ACK
    last = s.receive(ack(10), 10.1)
    assert blocks(last) == [11, 12, 13]
    assert data_packets(last)[-1].payload == content[96:]
    done = s.receive(ack(13), 10.2)
    assert done.done and done.error is None


def test_window_never_exceeds_windowsize_and_cap() -> None:
    s = ReadSession(BytesReader(bytes(100_000)), {"windowsize": "1000"}, limits=Limits(max_windowsize=16))
    out = s.start(0)
    assert decode(out.send[0]) == OptionAck({"windowsize": "16"})
    assert blocks(s.receive(ack(0), 0)) == list(range(1, 17))


# -- options ----------------------------------------------------------------------------


def test_tsize_reported() -> None:
    s = ReadSession(BytesReader(b"k" * 12345), {"tsize": "0"})
    assert decode(s.start(0).send[0]) == OptionAck({"tsize": "12345"})
    assert s.negotiation.tsize == 12345


def test_tsize_not_answered_for_netascii_nor_for_empty_files() -> None:
    s = ReadSession(BytesReader(b"a\nb"), {"tsize": "0"}, "netascii")
    assert data_packets(s.start(0)) == [Data(1, b"a\r\nb")]
    s = ReadSession(BytesReader(b""), {"tsize": "0", "blksize": "1024"})
    assert decode(s.start(0).send[0]) == OptionAck({"blksize": "1024"})


def test_oack_flow_waits_for_ack_zero() -> None:
    s = ReadSession(BytesReader(bytes(3000)), {"blksize": "1024", "tsize": "0", "foo": "bar"})
    out = s.start(0)
    assert [decode(d) for d in out.send] == [OptionAck({"blksize": "1024", "tsize": "3000"})]
    assert s.receive(ack(1), 0.1).send == []  # not yet
    s = ReadSession(BytesReader(bytes(3000)), {"blksize": "1024"})
    s.start(0)
    assert s.receive(ack(5), 0.1).send == []
    out = s.receive(ack(0), 0.2)
    assert data_packets(out) == [Data(1, bytes(1024))]
    assert s.receive(ack(0), 0.3).send == []  # a duplicate ACK 0 is ignored


def test_error_8_after_oack_ends_quietly() -> None:
    reader = TrackingReader(bytes(3000))
    s = ReadSession(reader, {"blksize": "1024"})
    s.start(0)
    out = s.receive(Error(ErrorCode.OPTION_REFUSED, "no thanks").encode(), 0.1)
    assert out.done and out.send == [] and out.error and "refused options" in out.error
    assert reader.close_calls == 1


def test_client_error_and_illegal_packets_end_the_session() -> None:
    s = ReadSession(BytesReader(bytes(3000)))
    s.start(0)
    out = s.receive(Error(0, "disk full").encode(), 0.1)
    assert out.done and out.send == []
    s = ReadSession(BytesReader(bytes(3000)))
    s.start(0)
    out = s.receive(Data(1, b"x").encode(), 0.1)
    assert out.done and decode(out.send[0]) == Error(ErrorCode.ILLEGAL_OPERATION, "illegal operation")


def test_garbage_from_the_client_is_ignored() -> None:
    s = ReadSession(BytesReader(bytes(3000)))
    first = s.start(0)
    for junk in [b"", b"\x00", b"\x00\x09zz", b"\x00\x04\x00"]:
        out = s.receive(junk, 0.1)
        assert out.send == [] and not out.done and out.deadline == first.deadline


@pytest.mark.parametrize(
    "requested,expected",
    [
        ({"blksize": "4"}, {}),  # below 8: ignored
        ({"blksize": "7"}, {}),
        ({"blksize": "8"}, {"blksize": "8"}),
        ({"blksize": "1024"}, {"blksize": "1024"}),
        ({"blksize": "2000"}, {"blksize": "1468"}),  # operator cap
        ({"blksize": "100000"}, {"blksize": "1468"}),
        ({"timeout": "0"}, {}),
        ({"timeout": "256"}, {}),
        ({"timeout": "1"}, {"timeout": "1"}),
        ({"timeout": "255"}, {"timeout": "255"}),
        ({"windowsize": "0"}, {}),
        ({"windowsize": "1"}, {"windowsize": "1"}),
        ({"windowsize": "65536"}, {"windowsize": "64"}),
        ({"unknown": "1", "multicast": ""}, {}),
        ({"tsize": "0"}, {"tsize": "5000"}),
        ({"tsize": "999"}, {"tsize": "5000"}),
    ],
)
def test_negotiate_ranges(requested: dict[str, str], expected: dict[str, str]) -> None:
    assert dict(negotiate(requested, Limits(), size=5000).accepted) == expected


def test_negotiate_without_operator_cap_uses_rfc_maximum() -> None:
    n = negotiate({"blksize": "99999", "windowsize": "99999"}, Limits(max_blksize=65464, max_windowsize=65535))
    assert (n.blksize, n.windowsize) == (65464, 65535)


def test_negotiate_rejects_non_numbers() -> None:
    for bad in ["abc", "", "1e3", str(10**30)]:
        with pytest.raises(OptionError):
            negotiate({"blksize": bad})
    s = ReadSession(BytesReader(b""), {"timeout": "x"})
    out = s.start(0)
    assert out.done and decode(out.send[0]).code == ErrorCode.OPTION_REFUSED  # type: ignore[union-attr]


def test_only_ignored_options_start_with_data() -> None:
    s = ReadSession(BytesReader(b"abc"), {"blksize": "2", "timeout": "0", "bogus": "1"})
    assert data_packets(s.start(0)) == [Data(1, b"abc")]


def test_unsupported_mode() -> None:
    reader = TrackingReader(b"abc")
    s = ReadSession(reader, {}, "mail")
    out = s.start(0)
    assert out.done and decode(out.send[0]).code == ErrorCode.ILLEGAL_OPERATION  # type: ignore[union-attr]
    assert reader.close_calls == 1


def test_reader_failure_gives_error_0() -> None:
    class Broken(TrackingReader):
        def read(self, n: int) -> bytes:
            raise OSError("disk on fire")

    reader = Broken(b"abc")
    s = ReadSession(reader)
    out = s.start(0)
    assert out.done and "disk on fire" in (out.error or "")
    assert decode(out.send[0]) == Error(0, "read error")
    assert reader.close_calls == 1


def test_abort() -> None:
    reader = TrackingReader(bytes(3000))
    s = ReadSession(reader)
    s.start(0)
    out = s.abort("server stopping")
    assert out.done and decode(out.send[0]).code == 0  # type: ignore[union-attr]
    assert reader.close_calls == 1
    assert s.abort("again").send == []


# -- netascii ------------------------------------------------------------------------


def test_netascii_conversion() -> None:
    s = ReadSession(BytesReader(b"a\nb\rc\r\n"), {}, "NetASCII")
    assert data_packets(s.start(0)) == [Data(1, b"a\r\nb\r\x00c\r\x00\r\n")]


def test_netascii_conversion_across_blocks() -> None:
    content = b"\n" * 700 + b"\r" * 5
    s = ReadSession(BytesReader(content), {}, "netascii")
    out = s.start(0)
    got = []
    n = 1
    while not out.done:
        (p,) = data_packets(out)
        got.append(p.payload)
        out = s.receive(ack(n), 0)
        n += 1
    wire = b"".join(got)
    assert wire == b"\r\n" * 700 + b"\r\x00" * 5
    assert all(len(g) == 512 for g in got[:-1])
    dec = NetasciiDecoder()
    assert b"".join(dec.feed(g) for g in got) + dec.flush() == content


@given(st.binary(max_size=3000), st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_netascii_round_trip(content: bytes, cuts: list[int]) -> None:
    enc = NetasciiEncoder(BytesReader(content))
    dec = NetasciiDecoder()
    out = b""
    i = 0
    while True:
        chunk = enc.read(cuts[i % len(cuts)])
        i += 1
        if not chunk:
            break
        out += dec.feed(chunk)
    out += dec.flush()
    assert out == content


# -- a simulated lossy network -----------------------------------------------------------


@dataclass
class ModelClient:
    """An RFC 1350 / 7440 receiver."""

    windowsize: int
    netascii: bool = False
    blksize: int = 512
    expected: int = 1
    since_ack: int = 0
    finished: bool = False
    chunks: list[bytes] = field(default_factory=list)
    last_progress: float = 0.0
    got_oack: bool = False

    def on_datagram(self, datagram: bytes, now: float) -> list[bytes]:
        p = decode(datagram)
        if isinstance(p, OptionAck):
            self.blksize = int(p.options.get("blksize", "512"))
            self.windowsize = int(p.options.get("windowsize", "1"))
            self.got_oack = True
            if self.expected == 1:
                return [ack(0)]
            return []
        assert isinstance(p, Data), p
        if p.block == self.expected & 0xFFFF and not self.finished:
            self.chunks.append(p.payload)
            self.expected += 1
            self.since_ack += 1
            self.last_progress = now
            if len(p.payload) < self.blksize:
                self.finished = True
                return [ack(p.block)]
            if self.since_ack >= self.windowsize:
                self.since_ack = 0
                return [ack(p.block)]
            return []
        # Duplicate or out of order: say where we are.
        self.since_ack = 0
        return [ack((self.expected - 1) & 0xFFFF)]

    def content(self) -> bytes:
        raw = b"".join(self.chunks)
        if self.netascii:
            dec = NetasciiDecoder()
            return dec.feed(raw) + dec.flush()
        return raw


def simulate(
    content: bytes,
    *,
    blksize: int,
    windowsize: int,
    seed: int,
    loss: float,
    dup: float,
    netascii: bool = False,
    retries: int = 40,
) -> tuple[ReadSession, ModelClient, int]:
    rng = random.Random(seed)
    options = {"blksize": str(blksize), "windowsize": str(windowsize), "tsize": "0"}
    session = ReadSession(
        BytesReader(content), options, "netascii" if netascii else "octet", Limits(max_blksize=blksize, retries=retries)
    )
    client = ModelClient(windowsize=windowsize, netascii=netascii)
    queue: list[tuple[float, int, str, bytes]] = []
    seq = 0

    def transmit(datagrams: list[bytes], to: str, now: float) -> None:
        nonlocal seq
        for d in datagrams:
            if rng.random() < loss:
                continue
            for _ in range(2 if rng.random() < dup else 1):
                seq += 1
                heapq.heappush(queue, (now + rng.uniform(0.001, 0.05), seq, to, d))

    out = session.start(0.0)
    transmit(out.send, "client", 0.0)
    deadline = out.deadline
    now = 0.0
    client_timer = 1.0
    steps = 0
    while not session.done:
        steps += 1
        assert steps < 200_000 and now < 100_000, "simulation does not terminate"
        candidates = [client_timer]
        if queue:
            candidates.append(queue[0][0])
        if deadline is not None:
            candidates.append(deadline)
        now = min(candidates)
        if queue and queue[0][0] == now:
            _, _, to, d = heapq.heappop(queue)
            if to == "client":
                transmit(client.on_datagram(d, now), "server", now)
            else:
                out = session.receive(d, now)
                transmit(out.send, "client", now)
                deadline = out.deadline
        elif deadline is not None and deadline == now:
            out = session.timeout(now)
            transmit(out.send, "client", now)
            deadline = out.deadline
        else:
            # The client's own retransmission of its last ACK (before the
            # OACK arrived a real client would resend its RRQ instead, which
            # the I/O layer drops as a duplicate request).
            if client.got_oack:
                transmit([ack((client.expected - 1) & 0xFFFF)], "server", now)
            client_timer = now + 1.0
    return session, client, steps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    content=st.binary(max_size=3000),
    blksize=st.integers(8, 64),
    windowsize=st.integers(1, 8),
    seed=st.integers(0, 2**32),
    loss=st.floats(0.0, 0.3),
    dup=st.floats(0.0, 0.2),
    netascii=st.booleans(),
)
def test_lossy_network_delivers_exact_bytes(
    content: bytes, blksize: int, windowsize: int, seed: int, loss: float, dup: float, netascii: bool
) -> None:
    session, client, _ = simulate(
        content, blksize=blksize, windowsize=windowsize, seed=seed, loss=loss, dup=dup, netascii=netascii
    )
    # With 40 retries, loss <= 30% never exhausts them (p < 1e-20): the
    # transfer completes and delivers exactly the bytes.
    assert session.error is None
    assert client.finished
    assert client.content() == content


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32), windowsize=st.sampled_from([1, 4]))
def test_moderate_loss_always_completes(seed: int, windowsize: int) -> None:
    content = random.Random(seed).randbytes(2000)
    session, client, _ = simulate(content, blksize=64, windowsize=windowsize, seed=seed, loss=0.1, dup=0.05)
    assert session.error is None and client.content() == content


# -- uploads --------------------------------------------------------------------------


class MemoryWriter:
    def __init__(self) -> None:
        self.data = b""
        self.committed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        assert not (self.committed or self.aborted)
        self.data += data

    def commit(self) -> None:
        self.committed = True

    def abort(self) -> None:
        self.aborted = True


def test_write_session_lockstep_and_dally() -> None:
    w = MemoryWriter()
    s = WriteSession(w)
    out = s.start(0)
    assert out.send == [ack(0)]
    assert s.receive(Data(1, b"a" * 512).encode(), 0.1).send == [ack(1)]
    assert s.receive(Data(1, b"a" * 512).encode(), 0.2).send == [ack(1)]  # duplicate: re-ACK
    assert s.receive(Data(3, b"zz").encode(), 0.2).send == []  # out of order: ignored
    out = s.receive(Data(2, b"bc").encode(), 0.3)
    assert out.send == [ack(2)] and not out.done and s.lingering
    assert w.committed and w.data == b"a" * 512 + b"bc"
    assert s.receive(Data(2, b"bc").encode(), 0.4).send == [ack(2)]  # lost final ACK
    out = s.timeout(out.deadline)  # type: ignore[arg-type]
    assert out.done and out.error is None and not w.aborted


def test_write_session_options_and_size_limit() -> None:
    w = MemoryWriter()
    s = WriteSession(w, {"blksize": "16", "tsize": "40", "windowsize": "8"}, limits=Limits(upload_max_bytes=40))
    out = s.start(0)
    assert decode(out.send[0]) == OptionAck({"blksize": "16", "tsize": "40"})
    assert s.receive(Data(1, b"x" * 16).encode(), 0.1).send == [ack(1)]
    assert s.receive(Data(2, b"x" * 16).encode(), 0.2).send == [ack(2)]
    out = s.receive(Data(3, b"x" * 16).encode(), 0.3)  # 48 > 40
    assert out.done and decode(out.send[0]).code == ErrorCode.DISK_FULL  # type: ignore[union-attr]
    assert w.aborted and not w.committed


def test_write_session_refuses_announced_oversize() -> None:
    w = MemoryWriter()
    s = WriteSession(w, {"tsize": "1000"}, limits=Limits(upload_max_bytes=999))
    out = s.start(0)
    assert out.done and decode(out.send[0]).code == ErrorCode.DISK_FULL  # type: ignore[union-attr]
    assert w.aborted


def test_write_session_times_out_and_aborts() -> None:
    w = MemoryWriter()
    s = WriteSession(w, limits=Limits(retries=2))
    out = s.start(0)
    n = 0
    while not out.done:
        out = s.timeout(out.deadline)  # type: ignore[arg-type]
        n += 1
    assert n == 3 and w.aborted and out.error and "timed out" in out.error


def test_write_session_netascii_and_oversized_block() -> None:
    w = MemoryWriter()
    s = WriteSession(w, {}, "netascii")
    s.start(0)
    s.receive(Data(1, (b"ab\r\nc\r" + b"\x00" * 506)).encode(), 0)  # CR, then NUL continues in next bytes
    s.receive(Data(2, b"\r\nend\r").encode(), 0)
    assert w.committed and w.data == b"ab\nc\r" + b"\x00" * 505 + b"\nend\r"
    w = MemoryWriter()
    s = WriteSession(w)
    s.start(0)
    out = s.receive(Data(1, b"x" * 513).encode(), 0)
    assert out.done and w.aborted and decode(out.send[0]).code == ErrorCode.ILLEGAL_OPERATION  # type: ignore[union-attr]


# -- reading ahead in chunks -------------------------------------------------------------


class RecordingReader(TrackingReader):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.requests: list[int] = []

    def read(self, n: int) -> bytes:
        self.requests.append(n)
        return super().read(n)


@pytest.mark.parametrize("blksize,windowsize", [(512, 1), (1468, 1), (1468, 16), (65464, 1), (8, 4)])
def test_reads_whole_chunks_not_blocks(blksize: int, windowsize: int) -> None:
    content = random.Random(blksize).randbytes(200_000)
    reader = RecordingReader(content)
    limits = Limits(max_blksize=65464)
    s = ReadSession(reader, {"blksize": str(blksize), "windowsize": str(windowsize)}, limits=limits)
    s.start(0)
    out = s.receive(ack(0), 0)
    got = []
    while not out.done:
        ps = data_packets(out)
        got += [p.payload for p in ps]
        out = s.receive(ack(ps[-1].block), 0)
    assert out.error is None and b"".join(got) == content
    assert all(len(p) == blksize for p in got[:-1]) and len(got[-1]) < blksize
    # Whole blocks per read, at most read_chunk bytes (or one block if larger).
    chunk = max(blksize, limits.read_chunk // blksize * blksize)
    assert set(reader.requests) == {chunk}
    assert len(reader.requests) == -(-len(content) // chunk) + 1  # the last one finds the end
    assert reader.close_calls == 1


def test_a_file_is_never_read_ahead_by_more_than_a_chunk() -> None:
    reader = RecordingReader(bytes(1_000_000))
    s = ReadSession(reader, limits=Limits(read_chunk=4096))
    out = s.start(0)
    n = 1
    while not out.done:
        consumed = reader._pos  # what the session took from the reader so far
        assert consumed - 512 * n < 4096
        out = s.receive(ack(n), 0)
        n += 1
    assert set(reader.requests) == {4096}


def test_reader_returning_more_than_asked_is_a_read_error() -> None:
    class Greedy(TrackingReader):
        def read(self, n: int) -> bytes:
            return super().read(n + 1)

    reader = Greedy(bytes(100_000))
    s = ReadSession(reader)
    out = s.start(0)
    assert out.done and "more than requested" in (out.error or "")
    assert decode(out.send[0]) == Error(0, "read error")
    assert reader.close_calls == 1


def test_failure_in_a_later_chunk_is_a_read_error() -> None:
    class FailsLater(TrackingReader):
        def read(self, n: int) -> bytes:
            if self._pos >= 16384:
                raise OSError("disk on fire")
            return super().read(n)

    reader = FailsLater(bytes(100_000))
    s = ReadSession(reader)
    out = s.start(0)
    n = 1
    while not out.done:
        assert blocks(out) == [n]
        out = s.receive(ack(n), 0)
        n += 1
    assert n == 16384 // 512 + 1  # every block of the first chunk went out first
    assert "disk on fire" in (out.error or "") and decode(out.send[0]) == Error(0, "read error")
    assert reader.close_calls == 1


# -- Karn's rule ------------------------------------------------------------------------------


def test_no_rtt_sample_from_a_retransmitted_block() -> None:
    s = ReadSession(BytesReader(bytes(512 * 10)))
    s.start(0.0)
    assert blocks(s.timeout(1.0)) == [1]  # resent; the RTO backs off to 2 s
    out = s.receive(ack(1), 1.001)
    # The ACK may answer either copy: no sample (RTT 1.001 would give a 3 s
    # RTO), the back-off ends and the initial 1 s RTO applies again.
    assert blocks(out) == [2] and out.deadline == pytest.approx(2.001)
    out = s.receive(ack(2), 1.011)  # block 2 was sent once: a 10 ms sample
    assert blocks(out) == [3] and out.deadline == pytest.approx(1.211)  # the 0.2 s floor


def test_no_rtt_sample_from_blocks_resent_by_a_window_restart() -> None:
    s = ReadSession(BytesReader(bytes(64 * 20)), {"blksize": "8", "windowsize": "4"}, limits=Limits(max_blksize=8))
    s.start(0.0)
    assert blocks(s.receive(ack(0), 0.0)) == [1, 2, 3, 4]
    assert blocks(s.receive(ack(1), 0.9)) == [2, 3, 4, 5]  # 2, 3 and 4 are sent again
    out = s.receive(ack(4), 1.8)  # block 4 was resent: no sample (RTT 1.8 or 0.9?)
    assert blocks(out) == [5, 6, 7, 8]
    # The RTO still comes from the samples of the OACK (0 s) and block 1
    # (0.9 s): SRTT 0.1125, RTTVAR 0.225, RTO = SRTT + 4 RTTVAR.
    assert out.deadline == pytest.approx(1.8 + 0.1125 + 4 * 0.225)
