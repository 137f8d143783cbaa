"""The provisioning pipeline shared by HTTP, HTTPS, TFTP and ``zprovd render``.

``Provisioner.handle(request)`` routes the request, identifies the device or
user (backend look-ups, off the reactor), records what it learned (a phone
seen, a file fetched), renders the template and returns a ``Response``.  The
protocol layers only turn the Response into bytes on their wire.

A document rendered once is kept (``zprovd.documentcache``) while the
backend and the templates are unchanged: a phone fetching its file again,
or a Zoiper logging in again with a password that already verified, is
answered at once, with the same access checks, without a look-up or a
render.  ``answer(request)`` then returns the Response itself instead of a
Deferred, which saves the HTTP layer the Deferred machinery.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote, unquote

from twisted.internet.defer import CancelledError, Deferred, inlineCallbacks, maybeDeferred
from twisted.python.failure import Failure
from twisted.logger import Logger

from zprovd import passwords
from zprovd.backends import Backend, Device, Fetch, SeenDevice, User
from zprovd.catalogue import Catalogue
from zprovd.config import Config
from zprovd.context import RequestInfo, device_context, generic_context, zoiper_context
from zprovd.documentcache import Document, DocumentCache
from zprovd.firmware import FirmwareFolder
from zprovd.metrics import Metrics
from zprovd.policy import DEVICE_URL_KEY, Policy, Refusal
from zprovd.renderer import Dependencies, Renderer, RenderError
from zprovd.routing import (
    BadRequest,
    FirmwareRoute,
    GenericRoute,
    NotFound,
    PerMacRoute,
    Request,
    Router,
    ZoiperRoute,
    split_path,
)
from zprovd.sipvars import LineError
from zprovd.throttle import FailureLimiter, KeyedGate
from zprovd.uploads import upload_name

log = Logger(namespace="zprovd.provisioning")

XML = "application/xml; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
ERROR_TEMPLATE = "zoiper/error.xml.j2"
VERSIONS_FILE = "zoiper/versions.toml"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    file: Path | None = None
    """Firmware: stream this file instead of ``body``."""
    headers: tuple[tuple[str, str], ...] = ()
    who: str = "-"
    """For the audit log: the MAC or login the request was about."""
    reason: str = ""
    """For the audit log: why it was refused, or what was served."""


@dataclass(frozen=True)
class Upload:
    """A PUT to take: store its body as ``name`` in the upload folder."""

    name: str
    mac: str


def hide_segments(path: str, hidden: set[str] | frozenset[str], percent_encoded: bool) -> str:
    """The requested path as the access line shows it: every segment that is
    one of ``hidden`` (URL keys) written ``***``.

    Segments are found as the router finds them (``routing.split_path``):
    after percent-decoding, split on ``/`` and ``\\``, and also on white
    space and control characters, so that a key followed by one (a path the
    router refuses, a mistyped base URL) is hidden too; an HTTP query is
    kept as it is (``web.redact_uri`` hides its secret values).
    """
    base, sep, query = path.partition("?") if percent_encoded else (path, "", "")
    decoded = unquote(base, errors="replace") if percent_encoded else base
    parts = _SEPARATORS.split(decoded)
    if hidden.isdisjoint(parts):
        return path
    shown = "".join("***" if part in hidden else part for part in parts)
    if percent_encoded:
        shown = quote(shown, safe="/\\@.:-_+*~!$&'(),;=")
    return shown + sep + query


_SEPARATORS = re.compile(r"([/\\\s\x00-\x1f\x7f])")


def _text(status: int, message: str, **kw: Any) -> Response:
    return Response(status, (message + "\n").encode(), TEXT, **kw)


def _parse_version(text: str) -> tuple[int, ...] | None:
    try:
        parts = tuple(int(p) for p in text.strip().split("."))
    except ValueError:
        return None
    return parts if parts else None


_NEVER = object()

FETCH_RESOLUTION = 60.0
"""Seconds within which a repeated identical fetch is not recorded again.

A phone's last fetch is shown to the minute at worst, and a daemon under
repeated fetching (a phone in a retry loop, a load test) records at most one
fetch per phone per minute: each record lives until the next write, long
enough to be promoted to the cycle collector's old generation, and at 10 s
the bench's 18,000 requests/s brought a 100-160 ms full pass every 8 s."""
RECORDED_FETCHES = 200_000

LOOKUPS_PER_CLIENT = 4
"""Per-MAC look-ups (not answered from the document cache) one client address
has running at once; the others wait (``throttle.KeyedGate``).  Requests
sent all at once then meet the scan detector as requests in a row would: a
burst of unknown MACs is refused after ``[access.scan] max_misses`` plus a
few, not answered in full."""
LOOKUPS_WAITING_PER_CLIENT = 65_536
"""Look-ups that may wait per client address; more get 503.  As many as the
daemon's descriptors (each waiting request holds a connection or a TFTP
request slot): a site of thousands of phones behind one NAT address that
boot together all wait their turn (the bench's boot storm of 2,000 phones
from one address got 503 for a third of them at 1,000)."""

GROUPS = {ZoiperRoute: "zoiper", GenericRoute: "generic", PerMacRoute: "per_mac", FirmwareRoute: "firmware"}


class ZoiperDocuments:
    """Which template answers which Zoiper version (``zoiper/versions.toml``)."""

    def __init__(self, renderer: Renderer):
        source = renderer.source_of(VERSIONS_FILE)
        if source is None:
            raise RenderError(VERSIONS_FILE, "not found")
        try:
            data = tomllib.loads(source.read_text("utf-8"))
            rows = [(str(d["min_version"]), str(d["template"])) for d in data["document"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RenderError(VERSIONS_FILE, f"{source}: {exc}") from None
        documents = []
        for version, template in rows:
            parsed = _parse_version(version)
            if parsed is None:
                raise RenderError(VERSIONS_FILE, f"{source}: {version!r} is not a version like 1.14")
            documents.append((parsed, template))
        if not documents:
            raise RenderError(VERSIONS_FILE, f"{source}: no [[document]]")
        self.documents = sorted(documents)
        self.source = source

    def template_for(self, version: str | None) -> str:
        """The highest document whose min_version <= version; the newest otherwise."""
        wanted = _parse_version(version) if version else None
        if wanted is not None:
            fitting = [t for v, t in self.documents if v <= wanted]
            if fitting:
                return fitting[-1]
        return self.documents[-1][1]

    def templates(self) -> list[str]:
        return [t for _, t in self.documents]


class Provisioner:
    def __init__(
        self,
        config: Config,
        catalogue: Catalogue,
        renderer: Renderer,
        backend: Backend,
        run_blocking: Callable[..., Deferred],
        clock: Callable[[], float] = time.time,
        metrics: Metrics | None = None,
    ):
        self.config = config
        self.catalogue = catalogue
        self.renderer = renderer
        self.backend = backend
        self.run_blocking = run_blocking
        self.clock = clock
        self.metrics = metrics
        fw_dir = config.tftp.firmware_dir
        self.firmware = FirmwareFolder(fw_dir) if fw_dir else None
        self.router = Router(catalogue, config.zoiper, self.firmware.lookup if self.firmware else None)
        self.zoiper_documents = ZoiperDocuments(renderer)
        z = config.zoiper
        self.limiter = FailureLimiter(z.max_failures, z.failure_window, z.lockout)
        self.lookups = KeyedGate(LOOKUPS_PER_CLIENT, LOOKUPS_WAITING_PER_CLIENT)
        self.zoiper_checks = KeyedGate(LOOKUPS_PER_CLIENT, LOOKUPS_WAITING_PER_CLIENT)
        self._dummy_hash = passwords.hash_password(os.urandom(16).hex())
        self.policy = Policy(config.access)
        self._unique = itertools.count()
        self.documents = DocumentCache(renderer.is_current)
        self._recorded: dict[str, tuple[float, str, str]] = {}
        self.secret_params = frozenset(p.lower() for p in config.zoiper.password_params)
        """Query parameters whose values the access log hides (besides the secret-looking ones)."""
        self.secret_segments: set[str] = set(self.policy.install_url_key)
        """Path segments the access log hides (``hide_segments``): the install's
        URL key and every device's own key (a phone may fetch its generic
        files under its key too).  Device keys are asked of the backend
        before the first request is answered and again when its generation
        moves (``_learn_url_keys``); a backend that cannot list them has each
        one learnt at its device's first per-MAC look-up."""
        self._generation: Callable[[], Any] = getattr(backend, "generation", None) or (lambda: None)
        self._device_var_values: Callable[[str], Deferred] | None = getattr(backend, "device_var_values", None)
        self._keys_generation: Any = _NEVER  # the generation whose device keys were asked for
        self._keys_waiting: list[Deferred] | None = None  # requests waiting for the keys being asked for

    # ------------------------------------------------------------------

    def handle(self, request: Request) -> Deferred:
        """Answer one request; the Deferred fires with a Response, never fails."""
        answer = self.answer(request)
        return _done(answer) if isinstance(answer, Response) else answer

    def answer(self, request: Request) -> Response | Deferred:
        """Answer one request: the Response when it is known at once, else a
        Deferred that fires with it.  Never raises, never fails."""
        return self._guarded(self._answer, request)

    def _guarded(self, function: Callable[[Request], Any], request: Request) -> Any:
        """``function(request)``, with an exception or a failed Deferred
        turned into a 500 (logged): the protocol layers never see one, except
        the cancellation of a Deferred they cancelled themselves."""
        try:
            answer = function(request)
        except Exception:
            return self._unexpected(Failure(), request)
        if isinstance(answer, Deferred):
            answer.addErrback(self._unexpected, request)
        return answer

    def _answer(self, request: Request) -> Response | Deferred:
        if self._device_var_values is not None:
            learning = self._learn_url_keys()
            if learning is not None:  # the first request, or the first since a change
                return learning.addCallback(lambda _: self._answer_known(request))
        return self._answer_known(request)

    def _learn_url_keys(self) -> Deferred | None:
        """A Deferred while the device URL keys are asked for, None when they
        are known.  The request waits, so that its log line already hides a
        key it may hold; it happens once at start and once after each change
        of the backend's generation.  Keys are only ever added (one removed
        from its device stays hidden); a failed look-up is not retried until
        the generation moves (per-MAC look-ups still learn their device's)."""
        if self._keys_waiting is None:
            generation = self._generation()
            if generation == self._keys_generation:  # None (cannot tell) right after a change, then the new value
                return None
            self._keys_generation = generation
            self._keys_waiting = []
            asked = maybeDeferred(self._device_var_values, DEVICE_URL_KEY)  # type: ignore[arg-type]
            asked.addCallbacks(self._keys_learnt, self._keys_failed)
            if self._keys_waiting is None:  # known at once
                return None
        waiter: Deferred = Deferred()
        self._keys_waiting.append(waiter)
        return waiter

    def _keys_learnt(self, keys: set[str] | None) -> None:
        self.secret_segments.update(keys or ())
        waiting, self._keys_waiting = self._keys_waiting or [], None
        for waiter in waiting:
            waiter.callback(None)

    def _keys_failed(self, failure: Failure) -> None:
        log.warn("cannot list the device URL keys (each is learnt at its device's first request): {error}",
                 error=failure.getErrorMessage())
        self._keys_learnt(None)

    def _answer_known(self, request: Request) -> Response | Deferred:
        route = self.router.route(request)
        # Zoiper shows the text of an <error> document; anything else gets plain text.
        zoiper = isinstance(route, ZoiperRoute)
        if self.policy.scans.banned_for(request.client, self.clock()) > 0:
            if zoiper:
                return self.zoiper_error(403, "Too many failed attempts. Please try again later.", route.login or "-",
                                         "scanning")
            return _text(403, "Forbidden", reason="scanning")
        if isinstance(route, BadRequest):
            return _text(400, "Bad request", reason=route.reason)
        if isinstance(route, NotFound):
            return _text(404, "Not found", reason="no such file")
        refusal = self.policy.address_refusal(GROUPS[type(route)], request.protocol, request.client)
        if refusal is not None:
            who = route.mac if isinstance(route, PerMacRoute) else getattr(route, "login", None) or "-"
            refused = self._refuse(refusal, request, who, "")
            if zoiper:
                return self.zoiper_error(refused.status, "Provisioning is not available from this network.", who,
                                         refused.reason)
            return refused
        if isinstance(route, PerMacRoute):
            return self._per_mac(route, request)
        if isinstance(route, ZoiperRoute):
            return self._zoiper(route, request)
        if isinstance(route, GenericRoute):
            return self._generic(route, request)
        if isinstance(route, FirmwareRoute):
            assert self.firmware is not None
            return Response(200, file=self.firmware.path(route.name), content_type="application/octet-stream", reason="firmware")
        raise AssertionError(route)  # pragma: no cover - the union is exhaustive

    def _miss(self, client: str, key: str) -> None:
        """A miss towards scan detection (an unknown MAC, failed credentials)."""
        if self.policy.scans.miss(client, key, self.clock()):
            scan = self.config.access.scan
            log.warn(
                "refusing {client} for {ban} s: {count} unknown MACs or failed logins within {window} s (scanning)",
                client=client, ban=scan.ban, count=scan.max_misses, window=scan.window,
            )

    def _refuse(self, refusal: Refusal, request: Request, who: str, key: str) -> Response:
        if refusal.miss:
            self._miss(request.client, key or f"refusal:{next(self._unique)}")
        text = {401: "Unauthorized", 403: "Forbidden", 404: "Not found"}.get(refusal.status, "Refused")
        return _text(refusal.status, text, who=who, reason=refusal.reason, headers=tuple(refusal.headers))

    # -- uploads ----------------------------------------------------------

    def upload(self, request: Request) -> Response | Upload | Deferred:
        """May this PUT store its body?  An ``Upload`` (now or from the
        Deferred) if so, else the refusal to send.  Only Polycom logs
        (``upload_name``) of a known phone are taken, with the access its
        per-MAC files have: addresses, URL keys, HTTP credentials, client
        certificate.  Never raises, never fails."""
        return self._guarded(self._upload, request)

    def _upload(self, request: Request) -> Response | Upload | Deferred:
        if self.config.tftp.upload_dir is None:
            return _text(405, "Method not allowed", headers=(("Allow", "GET, HEAD"),), reason="uploads are off")
        if self.policy.scans.banned_for(request.client, self.clock()) > 0:
            return _text(403, "Forbidden", reason="scanning")
        segments = split_path(request.path, percent_encoded=request.protocol != "tftp")
        if isinstance(segments, BadRequest):
            return _text(400, "Bad request", reason=segments.reason)
        name = upload_name(segments[-1]) if segments else None
        if name is None:
            return _text(403, "Forbidden", reason="not a log upload")
        mac = name[:12]
        route = PerMacRoute(name, mac, (), tuple(segments[:-1]))
        policy = self.policy
        refusal = policy.address_refusal(GROUPS[PerMacRoute], request.protocol, request.client)
        if refusal is None and not policy.per_mac_open:
            refusal = policy.url_key_refusal(route.prefix, None)
        if refusal is not None:
            return self._refuse(refusal, request, mac, "key:" + mac)
        return self._lookup("get_device", mac).addCallbacks(self._upload_by, self._upload_lookup_failed,
                                                            (route, request), None, (mac,))

    def _upload_lookup_failed(self, failure: Failure, mac: str) -> Response:
        log.error("backend failed looking up {mac}: {error}", mac=mac, error=failure.getErrorMessage())
        return _text(503, "Service unavailable", who=mac, reason="backend unavailable")

    def _upload_by(self, device: Device | None, route: PerMacRoute, request: Request) -> Response | Upload:
        if device is None:
            self._miss(request.client, "mac:" + route.mac)
            # Challenged like a known phone when credentials are required (as
            # for per-MAC files): a scanner cannot tell which MACs exist.
            refusal = self.policy.auth_refusal(request.protocol, request.method, request.authorization, None,
                                               self.clock())
            if refusal is not None and not refusal.miss:
                return self._refuse(refusal, request, route.mac, "")
            return _text(404, "Not found", who=route.mac, reason="unknown MAC")
        self.secret_segments.update(self.policy.device_url_key(device))
        refused = self._device_refusal(route, request, device, self.clock())
        return refused if refused is not None else Upload(route.name, route.mac)

    def _unexpected(self, failure, request: Request) -> Response | Failure:
        if failure.check(CancelledError):  # the caller gave up (a TFTP server stopping): nothing to answer
            return failure
        log.failure("unexpected error answering {protocol} request", failure, protocol=request.protocol)
        return _text(500, "Internal error", reason="internal error")

    # -- desk phones ----------------------------------------------------

    def _generic(self, route: GenericRoute, request: Request) -> Response:
        who = route.model.id
        key = (route.name, who)
        document = self.documents.get(key, _NO_RECORDS, _info_key(request))
        if document is not None:
            return document.response
        ctx = generic_context(self.config.provisioning, route.model, route.name, _info(request))
        response, templates = self._render(route.file.template, ctx, who=who, reason=f"generic {who}")
        if response.status == 200:
            self._keep(key, request, Document(_NO_RECORDS, templates, None, response))
        return response

    def _keep(self, key: Any, request: Request, document: Document) -> None:
        """Cache a document: for every request, unless its templates read the request."""
        reads = self.renderer.reads_request(document.templates)
        self.documents.put(key, document, _info_key(request) if reads else None)

    def _timed_render(self, kind: str, template: str, ctx: dict[str, Any]) -> tuple[bytes, Dependencies]:
        started = time.perf_counter()
        rendered = self.renderer.render_tracked(template, ctx)
        if self.metrics is not None:
            self.metrics.render_seconds.labels(kind).observe(time.perf_counter() - started)
        return rendered

    def _render(self, template: str, ctx: dict[str, Any], who: str, reason: str) -> tuple[Response, Dependencies]:
        try:
            body, templates = self._timed_render("desk", template, ctx)
        except RenderError as exc:
            log.error("cannot render {template} for {who}: {reason}", template=exc.template, who=who, reason=exc.reason)
            return _text(500, "Internal error", who=who, reason="template error"), ()
        content_type = XML if self.renderer.is_xml(template) else TEXT
        return Response(200, body, content_type, who=who, reason=reason), templates

    def _per_mac(self, route: PerMacRoute, request: Request) -> Response | Deferred:
        mac = route.mac
        policy = self.policy
        if not policy.per_mac_open:
            refusal = policy.url_key_refusal(route.prefix, None)
            if refusal is not None:
                return self._refuse(refusal, request, mac, "key:" + mac)
        key = (route.name, mac)
        generation = self._generation()
        document = self.documents.get(key, generation, _info_key(request))
        if document is None:
            # One client's look-ups run a few at a time, so that the scan
            # detector has counted the unknown MACs of earlier ones.
            lookup = self.lookups.run(request.client, lambda: self._gated_lookup(route, request, key, generation))
            if lookup is None:
                return _text(503, "Service unavailable", who=mac, reason="too many requests at once")
            return lookup
        device = document.record
        if not policy.device_is_open(device):
            refusal = self._device_refusal(route, request, device, self.clock())
            if refusal is not None:
                return refusal
        return self._deliver(route, request, device.mac, document.response)

    def _gated_lookup(self, route: PerMacRoute, request: Request, key: Any, generation: Any) -> Response | Deferred:
        if self.policy.scans.banned_for(request.client, self.clock()) > 0:  # banned while it waited
            return _text(403, "Forbidden", reason="scanning")
        return self._per_mac_lookup(route, request, _info(request), key, generation)

    def _device_refusal(self, route: PerMacRoute, request: Request, device: Device, now: float) -> Response | None:
        policy = self.policy
        refusal = (
            policy.url_key_refusal(route.prefix, device)
            or policy.auth_refusal(request.protocol, request.method, request.authorization, device, now)
            or policy.certificate_refusal(request.protocol, route.mac, request.certificate_macs)
        )
        if refusal is None:
            return None
        if refusal.status != 401 or refusal.miss:
            log.warn("refused {file} to {client}: {reason}", file=route.name, client=request.client, reason=refusal.reason)
        return self._refuse(refusal, request, route.mac, "")

    def _deliver(self, route: PerMacRoute, request: Request, mac: str, response: Response) -> Response:
        """Record the fetch (like relatime: a repeat of the same file to the
        same address within FETCH_RESOLUTION seconds is not written again)."""
        now = self.clock()
        last = self._recorded.get(mac)
        if last is None or now - last[0] >= FETCH_RESOLUTION or last[1] != request.client or last[2] != route.name:
            if len(self._recorded) >= RECORDED_FETCHES:
                self._recorded.clear()
            self._recorded[mac] = (now, request.client, route.name)
            self._background(self.backend.record_fetch(mac, Fetch(now, request.client, route.name)), "recording a fetch")
        return response

    @inlineCallbacks
    def _per_mac_lookup(self, route: PerMacRoute, request: Request, info: RequestInfo, key: Any, generation: Any):
        mac = route.mac
        policy = self.policy
        try:
            device = yield self._lookup("get_device", mac)
        except Exception as exc:
            log.error("backend failed looking up {mac}: {error}", mac=mac, error=exc)
            return _text(503, "Service unavailable", who=mac, reason="backend unavailable")
        now = self.clock()
        if device is None:
            guess = self.catalogue.guess_model(route.name, request.user_agent, mac)
            seen = SeenDevice(mac, guess, request.client, route.name, request.user_agent, now, now, 1)
            self._background(self.backend.record_seen(seen), "recording unknown phone")
            log.info(
                "unknown phone {mac} ({guess}) from {client} asked {file}; `zprovd device add` assigns it",
                mac=mac, guess=guess, client=request.client, file=route.name,
            )
            self._miss(request.client, "mac:" + mac)
            # With credentials required, an unknown MAC is challenged like a
            # known one: a scanner cannot tell which MACs exist.
            refusal = policy.auth_refusal(request.protocol, request.method, request.authorization, None, now)
            if refusal is not None and not refusal.miss:
                return self._refuse(refusal, request, mac, "")
            return _text(404, "Not found", who=mac, reason="unknown MAC")
        self.secret_segments.update(policy.device_url_key(device))
        refused = self._device_refusal(route, request, device, now)
        if refused is not None:
            return refused
        model = self.catalogue.get(device.model)
        if model is None:
            log.warn("device {mac} has model {model}, which is not in the catalogue", mac=mac, model=device.model)
            return _text(404, "Not found", who=mac, reason="unknown model")
        pm = route.file_for(model.id)
        if pm is None:
            log.info(
                "device {mac} is a {model}, whose files are not named like {file}",
                mac=mac, model=model.id, file=route.name,
            )
            return _text(404, "Not found", who=mac, reason="model mismatch")
        try:
            users = yield self._users_of(device)
        except Exception as exc:
            log.error("backend failed looking up the users of {mac}: {error}", mac=mac, error=exc)
            return _text(503, "Service unavailable", who=mac, reason="backend unavailable")
        if not users:
            log.warn("device {mac} ({model}) has no user: nothing to provision", mac=mac, model=model.id)
            return _text(404, "Not found", who=mac, reason="no user assigned")
        try:
            ctx = device_context(self.config.provisioning, model, device, users, route.name, info)
        except LineError as exc:
            log.error("cannot provision {mac}: {error}", mac=mac, error=exc)
            return _text(500, "Internal error", who=mac, reason="bad line variables")
        response, templates = self._render(pm.template, ctx, who=mac, reason=f"per-MAC {model.id}")
        if response.status != 200:
            return response
        self._keep(key, request, Document(generation, templates, device, response))
        return self._deliver(route, request, mac, response)

    @inlineCallbacks
    def _users_of(self, device: Device):
        users = []
        for login in device.users:
            user = yield self._lookup("get_user", login)
            if user is not None:
                users.append(user)
        return users

    def _lookup(self, operation: str, key: str) -> Deferred:
        d = getattr(self.backend, operation)(key)
        if self.metrics is not None:
            d = self.metrics.timed_lookup(d, operation, time.perf_counter(), time.perf_counter)
        return d

    def _background(self, d: Deferred, what: str) -> None:
        d.addErrback(lambda f: log.warn("{what} failed: {error}", what=what, error=f.getErrorMessage()))

    # -- Zoiper ----------------------------------------------------------

    def zoiper_error(self, status: int, text: str, who: str, reason: str) -> Response:
        try:
            body = self.renderer.render(ERROR_TEMPLATE, {"text": text})
        except RenderError as exc:
            log.error("cannot render {template}: {reason}", template=exc.template, reason=exc.reason)
            body = b'<?xml version="1.0"?>\n<error code="1">Provisioning failed.</error>\n'
        return Response(status, body, XML, who=who, reason=reason)

    def _zoiper(self, route: ZoiperRoute, request: Request) -> Response | Deferred:
        z = self.config.zoiper
        if route.login is None or route.password is None or not route.login:
            response = self.zoiper_error(z.error_status if route.via == "query" else 401, z.error_text, "-", "missing credentials")
            if route.via != "query":
                response.headers += (("WWW-Authenticate", 'Basic realm="zprovd"'),)
            return response
        login = route.login
        now = self.clock()
        blocked = max(self.limiter.blocked_for("addr:" + request.client, now), self.limiter.blocked_for("login:" + login, now))
        if blocked > 0:
            log.warn("refused login {login} from {client}: too many failures", login=login, client=request.client)
            response = self.zoiper_error(429, "Too many failed attempts. Please try again later.", login, "locked out")
            response.headers += (("Retry-After", str(int(blocked) + 1)),)
            return response
        key = ("zoiper", login, route.version)
        generation = self._generation()
        document = self.documents.get(key, generation, _info_key(request))
        if document is not None and passwords.known_good(document.record.password_hash, route.password):
            # a reprovisioning Zoiper whose password verified before
            self.limiter.success("login:" + login)
            return document.response
        # Guesses sent at once must count as guesses in a row.  Against one
        # login, each reserves its place before its check (at most
        # max_failures at a time); from one address, checks run a few at a
        # time and each first looks at the failures counted so far, so that
        # many users behind one NAT address logging in together all wait
        # their turn instead of being refused.
        if not self.limiter.admit("login:" + login, now):
            return self._guesses_at_once(login, request.client)
        check = self.zoiper_checks.run(request.client, lambda: self._zoiper_turn(route, request, key, generation))
        if check is None:
            self.limiter.release("login:" + login)
            return self._guesses_at_once(login, request.client)
        return check

    def _guesses_at_once(self, login: str, client: str) -> Response:
        log.warn("refused login {login} from {client}: too many failures or guesses at once", login=login, client=client)
        response = self.zoiper_error(429, "Too many failed attempts. Please try again later.", login, "locked out")
        response.headers += (("Retry-After", "1"),)
        return response

    def _zoiper_turn(self, route: ZoiperRoute, request: Request, key: Any, generation: Any) -> Response | Deferred:
        """A check's turn through ``zoiper_checks``: the address may have been locked out while it waited."""
        if self.limiter.blocked_for("addr:" + request.client, self.clock()) > 0:
            self.limiter.release("login:" + route.login)
            return self._guesses_at_once(route.login, request.client)
        return self._zoiper_lookup(route, request, _info(request), key, generation)

    @inlineCallbacks
    def _zoiper_lookup(self, route: ZoiperRoute, request: Request, info: RequestInfo, key: Any, generation: Any):
        """Check the admitted guess (``FailureLimiter.admit`` of its login) and answer it."""
        z = self.config.zoiper
        login = route.login
        addr, account = "addr:" + request.client, "login:" + login
        now = self.clock()
        try:
            user = yield self._lookup("get_user", login)
            # An unknown login costs the same hashing work as a known one.
            stored = user.password_hash if user is not None else self._dummy_hash
            if user is not None and passwords.known_good(stored, route.password):
                ok = True  # a reprovisioning phone: verified before, no hashing again
            else:
                ok = yield self.run_blocking(passwords.verify_password, stored, route.password)
        except BaseException as exc:
            self.limiter.release(account)
            if not isinstance(exc, Exception):  # cancelled, or stopping
                raise
            log.error("backend failed looking up {login}: {error}", login=login, error=exc)
            return self.zoiper_error(503, z.unavailable_text, login, "backend unavailable")
        if user is None or not ok:
            self.limiter.failure(addr, now)
            self.limiter.failure(account, now)
            self._miss(request.client, f"login:{next(self._unique)}")
            log.warn(
                "failed login {login} from {client} ({why})",
                login=login, client=request.client, why="unknown user" if user is None else "wrong password",
            )
            return self.zoiper_error(z.error_status, z.error_text, login, "unknown user" if user is None else "wrong password")
        self.limiter.success(account)
        response, templates = self._render_zoiper(user, route.version, info)
        if response.status == 200:
            self._keep(key, request, Document(generation, templates, user, response))
        return response

    def render_zoiper(self, user: User, version: str | None, info: RequestInfo) -> Response:
        return self._render_zoiper(user, version, info)[0]

    def _render_zoiper(self, user: User, version: str | None, info: RequestInfo) -> tuple[Response, Dependencies]:
        template = self.zoiper_documents.template_for(version)
        try:
            ctx = zoiper_context(self.config.provisioning, user, version or "", info)
            body, templates = self._timed_render("zoiper", template, ctx)
        except LineError as exc:
            log.error("cannot provision user {login}: {error}", login=user.login, error=exc)
            error = self.zoiper_error(500, "Provisioning failed: server configuration error.", user.login, "bad line variables")
            return error, ()
        except RenderError as exc:
            log.error("cannot render {template} for user {login}: {reason}", template=exc.template, login=user.login,
                      reason=exc.reason)
            error = self.zoiper_error(500, "Provisioning failed: server configuration error.", user.login, "template error")
            return error, ()
        return Response(200, body, XML, who=user.login, reason=f"zoiper {template}"), templates


def _info_key(request: Request) -> tuple[str, str, str, str]:
    """What of the request a template may see (``RequestInfo``), as a cache key."""
    return (request.protocol, request.host, request.client, request.user_agent)


def _info(request: Request) -> RequestInfo:
    return RequestInfo(request.protocol, request.host, request.client, request.user_agent)


_NO_RECORDS = "-"
"""The generation of documents that no backend record went into (generic files)."""


def _done(response: Response) -> Deferred:
    d: Deferred = Deferred()
    d.callback(response)
    return d
