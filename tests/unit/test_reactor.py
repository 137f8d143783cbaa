"""The reactor ``zprovd run`` installs (zprovd.reactor).

Each test runs in a child Python: a process installs one reactor, and the
test runner's own is already there.  The children talk only to loopback
and bound every wait.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import free_config


def child(script: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_zprovd_run_gets_the_lean_reactor(tmp_path):
    """``zprovd run`` hands the daemon the lean reactor: nothing it imports installs Twisted's default
    first, and this Twisted still has what the lean dispatch needs (if either changes, this fails)."""
    config = free_config(tmp_path)
    out = child(f"""
        import sys
        import zprovd.cli, zprovd.daemon

        class Probe:  # stands in for the daemon: reports the reactor it is given, and exits
            def __init__(self, config, reactor):
                print(type(reactor).__name__, "twisted.internet.reactor" in sys.modules)
                raise SystemExit(0)

        zprovd.daemon.Daemon = Probe
        zprovd.cli.main(["-c", {str(config)!r}, "run"])
    """)
    assert out == ["LeanEPollReactor", "True"]


def test_install_falls_back_to_twisteds_reactor_without_the_private_pieces():
    out = child("""
        from zprovd import reactor
        reactor.lean_dispatch_available = lambda: False
        print(type(reactor.install()).__name__)
    """)
    assert out == ["EPollReactor"]


def test_install_keeps_a_reactor_already_installed():
    out = child("""
        from twisted.internet import reactor as default
        from zprovd import reactor
        print(reactor.install() is default, type(default).__name__)
    """)
    assert out == ["True", "EPollReactor"]


def test_udp_and_tcp_round_trips():
    out = child("""
        import socket
        from zprovd import reactor as event_loop
        reactor = event_loop.install()
        from twisted.internet.protocol import DatagramProtocol, Factory, Protocol

        class UdpEcho(DatagramProtocol):
            def datagramReceived(self, data, addr):
                self.transport.write(data.upper(), addr)

        class TcpEcho(Protocol):
            def dataReceived(self, data):
                self.transport.write(data.upper())

        udp = reactor.listenUDP(0, UdpEcho(), interface="127.0.0.1")
        tcp = reactor.listenTCP(0, Factory.forProtocol(TcpEcho), interface="127.0.0.1")
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setblocking(False)
        u.sendto(b"ping", ("127.0.0.1", udp.getHost().port))
        t = socket.create_connection(("127.0.0.1", tcp.getHost().port), timeout=5)
        t.setblocking(False)
        t.sendall(b"hello")
        got = {}
        for _ in range(200):  # at most 200 turns of 50 ms
            reactor.iterate(0.05)
            for name, sock in (("udp", u), ("tcp", t)):
                try:
                    got[name] = sock.recv(100).decode()
                except BlockingIOError:
                    pass
            if len(got) == 2:
                break
        print(got.get("udp"), got.get("tcp"))
    """)
    assert out == ["PING", "HELLO"]


def test_a_failing_doRead_is_logged_and_disconnects_only_its_descriptor():
    """As with Twisted's own dispatch: the error is logged, the descriptor gets
    ``connectionLost`` and is removed, and the loop carries on for the others,
    also when ``connectionLost`` itself fails."""
    out = child("""
        import socket
        from zprovd import reactor as event_loop
        reactor = event_loop.install()
        from twisted.logger import globalLogPublisher

        logged = []
        # Twisted's dispatch logs through the legacy log.err: its events carry "failure".
        globalLogPublisher.addObserver(lambda e: logged.append(e.get("log_failure") or e.get("failure")))

        class Reader:
            def __init__(self, fail):
                self.sock, self.peer = socket.socketpair()
                self.sock.setblocking(False)
                self.fail = fail
                self.read = b""
                self.lost = None
            def fileno(self):
                return self.sock.fileno()
            def logPrefix(self):
                return "test"
            def doRead(self):
                if self.fail:
                    raise RuntimeError("broken reader")
                self.read += self.sock.recv(100)
            def connectionLost(self, reason):
                self.lost = reason.type.__name__

        class Worse(Reader):  # its connectionLost fails too: the error escapes Twisted's dispatch
            def connectionLost(self, reason):
                super().connectionLost(reason)
                raise ValueError("broken connectionLost")

        bad, good, worse = Reader(True), Reader(False), Worse(True)
        for r in (bad, good, worse):
            reactor.addReader(r)
            r.peer.send(b"x")
        for _ in range(100):  # at most 100 turns of 50 ms
            reactor.iterate(0.05)
            if bad.lost and worse.lost and good.read:
                break
        good.peer.send(b"y")
        for _ in range(100):
            reactor.iterate(0.05)
            if good.read == b"xy":
                break
        print(bad.lost, bad in reactor.getReaders(), worse in reactor.getReaders(), good.read.decode(), good.lost)
        print(sum(1 for f in logged if f is not None and f.check(RuntimeError)),
              sum(1 for f in logged if f is not None and f.check(ValueError)))
    """)
    assert out == ["RuntimeError", "False", "False", "xy", "None", "2", "1"]
