"""HTTP/1.1 for the provisioning listeners, sans I/O: bytes in, requests out.

``ServerConnection`` is fed what a client sends and hands out one
``RequestHead`` at a time, or a ``Refusal`` after which the connection must
be closed.  Requests on a kept-alive connection (pipelined or not) are handed
out in order, the next one only after ``response_done``.  Time is passed in:
a client that has not sent a complete request ``HEADER_DEADLINE`` seconds
after connecting or after its previous response is refused with 408
(trickling one byte at a time does not move the deadline).

Only what phones and softphones need: GET, HEAD and PUT.  A request body
(``Content-Length`` bytes, at most ``max_body``) is handed out by
``read_body`` as it arrives; what was not read is dropped when the response
is done.  Chunked bodies and larger ones get 413.  A request line over
``MAX_REQUEST_LINE`` bytes gets 414, a header block over
``MAX_HEADER_BYTES`` bytes or ``MAX_HEADERS`` lines 431, anything malformed
400 and an HTTP version other than 1.0 and 1.1 505.  Lines may end
in CRLF or a bare LF (RFC 9112 section 2.2).

``response_head`` and ``http_date`` build what goes back; ``byte_range`` and
``not_modified`` answer the questions a file response asks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from http import HTTPStatus
from urllib.parse import unquote_to_bytes

MAX_REQUEST_LINE = 4096
MAX_HEADER_BYTES = 8192
MAX_HEADERS = 64
MAX_BODY = 64 * 1024
HEADER_DEADLINE = 10.0

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_VERSION = re.compile(rb"HTTP/[0-9]\.[0-9]")
_ABSOLUTE = re.compile(rb"[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


@dataclass(slots=True)
class RequestHead:
    method: bytes
    target: bytes
    """The request target as sent (absolute-form reduced to its path and query)."""
    path: bytes
    """The target before ``?``, still percent-encoded."""
    query: bytes | None
    """The target after ``?``; None without one."""
    headers: dict[bytes, bytes]
    """Lower-case names; a repeated header keeps its last value."""
    keep_alive: bool
    http10: bool


@dataclass(frozen=True, slots=True)
class Refusal:
    """The request cannot be answered: send ``status`` and close."""

    status: int
    reason: str


class ServerConnection:
    """One client connection, from the server's side."""

    __slots__ = ("_body_left", "_buffer", "_busy", "_closed", "_discard", "_max_body", "_waiting_since")

    def __init__(self, now: float, max_body: int = MAX_BODY):
        self._buffer = b""
        self._busy = False
        self._closed = False
        self._waiting_since: float | None = now
        self._max_body = max_body
        self._body_left = 0  # body bytes of the request being answered, not read yet
        self._discard = 0  # body bytes of the request answered, still to drop

    @property
    def body_left(self) -> int:
        """Bytes of the current request's body not read yet (some may be buffered)."""
        return self._body_left

    def read_body(self) -> bytes:
        """The current request's body bytes received and not read yet."""
        left = self._body_left
        buffer = self._buffer
        if not left or not buffer:
            return b""
        if len(buffer) <= left:
            self._buffer = b""
            self._body_left = left - len(buffer)
            return buffer
        self._buffer = buffer[left:]
        self._body_left = 0
        return buffer[:left]

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out."""
        return len(self._buffer)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def deadline(self) -> float | None:
        """When the current request must be complete; None while one is answered."""
        if self._waiting_since is None or self._closed:
            return None
        return self._waiting_since + HEADER_DEADLINE

    def receive_data(self, data: bytes) -> None:
        if self._closed:
            return
        if self._discard:
            dropped = min(self._discard, len(data))
            self._discard -= dropped
            data = data[dropped:]
        self._buffer = self._buffer + data if self._buffer else data

    def expire(self, now: float) -> Refusal | None:
        """The 408 due at ``now``, or None.  A kept-alive connection that has
        sent nothing of a next request is closed without one (``closed``
        becomes true): a client about to reuse it would take the 408 as the
        answer to its request."""
        deadline = self.deadline
        if deadline is None or now < deadline:
            return None
        self._closed = True
        if not self._buffer and not self._discard:
            return None
        return Refusal(408, "headers not received in time")

    def response_done(self, now: float, keep_alive: bool) -> None:
        """The answer to the last request was sent; the next one may come
        (after the rest of its body, dropped)."""
        self._busy = False
        if self._body_left:
            self._discard = self._body_left - len(self.read_body())
        if keep_alive:
            self._waiting_since = now
        else:
            self._closed = True

    def next_event(self) -> RequestHead | Refusal | None:
        """The next complete request, a refusal, or None (more bytes needed,
        a request is being answered, or the connection is closed)."""
        if self._busy or self._closed or self._discard:
            return None
        buffer = self._buffer
        if buffer[:1] in (b"\r", b"\n"):  # empty lines before a request are ignored
            buffer = self._buffer = buffer.lstrip(b"\r\n")
        # The head ends at the first empty line: "\n\r\n" (CRLF line ends)
        # or "\n\n" (bare LF).
        end = buffer.find(b"\n\r\n")
        bare = buffer.find(b"\n\n", 0, end if end >= 0 else len(buffer))
        if bare >= 0:
            end, skip = bare, 2
        elif end >= 0:
            skip = 3
        else:
            return self._incomplete(buffer)
        event = self._parse(buffer[:end])
        if isinstance(event, Refusal):
            return self._refuse(event)
        length = event.headers.get(b"content-length")
        self._body_left = int(length) if length is not None else 0
        self._buffer = buffer[end + skip:]
        self._busy = True
        self._waiting_since = None
        return event

    def _refuse(self, refusal: Refusal) -> Refusal:
        self._closed = True
        self._buffer = b""
        return refusal

    def _incomplete(self, buffer: bytes) -> Refusal | None:
        first = buffer.find(b"\n")
        if first < 0:
            if len(buffer) > MAX_REQUEST_LINE:
                return self._refuse(Refusal(414, "request line too long"))
            return None
        if first > MAX_REQUEST_LINE + 1:
            return self._refuse(Refusal(414, "request line too long"))
        if len(buffer) - first > MAX_HEADER_BYTES + 4:
            return self._refuse(Refusal(431, "headers too large"))
        return None

    def _parse(self, head: bytes) -> RequestHead | Refusal:
        lines = head.split(b"\n")
        line = lines[0]
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > MAX_REQUEST_LINE:
            return Refusal(414, "request line too long")
        parts = line.split(b" ")
        if len(parts) != 3:
            return Refusal(400, "malformed request line")
        method, target, version = parts
        if version == b"HTTP/1.1":
            http10 = False
        elif version == b"HTTP/1.0":
            http10 = True
        elif _VERSION.fullmatch(version):
            return Refusal(505, "HTTP version not supported")
        else:
            return Refusal(400, "malformed request line")
        if not _TOKEN.fullmatch(method) or not target or _BAD_TARGET.search(target):
            return Refusal(400, "malformed request line")
        if target[0] != 47:  # "/"
            absolute = _ABSOLUTE.match(target)
            if absolute is None:
                return Refusal(400, "malformed request target")
            target = target[absolute.end():] or b"/"
            if target[0] != 47:
                target = b"/" + target
        if len(lines) > MAX_HEADERS + 1:
            return Refusal(431, "too many headers")
        if len(head) - len(lines[0]) > MAX_HEADER_BYTES:
            return Refusal(431, "headers too large")
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN.fullmatch(name):
                return Refusal(400, "malformed header")  # also obs-fold and space before ":"
            value = value.strip(b" \t\r")
            if _BAD_VALUE.search(value):
                return Refusal(400, "malformed header")
            name = name.lower()
            if name == b"content-length":
                if not value.isdigit():
                    return Refusal(400, "malformed content-length")
                value = value.lstrip(b"0") or b"0"
                if headers.get(name, value) != value:
                    return Refusal(400, "conflicting content-length")
                if len(value) > 10 or int(value) > self._max_body:
                    return Refusal(413, "request body too large")
            elif name == b"transfer-encoding":
                return Refusal(413, "request body refused")
            headers[name] = value
        connection = headers.get(b"connection")
        if connection is None:
            keep_alive = not http10
        else:
            tokens = {token.strip().lower() for token in connection.split(b",")}
            keep_alive = b"close" not in tokens and (not http10 or b"keep-alive" in tokens)
        path, question, query = target.partition(b"?")
        return RequestHead(method, target, path, query if question else None, headers, keep_alive, http10)


# Building responses ---------------------------------------------------------

_PHRASES = {status.value: status.phrase.encode() for status in HTTPStatus}
_date_cache: list = [None, b""]


def http_date(now: float) -> bytes:
    """An IMF-fixdate for ``now`` (one formatting per second)."""
    second = int(now)
    if _date_cache[0] != second:
        _date_cache[0] = second
        _date_cache[1] = formatdate(second, usegmt=True).encode()
    return _date_cache[1]


def response_head(status: int, headers: list[tuple[bytes, bytes]], keep_alive: bool, http10: bool,
                  now: float) -> bytes:
    """Status line and header block, ending with the blank line.  A kept-alive
    HTTP/1.0 connection says so; a closing one says ``Connection: close``."""
    parts = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (status, _PHRASES.get(status, b"Unknown"), http_date(now))]
    for name, value in headers:
        parts.append(b"%s: %s\r\n" % (name, value))
    if not keep_alive:
        parts.append(b"Connection: close\r\n")
    elif http10:
        parts.append(b"Connection: keep-alive\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def refusal_bytes(refusal: Refusal, now: float) -> bytes:
    return response_head(refusal.status, [(b"Content-Length", b"0")], False, False, now)


def byte_range(header: bytes | None, size: int) -> tuple[int, int] | None | bool:
    """The one range (first, last inclusive) a ``Range`` header asks of a file
    of ``size`` bytes; None to send the whole file (no header, several ranges
    or one we do not understand: RFC 9110 lets a server ignore Range); False
    if the range cannot be satisfied (416)."""
    if header is None:
        return None
    unit, eq, spec = header.partition(b"=")
    if not eq or unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not first:  # the last N bytes
        if not last.isdigit():
            return None
        count = int(last)
        if count == 0 or size == 0:
            return False
        return max(size - count, 0), size - 1
    if not first.isdigit() or (last and not last.isdigit()):
        return None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    if last and int(last) < start:
        return None
    if start >= size:
        return False
    return start, end


def not_modified(header: bytes | None, mtime: float) -> bool:
    """True if ``If-Modified-Since`` says the client has the file of ``mtime``."""
    if header is None:
        return False
    try:
        since = parsedate_to_datetime(header.decode("latin-1")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return False
    return int(mtime) <= since


def parse_query(query: bytes) -> dict[str, list[str]]:
    """Query parameters as twisted.web and most servers read them: split on
    ``&`` and ``;``, ``+`` is a space, percent-escapes decoded as UTF-8
    (invalid bytes replaced), blank values kept, items without ``=`` dropped."""
    args: dict[str, list[str]] = {}
    if b"%" not in query and b"+" not in query:
        # Nothing to unquote: decode once.  The separators are ASCII, so
        # decoding the whole equals decoding each piece, invalid bytes too.
        text = query.decode("utf-8", errors="replace")
        pieces = text.split("&")
        if ";" in text:
            pieces = [piece for part in pieces for piece in part.split(";")]
        for piece in pieces:
            name, eq, value = piece.partition("=")
            if eq:
                args.setdefault(name, []).append(value)
        return args
    items = query.split(b"&")
    if b";" in query:
        items = [item for part in items for item in part.split(b";")]
    for item in items:
        name, eq, value = item.partition(b"=")
        if not eq:
            continue
        args.setdefault(_unquote_plus(name), []).append(_unquote_plus(value))
    return args


def _unquote_plus(value: bytes) -> str:
    if b"%" in value or b"+" in value:
        value = unquote_to_bytes(value.replace(b"+", b" "))
    return value.decode("utf-8", errors="replace")
