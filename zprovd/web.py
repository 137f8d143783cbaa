"""HTTP and HTTPS: the Twisted protocol around ``zprovd.httpcore``.

It only moves bytes: what a client sends goes to the sans-I/O
``ServerConnection``; each request it hands out becomes a
``zprovd.routing.Request`` for the provisioner, and the ``Response`` becomes
bytes on the transport (firmware files streamed in chunks with a producer).
A PUT the provisioner takes (a phone's log) has its body written to the
upload folder as it arrives.
One access-log line per request, with secret query values replaced by
``***`` and never an Authorization header.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
from collections.abc import Callable
from urllib.parse import quote, unquote_plus

from cryptography import x509
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IProtocolNegotiationFactory, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from zprovd import httpcore, logs
from zprovd.httpcore import Refusal, RequestHead, ServerConnection
from zprovd.metrics import Metrics
from zprovd.policy import client_address, macs_in_certificate_names
from zprovd.provisioning import Provisioner, Response, Upload, hide_segments
from zprovd.routing import Request
from zprovd.uploads import UploadWriter

log = Logger(namespace="zprovd.http")

SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|auth", re.IGNORECASE)
FILE_CHUNK = 64 * 1024
ABORT_AFTER = 15.0
"""Seconds a closing connection may take to flush what it was sent before
it is aborted: a client that stops reading cannot hold it open."""
SEND_STALL = 60.0
"""Seconds a firmware download may make no progress (the client reading
nothing) before the connection is aborted."""
PAUSE_READING_AT = httpcore.MAX_REQUEST_LINE + httpcore.MAX_HEADER_BYTES + httpcore.MAX_BODY
"""Bytes of further requests buffered while one is answered before reading stops."""
UPLOAD_STALL = 30.0
"""Seconds an upload may make no progress (the client sending nothing)
before it is dropped and its connection closed."""

def redact_uri(uri: str, secret_params: set[str] | frozenset[str]) -> str:
    """The URI with the value of every secret-looking query parameter replaced by ***.

    The query is split on ``&`` and ``;`` exactly as ``httpcore.parse_query``
    splits it, so no parameter the application saw escapes redaction.
    """
    path, sep, query = uri.partition("?")
    if not sep:
        return path
    if not isinstance(secret_params, frozenset):
        secret_params = frozenset(secret_params)
    parts = []
    for part in re.split(r"[&;]", query) if ";" in query else query.split("&"):
        raw_name, eq, _ = part.partition("=")
        if eq and _is_secret(raw_name, secret_params):
            part = f"{raw_name}=***"
        parts.append(part)
    return path + "?" + "&".join(parts)


@functools.lru_cache(maxsize=1024)
def _is_secret(raw_name: str, secret_params: frozenset[str]) -> bool:
    """Whether a query parameter, as written in the URI, holds a secret (the
    few names clients use are remembered; names are not secrets)."""
    name = unquote_plus(raw_name) if "%" in raw_name or "+" in raw_name else raw_name
    return name.lower() in secret_params or SECRET_PARAM.search(name) is not None


_PLAIN = re.compile(r"[\w@.:+-]*", re.ASCII)
"""A ``who`` the access line can show as it is."""


def _decode(value: bytes) -> str:
    return value.decode("utf-8", errors="replace")


class InFlight:
    """Counts requests being answered, so a shutdown can wait for them."""

    def __init__(self) -> None:
        self.count = 0
        self._waiting: list[Deferred] = []

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def drained(self) -> Deferred:
        if self.count == 0:
            return succeed(None)
        d: Deferred = Deferred()
        self._waiting.append(d)
        return d


@implementer(IProtocolNegotiationFactory)
class HTTPFactory(Factory):
    """Builds one ``HTTPProtocol`` per connection of an HTTP or HTTPS listener."""

    noisy = False

    def __init__(self, provisioner: Callable[[], Provisioner], protocol: str, reactor,
                 inflight: InFlight | None = None, metrics: Metrics | None = None):
        self.provisioner = provisioner  # a callable, so a reload can swap it
        self.protocol = protocol
        self.reactor = reactor
        self.inflight = inflight or InFlight()
        self.metrics = metrics

    def buildProtocol(self, addr):
        return HTTPProtocol(self)

    def acceptableProtocols(self) -> list[bytes]:
        """ALPN: HTTP/1.1 only (a client offering h2 too gets http/1.1)."""
        return [b"http/1.1"]


_NO_CERTIFICATE = object()
_CONTENT_TYPES: dict[str, bytes] = {}
_NO_STORE = (b"Cache-Control", b"no-store")
_INTERNAL_ERROR = Response(500, b"internal error\n", reason="internal error")
_METHOD_NOT_ALLOWED = Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD"),), reason="method not allowed")
_METHOD_NOT_ALLOWED_PUT = Response(405, b"method not allowed\n", headers=(("Allow", "GET, HEAD, PUT"),),
                                   reason="method not allowed")


class _Upload:
    """A PUT being stored: where its bytes go and what its access line needs."""

    __slots__ = ("head", "request", "provisioner", "started", "who", "writer", "received", "progress", "watch")

    def __init__(self, head: RequestHead, request: Request, provisioner: Provisioner, started: float, who: str,
                 writer: UploadWriter):
        self.head = head
        self.request = request
        self.provisioner = provisioner
        self.started = started
        self.who = who
        self.writer = writer
        self.received = 0
        self.progress = started
        self.watch = None


class HTTPProtocol(Protocol):
    """One client connection: bytes to ``ServerConnection``, its requests to
    the provisioner, responses back; one request answered at a time."""

    def __init__(self, factory: HTTPFactory):
        self.factory = factory
        self.reactor = factory.reactor
        self.connection: ServerConnection | None = None
        self._timer = None
        self._closing = None
        self._lost = False
        self._paused = False
        self._peer = "-"
        self._certificate_macs = _NO_CERTIFICATE
        self._upload: _Upload | None = None

    # -- bytes in ------------------------------------------------------------

    def connectionMade(self):
        tftp = self.factory.provisioner().config.tftp
        max_body = max(httpcore.MAX_BODY, tftp.upload_max_bytes) if tftp.upload_dir is not None else httpcore.MAX_BODY
        self.connection = ServerConnection(self.reactor.seconds(), max_body)
        peer = self.transport.getPeer()
        self._peer = getattr(peer, "host", None) or str(peer)
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        self.connection.receive_data(data)
        if self._upload is not None:
            self._drain_upload()  # the next request is looked at once the upload is answered
            return
        self._next()

    def connectionLost(self, reason=None):
        self._lost = True
        for timer in (self._timer, self._closing):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._closing = None
        if self._upload is not None:
            up = self._upload
            self._upload_end(Response(400, who=up.who, reason=f"connection lost after {up.received} bytes"),
                             close=True, failed=True)

    def _next(self) -> None:
        """Answer what the connection hands out until it needs more bytes,
        is closed or waits for an answer that is not known yet."""
        connection = self.connection
        while not self._lost:
            event = connection.next_event()
            if event is None:
                if connection.closed:
                    return
                if connection.buffered > PAUSE_READING_AT and not self._paused:
                    self._paused = True
                    self.transport.pauseProducing()
                return
            if isinstance(event, Refusal):
                self._refuse(event)
                return
            if not self._answer(event):
                return

    # -- the header deadline ----------------------------------------------------

    def _arm(self) -> None:
        """One timer per connection, re-armed lazily when it fires: a kept-alive
        connection costs no timer call per request."""
        if self._timer is None and not self._lost:
            deadline = self.connection.deadline
            if deadline is not None:
                self._timer = self.reactor.callLater(max(deadline - self.reactor.seconds(), 0), self._expire)

    def _expire(self) -> None:
        self._timer = None
        refusal = self.connection.expire(self.reactor.seconds())
        if refusal is not None:
            self._refuse(refusal)
        elif self.connection.closed:
            self._close()
        else:
            self._arm()

    def _close(self) -> None:
        """Close after what was written is sent, or abort if the client does
        not read it within ABORT_AFTER seconds."""
        if self._closing is None and not self._lost:
            self.transport.loseConnection()
            self._closing = self.reactor.callLater(ABORT_AFTER, self.transport.abortConnection)

    def _refuse(self, refusal: Refusal) -> None:
        now = self.reactor.seconds()
        self.transport.write(httpcore.refusal_bytes(refusal, now))
        self._close()
        if self.factory.metrics is not None:
            self.factory.metrics.answered(self.factory.protocol, refusal.status, 0)
        logs.access(f'{self.factory.protocol} {self._peer} "-" {refusal.status} 0 0.0ms who=- "{refusal.reason}"')

    # -- requests ------------------------------------------------------------------

    def _answer(self, head: RequestHead) -> bool:
        """Answer one request; True if it was answered at once."""
        factory = self.factory
        started = self.reactor.seconds()
        provisioner = factory.provisioner()
        headers = head.headers
        forwarded = headers.get(b"x-forwarded-for")
        request = Request(
            protocol=factory.protocol,
            path=_decode(head.path),
            query=httpcore.parse_query(head.query) if head.query else {},
            user_agent=_decode(headers.get(b"user-agent", b"")),
            authorization=_decode(headers.get(b"authorization", b"")),
            client=client_address(self._peer, _decode(forwarded), provisioner.config.access.trusted_proxies)
            if forwarded else self._peer,
            host=_decode(headers.get(b"host", b"")),
            method=head.method.decode("ascii"),
            certificate_macs=self._peer_certificate_macs() if factory.protocol == "https" else None,
        )
        if head.method == b"PUT":
            self._put(head, request, provisioner, started)
            return False
        if head.method != b"GET" and head.method != b"HEAD":
            answer = _METHOD_NOT_ALLOWED if provisioner.config.tftp.upload_dir is None else _METHOD_NOT_ALLOWED_PUT
        else:
            try:
                answer = provisioner.answer(request)
            except Exception:  # a bug, or a backend raising at once: 500, the connection survives
                log.failure("answering {path} failed", path=request.path)
                answer = _INTERNAL_ERROR
        if isinstance(answer, Response) and answer.file is None:
            # Known at once (a cached document, a refusal): no Deferred.
            sent = self._send(head, answer)
            self._finished(head, request, answer.status, sent, answer, provisioner, started)
            return True
        factory.inflight.enter()

        def respond(response: Response) -> None:
            self._answer_later(head, request, response, provisioner, started)

        def failed(failure) -> None:
            log.failure("answering a request failed", failure)
            respond(_INTERNAL_ERROR)

        d = answer if isinstance(answer, Deferred) else succeed(answer)
        d.addCallback(respond).addErrback(failed)
        return False

    def _answer_later(self, head: RequestHead, request: Request, response: Response,
                      provisioner: Provisioner, started: float) -> None:
        """Write an answer that was not known at once (counted in flight),
        then go on with the requests that waited for it."""
        if response.file is not None:
            self._send_file(head, request, response, provisioner, started)
            return
        sent = self._send(head, response) if not self._lost else 0
        self._finished(head, request, response.status, sent, response, provisioner, started)
        self.factory.inflight.leave()
        self._next()

    # -- uploads (PUT) --------------------------------------------------------------

    def _put(self, head: RequestHead, request: Request, provisioner: Provisioner, started: float) -> None:
        """A PUT: the provisioner says whether to take it, then its body goes
        to the upload folder as it arrives (never held whole in memory)."""
        self.factory.inflight.enter()
        answer = provisioner.upload(request)
        if not isinstance(answer, Deferred):
            self._put_decided(answer, head, request, provisioner, started)
            return

        def failed(failure) -> None:
            log.failure("deciding on an upload failed", failure)
            self._put_decided(_INTERNAL_ERROR, head, request, provisioner, started)

        answer.addCallback(self._put_decided, head, request, provisioner, started).addErrback(failed)

    def _put_decided(self, answer: Response | Upload, head: RequestHead, request: Request,
                     provisioner: Provisioner, started: float) -> None:
        if self._lost:
            who = answer.who if isinstance(answer, Response) else answer.mac
            self._put_answered(head, request, provisioner, started,
                               Response(400, who=who, reason="connection lost before the upload started"), close=True)
            return
        if isinstance(answer, Response):  # refused: the body (if any) is not read, the connection closes
            self._put_answered(head, request, provisioner, started, answer, close=self.connection.body_left > 0)
            return
        tftp = provisioner.config.tftp
        length = head.headers.get(b"content-length")
        refusal = None
        if length is None:
            refusal = Response(411, b"length required\n", who=answer.mac, reason="no Content-Length")
        elif int(length) > tftp.upload_max_bytes:
            refusal = Response(413, b"too large\n", who=answer.mac, reason=f"upload over {tftp.upload_max_bytes} bytes")
        else:
            try:
                writer = UploadWriter(tftp.upload_dir, answer.name)  # type: ignore[arg-type]
            except OSError as e:
                log.error("cannot create the upload file {name}: {err}", name=answer.name, err=e)
                refusal = Response(500, b"cannot store the file\n", who=answer.mac, reason="upload folder not writable")
        if refusal is not None:
            self._put_answered(head, request, provisioner, started, refusal, close=self.connection.body_left > 0)
            return
        if self.connection.body_left and not head.http10 and head.headers.get(b"expect", b"").lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        up = self._upload = _Upload(head, request, provisioner, started, answer.mac, writer)
        up.progress = self.reactor.seconds()
        up.watch = self.reactor.callLater(UPLOAD_STALL, self._upload_stalled)
        if self._paused:  # the body waited in the buffer for the decision
            self._paused = False
            self.transport.resumeProducing()
        self._drain_upload()

    def _drain_upload(self) -> None:
        """Write what has arrived of the body; answer once all of it is stored."""
        up = self._upload
        assert up is not None
        data = self.connection.read_body()
        if data:
            up.progress = self.reactor.seconds()
            up.received += len(data)
            try:
                up.writer.write(data)
            except OSError as e:
                log.error("cannot write the upload {name}: {err}", name=up.writer.final_path.name, err=e)
                self._upload_end(Response(500, b"cannot store the file\n", who=up.who, reason="upload write failed"),
                                 close=True, failed=True)
                return
        if self.connection.body_left:
            return
        replaced = up.writer.final_path.exists()
        try:
            up.writer.commit()
        except OSError as e:
            log.error("cannot store the upload {name}: {err}", name=up.writer.final_path.name, err=e)
            self._upload_end(Response(500, b"cannot store the file\n", who=up.who, reason="upload write failed"),
                             close=True, failed=True)
            return
        status, body = (200, b"replaced\n") if replaced else (201, b"created\n")
        self._upload_end(Response(status, body, who=up.who, reason=f"upload {up.received} bytes"), close=False)

    def _upload_stalled(self) -> None:
        """One timer per upload, re-armed lazily: drop an upload that stopped."""
        up = self._upload
        if up is None:
            return
        idle = self.reactor.seconds() - up.progress
        if idle < UPLOAD_STALL:
            up.watch = self.reactor.callLater(UPLOAD_STALL - idle, self._upload_stalled)
            return
        up.watch = None
        self._upload_end(Response(408, b"request timeout\n", who=up.who, reason=f"upload stalled after {up.received} bytes"),
                         close=True, failed=True)

    def _upload_end(self, response: Response, close: bool, failed: bool = False) -> None:
        up = self._upload
        assert up is not None
        self._upload = None
        if up.watch is not None and up.watch.active():
            up.watch.cancel()
        if failed:
            up.writer.abort()  # the temporary file goes; an earlier upload of that name stays
        self._put_answered(up.head, up.request, up.provisioner, up.started, response, close)

    def _put_answered(self, head: RequestHead, request: Request, provisioner: Provisioner, started: float,
                      response: Response, close: bool) -> None:
        if close and head.keep_alive:
            head = dataclasses.replace(head, keep_alive=False)
        sent = self._send(head, response) if not self._lost else 0
        self._finished(head, request, response.status, sent, response, provisioner, started)
        self.factory.inflight.leave()
        if not self._lost:
            self._next()

    def _peer_certificate_macs(self) -> frozenset[str] | None:
        if self._certificate_macs is _NO_CERTIFICATE:  # one look per connection
            self._certificate_macs = _certificate_macs(self.transport)
        return self._certificate_macs

    def _send(self, head: RequestHead, response: Response) -> int:
        """Write a response with a body; the body bytes sent."""
        content_type = _CONTENT_TYPES.get(response.content_type)
        if content_type is None:
            content_type = _CONTENT_TYPES[response.content_type] = response.content_type.encode()
        body = response.body
        headers = [(name.encode(), value.encode()) for name, value in response.headers] if response.headers else []
        headers += ((b"Content-Type", content_type), _NO_STORE, (b"Content-Length", b"%d" % len(body)))
        keep_alive = head.keep_alive
        data = httpcore.response_head(response.status, headers, keep_alive, head.http10, self.reactor.seconds())
        if head.method == b"HEAD":
            body = b""
        self.transport.write(data + body)
        self._response_done(keep_alive)
        return len(body)

    def _response_done(self, keep_alive: bool) -> None:
        self.connection.response_done(self.reactor.seconds(), keep_alive)
        if not keep_alive:
            self._close()
            return
        if self._paused:
            self._paused = False
            self.transport.resumeProducing()
        self._arm()

    def _send_file(self, head: RequestHead, request: Request, response: Response,
                   provisioner: Provisioner, started: float) -> None:
        """Stream a firmware file: ranges, If-Modified-Since, HEAD."""

        def done(status: int, sent: int, complete: bool = True) -> None:
            self._finished(head, request, status, sent, response, provisioner, started)
            self.factory.inflight.leave()
            if not complete:
                self._close()
            elif not self._lost:
                self._response_done(head.keep_alive)
                self._next()

        try:
            file = open(response.file, "rb")  # noqa: SIM115 - closed by _FileBody or below
        except OSError:  # gone since the look-up
            missing = Response(404, b"not found\n", who=response.who, reason="firmware gone")
            self._answer_later(head, request, missing, provisioner, started)
            return
        if self._lost:
            file.close()
            return done(response.status, 0)
        stat = os.fstat(file.fileno())
        size = stat.st_size
        modified = httpcore.http_date(stat.st_mtime)
        headers = [(b"Last-Modified", modified), (b"Accept-Ranges", b"bytes")]
        content_type = response.content_type.encode()
        now = self.reactor.seconds()
        wanted = httpcore.byte_range(head.headers.get(b"range"), size)
        if httpcore.not_modified(head.headers.get(b"if-modified-since"), stat.st_mtime):
            status, first, count = 304, 0, 0
        elif wanted is False:
            status, first, count = 416, 0, 0
            headers += [(b"Content-Range", b"bytes */%d" % size), (b"Content-Length", b"0")]
        elif wanted is None:
            status, first, count = 200, 0, size
            headers += [(b"Content-Type", content_type), (b"Content-Length", b"%d" % size)]
        else:
            first, last = wanted
            status, count = 206, last - first + 1
            headers += [(b"Content-Type", content_type), (b"Content-Length", b"%d" % count),
                        (b"Content-Range", b"bytes %d-%d/%d" % (first, last, size))]
        self.transport.write(httpcore.response_head(status, headers, head.keep_alive, head.http10, now))
        if head.method == b"HEAD" or count == 0:
            file.close()
            return done(status, 0)
        file.seek(first)
        self.transport.registerProducer(
            _FileBody(self.transport, self.reactor, file, count,
                      lambda sent, complete: done(status, sent, complete)), False
        )

    def _finished(self, head: RequestHead, request: Request, status: int, sent: int, response: Response | None,
                  provisioner: Provisioner, started: float) -> None:
        """The access line and the counters of one request."""
        protocol = self.factory.protocol
        if self.factory.metrics is not None:
            self.factory.metrics.answered(protocol, status, sent)
        uri = _decode(head.target)
        if provisioner.secret_segments:
            uri = hide_segments(uri, provisioner.secret_segments, percent_encoded=True)
        if head.query is not None:
            uri = redact_uri(uri, provisioner.secret_params)
        if '"' in uri:  # the line quotes the request: a quote in it would end it early (and fool fail2ban)
            uri = uri.replace('"', "%22")
        who = response.who if response else "-"
        if not _PLAIN.fullmatch(who):
            who = quote(who, safe="@.:-_+")
        reason = response.reason if response and response.reason else "-"
        ms = (self.reactor.seconds() - started) * 1000
        logs.access(
            f'{protocol} {request.client} "{request.method} {uri}" {status} {sent} {ms:.1f}ms who={who} "{reason}"'
        )


@implementer(IPullProducer)
class _FileBody:
    """``count`` bytes of an open file, read and written one chunk each time
    the transport asks; then ``done(sent, complete)``, once.  Not complete:
    the client went away, stopped reading for SEND_STALL seconds (the
    connection is aborted) or the file shrank under us (the connection must
    close, the promised length cannot be kept)."""

    def __init__(self, transport, reactor, file, count: int, done: Callable[[int, bool], None]):
        self.transport = transport
        self.reactor = reactor
        self.file = file
        self.left = count
        self.sent = 0
        self.done = done
        self.progress = reactor.seconds()
        self._watch = reactor.callLater(SEND_STALL, self._check)

    def _check(self) -> None:
        """One timer per download, re-armed lazily: abort when stalled."""
        idle = self.reactor.seconds() - self.progress
        if idle >= SEND_STALL:
            self._watch = None
            self.transport.abortConnection()  # stopProducing follows
        else:
            self._watch = self.reactor.callLater(SEND_STALL - idle, self._check)

    def resumeProducing(self) -> None:
        self.progress = self.reactor.seconds()
        chunk = self.file.read(min(FILE_CHUNK, self.left))
        if chunk:
            self.left -= len(chunk)
            self.sent += len(chunk)
            self.transport.write(chunk)
        if not chunk or self.left <= 0:
            self.transport.unregisterProducer()
            self._end(self.left <= 0)

    def stopProducing(self) -> None:
        self._end(False)

    def _end(self, complete: bool) -> None:
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        self._watch = None
        if self.file is not None:
            self.file.close()
            self.file = None
            self.done(self.sent, complete)


def _certificate_macs(transport) -> frozenset[str] | None:
    """The MACs named in the client's certificate (already verified against
    ``[https] client_ca`` by the handshake); None without a certificate."""
    get_peer = getattr(transport, "getPeerCertificate", None)
    certificate = get_peer() if get_peer else None
    if certificate is None:
        return None
    cert = certificate.to_cryptography()
    names = [attribute.value for attribute in cert.subject if isinstance(attribute.value, str)]
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += [str(value) for value in san.get_values_for_type(x509.DNSName)]
        names += [str(value) for value in san.get_values_for_type(x509.UniformResourceIdentifier)]
    except x509.ExtensionNotFound:
        pass
    return frozenset(macs_in_certificate_names(names))
