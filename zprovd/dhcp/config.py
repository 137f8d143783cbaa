"""The ``[dhcp]`` configuration section, validated entirely up front.

The DHCP helper has three modes:

``inform``
    answer only DHCPINFORM (a phone that already has an address asks for
    options such as 66/150/160); the safest mode, the default.
``proxy``
    answer DHCPDISCOVER/DHCPREQUEST with options but no address, next to
    the network's real DHCP server.
``server``
    a small non-authoritative DHCP server with an address pool.

Example::

    [dhcp]
    enabled = true
    interface = "eth1"
    mode = "server"
    pool = ["10.1.0.100-10.1.0.199"]
    subnet_mask = "255.255.255.0"
    router = "10.1.0.1"
    dns = ["10.1.0.1"]

    [dhcp.options]
    tftp-server-name = "10.1.0.2"
    "150" = ["10.1.0.2"]

    [[dhcp.match]]
    vendor_class = "Yealink"
    options = { boot-file-name = "y000000000000.boot" }

Every option value is converted here to the exact bytes sent on the wire,
so the responder never has to interpret configuration again.  Option names
follow Kea's; numbers written as strings (``"150"``) are accepted too.
"""

from __future__ import annotations

import ipaddress
import re
import struct
import tomllib
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any, Callable

from zprovd.config import ConfigError, SectionReader, register_section
from zprovd.mac import InvalidMAC, normalize_mac

MODES = ("inform", "proxy", "server")
ANSWERS = ("matching", "all")
MAX_POOL_ADDRESSES = 65536
MAX_OPTION_BYTES = 255

# Options the server computes itself; a configuration may not set them.
SERVER_MANAGED_OPTIONS: dict[int, str] = {
    0: "pad",
    50: "requested address",
    51: "lease time (use lease_time)",
    52: "option overload",
    53: "message type",
    54: "server identifier (use server_address)",
    55: "parameter request list",
    57: "maximum message size",
    58: "renewal time (derived from lease_time)",
    59: "rebinding time (derived from lease_time)",
    61: "client identifier",
    82: "relay agent information",
    255: "end",
}


# --------------------------------------------------------------------------
# Option catalogue: code -> (Kea name, value type).  Types:
#   ip      one IPv4 address
#   ips     one or more IPv4 addresses (a list, or a comma-separated string)
#   text    a string sent as UTF-8 (a name, an address as text, a URL)
#   int32   a signed 32-bit integer
#   uint16  an unsigned 16-bit integer
#   uint8   an unsigned 8-bit integer
#   fqdns   a list of domain names, encoded as in RFC 1035 (option 119)
#   vendor  option 43: hex bytes "01:04:..." or a table of sub-options
#   any     text, "hex:..." or a list of IPv4 addresses

@dataclass(frozen=True)
class OptionSpec:
    code: int
    name: str
    kind: str


_CATALOGUE = [
    OptionSpec(1, "subnet-mask", "ip"),
    OptionSpec(2, "time-offset", "int32"),
    OptionSpec(3, "routers", "ips"),
    OptionSpec(4, "time-servers", "ips"),
    OptionSpec(6, "domain-name-servers", "ips"),
    OptionSpec(7, "log-servers", "ips"),
    OptionSpec(12, "host-name", "text"),
    OptionSpec(15, "domain-name", "text"),
    OptionSpec(23, "default-ip-ttl", "uint8"),
    OptionSpec(26, "interface-mtu", "uint16"),
    OptionSpec(28, "broadcast-address", "ip"),
    OptionSpec(42, "ntp-servers", "ips"),
    OptionSpec(43, "vendor-encapsulated-options", "vendor"),
    OptionSpec(44, "netbios-name-servers", "ips"),
    OptionSpec(66, "tftp-server-name", "text"),
    OptionSpec(67, "boot-file-name", "text"),
    OptionSpec(100, "pcode", "text"),
    OptionSpec(101, "tcode", "text"),
    OptionSpec(114, "v4-captive-portal", "text"),
    OptionSpec(119, "domain-search", "fqdns"),
    # Not Kea names, but the usual ones for these vendor-specific codes.
    OptionSpec(150, "tftp-server-address", "ips"),
    OptionSpec(160, "provisioning-url", "text"),
]
OPTIONS_BY_CODE: dict[int, OptionSpec] = {spec.code: spec for spec in _CATALOGUE}
OPTIONS_BY_NAME: dict[str, OptionSpec] = {spec.name: spec for spec in _CATALOGUE}


def option_label(code: int) -> str:
    """``66`` -> ``"66(tftp-server-name)"``, for messages and logs."""
    spec = OPTIONS_BY_CODE.get(code)
    return f"{code}({spec.name})" if spec else str(code)


# --------------------------------------------------------------------------
# The parsed section.


@dataclass(frozen=True)
class PoolRange:
    """An inclusive range of IPv4 addresses."""

    start: IPv4Address
    end: IPv4Address

    def __contains__(self, address: object) -> bool:
        return isinstance(address, IPv4Address) and self.start <= address <= self.end

    def __len__(self) -> int:
        return int(self.end) - int(self.start) + 1

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"


@dataclass(frozen=True)
class MatchRule:
    """One ``[[dhcp.match]]`` table: a client selector and its options.

    Exactly one of ``vendor_class`` (case-insensitive substring of option
    60), ``oui`` (6 lowercase hex digits, prefix of the MAC) or ``mac``
    (canonical MAC) is set.
    """

    options: dict[int, bytes]
    vendor_class: str | None = None
    oui: str | None = None
    mac: str | None = None

    def matches(self, mac: str, vendor_class: str | None) -> bool:
        if self.vendor_class is not None:
            return vendor_class is not None and self.vendor_class.lower() in vendor_class.lower()
        if self.oui is not None:
            return mac.startswith(self.oui)
        return mac == self.mac

    def describe(self) -> str:
        if self.vendor_class is not None:
            return f"vendor_class {self.vendor_class!r}"
        if self.oui is not None:
            return f"oui {self.oui}"
        return f"mac {self.mac}"


@dataclass
class DHCPConfig:
    """The validated ``[dhcp]`` section; option values are wire bytes by code."""

    enabled: bool = False
    interface: str = ""
    mode: str = "inform"
    answer: str = "matching"
    pool: list[PoolRange] = field(default_factory=list)
    subnet_mask: IPv4Address | None = None
    router: IPv4Address | None = None
    dns: list[IPv4Address] = field(default_factory=list)
    lease_time: int = 3600
    server_address: IPv4Address | None = None
    allow_other_servers: bool = False
    rate_limit: int = 10
    """Replies per client (MAC) per 10 seconds; 0 means no limit."""
    options: dict[int, bytes] = field(default_factory=dict)
    """Options for every answered client, including 1/3/6 from subnet_mask/router/dns."""
    matches: list[MatchRule] = field(default_factory=list)

    def pool_size(self) -> int:
        return sum(len(r) for r in self.pool)

    def network(self) -> ipaddress.IPv4Network | None:
        """The subnet of the pool (server mode), from its first address and subnet_mask."""
        if not self.pool or self.subnet_mask is None:
            return None
        return ipaddress.IPv4Network(f"{self.pool[0].start}/{self.subnet_mask}", strict=False)


# --------------------------------------------------------------------------
# Value encoders: each returns bytes or raises ValueError with a reason.


def _ipv4(text: Any) -> IPv4Address:
    if not isinstance(text, str):
        raise ValueError(f"must be an IPv4 address as a string, not {_kind(text)}")
    try:
        return IPv4Address(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not an IPv4 address") from None


def _ip_list(value: Any) -> list[IPv4Address]:
    if isinstance(value, str):
        items = [part for part in value.split(",")]
    elif isinstance(value, list):
        items = value
    else:
        raise ValueError(f"must be a list of IPv4 addresses, not {_kind(value)}")
    if not items:
        raise ValueError("must list at least one IPv4 address")
    return [_ipv4(item) for item in items]


def _kind(value: Any) -> str:
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)


_HEX_BYTES = re.compile(r"(?:[0-9a-fA-F]{2})(?:[:\s-]?[0-9a-fA-F]{2})*")


def _hex_bytes(text: str) -> bytes:
    """``"01:04:0a:00:00:01"``, ``"01040a000001"`` or ``"01 04 ..."`` -> bytes."""
    text = text.strip()
    if not text:
        return b""
    if not _HEX_BYTES.fullmatch(text):
        raise ValueError(f"{text!r} is not hex bytes (write e.g. \"01:04:0a:00:00:01\")")
    return bytes.fromhex(re.sub(r"[:\s-]", "", text))


def _text(value: Any) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"must be a string, not {_kind(value)}")
    if not value:
        raise ValueError("must not be empty")
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value.encode("utf-8")


def _integer(value: Any, fmt: str, low: int, high: int) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {_kind(value)}")
    if not low <= value <= high:
        raise ValueError(f"must be between {low} and {high}, not {value}")
    return struct.pack(fmt, value)


_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _fqdns(value: Any) -> bytes:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ValueError("must be a list of domain names")
    out = b""
    for name in names:
        labels = name.strip().rstrip(".").split(".")
        if not all(_LABEL.fullmatch(label) for label in labels):
            raise ValueError(f"{name!r} is not a domain name")
        out += b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels) + b"\x00"
    return out


def _any(value: Any) -> bytes:
    """Text, ``"hex:..."`` bytes, or a list of IPv4 addresses."""
    if isinstance(value, list):
        return b"".join(a.packed for a in _ip_list(value))
    if isinstance(value, str):
        if value.lower().startswith("hex:"):
            data = _hex_bytes(value[4:])
            if not data:
                raise ValueError("\"hex:\" must be followed by at least one byte")
            return data
        return _text(value)
    raise ValueError(
        f"must be text, \"hex:...\" bytes or a list of IPv4 addresses, not {_kind(value)}"
    )


def _vendor(value: Any) -> bytes:
    """Option 43: hex bytes, or a table of sub-options {code = value}."""
    if isinstance(value, str):
        data = _hex_bytes(value[4:] if value.lower().startswith("hex:") else value)
        if not data:
            raise ValueError("must not be empty")
        return data
    if isinstance(value, dict):
        if not value:
            raise ValueError("the table of sub-options must not be empty")
        out = b""
        for key, sub in value.items():
            code = _option_number(key)
            if code is None or not 1 <= code <= 254:
                raise ValueError(f"sub-option {key!r} must be a number from 1 to 254")
            try:
                data = _any(sub)
            except ValueError as exc:
                raise ValueError(f"sub-option {key}: {exc}") from None
            if len(data) > 255:
                raise ValueError(f"sub-option {key}: value is {len(data)} bytes, at most 255")
            out += bytes([code, len(data)]) + data
        return out
    raise ValueError(
        "must be hex bytes like \"01:04:0a:00:00:01\" or a table of sub-options {code = value}"
    )


_ENCODERS: dict[str, Callable[[Any], bytes]] = {
    "ip": lambda v: _ipv4(v).packed,
    "ips": lambda v: b"".join(a.packed for a in _ip_list(v)),
    "text": _text,
    "int32": lambda v: _integer(v, "!i", -(2**31), 2**31 - 1),
    "uint16": lambda v: _integer(v, "!H", 0, 65535),
    "uint8": lambda v: _integer(v, "!B", 0, 255),
    "fqdns": _fqdns,
    "vendor": _vendor,
    "any": _any,
}


def _option_number(key: str) -> int | None:
    key = key.strip()
    return int(key) if key.isdigit() and len(key) <= 3 else None


def resolve_option(key: str) -> tuple[int, str]:
    """An option name or number -> (code, value kind); ValueError if unknown."""
    spec = OPTIONS_BY_NAME.get(key.strip().lower())
    if spec is not None:
        return spec.code, spec.kind
    code = _option_number(key)
    if code is None:
        raise ValueError(
            "unknown option name (use a Kea name such as tftp-server-name, or the option number as a string)"
        )
    if not 1 <= code <= 254:
        raise ValueError("option numbers go from 1 to 254")
    spec = OPTIONS_BY_CODE.get(code)
    return code, spec.kind if spec else "any"


def encode_option(key: str, value: Any) -> tuple[int, bytes]:
    """Validate one ``name = value`` and return (code, wire bytes); ValueError on problems."""
    code, kind = resolve_option(key)
    if code in SERVER_MANAGED_OPTIONS:
        raise ValueError(f"option {code} ({SERVER_MANAGED_OPTIONS[code]}) is set by the server itself")
    data = _ENCODERS[kind](value)
    if len(data) > MAX_OPTION_BYTES:
        raise ValueError(f"value is {len(data)} bytes long; an option holds at most {MAX_OPTION_BYTES}")
    return code, data


# --------------------------------------------------------------------------
# The section parser.


def _parse_options(
    reader: SectionReader, where: str, table: Any, seen: dict[int, str] | None = None
) -> dict[int, bytes]:
    """Encode a table of options; ``seen`` receives code -> the key that set it."""
    if not isinstance(table, dict):
        reader.error(where, f"must be a table of options, not {_kind(table)}")
        return {}
    result: dict[int, bytes] = {}
    seen = {} if seen is None else seen
    for key, value in table.items():
        try:
            code, data = encode_option(key, value)
        except ValueError as exc:
            reader.error(f"{where}.{key}", str(exc))
            continue
        if code in seen:
            reader.error(f"{where}.{key}", f"option {code} is already set as {seen[code]!r}")
            continue
        seen[code] = key
        result[code] = data
    return result


def _parse_pool(reader: SectionReader, items: list[str]) -> list[PoolRange]:
    ranges: list[PoolRange] = []
    for item in items:
        start_text, sep, end_text = item.partition("-")
        try:
            if not sep:
                raise ValueError(f"{item!r} is not a range \"first-last\" (e.g. \"10.0.0.100-10.0.0.199\")")
            start, end = _ipv4(start_text), _ipv4(end_text)
            if end < start:
                raise ValueError(f"{item!r}: the last address is before the first")
        except ValueError as exc:
            reader.error("pool", str(exc))
            continue
        ranges.append(PoolRange(start, end))
    ranges.sort(key=lambda r: r.start)
    for before, after in zip(ranges, ranges[1:]):
        if after.start <= before.end:
            reader.error("pool", f"ranges {before} and {after} overlap")
    if sum(len(r) for r in ranges) > MAX_POOL_ADDRESSES:
        reader.error("pool", f"holds more than {MAX_POOL_ADDRESSES} addresses")
    return ranges


def _optional_ip(reader: SectionReader, key: str) -> IPv4Address | None:
    text = reader.string(key, "")
    if not text:
        return None
    try:
        return _ipv4(text)
    except ValueError as exc:
        reader.error(key, str(exc))
        return None


def _parse_match(reader: SectionReader, index: int, table: Any) -> MatchRule | None:
    where = f"match[{index}]"
    if not isinstance(table, dict):
        reader.error(where, f"must be a table ([[dhcp.match]]), not {_kind(table)}")
        return None
    table = dict(table)
    selectors = [key for key in ("vendor_class", "oui", "mac") if key in table]
    ok = True
    if len(selectors) != 1:
        reader.error(where, "needs exactly one of vendor_class, oui or mac"
                     + (f" (has {', '.join(selectors)})" if selectors else ""))
        ok = False
    rule = MatchRule(options={})
    for key in selectors:
        value = table.pop(key)
        if not isinstance(value, str) or not value.strip():
            reader.error(f"{where}.{key}", "must be a non-empty string")
            ok = False
            continue
        if key == "vendor_class":
            rule = MatchRule(options={}, vendor_class=value)
        elif key == "oui":
            digits = re.sub(r"[:.\-]", "", value.strip()).lower()
            if not re.fullmatch(r"[0-9a-f]{6}", digits):
                reader.error(f"{where}.oui", f"{value!r} is not an OUI (3 bytes, e.g. \"00:15:65\")")
                ok = False
                continue
            rule = MatchRule(options={}, oui=digits)
        else:
            try:
                rule = MatchRule(options={}, mac=normalize_mac(value))
            except InvalidMAC as exc:
                reader.error(f"{where}.mac", str(exc))
                ok = False
                continue
    options = _parse_options(reader, f"{where}.options", table.pop("options", {}))
    for key in table:
        reader.error(f"{where}.{key}", "unknown key (a match has vendor_class, oui or mac, and options)")
        ok = False
    if not ok:
        return None
    return MatchRule(options=options, vendor_class=rule.vendor_class, oui=rule.oui, mac=rule.mac)


_INTERFACE = re.compile(r"[^\s/:]{1,15}")


def parse_section(reader: SectionReader) -> DHCPConfig:
    """Parse and validate ``[dhcp]``; problems go to ``reader.error``."""
    cfg = DHCPConfig()
    cfg.enabled = reader.boolean("enabled", False)
    cfg.interface = reader.string("interface", "")
    if cfg.interface and not _INTERFACE.fullmatch(cfg.interface):
        reader.error("interface", f"{cfg.interface!r} is not a network interface name")
    cfg.mode = reader.string("mode", "inform", MODES)
    cfg.answer = reader.string("answer", "matching", ANSWERS)
    cfg.pool = _parse_pool(reader, reader.strings("pool", []))
    cfg.subnet_mask = _optional_ip(reader, "subnet_mask")
    if cfg.subnet_mask is not None:
        try:
            ipaddress.IPv4Network(f"0.0.0.0/{cfg.subnet_mask}")
        except ValueError:
            reader.error("subnet_mask", f"{str(cfg.subnet_mask)!r} is not a subnet mask")
            cfg.subnet_mask = None
    cfg.router = _optional_ip(reader, "router")
    dns: list[IPv4Address] = []
    for item in reader.strings("dns", []):
        try:
            dns.append(_ipv4(item))
        except ValueError as exc:
            reader.error("dns", str(exc))
    cfg.dns = dns
    cfg.lease_time = reader.integer("lease_time", 3600, 10, 365 * 86400)
    cfg.server_address = _optional_ip(reader, "server_address")
    cfg.allow_other_servers = reader.boolean("allow_other_servers", False)
    cfg.rate_limit = reader.integer("rate_limit", 10, 0, 10000)

    options: dict[int, bytes] = {}
    for code, value, key in (
        (1, cfg.subnet_mask, "subnet_mask"),
        (3, cfg.router, "router"),
    ):
        if value is not None:
            options[code] = value.packed
    if cfg.dns:
        options[6] = b"".join(a.packed for a in cfg.dns)
    table_keys: dict[int, str] = {}
    table_options = _parse_options(reader, "options", reader.table("options"), table_keys)
    for code, key in ((1, "subnet_mask"), (3, "router"), (6, "dns")):
        if code in options and code in table_options:
            reader.error(f"options.{table_keys[code]}",
                         f"option {code} is already set by the key {key}; set it in one place only")
            del table_options[code]
    options.update(table_options)
    cfg.options = options

    # [[dhcp.match]] is an array of tables, which SectionReader has no method
    # for: take the remaining keys, keep "match", report the others as unknown
    # exactly as reader.finish() would.
    rest = reader.rest()
    raw_matches = rest.pop("match", [])
    for key in rest:
        reader.error(key, "unknown key")
    if not isinstance(raw_matches, list):
        reader.error("match", "must be an array of tables ([[dhcp.match]])")
        raw_matches = []
    for index, table in enumerate(raw_matches, start=1):
        rule = _parse_match(reader, index, table)
        if rule is not None:
            cfg.matches.append(rule)

    if cfg.enabled:
        _check_enabled(reader, cfg)
    return cfg


def _check_enabled(reader: SectionReader, cfg: DHCPConfig) -> None:
    """Requirements that apply only to a helper that will actually run."""
    if not cfg.interface:
        reader.error("interface", "must name the network interface to serve (enabled = true)")
    if cfg.answer == "matching" and not cfg.matches:
        reader.error("answer", "is \"matching\" but there is no [[dhcp.match]]: no client would be answered"
                     " (add a [[dhcp.match]] or set answer = \"all\")")
    if cfg.mode != "server":
        return
    if not cfg.pool:
        reader.error("pool", "must list at least one address range in server mode")
    if cfg.subnet_mask is None:
        reader.error("subnet_mask", "must be set in server mode")
    network = cfg.network()
    if network is None:
        return
    for r in cfg.pool:
        if r.start not in network or r.end not in network:
            reader.error("pool", f"range {r} is not inside the subnet {network}")
    for key, address in (("router", cfg.router), ("server_address", cfg.server_address)):
        if address is None:
            continue
        if address not in network:
            reader.error(key, f"{address} is not inside the pool's subnet {network}")
        if any(address in r for r in cfg.pool):
            reader.error(key, f"{address} is inside the pool")


def load_dhcp_config(path: Path) -> tuple[DHCPConfig, Path | None]:
    """Read only ``[dhcp]`` (and the top-level ``state_dir``) from a configuration file.

    For running the DHCP helper on its own (``python -m zprovd.dhcp.service``):
    the other sections of a full zprovd configuration are ignored, not
    validated.  Raises ``ConfigError`` listing every problem of ``[dhcp]``.
    """
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    problems: list[str] = []
    base = path.resolve().parent
    reader = SectionReader(problems, path, "dhcp", data.get("dhcp", {}), base)
    config = parse_section(reader)
    reader.finish()
    state_dir = data.get("state_dir")
    if state_dir is not None and (not isinstance(state_dir, str) or not state_dir):
        problems.append(f"{path}: top level state_dir: must be a non-empty string")
        state_dir = None
    if problems:
        raise ConfigError(problems)
    return config, (base / Path(state_dir).expanduser()) if state_dir else None


register_section("dhcp", parse_section)
