"""HTTP and HTTPS: twisted.web around the provisioning pipeline.

The resource only translates: a twisted.web request becomes a
``zprovd.routing.Request``, the ``Response`` becomes status, headers and
body.  One access-log line per request, with secret query values replaced
by ``***`` and never an Authorization header.
"""

from __future__ import annotations

import re
from typing import Callable
from urllib.parse import parse_qsl, quote

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web import server, static
from twisted.web.resource import Resource

from zprovd.metrics import Metrics
from zprovd.provisioning import Provisioner, Response
from zprovd.routing import Request

log = Logger(namespace="zprovd.http")
access_log = Logger(namespace="zprovd.access")

SECRET_PARAM = re.compile(r"pass|pwd|secret|token|key|sig|auth", re.IGNORECASE)
REQUEST_TIMEOUT = 30  # seconds a client may take to send its request


def redact_uri(uri: str, secret_params: set[str]) -> str:
    """The URI with the value of every secret-looking query parameter replaced by ***."""
    path, sep, query = uri.partition("?")
    if not sep:
        return path
    parts = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name.lower() in secret_params or SECRET_PARAM.search(name):
            value = "***"
        parts.append(f"{quote(name, safe='')}={quote(value, safe='*@.:-_') if value != '***' else value}")
    return path + "?" + "&".join(parts)


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
        self.inflight.enter()
        provisioner = self.provisioner()
        query = {_decode(k): [_decode(v) for v in vs] for k, vs in (request.args or {}).items()}
        req = Request(
            protocol=self.protocol,
            path=_decode(request.path),
            query=query,
            user_agent=_decode(request.getHeader(b"user-agent") or b""),
            authorization=_decode(request.getHeader(b"authorization") or b""),
            client=_client(request),
            host=_decode(request.getHeader(b"host") or b""),
        )
        secret_params = {p.lower() for p in provisioner.config.zoiper.password_params}
        response_holder: list[Response] = []

        def finished(_):
            self.inflight.leave()
            if self.metrics is not None:
                self.metrics.answered(self.protocol, request.code, request.sentLength)
            response = response_holder[0] if response_holder else None
            access_log.info(
                "{protocol} {client} \"{method} {uri}\" {status} {size} {ms:.1f}ms who={who} {reason}",
                protocol=self.protocol,
                client=req.client,
                method=_decode(request.method),
                uri=redact_uri(_decode(request.uri), secret_params),
                status=request.code,
                size=request.sentLength,
                ms=(self.seconds() - started) * 1000,
                who=quote(response.who, safe="@.:-_+") if response else "-",
                reason=f'"{response.reason}"' if response and response.reason else '"-"',
            )

        request.notifyFinish().addBoth(finished)
        d = provisioner.handle(req)
        d.addCallback(lambda response: (response_holder.append(response), self._write(request, response)))
        d.addErrback(lambda f: log.failure("writing a response failed", f))
        return server.NOT_DONE_YET

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


def _client(request: server.Request) -> str:
    address = request.getClientAddress()
    return getattr(address, "host", str(address))


class Site(server.Site):
    """A Site that does not print tracebacks to clients and times out idle clients.

    Twisted's own access line would carry the raw query string (passwords);
    ``ProvisioningResource`` writes a redacted one instead.
    """

    def log(self, request) -> None:
        pass

    def __init__(self, resource: Resource, reactor):
        super().__init__(resource, reactor=reactor)
        self.displayTracebacks = False
        self.timeOut = REQUEST_TIMEOUT
        self.noisy = False
