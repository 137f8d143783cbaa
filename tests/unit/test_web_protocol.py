"""The Twisted protocol around httpcore, driven by a Clock and a string transport.

The provisioner is a stand-in that records the requests it gets and answers
with a fixed document, at once or later through a Deferred; everything
between the bytes and that answer is the real code.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from zprovd import httpcore, logs, web
from zprovd.provisioning import Response
from zprovd.web import HTTPFactory, InFlight

REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


class Provisioner:
    def __init__(self):
        self.requests = []
        self.later: list[Deferred] | None = None  # set: answer through Deferreds
        self.file = None  # set: answer with this firmware file
        self.config = SimpleNamespace(access=SimpleNamespace(trusted_proxies=[]),
                                      tftp=SimpleNamespace(upload_dir=None, upload_max_bytes=1 << 20))
        self.secret_params = {"password"}
        self.secret_segments: set[str] = set()

    def answer(self, request):
        self.requests.append(request)
        if self.file is not None:
            return Response(200, file=self.file, content_type="application/octet-stream", reason="firmware")
        response = Response(200, b"document for " + request.path.encode(), "text/plain", who="001565123456")
        if self.later is None:
            return response
        d = Deferred()
        d.addCallback(lambda _: response)
        self.later.append(d)
        return d


@pytest.fixture
def access(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(logs, "access", lines.append)
    return lines


def connect(clock: Clock, provisioner: Provisioner, inflight: InFlight | None = None):
    factory = HTTPFactory(lambda: provisioner, "http", clock, inflight)
    protocol = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 40000))
    protocol.makeConnection(transport)
    return protocol, transport


def test_a_request_is_answered_with_the_document(access):
    clock, provisioner = Clock(), Provisioner()
    protocol, transport = connect(clock, provisioner)
    protocol.dataReceived(b"GET /001565123456.cfg HTTP/1.1\r\nHost: prov\r\nUser-Agent: Yealink\r\n"
                          b"Authorization: Basic c2VjcmV0\r\n\r\n")
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Length: 30\r\n" in head + b"\r\n" and b"Cache-Control: no-store" in head
    assert body == b"document for /001565123456.cfg"
    request = provisioner.requests[0]
    assert (request.client, request.host, request.user_agent, request.authorization, request.method) == (
        "192.0.2.7", "prov", "Yealink", "Basic c2VjcmV0", "GET")
    assert not transport.disconnecting
    assert len(access) == 1 and access[0].startswith('http 192.0.2.7 "GET /001565123456.cfg" 200 30 ')
    assert "c2VjcmV0" not in access[0]


def test_the_access_line_hides_passwords(access):
    protocol, transport = connect(Clock(), Provisioner())
    protocol.dataReceived(b"GET /zoiper?user=alice;password=hunter2secret&version=1.14 HTTP/1.1\r\n\r\n")
    assert "hunter2secret" not in access[0] and "password=***" in access[0]


def test_head_gets_the_headers_only(access):
    protocol, transport = connect(Clock(), Provisioner())
    protocol.dataReceived(b"HEAD /a.cfg HTTP/1.1\r\n\r\n")
    assert transport.value().endswith(b"Content-Length: 19\r\n\r\n")


def test_other_methods_get_405(access):
    provisioner = Provisioner()
    protocol, transport = connect(Clock(), provisioner)
    protocol.dataReceived(b"POST /a.cfg HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc")
    assert transport.value().startswith(b"HTTP/1.1 405 Method Not Allowed\r\n")
    assert b"Allow: GET, HEAD\r\n" in transport.value()
    assert provisioner.requests == []


def test_http10_and_connection_close_close_after_the_response(access):
    for data in (b"GET /a HTTP/1.0\r\n\r\n", b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n"):
        protocol, transport = connect(Clock(), Provisioner())
        protocol.dataReceived(data + REQUEST)
        assert transport.value().count(b"HTTP/1.1 200") == 1 and b"Connection: close" in transport.value()
        assert transport.disconnecting


def test_pipelined_requests_are_answered_in_order_even_when_late(access):
    clock, provisioner = Clock(), Provisioner()
    provisioner.later = []
    inflight = InFlight()
    protocol, transport = connect(clock, provisioner, inflight)
    protocol.dataReceived(b"GET /one HTTP/1.1\r\n\r\nGET /two HTTP/1.1\r\n\r\n")
    assert [r.path for r in provisioner.requests] == ["/one"]  # the second waits for the first
    assert transport.value() == b"" and inflight.count == 1
    provisioner.later.pop(0).callback(None)
    assert [r.path for r in provisioner.requests] == ["/one", "/two"]
    assert transport.value().count(b"HTTP/1.1 200") == 1
    provisioner.later.pop(0).callback(None)
    answers = transport.value().split(b"HTTP/1.1 200 OK")
    assert answers[1].endswith(b"/one") and answers[2].endswith(b"/two")
    assert inflight.count == 0


def test_an_answer_for_a_client_that_went_away_is_dropped(access):
    clock, provisioner = Clock(), Provisioner()
    provisioner.later = []
    inflight = InFlight()
    protocol, transport = connect(clock, provisioner, inflight)
    protocol.dataReceived(REQUEST)
    protocol.connectionLost(None)
    provisioner.later.pop(0).callback(None)
    assert transport.value() == b"" and inflight.count == 0
    assert " 200 0 " in access[0]  # nothing sent


def test_reading_stops_while_too_much_is_buffered(access):
    clock, provisioner = Clock(), Provisioner()
    provisioner.later = []
    protocol, transport = connect(clock, provisioner)
    protocol.dataReceived(REQUEST)
    protocol.dataReceived(b"GET /" + b"a" * 1000 + b" HTTP/1.1\r\n" + b"X: y\r\n" * 14000)
    assert transport.producerState == "paused"
    provisioner.later.pop(0).callback(None)
    assert transport.producerState == "producing"  # reading again once the answer went out
    assert b"HTTP/1.1 431 " in transport.value()  # and the buffered oversized request is refused


def test_malformed_requests_are_refused_and_logged(access):
    protocol, transport = connect(Clock(), Provisioner())
    protocol.dataReceived(b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 414 ") and transport.disconnecting
    assert access == ['http 192.0.2.7 "-" 414 0 0.0ms who=- "request line too long"']


# The header deadline -------------------------------------------------------------


def test_headers_not_complete_in_time_get_408(access):
    clock = Clock()
    protocol, transport = connect(clock, Provisioner())
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n")
    clock.advance(httpcore.HEADER_DEADLINE - 0.5)
    protocol.dataReceived(b"X-Slow: 1\r\n")  # trickling does not move the deadline
    assert transport.value() == b""
    clock.advance(0.5)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_the_deadline_restarts_after_each_response_on_a_kept_alive_connection(access):
    clock = Clock()
    protocol, transport = connect(clock, Provisioner())
    for _ in range(3):
        clock.advance(httpcore.HEADER_DEADLINE - 1)
        protocol.dataReceived(REQUEST)
        assert b"HTTP/1.1 200 " in transport.value()
        transport.clear()
    assert len(clock.getDelayedCalls()) == 1  # one timer, re-armed lazily
    clock.advance(httpcore.HEADER_DEADLINE - 0.1)
    assert not transport.disconnecting
    protocol.dataReceived(b"GET /late")
    clock.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_an_idle_kept_alive_connection_is_closed_silently(access):
    clock = Clock()
    protocol, transport = connect(clock, Provisioner())
    protocol.dataReceived(REQUEST)
    transport.clear()
    clock.advance(httpcore.HEADER_DEADLINE + 0.1)
    assert transport.value() == b"" and transport.disconnecting


def test_a_closed_connection_leaves_no_timer(access):
    clock = Clock()
    protocol, transport = connect(clock, Provisioner())
    protocol.dataReceived(REQUEST)
    protocol.connectionLost(None)
    assert all(not call.active() for call in clock.getDelayedCalls())


def test_a_provisioner_failing_at_once_gives_500_and_the_connection_goes_on(access):
    provisioner = Provisioner()
    answer = provisioner.answer
    calls = []

    def broken(request):  # the first request hits a bug, the second does not
        calls.append(request)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return answer(request)

    provisioner.answer = broken
    protocol, transport = connect(Clock(), provisioner)
    protocol.dataReceived(REQUEST + REQUEST)
    assert transport.value().startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert transport.value().count(b"HTTP/1.1 200 OK") == 1 and not transport.disconnecting
    assert " 500 " in access[0]


def test_a_late_answer_failing_gives_500(access):
    clock, provisioner = Clock(), Provisioner()
    provisioner.later = []
    protocol, transport = connect(clock, provisioner)
    protocol.dataReceived(REQUEST)
    provisioner.later.pop(0).errback(RuntimeError("backend gone"))
    assert transport.value().startswith(b"HTTP/1.1 500 ")


# Clients that stop reading ----------------------------------------------------------


def test_a_closing_connection_whose_client_does_not_read_is_aborted(access):
    clock = Clock()
    protocol, transport = connect(clock, Provisioner())
    protocol.dataReceived(b"GET /a HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert transport.disconnecting and not transport.disconnected  # waiting for the bytes to go
    clock.advance(web.ABORT_AFTER)
    assert transport.disconnected  # aborted


def test_an_idle_connection_whose_client_does_not_read_is_aborted(access):
    clock = Clock()
    protocol, transport = connect(clock, Provisioner())
    protocol.dataReceived(REQUEST)
    clock.advance(httpcore.HEADER_DEADLINE)
    assert transport.disconnecting and not transport.disconnected
    clock.advance(web.ABORT_AFTER)
    assert transport.disconnected


def test_a_firmware_download_streams_and_the_connection_goes_on(access, tmp_path):
    clock, provisioner = Clock(), Provisioner()
    firmware = tmp_path / "fw.rom"
    firmware.write_bytes(bytes(range(256)) * 1000)
    provisioner.file = firmware
    protocol, transport = connect(clock, provisioner)
    protocol.dataReceived(b"GET /fw.rom HTTP/1.1\r\nRange: bytes=1000-\r\n\r\n")
    chunks = 0
    while transport.producer is not None:
        transport.producer.resumeProducing()
        chunks += 1
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 206 ") and b"Content-Range: bytes 1000-255999/256000" in head
    assert body == firmware.read_bytes()[1000:] and chunks == 4
    assert not transport.disconnecting and ' 206 255000 ' in access[0]
    assert clock.getDelayedCalls() and all(c.getTime() == httpcore.HEADER_DEADLINE for c in clock.getDelayedCalls()
                                           if c.active())  # the stall watch is gone


def test_a_firmware_download_the_client_stops_reading_is_aborted(access, tmp_path):
    clock, provisioner = Clock(), Provisioner()
    firmware = tmp_path / "fw.rom"
    firmware.write_bytes(b"x" * 1_000_000)
    provisioner.file = firmware
    protocol, transport = connect(clock, provisioner)
    protocol.dataReceived(b"GET /fw.rom HTTP/1.1\r\n\r\n")
    for _ in range(3):  # reading slowly is fine
        clock.advance(web.SEND_STALL - 1)
        transport.producer.resumeProducing()
    assert not transport.disconnecting
    clock.advance(web.SEND_STALL)
    assert transport.disconnected


def test_a_firmware_file_gone_since_the_look_up_gets_404_and_the_connection_goes_on(access, tmp_path):
    provisioner = Provisioner()
    provisioner.file = tmp_path / "gone.rom"
    inflight = InFlight()
    protocol, transport = connect(Clock(), provisioner, inflight)
    protocol.dataReceived(b"GET /gone.rom HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 404 ") and not transport.disconnecting
    assert inflight.count == 0 and '"firmware gone"' in access[0]


# -- uploads (PUT) -----------------------------------------------------------------


def uploading(tmp_path, decided_later: bool = False, refusal: Response | None = None, name: str = "up"):
    """A provisioner that takes PUTs of 0004f2aabbcc-app.log into tmp_path/name."""
    from zprovd.provisioning import Upload

    provisioner = Provisioner()
    folder = tmp_path / name
    folder.mkdir()
    provisioner.config.tftp.upload_dir = folder
    provisioner.config.tftp.upload_max_bytes = 10_000
    decisions: list[Deferred] = []

    def upload(request):
        provisioner.requests.append(request)
        answer = refusal or Upload("0004f2aabbcc-app.log", "0004f2aabbcc")
        if not decided_later:
            return answer
        d = Deferred()
        d.addCallback(lambda _: answer)
        decisions.append(d)
        return d

    provisioner.upload = upload
    return provisioner, folder, decisions


PUT = b"PUT /0004F2AABBCC-app.log HTTP/1.1\r\nHost: prov\r\nContent-Length: 10\r\n"


def test_a_put_body_arriving_in_pieces_is_stored_then_the_next_request_answered(access, tmp_path):
    clock = Clock()
    provisioner, folder, decisions = uploading(tmp_path, decided_later=True)
    inflight = InFlight()
    protocol, transport = connect(clock, provisioner, inflight)
    protocol.dataReceived(PUT + b"\r\n0123")  # part of the body before the decision
    assert transport.value() == b"" and inflight.count == 1
    decisions.pop().callback(None)
    protocol.dataReceived(b"45")
    assert transport.value() == b"" and [p.name for p in folder.iterdir()][0].startswith(".upload-")
    protocol.dataReceived(b"6789GET /next HTTP/1.1\r\n\r\n")  # the rest, and a pipelined request
    assert (folder / "0004f2aabbcc-app.log").read_bytes() == b"0123456789"
    answers = transport.value().split(b"HTTP/1.1 ")
    assert answers[1].startswith(b"201 Created") and answers[2].startswith(b"200 OK") and answers[2].endswith(b"/next")
    assert [r.path for r in provisioner.requests] == ["/0004F2AABBCC-app.log", "/next"]
    assert inflight.count == 0 and not transport.disconnecting
    assert access[0].startswith('http 192.0.2.7 "PUT /0004F2AABBCC-app.log" 201 ') and '"upload 10 bytes"' in access[0]
    assert sorted(p.name for p in folder.iterdir()) == ["0004f2aabbcc-app.log"]


def test_100_continue_is_sent_only_for_a_put_that_is_taken(access, tmp_path):
    expect = PUT + b"Expect: 100-continue\r\n\r\n"
    provisioner, folder, _ = uploading(tmp_path)
    protocol, transport = connect(Clock(), provisioner)
    protocol.dataReceived(expect)
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.dataReceived(b"0123456789")
    assert b"HTTP/1.1 201 Created" in transport.value()
    refused = Response(404, b"Not found\n", who="0004f2aabbcc", reason="unknown MAC")
    provisioner, folder, _ = uploading(tmp_path, refusal=refused, name="refused")
    protocol, transport = connect(Clock(), provisioner)
    protocol.dataReceived(expect)
    # No 100 Continue: the final answer, and the connection closes (the body
    # may or may not follow).
    assert transport.value().startswith(b"HTTP/1.1 404 Not Found\r\n") and b"Connection: close" in transport.value()
    assert transport.disconnecting and list(folder.iterdir()) == []


def test_a_stalled_upload_is_dropped_and_leaves_no_file(access, tmp_path):
    from zprovd.web import UPLOAD_STALL

    clock = Clock()
    provisioner, folder, _ = uploading(tmp_path)
    inflight = InFlight()
    protocol, transport = connect(clock, provisioner, inflight)
    protocol.dataReceived(PUT + b"\r\n01234")
    clock.advance(UPLOAD_STALL - 1)
    protocol.dataReceived(b"5")  # progress moves the deadline
    clock.advance(UPLOAD_STALL - 1)
    assert transport.value() == b""
    clock.advance(1)
    assert transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n") and transport.disconnecting
    assert list(folder.iterdir()) == [] and inflight.count == 0
    assert '"upload stalled after 6 bytes"' in access[0]


def test_a_put_over_the_limit_or_without_a_length_is_refused(access, tmp_path):
    provisioner, folder, _ = uploading(tmp_path)
    protocol, transport = connect(Clock(), provisioner)
    protocol.dataReceived(b"PUT /0004f2aabbcc-app.log HTTP/1.1\r\nContent-Length: 10001\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 413 ")  # by httpcore: over the connection's max_body
    protocol, transport = connect(Clock(), provisioner)
    protocol.dataReceived(b"PUT /0004f2aabbcc-app.log HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 411 Length Required\r\n")
    assert list(folder.iterdir()) == []
