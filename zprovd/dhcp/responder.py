"""What to answer to a DHCP message: pure logic, no sockets, no clock.

``Responder.handle(message, now)`` returns the replies to send (each with
its destination and a log line) and leaves in ``notes`` anything else
worth logging (why a message was ignored, a pool running dry, a decline).

Modes (``[dhcp] mode``):

inform
    only DHCPINFORM is answered: a DHCPACK with the options, ``yiaddr``
    0.0.0.0, sent to the client's ``ciaddr`` port 68.
proxy
    DHCPDISCOVER gets a DHCPOFFER and a DHCPREQUEST naming this server gets
    a DHCPACK, both with the options and no address (``yiaddr`` 0.0.0.0);
    DHCPINFORM as in inform mode.
server
    a full, non-authoritative server: addresses from the pool, DHCPNAK
    only for addresses it knows about (never for a lease some other server
    may have given), silence towards requests naming another server.

A client is answered only if a ``[[dhcp.match]]`` selects it (the first
that does: vendor class substring, OUI or MAC), unless ``answer = "all"``.
The match's options are laid over ``[dhcp.options]``.  A reply carries the
mandatory options (53, 54, and in server mode 51/58/59, 1 and 3) and the
configured options the client listed in option 55; a client that sends
no option 55 gets every configured option.  If the reply would exceed the
client's maximum message size (option 57, 576 by default), options are
dropped, last asked for first, but never 66, 150, 160 or 43 when asked
for.  Relay agent information (option 82) is echoed to relays.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass
from ipaddress import IPv4Address

from zprovd.dhcp.config import DHCPConfig, MatchRule
from zprovd.dhcp.leases import LeaseDatabase
from zprovd.dhcp.packets import (
    ACK,
    BOOTREPLY,
    BOOTREQUEST,
    BROADCAST_FLAG,
    DECLINE,
    DISCOVER,
    INFORM,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    ZERO,
    DHCPMessage,
    describe_options,
    encoded_options_length,
    mac_text,
)

SERVER_PORT = 67
CLIENT_PORT = 68
BROADCAST = IPv4Address("255.255.255.255")
RATE_WINDOW = 10.0
PRIORITY_OPTIONS = (66, 150, 160, 43)
DEFAULT_MAX_MESSAGE = 576
MAX_MESSAGE = 1500
_IP_UDP_HEADERS = 28
_FIXED_PART = 240  # BOOTP header and magic cookie
_RATE_TABLE_PRUNE = 4096
# Options described separately (or not at all) in log lines.
_NOT_LOGGED = (51, 54, 58, 59, 82)


@dataclass
class Reply:
    """A message to send and where: ``address``:``port`` (broadcast if 255.255.255.255)."""

    message: DHCPMessage
    address: IPv4Address
    port: int
    log: str

    @property
    def broadcast(self) -> bool:
        return self.address == BROADCAST


@dataclass
class Note:
    """Something to log that is not a reply; ``level`` is debug, info or warning."""

    level: str
    text: str


class Responder:
    """Decides the replies to DHCP messages for one interface."""

    def __init__(self, config: DHCPConfig, leases: LeaseDatabase | None, server_ip: IPv4Address):
        if config.mode == "server" and leases is None:
            raise ValueError("server mode needs a lease database")
        self.config = config
        self.leases = leases
        self.server_ip = server_ip
        self.network = config.network()
        self.notes: list[Note] = []
        self._sent: dict[str, deque[float]] = {}

    # Entry point ---------------------------------------------------------

    def handle(self, msg: DHCPMessage, now: float) -> list[Reply]:
        """The replies to ``msg`` received at time ``now``; ``notes`` says the rest."""
        self.notes = []
        if msg.op != BOOTREQUEST:
            return self._ignore(msg, "not a request (BOOTREPLY)")
        if msg.message_type is None:
            return self._ignore(msg, "plain BOOTP (no DHCP message type)")
        mode = self.config.mode
        kind = msg.message_type
        if kind == INFORM:
            return self._inform(msg, now)
        if mode == "inform":
            return self._ignore(msg, "inform mode answers DHCPINFORM only")
        if kind == DISCOVER:
            return self._discover(msg, now)
        if kind == REQUEST:
            return self._request(msg, now)
        if mode == "proxy":
            return self._ignore(msg, "proxy mode gives no addresses")
        if kind == RELEASE:
            return self._release(msg, now)
        if kind == DECLINE:
            return self._decline(msg, now)
        return self._ignore(msg, "not a message a server answers")

    # Helpers -------------------------------------------------------------

    def _note(self, level: str, text: str) -> None:
        self.notes.append(Note(level, text))

    def _ignore(self, msg: DHCPMessage, reason: str, level: str = "debug") -> list[Reply]:
        self._note(level, f"ignored {msg.type_name} from {self._who(msg)}: {reason}")
        return []

    @staticmethod
    def _who(msg: DHCPMessage) -> str:
        vendor = msg.vendor_class
        return mac_text(msg.chaddr) + (f" (vendor class {vendor!r})" if vendor is not None else "")

    def match(self, msg: DHCPMessage) -> tuple[MatchRule | None, dict[int, bytes]] | None:
        """The rule that selects this client and its options; None if not to be answered."""
        for rule in self.config.matches:
            if rule.matches(msg.chaddr, msg.vendor_class):
                return rule, {**self.config.options, **rule.options}
        if self.config.answer == "all":
            return None, dict(self.config.options)
        return None

    def _rate_ok(self, msg: DHCPMessage, now: float) -> bool:
        limit = self.config.rate_limit
        if limit <= 0:
            return True
        sent = self._sent.get(msg.chaddr)
        if sent is None:
            return True
        while sent and sent[0] <= now - RATE_WINDOW:
            sent.popleft()
        return len(sent) < limit

    def _count_reply(self, msg: DHCPMessage, now: float) -> None:
        if self.config.rate_limit <= 0:
            return
        if len(self._sent) >= _RATE_TABLE_PRUNE and msg.chaddr not in self._sent:
            for mac in [m for m, d in self._sent.items() if not d or d[-1] <= now - RATE_WINDOW]:
                del self._sent[mac]
        self._sent.setdefault(msg.chaddr, deque()).append(now)

    def _lease_options(self) -> dict[int, bytes]:
        lease_time = self.config.lease_time
        return {
            51: struct.pack("!I", lease_time),
            58: struct.pack("!I", lease_time // 2),
            59: struct.pack("!I", lease_time * 7 // 8),
        }

    def _choose_options(
        self, msg: DHCPMessage, configured: dict[int, bytes], mandatory: dict[int, bytes]
    ) -> dict[int, bytes]:
        """Mandatory options, then what the client asked for, within its size limit."""
        if 55 in msg.options:
            wanted: list[int] = []
            for code in msg.requested_params:
                if code in configured and code not in mandatory and code not in wanted:
                    wanted.append(code)
        else:
            wanted = [code for code in sorted(configured) if code not in mandatory]
        ordered = [c for c in PRIORITY_OPTIONS if c in wanted] + [c for c in wanted if c not in PRIORITY_OPTIONS]
        limit = min(max(msg.max_message_size or DEFAULT_MAX_MESSAGE, DEFAULT_MAX_MESSAGE), MAX_MESSAGE)
        budget = limit - _IP_UDP_HEADERS - _FIXED_PART - 3 - 1  # 53 and the end option
        chosen = dict(mandatory)
        used = encoded_options_length(chosen)
        for code in ordered:
            size = encoded_options_length({code: configured[code]})
            if used + size > budget and code not in PRIORITY_OPTIONS:
                self._note("debug", f"option {code} left out of the reply to {mac_text(msg.chaddr)}: "
                                    f"no room within {limit} bytes")
                continue
            chosen[code] = configured[code]
            used += size
        return chosen

    def _reply(
        self,
        msg: DHCPMessage,
        kind: int,
        options: dict[int, bytes],
        yiaddr: IPv4Address = ZERO,
        ciaddr: IPv4Address = ZERO,
    ) -> DHCPMessage:
        flags = msg.flags
        if kind == NAK and msg.giaddr != ZERO:
            flags |= BROADCAST_FLAG  # RFC 2131 4.3.2: the relay must broadcast a DHCPNAK
        if msg.giaddr != ZERO and 82 in msg.options:
            options = {**options, 82: msg.options[82]}  # echo relay agent information (RFC 3046)
        return DHCPMessage(
            op=BOOTREPLY,
            xid=msg.xid,
            chaddr=msg.chaddr,
            message_type=kind,
            flags=flags,
            ciaddr=ciaddr,
            yiaddr=yiaddr,
            giaddr=msg.giaddr,
            options=options,
        )

    @staticmethod
    def _destination(msg: DHCPMessage, kind: int) -> tuple[IPv4Address, int]:
        if msg.giaddr != ZERO:
            return msg.giaddr, SERVER_PORT
        if kind != NAK and msg.ciaddr != ZERO:
            return msg.ciaddr, CLIENT_PORT
        return BROADCAST, CLIENT_PORT

    def _send(
        self,
        msg: DHCPMessage,
        now: float,
        reply: DHCPMessage,
        destination: tuple[IPv4Address, int],
        rule: MatchRule | None,
        what: str,
    ) -> list[Reply]:
        self._count_reply(msg, now)
        address, port = destination
        matched = f" [{rule.describe()}]" if rule is not None else ""
        options = describe_options(reply.options, skip=_NOT_LOGGED)
        log = (
            f"{reply.type_name} to {self._who(msg)}{matched} "
            f"via {address}:{port}: {what}" + (f"; {options}" if options else "")
        )
        return [Reply(reply, address, port, log)]

    def _mandatory(self, configured: dict[int, bytes], with_lease: bool) -> dict[int, bytes]:
        mandatory = {54: self.server_ip.packed}
        if with_lease:
            mandatory.update(self._lease_options())
            for code in (1, 3):
                if code in configured:
                    mandatory[code] = configured[code]
        return mandatory

    def _selected(self, msg: DHCPMessage, now: float) -> tuple[MatchRule | None, dict[int, bytes]] | None:
        """Match and rate-limit a message that expects a reply; note why if not answered."""
        selected = self.match(msg)
        if selected is None:
            self._ignore(msg, "no [[dhcp.match]] selects this client")
            return None
        if not self._rate_ok(msg, now):
            self._ignore(
                msg, f"rate limit: {self.config.rate_limit} replies in {RATE_WINDOW:g} s", level="info"
            )
            return None
        return selected

    def _outside_network(self, msg: DHCPMessage) -> bool:
        return msg.giaddr != ZERO and self.network is not None and msg.giaddr not in self.network

    # Message handlers ----------------------------------------------------

    def _inform(self, msg: DHCPMessage, now: float) -> list[Reply]:
        selected = self._selected(msg, now)
        if selected is None:
            return []
        rule, configured = selected
        options = self._choose_options(msg, configured, self._mandatory(configured, with_lease=False))
        reply = self._reply(msg, ACK, options, ciaddr=msg.ciaddr)
        # RFC 2131 4.3.5: the DHCPACK goes straight to ciaddr, relayed or not.
        if msg.ciaddr != ZERO:
            destination = (msg.ciaddr, CLIENT_PORT)
        else:
            destination = self._destination(msg, ACK)
        return self._send(msg, now, reply, destination, rule, "options only (inform)")

    def _discover(self, msg: DHCPMessage, now: float) -> list[Reply]:
        selected = self._selected(msg, now)
        if selected is None:
            return []
        rule, configured = selected
        if self.config.mode == "proxy":
            options = self._choose_options(msg, configured, self._mandatory(configured, with_lease=False))
            reply = self._reply(msg, OFFER, options)
            return self._send(msg, now, reply, self._destination(msg, OFFER), rule, "options only (proxy)")
        if self._outside_network(msg):
            return self._ignore(msg, f"relayed from {msg.giaddr}, outside the pool's subnet {self.network}")
        assert self.leases is not None
        lease = self.leases.offer(
            msg.chaddr, now, msg.requested_ip, msg.hostname or "", msg.vendor_class or ""
        )
        if lease is None:
            return self._ignore(msg, f"the address pool is exhausted ({self.config.pool_size()} addresses)",
                                level="warning")
        options = self._choose_options(msg, configured, self._mandatory(configured, with_lease=True))
        reply = self._reply(msg, OFFER, options, yiaddr=lease.ip)
        what = f"address {lease.ip}, lease {self.config.lease_time} s"
        return self._send(msg, now, reply, self._destination(msg, OFFER), rule, what)

    def _request(self, msg: DHCPMessage, now: float) -> list[Reply]:
        server_id = msg.server_id
        if server_id is not None and server_id != self.server_ip:
            if self.leases is not None and self.leases.cancel_offer(msg.chaddr, now):
                self._note("debug", f"offer to {mac_text(msg.chaddr)} withdrawn: it chose server {server_id}")
            return self._ignore(msg, f"addressed to another server ({server_id})")
        if self.config.mode == "proxy":
            if server_id is None:
                return self._ignore(msg, "proxy mode answers only requests naming this server")
            selected = self._selected(msg, now)
            if selected is None:
                return []
            rule, configured = selected
            options = self._choose_options(msg, configured, self._mandatory(configured, with_lease=False))
            reply = self._reply(msg, ACK, options, ciaddr=msg.ciaddr)
            return self._send(msg, now, reply, self._destination(msg, ACK), rule, "options only (proxy)")
        return self._server_request(msg, now, selecting=server_id is not None)

    def _server_request(self, msg: DHCPMessage, now: float, selecting: bool) -> list[Reply]:
        assert self.leases is not None
        if msg.ciaddr != ZERO and not selecting:
            ip, state = msg.ciaddr, "renewing"
        else:
            ip = msg.requested_ip or (msg.ciaddr if msg.ciaddr != ZERO else None)
            state = "selecting" if selecting else "init-reboot"
        if ip is None:
            return self._ignore(msg, "requests no address")
        if self._outside_network(msg):
            return self._ignore(msg, f"relayed from {msg.giaddr}, outside the pool's subnet {self.network}")
        selected = self._selected(msg, now)
        if selected is None:
            return []
        rule, configured = selected
        lease = self.leases.lease_for(msg.chaddr)
        if lease is not None and lease.ip == ip:
            committed = self.leases.commit(msg.chaddr, ip, now, msg.hostname or "", msg.vendor_class or "")
            if committed is not None:
                options = self._choose_options(msg, configured, self._mandatory(configured, with_lease=True))
                ciaddr = msg.ciaddr if state == "renewing" else ZERO
                reply = self._reply(msg, ACK, options, yiaddr=ip, ciaddr=ciaddr)
                what = f"address {ip} ({state}), lease {self.config.lease_time} s"
                return self._send(msg, now, reply, self._destination(msg, ACK), rule, what)
        # Not this client's lease here.  NAK only when this server knows better.
        if selecting:
            reason = f"{ip} was not offered to this client (or the offer expired)"
        elif not self.leases.in_pool(ip):
            return self._ignore(msg, f"{ip} ({state}) is not from this server's pool: not ours to refuse")
        elif self.leases.held_by_other(ip, msg.chaddr, now):
            reason = f"{ip} is leased to another client"
        elif lease is not None:
            reason = f"this client's address here is {lease.ip}, not {ip}"
        else:
            return self._ignore(msg, f"{ip} ({state}) is not a lease this server gave: not ours to refuse")
        reply = self._reply(msg, NAK, {54: self.server_ip.packed, 56: reason.encode("ascii", "replace")})
        return self._send(msg, now, reply, self._destination(msg, NAK), rule, reason)

    def _release(self, msg: DHCPMessage, now: float) -> list[Reply]:
        assert self.leases is not None
        if msg.server_id not in (None, self.server_ip):
            return self._ignore(msg, f"addressed to another server ({msg.server_id})")
        if self.leases.release(msg.chaddr, msg.ciaddr, now):
            self._note("info", f"{mac_text(msg.chaddr)} released {msg.ciaddr}")
        else:
            self._ignore(msg, f"{msg.ciaddr} is not leased to this client")
        return []

    def _decline(self, msg: DHCPMessage, now: float) -> list[Reply]:
        assert self.leases is not None
        if msg.server_id not in (None, self.server_ip):
            return self._ignore(msg, f"addressed to another server ({msg.server_id})")
        ip = msg.requested_ip
        if ip is not None and self.leases.decline(msg.chaddr, ip, now):
            self._note(
                "warning",
                f"{mac_text(msg.chaddr)} declined {ip}: another host seems to use it; "
                f"not handed out for {self.leases.decline_time:g} s",
            )
        else:
            self._ignore(msg, f"{ip} is not leased to this client")
        return []
