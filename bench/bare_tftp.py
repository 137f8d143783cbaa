"""The ceiling of any Twisted TFTP server here: lockstep reads with no session logic.

Started by the bench inside its namespace: ``python bench/bare_tftp.py ROOT PORT``.
Answers a read request (with the ``blksize`` option, else 512) from a fresh
port connected to the client, like zprovd: one block per ACK, the file read a
block at a time, no retransmission, no timers, no checks, no log.  It is
what the same reactor costs per datagram, so zprovd's lockstep ratio to
tftpd-hpa can be read against what any server built on Twisted gets on
this machine.  Not a server to use: it trusts every name it is given.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import DatagramProtocol


class Transfer(DatagramProtocol):
    def __init__(self, file, blksize: int, client, oack: bytes | None):
        self.file = file
        self.blksize = blksize
        self.client = client
        self.oack = oack
        self.block = 0
        self.last = False

    def startProtocol(self):
        self.transport.maxThroughput = 1  # one datagram per read event, as zprovd
        self.transport.connect(*self.client)
        if self.oack is not None:
            self.transport.write(self.oack)  # block 0: the client ACKs it
        else:
            self._send_next()

    def _send_next(self):
        self.block += 1
        chunk = self.file.read(self.blksize)
        self.last = len(chunk) < self.blksize
        self.transport.write(struct.pack("!HH", 3, self.block & 0xFFFF) + chunk)

    def datagramReceived(self, data, addr):
        if len(data) >= 4 and data[:2] == b"\x00\x04" and struct.unpack("!H", data[2:4])[0] == self.block & 0xFFFF:
            if self.last:
                self.file.close()
                self.transport.stopListening()
            else:
                self._send_next()

    def connectionRefused(self):
        self.file.close()
        self.transport.stopListening()


class Listener(DatagramProtocol):
    def __init__(self, root: Path):
        self.root = root

    def datagramReceived(self, data, addr):
        if data[:2] != b"\x00\x01":
            return
        fields = data[2:].split(b"\x00")
        name = fields[0].decode()
        options = {fields[i].lower(): fields[i + 1] for i in range(2, len(fields) - 1, 2)}
        blksize, oack = 512, None
        if b"blksize" in options:
            blksize = int(options[b"blksize"])
            oack = b"\x00\x06blksize\x00" + options[b"blksize"] + b"\x00"
        file = open(self.root / name, "rb")  # noqa: SIM115 - closed by the transfer
        reactor.listenUDP(0, Transfer(file, blksize, addr, oack), interface="127.0.0.1")


def main() -> None:
    root, port = Path(sys.argv[1]), int(sys.argv[2])
    reactor.listenUDP(port, Listener(root), interface="127.0.0.1")
    print(f"bare tftp: serving on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
