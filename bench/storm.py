"""Boot storm: N simulated desk phones, each DHCP (DORA), then generic + per-MAC file.

Runs inside the client namespace of the bench (``ip netns exec``), so its
broadcasts only ever reach the veth pair the bench created.  Every phone
follows what a Yealink does after a power cut:

1. DHCPDISCOVER (broadcast, vendor class, parameter list with 66), wait for
   an OFFER, DHCPREQUEST it, wait for the ACK; retransmissions after 2, 4,
   8, 8 s (``--dhcp-tries``, 4 by default: 22 s of trying; more tries wait
   16 s each); a NAK restarts (at most twice).
2. The provisioning server from option 66 (``http://host:port/`` or a TFTP
   host), then GET the generic file and the per-MAC file (HTTP keep-alive on
   one connection, or two TFTP transfers); two tries each.

Phones start spread evenly over ``--ramp`` seconds.  Prints one JSON line:
phones provisioned, failures by reason, time until the last phone was
provisioned, percentiles.  Bounded by ``--deadline``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import ipaddress
import json
import random
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tftp_client  # noqa: E402

DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK = 1, 2, 3, 4, 5, 6
MAGIC = b"\x63\x82\x53\x63"
RETRIES = (2.0, 4.0, 8.0, 8.0)  # --dhcp-tries 4: 22 s of trying; more tries wait 16 s each


def dhcp_packet(mac: bytes, xid: int, kind: int, requested: bytes | None = None, server: bytes | None = None) -> bytes:
    header = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0, 0x8000, b"\0" * 4, b"\0" * 4,
                         b"\0" * 4, b"\0" * 4, mac + b"\0" * 10, b"", b"")
    options = bytes([53, 1, kind]) + bytes([61, 7, 1]) + mac
    options += bytes([60, 20]) + b"yealink SIP-T48G 35."[:20]
    options += bytes([55, 6, 1, 3, 6, 66, 150, 160])
    if requested:
        options += bytes([50, 4]) + requested
    if server:
        options += bytes([54, 4]) + server
    packet = header + MAGIC + options + b"\xff"
    return packet + b"\0" * max(0, 300 - len(packet))


def parse_reply(data: bytes) -> tuple[int, int, bytes, dict[int, bytes]] | None:
    if len(data) < 240 or data[0] != 2 or data[236:240] != MAGIC:
        return None
    xid = struct.unpack_from("!I", data, 4)[0]
    yiaddr = data[16:20]
    options: dict[int, bytes] = {}
    i = 240
    while i < len(data):
        code = data[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        length = data[i + 1]
        options[code] = data[i + 2:i + 2 + length]
        i += 2 + length
    kind = options.get(53, b"\0")[0]
    return xid, kind, yiaddr, options


class DHCPClientSocket(asyncio.DatagramProtocol):
    """One socket on port 68 for all phones; replies are matched by xid."""

    def __init__(self):
        self.waiting: dict[int, asyncio.Queue] = {}
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        parsed = parse_reply(data)
        if parsed is None:
            return
        queue = self.waiting.get(parsed[0])
        if queue is not None:
            queue.put_nowait(parsed)

    def error_received(self, exc):
        pass


def waits(tries: int) -> list[float]:
    return list(RETRIES[:tries]) + [16.0] * max(0, tries - len(RETRIES))


async def exchange(sock: DHCPClientSocket, xid: int, packet: bytes, want: tuple[int, ...], stats,
                   tries: int = 4) -> tuple | None:
    queue: asyncio.Queue = asyncio.Queue()
    sock.waiting[xid] = queue
    try:
        for attempt, wait in enumerate(waits(tries)):
            if attempt:
                stats["dhcp_retransmissions"] += 1
            sock.transport.sendto(packet, ("255.255.255.255", 67))
            deadline = time.monotonic() + wait
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    reply = await asyncio.wait_for(queue.get(), remaining)
                except asyncio.TimeoutError:
                    break
                if reply[1] in want:
                    return reply
        return None
    finally:
        sock.waiting.pop(xid, None)


async def dhcp(sock: DHCPClientSocket, mac: bytes, stats, tries: int) -> tuple[str | None, dict[int, bytes]]:
    for _ in range(3):
        xid = random.getrandbits(32)
        offer = await exchange(sock, xid, dhcp_packet(mac, xid, DISCOVER), (OFFER,), stats, tries)
        if offer is None:
            return "dhcp: no offer", {}
        server = offer[3].get(54)
        ack = await exchange(sock, xid, dhcp_packet(mac, xid, REQUEST, offer[2], server), (ACK, NAK), stats, tries)
        if ack is None:
            return "dhcp: no ack", {}
        if ack[1] == ACK:
            return None, ack[3]
        stats["dhcp_naks"] += 1
    return "dhcp: nak", {}


async def http_get(reader, writer, host: str, path: str, agent: str) -> int:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {agent}\r\n\r\n".encode())
    await writer.drain()
    status_line = await reader.readline()
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value.strip())
    await reader.readexactly(length)
    return status


async def provision_http(url: str, phone: dict, timeout: float) -> str | None:
    rest = url.split("://", 1)[1]
    hostport = rest.split("/", 1)[0]
    host, _, port = hostport.partition(":")
    agent = f"Yealink SIP-T48G 35.83.0.35 {phone['mac']}"
    last = "http: ?"
    for _ in range(2):
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port or 80)), timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            last = f"http connect: {type(exc).__name__}"
            continue
        try:
            for path in (phone["generic"], phone["file"]):
                status = await asyncio.wait_for(http_get(reader, writer, hostport, "/" + path, agent), timeout)
                if status != 200:
                    return f"http {status}"
            return None
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            last = f"http: {type(exc).__name__}"
        finally:
            writer.close()
    return last


async def provision_tftp(host: str, port: int, phone: dict, registry: list) -> str | None:
    for name in (phone["generic"], phone["file"]):
        for attempt in range(2):
            error, size, _, _ = await tftp_client.fetch(host, port, name, blksize=1468, timeout=2.0, retries=5,
                                                        registry=registry)
            if error is None and size > 0:
                break
        else:
            return f"tftp: {error or 'empty'}"
    return None


async def main_async(args) -> dict:
    phones = json.loads(Path(args.phones).read_text())[: args.count]
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args.interface.encode() + b"\0")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind(("0.0.0.0", 68))
    sock.setblocking(False)
    transport, proto = await loop.create_datagram_endpoint(DHCPClientSocket, sock=sock)
    stats: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    registry: list = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(tftp_client.ticker(registry, stop))
    started = time.monotonic()
    done_times: list[float] = []
    dhcp_times: list[float] = []

    async def phone(i: int, p: dict) -> None:
        await asyncio.sleep(args.ramp * i / max(1, len(phones)))
        t0 = time.monotonic()
        error, options = await dhcp(proto, bytes.fromhex(p["mac"]), stats, args.dhcp_tries)
        if error:
            reasons[error] += 1
            return
        dhcp_times.append(time.monotonic() - t0)
        option66 = options.get(66, b"").decode(errors="replace")
        if not option66:
            reasons["dhcp: no option 66"] += 1
            return
        if args.protocol == "http":
            error = await provision_http(option66, p, args.timeout)
        else:
            error = await provision_tftp(option66, args.tftp_port, p, registry)
        if error:
            reasons[error] += 1
            return
        done_times.append(time.monotonic() - started)

    tasks = [asyncio.create_task(phone(i, p)) for i, p in enumerate(phones)]
    _, pending = await asyncio.wait(tasks, timeout=args.deadline)
    for t in pending:
        t.cancel()
    if pending:
        reasons["run deadline"] += len(pending)
    elapsed = time.monotonic() - started
    stop.set()
    await ticker
    transport.close()
    done_times.sort()
    dhcp_times.sort()

    def pct(values, p):
        return round(values[min(len(values) - 1, int(p * len(values)))], 3) if values else None

    return {
        "phones": len(phones), "protocol": args.protocol, "ok": len(done_times),
        "failed": len(phones) - len(done_times), "reasons": dict(reasons),
        "all_provisioned_s": round(done_times[-1], 2) if len(done_times) == len(phones) else None,
        "last_provisioned_s": round(done_times[-1], 2) if done_times else None,
        "elapsed_s": round(elapsed, 2), "ramp_s": args.ramp, "dhcp_tries": args.dhcp_tries,
        "dhcp_p50_s": pct(dhcp_times, 0.5), "dhcp_p99_s": pct(dhcp_times, 0.99),
        "done_p50_s": pct(done_times, 0.5), "done_p99_s": pct(done_times, 0.99),
        **{k: v for k, v in stats.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phones", required=True, help="JSON list of {mac, generic, file}")
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--interface", required=True)
    ap.add_argument("--protocol", choices=("http", "tftp"), default="http")
    ap.add_argument("--tftp-port", type=int, default=69)
    ap.add_argument("--ramp", type=float, default=1.0)
    ap.add_argument("--dhcp-tries", type=int, default=4, help="transmissions of each DHCP message (2, 4, 8, 8, "
                                                                   "then 16 s apart)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--deadline", type=float, default=120.0)
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args))), flush=True)


if __name__ == "__main__":
    main()
