"""The ceilings of a TFTP server in Python here: lockstep reads with no session logic.

Started by the bench inside its namespace: ``python bench/bare_tftp.py ROOT
PORT`` (on zprovd's reactor, ``zprovd.reactor``) or ``python bench/bare_tftp.py ROOT
PORT --epoll`` (no framework: a ``select.epoll`` loop, the least Python can
do per datagram).
Answers a read request (with the ``blksize`` option, else 512) from a fresh
socket connected to the client and read by the reactor, like zprovd: one block per ACK, the file read a
block at a time, no retransmission, no timers, no checks, no log.  It is
what the same reactor costs per datagram, so zprovd's lockstep ratio to
tftpd-hpa can be read against what any server built on Twisted gets on
this machine, and the epoll loop what Python itself costs.  Not a server
to use: it trusts every name it is given.
"""

from __future__ import annotations

import select
import socket
import struct
import sys
from pathlib import Path

from zprovd import reactor as event_loop

reactor = event_loop.install()  # the reactor zprovd runs on

from twisted.internet.protocol import DatagramProtocol


class Transfer:
    """A socket of its own, connected to the client and read by the reactor, as zprovd's transfers."""

    def __init__(self, file, blksize: int, client, oack: bytes | None):
        self.file = file
        self.blksize = blksize
        self.block = 0
        self.last = False
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.setblocking(False)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.connect(client)
        reactor.addReader(self)
        if oack is not None:
            self.socket.send(oack)  # block 0: the client ACKs it
        else:
            self._send_next()

    def fileno(self):
        return self.socket.fileno()

    def logPrefix(self):
        return "bare transfer"

    def _send_next(self):
        self.block += 1
        chunk = self.file.read(self.blksize)
        self.last = len(chunk) < self.blksize
        self.socket.send(struct.pack("!HH", 3, self.block & 0xFFFF) + chunk)

    def doRead(self):
        try:
            data = self.socket.recv(2048)
        except BlockingIOError:
            return
        except OSError:  # ICMP port unreachable: the client has gone
            self.connectionLost(None)
            return
        if len(data) >= 4 and data[:2] == b"\x00\x04" and struct.unpack("!H", data[2:4])[0] == self.block & 0xFFFF:
            if self.last:
                self.connectionLost(None)
            else:
                self._send_next()

    def connectionLost(self, reason):
        if self.socket.fileno() != -1:
            reactor.removeReader(self)
            self.socket.close()
            self.file.close()


class Listener(DatagramProtocol):
    def __init__(self, root: Path):
        self.root = root

    def datagramReceived(self, data, addr):
        request = parse_request(data)
        if request is None:
            return
        name, blksize, oack = request
        file = open(self.root / name, "rb")  # noqa: SIM115 - closed by the transfer
        Transfer(file, blksize, addr, oack)


def parse_request(data: bytes) -> tuple[str, int, bytes | None] | None:
    """(name, blksize, OACK or None) of a read request; None for anything else."""
    if data[:2] != b"\x00\x01":
        return None
    fields = data[2:].split(b"\x00")
    options = {fields[i].lower(): fields[i + 1] for i in range(2, len(fields) - 1, 2)}
    if b"blksize" in options:
        return fields[0].decode(), int(options[b"blksize"]), b"\x00\x06blksize\x00" + options[b"blksize"] + b"\x00"
    return fields[0].decode(), 512, None


def epoll_loop(root: Path, port: int) -> None:
    """The same server without a framework: one epoll, one connected socket per transfer."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", port))
    poller = select.epoll()
    poller.register(listener.fileno(), select.EPOLLIN)
    transfers: dict[int, list] = {}  # fd -> [socket, file, blksize, block, last block sent]

    def send_next(t: list) -> None:
        t[3] += 1
        chunk = t[1].read(t[2])
        t[4] = len(chunk) < t[2]
        t[0].send(struct.pack("!HH", 3, t[3] & 0xFFFF) + chunk)

    print(f"bare tftp (epoll): serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    while True:
        for fd, _ in poller.poll():
            if fd == listener.fileno():
                data, addr = listener.recvfrom(2048)
                request = parse_request(data)
                if request is None:
                    continue
                name, blksize, oack = request
                sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                sock.bind(("127.0.0.1", 0))
                sock.connect(addr)
                sock.setblocking(False)
                t = [sock, open(root / name, "rb"), blksize, 0, False]  # noqa: SIM115 - closed at the end
                transfers[sock.fileno()] = t
                poller.register(sock.fileno(), select.EPOLLIN)
                if oack is not None:
                    sock.send(oack)  # block 0: the client ACKs it
                else:
                    send_next(t)
                continue
            t = transfers[fd]
            try:
                ack = t[0].recv(2048)
            except OSError:  # ICMP port unreachable: the client has gone
                ack = None
            if ack is not None and not (ack[:2] == b"\x00\x04" and ack[2:4] == struct.pack("!H", t[3] & 0xFFFF)):
                continue
            if ack is None or t[4]:
                poller.unregister(fd)
                del transfers[fd]
                t[0].close()
                t[1].close()
            else:
                send_next(t)


def main() -> None:
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    if "--epoll" in sys.argv:
        epoll_loop(root, port)
        return
    reactor.listenUDP(port, Listener(root), interface="127.0.0.1")
    print(f"bare tftp: serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
