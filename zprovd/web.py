"""HTTP and HTTPS: twisted.web around the provisioning pipeline.

The resource only translates: a twisted.web request becomes a
``zprovd.routing.Request``, the ``Response`` becomes status, headers and
body.  One access-log line per request, with secret query values replaced
by ``***`` and never an Authorization header.
"""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import quote, unquote_plus

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web import http, server, static
from twisted.web.resource import Resource

from cryptography import x509

from zprovd import logs
from zprovd.metrics import Metrics
from zprovd.policy import client_address, macs_in_certificate_names
from zprovd.provisioning import Provisioner, Response
from zprovd.routing import Request

log = Logger(namespace="zprovd.http")

SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|auth", re.IGNORECASE)
REQUEST_TIMEOUT = 30  # seconds a client may take to send its request


def redact_uri(uri: str, secret_params: set[str] | frozenset[str]) -> str:
    """The URI with the value of every secret-looking query parameter replaced by ***.

    The query is split on ``&`` and ``;`` exactly as twisted.web splits it, so
    no parameter the application saw escapes redaction.
    """
    path, sep, query = uri.partition("?")
    if not sep:
        return path
    parts = []
    for part in re.split(r"[&;]", query) if ";" in query else query.split("&"):
        raw_name, eq, _ = part.partition("=")
        if eq:
            name = unquote_plus(raw_name) if "%" in raw_name or "+" in raw_name else raw_name
            if name.lower() in secret_params or SECRET_PARAM.search(name):
                part = f"{raw_name}=***"
        parts.append(part)
    return path + "?" + "&".join(parts)


_WANTED_HEADERS = frozenset((b"user-agent", b"authorization", b"x-forwarded-for", b"host"))
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


class ProvisioningResource(Resource):
    isLeaf = True

    def __init__(
        self,
        provisioner: Callable[[], Provisioner],
        protocol: str,
        seconds: Callable[[], float],
        inflight: InFlight | None = None,
        metrics: Metrics | None = None,
    ):
        super().__init__()
        self.provisioner = provisioner  # a callable, so a reload can swap it
        self.protocol = protocol
        self.seconds = seconds
        self.inflight = inflight or InFlight()
        self.metrics = metrics

    def render_GET(self, request: server.Request):
        started = self.seconds()
        provisioner = self.provisioner()
        wanted = {}
        for name, values in request.requestHeaders.getAllRawHeaders():
            name = name.lower()
            if name in _WANTED_HEADERS:  # one pass over the few headers a phone sends
                wanted[name] = _decode(values[-1])  # the last, as getHeader
        args = request.args
        req = Request(
            protocol=self.protocol,
            path=_decode(request.path),
            query={_decode(k): [_decode(v) for v in vs] for k, vs in args.items()} if args else {},
            user_agent=wanted.get(b"user-agent", ""),
            authorization=wanted.get(b"authorization", ""),
            client=client_address(
                _client(request), wanted.get(b"x-forwarded-for", ""), provisioner.config.access.trusted_proxies,
            ),
            host=wanted.get(b"host", ""),
            method=_decode(request.method),
            certificate_macs=_certificate_macs(request) if self.protocol == "https" else None,
        )
        answer = provisioner.answer(req)
        if isinstance(answer, Response) and answer.file is None:
            # Known at once (a cached document, a refusal): written and
            # finished now, without a Deferred.
            self._write(request, answer)
            self._finished(request, req, answer, provisioner, started)
            return server.NOT_DONE_YET
        self.inflight.enter()
        holder: list[Response] = []

        def finished(_):
            self.inflight.leave()
            self._finished(request, req, holder[0] if holder else None, provisioner, started)

        def write(response: Response) -> None:
            holder.append(response)
            self._write(request, response)

        request.notifyFinish().addBoth(finished)
        d = answer if isinstance(answer, Deferred) else succeed(answer)
        d.addCallback(write)
        d.addErrback(lambda f: log.failure("writing a response failed", f))
        return server.NOT_DONE_YET

    def _finished(self, request: server.Request, req: Request, response: Response | None,
                  provisioner: Provisioner, started: float) -> None:
        """The access line and the counters of one request."""
        if self.metrics is not None:
            self.metrics.answered(self.protocol, request.code, request.sentLength)
        uri = _decode(request.uri)
        if "?" in uri:
            uri = redact_uri(uri, provisioner.secret_params)
        who = response.who if response else "-"
        if not _PLAIN.fullmatch(who):
            who = quote(who, safe="@.:-_+")
        reason = response.reason if response and response.reason else "-"
        ms = (self.seconds() - started) * 1000
        logs.access(
            f'{self.protocol} {req.client} "{req.method} {uri}" {request.code} {request.sentLength} '
            f'{ms:.1f}ms who={who} "{reason}"'
        )

    render_HEAD = render_GET

    def _write(self, request: server.Request, response: Response) -> None:
        if request._disconnected:
            return
        request.setResponseCode(response.status)
        for name, value in response.headers:
            request.responseHeaders.addRawHeader(name, value)
        if response.file is not None:
            # Streams in chunks with a producer; handles HEAD and ranges.
            result = static.File(str(response.file), defaultType=response.content_type).render(request)
            if result is not server.NOT_DONE_YET:
                request.write(result)
                request.finish()
            return
        request.setHeader(b"content-type", response.content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", str(len(response.body)).encode())
        if request.method != b"HEAD":
            request.write(response.body)
        request.finish()


def _certificate_macs(request: server.Request) -> frozenset[str] | None:
    """The MACs named in the client's certificate (already verified against
    ``[https] client_ca`` by the handshake); None without a certificate."""
    get_peer = getattr(request.transport, "getPeerCertificate", None)
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


def _client(request: server.Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return host if host is not None else str(address)


class Channel(http.HTTPChannel):
    """HTTPChannel with early, explicit refusals of oversized or slow requests.

    A request line over ``MAX_REQUEST_LINE`` bytes gets 414, headers over
    ``totalHeadersSize`` bytes or ``maxHeaders`` lines 431, a body over
    ``MAX_BODY`` bytes 413 (phones only GET), and a client that has not sent
    a complete header block ``HEADER_DEADLINE`` seconds after connecting (or
    after its previous response) gets 408: trickling one byte at a time
    (slowloris) does not hold a connection open.
    """

    MAX_REQUEST_LINE = 4096
    MAX_LENGTH = 8192  # any one line
    totalHeadersSize = 8192
    maxHeaders = 64
    MAX_BODY = 64 * 1024
    HEADER_DEADLINE = 10.0

    _deadline = None
    _waiting_since: float | None = None
    _refused = False

    def connectionMade(self):
        super().connectionMade()
        self._arm()

    def _arm(self) -> None:
        """Headers are due HEADER_DEADLINE seconds from now.  One timer per
        connection, re-armed lazily when it fires: a keep-alive connection
        costs no timer call per request."""
        self._waiting_since = self.factory.reactor.seconds()
        if self._deadline is None:
            self._deadline = self.callLater(self.HEADER_DEADLINE, self._check_deadline)

    def _check_deadline(self) -> None:
        self._deadline = None
        if self._waiting_since is None:
            return  # a request is being answered; requestDone arms again
        left = self._waiting_since + self.HEADER_DEADLINE - self.factory.reactor.seconds()
        if left > 0:
            self._deadline = self.callLater(left, self._check_deadline)
        else:
            self._refuse(408, "Request Timeout", "headers not received in time")

    def _disarm(self) -> None:
        self._waiting_since = None
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _refuse(self, status: int, phrase: str, reason: str) -> None:
        if self._refused:
            return
        self._refused = True
        self._disarm()
        peer = self.transport.getPeer() if self.transport else None
        logs.access(f'http {getattr(peer, "host", "-")} "-" {status} 0 0.0ms who=- "{reason}"')
        self.transport.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        self.dataReceived = self.lineReceived = lambda *args: None
        self.transport.loseConnection()

    def lineReceived(self, line):
        if self._HTTPChannel__first_line and len(line) > self.MAX_REQUEST_LINE:
            return self._refuse(414, "URI Too Long", "request line too long")
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            return self._refuse(431, "Request Header Fields Too Large", "headers too large")
        return super().lineReceived(line)

    def lineLengthExceeded(self, line):
        if self._HTTPChannel__first_line:
            return self._refuse(414, "URI Too Long", "request line too long")
        return self._refuse(431, "Request Header Fields Too Large", "header line too long")

    def headerReceived(self, line):
        if self._receivedHeaderCount >= self.maxHeaders:
            self._refuse(431, "Request Header Fields Too Large", "too many headers")
            return False
        if line[:1] not in (b"T", b"t", b"C", b"c"):  # not Transfer-Encoding or Content-Length
            return super().headerReceived(line)
        name = line.split(b":", 1)[0].strip().lower()
        if name == b"transfer-encoding":
            self._refuse(413, "Content Too Large", "request body refused")
            return False
        if name == b"content-length":
            value = line.split(b":", 1)[1].strip() if b":" in line else b""
            if value.isdigit() and int(value) > self.MAX_BODY:
                self._refuse(413, "Content Too Large", "request body too large")
                return False
        return super().headerReceived(line)

    def allHeadersReceived(self):
        self._waiting_since = None
        super().allHeadersReceived()

    def requestDone(self, request):
        super().requestDone(request)
        if not self._refused and self.transport is not None and self.persistent:
            self._arm()

    def connectionLost(self, reason):
        self._disarm()
        super().connectionLost(reason)


class Site(server.Site):
    """A Site that does not print tracebacks to clients and times out idle clients.

    Twisted's own access line would carry the raw query string (passwords);
    ``ProvisioningResource`` writes a redacted one instead.
    """

    def log(self, request) -> None:
        pass

    protocol = Channel

    def __init__(self, resource: Resource, reactor):
        super().__init__(resource, reactor=reactor)
        self.displayTracebacks = False
        self.timeOut = REQUEST_TIMEOUT
        self.noisy = False
