"""The ceiling of zprovd's own HTTP stack: ``zprovd.httpcore`` returning fixed bytes.

Started by the bench as a subprocess:
``python bench/bare_httpcore.py SIZE [--tls CERT KEY]``; prints
``bare: serving http on 127.0.0.1:PORT`` (and https) on stderr.  The same
sans-I/O connection, reactor and response heads as ``zprovd.web``, with no
provisioning, access log or metrics: what zprovd's per-request work is
measured against, next to the bare twisted.web resource the issue names.
"""

from __future__ import annotations

import sys

from zprovd import reactor as event_loop

reactor = event_loop.install()  # the reactor zprovd runs on

from twisted.internet import ssl
from twisted.internet.protocol import Factory, Protocol

from zprovd import httpcore

BACKLOG = 1024  # as zprovd's listeners (and nginx in the bench): p99 then compares request handling, not the accept queue


class Fixed(Protocol):
    def __init__(self, body: bytes):
        self.body = body
        self.headers = [(b"Content-Type", b"text/plain; charset=utf-8"), (b"Cache-Control", b"no-store"),
                        (b"Content-Length", b"%d" % len(body))]

    def connectionMade(self):
        self.connection = httpcore.ServerConnection(reactor.seconds())

    def dataReceived(self, data):
        connection = self.connection
        connection.receive_data(data)
        while (event := connection.next_event()) is not None:
            now = reactor.seconds()
            if isinstance(event, httpcore.Refusal):
                self.transport.write(httpcore.refusal_bytes(event, now))
                self.transport.loseConnection()
                return
            head = httpcore.response_head(200, self.headers, event.keep_alive, event.http10, now)
            self.transport.write(head + self.body)
            connection.response_done(now, event.keep_alive)
            if not event.keep_alive:
                self.transport.loseConnection()


class FixedFactory(Factory):
    noisy = False

    def __init__(self, body: bytes):
        self.body = body

    def buildProtocol(self, addr):
        return Fixed(self.body)


def main() -> None:
    size = int(sys.argv[1])
    body = (b"# fixed bytes of a provisioning file\n" * (size // 37 + 1))[:size]
    factory = FixedFactory(body)
    port = reactor.listenTCP(0, factory, backlog=BACKLOG, interface="127.0.0.1")
    print(f"bare: serving http on 127.0.0.1:{port.getHost().port}", file=sys.stderr, flush=True)
    if "--tls" in sys.argv:
        i = sys.argv.index("--tls")
        ctx = ssl.DefaultOpenSSLContextFactory(sys.argv[i + 2], sys.argv[i + 1])
        tport = reactor.listenSSL(0, factory, ctx, backlog=BACKLOG, interface="127.0.0.1")
        print(f"bare: serving https on 127.0.0.1:{tport.getHost().port}", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
