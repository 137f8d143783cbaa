"""The configuration file: one TOML file, validated entirely before use.

Every problem is reported as one line naming the file, the section, the key
and the reason, and all problems are reported at once.  Unknown keys are
errors: a typo must not silently disable something.

Sections owned by a subsystem with many keys (``[dhcp]``) are validated by
that subsystem's own ``parse_section(reader)`` function, registered in
``SECTION_PARSERS``; the rest live here.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from zprovd.sipvars import LineError, sip_transport_and_port

DEFAULT_CONFIG = Path("/etc/zprovd/zprovd.toml")
LOG_LEVELS = ("debug", "info", "warn", "error")
"""``[log] level`` values (twisted.logger's names)."""


class ConfigError(Exception):
    """One or more problems in a configuration file; ``problems`` lists them."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass
class HTTPConfig:
    listen: list[Listen]


@dataclass
class HTTPSConfig:
    listen: list[Listen]
    certificate: Path | None
    private_key: Path | None
    client_ca: Path | None


@dataclass
class TFTPConfig:
    listen: list[Listen]
    firmware_dir: Path | None
    max_blksize: int
    max_windowsize: int
    retries: int
    upload_dir: Path | None
    upload_max_bytes: int
    max_transfers_per_client: int = 256


@dataclass
class BackendConfig:
    type: str
    options: dict[str, Any]


@dataclass
class ProvisioningConfig:
    server: str
    base_url: str
    language: str
    vars: dict[str, Any]


@dataclass
class TemplatesConfig:
    dirs: list[Path]


@dataclass
class ZoiperConfig:
    paths: list[str]
    user_params: list[str]
    password_params: list[str]
    version_params: list[str]
    error_text: str
    error_status: int
    unavailable_text: str
    max_failures: int
    failure_window: int
    lockout: int


@dataclass
class LogConfig:
    format: str
    level: str
    """The lowest level written: "debug", "info" (with one access line per
    request), "warn" or "error"."""


@dataclass
class ServerConfig:
    user: str
    group: str
    shutdown_timeout: int


@dataclass
class MetricsConfig:
    listen: list[Listen]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network
EVERYWHERE: tuple[str, ...] = ("0.0.0.0/0", "::/0")


@dataclass
class GroupAccess:
    """Who may fetch one group of files (generic, per_mac, zoiper, firmware)."""

    allow: list[Network]
    tftp_allow: list[Network]


@dataclass
class PerMacAccess(GroupAccess):
    url_key: str
    auth: str  # "none" | "basic" | "digest" | "any"
    digest_algorithms: list[str]
    http_user: str
    http_password: str
    client_certificate: bool


@dataclass
class ScanConfig:
    enabled: bool
    max_misses: int
    window: int
    ban: int
    never_ban: list[Network]


@dataclass
class AccessConfig:
    trusted_proxies: list[Network]
    generic: GroupAccess
    per_mac: PerMacAccess
    zoiper: GroupAccess
    firmware: GroupAccess
    scan: ScanConfig


@dataclass
class Config:
    path: Path
    state_dir: Path
    http: HTTPConfig
    https: HTTPSConfig
    tftp: TFTPConfig
    backend: BackendConfig
    provisioning: ProvisioningConfig
    templates: TemplatesConfig
    zoiper: ZoiperConfig
    log: LogConfig
    server: ServerConfig
    metrics: MetricsConfig
    access: AccessConfig
    extra: dict[str, Any] = field(default_factory=dict)
    """Sections parsed by subsystems (``SECTION_PARSERS``), by section name."""


# --------------------------------------------------------------------------
# A small validating reader: each section pops the keys it knows, and
# whatever remains is reported as unknown.


class SectionReader:
    """Reads one TOML table, recording problems instead of raising."""

    def __init__(self, problems: list[str], file: Path, section: str, table: Any, base: Path):
        self._problems = problems
        self.file = file
        self.section = section
        self.base = base
        if not isinstance(table, dict):
            self.error(None, f"must be a table, not {type(table).__name__}")
            table = {}
        self._table = dict(table)

    def where(self, key: str | None) -> str:
        place = f"[{self.section}]" if self.section else "top level"
        return f"{self.file}: {place}" + (f" {key}" if key else "")

    def error(self, key: str | None, reason: str) -> None:
        self._problems.append(f"{self.where(key)}: {reason}")

    def has(self, key: str) -> bool:
        return key in self._table

    def _take(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        if key not in self._table:
            return default
        value = self._table.pop(key)
        # bool is an int in Python; keep them apart.
        if isinstance(value, bool) and bool not in kinds:
            self.error(key, f"must be {kind_name}, not a boolean")
            return default
        if not isinstance(value, kinds):
            self.error(key, f"must be {kind_name}, not {_toml_type(value)}")
            return default
        return value

    def string(self, key: str, default: str, choices: tuple[str, ...] | None = None) -> str:
        value = self._take(key, default, (str,), "a string")
        if choices is not None and value not in choices:
            self.error(key, f"must be one of {', '.join(map(repr, choices))}, not {value!r}")
            return default
        return value

    def integer(self, key: str, default: int, low: int | None = None, high: int | None = None) -> int:
        value = self._take(key, default, (int,), "an integer")
        if (low is not None and value < low) or (high is not None and value > high):
            self.error(key, f"must be between {low} and {high}, not {value}")
            return default
        return value

    def boolean(self, key: str, default: bool) -> bool:
        return self._take(key, default, (bool,), "true or false")

    def strings(self, key: str, default: list[str], nonempty: bool = False) -> list[str]:
        value = self._take(key, default, (list,), "a list of strings")
        if not all(isinstance(item, str) for item in value):
            self.error(key, "must be a list of strings")
            return default
        if nonempty and not value:
            self.error(key, "must not be empty")
            return default
        return list(value)

    def table(self, key: str) -> dict[str, Any]:
        return self._take(key, {}, (dict,), "a table")

    def path(self, key: str, default: str = "", base: Path | None = None) -> Path | None:
        """A path; empty means unset; relative paths resolve against ``base``."""
        value = self.string(key, default)
        if not value:
            return None
        try:
            return _resolve(value, base or self.base)
        except ValueError as exc:
            self.error(key, str(exc))
            return None

    def listen(self, key: str, default: list[str]) -> list[Listen]:
        result = []
        for item in self.strings(key, default):
            try:
                result.append(parse_listen(item))
            except ValueError as exc:
                self.error(key, str(exc))
        return result

    def networks(self, key: str, default: list[str] | tuple[str, ...]) -> list[Network]:
        result = []
        for item in self.strings(key, list(default)):
            try:
                result.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                self.error(key, f"{item!r} is not an address or network (e.g. 10.0.0.0/8)")
        return result

    def subsection(self, key: str) -> "SectionReader":
        """A nested table (``[access.per_mac]``), read with its own unknown-key check."""
        return SectionReader(self._problems, self.file, f"{self.section}.{key}", self._table.pop(key, {}), self.base)

    def rest(self) -> dict[str, Any]:
        """Take every remaining key (for sections whose keys belong to a plug-in)."""
        rest, self._table = self._table, {}
        return rest

    def finish(self) -> None:
        for key in self._table:
            self.error(key, "unknown key")


def _toml_type(value: Any) -> str:
    return {
        str: "a string", int: "an integer", float: "a number", bool: "a boolean",
        list: "a list", dict: "a table",
    }.get(type(value), type(value).__name__)


def _resolve(value: str, base: Path) -> Path:
    """An absolute path; ValueError if ``~user`` names nobody."""
    try:
        path = Path(value).expanduser()
    except RuntimeError:
        raise ValueError(f"{value!r}: cannot expand '~': no such user") from None
    return path if path.is_absolute() else Path(os.path.normpath(base / path))


def parse_listen(text: str) -> Listen:
    """Parse ``host:port`` or ``[v6]:port``."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not \"[address]:port\"")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"{text!r} is not \"host:port\" (write IPv6 as \"[::]:80\")")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return Listen(host, int(port))


# --------------------------------------------------------------------------

SectionParser = Callable[[SectionReader], Any]
SECTION_PARSERS: dict[str, SectionParser] = {}
"""Subsystem sections: name -> function(reader) returning the parsed section."""


def register_section(name: str, parser: SectionParser) -> None:
    SECTION_PARSERS[name] = parser


def _overlap(a: str, b: str) -> bool:
    """Whether two listening hosts (of one port) take the same address: equal, or a wildcard of the same family."""
    if a == b:
        return True
    wildcards = {"0.0.0.0": "4", "::": "6"}
    family_a, family_b = ("6" if ":" in a else "4"), ("6" if ":" in b else "4")
    return (a in wildcards or b in wildcards) and family_a == family_b


def _must_be_folder(reader: "SectionReader", key: str, path: Path | None) -> None:
    """A folder the operator names must exist: a typo must not silently turn
    off overrides, firmware or uploads."""
    if path is None:
        return
    try:
        if not path.is_dir():
            reader.error(key, f"{path} is not a folder" if path.exists() else f"{path} does not exist")
    except OSError as exc:  # a parent this user may not enter
        reader.error(key, f"cannot look at {path}: {exc.strerror}")


def _register_builtin_subsystems() -> None:
    # Imported here so that config.py stays importable on its own.
    from zprovd.dhcp import config as dhcp_config  # noqa: F401  (registers [dhcp])


def _group(reader: SectionReader, name: str) -> tuple[SectionReader, list[Network], list[Network] | None]:
    sub = reader.subsection(name)
    allow = sub.networks("allow", EVERYWHERE)
    tftp_allow = sub.networks("tftp_allow", ()) if sub.has("tftp_allow") else None
    return sub, allow, tftp_allow


def _parse_access(s: SectionReader) -> AccessConfig:
    trusted = s.networks("trusted_proxies", [])
    groups: dict[str, GroupAccess] = {}
    for name in ("generic", "zoiper", "firmware"):
        sub, allow, tftp_allow = _group(s, name)
        groups[name] = GroupAccess(allow, allow if tftp_allow is None else tftp_allow)
        sub.finish()
    sub, allow, tftp_allow = _group(s, "per_mac")
    auth = sub.string("auth", "none", ("none", "basic", "digest", "any"))
    algorithms = sub.strings("digest_algorithms", ["SHA-256", "MD5"], nonempty=True)
    for name in algorithms:
        if name not in ("SHA-256", "MD5"):
            sub.error("digest_algorithms", f"{name!r} is not one of 'SHA-256', 'MD5'")
    user = sub.string("http_user", "")
    password = sub.string("http_password", "")
    if bool(user) != bool(password):
        sub.error("http_password", "http_user and http_password must be set together")
    client_certificate = sub.boolean("client_certificate", False)
    url_key = sub.string("url_key", "")
    if url_key and (not url_key.isascii() or not url_key.replace("-", "").replace("_", "").isalnum()):
        sub.error("url_key", "use letters, digits, '-' and '_' only (it is a path segment)")
    if tftp_allow is None:
        # TFTP can carry neither credentials nor certificates: when those are
        # required, per-MAC files are refused over TFTP unless allowed explicitly.
        tftp_allow = [] if (auth != "none" or client_certificate) else allow
    per_mac = PerMacAccess(allow, tftp_allow, url_key, auth, algorithms, user, password, client_certificate)
    sub.finish()
    sub = s.subsection("scan")
    scan = ScanConfig(
        enabled=sub.boolean("enabled", True),
        max_misses=sub.integer("max_misses", 20, 2, 100000),
        window=sub.integer("window", 60, 1, 86400),
        ban=sub.integer("ban", 600, 1, 7 * 86400),
        never_ban=sub.networks("never_ban", []),
    )
    sub.finish()
    s.finish()
    return AccessConfig(trusted, groups["generic"], per_mac, groups["zoiper"], groups["firmware"], scan)


def open_access() -> AccessConfig:
    """The defaults of ``[access]``: every address, no key, no credentials."""
    problems: list[str] = []
    return _parse_access(SectionReader(problems, Path("-"), "access", {}, Path(".")))


def default_config_path() -> Path:
    return Path(os.environ.get("ZPROVD_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path | str) -> Config:
    """Read and validate a configuration file; raise ConfigError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read configuration: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: TOML syntax error: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: TOML nested too deeply"]) from None
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> Config:
    _register_builtin_subsystems()
    problems: list[str] = []
    base = path.resolve().parent

    def section(name: str) -> SectionReader:
        return SectionReader(problems, path, name, data.pop(name, {}), base)

    top = SectionReader(problems, path, "", {}, base)
    state_value = data.pop("state_dir", "/var/lib/zprovd")
    if not isinstance(state_value, str) or not state_value:
        top.error("state_dir", "must be a non-empty string")
        state_value = "/var/lib/zprovd"
    try:
        state_dir = _resolve(state_value, base)
    except ValueError as exc:
        top.error("state_dir", str(exc))
        state_dir = Path("/var/lib/zprovd")

    s = section("http")
    http = HTTPConfig(listen=s.listen("listen", ["0.0.0.0:80"]))
    s.finish()

    s = section("https")
    https = HTTPSConfig(
        listen=s.listen("listen", ["0.0.0.0:443"]),
        certificate=s.path("certificate"),
        private_key=s.path("private_key"),
        client_ca=s.path("client_ca"),
    )
    if (https.certificate is None) != (https.private_key is None):
        s.error("private_key", "certificate and private_key must be set together (or both left empty)")
    s.finish()

    s = section("tftp")
    tftp = TFTPConfig(
        listen=s.listen("listen", ["0.0.0.0:69"]),
        firmware_dir=s.path("firmware_dir"),
        max_blksize=s.integer("max_blksize", 1468, 8, 65464),
        max_windowsize=s.integer("max_windowsize", 64, 1, 65535),
        retries=s.integer("retries", 5, 1, 50),
        upload_dir=s.path("upload_dir"),
        upload_max_bytes=s.integer("upload_max_bytes", 1 << 20, 0, 1 << 30),
        max_transfers_per_client=s.integer("max_transfers_per_client", 256, 1, 4096),
    )
    _must_be_folder(s, "firmware_dir", tftp.firmware_dir)
    _must_be_folder(s, "upload_dir", tftp.upload_dir)
    s.finish()

    s = section("backend")
    backend_type = s.string("type", "sqlite")
    if not backend_type:
        s.error("type", "must name a backend")
    backend = BackendConfig(type=backend_type, options=s.rest())

    s = section("provisioning")
    server = s.string("server", "")
    if not server:
        s.error("server", "must be set to the host name or IP address phones reach this server at")
    base_url = s.string("base_url", "")
    if base_url and not base_url.startswith(("http://", "https://")):
        s.error("base_url", f"must start with http:// or https://, not {base_url!r}")
    if not base_url and server:
        port = http.listen[0].port if http.listen else 80
        base_url = f"http://{server}" + ("" if port == 80 else f":{port}") + "/"
    if base_url and not base_url.endswith("/"):
        base_url += "/"
    provisioning = ProvisioningConfig(
        server=server,
        base_url=base_url,
        language=s.string("language", "en"),
        vars=s.table("vars"),
    )
    try:
        sip_transport_and_port(provisioning.vars, "vars")
    except LineError as exc:
        s.error("vars", str(exc).removeprefix("vars: "))
    s.finish()

    s = section("templates")
    dirs = []
    for d in s.strings("dirs", []):
        try:
            dirs.append(_resolve(d, base))
        except ValueError as exc:
            s.error("dirs", str(exc))
        else:
            _must_be_folder(s, "dirs", dirs[-1])
    templates = TemplatesConfig(dirs=dirs)
    s.finish()

    s = section("zoiper")
    zoiper = ZoiperConfig(
        paths=s.strings("paths", ["/zoiper"], nonempty=True),
        user_params=s.strings("user_params", ["user", "username", "u"], nonempty=True),
        password_params=s.strings("password_params", ["password", "pass", "p"], nonempty=True),
        version_params=s.strings("version_params", ["version", "v"]),
        error_text=s.string("error_text", "Wrong username or password."),
        error_status=s.integer("error_status", 200, 200, 599),
        unavailable_text=s.string(
            "unavailable_text", "The provisioning service is unavailable. Please try again later."
        ),
        max_failures=s.integer("max_failures", 10, 1, 10000),
        failure_window=s.integer("failure_window", 300, 1, 86400),
        lockout=s.integer("lockout", 300, 0, 86400),
    )
    for p in zoiper.paths:
        if not p.startswith("/"):
            s.error("paths", f"{p!r} must start with '/'")
    s.finish()

    s = section("log")
    log = LogConfig(
        format=s.string("format", "text", ("text", "json")),
        level=s.string("level", "info", LOG_LEVELS),
    )
    s.finish()

    s = section("server")
    server_section = ServerConfig(
        user=s.string("user", ""),
        group=s.string("group", ""),
        shutdown_timeout=s.integer("shutdown_timeout", 30, 0, 3600),
    )
    if server_section.group and not server_section.user:
        s.error("group", "needs [server] user (zprovd switches to both once its ports are bound)")
    s.finish()

    s = section("metrics")
    metrics = MetricsConfig(listen=s.listen("listen", ["127.0.0.1:9151"]))
    s.finish()

    # HTTP, HTTPS and metrics share TCP: one address cannot serve two of them.
    taken: dict[tuple[str, int], str] = {}
    for name, listens in (("http", http.listen), ("https", https.listen), ("metrics", metrics.listen)):
        for listen in listens:
            clash = next((other for (host, port), other in taken.items()
                          if port == listen.port != 0 and _overlap(host, listen.host)), None)
            if clash is not None and clash != name:
                problems.append(f"{path}: [{name}] listen: {listen} is also where [{clash}] listens")
            taken.setdefault((listen.host, listen.port), name)

    access = _parse_access(section("access"))
    if access.per_mac.client_certificate and https.client_ca is None:
        problems.append(f"{path}: [access.per_mac] client_certificate: needs [https] client_ca (the device CAs to trust)")

    extra: dict[str, Any] = {}
    for name, parser in SECTION_PARSERS.items():
        s = section(name)
        extra[name] = parser(s)
        s.finish()

    for key in data:
        top.error(key, "unknown section" if isinstance(data[key], dict) else "unknown key")

    if problems:
        raise ConfigError(problems)
    return Config(
        path=path,
        state_dir=state_dir,
        http=http,
        https=https,
        tftp=tftp,
        backend=backend,
        provisioning=provisioning,
        templates=templates,
        zoiper=zoiper,
        log=log,
        server=server_section,
        metrics=metrics,
        access=access,
        extra=extra,
    )
