"""The Twisted side of the TFTP server: sockets and timers, nothing else.

:class:`TFTPServer` is a ``twisted.application.service.Service`` that listens
on the configured UDP addresses (one :class:`ListeningSocket` each, read by
the reactor) with one :class:`TFTPProtocol` each.  That protocol decodes
requests, asks the *source* for read requests (see
:mod:`zprovd.tftp.source` for the source protocol) or checks write requests
against the upload folder, and starts a transfer.

Each transfer gets its own UDP socket (:class:`TransferSocket`), bound to an
ephemeral port on the address the request was sent to, and answers from it
(RFC 1350 transfer IDs).  The socket is *connected* to the client:
the kernel delivers only the client's datagrams to it and sends without a
per-datagram address.  Datagrams from any other address or port therefore
never disturb the transfer; the kernel drops them and answers with ICMP port
unreachable instead of the ERROR 5 "unknown transfer ID" that RFC 1350 says
a server "should" send (answering them would need an unconnected socket,
and a route look-up and an address check for every datagram of every
transfer).  If the client's port closes, the kernel reports the ICMP port
unreachable it gets back as ECONNREFUSED and the transfer ends at once
(quietly: the client has gone).  A request from an address a socket cannot
be connected to (a broadcast source) is not answered.

The protocol logic lives in the sans-I/O sessions of
:mod:`zprovd.tftp.session`; this module only moves datagrams and runs one
timer per transfer through the injected ``reactor`` (``reactor.seconds()``
is the session clock, so tests can drive everything with
``twisted.internet.task.Clock``).  Nothing is logged per datagram (but a
failed send, at debug level).

Errors answering a request (file not found, access violation, malformed
request...) are sent from the listening port.

Every reply comes from the address the client sent its request to, also
when listening on a wildcard address (``0.0.0.0``, ``::``) of a host with
several: a transfer socket is bound to that address, and errors from the
listening port name it as their source (see :class:`ListeningSocket`).
The listening socket also hands the protocol the sender's whole address:
for IPv6 that includes the scope, so a client on a link-local address
(``fe80::...``) is answered through the interface its request came in on
(Twisted's ``listenUDP`` keeps only host and port).
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from zprovd.tftp.packets import (
    Error,
    ErrorCode,
    MalformedPacket,
    Opcode,
    ReadRequest,
    WriteRequest,
    decode,
    peek_opcode,
)
from zprovd.tftp.session import SUPPORTED_MODES, TIMER_SLACK, Limits, Output, ReadSession, WriteSession
from zprovd.tftp.source import AccessDenied, Reader, Source, SourceError
from zprovd.uploads import UploadWriter, upload_name

__all__ = [
    "TFTPServer",
    "TFTPProtocol",
    "ListeningSocket",
    "Transfer",
    "TransferSocket",
    "Source",
    "Reader",
    "AccessDenied",
]

# Big enough for any TFTP datagram (65464 bytes of payload + header).
MAX_DATAGRAM = 65536 + 64

# Datagrams a listening socket reads per readiness event, at most.  A boot
# storm's requests arrive together and the socket's queue holds only a few
# hundred: reading fewer per turn (64 was tried) let it overflow while the
# transfers had their turn, and phones waited for their 2 s retransmission
# (2,000 phones over TFTP: median 3.2 s against 2.2 s with 1,024, in the
# bench's storm).  Twisted's UDP port reads up to 256 KiB per event.
LISTEN_BATCH = 1024

# Linux's value; Python's socket module does not export it on every version.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
# Room for the larger of struct in_pktinfo (12 bytes) and struct in6_pktinfo (20).
_PKTINFO_SPACE = socket.CMSG_SPACE(20)

def _error_datagram(code: int, message: str) -> bytes:
    return Error(code, message).encode()


class ClientUnreachable(OSError):
    """A transfer socket cannot be connected to the client's address (a broadcast source...)."""


class _ReadSocket:
    """A UDP socket of zprovd's own that the reactor reads (``IReactorFDSet.addReader``) until :meth:`close`."""

    def __init__(self, reactor: Any, sock: socket.socket):
        self.socket = sock
        self.port: int = sock.getsockname()[1]
        self._reactor = reactor
        self._open = True
        reactor.addReader(self)

    def fileno(self) -> int:
        return self.socket.fileno()

    @property
    def open(self) -> bool:
        """Until :meth:`close` (by zprovd, or the reactor dropping the socket)."""
        return self._open

    def close(self) -> None:
        if self._open:
            self._open = False
            self._reactor.removeReader(self)
            self.socket.close()


class ListeningSocket(_ReadSocket):
    """A listening UDP socket of zprovd's own, read by the reactor (``IReactorFDSet.addReader``).

    Each datagram goes to ``received(datagram, address, local)``:

    - ``address`` is the sender's whole address as the socket gives it:
      ``(host, port)`` for IPv4, ``(host, port, flowinfo, scope_id)`` for IPv6;
    - ``local`` is the address of ours the datagram was sent to, as a
      socket address to bind (port 0; for a link-local IPv6 address, with
      the interface as its scope), read from the kernel's packet info.  On a
      wildcard listener (``0.0.0.0``, ``::``) a reply must come from it: a
      client that sent to one of several addresses of the host (a second
      address, a virtual address shared by two servers, an IPv6 link-local
      address beside another) ignores an answer from any other, and the
      kernel, left to choose, picks by its own rules.  For a datagram sent to
      a broadcast address it is the receiving interface's address; for an
      IPv6 multicast one, the listening address.

    ``write(datagram, address, local)`` answers from the listening socket
    with ``local`` as the source address.  An exception from ``received`` is
    logged and the next datagram read: one bad datagram never closes the
    port.  Binding fails with ``CannotListenError``, as ``listenUDP`` does.
    """

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        received: Callable[[bytes, tuple[Any, ...], tuple[Any, ...]], None],
        log: Logger,
    ):
        self._v6 = ":" in host
        sock = socket.socket(socket.AF_INET6 if self._v6 else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if self._v6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            else:
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            sock.bind((host, port))
        except OSError as e:
            sock.close()
            raise CannotListenError(host, port, e) from None
        self.host = host
        self._unknown_local = (host, 0)  # no packet info (never on Linux): the listening address
        self._recvmsg = sock.recvmsg
        self._received = received
        self._log = log
        super().__init__(reactor, sock)

    def logPrefix(self) -> str:
        return "TFTP listening port"

    def doRead(self) -> None:
        for _ in range(LISTEN_BATCH):
            try:
                datagram, ancillary, _, address = self._recvmsg(MAX_DATAGRAM, _PKTINFO_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # an error queued on the socket (ICMP for an earlier reply...)
                self._log.debug("TFTP listening port {host} {port}: receive failed: {err}", host=self.host,
                                port=self.port, err=e)
                return
            try:
                self._received(datagram, address, self._local(ancillary))
            except Exception:
                self._log.failure("TFTP datagram from {address} could not be handled", address=address)

    def _local(self, ancillary: list[tuple[int, int, bytes]]) -> tuple[Any, ...]:
        for level, kind, data in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
                # struct in_pktinfo: ifindex, spec_dst (our address: the destination,
                # or for a broadcast the interface's), addr (the header's destination).
                return (socket.inet_ntop(socket.AF_INET, data[4:8]), 0)
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
                # struct in6_pktinfo: addr (the destination), ifindex.
                if data[0] == 0xFF:  # multicast: not an address to answer from
                    break
                host = socket.inet_ntop(socket.AF_INET6, data[:16])
                if data[0] == 0xFE and data[1] & 0xC0 == 0x80:  # link-local: the interface is part of it
                    return (host, 0, 0, int.from_bytes(data[16:20], sys.byteorder))
                return (host, 0)
        return self._unknown_local

    def write(self, datagram: bytes, address: tuple[Any, ...], local: tuple[Any, ...]) -> None:
        """Send one datagram from ``local`` (raises OSError); nothing once the port is closed (the server is stopping)."""
        if not self._open:
            return
        if self._v6:
            info = socket.inet_pton(socket.AF_INET6, local[0]) + (local[3] if len(local) > 3 else 0).to_bytes(4, sys.byteorder)
            self.socket.sendmsg([datagram], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)], 0, address)
        else:
            info = bytes(4) + socket.inet_pton(socket.AF_INET, local[0]) + bytes(4)
            self.socket.sendmsg([datagram], [(socket.IPPROTO_IP, IP_PKTINFO, info)], 0, address)

    def connectionLost(self, reason: Any = None) -> None:
        """The reactor dropped the socket: it is stopping with the port still open (or an error event)."""
        if self._open:
            self.close()
            self._log.info("TFTP listening port {host} {port} closed", host=self.host, port=self.port)


class TransferSocket(_ReadSocket):
    """One transfer's UDP socket: an ephemeral port on ``local``, connected to the client.

    ``local`` is the address the client sent its request to (see
    :class:`ListeningSocket`), so every datagram of the transfer comes from
    the address the client expects.  The reactor reads it (``IReactorFDSet.addReader``); each datagram goes to
    ``received``.  It replaces ``listenUDP`` for transfers because every
    datagram of a lockstep transfer passes through it: being connected, it
    reads with ``recv`` (no address tuple to build or compare), one datagram
    per readiness event (epoll is level-triggered: anything left is read on
    the next turn), and :attr:`send` is the socket's own ``send``.  That
    saved about 1 us of the 12-13 us of CPU a block cost (see
    ``bench/results/FINDINGS.md``).

    ``gone(reason)`` is called once when the client cannot be reached any
    more: ICMP port unreachable (ECONNREFUSED, whether reported by a read or
    by the reactor as an error event) or another receive error.  The
    socket is then already closed.
    """

    def __init__(
        self,
        reactor: Any,
        local: tuple[Any, ...],
        client: tuple[str, int],
        received: Callable[[bytes], None],
        gone: Callable[[str], None],
    ):
        sock = socket.socket(socket.AF_INET6 if ":" in local[0] else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(local)
            try:
                sock.connect(client)
            except OSError as e:
                raise ClientUnreachable(e.errno, e.strerror) from e
            # Only a datagram sent before the connect (to a port nobody has
            # been told yet) can be waiting: it is not the client's.
            while True:
                sock.recv(1)
        except BlockingIOError:
            pass
        except BaseException:
            sock.close()
            raise
        self.send = sock.send
        """Send one datagram to the client (raises OSError, e.g. ConnectionRefusedError)."""
        self._recv = sock.recv
        self._received = received
        self._gone = gone
        super().__init__(reactor, sock)

    def logPrefix(self) -> str:
        return "TFTP transfer"

    def doRead(self) -> None:
        try:
            datagram = self._recv(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._lost(e.errno or 0)
            return
        self._received(datagram)

    def connectionLost(self, reason: Any = None) -> None:
        """The reactor dropped the socket: an error event with nothing to read, or ``doRead`` raised.

        (The reactor logs what ``doRead`` raised; the transfer just ends.)
        """
        if self._open:
            self._lost(self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

    def _lost(self, error: int) -> None:
        self.close()
        if error == errno.ECONNREFUSED:
            self._gone("the client's port is closed (ICMP port unreachable)")
        elif error:
            self._gone(f"the transfer socket failed: {os.strerror(error)}")
        else:
            self._gone("the reactor dropped the transfer socket")


class Transfer:
    """One transfer: feeds its socket's datagrams and its timeouts to a session.

    Timer: one ``DelayedCall`` per transfer, re-armed lazily.  Each session
    Output carries a deadline, usually a little later than the previous one
    (every ACK pushes it by one RTO).  Instead of moving the DelayedCall on
    every packet, the transfer only records the deadline; when the call fires
    it compares the time with the deadline recorded since and either calls
    ``session.timeout`` or schedules itself again for the time remaining.  A
    deadline moving *earlier* than the scheduled call (the RTO shrinking
    after the first RTT samples) reschedules it at once, so a retransmission
    is never late.
    """

    def __init__(
        self,
        server: TFTPServer,
        session: ReadSession | WriteSession,
        client: tuple[str, int],
        description: str,
        key: Any,
    ):
        self.server = server
        self.session = session
        self.client = client
        self.description = description
        self.key = key
        self._seconds = server.reactor.seconds
        self.started_at = self._seconds()
        self.finished = False
        self.socket: TransferSocket | None = None
        self._deadline: float | None = None  # the session's current deadline
        self._timer: IDelayedCall | None = None  # fires at _timer_at (<= _deadline)
        self._timer_at = 0.0
        self._counted_retransmissions = 0

    def received(self, datagram: bytes) -> None:
        if not self.finished:
            self.apply(self.session.receive(datagram, self._seconds()))

    def gone(self, reason: str) -> None:
        """The client cannot be reached (its port closed): end without telling it."""
        if not self.finished:
            self.apply(self.session.abort(reason, notify=False))

    def begin(self) -> None:
        self.apply(self.session.start(self._seconds()))

    def apply(self, out: Output) -> None:
        """Carry out a session Output: send, then finish or re-arm the timer."""
        session = self.session
        if session.retransmissions != self._counted_retransmissions:
            self.server.retransmissions += session.retransmissions - self._counted_retransmissions
            self._counted_retransmissions = session.retransmissions
        send = out.send
        if send and self.socket is not None:
            write = self.socket.send
            for datagram in send:
                try:
                    write(datagram)
                except ConnectionRefusedError:  # ICMP port unreachable for an earlier datagram
                    self.gone("the client's port is closed (ICMP port unreachable)")
                    return
                except OSError as e:  # a full send buffer is a lost datagram
                    self.server.log.debug("TFTP {transfer}: send failed: {err!r}", transfer=self.description, err=e)
        if out.done:
            self._finish(out.error)
            return
        deadline = out.deadline
        self._deadline = deadline
        if deadline is None:
            self._cancel_timer()
        elif self._timer is None:
            self._schedule(deadline)
        elif deadline < self._timer_at:
            # Rare (the RTO shrinking): a new call rather than reset(), which
            # searches the reactor's whole heap when moving a call sooner.
            self._timer.cancel()
            self._schedule(deadline)
        # else: the timer fires before the deadline and re-arms itself then.

    def abort(self, reason: str) -> None:
        if not self.finished:
            self.apply(self.session.abort(reason))

    def _schedule(self, at: float) -> None:
        self._timer_at = at
        self._timer = self.server.reactor.callLater(max(0.0, at - self._seconds()), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if self.finished or deadline is None:
            return
        now = self._seconds()
        if now < deadline - TIMER_SLACK:
            self._schedule(deadline)  # the deadline moved since the timer was set
            return
        self.apply(self.session.timeout(now))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _finish(self, error: str | None) -> None:
        self.finished = True
        self._deadline = None
        self._cancel_timer()
        if self.socket is not None:
            self.socket.close()
        elapsed = self._seconds() - self.started_at
        session = self.session
        size = session.bytes_sent if isinstance(session, ReadSession) else session.bytes_received
        if error is None:
            self.server.log.debug(
                "TFTP {transfer}: done, {size} bytes in {elapsed:.3f}s, {retrans} retransmissions",
                transfer=self.description,
                size=size,
                elapsed=elapsed,
                retrans=session.retransmissions,
            )
        else:
            self.server.log.debug(
                "TFTP {transfer}: ended after {size} bytes in {elapsed:.3f}s: {error}",
                transfer=self.description,
                size=size,
                elapsed=elapsed,
                error=error,
            )
        self.server._transfer_finished(self)


class TFTPProtocol:
    """What arrives at a listening port: decodes requests and starts transfers.

    Binds its :class:`ListeningSocket`, ``transport`` (``CannotListenError``).
    """

    def __init__(self, server: TFTPServer, host: str, port: int):
        self.server = server
        self.transport = ListeningSocket(server.reactor, host, port, self.datagramReceived, server.log)

    def datagramReceived(self, datagram: bytes, addr: tuple[Any, ...], local: tuple[Any, ...]) -> None:
        """A datagram from ``addr`` to our address ``local`` (see :class:`ListeningSocket`)."""
        # (host, port), or for an IPv6 client with a scope (link-local) the
        # whole address: its transfer socket connects, and errors go, through
        # that interface.  Log lines and access checks use host and port.
        client = addr if len(addr) > 3 and addr[3] else (addr[0], addr[1])
        server = self.server
        if not server.accepting:
            return
        try:
            packet = decode(datagram)
        except MalformedPacket as e:
            opcode = peek_opcode(datagram)
            server.log.debug("TFTP malformed datagram from {client}: {reason}", client=client, reason=e.reason)
            if opcode is not None and opcode != Opcode.ERROR:
                message = "bad option" if e.error_code == ErrorCode.OPTION_REFUSED else "illegal operation"
                self.reply(client, local, e.error_code, message)
            return
        if isinstance(packet, (ReadRequest, WriteRequest)):
            if server._requests.get((local, client)) == datagram:
                return  # a retransmitted request we are already serving
            # Our address the request came to (the transfer answers from it), the client, the request.
            key = (local, client, datagram)
            if packet.mode not in SUPPORTED_MODES:
                server.log.debug("TFTP request from {client}: unsupported mode {mode!r}", client=client, mode=packet.mode)
                self.reply(client, local, ErrorCode.ILLEGAL_OPERATION, "unsupported mode")
                return
            if len(server._transfers) + len(server._pending) >= server.max_transfers:
                server.log.debug("TFTP request from {client} refused: too many transfers", client=client)
                self.reply(client, local, ErrorCode.NOT_DEFINED, "server busy")
                return
            if server._per_client[client[0]] >= server.max_transfers_per_client:
                server.log.debug("TFTP request from {client} refused: too many transfers from it", client=client)
                self.reply(client, local, ErrorCode.NOT_DEFINED, "server busy")
                return
            server._per_client[client[0]] += 1
            server._requests[key[:2]] = datagram
            if isinstance(packet, ReadRequest):
                self._read_request(packet, client, key)
            else:
                self._write_request(packet, client, key)
        elif isinstance(packet, Error):
            return
        else:
            server.log.debug("TFTP {kind} from {client} at the listening port", kind=type(packet).__name__, client=client)
            self.reply(client, local, ErrorCode.ILLEGAL_OPERATION, "illegal operation")

    def reply(self, client: tuple[str, int], local: tuple[Any, ...], code: int, message: str) -> None:
        """Send ERROR ``code`` to ``client`` from our address ``local``."""
        try:
            self.transport.write(_error_datagram(code, message), client, local)
        except Exception as e:
            self.server.log.debug("TFTP send to {client} failed: {err!r}", client=client, err=e)

    def _forget(self, key: Any) -> None:
        self.server._forget_request(key)

    def _ask(self, hook: Callable[[str, tuple[str, int]], Any], packet: ReadRequest | WriteRequest,
             client: tuple[str, int], key: Any, then: Callable[[Any], None]) -> None:
        """``hook(filename, client)`` (the source, or the upload hook), then ``then(its result)``.

        Meanwhile the request is pending (``stopService`` cancels it).  A failure
        is answered here: AccessDenied with "access violation", anything else
        with "internal error" (logged), a cancelled hook not at all.
        """
        server = self.server
        kind = "RRQ" if isinstance(packet, ReadRequest) else "WRQ"
        # The hook gets (host, port) even for a scoped IPv6 client; a hook that raises fails the Deferred.
        d = defer.maybeDeferred(hook, packet.filename, client[:2])
        server._pending.add(d)

        def done(result: Any) -> Any:
            server._pending.discard(d)
            return result

        def failed(failure: Failure) -> None:
            self._forget(key)
            if failure.check(defer.CancelledError):
                return
            name = server.shown_name(packet.filename)
            if failure.check(AccessDenied):
                server.log.debug(
                    "TFTP {kind} {name!r} from {client}: access denied: {why}",
                    kind=kind,
                    name=name,
                    client=client,
                    why=failure.getErrorMessage(),
                )
                self.reply(client, key[0], ErrorCode.ACCESS_VIOLATION, "access violation")
                return
            if failure.check(SourceError):
                server.log.debug("TFTP {kind} {name!r} from {client}: {why}", kind=kind, name=name, client=client,
                                 why=failure.getErrorMessage())
                self.reply(client, key[0], ErrorCode.NOT_DEFINED, failure.getErrorMessage())
                return
            server.log.failure("TFTP {kind} {name!r} from {client}: answering it failed", failure, kind=kind, name=name,
                               client=client)
            self.reply(client, key[0], ErrorCode.NOT_DEFINED, "internal error")

        d.addBoth(done)
        d.addCallbacks(then, failed)
        d.addErrback(lambda f: server.log.failure("TFTP {kind} handling failed", f, kind=kind))

    def _read_request(self, packet: ReadRequest, client: tuple[str, int], key: Any) -> None:
        server = self.server

        def got(reader: Reader | None) -> None:
            name = server.shown_name(packet.filename)  # after the source: it may have learnt a secret
            if reader is None:
                self._forget(key)
                server.log.debug("TFTP RRQ {name!r} from {client}: not found", name=name, client=client)
                self.reply(client, key[0], ErrorCode.FILE_NOT_FOUND, "file not found")
                return
            if not server.accepting:
                self._forget(key)
                _close_quietly(reader)
                return
            session = ReadSession(reader, packet.options, packet.mode, server.limits)
            self._start(session, client, key, f"RRQ {name!r} ({packet.mode}) for {client[0]}:{client[1]}")

        self._ask(server.source, packet, client, key, got)

    def _write_request(self, packet: WriteRequest, client: tuple[str, int], key: Any) -> None:
        server = self.server
        if server.upload_dir is None or server.accept_upload is None:
            final = upload_name(packet.filename) if server.upload_dir is not None else None
            self._store_upload(packet, client, key, final)
            return

        def decided(final: str | None) -> None:
            if not server.accepting:
                self._forget(key)
                return
            self._store_upload(packet, client, key, final)

        self._ask(server.accept_upload, packet, client, key, decided)

    def _store_upload(self, packet: WriteRequest, client: tuple[str, int], key: Any, final: str | None) -> None:
        """Receive the upload as ``final`` in the upload folder; None: refuse it."""
        server = self.server
        name = server.shown_name(packet.filename)
        if final is None:
            self._forget(key)
            server.log.debug("TFTP WRQ {name!r} from {client}: refused", name=name, client=client)
            self.reply(client, key[0], ErrorCode.ACCESS_VIOLATION, "access violation")
            return
        try:
            writer = UploadWriter(server.upload_dir, final)  # type: ignore[arg-type]
        except OSError as e:
            self._forget(key)
            server.log.error("TFTP WRQ {name!r} from {client}: cannot create the upload file: {err}", name=name, client=client, err=e)
            self.reply(client, key[0], ErrorCode.NOT_DEFINED, "cannot store the file")
            return
        session = WriteSession(writer, packet.options, packet.mode, server.limits)
        self._start(session, client, key, f"WRQ {final!r} ({packet.mode}) from {client[0]}:{client[1]}")

    def _start(self, session: ReadSession | WriteSession, client: tuple[str, int], key: Any, description: str) -> None:
        server = self.server
        transfer = Transfer(server, session, client, description, key)
        try:
            transfer.socket = TransferSocket(server.reactor, key[0], client, transfer.received, transfer.gone)
        except ClientUnreachable as e:  # not an address a reply can go to: silence
            self._forget(key)
            session.abort("client unreachable", notify=False)
            server.log.debug("TFTP {transfer}: cannot reach the client: {err}", transfer=description, err=e)
            return
        except OSError as e:
            self._forget(key)
            session.abort("no transfer port", notify=False)
            server.log.error("TFTP {transfer}: cannot open a transfer port: {err}", transfer=description, err=e)
            self.reply(client, key[0], ErrorCode.NOT_DEFINED, "internal error")
            return
        server._transfers.add(transfer)
        server.log.debug("TFTP {transfer}: started", transfer=description)
        transfer.begin()
        if not transfer.finished:
            negotiation = session.negotiation
            server.log.debug(
                "TFTP {transfer}: blksize={blksize} windowsize={windowsize} timeout={timeout} tsize={tsize}",
                transfer=description,
                blksize=negotiation.blksize,
                windowsize=negotiation.windowsize,
                timeout=negotiation.timeout,
                tsize=negotiation.tsize,
            )


def _close_quietly(reader: Any) -> None:
    try:
        reader.close()
    except Exception:
        pass


class TFTPServer(Service):
    """The TFTP service.

    ``listen``: (host, port) pairs; port 0 picks a free port (see
    :meth:`listening_ports`).  ``source``: called as ``source(name, client)``,
    see :mod:`zprovd.tftp.source`.  ``reactor`` defaults to the global one.
    ``max_blksize``/``max_windowsize`` cap negotiated values, ``retries`` is
    the number of retransmissions of one window before a transfer is dropped.
    ``upload_dir`` enables Polycom log uploads (WRQ) into that folder, each at
    most ``upload_max_bytes``; ``accept_upload(name, client)``, if given,
    decides on each (a Deferred firing with the file name to store it under,
    or None for "access violation"), else any ``upload_name`` is taken.  ``log`` is a ``twisted.logger.Logger``.
    ``shutdown_timeout`` bounds how long :meth:`stopService` waits for
    transfers in flight; ``max_transfers`` bounds concurrent transfers
    (beyond it requests get ERROR 0 "server busy"), and
    ``max_transfers_per_client`` those of one client address (requests being
    answered included), so that one client cannot take them all.  ``shown_name`` turns a
    requested file name into what log lines show (it may hide secrets).
    """

    def __init__(
        self,
        listen: list[tuple[str, int]],
        source: Source,
        reactor: Any = None,
        max_blksize: int = 1468,
        max_windowsize: int = 64,
        retries: int = 5,
        upload_dir: str | os.PathLike[str] | None = None,
        upload_max_bytes: int = 1 << 20,
        log: Logger | None = None,
        *,
        shutdown_timeout: float = 30.0,
        max_transfers: int = 4096,
        max_transfers_per_client: int = 256,
        shown_name: Callable[[str], str] = str,
        accept_upload: Callable[[str, tuple[str, int]], defer.Deferred[str | None]] | None = None,
    ):
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.listen = [(str(host), int(port)) for host, port in listen]
        self.source = source
        self.reactor = reactor
        self.limits = Limits(
            max_blksize=max_blksize,
            max_windowsize=max_windowsize,
            retries=retries,
            upload_max_bytes=upload_max_bytes,
        )
        self.upload_dir = Path(upload_dir) if upload_dir is not None else None
        self.log = log if log is not None else Logger(namespace="zprovd.tftp")
        self.shutdown_timeout = shutdown_timeout
        self.max_transfers = max_transfers
        self.max_transfers_per_client = max_transfers_per_client
        self.shown_name = shown_name
        self.accept_upload = accept_upload
        self.accepting = False
        self._ports: list[ListeningSocket] = []
        self._transfers: set[Transfer] = set()
        self.retransmissions = 0
        """Datagrams sent again (timeouts, RFC 7440 window restarts), by all
        transfers since the start, counted as they happen: for /metrics."""
        self._pending: set[defer.Deferred[Any]] = set()
        self._requests: dict[Any, bytes] = {}
        self._per_client: Counter[str] = Counter()
        """Requests accepted and not yet ended (``_forget_request``), by client host."""
        self._drained: defer.Deferred[None] | None = None
        self._stop_waiters: list[defer.Deferred[None]] = []

    # Service ----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind the listening ports (done here so port 69 can be bound as root)."""
        Service.privilegedStartService(self)
        self._bind()

    def startService(self) -> None:
        self._bind()
        Service.startService(self)
        self.accepting = True

    def _bind(self) -> None:
        if self._ports:
            return
        ports = []
        try:
            for host, port in self.listen:
                ports.append(TFTPProtocol(self, host, port).transport)
        except BaseException:
            for p in ports:
                p.close()
            raise
        self._ports = ports
        for p in ports:
            self.log.info("TFTP listening on {host} port {port}", host=p.host, port=p.port)

    def listening_ports(self) -> list[tuple[str, int]]:
        """The (host, port) pairs bound and open (not those the reactor has dropped)."""
        return [(p.host, p.port) for p in self._ports if p.open]

    def transfers_in_flight(self) -> int:
        """Transfers with an open port (for monitoring and tests)."""
        return len(self._transfers)

    def stopService(self) -> defer.Deferred[None]:
        """Stop accepting, let transfers finish (at most ``shutdown_timeout``), free all.

        The Deferred fires once every port (listening and transfer) is
        closed.  Calling it again while a stop is in progress returns a
        Deferred that fires at the same moment.
        """
        result: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(result)
        if len(self._stop_waiters) > 1:
            return result
        Service.stopService(self)
        self.accepting = False
        for p in self._ports:
            p.close()
        self._ports = []
        for d in list(self._pending):
            d.cancel()
        for transfer in list(self._transfers):
            session = transfer.session
            if isinstance(session, WriteSession) and session.lingering:
                transfer.abort("server stopping")
        drained: defer.Deferred[None] = defer.Deferred()
        bound = self.reactor.callLater(self.shutdown_timeout, self._abort_all)
        if self._transfers:
            self._drained = drained
        else:
            drained.callback(None)

        def finish(_: Any) -> None:
            if bound.active():
                bound.cancel()

        def notify(_: Any) -> None:
            waiters, self._stop_waiters = self._stop_waiters, []
            for waiter in waiters:
                waiter.callback(None)

        drained.addCallback(finish)
        drained.addBoth(notify)
        return result

    def _forget_request(self, key: Any) -> None:
        """An accepted request has ended (called once for each, however it ended)."""
        # key is (our address the request came to, client, request datagram); only the entry
        # of that very request is removed.
        if self._requests.get(key[:2]) == key[2]:
            del self._requests[key[:2]]
        host = key[1][0]
        if self._per_client[host] > 1:
            self._per_client[host] -= 1
        else:
            del self._per_client[host]

    def _abort_all(self) -> None:
        for transfer in list(self._transfers):
            transfer.abort("server stopping")

    def _transfer_finished(self, transfer: Transfer) -> None:
        self._transfers.discard(transfer)
        self._forget_request(transfer.key)
        if self._drained is not None and not self._transfers:
            drained, self._drained = self._drained, None
            drained.callback(None)
