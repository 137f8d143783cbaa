"""Request routing: from a requested path to what should answer it.

Pure: no I/O, no Twisted (the firmware folder look-up is injected).  HTTP, HTTPS and TFTP turn their requests into a
``Request`` and ask ``Router.route``; the answer says which kind of file it
is (Zoiper document, generic file, per-MAC file, firmware) or why the request
is refused.  The identification pipeline (look the device up, record what
was learned) lives in ``zprovd.provisioning``.

Paths are matched on their last components, so option 66 may point phones at
``http://host/`` or ``http://host/provision/`` (or any other prefix).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote_to_bytes

from zprovd.catalogue import Catalogue, GenericFile, Model, PerMacFile
from zprovd.config import ZoiperConfig

MAX_PATH = 1024
MAX_SEGMENT = 255


@dataclass(slots=True)
class Request:
    """One request, as every protocol layer hands it over (read-only by
    convention: not frozen, because a frozen dataclass costs more to build
    than a cached answer costs to find)."""

    protocol: str  # "http", "https" or "tftp"
    path: str  # HTTP: the raw (still percent-encoded) path; TFTP: the file name
    query: dict[str, list[str]] = field(default_factory=dict)
    user_agent: str = ""
    authorization: str = ""
    client: str = ""
    host: str = ""
    method: str = "GET"
    certificate_macs: frozenset[str] | None = None
    """HTTPS: the MACs in the client certificate (None: no certificate)."""


# What a request resolves to --------------------------------------------------


@dataclass(frozen=True)
class BadRequest:
    reason: str


@dataclass(frozen=True)
class NotFound:
    name: str


@dataclass(frozen=True)
class ZoiperRoute:
    login: str | None
    password: str | None
    version: str | None
    via: str  # "query", "basic" or "none"


@dataclass(frozen=True)
class GenericRoute:
    name: str
    model: Model
    file: GenericFile


@dataclass(frozen=True)
class PerMacRoute:
    name: str
    mac: str
    candidates: tuple[tuple[Model, PerMacFile], ...]
    prefix: tuple[str, ...] = ()
    """The path segments before the name (where a URL key sits)."""

    def file_for(self, model_id: str) -> PerMacFile | None:
        for model, pm in self.candidates:
            if model.id == model_id:
                return pm
        return None


@dataclass(frozen=True)
class FirmwareRoute:
    name: str  # safe relative path inside the firmware folder


Route = BadRequest | NotFound | ZoiperRoute | GenericRoute | PerMacRoute | FirmwareRoute


def split_path(path: str, percent_encoded: bool) -> list[str] | BadRequest:
    """Decode and split a requested path into safe segments, or refuse it.

    Refuses NUL, ``..`` anywhere, undecodable bytes and over-long names.  A
    backslash is a separator (some phones send Windows paths).  Empty and
    ``.`` segments are dropped, so ``//etc/x`` is just ``etc/x``.
    """
    if len(path) > MAX_PATH:
        return BadRequest("path too long")
    if percent_encoded:
        try:
            path = unquote_to_bytes(path).decode("utf-8")
        except UnicodeDecodeError:
            return BadRequest("path is not UTF-8")
    if "\x00" in path:
        return BadRequest("NUL in path")
    segments = []
    for segment in path.replace("\\", "/").split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            return BadRequest("'..' in path")
        if len(segment.encode("utf-8", "surrogatepass")) > MAX_SEGMENT:
            return BadRequest("path component too long")
        if any(ord(c) < 0x20 for c in segment):
            return BadRequest("control character in path")
        segments.append(segment)
    return segments


def basic_credentials(header: str) -> tuple[str, str] | None:
    """The (user, password) of an HTTP Basic Authorization header, or None."""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def _first(query: dict[str, list[str]], names: list[str]) -> str | None:
    for name in names:
        values = query.get(name)
        if values:
            return values[0]
    return None


KNOWN_ROUTES = 100_000
"""Desk-phone routes remembered (all forgotten at once when full)."""

KNOWN_ROUTE_BYTES = 16 << 20
"""Characters of path and user agent the remembered routes may hold: a
client sending a different 8 KB User-Agent each time fills this, not memory."""


class Router:
    def __init__(
        self,
        catalogue: Catalogue,
        zoiper: ZoiperConfig,
        firmware: Callable[[str], str | None] | None = None,
    ):
        """``firmware(name)`` returns the name if the firmware folder serves it, else None."""
        self.catalogue = catalogue
        self.zoiper = zoiper
        self.zoiper_paths = {p.strip("/").lower() for p in zoiper.paths}
        self.firmware = firmware
        self._known: dict[tuple[bool, str, str], Route] = {}
        self._known_size = 0

    def route(self, request: Request) -> Route:
        """What the request asks for.  Desk-phone routes depend only on the
        path (and the user agent, for a generic name several models share),
        so they are remembered: a phone asking again costs a dict look-up."""
        key = (request.protocol == "tftp", request.path, request.user_agent)
        known = self._known.get(key)
        if known is not None:
            return known
        route = self._route(request)
        if isinstance(route, (PerMacRoute, GenericRoute)):
            size = len(request.path) + len(request.user_agent)
            if len(self._known) >= KNOWN_ROUTES or self._known_size + size > KNOWN_ROUTE_BYTES:
                self._known.clear()
                self._known_size = 0
            self._known[key] = route
            self._known_size += size
        return route

    def _route(self, request: Request) -> Route:
        segments = split_path(request.path, percent_encoded=request.protocol != "tftp")
        if isinstance(segments, BadRequest):
            return segments
        joined = "/".join(segments)
        if request.protocol != "tftp" and joined.lower() in self.zoiper_paths:
            return self._zoiper(request)
        if not segments:
            return NotFound("")
        # Longest suffix first: "Cisco/CP-7841-3PCC/<mac>.cfg" before "<mac>.cfg".
        for start in range(len(segments)):
            name = "/".join(segments[start:])
            generic = self.catalogue.generic_candidates(name)
            if generic:
                model, gf = self._pick_generic(generic, request.user_agent)
                return GenericRoute(name, model, gf)
            per_mac = self.catalogue.per_mac_files(name)
            if per_mac:
                # The MAC is the same for every pattern: the name decides it.
                macs = {mac for mac, _ in per_mac}
                if len(macs) == 1:
                    pairs = per_mac[0][1] if len(per_mac) == 1 else tuple(p for _, ps in per_mac for p in ps)
                    return PerMacRoute(name, macs.pop(), pairs, tuple(segments[:start]))
        if self.firmware is not None:
            if request.protocol != "tftp" and len(segments) > 1 and segments[0].lower() == "firmware":
                found = self.firmware("/".join(segments[1:]))
                if found:
                    return FirmwareRoute(found)
            found = self.firmware(joined)
            if found:
                return FirmwareRoute(found)
        return NotFound(joined)

    def _pick_generic(self, candidates: list[tuple[Model, GenericFile]], user_agent: str) -> tuple[Model, GenericFile]:
        if len(candidates) > 1 and user_agent:
            model = self.catalogue.match_user_agent(user_agent, [m for m, _ in candidates])
            if model is not None:
                for m, gf in candidates:
                    if m is model:
                        return m, gf
        return candidates[0]

    def _zoiper(self, request: Request) -> ZoiperRoute:
        z = self.zoiper
        version = _first(request.query, z.version_params)
        login = _first(request.query, z.user_params)
        password = _first(request.query, z.password_params)
        if login is not None or password is not None:
            return ZoiperRoute(login, password, version, "query")
        credentials = basic_credentials(request.authorization) if request.authorization else None
        if credentials is not None:
            return ZoiperRoute(credentials[0], credentials[1], version, "basic")
        return ZoiperRoute(None, None, version, "none")
