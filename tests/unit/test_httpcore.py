"""The sans-I/O HTTP/1.1 server connection: bytes and times in, requests and refusals out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from twisted.web.http import parse_qs

from zprovd import httpcore as h
from zprovd.httpcore import Refusal, RequestHead, ServerConnection

YEALINK = (b"GET /001565123456.cfg HTTP/1.1\r\nHost: prov\r\n"
           b"User-Agent: Yealink SIP-T48G 35.83.0.35 00:15:65:12:34:56\r\nConnection: Keep-Alive\r\n\r\n")


def events(data: bytes, now: float = 0.0) -> list:
    """Every event of one connection fed ``data``, each request answered at once."""
    connection = ServerConnection(now)
    connection.receive_data(data)
    found = []
    while (event := connection.next_event()) is not None:
        found.append(event)
        if isinstance(event, Refusal):
            break
        connection.response_done(now, event.keep_alive)
    return found


def one(data: bytes):
    found = events(data)
    assert len(found) == 1, found
    return found[0]


def test_a_phone_request():
    event = one(YEALINK)
    assert event == RequestHead(
        method=b"GET", target=b"/001565123456.cfg", path=b"/001565123456.cfg", query=None,
        headers={b"host": b"prov", b"user-agent": b"Yealink SIP-T48G 35.83.0.35 00:15:65:12:34:56",
                 b"connection": b"Keep-Alive"},
        keep_alive=True, http10=False,
    )


def test_query_and_repeated_headers():
    event = one(b"GET /zoiper?user=a&password=b HTTP/1.1\r\nX-A: 1\r\nx-a:  2 \t\r\n\r\n")
    assert (event.path, event.query) == (b"/zoiper", b"user=a&password=b")
    assert event.headers == {b"x-a": b"2"}  # the last one, trimmed, as twisted.web's getHeader


def test_an_empty_query_is_not_no_query():
    assert one(b"GET /a? HTTP/1.1\r\n\r\n").query == b""
    assert one(b"GET /a HTTP/1.1\r\n\r\n").query is None


@pytest.mark.parametrize("version, connection, keep_alive", [
    (b"1.1", None, True),
    (b"1.1", b"close", False),
    (b"1.1", b"Keep-Alive, Close", False),
    (b"1.1", b"upgrade", True),
    (b"1.0", None, False),
    (b"1.0", b"keep-alive", True),
    (b"1.0", b"Keep-Alive", True),
])
def test_keep_alive(version, connection, keep_alive):
    extra = b"Connection: %s\r\n" % connection if connection else b""
    event = one(b"GET / HTTP/%s\r\n%s\r\n" % (version, extra))
    assert event.keep_alive is keep_alive
    assert event.http10 is (version == b"1.0")


def test_bare_lf_lines_and_empty_lines_before_a_request():
    event = one(b"\r\n\r\nGET /a HTTP/1.0\nHost: x\nUser-Agent: old phone\n\n")
    assert event.path == b"/a" and event.headers == {b"host": b"x", b"user-agent": b"old phone"}


def test_absolute_form_targets_are_reduced_to_their_path():
    assert one(b"GET http://prov:8080/p/a.cfg?x=1 HTTP/1.1\r\n\r\n").target == b"/p/a.cfg?x=1"
    assert one(b"GET https://prov HTTP/1.1\r\n\r\n").path == b"/"


def test_pipelined_requests_come_one_at_a_time():
    connection = ServerConnection(0.0)
    connection.receive_data(YEALINK + b"GET /two HTTP/1.1\r\n\r\nGET /thr")
    assert connection.next_event().path == b"/001565123456.cfg"
    assert connection.next_event() is None  # the first is being answered
    assert connection.deadline is None
    connection.response_done(1.0, True)
    assert connection.next_event().path == b"/two"
    connection.response_done(2.0, True)
    assert connection.next_event() is None  # incomplete
    connection.receive_data(b"ee HTTP/1.1\r\n\r\n")
    assert connection.next_event().path == b"/three"


def test_a_response_that_closes_ends_the_connection():
    connection = ServerConnection(0.0)
    connection.receive_data(b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.0\r\n\r\n")
    assert connection.next_event().path == b"/a"
    connection.response_done(0.0, False)
    assert connection.closed and connection.next_event() is None


def test_a_request_body_is_read_and_dropped_even_split():
    connection = ServerConnection(0.0)
    connection.receive_data(b"POST /x HTTP/1.1\r\nContent-Length: 10\r\n\r\nhel")
    assert connection.next_event().method == b"POST"
    connection.response_done(0.0, True)
    assert connection.next_event() is None  # the rest of the body has not come yet
    connection.receive_data(b"lo, worl")
    connection.receive_data(b"dGET /next HTTP/1.1\r\n\r\n")
    assert connection.next_event().path == b"/next"


@given(st.binary(min_size=0, max_size=300), st.lists(st.integers(1, 40), min_size=1, max_size=20),
       st.integers(0, 300))
def test_a_body_is_handed_out_whole_however_it_arrives(body, cuts, read_before):
    """read_body hands out exactly the body, in any pieces; what is not read
    when the response is done is dropped; the next request follows."""
    data = b"PUT /x HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body + b"GET /next HTTP/1.1\r\n\r\n"
    connection = ServerConnection(0.0, max_body=1000)
    pieces, at = [], 0
    for cut in cuts * (len(data) // sum(cuts) + 1):
        pieces.append(data[at:at + cut])
        at += cut
    got, head = b"", None
    for piece in pieces:
        connection.receive_data(piece)
        if head is None:
            head = connection.next_event()
            if head is None:
                continue
            assert head.path == b"/x"
        if len(got) < read_before:
            got += connection.read_body()
    assert head is not None and body.startswith(got) and connection.body_left == len(body) - len(got)
    connection.response_done(0.0, True)
    assert connection.body_left == 0 and connection.read_body() == b""
    assert connection.next_event().path == b"/next"


@pytest.mark.parametrize("data, status", [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /" + b"a" * 5000, 414),  # not even complete
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(60)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(60)), 431),
    (b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(100)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n", 413),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", 413),
    (b"GET / HTTP/2.0\r\n\r\n", 505),
    (b"GET /\r\n\r\n", 400),
    (b"GET  / HTTP/1.1\r\n\r\n", 400),
    (b"G(T / HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1 \r\n\r\n", 400),
    (b"GET / http/1.1\r\n\r\n", 400),
    (b"GET a HTTP/1.1\r\n\r\n", 400),
    (b"GET /\x01 HTTP/1.1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nNo colon\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nX: a\rb\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
])
def test_refusals(data, status):
    connection = ServerConnection(0.0)
    connection.receive_data(data)
    event = connection.next_event()
    assert isinstance(event, Refusal) and event.status == status
    assert connection.closed and connection.next_event() is None
    connection.receive_data(YEALINK)
    assert connection.next_event() is None


def test_repeating_the_same_content_length_is_allowed():
    assert one(b"POST / HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 00\r\n\r\n").method == b"POST"


def test_limits_are_not_refused_below_them():
    line = b"GET /" + b"a" * (h.MAX_REQUEST_LINE - 14) + b" HTTP/1.1"
    assert len(line) == h.MAX_REQUEST_LINE
    assert isinstance(one(line + b"\r\n\r\n"), RequestHead)
    headers = b"".join(b"X-%02d: v\r\n" % i for i in range(h.MAX_HEADERS))
    assert len(one(b"GET / HTTP/1.1\r\n" + headers + b"\r\n").headers) == h.MAX_HEADERS


# The deadline -----------------------------------------------------------------


def test_trickling_does_not_move_the_deadline():
    connection = ServerConnection(100.0)
    assert connection.deadline == 100.0 + h.HEADER_DEADLINE
    connection.receive_data(b"GET / HTTP/1.1\r\n")
    assert connection.next_event() is None
    assert connection.expire(100.0 + h.HEADER_DEADLINE - 0.1) is None
    connection.receive_data(b"X-Slow: 1\r\n")
    assert connection.deadline == 100.0 + h.HEADER_DEADLINE
    assert connection.expire(100.0 + h.HEADER_DEADLINE) == Refusal(408, "headers not received in time")
    assert connection.closed


def test_the_deadline_restarts_after_each_response_and_waits_while_answering():
    connection = ServerConnection(0.0)
    connection.receive_data(YEALINK)
    connection.next_event()
    assert connection.deadline is None and connection.expire(1000.0) is None
    connection.response_done(1000.0, True)
    assert connection.deadline == 1000.0 + h.HEADER_DEADLINE


def test_an_idle_kept_alive_connection_is_closed_without_a_408():
    connection = ServerConnection(0.0)
    connection.receive_data(YEALINK)
    connection.next_event()
    connection.response_done(1.0, True)
    assert connection.expire(1.0 + h.HEADER_DEADLINE) is None
    assert connection.closed


# Properties ----------------------------------------------------------------------

REQUESTS = st.lists(
    st.sampled_from([
        YEALINK,
        b"GET /zoiper?user=a;password=b&version=1.14 HTTP/1.1\r\nHost: p\r\n\r\n",
        b"HEAD /a.cfg HTTP/1.1\n\n",
        b"POST /x HTTP/1.1\r\nContent-Length: 7\r\n\r\nGET / H",
        b"GET http://prov/y HTTP/1.1\r\nRange: bytes=0-9\r\n\r\n",
    ]),
    min_size=1, max_size=6,
)


def feed_in_pieces(data: bytes, cuts: list[int]) -> list:
    connection = ServerConnection(0.0)
    found = []
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        connection.receive_data(data[start:cut])
        start = cut
        while (event := connection.next_event()) is not None:
            found.append(event)
            connection.response_done(0.0, True)
    return found


@given(REQUESTS, st.lists(st.integers(min_value=0, max_value=2000), max_size=20))
def test_how_the_bytes_are_cut_does_not_change_the_requests(requests, cuts):
    data = b"".join(requests)
    found = feed_in_pieces(data, [c for c in cuts if c < len(data)])
    assert found == events(data)
    assert len(found) == len(requests)


@settings(max_examples=300)
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=600), max_size=5))
def test_any_bytes_give_requests_refusals_or_nothing(data, cuts):
    connection = ServerConnection(0.0)
    start = 0
    for cut in sorted(set(c for c in cuts if c < len(data))) + [len(data)]:
        connection.receive_data(data[start:cut])
        start = cut
        while (event := connection.next_event()) is not None:
            if isinstance(event, Refusal):
                assert event.status in (400, 413, 414, 431, 505)
                assert connection.closed
                return
            assert event.path.startswith(b"/")
            connection.response_done(0.0, event.keep_alive)


QUERY_BYTES = st.lists(st.sampled_from([b"a", b"=", b"&", b";", b"\xe2", b"\x82", b"\xff", "\u00e9\u20ac".encode(),
                                        b"%", b"%e2%82", b"+", b"%3D", b"%26"]), max_size=30).map(b"".join)


def assert_parsed_as_twisted_web_parses(query: bytes) -> None:
    """parse_qs groups by raw name; zprovd by decoded name.  Two raw names that
    decode alike (invalid UTF-8, replaced) are one name to zprovd, with the
    values of both in query order: compare those as multisets."""
    raw = parse_qs(query, 1)
    expected: dict[str, list[str]] = {}
    for k, vs in raw.items():
        expected.setdefault(k.decode("utf-8", "replace"), []).extend(v.decode("utf-8", "replace") for v in vs)
    got = h.parse_query(query)
    if len(expected) == len(raw):
        assert got == expected
    else:
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}


def test_names_that_decode_alike_are_one_name():
    assert h.parse_query(b"\x80\x00=a&\x81\x00=b&\x80\x00=c") == {"\ufffd\x00": ["a", "b", "c"]}
    assert_parsed_as_twisted_web_parses(b"\x80\x00=&\x81\x00=")


@settings(max_examples=500)
@given(st.one_of(st.binary(max_size=200), QUERY_BYTES))
def test_queries_are_parsed_as_twisted_web_parses_them(query):
    assert_parsed_as_twisted_web_parses(query)


@given(st.lists(st.text(alphabet="ab%+=&;é", max_size=8), max_size=6))
def test_queries_from_text_are_parsed_as_twisted_web_parses_them(parts):
    assert_parsed_as_twisted_web_parses("&".join(parts).encode())


# Building responses ------------------------------------------------------------------


def test_response_heads():
    assert h.response_head(200, [(b"Content-Length", b"3")], True, False, 0.0) == (
        b"HTTP/1.1 200 OK\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\nContent-Length: 3\r\n\r\n")
    assert h.response_head(404, [], True, True, 1.5).endswith(b"Connection: keep-alive\r\n\r\n")
    assert h.response_head(401, [], False, True, 0.0).startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert h.response_head(401, [], False, False, 0.0).endswith(b"Connection: close\r\n\r\n")
    assert h.refusal_bytes(Refusal(431, "x"), 0.0).startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert h.http_date(784111777.9) == b"Sun, 06 Nov 1994 08:49:37 GMT"


@pytest.mark.parametrize("header, expected", [
    (None, None),
    (b"bytes=0-9", (0, 9)),
    (b"bytes=10-", (10, 99)),
    (b"bytes=90-200", (90, 99)),
    (b"bytes=-10", (90, 99)),
    (b"bytes=-1000", (0, 99)),
    (b"Bytes = 5-5", (5, 5)),
    (b"bytes=100-", False),
    (b"bytes=-0", False),
    (b"bytes=0-1,5-6", None),  # several ranges: the whole file
    (b"items=0-9", None),
    (b"bytes=9-0", None),
    (b"bytes=a-b", None),
    (b"bytes=5", None),
])
def test_byte_range(header, expected):
    assert h.byte_range(header, 100) == expected


def test_not_modified():
    assert h.not_modified(b"Sun, 06 Nov 1994 08:49:37 GMT", 784111777.5)
    assert not h.not_modified(b"Sun, 06 Nov 1994 08:49:36 GMT", 784111777.0)
    assert not h.not_modified(b"yesterday", 0.0)
    assert not h.not_modified(None, 0.0)
