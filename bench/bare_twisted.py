"""The issue's HTTP reference: a bare twisted.web resource returning fixed bytes.

Started by the bench as a subprocess:
``python bench/bare_twisted.py SIZE [--tls CERT KEY]``; prints
``bare: serving http on 127.0.0.1:PORT`` (and https) on stderr.  Same
reactor as zprovd, no access log, content-length set like zprovd does.
zprovd's provisioning listeners no longer use twisted.web (they use
``zprovd.httpcore``); ``bare_httpcore.py`` is the ceiling of that stack.
"""

from __future__ import annotations

import sys

from zprovd import reactor as event_loop

reactor = event_loop.install()  # the reactor zprovd runs on

from twisted.internet import ssl
from twisted.web import server
from twisted.web.resource import Resource

BACKLOG = 1024  # as zprovd's listeners (and nginx in the bench): p99 then compares request handling, not the accept queue


class Fixed(Resource):
    isLeaf = True

    def __init__(self, body: bytes):
        super().__init__()
        self.body = body
        self.length = str(len(body)).encode()

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", self.length)
        return self.body


class QuietSite(server.Site):
    noisy = False

    def log(self, request):
        pass


def main() -> None:
    size = int(sys.argv[1])
    body = (b"# fixed bytes of a provisioning file\n" * (size // 37 + 1))[:size]
    site = QuietSite(Fixed(body))
    port = reactor.listenTCP(0, site, backlog=BACKLOG, interface="127.0.0.1")
    print(f"bare: serving http on 127.0.0.1:{port.getHost().port}", file=sys.stderr, flush=True)
    if "--tls" in sys.argv:
        i = sys.argv.index("--tls")
        ctx = ssl.DefaultOpenSSLContextFactory(sys.argv[i + 2], sys.argv[i + 1])
        tport = reactor.listenSSL(0, site, ctx, backlog=BACKLOG, interface="127.0.0.1")
        print(f"bare: serving https on 127.0.0.1:{tport.getHost().port}", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
