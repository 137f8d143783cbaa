"""Fuzz targets for zprovd's parsers: bytes in, an exception out only on a bug.

Each target's ``setup()`` imports what it needs (so that ``run.py`` can do it
inside ``atheris.instrument_imports()``) and returns ``check(data: bytes)``.
``check`` swallows exactly the exceptions the parser is documented to raise
and asserts the properties its callers rely on; anything that escapes
``check`` -- a stray ``TypeError`` from hostile input, or a
``PropertyViolation`` -- is a finding.

Input formats (the seed corpora in ``fuzz/corpus/<target>/`` use them):

``tftp``, ``dhcp``
    one raw datagram.
``router``
    ``<selector byte><request-target>\\n<User-Agent>\\n<Authorization>``;
    the selector's value modulo 3 picks http, https or tftp.  For HTTP the
    request target is split and its query parsed exactly as ``zprovd.web``
    does (``httpcore.parse_query``), every field decoded as it does (UTF-8,
    errors replaced);
    for TFTP the whole target is the file name, decoded strictly as
    ``zprovd.tftp.packets`` does.
``http``
    what a client sends on one connection, cut into pieces at every ``\xff``
    (a byte HTTP never needs), fed piece by piece to ``httpcore.ServerConnection``.
``httpauth``
    an Authorization header value (UTF-8, errors replaced).
``csv``
    an import file's bytes.
``config``
    a configuration file's bytes.
``catalogue``
    ``<per-MAC pattern>\\n<requested name>``.

``describe(name, data)`` shows an input the way the target sees it.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
HEX12 = re.compile(r"[0-9a-f]{12}")


class PropertyViolation(AssertionError):
    """A parser returned something its callers must never see."""


def check_that(condition: object, message: str) -> None:
    if not condition:
        raise PropertyViolation(message)


@dataclass(frozen=True)
class Target:
    name: str
    doc: str
    setup: Callable[[], Callable[[bytes], None]]
    max_len: int
    weight: float = 1.0  # share of the run's time


def _fields(data: bytes, count: int) -> list[bytes]:
    parts = data.split(b"\n", count - 1)
    return parts + [b""] * (count - len(parts))


def _text(raw: bytes) -> str:
    """How zprovd.web decodes request fields."""
    return raw.decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------
# TFTP


def setup_tftp() -> Callable[[bytes], None]:
    from zprovd.tftp import packets as p

    def check(data: bytes) -> None:
        try:
            packet = p.decode(data)
        except p.MalformedPacket as exc:
            check_that(exc.error_code in (p.ErrorCode.ILLEGAL_OPERATION, p.ErrorCode.OPTION_REFUSED),
                       f"MalformedPacket with error code {exc.error_code}")
            return
        check_that(isinstance(packet, (p.ReadRequest, p.WriteRequest, p.Data, p.Ack, p.Error, p.OptionAck)),
                   f"decode returned {type(packet).__name__}")
        if isinstance(packet, (p.ReadRequest, p.WriteRequest, p.OptionAck)):
            options = packet.options
            check_that(len(options) <= p.MAX_OPTIONS, "more options than MAX_OPTIONS")
            for name, value in options.items():
                check_that(name == name.lower() and name, f"option name {name!r} not lower-case")
                if name in p.NUMERIC_OPTIONS:
                    check_that(p.parse_numeric_option(value) is not None, f"{name}={value!r} let through")
        if isinstance(packet, p.Error):
            return  # the message is decoded with errors replaced: no exact round trip
        again = p.decode(packet.encode())
        check_that(again == packet, f"round trip changed {packet!r} into {again!r}")

    return check


# ---------------------------------------------------------------------------
# DHCP: the decoder, then the responder of every mode on what it decoded, then
# the encoder on every reply.


def setup_dhcp() -> Callable[[bytes], None]:
    from zprovd.dhcp import packets as p
    from zprovd.dhcp.config import DHCPConfig, MatchRule, PoolRange
    from zprovd.dhcp.leases import LeaseDatabase
    from zprovd.dhcp.responder import Responder

    server_ip = IPv4Address("10.0.0.1")
    pool = [PoolRange(IPv4Address("10.0.0.100"), IPv4Address("10.0.0.103"))]
    options = {
        1: IPv4Address("255.255.255.0").packed,
        3: IPv4Address("10.0.0.254").packed,
        6: IPv4Address("10.0.0.53").packed,
        43: bytes.fromhex("0104c0a80001"),
        66: b"tftp.example.com",
        67: b"y000000000000.boot",
        150: IPv4Address("10.0.0.2").packed,
        160: b"http://prov.example.com/",
        119: b"\x07example\x03com\x00",
    }
    matches = [
        MatchRule(options={66: b"yealink.example.com", 160: b"x" * 200}, vendor_class="Yealink"),
        MatchRule(options={160: b"http://prov/p/"}, oui="0004f2"),
        MatchRule(options={67: b"exact"}, mac="001565123456"),
    ]

    def responders() -> list[Responder]:
        made = []
        for mode, answer, limit in (("inform", "all", 0), ("proxy", "matching", 0), ("server", "all", 2)):
            cfg = DHCPConfig(enabled=True, interface="fuzz0", mode=mode, answer=answer, pool=pool,
                             subnet_mask=IPv4Address("255.255.255.0"), router=IPv4Address("10.0.0.254"),
                             lease_time=600, rate_limit=limit, options=dict(options), matches=matches)
            leases = LeaseDatabase(pool, 600, reserved=[server_ip]) if mode == "server" else None
            made.append(Responder(cfg, leases, server_ip))
        return made

    def check(data: bytes) -> None:
        try:
            msg = p.decode(data)
        except p.MalformedPacket:
            return
        check_that(HEX12.fullmatch(msg.chaddr), f"chaddr {msg.chaddr!r} not canonical")
        check_that(msg.message_type is None or 1 <= msg.message_type <= 18, "message type out of range")
        check_that(all(isinstance(c, int) and 0 < c < 255 for c in msg.options), "option code out of range")
        check_that(52 not in msg.options and 53 not in msg.options, "overload/type left in options")
        # Views the responder and the log lines use (outside decode's catch-all).
        _ = (msg.type_name, msg.broadcast, msg.requested_params, msg.vendor_class, msg.client_id,
             msg.hostname, msg.requested_ip, msg.server_id, msg.max_message_size, msg.ip_list(6))
        p.describe_options(msg.options)
        now = 1_700_000_000.0
        for responder in responders():
            if responder.config.mode == "server":
                # Give this client an offer first, so REQUEST paths go deeper.
                discover = p.DHCPMessage(op=1, xid=msg.xid, chaddr=msg.chaddr, message_type=p.DISCOVER)
                responder.handle(discover, now - 1)
            for reply in responder.handle(msg, now):
                wire = p.encode(reply.message)
                check_that(len(wire) <= p.MAX_DATAGRAM, f"reply of {len(wire)} bytes")
                again = p.decode(wire)
                check_that(again == reply.message, f"reply does not survive encode/decode: {reply.message!r}")
                check_that(reply.port in (67, 68), f"reply to port {reply.port}")
                check_that("\n" not in reply.log, "line break in a log line")
    return check


# ---------------------------------------------------------------------------
# HTTP/TFTP router, with the real bundled catalogue, the Zoiper settings of
# etc/dev.toml, a real firmware folder, and the access log's redaction.


def _unsafe_name(name: str) -> str | None:
    if "\x00" in name:
        return "NUL"
    if name.startswith("/"):
        return "leading /"
    if ".." in re.split(r"[/\\]", name):
        return "'..' segment"
    if any(ord(c) < 0x20 for c in name):
        return "control character"
    return None


def _http_request(target: bytes) -> tuple[bytes, dict[str, list[str]]]:
    """(path, args) exactly as zprovd.web makes them from a request target."""
    from zprovd.httpcore import parse_query

    path, question, query = target.partition(b"?")
    return path, parse_query(query) if question else {}


def firmware_folder() -> Path:
    """A firmware folder with nested files and symlinks pointing out of it."""
    root = Path(tempfile.mkdtemp(prefix="fw-", dir=os.environ.get("ZPROVD_FUZZ_TMP")))
    (root / "yealink").mkdir()
    (root / "T48G-35.83.0.35.rom").write_bytes(b"rom")
    (root / "yealink" / "T46S.rom").write_bytes(b"rom")
    outside = root.parent / (root.name + "-outside")
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("not to be served")
    os.symlink(outside / "secret.txt", root / "escape.txt")
    os.symlink(outside, root / "escape-dir")
    return root


def setup_router() -> Callable[[bytes], None]:
    from zprovd.catalogue import bundled_templates_dir, load_catalogue
    from zprovd.config import load_config
    from zprovd.firmware import FirmwareFolder
    from zprovd.routing import (BadRequest, FirmwareRoute, GenericRoute, NotFound, PerMacRoute, Request,
                                Router, ZoiperRoute)
    from zprovd.web import redact_uri

    catalogue = load_catalogue([bundled_templates_dir()])
    zoiper = load_config(ROOT / "etc" / "dev.toml").zoiper
    folder = FirmwareFolder(firmware_folder())
    router = Router(catalogue, zoiper, folder.lookup)
    secret_params = {p.lower() for p in zoiper.password_params}
    protocols = ("http", "https", "tftp")

    def check(data: bytes) -> None:
        if not data:
            return
        protocol = protocols[data[0] % 3]
        target, agent, authorization = _fields(data[1:], 3)
        if protocol == "tftp":
            try:
                path = target.decode("utf-8")  # zprovd.tftp.packets refuses anything else
            except UnicodeDecodeError:
                return
            query: dict[str, list[str]] = {}
        else:
            raw_path, query = _http_request(target)
            path = _text(raw_path)
        request = Request(protocol=protocol, path=path, query=query, user_agent=_text(agent),
                          authorization=_text(authorization), client="192.0.2.1", host="prov")
        route = router.route(request)
        check_that(isinstance(route, (BadRequest, NotFound, ZoiperRoute, GenericRoute, PerMacRoute, FirmwareRoute)),
                   f"route is a {type(route).__name__}")
        if isinstance(route, (NotFound, GenericRoute, PerMacRoute, FirmwareRoute)):
            problem = _unsafe_name(route.name)
            check_that(problem is None, f"{type(route).__name__} name {route.name!r}: {problem}")
        if isinstance(route, PerMacRoute):
            check_that(HEX12.fullmatch(route.mac), f"MAC {route.mac!r} not canonical")
            check_that(route.candidates, "per-MAC route without candidates")
            catalogue.guess_model(route.name, request.user_agent, route.mac)
        if isinstance(route, FirmwareRoute):
            resolved = (folder.root / route.name).resolve()
            check_that(resolved.is_relative_to(folder.root) and resolved.is_file(),
                       f"firmware {route.name!r} resolves to {resolved}")
        if isinstance(route, ZoiperRoute):
            check_that(route.via in ("query", "basic", "none"), f"via {route.via!r}")
            check_that(protocol != "tftp", "Zoiper document over TFTP")
        if protocol != "tftp":
            _check_redaction(redact_uri(_text(target), secret_params), target, secret_params)

    return check


def _check_redaction(logged: str, target: bytes, secret_params: set[str]) -> None:
    """No value of a secret parameter, as the server parsed it, may reach the log."""
    from zprovd.web import SECRET_PARAM

    raw_path, args = _http_request(target)
    public = [_text(raw_path)]
    # Bare tokens ("?a;b") are no parameter to the server: text, not a secret value.
    query = target.partition(b"?")[2]
    public += [_text(part) for part in re.split(rb"[&;]", query) if b"=" not in part]
    secrets = []
    for name, values in args.items():
        public.append(name)
        secret = name.lower() in secret_params or SECRET_PARAM.search(name)
        for value in values:
            (secrets if secret else public).append(value)
    for value in secrets:
        # Short or non-alphanumeric values may show up by coincidence or quoted.
        if len(value) < 6 or not value.isalnum() or not value.isascii():
            continue
        if any(value in text for text in public):
            continue
        check_that(value not in logged, f"secret query value {value!r} is in the access log line {logged!r}")


# ---------------------------------------------------------------------------
# HTTP/1.1 request parsing (zprovd.httpcore)


def setup_http() -> Callable[[bytes], None]:
    from zprovd import httpcore as h

    def check(data: bytes) -> None:
        connection = h.ServerConnection(0.0)
        now = 0.0
        for piece in data.split(b"\xff"):
            connection.receive_data(piece)
            while True:
                event = connection.next_event()
                if event is None:
                    break
                if isinstance(event, h.Refusal):
                    check_that(event.status in (400, 408, 413, 414, 431, 505), f"refusal {event}")
                    check_that(connection.closed and connection.next_event() is None, "open after a refusal")
                    return
                check_that(isinstance(event, h.RequestHead), f"event {event!r}")
                check_that(event.path.startswith(b"/"), f"path {event.path!r}")
                check_that(h._TOKEN.fullmatch(event.method) is not None, f"method {event.method!r}")
                check_that(len(event.headers) <= h.MAX_HEADERS, "too many headers")
                check_that(all(b"\n" not in v and b"\r" not in v for v in event.headers.values()), "CR/LF in a value")
                if event.query is not None:
                    h.parse_query(event.query)
                now += 1.0
                connection.response_done(now, event.keep_alive)
        connection.expire(now + h.HEADER_DEADLINE)
        check_that(connection.next_event() is None, "a request after the deadline")

    return check


# ---------------------------------------------------------------------------
# HTTP Basic/Digest authentication (zprovd.httpauth)

AUTH_NOW = 1_700_000_000.0
AUTH_KEY = b"zprovd-fuzz-nonce-key-0123456789"


def setup_httpauth() -> Callable[[bytes], None]:
    from zprovd import httpauth

    nonces = httpauth.NonceSource(AUTH_KEY)
    candidates = [httpauth.Credentials.from_password("alice", "secret"),
                  httpauth.Credentials.from_password("001565123456", "päss:word")]
    users = {c.user for c in candidates}

    def check(data: bytes) -> None:
        header = _text(data)
        params = httpauth.parse_digest(header)
        if params is not None:
            check_that(isinstance(params, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                        for k, v in params.items()), "parse_digest result")
            check_that(all(k == k.lower() for k in params), "parameter names not lower-case")
        for basic, digest in ((True, True), (False, True), (True, False)):
            verdict = httpauth.verify(header, "GET", candidates, nonces, AUTH_NOW, basic=basic, digest=digest)
            check_that(isinstance(verdict, httpauth.Verdict), "verify result")
            if verdict.ok:
                check_that(verdict.user in users and not verdict.stale, f"accepted {verdict!r}")

    return check


# ---------------------------------------------------------------------------
# CSV import


def setup_csv() -> Callable[[bytes], None]:
    from zprovd.csvimport import CSVImportError, decode_csv, parse_csv

    control = re.compile(r"[\x00-\x1f\x7f]")

    def check(data: bytes) -> None:
        try:
            users, devices = parse_csv(decode_csv(data, "fuzz.csv"), "fuzz.csv", "pbx.example.com",
                                       hasher=lambda password: "hashed")
        except CSVImportError as exc:
            check_that(exc.problems and all(p.startswith("fuzz.csv") for p in exc.problems),
                       f"problems {exc.problems!r}")
            return
        logins = {u.login for u in users}
        for user in users:
            check_that(user.login and user.accounts and user.password_hash == "hashed", f"user {user!r}")
            for account in user.accounts:
                for text in (account.sip_user, account.sip_password, account.sip_domain, account.sip_auth_user):
                    check_that(not control.search(text), f"control character in {account!r}")
        for device in devices:
            check_that(HEX12.fullmatch(device.mac) and device.model and device.users, f"device {device!r}")
            check_that(set(device.users) <= logins, f"device {device.mac} has unknown users")

    return check


# ---------------------------------------------------------------------------
# Configuration file


def setup_config() -> Callable[[bytes], None]:
    from zprovd.config import Config, ConfigError, load_config

    folder = Path(tempfile.mkdtemp(prefix="config-", dir=os.environ.get("ZPROVD_FUZZ_TMP")))
    path = folder / "zprovd.toml"

    def check(data: bytes) -> None:
        path.write_bytes(data)
        try:
            config = load_config(path)
        except ConfigError as exc:
            check_that(exc.problems and all(isinstance(p, str) for p in exc.problems), "empty ConfigError")
            return
        check_that(isinstance(config, Config), "load_config result")

    return check


# ---------------------------------------------------------------------------
# Per-MAC patterns of the catalogue


def setup_catalogue() -> Callable[[bytes], None]:
    from zprovd.catalogue import PerMacFile, bundled_templates_dir, compile_pattern, load_catalogue

    catalogue = load_catalogue([bundled_templates_dir()])

    def check(data: bytes) -> None:
        raw_pattern, raw_name = _fields(data, 2)
        pattern, name = _text(raw_pattern), _text(raw_name)
        try:
            regex = compile_pattern(pattern)
        except ValueError:
            check_that(pattern.count("{mac}") != 1, f"compile_pattern refused {pattern!r}")
        else:
            mac = PerMacFile(pattern, "t.j2", regex).match(name)
            check_that(mac is None or HEX12.fullmatch(mac), f"match gave {mac!r}")
            before, after = pattern.split("{mac}")
            expected = PerMacFile(pattern, "t.j2", regex).match(before + "00:15:65:AB:cd:0F" + after)
            check_that(expected == "001565abcd0f", f"{pattern!r} does not match its own MAC")
        for _, _, mac in catalogue.per_mac_candidates(name):
            check_that(HEX12.fullmatch(mac), f"candidate MAC {mac!r}")

    return check


TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("tftp", "TFTP datagram decoder (and re-encoding)", setup_tftp, 1024, 1.0),
    Target("dhcp", "DHCP decoder, responder in every mode, reply encoder", setup_dhcp, 1500, 1.5),
    Target("router", "HTTP/TFTP router: path, query, User-Agent, Authorization; access-log redaction",
           setup_router, 2048, 1.5),
    Target("http", "HTTP/1.1 request parser (request line, headers, bodies, pipelining)", setup_http, 4096, 1.0),
    Target("httpauth", "Basic/Digest Authorization header parser and verifier", setup_httpauth, 1024, 1.0),
    Target("csv", "CSV import parser", setup_csv, 2048, 0.75),
    Target("config", "configuration file loader (TOML, every section including [dhcp])", setup_config, 4096, 1.0),
    Target("catalogue", "per-MAC file name patterns", setup_catalogue, 512, 0.5),
)}


def describe(name: str, data: bytes) -> str:
    """An input as the target sees it, for reports."""
    if name == "router" and data:
        protocol = ("http", "https", "tftp")[data[0] % 3]
        target, agent, authorization = _fields(data[1:], 3)
        return (f"{protocol} request target={target!r}\n  User-Agent={agent!r}\n"
                f"  Authorization={authorization!r}")
    if name == "catalogue":
        pattern, requested = _fields(data, 2)
        return f"pattern={pattern!r} name={requested!r}"
    if name == "http":
        pieces = data.split(b"\xff")
        return f"pieces={pieces!r}"
    if name in ("httpauth", "csv", "config"):
        return f"text={data.decode('utf-8', 'replace')!r}"
    return f"datagram={data!r}"
