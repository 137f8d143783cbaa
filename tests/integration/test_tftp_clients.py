"""The TFTP server against real clients: tftp-hpa, atftp and curl.

The server runs inside the test's reactor (pytest-twisted) on 127.0.0.1 (and
::1), port 0, serving a DirectorySource over a temporary folder; clients run
as subprocesses through ``getProcessOutputAndValue`` (each wrapped in
``timeout`` so nothing can hang).  Every loop is bounded in count and time.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

import pytest
import pytest_twisted
from conftest import needs_ipv6
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import deferLater
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger

from zprovd.tftp.packets import Ack, Data, Error, OptionAck, Opcode, ReadRequest, decode, peek_opcode
from zprovd.tftp.service import TFTPServer
from zprovd.tftp.source import DirectorySource

TFTP = shutil.which("tftp")
ATFTP = shutil.which("atftp")
CURL = shutil.which("curl")
TIMEOUT = shutil.which("timeout")

needs_tftp = pytest.mark.skipif(TFTP is None, reason="tftp-hpa client not installed")
needs_atftp = pytest.mark.skipif(ATFTP is None, reason="atftp not installed")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl not installed")
pytestmark = [pytest.mark.integration, pytest.mark.skipif(TIMEOUT is None, reason="coreutils timeout missing")]

ROLLOVER_SIZE = (65536 + 1) * 512  # 33,554,944 bytes: block numbers wrap at 512


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path) -> str | None:
    if not path.exists():
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A served folder and the SHA-256 of every file in it."""
    root = tmp_path_factory.mktemp("tftproot")
    rng = random.Random(20240601)
    contents = {
        "empty.bin": b"",
        "one-block.bin": rng.randbytes(512),
        "several-mb.bin": rng.randbytes(5 * 1024 * 1024 + 123),
        "rollover.bin": rng.randbytes(ROLLOVER_SIZE),
        "medium.bin": rng.randbytes(150_000),
        "lossy-512.bin": rng.randbytes(40_000),
        "text.txt": b"".join(b"line %d: bare LF\nCR LF\r\nlone CR\rend\n" % i for i in range(300)) + b"tail\r",
    }
    for i in range(20):
        contents[f"small-{i}.bin"] = rng.randbytes(rng.randint(1000, 120_000))
    (root / "sub").mkdir()
    contents["sub/nested.cfg"] = b"<nested/>\n"
    for name, data in contents.items():
        (root / name).write_bytes(data)
    (root.parent / "secret.txt").write_bytes(b"secret")
    return root, {name: sha(data) for name, data in contents.items()}


def start_server(root: Path, events: list[dict[str, Any]] | None = None, host: str = "127.0.0.1", **kw: Any) -> TFTPServer:
    log = Logger(namespace="zprovd.tftp.test", observer=events.append) if events is not None else None
    server = TFTPServer([(host, 0)], DirectorySource(root), log=log, shutdown_timeout=2, **kw)
    server.startService()
    return server


def run(args: list[str], cwd: Path, limit: int = 60) -> defer.Deferred[tuple[bytes, bytes, int]]:
    """Run a client with a hard time limit; fires with (stdout, stderr, exit code)."""
    d = getProcessOutputAndValue(TIMEOUT, ["-k", "5", str(limit), *args], env=dict(os.environ), path=str(cwd))
    # A signal death arrives as a failure carrying the same tuple.
    return d.addErrback(lambda f: f.value if isinstance(f.value, tuple) else f)


def negotiated(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "blksize" in e and "windowsize" in e]


def sleep(seconds: float) -> defer.Deferred[None]:
    from twisted.internet import reactor

    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


# -- tftp-hpa ------------------------------------------------------------------------------


@needs_tftp
@pytest.mark.parametrize("name", ["empty.bin", "one-block.bin", "several-mb.bin"])
@pytest_twisted.inlineCallbacks
def test_tftp_hpa_binary(files: tuple[Path, dict[str, str]], tmp_path: Path, name: str) -> Any:
    root, hashes = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        out, err, code = yield run([TFTP, "-m", "binary", host, str(port), "-c", "get", name, "got"], tmp_path)
        assert b"Error" not in out + err, (out, err)
        assert file_sha(tmp_path / "got") == hashes[name]
    finally:
        yield server.stopService()


@needs_tftp
@pytest_twisted.inlineCallbacks
def test_tftp_hpa_ascii(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    """netascii on the wire; tftp-hpa converts back, so the bytes must match."""
    root, hashes = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        out, err, code = yield run([TFTP, "-m", "ascii", host, str(port), "-c", "get", "text.txt", "got"], tmp_path)
        assert file_sha(tmp_path / "got") == hashes["text.txt"], (out, err)
    finally:
        yield server.stopService()


@needs_tftp
@pytest_twisted.inlineCallbacks
def test_rollover_tftp_hpa_512(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    """65537 blocks of 512 bytes: block numbers wrap from 65535 to 0."""
    root, hashes = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        yield run([TFTP, "-m", "binary", host, str(port), "-c", "get", "rollover.bin", "got"], tmp_path, limit=90)
        assert file_sha(tmp_path / "got") == hashes["rollover.bin"]
    finally:
        yield server.stopService()


@needs_tftp
@pytest_twisted.inlineCallbacks
def test_tftp_hpa_errors(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    root, _ = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        out, err, _ = yield run([TFTP, "-m", "binary", host, str(port), "-c", "get", "missing.bin", "x"], tmp_path)
        assert b"Error code 1" in out + err
        out, err, _ = yield run([TFTP, "-m", "binary", host, str(port), "-c", "get", "../secret.txt", "y"], tmp_path)
        assert b"Error code 2" in out + err
        assert not (tmp_path / "y").exists() or (tmp_path / "y").read_bytes() == b""
        out, err, _ = yield run([TFTP, "-m", "binary", host, str(port), "-c", "put", str(root / "one-block.bin"), "0004f2aabbcc-boot.log"], tmp_path)
        assert b"Error code 2" in out + err  # uploads are off
    finally:
        yield server.stopService()


@needs_tftp
@pytest_twisted.inlineCallbacks
def test_tftp_hpa_upload(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    root, hashes = files
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    server = start_server(root, upload_dir=uploads, upload_max_bytes=100_000)
    try:
        host, port = server.listening_ports()[0]
        src = root / "small-0.bin"
        if src.stat().st_size > 100_000:  # pragma: no cover - depends on the seed
            src = root / "one-block.bin"
        out, err, _ = yield run([TFTP, "-m", "binary", host, str(port), "-c", "put", str(src), "0004F2AABBCC-boot.log"], tmp_path)
        assert b"Error" not in out + err, (out, err)
        assert file_sha(uploads / "0004f2aabbcc-boot.log") == file_sha(src)
        out, err, _ = yield run([TFTP, "-m", "binary", host, str(port), "-c", "put", str(root / "medium.bin"), "0004f2aabbcc-app.log"], tmp_path)
        assert b"Error code 3" in out + err  # 150,000 bytes > 100,000
        out, err, _ = yield run([TFTP, "-m", "binary", host, str(port), "-c", "put", str(src), "evil.cfg"], tmp_path)
        assert b"Error code 2" in out + err
        # The completed upload was renamed into place before its final ACK;
        # the refused and the oversized ones left nothing behind.
        assert sorted(p.name for p in uploads.iterdir()) == ["0004f2aabbcc-boot.log"]
    finally:
        yield server.stopService()


# -- atftp ------------------------------------------------------------------------------------


@needs_atftp
@pytest.mark.parametrize("name", ["empty.bin", "one-block.bin", "several-mb.bin"])
@pytest_twisted.inlineCallbacks
def test_atftp_options(files: tuple[Path, dict[str, str]], tmp_path: Path, name: str) -> Any:
    root, hashes = files
    events: list[dict[str, Any]] = []
    server = start_server(root, events)
    try:
        host, port = server.listening_ports()[0]
        args = [ATFTP, "--option", "blksize 1468", "--option", "tsize", "--option", "timeout 2"]
        out, err, code = yield run([*args, "-g", "-r", name, "-l", "got", host, str(port)], tmp_path)
        assert code == 0, (out, err)
        assert file_sha(tmp_path / "got") == hashes[name]
        (n,) = negotiated(events)
        size = (root / name).stat().st_size
        assert (n["blksize"], n["timeout"], n["tsize"]) == (1468, 2, size or None)
    finally:
        yield server.stopService()


def _atftp_supports_windowsize() -> tuple[bool, str]:
    if ATFTP is None:
        return False, "atftp not installed"
    result = subprocess.run([ATFTP, "--version"], capture_output=True, text=True, timeout=10)
    m = re.search(r"atftp-(\d+)\.(\d+)", result.stdout + result.stderr)
    if not m:
        return False, "cannot tell the atftp version"
    if (int(m.group(1)), int(m.group(2))) < (0, 8):
        return False, f"atftp {m.group(0)} has no windowsize option (RFC 7440 came in 0.8.0)"
    return True, ""


@needs_atftp
@pytest_twisted.inlineCallbacks
def test_atftp_windowsize(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    supported, reason = _atftp_supports_windowsize()
    if not supported:
        pytest.skip(reason)
    root, hashes = files
    events: list[dict[str, Any]] = []
    server = start_server(root, events)
    try:
        host, port = server.listening_ports()[0]
        args = [ATFTP, "--option", "blksize 1468", "--option", "windowsize 8", "--option", "tsize"]
        out, err, code = yield run([*args, "-g", "-r", "several-mb.bin", "-l", "got", host, str(port)], tmp_path)
        assert code == 0, (out, err)
        assert file_sha(tmp_path / "got") == hashes["several-mb.bin"]
        (n,) = negotiated(events)
        assert n["windowsize"] == 8 and n["blksize"] == 1468
    finally:
        yield server.stopService()


@needs_atftp
@pytest_twisted.inlineCallbacks
def test_rollover_atftp_windowed(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    supported, reason = _atftp_supports_windowsize()
    if not supported:
        pytest.skip(reason)
    root, hashes = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        args = [ATFTP, "--option", "blksize 512", "--option", "windowsize 16"]
        out, err, code = yield run([*args, "-g", "-r", "rollover.bin", "-l", "got", host, str(port)], tmp_path, limit=90)
        assert code == 0, (out, err)
        assert file_sha(tmp_path / "got") == hashes["rollover.bin"]
    finally:
        yield server.stopService()


# -- curl -------------------------------------------------------------------------------------


@needs_curl
@pytest_twisted.inlineCallbacks
def test_rollover_curl_512(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    root, hashes = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        out, err, code = yield run([CURL, "-sS", "--tftp-blksize", "512", f"tftp://{host}:{port}/rollover.bin"], tmp_path, limit=90)
        assert code == 0, err
        assert sha(out) == hashes["rollover.bin"]
    finally:
        yield server.stopService()


@needs_curl
@pytest.mark.parametrize("name", ["empty.bin", "one-block.bin", "several-mb.bin", "sub/nested.cfg"])
@pytest_twisted.inlineCallbacks
def test_curl(files: tuple[Path, dict[str, str]], tmp_path: Path, name: str) -> Any:
    root, hashes = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        out, err, code = yield run([CURL, "-sS", "--tftp-blksize", "1468", f"tftp://{host}:{port}/{name}"], tmp_path)
        assert code == 0, err
        assert sha(out) == hashes[name]
    finally:
        yield server.stopService()


@needs_curl
@pytest_twisted.inlineCallbacks
def test_curl_errors(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    root, _ = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        _, _, code = yield run([CURL, "-sS", f"tftp://{host}:{port}/missing"], tmp_path)
        assert code == 68  # CURLE_TFTP_NOTFOUND
        _, _, code = yield run([CURL, "-sS", "--path-as-is", f"tftp://{host}:{port}/../secret.txt"], tmp_path)
        assert code == 69  # CURLE_TFTP_PERM
    finally:
        yield server.stopService()


# -- loss -----------------------------------------------------------------------------------------


class LossyRelay:
    """A UDP relay between one client and the server that drops and duplicates.

    The client talks to ``front``; the relay talks to the server from
    ``back``.  Requests go to the server's listening port, everything else to
    the server's transfer port, learnt from its replies (port rewriting).
    Fates come from a seeded ``random.Random``: deterministic for a given
    datagram sequence.

    The option handshake (the request, the OACK and ACK 0) is spared:
    atftp aborts on a second OACK ("unexpected OACK") and curl restarts at
    block 1 on one, so a lost ACK 0 (the server must then repeat its OACK)
    or a duplicated OACK breaks those clients whatever the server does.
    Everything after it, DATA and ACKs, suffers drops and duplicates.
    """

    def __init__(self, server: tuple[str, int], seed: int, drop: float = 0.10, dup: float = 0.05):
        from twisted.internet import reactor

        self.server = server
        self.rng = random.Random(seed)
        self.drop = drop
        self.dup = dup
        self.client: tuple[str, int] | None = None
        self.server_tid: tuple[str, int] | None = None
        self.data_seen = False
        self.dropped = self.duplicated = self.forwarded = 0
        relay = self

        class Front(DatagramProtocol):
            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                relay.client = (addr[0], addr[1])
                if peek_opcode(datagram) in (Opcode.RRQ, Opcode.WRQ):
                    relay.server_tid = None
                    relay.data_seen = False
                    relay.back.transport.write(datagram, relay.server)  # type: ignore[union-attr]
                elif relay.server_tid is not None:
                    spare = datagram[:4] == Ack(0).encode() and not relay.data_seen
                    relay.forward(relay.back, datagram, relay.server_tid, spare)

        class Back(DatagramProtocol):
            def datagramReceived(self, datagram: bytes, addr: Any) -> None:
                if (addr[0], addr[1]) != relay.server:
                    relay.server_tid = (addr[0], addr[1])
                opcode = peek_opcode(datagram)
                relay.data_seen = relay.data_seen or opcode == Opcode.DATA
                if relay.client is not None:
                    relay.forward(relay.front, datagram, relay.client, opcode == Opcode.OACK)

        self.front, self.back = Front(), Back()
        self.front_port = reactor.listenUDP(0, self.front, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.back_port = reactor.listenUDP(0, self.back, interface="127.0.0.1")  # type: ignore[attr-defined]

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.front_port.getHost().port)

    def forward(self, proto: DatagramProtocol, datagram: bytes, to: tuple[str, int], spare: bool = False) -> None:
        drop, dup = self.rng.random() < self.drop, self.rng.random() < self.dup
        if spare:
            drop = dup = False
        if drop:
            self.dropped += 1
            return
        copies = 2 if dup else 1
        self.duplicated += copies - 1
        for _ in range(copies):
            self.forwarded += 1
            proto.transport.write(datagram, to)  # type: ignore[union-attr]

    def close(self) -> defer.Deferred[Any]:
        return defer.gatherResults(
            [defer.maybeDeferred(self.front_port.stopListening), defer.maybeDeferred(self.back_port.stopListening)]
        )


@needs_atftp
@pytest.mark.parametrize("window", [None, 4])
@pytest_twisted.inlineCallbacks
def test_loss_and_duplication_atftp(files: tuple[Path, dict[str, str]], tmp_path: Path, window: int | None) -> Any:
    if window is not None:
        supported, reason = _atftp_supports_windowsize()
        if not supported:
            pytest.skip(reason)
    root, hashes = files
    server = start_server(root)
    relay = LossyRelay(server.listening_ports()[0], seed=1350 + (window or 0))
    try:
        host, port = relay.address
        args = [ATFTP, "--tftp-timeout", "1", "--option", "blksize 1468"]
        if window:
            args += ["--option", f"windowsize {window}"]
        out, err, code = yield run([*args, "-g", "-r", "medium.bin", "-l", "got", host, str(port)], tmp_path, limit=60)
        assert code == 0, (out, err)
        assert file_sha(tmp_path / "got") == hashes["medium.bin"]
        assert relay.dropped >= 5 and relay.duplicated >= 2, (relay.dropped, relay.duplicated)
    finally:
        yield relay.close()
        yield server.stopService()


@needs_curl
@pytest_twisted.inlineCallbacks
def test_loss_and_duplication_curl(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    # Without options: curl always asks for "timeout 6" otherwise, and the
    # server then honours 6 s per lost datagram, which is correct but slow.
    # Plain RFC 1350 exercises the adaptive timeout instead.
    root, hashes = files
    server = start_server(root)
    relay = LossyRelay(server.listening_ports()[0], seed=7440)
    try:
        host, port = relay.address
        out, err, code = yield run([CURL, "-sS", "--tftp-no-options", f"tftp://{host}:{port}/lossy-512.bin"], tmp_path)
        assert code == 0, err
        assert sha(out) == hashes["lossy-512.bin"]
        assert relay.dropped >= 5 and relay.duplicated >= 2, (relay.dropped, relay.duplicated)
    finally:
        yield relay.close()
        yield server.stopService()


# -- concurrency ----------------------------------------------------------------------------------


class GetClient(DatagramProtocol):
    """A minimal lock-step TFTP reader for the concurrency test."""

    def __init__(self, server: tuple[str, int], name: str, on_packet: Callable[[], None]):
        self.server = server
        self.name = name
        self.on_packet = on_packet
        self.done: defer.Deferred[bytes] = defer.Deferred()
        self.tid: tuple[str, int] | None = None
        self.blksize = 512
        self.expected = 1
        self.chunks: list[bytes] = []
        self.last = ReadRequest(name, "octet", {"blksize": "1468", "tsize": "0"}).encode()
        self.tries = 0
        self.timer: Any = None

    def startProtocol(self) -> None:
        self.send(self.last, self.server)

    def send(self, datagram: bytes, to: tuple[str, int]) -> None:
        from twisted.internet import reactor

        self.last = datagram
        self.transport.write(datagram, to)  # type: ignore[union-attr]
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = reactor.callLater(1.0, self.resend)  # type: ignore[attr-defined]

    def resend(self) -> None:
        self.tries += 1
        if self.tries > 10:
            self.finish(RuntimeError(f"{self.name}: no answer"))
            return
        self.send(self.last, self.tid or self.server)

    def finish(self, result: Any) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        if not self.done.called:
            if isinstance(result, Exception):
                self.done.errback(result)
            else:
                self.done.callback(result)

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        addr = (addr[0], addr[1])
        if self.done.called:
            if self.transport is not None and addr == self.tid and peek_opcode(datagram) == Opcode.DATA:
                self.transport.write(Ack((self.expected - 1) & 0xFFFF).encode(), addr)  # our last ACK was lost
            return
        if self.tid is None:
            self.tid = addr
        elif addr != self.tid:
            return
        self.on_packet()
        self.tries = 0
        p = decode(datagram)
        if isinstance(p, OptionAck):
            self.blksize = int(p.options.get("blksize", "512"))
            self.send(Ack(0).encode(), addr)
        elif isinstance(p, Data):
            if p.block == self.expected & 0xFFFF:
                self.chunks.append(p.payload)
                self.expected += 1
                if len(p.payload) < self.blksize:
                    self.transport.write(Ack(p.block).encode(), addr)  # type: ignore[union-attr]
                    self.finish(b"".join(self.chunks))
                    return
            self.send(Ack((self.expected - 1) & 0xFFFF).encode(), addr)
        elif isinstance(p, Error):
            self.finish(RuntimeError(f"{self.name}: ERROR {p.code} {p.message}"))


@pytest_twisted.inlineCallbacks
def test_200_concurrent_transfers_in_process(files: tuple[Path, dict[str, str]]) -> Any:
    """200 readers started at once, all in flight together."""
    from twisted.internet import reactor

    root, hashes = files
    server = start_server(root, max_transfers_per_client=256)  # every reader is on 127.0.0.1
    ports = []
    peak = [0]

    def sample() -> None:
        peak[0] = max(peak[0], server.transfers_in_flight())

    try:
        target = server.listening_ports()[0]
        clients = []
        for i in range(200):
            c = GetClient(target, "medium.bin" if i % 2 else f"small-{i % 20}.bin", sample)
            clients.append(c)
            ports.append(reactor.listenUDP(0, c, interface="127.0.0.1"))  # type: ignore[attr-defined]
        results = yield defer.DeferredList([c.done.addTimeout(60, reactor) for c in clients], consumeErrors=True)
        failures = [(c.name, r) for c, (ok, r) in zip(clients, results) if not ok]
        assert failures == []
        for c, (_, data) in zip(clients, results):
            assert sha(data) == hashes[c.name], c.name
        assert peak[0] >= 150, f"only {peak[0]} transfers were in flight together"
    finally:
        for p in ports:
            yield p.stopListening()
        yield server.stopService()


@needs_curl
@needs_atftp
@needs_tftp
@pytest_twisted.inlineCallbacks
def test_200_real_clients_in_batches(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    """200 transfers by real client processes, 50 running at a time."""
    root, hashes = files
    server = start_server(root)
    try:
        host, port = server.listening_ports()[0]
        jobs = []
        for i in range(200):
            name = f"small-{i % 20}.bin"
            dest = tmp_path / f"out-{i}"
            kind = i % 3
            if kind == 0:
                args = [CURL, "-sS", "--tftp-blksize", "1468", "-o", str(dest), f"tftp://{host}:{port}/{name}"]
            elif kind == 1:
                args = [ATFTP, "--option", "blksize 1468", "-g", "-r", name, "-l", str(dest), host, str(port)]
            else:
                args = [TFTP, "-m", "binary", host, str(port), "-c", "get", name, str(dest)]
            jobs.append((args, name, dest))
        for start in range(0, len(jobs), 50):
            batch = jobs[start : start + 50]
            results = yield defer.gatherResults([run(args, tmp_path, limit=60) for args, _, _ in batch])
            for (args, name, dest), (out, err, code) in zip(batch, results):
                assert file_sha(dest) == hashes[name], (args[0], name, code, out, err)
    finally:
        yield server.stopService()


# -- IPv6 ------------------------------------------------------------------------------------------


@needs_ipv6
@needs_curl
@pytest_twisted.inlineCallbacks
def test_ipv6_curl(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    root, hashes = files
    server = start_server(root, host="::1")
    try:
        host, port = server.listening_ports()[0]
        assert host == "::1" and port != 0
        out, err, code = yield run([CURL, "-sS", "--tftp-blksize", "1468", f"tftp://[::1]:{port}/several-mb.bin"], tmp_path)
        assert code == 0, err
        assert sha(out) == hashes["several-mb.bin"]
        _, _, code = yield run([CURL, "-sS", f"tftp://[::1]:{port}/missing"], tmp_path)
        assert code == 68
    finally:
        yield server.stopService()


@needs_ipv6
@needs_tftp
@pytest_twisted.inlineCallbacks
def test_ipv6_tftp_hpa(files: tuple[Path, dict[str, str]], tmp_path: Path) -> Any:
    root, hashes = files
    server = start_server(root, host="::1")
    try:
        _, port = server.listening_ports()[0]
        out, err, _ = yield run([TFTP, "-6", "-m", "binary", "::1", str(port), "-c", "get", "medium.bin", "got"], tmp_path)
        assert file_sha(tmp_path / "got") == hashes["medium.bin"], (out, err)
    finally:
        yield server.stopService()
