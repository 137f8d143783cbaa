"""A small asyncio TFTP client for concurrent downloads (RFC 1350, 2347, 2348, 7440).

``python bench/tftp_client.py --host 127.0.0.1 --port P --file NAME --size BYTES --count N``
starts N read transfers at once and prints one JSON line: how many
completed with exactly BYTES bytes, how many failed and why, the time until
the last one ended, per-transfer percentiles and the aggregate throughput.

Bounded: every transfer gives up after ``--retries`` retransmissions of
``--timeout`` seconds without progress, and the whole run after
``--deadline`` seconds.  Used by the TFTP concurrency benchmark and by the
boot storm (``fetch`` below).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import struct
import sys
import time

RRQ, DATA, ACK, ERROR, OACK = 1, 3, 4, 5, 6


class Transfer(asyncio.DatagramProtocol):
    def __init__(self, host: str, port: int, name: str, blksize: int, windowsize: int, timeout: float,
                 retries: int, done: asyncio.Future):
        self.server = (host, port)
        self.name = name
        self.blksize = blksize
        self.windowsize = windowsize
        self.timeout = timeout
        self.retries_left = retries
        self.done = done
        self.transport = None
        self.peer = None  # the server's transfer ID, from its first answer
        self.expected = 1  # next block number wanted (not wrapped)
        self.received = 0
        self.last_packet = b""
        self.last_activity = time.monotonic()
        self.started = time.monotonic()
        self.retransmissions = 0
        self.negotiated_blksize = 512
        self.ack_every = 1

    def _request(self) -> bytes:
        parts = [self.name.encode(), b"octet"]
        if self.blksize != 512:
            parts += [b"blksize", str(self.blksize).encode()]
        if self.windowsize > 1:
            parts += [b"windowsize", str(self.windowsize).encode()]
        return struct.pack("!H", RRQ) + b"".join(p + b"\0" for p in parts)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._send(self._request(), self.server)

    def _send(self, packet: bytes, addr) -> None:
        self.last_packet = packet
        self.transport.sendto(packet, addr)

    def _finish(self, error: str | None) -> None:
        if not self.done.done():
            self.done.set_result((error, self.received, time.monotonic() - self.started, self.retransmissions))
        if self.transport is not None:
            self.transport.close()

    def datagram_received(self, data: bytes, addr) -> None:
        if self.done.done() or len(data) < 4:
            return
        if self.peer is None:
            self.peer = addr
        elif addr != self.peer:
            return
        self.last_activity = time.monotonic()
        opcode, number = struct.unpack_from("!HH", data)
        if opcode == DATA:
            if number == self.expected & 0xFFFF:
                payload = len(data) - 4
                self.received += payload
                last = payload < self.negotiated_blksize
                if last or self.expected % self.ack_every == 0:
                    self._send(struct.pack("!HH", ACK, number), addr)
                self.expected += 1
                if last:
                    self._finish(None)
            elif number != self.expected & 0xFFFF:
                # Out of order or repeated: acknowledge the last block in order (RFC 7440).
                self.transport.sendto(struct.pack("!HH", ACK, (self.expected - 1) & 0xFFFF), addr)
        elif opcode == OACK:
            options = data[2:].split(b"\0")
            values = dict(zip(options[0::2], options[1::2]))
            self.negotiated_blksize = int(values.get(b"blksize", b"512"))
            self.ack_every = int(values.get(b"windowsize", b"1"))
            self._send(struct.pack("!HH", ACK, 0), addr)
        elif opcode == ERROR:
            self._finish("error " + data[4:].split(b"\0")[0].decode(errors="replace"))

    def tick(self, now: float) -> None:
        if self.done.done() or now - self.last_activity < self.timeout:
            return
        if self.retries_left <= 0:
            self._finish("timeout")
            return
        self.retries_left -= 1
        self.retransmissions += 1
        self.last_activity = now
        self.transport.sendto(self.last_packet, self.peer or self.server)

    def error_received(self, exc) -> None:  # ICMP port unreachable and the like
        pass


async def fetch(host: str, port: int, name: str, blksize: int = 1468, windowsize: int = 1, timeout: float = 2.0,
                retries: int = 5, local_host: str = "0.0.0.0", registry: list | None = None):
    """One download: (error or None, bytes, seconds, retransmissions)."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: Transfer(host, port, name, blksize, windowsize, timeout, retries, done),
        local_addr=(local_host, 0))
    if registry is not None:
        registry.append(proto)
    try:
        return await done
    finally:
        transport.close()
        if registry is not None:
            registry.remove(proto)


async def ticker(registry: list, stop: asyncio.Event, period: float = 0.25) -> None:
    while not stop.is_set():
        now = time.monotonic()
        for proto in list(registry):
            proto.tick(now)
        try:
            await asyncio.wait_for(stop.wait(), period)
        except asyncio.TimeoutError:
            pass


async def many(args) -> dict:
    registry: list = []
    stop = asyncio.Event()
    tick = asyncio.create_task(ticker(registry, stop))
    started = time.monotonic()
    tasks = [asyncio.create_task(fetch(args.host, args.port, args.file, args.blksize, args.windowsize,
                                       args.timeout, args.retries, registry=registry))
             for _ in range(args.count)]
    done, pending = await asyncio.wait(tasks, timeout=args.deadline)
    elapsed = time.monotonic() - started
    for t in pending:
        t.cancel()
    stop.set()
    await tick
    reasons: collections.Counter[str] = collections.Counter()
    times, retrans, ok, total_bytes = [], 0, 0, 0
    for t in done:
        error, size, seconds, r = t.result()
        retrans += r
        total_bytes += size
        if error is None and size == args.size:
            ok += 1
            times.append(seconds)
        else:
            reasons[error or f"wrong size {size}"] += 1
    if pending:
        reasons["run deadline"] += len(pending)
    times.sort()

    def pct(p: float) -> float:
        return round(times[min(len(times) - 1, int(p * len(times)))], 3) if times else 0.0

    return {
        "count": args.count, "ok": ok, "failed": args.count - ok, "reasons": dict(reasons),
        "elapsed_s": round(elapsed, 3), "p50_s": pct(0.5), "p99_s": pct(0.99),
        "mean_s": round(statistics.mean(times), 3) if times else 0.0,
        "MBps": round(total_bytes / elapsed / 1e6, 2), "retransmissions": retrans,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--file", required=True)
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--blksize", type=int, default=1468)
    ap.add_argument("--windowsize", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=2.0)
    ap.add_argument("--retries", type=int, default=5)
    ap.add_argument("--deadline", type=float, default=300.0)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(many(args))), flush=True)


if __name__ == "__main__":
    sys.exit(main())
