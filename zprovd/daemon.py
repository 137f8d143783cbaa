"""The daemon: one MultiService of one service per protocol, and its life.

``start()`` opens the backend, loads and checks the catalogue and every
template, binds every listener, drops privileges and tells systemd it is
ready; its Deferred fails with ``StartupError`` (one line an operator can
act on) if any of that is impossible.

``reload()`` (SIGHUP) does the same with the configuration file as it is
now, and swaps it in only if all of it works: a broken config or template
is logged and the running one stays.  Listeners whose address did not
change keep their sockets; requests and transfers in flight finish with the
configuration they started with.

``stop()`` (SIGTERM/SIGINT) stops accepting, lets requests and TFTP
transfers in flight finish within ``[server] shutdown_timeout``, then
releases everything.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer, task
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import LogLevel, Logger
from twisted.python.threadpool import ThreadPool

from zprovd import logs, tls
from zprovd.backends import BackendContext, BackendError, create_backend
from zprovd.catalogue import Catalogue, load_catalogue
from zprovd.config import Config, ConfigError, Listen, load_config
from zprovd.listeners import ListenError, SwappableTLS, TCPListeners, describe
from zprovd.metrics import Metrics, MetricsSite, metrics_site_root
from zprovd.privileges import PrivilegeError, drop_privileges
from zprovd.provisioning import ERROR_TEMPLATE, Provisioner, ZoiperDocuments
from zprovd.renderer import Renderer, RenderError
from zprovd.sdnotify import Notifier
from zprovd.web import HTTPFactory, InFlight

log = Logger(namespace="zprovd.daemon")

# Connections the kernel completes and queues for an HTTP(S) listener before
# zprovd accepts them (capped by net.core.somaxconn).  Twisted's default is 50:
# when phones reboot together (a power cut, a firmware push) the handshakes
# beyond it are dropped and the phones retry after 0.2 to 1 s, several times
# over.  With 512 clients connecting at once that was a p99 of 0.3-1.9 s.
LISTEN_BACKLOG = 1024


class StartupError(Exception):
    """The daemon cannot start (or reload); the message is one line for the operator."""


@dataclass(frozen=True)
class Bound:
    protocol: str
    host: str
    port: int

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}://{host}:{self.port}/"


def check_templates(catalogue: Catalogue, renderer: Renderer) -> list[str]:
    """Compile every template the catalogue and the Zoiper documents use."""
    names = {f.template for m in catalogue.models.values() for f in [*m.generic, *m.per_mac]}
    try:
        names |= set(ZoiperDocuments(renderer).templates()) | {ERROR_TEMPLATE}
    except RenderError as exc:
        return [str(exc)]
    return [p for p in (renderer.check(n) for n in sorted(names)) if p]


def build_components(config: Config, run_blocking, call_later=None) -> tuple[Any, Catalogue, Renderer]:
    """The backend (not yet opened), catalogue and renderer a config describes."""
    context = BackendContext(
        config.state_dir, config.path.resolve().parent, run_blocking, config.provisioning.server, call_later,
    )
    try:
        backend = create_backend(config.backend.type, config.backend.options, context)
    except BackendError as exc:
        raise StartupError(f"{config.path}: [backend] {exc}") from None
    renderer = Renderer(config.templates.dirs, keep_last_good=True)
    catalogue = load_catalogue(renderer.dirs)
    if catalogue.problems:
        raise StartupError("model catalogue: " + "; ".join(catalogue.problems))
    return backend, catalogue, renderer


OPEN_FILES_WANTED = 65536
"""Descriptors the daemon asks for: each TFTP transfer and HTTP connection holds one."""


def raise_open_file_limit() -> None:
    """Raise the soft limit on open files towards the hard one.

    The usual soft limit (1,024) is below what TFTP transfers alone may hold
    (``max_transfers``, 4,096): when descriptors run out, new HTTP
    connections are refused too.  The hard limit (524,288 under systemd) is
    the process's to take; epoll has no use for the 1,024 of ``select``."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES_WANTED if hard == resource.RLIM_INFINITY else min(hard, OPEN_FILES_WANTED)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (OSError, ValueError) as exc:
            log.warn("cannot raise the open files limit from {soft}: {error}", soft=soft, error=exc)
            return
        log.info("open files limit raised from {soft} to {wanted}", soft=soft, wanted=wanted)


class Daemon(MultiService):
    def __init__(self, config: Config, reactor, notifier: Notifier | None = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.notifier = notifier or Notifier()
        self.pool = ThreadPool(minthreads=1, maxthreads=8, name="zprovd-blocking")
        self.metrics = Metrics()
        self.inflight = InFlight()
        self.provisioner: Provisioner | None = None
        self.backend: Any = None
        self.tls: SwappableTLS | None = None
        self.tftp: Any = None
        self.dhcp: Any = None
        self._watchdog: task.LoopingCall | None = None
        self.http = TCPListeners("http", self._bind_http)
        self.https = TCPListeners("https", self._bind_https)
        self.metrics_listeners = TCPListeners("metrics", self._bind_metrics)
        for service in (self.metrics_listeners, self.http, self.https):
            service.setServiceParent(self)
        self._sites = {
            protocol: HTTPFactory(self.current_provisioner, protocol, reactor, self.inflight, self.metrics)
            for protocol in ("http", "https")
        }
        self._metrics_site = MetricsSite(metrics_site_root(self.metrics, self._health), reactor)
        self.metrics.tftp_stats = self._tftp_stats
        self.metrics.dhcp_stats = self._dhcp_stats
        self.metrics.document_stats = self._document_stats

    # -- helpers ---------------------------------------------------------------

    def run_blocking(self, function, *args, **kwargs):
        return deferToThreadPool(self.reactor, self.pool, function, *args, **kwargs)

    def current_provisioner(self) -> Provisioner:
        assert self.provisioner is not None
        return self.provisioner

    def _tftp_stats(self) -> dict[str, int] | None:
        if self.tftp is None:
            return None
        return {"active": self.tftp.transfers_in_flight(), "retransmissions": self.tftp.retransmissions}

    def _dhcp_stats(self) -> dict[str, int] | None:
        return dict(self.dhcp.replies_by_type) if self.dhcp is not None else None

    def _document_stats(self) -> dict[str, int] | None:
        if self.provisioner is None:
            return None
        documents = self.provisioner.documents
        return {"hits": documents.hits, "misses": documents.misses, "bytes": documents.size}

    def _health(self):
        return self.current_provisioner().backend.get_user("zprovd-health-check")

    def _bind_http(self, listen: Listen):
        return self.reactor.listenTCP(listen.port, self._sites["http"], backlog=LISTEN_BACKLOG, interface=listen.host)

    def _bind_https(self, listen: Listen):
        return self.reactor.listenSSL(listen.port, self._sites["https"], self.tls, backlog=LISTEN_BACKLOG, interface=listen.host)

    def _bind_metrics(self, listen: Listen):
        return self.reactor.listenTCP(listen.port, self._metrics_site, interface=listen.host)

    @property
    def bound(self) -> list[Bound]:
        result = []
        for name, service in (("http", self.http), ("https", self.https), ("metrics", self.metrics_listeners)):
            result += [Bound(name, host, port) for host, port in service.bound()]
        if self.tftp is not None:
            result += [Bound("tftp", host, port) for host, port in self.tftp.listening_ports()]
        return result

    # -- building a configuration -------------------------------------------------

    @defer.inlineCallbacks
    def _prepare(self, config: Config):
        """Backend (reused when its settings did not change), catalogue, renderer,
        provisioner and TLS options for ``config``; StartupError if any fails."""
        reuse = self.backend is not None and config.backend == self.config.backend
        if reuse:
            backend = self.backend
            _, catalogue, renderer = build_components(config, self.run_blocking, self.reactor.callLater)
        else:
            backend, catalogue, renderer = build_components(config, self.run_blocking, self.reactor.callLater)
            try:
                yield backend.open()
            except BackendError as exc:
                raise StartupError(f"backend {config.backend.type}: {exc}")
        try:
            try:
                provisioner = Provisioner(
                    config, catalogue, renderer, backend, self.run_blocking, self.reactor.seconds, self.metrics
                )
            except RenderError as exc:
                raise StartupError(str(exc)) from None
            problems = check_templates(catalogue, renderer)
            if problems:
                raise StartupError("; ".join(problems))
            tls_options = self._tls_options(config) if config.https.listen else None
        except StartupError:
            if not reuse:
                yield backend.close()
            raise
        return backend, provisioner, tls_options

    def _tls_options(self, config: Config):
        cfg = config.https
        if cfg.certificate and cfg.private_key:
            paths = tls.CertificatePaths(cfg.certificate, cfg.private_key)
        else:
            try:
                paths = tls.ensure_self_signed(config.state_dir, config.provisioning.server)
            except OSError as exc:
                raise StartupError(f"cannot create a certificate in {config.state_dir}: {exc}") from None
            if not tls.names_server(paths, config.provisioning.server):
                # Made for an earlier [provisioning] server; a new one would break phones that trust it.
                log.warn("the self-signed certificate {path} does not name [provisioning] server {server}: "
                         "phones that check names will refuse it; remove {folder} and restart to make a new one",
                         path=str(paths.certificate), server=config.provisioning.server,
                         folder=str(paths.certificate.parent))
        try:
            return tls.server_context(paths, cfg.client_ca)
        except tls.TLSError as exc:
            raise StartupError(f"https: {exc}") from None

    def _tftp_settings(self, config: Config) -> tuple:
        t = config.tftp
        return (tuple(t.listen), t.max_blksize, t.max_windowsize, t.retries, t.upload_dir, t.upload_max_bytes)

    def _new_tftp(self, config: Config):
        from zprovd.tftp.service import TFTPServer
        from zprovd.tftpsource import ProvisioningSource

        t = config.tftp
        source = ProvisioningSource(self.current_provisioner, self.metrics)
        server = TFTPServer(
            [(l.host, l.port) for l in t.listen],
            source,
            reactor=self.reactor,
            max_blksize=t.max_blksize,
            max_windowsize=t.max_windowsize,
            retries=t.retries,
            upload_dir=t.upload_dir,
            upload_max_bytes=t.upload_max_bytes,
            max_transfers_per_client=t.max_transfers_per_client,
            shutdown_timeout=config.server.shutdown_timeout,
            shown_name=source.shown_name,
            accept_upload=source.accept_upload,
        )
        try:
            server.privilegedStartService()
        except CannotListenError as exc:
            raise StartupError(f"cannot listen for tftp on {exc.interface}:{exc.port}: {describe(exc)}") from None
        server.setName("tftp")
        return server

    def _new_dhcp(self, config: Config):
        from zprovd.dhcp.service import DHCPService

        service = DHCPService(config.extra["dhcp"], config.state_dir, reactor=self.reactor, run_blocking=self.run_blocking)
        service.setName("dhcp")
        return service

    @defer.inlineCallbacks
    def _apply_listeners(self, config: Config, old: Config | None):
        """Bind what changed; StartupError (and nothing changed) if a bind fails."""
        new_tftp = None
        if config.tftp.listen and (old is None or self._tftp_settings(config) != self._tftp_settings(old)):
            new_tftp = self._new_tftp(config)  # bound before anything else changes
        try:
            for service, addresses in (
                (self.http, config.http.listen),
                (self.https, config.https.listen),
                (self.metrics_listeners, config.metrics.listen),
            ):
                service.apply(addresses)
        except ListenError as exc:
            if new_tftp is not None:
                yield new_tftp.stopService()
            raise StartupError(str(exc)) from None
        if new_tftp is not None or not config.tftp.listen:
            if self.tftp is not None:
                old_tftp, self.tftp = self.tftp, None
                old_tftp.disownServiceParent()  # finishes its transfers in flight
            if new_tftp is not None:
                self.tftp = new_tftp
                new_tftp.setServiceParent(self)
        dhcp = config.extra.get("dhcp")
        dhcp_changed = old is None or old.extra.get("dhcp") != dhcp
        if dhcp_changed and self.dhcp is not None:
            old_dhcp, self.dhcp = self.dhcp, None
            yield old_dhcp.disownServiceParent()
        if dhcp_changed and dhcp is not None and dhcp.enabled:
            self.dhcp = self._new_dhcp(config)
            try:
                self.dhcp.setServiceParent(self)
            except Exception as exc:
                self.dhcp = None
                raise StartupError(f"dhcp: {exc}") from None

    def _status(self) -> str:
        serving = ", ".join(f"{b.protocol} {b.host}:{b.port}" for b in self.bound if b.protocol != "metrics")
        models = len(self.current_provisioner().catalogue.models)
        return f"serving {serving or 'nothing'}; {models} models; backend {self.config.backend.type}"

    # -- life ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def start(self):
        """Open everything and bind every listener; fails with StartupError."""
        config = self.config
        raise_open_file_limit()
        self.pool.start()
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create state_dir {config.state_dir}: {exc.strerror}")
        backend, provisioner, tls_options = yield self._prepare(config)
        self.backend, self.provisioner = backend, provisioner
        self.tls = SwappableTLS(tls_options)
        self.startService()
        yield self._apply_listeners(config, None)
        if config.server.user and os.getuid() == 0:
            try:
                drop_privileges(config.server.user, config.server.group, config.state_dir)
            except PrivilegeError as exc:
                raise StartupError(str(exc)) from None
            log.info("running as user {user}", user=config.server.user)
        for b in self.bound:
            log.info("listening on {url}", url=b.url())
        self.notifier.ready(self._status())
        if self.notifier.watchdog_interval:
            self._watchdog = task.LoopingCall(self.notifier.watchdog)
            self._watchdog.clock = self.reactor
            self._watchdog.start(self.notifier.watchdog_interval)

    @defer.inlineCallbacks
    def reload(self):
        """Re-read the configuration file; swap it in only if all of it works."""
        self.notifier.reloading()
        old = self.config
        try:
            config = load_config(old.path)
            if config.state_dir != old.state_dir:
                raise ConfigError([f"{old.path}: state_dir cannot change on reload; restart zprovd"])
            backend, provisioner, tls_options = yield self._prepare(config)
            yield self._apply_listeners(config, old)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running configuration: {problem}", problem=problem)
            self.notifier.status(self._status())
            return False
        except StartupError as exc:
            log.error("reload refused, keeping the running configuration: {problem}", problem=str(exc))
            self.notifier.status(self._status())
            return False
        # lock-outs and scan bans survive a reload
        provisioner.limiter = self.current_provisioner().limiter
        if config.access.scan == old.access.scan:
            provisioner.policy.scans = self.current_provisioner().policy.scans
        old_backend = self.backend
        self.config, self.backend, self.provisioner = config, backend, provisioner
        if config.log != old.log:
            logs.configure(config.log.format, LogLevel.levelWithName(config.log.level))
        if tls_options is not None:
            self.tls.options = tls_options
        if old_backend is not backend:
            # Requests in flight may still use it: close it once they are done.
            drained = self.inflight.drained()
            drained.addTimeout(config.server.shutdown_timeout, self.reactor, onTimeoutCancel=lambda *_: None)
            drained.addBoth(lambda _: old_backend.close())
        log.info("reloaded {path}", path=str(config.path))
        self.notifier.status(self._status())
        return True

    @defer.inlineCallbacks
    def stop(self):
        """Stop accepting, let work in flight finish, release everything."""
        if self.running:
            self.notifier.stopping()
            log.info("stopping")
            if self._watchdog is not None and self._watchdog.running:
                self._watchdog.stop()
            for service in (self.http, self.https, self.metrics_listeners):
                yield service.stopService()
            drained = self.inflight.drained()
            drained.addTimeout(self.config.server.shutdown_timeout, self.reactor)
            try:
                yield drained
            except defer.TimeoutError:
                log.warn("{count} HTTP requests still in flight at shutdown", count=self.inflight.count)
            yield self.stopService()  # TFTP lets its transfers finish, within the same bound
        if self.backend is not None:
            try:
                yield self.backend.close()
            except Exception as exc:  # closing must not hide the shutdown
                log.warn("closing the backend failed: {error}", error=exc)
            self.backend = None
        if self.pool.started:
            self.pool.stop()
