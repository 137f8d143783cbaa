"""The HTTP channel's header deadline, driven by a Clock (no real time)."""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.web.resource import Resource

from zprovd.web import Channel, Site


class Fixed(Resource):
    isLeaf = True

    def render_GET(self, request):
        return b"ok"


def connect(clock: Clock) -> tuple[Channel, StringTransport]:
    site = Site(Fixed(), clock)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
    channel.makeConnection(transport)
    return channel, transport


REQUEST = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


def test_headers_not_complete_in_time_get_408():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(b"GET /x HTTP/1.1\r\n")
    clock.advance(Channel.HEADER_DEADLINE - 0.5)
    channel.dataReceived(b"X-Slow: 1\r\n")  # trickling does not move the deadline
    assert transport.value() == b""
    clock.advance(0.5)
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting


def test_the_deadline_restarts_after_each_response_on_a_kept_alive_connection():
    clock = Clock()
    channel, transport = connect(clock)
    for _ in range(3):
        clock.advance(Channel.HEADER_DEADLINE - 1)
        channel.dataReceived(REQUEST)
        assert b"HTTP/1.1 200 " in transport.value()
        transport.clear()
    clock.advance(Channel.HEADER_DEADLINE - 0.1)
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(0.2)
    assert transport.value().startswith(b"HTTP/1.1 408 ")


def test_a_closed_connection_leaves_no_timer():
    clock = Clock()
    channel, transport = connect(clock)
    channel.dataReceived(REQUEST)
    channel.connectionLost(None)
    assert clock.getDelayedCalls() == [] or all(not c.active() for c in clock.getDelayedCalls())
