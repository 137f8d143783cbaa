"""Unit tests for the Twisted layer of the TFTP server (zprovd.tftp.service).

Most tests use a fake reactor: ``twisted.internet.task.Clock`` with reader
registration for the server's sockets (listening and transfer), which are
real loopback sockets: a test's clients are real sockets too, and
:meth:`FakeReactor.deliver` sends their datagrams and then reads the
sockets that are readable, one ``doRead`` per event as the reactor does.
So time is fully controlled and the I/O is the kernel's.  A sender no
socket can have (a broadcast address, port 0) is simulated with
:meth:`FakeReactor.inject`.  A few tests run on the real reactor through
pytest-twisted.
"""

from __future__ import annotations

import os
import select
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from conftest import needs_ipv6

from zprovd.tftp.packets import Ack, Data, Error, ErrorCode, OptionAck, ReadRequest, WriteRequest, decode
from zprovd.tftp.service import ListeningSocket, TFTPServer
from zprovd.uploads import UploadWriter, upload_name
from zprovd.tftp.source import AccessDenied, BytesReader, DirectorySource, FileReader, SourceError, safe_relative_name


def _client_socket(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setblocking(False)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    return sock


# The test clients: real loopback sockets, for the whole module (each
# FakeReactor empties them first).
_CLIENTS = [_client_socket() for _ in range(3)]
CLIENT, OTHER, OTHER2 = (s.getsockname() for s in _CLIENTS)


# -- fake network -------------------------------------------------------------------


class FakeReactor(Clock):
    """A Clock with ``addReader`` for the server's sockets, and the test's client sockets."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list[Any] = []
        self.clients = {s.getsockname(): s for s in _CLIENTS}
        for sock in self.clients.values():
            _drain(sock)

    @property
    def ports(self) -> dict[int, Any]:
        """Every open port of the server: listening and transfer ones."""
        return {r.port: r for r in self.readers}

    def addReader(self, reader: Any) -> None:
        assert reader not in self.readers
        self.readers.append(reader)

    def removeReader(self, reader: Any) -> None:
        if reader in self.readers:
            self.readers.remove(reader)

    def client(self, family: socket.AddressFamily = socket.AF_INET) -> tuple[str, int]:
        """One more client socket, for this test only."""
        sock = _client_socket(family)
        self.clients[sock.getsockname()[:2]] = sock
        return sock.getsockname()[:2]

    def close_client(self, addr: tuple[str, int]) -> None:
        self.clients.pop(addr).close()

    def deliver(self, port: int, datagram: bytes, sender: tuple[str, int] = CLIENT) -> None:
        """``sender`` sends ``datagram`` to ``port``; then the reactor turns until nothing is readable."""
        self.clients[sender].sendto(datagram, (self.ports[port].socket.getsockname()[0], port))
        self.run_io()

    def inject(self, port: int, datagram: bytes, sender: tuple[Any, ...]) -> None:
        """As if the listening ``port`` had read ``datagram`` from ``sender``, an address no test socket can have."""
        listening = self.ports[port]
        assert isinstance(listening, ListeningSocket)
        listening._received(datagram, sender, (listening.host, 0))
        self.run_io()

    def run_io(self) -> None:
        """What the reactor does with readable sockets: one doRead per event, level-triggered."""
        for _ in range(1000):
            readable, _, _ = select.select(self.readers, [], [], 0)
            if not readable:
                return
            for reader in readable:
                if reader in self.readers:
                    reader.doRead()
        raise AssertionError("the server's sockets never stopped being readable")

    def lose(self, port: int) -> None:
        """What the reactor does on an error event with nothing to read."""
        (reader,) = [r for r in self.readers if r.port == port]
        self.removeReader(reader)
        reader.connectionLost(Failure(ConnectionDone()))

    def take(self) -> list[tuple[int, tuple[str, int], Any]]:
        """What the clients got, client by client, each in order: (from port, to client, packet)."""
        out = []
        for addr, sock in self.clients.items():
            for datagram, source in _drain(sock):
                out.append((source[1], addr, decode(datagram)))
        return out


def _drain(sock: socket.socket) -> list[tuple[bytes, Any]]:
    got = []
    while True:
        try:
            got.append(sock.recvfrom(65536))
        except BlockingIOError:
            return got


class TrackingSource:
    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.readers: list[BytesReader] = []
        self.calls: list[tuple[str, tuple[str, int]]] = []

    def __call__(self, name: str, client: tuple[str, int]) -> defer.Deferred[Any]:
        self.calls.append((name, client))
        if name == "denied":
            return defer.fail(AccessDenied("no"))
        if name == "boom":
            return defer.fail(RuntimeError("renderer exploded"))
        if name == "down":
            return defer.fail(SourceError("backend unavailable"))
        if name not in self.files:
            return defer.succeed(None)
        reader = BytesReader(self.files[name])
        self.readers.append(reader)
        return defer.succeed(reader)


@pytest.fixture
def events() -> list[dict[str, Any]]:
    return []


def make_server(source: Any, events: list[dict[str, Any]], **kw: Any) -> tuple[TFTPServer, FakeReactor, int]:
    reactor = FakeReactor()
    server = TFTPServer([("127.0.0.1", 0)], source, reactor=reactor, log=Logger(observer=events.append), **kw)
    server.startService()
    ((host, port),) = server.listening_ports()
    assert host == "127.0.0.1" and list(reactor.ports) == [port]
    return server, reactor, port


def no_errors_logged(events: list[dict[str, Any]]) -> bool:
    return not any(e["log_level"] in (LogLevel.error, LogLevel.critical) for e in events)


# -- read transfers ---------------------------------------------------------------------


def test_read_transfer_from_its_own_port(events: list[dict[str, Any]]) -> None:
    source = TrackingSource({"a.cfg": b"x" * 700})
    server, net, lp = make_server(source, events)
    net.deliver(lp, ReadRequest("a.cfg").encode())
    ((src, dst, pkt),) = net.take()
    assert src != lp and dst == CLIENT and pkt == Data(1, b"x" * 512)
    assert source.calls == [("a.cfg", CLIENT)]
    net.deliver(src, Ack(1).encode())
    assert net.take() == [(src, CLIENT, Data(2, b"x" * 188))]
    net.deliver(src, Ack(2).encode())
    assert net.take() == []
    assert src not in net.ports and server.transfers_in_flight() == 0
    assert source.readers[0].closed
    assert net.getDelayedCalls() == []
    assert no_errors_logged(events)
    assert server.retransmissions == 0


def test_transfer_socket_is_connected_and_strays_do_not_disturb(events: list[dict[str, Any]]) -> None:
    server, net, lp = make_server(TrackingSource({"f": b"y" * 1500}), events)
    net.deliver(lp, ReadRequest("f").encode())
    ((tp, _, _),) = net.take()
    assert net.ports[tp].socket.getpeername() == CLIENT
    stray = net.client()
    net.deliver(tp, Ack(1).encode(), sender=OTHER)
    net.deliver(tp, Error(0, "go away").encode(), sender=stray)
    # The kernel drops them (ICMP port unreachable); nothing reaches the session.
    assert net.take() == [] and server.transfers_in_flight() == 1
    net.deliver(tp, Ack(1).encode())
    assert net.take() == [(tp, CLIENT, Data(2, b"y" * 512))]
    assert server.transfers_in_flight() == 1 and server.retransmissions == 0


@pytest.mark.parametrize("sender", [("255.255.255.255", 5000), ("127.0.0.1", 0)])
def test_a_client_that_cannot_be_answered_gets_silence(events: list[dict[str, Any]], sender: tuple[str, int]) -> None:
    source = TrackingSource({"f": b"y" * 1500})
    server, net, lp = make_server(source, events)
    net.inject(lp, ReadRequest("f").encode(), sender)
    assert net.take() == [] and server.transfers_in_flight() == 0 and list(net.ports) == [lp]
    assert all(r.closed for r in source.readers)
    assert no_errors_logged(events)
    net.deliver(lp, ReadRequest("f").encode())  # the server goes on serving
    ((tp, _, pkt),) = net.take()
    assert pkt == Data(1, b"y" * 512)


def test_a_datagram_that_breaks_the_handler_does_not_close_the_listening_port(events: list[dict[str, Any]]) -> None:
    server, net, lp = make_server(TrackingSource({"f": b"ok"}), events)
    listening = net.ports[lp]
    handle = listening._received
    broken: list[bytes] = []

    def breaks_once(datagram: bytes, address: Any, local: Any) -> None:
        if not broken:
            broken.append(datagram)
            raise RuntimeError("a bug in the handler")
        handle(datagram, address, local)

    listening._received = breaks_once
    net.deliver(lp, ReadRequest("f").encode())
    assert net.take() == [] and broken and list(net.ports) == [lp]
    assert [e["log_failure"].getErrorMessage() for e in events if "log_failure" in e] == ["a bug in the handler"]
    net.deliver(lp, ReadRequest("f").encode())  # the next datagram is served
    ((_, _, packet),) = net.take()
    assert packet == Data(1, b"ok")


def test_client_gone_ends_the_transfer_quietly(events: list[dict[str, Any]]) -> None:
    """ECONNREFUSED (ICMP port unreachable on a connected socket) ends the transfer."""
    source = TrackingSource({"f": bytes(5000), "g": bytes(5000)})
    server, net, lp = make_server(source, events)
    # Reported by a read: the client's ACK is read, DATA 2 finds its port
    # closed, and the socket is readable with the error.
    first = net.client()
    net.deliver(lp, ReadRequest("f").encode(), sender=first)
    ((tp, _, _),) = net.take()
    net.clients[first].sendto(Ack(1).encode(), ("127.0.0.1", tp))
    net.close_client(first)
    net.run_io()
    assert server.transfers_in_flight() == 0 and tp not in net.ports
    assert source.readers[0].closed
    # Reported by a send: a window of two, sent again after the client
    # closed; the first DATA draws the ICMP error, the second's send fails.
    second = net.client()
    net.deliver(lp, ReadRequest("g", "octet", {"windowsize": "2"}).encode(), sender=second)
    ((tp2, _, oack),) = net.take()
    assert oack == OptionAck({"windowsize": "2"})
    net.deliver(tp2, Ack(0).encode(), sender=second)
    assert [p.block for _, _, p in net.take()] == [1, 2]
    net.close_client(second)
    net.advance(1.0)  # the timeout: both again
    assert server.transfers_in_flight() == 0 and tp2 not in net.ports
    assert source.readers[1].closed and server.retransmissions == 1
    # The reactor reports an error event with nothing to read.
    net.deliver(lp, ReadRequest("f").encode(), sender=OTHER2)
    ((tp3, _, _),) = net.take()
    net.lose(tp3)
    assert server.transfers_in_flight() == 0 and source.readers[2].closed
    assert net.take() == [] and net.getDelayedCalls() == []
    assert no_errors_logged(events) and not any("log_failure" in e for e in events)
    ended = [str(e.get("error")) for e in events if "ended after" in e.get("log_format", "")]
    assert ended[:2] == ["the client's port is closed (ICMP port unreachable)"] * 2
    assert ended[2] == "the reactor dropped the transfer socket"


def test_retransmission_on_time_with_the_lazy_timer(events: list[dict[str, Any]]) -> None:
    """ACKs move the deadline without moving the timer; it still fires on time."""
    server, net, lp = make_server(TrackingSource({"f": bytes(512 * 40)}), events)
    net.deliver(lp, ReadRequest("f", "octet", {"timeout": "2"}).encode())
    ((tp, _, _),) = net.take()
    net.advance(0.5)
    net.deliver(tp, Ack(0).encode())  # the deadline moves to 2.5
    assert net.take() == [(tp, CLIENT, Data(1, bytes(512)))]
    (timer,) = net.getDelayedCalls()
    scheduled = timer.getTime()
    assert scheduled == 2.0  # armed for the OACK, not moved by ACK 0
    # (Steps of 1/8 s keep the clock's arithmetic exact.)
    for n in range(1, 12):  # 11 ACKs before 2.0: the deadline moves 11 times, the timer never
        net.advance(0.125)
        net.deliver(tp, Ack(n).encode())
        assert net.take() == [(tp, CLIENT, Data(n + 1, bytes(512)))]
        assert net.getDelayedCalls() == [timer] and timer.getTime() == scheduled
    assert net.seconds() == 1.875  # DATA 12 is due again at 3.875
    net.advance(1.875)
    assert net.take() == []  # the timer fired at 2.0 and only re-armed itself
    assert len(net.getDelayedCalls()) == 1 and server.retransmissions == 0
    net.advance(0.125)
    assert net.take() == [(tp, CLIENT, Data(12, bytes(512)))]
    assert net.seconds() == 3.875 and server.retransmissions == 1
    net.advance(1.875)
    assert net.take() == []
    net.advance(0.125)  # the client's fixed timeout: 2 s later again, no back-off
    assert net.take() == [(tp, CLIENT, Data(12, bytes(512)))]
    assert server.retransmissions == 2 and len(net.getDelayedCalls()) == 1


def test_deadline_moving_earlier_reschedules_the_timer(events: list[dict[str, Any]]) -> None:
    """The adaptive RTO shrinks after the first RTT sample: no late retransmission."""
    server, net, lp = make_server(TrackingSource({"f": bytes(5000)}), events)
    net.deliver(lp, ReadRequest("f").encode())
    ((tp, _, _),) = net.take()  # DATA 1; initial RTO 1 s
    net.advance(0.01)
    net.deliver(tp, Ack(1).encode())  # RTT 10 ms: the RTO drops to its 0.2 s floor
    assert net.take() == [(tp, CLIENT, Data(2, bytes(512)))]
    (timer,) = net.getDelayedCalls()
    assert timer.getTime() == pytest.approx(0.21)
    net.advance(0.199)
    assert net.take() == []
    net.advance(0.001)
    assert net.take() == [(tp, CLIENT, Data(2, bytes(512)))]
    assert server.retransmissions == 1


def test_timeouts_free_the_session(events: list[dict[str, Any]]) -> None:
    source = TrackingSource({"f": b"z" * 5000})
    server, net, lp = make_server(source, events, retries=3)
    net.deliver(lp, ReadRequest("f").encode())
    ((tp, _, first),) = net.take()
    sends = 1
    for _ in range(50):
        if not net.getDelayedCalls():
            break
        net.advance(net.getDelayedCalls()[0].getTime() - net.seconds())
        sends += len(net.take())
    assert sends == 4  # the original and 3 retransmissions
    assert server.retransmissions == 3
    assert tp not in net.ports and server.transfers_in_flight() == 0
    assert source.readers[0].closed
    assert net.getDelayedCalls() == []
    assert net.seconds() < 20  # 1 + 2 + 4 + 5 (capped back-off) seconds
    assert any("timed out" in str(e.get("error")) for e in events)


def test_oack_and_options(events: list[dict[str, Any]]) -> None:
    server, net, lp = make_server(TrackingSource({"f": bytes(3000)}), events, max_blksize=1024)
    net.deliver(lp, ReadRequest("f", "octet", {"blksize": "1468", "tsize": "0", "x": "y"}).encode())
    ((tp, _, pkt),) = net.take()
    assert pkt == OptionAck({"blksize": "1024", "tsize": "3000"})
    net.deliver(tp, Ack(0).encode())
    assert net.take() == [(tp, CLIENT, Data(1, bytes(1024)))]
    net.deliver(tp, Error(ErrorCode.NOT_DEFINED, "changed my mind").encode())
    assert server.transfers_in_flight() == 0 and tp not in net.ports


def test_duplicate_request_is_served_once(events: list[dict[str, Any]]) -> None:
    source = TrackingSource({"f": bytes(3000)})
    server, net, lp = make_server(source, events)
    request = ReadRequest("f").encode()
    net.deliver(lp, request)
    net.deliver(lp, request)
    assert len(net.take()) == 1 and server.transfers_in_flight() == 1 and len(source.calls) == 1
    net.deliver(lp, request, sender=OTHER)  # another client: a second transfer
    assert server.transfers_in_flight() == 2


def test_one_client_address_cannot_take_every_transfer(events: list[dict[str, Any]]) -> None:
    source = TrackingSource({"f": bytes(3000)})
    server, net, lp = make_server(source, events, max_transfers_per_client=2)
    net.deliver(lp, ReadRequest("f").encode())
    net.deliver(lp, ReadRequest("f", "octet", {"x": "1"}).encode(), sender=OTHER)  # the same host
    net.deliver(lp, ReadRequest("f", "octet", {"x": "2"}).encode(), sender=OTHER2)
    sent = net.take()
    assert sent[-1] == (lp, OTHER2, Error(ErrorCode.NOT_DEFINED, "server busy"))
    assert server.transfers_in_flight() == 2
    busy = [e for e in events if "too many transfers from it" in e.get("log_format", "")]
    net.inject(lp, ReadRequest("f").encode(), ("127.0.0.2", 6000))  # another host is not refused
    assert [e for e in events if "too many transfers from it" in e.get("log_format", "")] == busy
    assert len(busy) == 1 and len(source.calls) == 3
    (tp, _, first) = sent[0]
    for block in range(1, 7):  # the first transfer ends: its place is free again
        net.deliver(tp, Ack(block).encode())
    assert server.transfers_in_flight() == 1 and server._per_client == {"127.0.0.1": 1}
    net.deliver(lp, ReadRequest("f", "octet", {"x": "3"}).encode(), sender=OTHER2)
    assert server.transfers_in_flight() == 2


def test_every_way_a_request_ends_gives_its_place_back(events: list[dict[str, Any]], tmp_path: Path) -> None:
    server, net, lp = make_server(TrackingSource({"f": bytes(100)}), events, upload_dir=tmp_path)
    for name in ("missing", "denied", "boom", "down"):  # not found, access violation, internal error, source error
        net.deliver(lp, ReadRequest(name).encode())
    net.deliver(lp, WriteRequest("not-a-log.txt").encode())  # refused upload
    net.deliver(lp, ReadRequest("f").encode(), sender=OTHER)
    net.deliver(lp, ReadRequest("f", "octet", {"x": "1"}).encode(), sender=OTHER2)
    transfers = [(port, peer) for port, peer, pkt in net.take() if port != lp]
    assert len(transfers) == 2
    net.deliver(transfers[0][0], Ack(1).encode(), sender=transfers[0][1])  # completed
    net.deliver(transfers[1][0], Error(ErrorCode.NOT_DEFINED, "bye").encode(), sender=transfers[1][1])  # abandoned
    assert server.transfers_in_flight() == 0 and server._per_client == {}


@pytest.mark.parametrize(
    "name,code,message",
    [
        ("missing", ErrorCode.FILE_NOT_FOUND, "file not found"),
        ("denied", ErrorCode.ACCESS_VIOLATION, "access violation"),
        ("boom", ErrorCode.NOT_DEFINED, "internal error"),
        ("down", ErrorCode.NOT_DEFINED, "backend unavailable"),  # the source logged why: no traceback
    ],
)
def test_source_answers(events: list[dict[str, Any]], name: str, code: int, message: str) -> None:
    server, net, lp = make_server(TrackingSource({}), events)
    net.deliver(lp, ReadRequest(name).encode())
    assert net.take() == [(lp, CLIENT, Error(code, message))]
    assert server.transfers_in_flight() == 0 and list(net.ports) == [lp]
    failures = [e for e in events if "log_failure" in e]
    if name == "boom":
        assert len(failures) == 1  # logged once, with the failure (the client got only "internal error")
    else:
        assert failures == []


@pytest.mark.parametrize(
    "datagram,answer",
    [
        (b"\x00\x01f\x00octet\x00blksize\x00abc\x00", Error(ErrorCode.OPTION_REFUSED, "bad option")),
        (b"\x00\x01f\x00octet\x00blksize\x00" + b"9" * 31 + b"\x00", Error(ErrorCode.OPTION_REFUSED, "bad option")),
        (b"\x00\x01f\x00octet", Error(ErrorCode.ILLEGAL_OPERATION, "illegal operation")),
        (b"\x00\x01f", Error(ErrorCode.ILLEGAL_OPERATION, "illegal operation")),
        (b"\x00\x09", Error(ErrorCode.ILLEGAL_OPERATION, "illegal operation")),
        (b"\x00\x01f\x00mail\x00", Error(ErrorCode.ILLEGAL_OPERATION, "unsupported mode")),
        (Ack(3).encode(), Error(ErrorCode.ILLEGAL_OPERATION, "illegal operation")),
        (b"\x00\x05\x00\x01oops", None),  # an ERROR: silence
        (b"\x00\x05", None),
        (b"\x07", None),
        (b"", None),
    ],
)
def test_malformed_requests(events: list[dict[str, Any]], datagram: bytes, answer: Error | None) -> None:
    server, net, lp = make_server(TrackingSource({"f": b"1"}), events)
    net.deliver(lp, datagram)
    assert net.take() == ([] if answer is None else [(lp, CLIENT, answer)])
    assert server.transfers_in_flight() == 0
    assert no_errors_logged(events)
    assert all(e["log_level"] == LogLevel.debug for e in events if "malformed" in str(e.get("log_format")))


# -- uploads --------------------------------------------------------------------------


def test_wrq_refused_without_upload_dir(events: list[dict[str, Any]]) -> None:
    server, net, lp = make_server(TrackingSource({}), events)
    net.deliver(lp, WriteRequest("0004f2aabbcc-boot.log").encode())
    assert net.take() == [(lp, CLIENT, Error(ErrorCode.ACCESS_VIOLATION, "access violation"))]
    assert server.transfers_in_flight() == 0


@pytest.mark.parametrize(
    "name", ["evil.cfg", "../0004f2aabbcc-boot.log", "sub/0004f2aabbcc-app.log", "0004f2aabbcc-boot.log.sh", "0004f2aabbc-app.log"]
)
def test_wrq_bad_names_refused(events: list[dict[str, Any]], tmp_path: Path, name: str) -> None:
    server, net, lp = make_server(TrackingSource({}), events, upload_dir=tmp_path)
    net.deliver(lp, WriteRequest(name).encode())
    assert net.take() == [(lp, CLIENT, Error(ErrorCode.ACCESS_VIOLATION, "access violation"))]
    assert list(tmp_path.iterdir()) == []


def test_wrq_upload_lands_atomically(events: list[dict[str, Any]], tmp_path: Path) -> None:
    server, net, lp = make_server(TrackingSource({}), events, upload_dir=tmp_path)
    net.deliver(lp, WriteRequest("/0004F2AABBCC-app.log", "octet", {"tsize": "600"}).encode())
    ((tp, _, pkt),) = net.take()
    assert pkt == OptionAck({"tsize": "600"})
    net.deliver(tp, Data(1, b"l" * 512).encode())
    assert net.take() == [(tp, CLIENT, Ack(1))]
    assert not (tmp_path / "0004f2aabbcc-app.log").exists()  # only the temporary file so far
    net.deliver(tp, Data(2, b"m" * 88).encode())
    assert net.take() == [(tp, CLIENT, Ack(2))]
    assert (tmp_path / "0004f2aabbcc-app.log").read_bytes() == b"l" * 512 + b"m" * 88
    assert [p.name for p in tmp_path.iterdir()] == ["0004f2aabbcc-app.log"]
    net.advance(10)  # dally ends
    assert server.transfers_in_flight() == 0 and net.getDelayedCalls() == []


def test_wrq_over_limit_removes_partial_file(events: list[dict[str, Any]], tmp_path: Path) -> None:
    server, net, lp = make_server(TrackingSource({}), events, upload_dir=tmp_path, upload_max_bytes=1000)
    net.deliver(lp, WriteRequest("0004f2aabbcc-boot.log").encode())
    ((tp, _, _),) = net.take()
    net.deliver(tp, Data(1, bytes(512)).encode())
    net.deliver(tp, Data(2, bytes(512)).encode())
    assert net.take()[-1] == (tp, CLIENT, Error(ErrorCode.DISK_FULL, "file too large"))
    assert list(tmp_path.iterdir()) == []
    assert server.transfers_in_flight() == 0


def test_accept_upload_decides_each_write_request(events: list[dict[str, Any]], tmp_path: Path) -> None:
    decisions: list[tuple[str, defer.Deferred[Any]]] = []

    def accept_upload(name: str, client: tuple[str, int]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        decisions.append((name, d))
        return d

    server, net, lp = make_server(TrackingSource({}), events, upload_dir=tmp_path, accept_upload=accept_upload)
    net.deliver(lp, WriteRequest("key/0004f2aabbcc-app.log").encode())
    net.deliver(lp, WriteRequest("other.log", "octet").encode(), sender=OTHER)
    assert net.take() == [] and [n for n, _ in decisions] == ["key/0004f2aabbcc-app.log", "other.log"]
    decisions[1][1].callback(None)
    assert net.take() == [(lp, OTHER, Error(ErrorCode.ACCESS_VIOLATION, "access violation"))]
    decisions[0][1].callback("0004f2aabbcc-app.log")
    ((tp, _, pkt),) = net.take()
    assert pkt == Ack(0)
    net.deliver(tp, Data(1, b"log").encode())
    assert net.take() == [(tp, CLIENT, Ack(1))]
    assert (tmp_path / "0004f2aabbcc-app.log").read_bytes() == b"log"
    # A decision still pending when the server stops is cancelled.
    net.deliver(lp, WriteRequest("0004f2aabbcc-boot.log").encode(), sender=OTHER2)
    server.stopService()
    assert decisions[-1][1].called and net.take() == []
    assert no_errors_logged(events)


def test_a_failing_upload_hook_gets_internal_error(events: list[dict[str, Any]], tmp_path: Path) -> None:
    def accept_upload(name: str, client: tuple[str, int]) -> defer.Deferred[Any]:
        raise RuntimeError("backend exploded")

    server, net, lp = make_server(TrackingSource({}), events, upload_dir=tmp_path, accept_upload=accept_upload)
    net.deliver(lp, WriteRequest("0004f2aabbcc-app.log").encode())
    assert net.take() == [(lp, CLIENT, Error(ErrorCode.NOT_DEFINED, "internal error"))]
    assert server.transfers_in_flight() == 0 and list(tmp_path.iterdir()) == []
    assert len([e for e in events if "log_failure" in e]) == 1  # logged once, with the failure
    net.deliver(lp, WriteRequest("0004f2aabbcc-app.log").encode())  # forgotten: asked again, answered again
    assert net.take() == [(lp, CLIENT, Error(ErrorCode.NOT_DEFINED, "internal error"))]


def test_upload_name_and_writer(tmp_path: Path) -> None:
    assert upload_name("0004F2AABBCC-boot.log") == "0004f2aabbcc-boot.log"
    assert upload_name("\\0004f2aabbcc-app.log") == "0004f2aabbcc-app.log"
    for bad in ["", "x-boot.log", "0004f2aabbcc-other.log", "a/0004f2aabbcc-app.log", "0004f2aabbcc-app.log\x01"]:
        assert upload_name(bad) is None
    with pytest.raises(ValueError):
        UploadWriter(tmp_path, "../x")
    # A symlink at the final name is replaced, not followed.
    outside = tmp_path / "outside"
    outside.write_bytes(b"keep")
    up = tmp_path / "up"
    up.mkdir()
    (up / "0004f2aabbcc-app.log").symlink_to(outside)
    w = UploadWriter(up, "0004f2aabbcc-app.log")
    w.write(b"new")
    w.commit()
    assert outside.read_bytes() == b"keep"
    assert not (up / "0004f2aabbcc-app.log").is_symlink()
    assert (up / "0004f2aabbcc-app.log").read_bytes() == b"new"


# -- shutdown ------------------------------------------------------------------------------


def test_stop_waits_for_transfers_then_frees(events: list[dict[str, Any]]) -> None:
    source = TrackingSource({"f": bytes(700)})
    server, net, lp = make_server(source, events)
    net.deliver(lp, ReadRequest("f").encode())
    ((tp, _, _),) = net.take()
    d = server.stopService()
    fired: list[Any] = []
    d.addCallback(fired.append)
    assert not fired and lp not in net.ports and tp in net.ports
    net.deliver(tp, Ack(1).encode())
    net.deliver(tp, Ack(2).encode())
    assert fired == [None] and net.ports == {} and net.getDelayedCalls() == []


def test_stop_is_bounded(events: list[dict[str, Any]]) -> None:
    source = TrackingSource({"f": bytes(70000)})
    server, net, lp = make_server(source, events, retries=1000, shutdown_timeout=30)
    net.deliver(lp, ReadRequest("f", "octet", {"timeout": "1"}).encode())
    ((tp, _, _),) = net.take()
    d = server.stopService()
    fired: list[Any] = []
    d.addCallback(fired.append)
    net.pump([1.0] * 29)
    assert not fired
    net.advance(1.0)
    assert fired == [None] and net.ports == {} and source.readers[0].closed
    assert net.take()[-1] == (tp, CLIENT, Error(0, "transfer aborted"))
    assert net.getDelayedCalls() == []


def test_stop_cancels_pending_lookups(events: list[dict[str, Any]]) -> None:
    lookups: list[defer.Deferred[Any]] = []

    def slow_source(name: str, client: tuple[str, int]) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        lookups.append(d)
        return d

    server, net, lp = make_server(slow_source, events)
    net.deliver(lp, ReadRequest("f").encode())
    fired: list[Any] = []
    server.stopService().addCallback(fired.append)
    assert fired == [None]
    assert lookups[0].called  # cancelled
    assert net.take() == [] and net.ports == {}


# -- sources ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [
        ("a.cfg", "a.cfg"),
        ("/a.cfg", "a.cfg"),
        ("dir/a.cfg", "dir/a.cfg"),
        ("dir\\sub\\a.cfg", "dir/sub/a.cfg"),
        ("\\a.cfg", "a.cfg"),
        ("./a//b/./c", "a/b/c"),
        ("", None),
        ("/", None),
        ("..", None),
        ("../etc/passwd", None),
        ("a/../../b", None),
        ("a\\..\\b", None),
        ("//etc/passwd", None),
        ("C:\\boot.ini", None),
        ("c:/x", None),
        ("a\x00b", None),
        ("a\nb", None),
        ("...", "..."),
    ],
)
def test_safe_relative_name(name: str, expected: str | None) -> None:
    assert safe_relative_name(name) == expected


def _result(d: defer.Deferred[Any]) -> Any:
    box: list[Any] = []
    d.addBoth(box.append)
    return box[0]


def test_directory_source(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "f.bin").write_bytes(b"hello")
    (tmp_path / "secret").write_bytes(b"no")
    (root / "escape").symlink_to(tmp_path / "secret")
    (root / "inside").symlink_to(root / "sub" / "f.bin")
    os.mkfifo(root / "fifo")
    src = DirectorySource(root)
    reader = _result(src("/sub\\f.bin", CLIENT))
    assert isinstance(reader, FileReader) and reader.size == 5
    assert reader.read(3) + reader.read(100) + reader.read(100) == b"hello"
    reader.close()
    assert _result(src("inside", CLIENT)).read(10) == b"hello"
    assert _result(src("missing", CLIENT)) is None
    assert _result(src("sub", CLIENT)) is None  # a folder
    assert _result(src("fifo", CLIENT)) is None  # never blocks on a FIFO
    for bad in ["escape", "../secret", "sub/../../secret", "/etc/passwd/..", "a\x00"]:
        failure = _result(src(bad, CLIENT))
        assert failure.check(AccessDenied), bad


def test_file_reader_never_reads_past_size(tmp_path: Path) -> None:
    path = tmp_path / "grow"
    path.write_bytes(b"12345")
    reader = FileReader(path)
    with open(path, "ab") as f:
        f.write(b"678")
    assert reader.read(100) == b"12345" and reader.read(100) == b""
    reader.close()
    reader.close()


# -- real loopback sockets -------------------------------------------------------------------


class Collector(DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[tuple[bytes, tuple[str, int]]] = []
        self.waiting: list[defer.Deferred[None]] = []

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.received.append((datagram, (addr[0], addr[1])))
        waiting, self.waiting = self.waiting, []
        for d in waiting:
            d.callback(None)

    def wait(self, count: int, timeout: float = 5.0) -> defer.Deferred[None]:
        from twisted.internet import reactor

        @defer.inlineCallbacks
        def run() -> Any:
            deadline = reactor.seconds() + timeout  # type: ignore[attr-defined]
            while len(self.received) < count:
                assert reactor.seconds() < deadline, f"only {len(self.received)} datagrams"  # type: ignore[attr-defined]
                d: defer.Deferred[None] = defer.Deferred()
                self.waiting.append(d)
                d.addTimeout(0.2, reactor)
                try:
                    yield d
                except defer.TimeoutError:
                    pass

        return run()


@pytest_twisted.inlineCallbacks
def test_wrong_tid_over_real_sockets() -> Any:
    """Another port's datagrams, even an ERROR, do not disturb a transfer."""
    from twisted.internet import reactor

    server = TFTPServer([("127.0.0.1", 0)], TrackingSource({"f": bytes(2000)}), shutdown_timeout=1)
    server.startService()
    client, intruder = Collector(), Collector()
    cport = reactor.listenUDP(0, client, interface="127.0.0.1")  # type: ignore[attr-defined]
    iport = reactor.listenUDP(0, intruder, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        host, port = server.listening_ports()[0]
        assert port != 0
        client.transport.write(ReadRequest("f").encode(), (host, port))
        yield client.wait(1)
        data, tid = client.received[0]
        assert decode(data) == Data(1, bytes(512)) and tid[1] != port
        # Would end the transfer if it reached the session, and its ACK would
        # move it on without the client.
        intruder.transport.write(Error(0, "abort").encode(), tid)
        intruder.transport.write(Ack(1).encode(), tid)
        yield _sleep(0.05)
        assert len(client.received) == 1 and server.transfers_in_flight() == 1
        for n in range(1, 5):
            client.transport.write(Ack(n).encode(), tid)
            if n < 4:
                yield client.wait(n + 1)
        assert [decode(d).block for d, _ in client.received] == [1, 2, 3, 4]  # type: ignore[union-attr]
        assert {a for _, a in client.received} == {tid}
        for _ in range(50):
            if server.transfers_in_flight() == 0:
                break
            yield _sleep(0.02)
        assert server.transfers_in_flight() == 0
        # The transfer port is connected: the kernel dropped the intruder's
        # datagrams (answering ICMP port unreachable), no ERROR 5 came back.
        assert intruder.received == []
    finally:
        yield server.stopService()
        yield cport.stopListening()
        yield iport.stopListening()


@pytest_twisted.inlineCallbacks
def test_client_going_away_ends_the_transfer_over_real_sockets() -> Any:
    """The client's port closes: ICMP port unreachable ends the transfer, no retransmissions."""
    events: list[dict[str, Any]] = []
    source = TrackingSource({"f": bytes(5000)})
    # With a 5 s timeout and 5 retries, timing out would take 30 s.
    server = TFTPServer([("127.0.0.1", 0)], source, retries=5, shutdown_timeout=1, log=Logger(observer=events.append))
    server.startService()
    # A plain socket, so that it can send its last ACK and close before the
    # server (same reactor) even reads that ACK: DATA 2 finds the port closed.
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    try:
        client.bind(("127.0.0.1", 0))
        client.sendto(ReadRequest("f", "octet", {"timeout": "5"}).encode(), server.listening_ports()[0])
        oack, tid = yield _receive(client)
        assert decode(oack) == OptionAck({"timeout": "5"})
        client.sendto(Ack(0).encode(), tid)
        data, _ = yield _receive(client)
        assert decode(data) == Data(1, bytes(512))
        client.sendto(Ack(1).encode(), tid)
        client.close()
        for _ in range(1000):
            if server.transfers_in_flight() == 0:
                break
            yield _sleep(0.02)
        assert server.transfers_in_flight() == 0 and source.readers[0].closed
        assert server.retransmissions == 0
        assert any("port unreachable" in str(e.get("error")) for e in events)
        assert no_errors_logged(events) and not any("log_failure" in e for e in events)
    finally:
        client.close()
        yield server.stopService()


@pytest_twisted.inlineCallbacks
def test_a_failing_session_ends_its_transfer_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a session: the reactor logs it and drops that socket; the transfer ends, the server goes on."""
    from zprovd.tftp import session as tftp_session

    events: list[dict[str, Any]] = []
    source = TrackingSource({"f": bytes(5000), "g": bytes(100)})
    server = TFTPServer([("127.0.0.1", 0)], source, shutdown_timeout=1, log=Logger(observer=events.append))
    server.startService()
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    try:
        client.bind(("127.0.0.1", 0))
        client.sendto(ReadRequest("f").encode(), server.listening_ports()[0])
        data, tid = yield _receive(client)
        assert decode(data) == Data(1, bytes(512))

        def broken(self: Any, datagram: bytes, now: float) -> Any:
            raise RuntimeError("a bug in the session")

        with monkeypatch.context() as m:
            m.setattr(tftp_session.ReadSession, "receive", broken)
            client.sendto(Ack(1).encode(), tid)
            for _ in range(250):
                if server.transfers_in_flight() == 0:
                    break
                yield _sleep(0.02)
        assert server.transfers_in_flight() == 0 and source.readers[0].closed
        ended = [str(e.get("error")) for e in events if "ended after" in e.get("log_format", "")]
        assert ended == ["the reactor dropped the transfer socket"]
        client.sendto(ReadRequest("g").encode(), server.listening_ports()[0])
        data, _ = yield _receive(client)
        assert decode(data) == Data(1, bytes(100))
    finally:
        client.close()
        yield server.stopService()


@defer.inlineCallbacks
def _receive(sock: socket.socket) -> Any:
    for _ in range(250):
        try:
            return sock.recvfrom(65536)
        except BlockingIOError:
            yield _sleep(0.02)
    raise AssertionError("nothing received")


def _sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


@pytest_twisted.inlineCallbacks
def test_real_socket_timeouts_free_the_port() -> Any:
    from twisted.internet import reactor

    source = TrackingSource({"f": bytes(2000)})
    server = TFTPServer([("127.0.0.1", 0)], source, retries=1, shutdown_timeout=1)
    server.startService()
    client = Collector()
    cport = reactor.listenUDP(0, client, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        host, port = server.listening_ports()[0]
        client.transport.write(ReadRequest("f", "octet", {"timeout": "1"}).encode(), (host, port))
        yield client.wait(2, timeout=5)  # OACK and one retransmission
        tid = client.received[0][1]
        for _ in range(100):
            if server.transfers_in_flight() == 0:
                break
            yield _sleep(0.05)
        assert server.transfers_in_flight() == 0 and source.readers[0].closed
        yield _sleep(0.05)
        # The transfer port is really closed: binding it again works.
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind(tid)
        finally:
            s.close()
    finally:
        yield server.stopService()
        yield cport.stopListening()


def test_privileged_start_binds_once_and_stop_unbinds(events: list[dict[str, Any]]) -> None:
    net = FakeReactor()
    server = TFTPServer([("127.0.0.1", 0)], TrackingSource({}), reactor=net, log=Logger(observer=events.append))
    server.privilegedStartService()
    ((_, lp),) = server.listening_ports()
    net.deliver(lp, ReadRequest("f").encode())
    assert net.take() == []  # bound but not accepting before startService
    server.startService()
    assert server.listening_ports() == [("127.0.0.1", lp)] and list(net.ports) == [lp]  # not bound again
    net.deliver(lp, ReadRequest("missing").encode())
    assert net.take() == [(lp, CLIENT, Error(ErrorCode.FILE_NOT_FOUND, "file not found"))]
    fired: list[Any] = []
    server.stopService().addCallback(fired.append)
    assert fired == [None] and net.ports == {} and server.listening_ports() == []


def test_a_listening_socket_the_reactor_drops_is_no_longer_listed(events: list[dict[str, Any]]) -> None:
    server, net, lp = make_server(TrackingSource({}), events)
    assert [port for _, port in server.listening_ports()] == [lp]
    net.lose(lp)  # as at reactor shutdown, with the service still running
    assert server.listening_ports() == []
    assert any("closed" in e.get("log_format", "") for e in events)


@needs_ipv6
def test_ipv6_listening_port_answers_from_its_address(events: list[dict[str, Any]]) -> None:
    net = FakeReactor()
    server = TFTPServer([("127.0.0.1", 0), ("::1", 0)], TrackingSource({"f": b"six"}), reactor=net,
                        log=Logger(observer=events.append))
    server.startService()
    (_, v4), (host, v6) = server.listening_ports()
    assert host == "::1" and sorted(net.ports) == sorted([v4, v6])
    client = net.client(socket.AF_INET6)
    net.deliver(v6, ReadRequest("missing").encode(), sender=client)
    assert net.take() == [(v6, client, Error(ErrorCode.FILE_NOT_FOUND, "file not found"))]
    net.deliver(v6, ReadRequest("f").encode(), sender=client)
    ((tp, to, packet),) = net.take()
    assert to == client and packet == Data(1, b"six") and net.ports[tp].socket.getpeername()[:2] == client
    net.deliver(tp, Ack(1).encode(), sender=client)
    assert server.transfers_in_flight() == 0 and no_errors_logged(events)
    server.stopService()


def test_stop_twice_while_draining(events: list[dict[str, Any]]) -> None:
    server, net, lp = make_server(TrackingSource({"f": bytes(700)}), events)
    net.deliver(lp, ReadRequest("f").encode())
    ((tp, _, _),) = net.take()
    fired: list[str] = []
    server.stopService().addCallback(lambda _: fired.append("first"))
    server.stopService().addCallback(lambda _: fired.append("second"))
    assert fired == []
    net.deliver(tp, Ack(1).encode())
    net.deliver(tp, Ack(2).encode())
    assert fired == ["first", "second"] and net.ports == {}
    # A later start/stop cycle works again.
    server.startService()
    assert [port for _, port in server.listening_ports()] == list(net.ports)
    server.stopService().addCallback(lambda _: fired.append("third"))
    assert fired[-1] == "third" and net.ports == {}
