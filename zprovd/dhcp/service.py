"""The DHCP helper on the network: a thin Twisted layer over ``Responder``.

``DHCPService`` binds UDP 0.0.0.0:67 on exactly one interface
(SO_BINDTODEVICE), decodes each datagram, asks the responder what to send
and sends it: to the client's address, to a relay agent, or as a broadcast
to 255.255.255.255:68 on that interface for clients without an address.

Each reply is logged at debug level; at info level one summary line every
``summary_interval`` seconds counts what happened (datagrams, replies by
type, ignored, malformed, send errors, datagrams the kernel dropped because
the receive buffer was full), and only if anything did.  The socket asks
for a receive buffer of ``RECEIVE_BUFFER`` bytes so that a burst of
DISCOVERs waits in the kernel while the reactor is busy instead of being
dropped.

In server mode, ``startService()`` first probes the interface for another
DHCP server (a DHCPDISCOVER from a random MAC, up to ``probe_timeout``
seconds of listening) and refuses to start if one answers, unless
``allow_other_servers`` is set.  The probe blocks the caller for up to
``probe_timeout`` seconds.  Any reason not to start raises
``DHCPStartError`` with one line for the operator.

Run on its own (logs to stderr)::

    python -m zprovd.dhcp.service --config zprovd.toml [--state-dir DIR] [-v]
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import random
import select
import socket
import struct
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.protocol import DatagramProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from zprovd.dhcp.config import DHCPConfig
from zprovd.dhcp.leases import LEASE_FILE_NAME, LeaseDatabase, LeaseFileError, write_atomically
from zprovd.dhcp.packets import (
    BOOTREPLY,
    BOOTREQUEST,
    BROADCAST_FLAG,
    DISCOVER,
    DHCPMessage,
    MalformedPacket,
    decode,
    describe_options,
    encode,
    mac_text,
)
from zprovd.dhcp.responder import CLIENT_PORT, SERVER_PORT, Reply, Responder

log = Logger(namespace="zprovd.dhcp")

SIOCGIFADDR = 0x8915
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
RECEIVE_BUFFER = 4 * 1024 * 1024
"""Bytes of receive buffer asked for the DHCP socket: about 10,000 DHCPDISCOVERs."""
PROBE_PARAMS = bytes([1, 3, 6, 15, 42, 43, 66, 67, 150, 160])
MAX_PROBE_DATAGRAMS = 200


IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


class DHCPStartError(Exception):
    """The DHCP helper cannot start; the message is one line for the operator."""


# --------------------------------------------------------------------------
# Sockets and interfaces.


def interface_ipv4(interface: str) -> IPv4Address | None:
    """The (first) IPv4 address of ``interface``, or None if it has none."""
    request = struct.pack("256s", interface.encode("ascii", "replace")[:15])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            answer = fcntl.ioctl(sock.fileno(), SIOCGIFADDR, request)
        except OSError:
            return None
    return IPv4Address(answer[20:24])


def open_dhcp_socket(interface: str, port: int, receive_buffer: int = RECEIVE_BUFFER) -> socket.socket:
    """A non-blocking UDP socket on 0.0.0.0:``port`` that sees only ``interface``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode("ascii") + b"\0")
        if receive_buffer:
            set_receive_buffer(sock, receive_buffer)
        sock.bind(("0.0.0.0", port))
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
    except BaseException:
        sock.close()
        raise
    return sock


def set_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a receive buffer of ``size`` bytes; return what the kernel granted.

    Best effort: SO_RCVBUF is capped by ``net.core.rmem_max``; SO_RCVBUFFORCE
    goes past the cap but needs CAP_NET_ADMIN.  Failures are ignored.  Linux
    reports (and grants) twice the size asked, half of it for bookkeeping;
    the value returned is the usable half.
    """
    for option in (socket.SO_RCVBUF, SO_RCVBUFFORCE):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, size)
        except OSError:
            continue
        if receive_buffer_size(sock) >= size:
            break
    return receive_buffer_size(sock)


def receive_buffer_size(sock: socket.socket) -> int:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
    except OSError:
        return 0


def socket_drops(fd: int, proc_net_udp: str = "/proc/net/udp") -> int | None:
    """Datagrams the kernel dropped on the UDP socket ``fd`` (receive buffer full); None if unknown."""
    try:
        inode = str(os.fstat(fd).st_ino)
        with open(proc_net_udp, encoding="ascii", errors="replace") as table:
            next(table, None)  # the header
            for line in table:
                fields = line.split()
                if len(fields) >= 13 and fields[9] == inode:
                    return int(fields[12])
    except (OSError, ValueError):
        return None
    return None


def _oserror_text(exc: OSError) -> str:
    return exc.strerror or str(exc)


# --------------------------------------------------------------------------
# Probing for other DHCP servers.


@dataclass
class ProbeAnswer:
    """One server's answer to the probe's DHCPDISCOVER."""

    server: IPv4Address
    """Its server identifier (option 54), else the datagram's source address."""
    source: str
    message_type: str
    yiaddr: IPv4Address
    options: dict[int, bytes] = field(default_factory=dict)

    def describe(self) -> str:
        options = describe_options(self.options, skip=(54,))
        return (f"{self.server} (from {self.source}) sent {self.message_type}, address {self.yiaddr}"
                + (f"; {options}" if options else ""))


def random_mac() -> str:
    """A random, locally administered, unicast MAC."""
    first = (random.randrange(256) & 0b11111100) | 0b10
    return bytes([first] + [random.randrange(256) for _ in range(5)]).hex()


def probe_servers(interface: str, timeout: float = 2.0, stop_at_first: bool = False) -> list[ProbeAnswer]:
    """Broadcast a DHCPDISCOVER on ``interface`` and collect the offers for ``timeout`` seconds.

    Raises OSError if the interface cannot be used (no such device, port 68
    busy, not root).
    """
    mac = random_mac()
    xid = random.getrandbits(32)
    discover = DHCPMessage(
        op=BOOTREQUEST,
        xid=xid,
        chaddr=mac,
        message_type=DISCOVER,
        flags=BROADCAST_FLAG,
        options={55: PROBE_PARAMS, 60: b"zprovd-probe"},
    )
    answers: list[ProbeAnswer] = []
    seen: set[tuple[IPv4Address, str]] = set()
    with open_dhcp_socket(interface, CLIENT_PORT) as sock:
        sock.sendto(encode(discover), ("255.255.255.255", SERVER_PORT))
        deadline = time.monotonic() + timeout
        poller = select.poll()  # not select(): the daemon's descriptors may number more than 1,024
        poller.register(sock, select.POLLIN)
        for _ in range(MAX_PROBE_DATAGRAMS):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if not poller.poll(remaining * 1000):
                break
            try:
                data, (source, _port) = sock.recvfrom(65535)
            except BlockingIOError:
                continue
            try:
                msg = decode(data)
            except MalformedPacket:
                continue
            if msg.op != BOOTREPLY or msg.xid != xid or msg.chaddr != mac:
                continue
            server = msg.server_id or IPv4Address(source)
            if (server, source) in seen:
                continue
            seen.add((server, source))
            answers.append(ProbeAnswer(server, source, msg.type_name, msg.yiaddr, dict(msg.options)))
            if stop_at_first:
                break
    return answers


# --------------------------------------------------------------------------
# The service.


class _DHCPProtocol(DatagramProtocol):
    noisy = False

    def __init__(self, service: DHCPService):
        self.service = service

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        self.service.datagram_received(datagram, addr)


class DHCPService(Service):
    """The DHCP helper: see the module docstring."""

    probe_timeout = 2.0
    expire_interval = 30.0
    summary_interval = 10.0
    """Seconds between the info-level summaries of what the helper did."""
    save_delay = 1.0
    """Lease changes are written at most this long after they happen, several
    changes in one write, off the reactor: a burst of clients costs one
    fsync a second, not one per reply."""

    def __init__(self, config: DHCPConfig, state_dir: Path, reactor: Any = None, run_blocking: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.run_blocking = run_blocking or defer.maybeDeferred
        """``run_blocking(f, *args)``: where lease files are written (the daemon's thread pool)."""
        self._save_call: Any = None
        self._saving = False
        self.config = config
        self.state_dir = Path(state_dir)
        self.reactor = reactor
        self.server_ip: IPv4Address | None = None
        self.leases: LeaseDatabase | None = None
        self.responder: Responder | None = None
        self.port: Any = None
        self._source_info: bytes | None = None
        self._source_refused = False
        self.stats: Counter[str] = Counter()
        """received, malformed, replies, ignored, send_errors, save_errors, kernel_drops."""
        self.replies_by_type: Counter[str] = Counter()
        """Replies sent, by message type name (DHCPOFFER, DHCPACK, ...): for /metrics."""
        self._expiry: LoopingCall | None = None
        self._summary: LoopingCall | None = None
        self._summarised: tuple[Counter[str], Counter[str]] = (Counter(), Counter())
        """``stats`` and ``replies_by_type`` as they were at the last summary."""
        self._summarised_at: float = self.reactor.seconds()
        self._kernel_drops_seen = 0
        """The socket's drop counter at the last summary (a new socket starts at 0)."""

    # Starting and stopping -----------------------------------------------

    def startService(self) -> None:
        """Probe (server mode), load leases, bind; raise DHCPStartError if impossible."""
        cfg = self.config
        if not cfg.interface:
            raise DHCPStartError("DHCP: [dhcp] interface is not set")
        server_ip = cfg.server_address or interface_ipv4(cfg.interface)
        if server_ip is None:
            raise DHCPStartError(
                f"DHCP: interface {cfg.interface} does not exist or has no IPv4 address "
                "(set [dhcp] server_address, or configure the interface)"
            )
        leases = None
        network = cfg.network()
        if cfg.mode == "server" and network is not None and server_ip not in network:
            log.warn(
                "DHCP: the server address {ip} is outside the pool's subnet {network}: only clients "
                "behind a relay agent in that subnet will get addresses",
                ip=str(server_ip), network=str(network),
            )
        if cfg.mode == "server":
            leases = self._load_leases(server_ip)
            self._check_other_servers()
        self.server_ip = server_ip
        # Replies come from the server identifier: on an interface with several
        # addresses (a second one, a shared virtual one) the kernel would pick
        # the first, and a relay's stateful firewall, or a client that checks,
        # drops a reply from another address than its identifier.  struct
        # in_pktinfo: interface (0: the socket's), source address, (unused).
        self._source_info = struct.pack("=I4s4s", 0, server_ip.packed, bytes(4))
        self._source_refused = False
        self.leases = leases
        self.responder = Responder(cfg, leases, server_ip)
        try:
            sock = open_dhcp_socket(cfg.interface, SERVER_PORT)
        except OSError as exc:
            raise DHCPStartError(
                f"DHCP: cannot listen on {cfg.interface} port {SERVER_PORT}: {_oserror_text(exc)}"
            ) from None
        buffer = receive_buffer_size(sock)
        try:
            self.port = self.reactor.adoptDatagramPort(sock.fileno(), socket.AF_INET, _DHCPProtocol(self))
        finally:
            sock.close()  # the port holds its own duplicate of the descriptor
        if leases is not None:
            self._expiry = LoopingCall(self._expire)
            self._expiry.clock = self.reactor
            self._expiry.start(self.expire_interval, now=False)
        self._start_summary()
        super().startService()
        log.info(
            "DHCP helper listening on {interface} port 67: mode {mode}, answer {answer}, server address {ip}",
            interface=cfg.interface, mode=cfg.mode, answer=cfg.answer, ip=str(server_ip),
        )
        if buffer < RECEIVE_BUFFER:
            log.info("DHCP: receive buffer {size} KiB (asked {asked} KiB; raise net.core.rmem_max for more): "
                     "a burst of clients may see drops",
                     size=buffer // 1024, asked=RECEIVE_BUFFER // 1024)

    def _load_leases(self, server_ip: IPv4Address) -> LeaseDatabase:
        cfg = self.config
        path = self.state_dir / LEASE_FILE_NAME
        reserved = [server_ip] + ([cfg.router] if cfg.router else [])
        try:
            leases = LeaseDatabase.load(path, cfg.pool, cfg.lease_time, reserved=reserved)
        except LeaseFileError as exc:
            raise DHCPStartError(f"DHCP: {exc} (move it away to start with no leases)") from None
        for reason in leases.skipped:
            log.warn("DHCP lease file {path}: skipped {reason}", path=str(path), reason=reason)
        for lease in leases.dropped:
            log.info("DHCP lease of {ip} to {mac} dropped: no longer in the pool",
                     ip=str(lease.ip), mac=mac_text(lease.mac) if lease.mac else "-")
        log.info("DHCP: {count} lease records loaded from {path}", count=len(leases.leases()), path=str(path))
        return leases

    def _check_other_servers(self) -> None:
        cfg = self.config
        try:
            answers = probe_servers(cfg.interface, self.probe_timeout, stop_at_first=True)
        except OSError as exc:
            raise DHCPStartError(
                f"DHCP: cannot probe {cfg.interface} for other DHCP servers: {_oserror_text(exc)}"
            ) from None
        if not answers:
            log.info("DHCP: no other DHCP server answered on {interface}", interface=cfg.interface)
            return
        found = "; ".join(a.describe() for a in answers)
        if not cfg.allow_other_servers:
            raise DHCPStartError(
                f"DHCP: another DHCP server answers on {cfg.interface}: {found}; refusing to start in "
                "server mode (use mode = \"proxy\" or \"inform\", or set allow_other_servers = true)"
            )
        log.warn(
            "DHCP: WARNING: ANOTHER DHCP SERVER ANSWERS ON {interface}: {found}; starting anyway because "
            "allow_other_servers = true. Clients may get addresses from either server.",
            interface=cfg.interface, found=found,
        )

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        if self._expiry is not None and self._expiry.running:
            self._expiry.stop()
        self._expiry = None
        if self._summary is not None and self._summary.running:
            self._summary.stop()
        self._summary = None
        self._log_summary()  # what happened since the last one
        self._save_at_stop()
        port, self.port = self.port, None
        if port is None:
            return defer.succeed(None)
        return defer.maybeDeferred(port.stopListening)

    # Datagrams -----------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        """Handle one datagram; never raises."""
        self.stats["received"] += 1
        try:
            msg = decode(data)
        except MalformedPacket as exc:
            self.stats["malformed"] += 1
            log.debug("DHCP: malformed datagram from {addr} ({length} bytes): {reason} "
                      "({count} malformed so far)",
                      addr=addr[0] if addr else "?", length=len(data), reason=str(exc),
                      count=self.stats["malformed"])
            return
        responder = self.responder
        if responder is None:
            return
        try:
            replies = responder.handle(msg, self.reactor.seconds())
        except Exception:
            log.failure("DHCP: error handling {type} from {mac}", type=msg.type_name, mac=mac_text(msg.chaddr))
            return
        for note in responder.notes:
            if note.text.startswith("ignored "):
                self.stats["ignored"] += 1
            emit = {"warning": log.warn, "info": log.info}.get(note.level, log.debug)
            emit("DHCP: {text}", text=note.text)
        for reply in replies:
            self._send(reply)
        if self.leases is not None and self.leases.dirty:
            self._save()

    def _send(self, reply: Reply) -> None:
        if self.port is None:
            return
        try:
            self._send_from_server_address(encode(reply.message), (str(reply.address), reply.port))
        except Exception as exc:  # OSError, MessageLengthError: the client will retry
            self.stats["send_errors"] += 1
            log.warn("DHCP: cannot send to {address}:{port}: {error}",
                     address=str(reply.address), port=reply.port, error=str(exc))
            return
        self.stats["replies"] += 1
        self.replies_by_type[reply.message.type_name] += 1
        log.debug("DHCP: {line}", line=reply.log)

    def _send_from_server_address(self, datagram: bytes, address: tuple[str, int]) -> None:
        """Send with the server identifier as the source address (see ``startService``).

        An identifier that is not (or no longer: a virtual address that moved)
        an address of this host cannot be a source: then the kernel chooses,
        and the first time it is said."""
        if self._source_info is not None:
            try:
                self.port.socket.sendmsg([datagram], [(socket.IPPROTO_IP, IP_PKTINFO, self._source_info)], 0, address)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENETUNREACH, errno.EINVAL, errno.EADDRNOTAVAIL):
                    raise
                if not self._source_refused:
                    self._source_refused = True
                    log.warn("DHCP: cannot send from the server address {ip} ({error}): is it an address of this "
                             "host? Replies come from the address the kernel chooses", ip=str(self.server_ip),
                             error=exc.strerror)
        self.port.write(datagram, address)

    # The periodic summary ------------------------------------------------

    def _start_summary(self) -> None:
        self._summarised = (Counter(self.stats), Counter(self.replies_by_type))
        self._summarised_at = self.reactor.seconds()
        self._summary = LoopingCall(self._log_summary)
        self._summary.clock = self.reactor
        self._summary.start(self.summary_interval, now=False)

    def _count_kernel_drops(self) -> None:
        """Add the socket's new kernel drops (read from /proc) to ``stats``."""
        fileno = getattr(self.port, "fileno", None)
        drops = socket_drops(fileno()) if fileno is not None else None
        if drops is None:
            return
        if drops > self._kernel_drops_seen:
            self.stats["kernel_drops"] += drops - self._kernel_drops_seen
        self._kernel_drops_seen = drops

    def summary(self) -> str | None:
        """What happened since the last call, in one line; None if nothing did."""
        self._count_kernel_drops()
        last_stats, last_replies = self._summarised
        self._summarised = (Counter(self.stats), Counter(self.replies_by_type))
        stats, replies = Counter(self.stats), Counter(self.replies_by_type)
        stats.subtract(last_stats)
        replies.subtract(last_replies)
        if not any(v > 0 for v in stats.values()) and not any(v > 0 for v in replies.values()):
            return None
        parts = [f"received {stats['received']}"]
        sent = ", ".join(f"{count} {name}" for name, count in sorted(replies.items()) if count > 0)
        parts.append(f"replies {sent or 0}")
        for key, label in (("ignored", "ignored"), ("malformed", "malformed"), ("send_errors", "send errors"),
                           ("save_errors", "lease save errors"),
                           ("kernel_drops", "dropped by the kernel (receive buffer full)")):
            if stats[key] > 0:
                parts.append(f"{label} {stats[key]}")
        return "; ".join(parts)

    def _log_summary(self) -> None:
        now = self.reactor.seconds()
        elapsed, self._summarised_at = now - self._summarised_at, now
        try:
            line = self.summary()
        except Exception:
            log.failure("DHCP: cannot summarise")
            return
        if line is not None:
            log.info("DHCP: last {elapsed:.0f} s: {summary}", elapsed=elapsed, summary=line)

    def _expire(self) -> None:
        if self.leases is None:
            return
        for lease in self.leases.expire(self.reactor.seconds()):
            log.debug("DHCP: {ip} ({mac}) is now {state}", ip=str(lease.ip),
                      mac=mac_text(lease.mac) if lease.mac else "-", state=lease.state)
        if self.leases.dirty:
            self._save()

    def _save(self) -> None:
        """Have the lease changes written within ``save_delay`` seconds."""
        if self.leases is None or not self.leases.dirty:
            return
        if self._save_call is None or not self._save_call.active():
            self._save_call = self.reactor.callLater(self.save_delay, self._save_now)

    def _save_now(self) -> None:
        self._save_call = None
        if self.leases is None or not self.leases.dirty or self._saving:
            return  # a write in flight re-arms when it is done
        leases = self.leases
        data = leases.dumps()  # a snapshot, taken on the reactor
        leases.dirty = False
        self._saving = True

        def failed(failure):
            leases.dirty = True  # retried at the next change, or by the next write
            self.stats["save_errors"] += 1
            log.error("DHCP: cannot save leases to {path}: {error} (will retry)",
                      path=str(leases.path), error=_oserror_text(failure.value)
                      if isinstance(failure.value, OSError) else failure.getErrorMessage())

        def done(_):
            self._saving = False
            self._save()

        if leases.path is None:
            done(None)
            return
        d = self.run_blocking(write_atomically, leases.path, data)
        d.addErrback(failed)
        d.addBoth(done)

    def _save_at_stop(self) -> None:
        """The last write, now and in this thread: the process is about to end."""
        if self._save_call is not None and self._save_call.active():
            self._save_call.cancel()
        self._save_call = None
        if self.leases is None or not self.leases.dirty:
            return
        try:
            self.leases.save()
        except OSError as exc:
            self.stats["save_errors"] += 1
            log.error("DHCP: cannot save leases to {path}: {error}",
                      path=str(self.leases.path), error=_oserror_text(exc))


# --------------------------------------------------------------------------
# Running the helper on its own.


def main(argv: list[str] | None = None) -> int:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    from zprovd.config import ConfigError
    from zprovd.dhcp.config import load_dhcp_config

    parser = argparse.ArgumentParser(prog="python -m zprovd.dhcp.service", description="Run the zprovd DHCP helper.")
    parser.add_argument("--config", "-c", required=True, type=Path, help="configuration file with a [dhcp] section")
    parser.add_argument("--state-dir", type=Path, help="where the lease file lives (default: the file's state_dir)")
    parser.add_argument("--verbose", "-v", action="store_true", help="log at debug level")
    args = parser.parse_args(argv)

    try:
        config, state_dir = load_dhcp_config(args.config)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 2
    if not config.enabled:
        print(f"{args.config}: [dhcp] enabled is false: nothing to do", file=sys.stderr)
        return 2
    state_dir = args.state_dir or state_dir or Path("/var/lib/zprovd")

    level = LogLevel.debug if args.verbose else LogLevel.info
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(defaultLogLevel=level)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)

    from twisted.internet import reactor

    service = DHCPService(config, state_dir, reactor)
    try:
        service.startService()
    except DHCPStartError as exc:
        print(f"zprovd-dhcp: {exc}", file=sys.stderr)
        return 1
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
