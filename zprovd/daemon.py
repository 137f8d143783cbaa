"""The daemon: one MultiService of one service per protocol.

``Daemon.start()`` opens the backend, loads the catalogue and templates and
binds every listener; its Deferred fails with ``StartupError`` (one line an
operator can act on) if any of that is impossible.  ``Daemon.stop()`` stops
accepting, lets requests in flight finish and releases everything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from zprovd import tls
from zprovd.backends import BackendContext, BackendError, create_backend
from zprovd.catalogue import load_catalogue
from zprovd.config import Config, Listen
from zprovd.provisioning import Provisioner
from zprovd.renderer import Renderer, RenderError
from zprovd.web import ProvisioningResource, Site

log = Logger(namespace="zprovd.daemon")


class StartupError(Exception):
    """The daemon cannot start; the message is one line for the operator."""


@dataclass(frozen=True)
class Bound:
    protocol: str
    host: str
    port: int

    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.protocol}://{host}:{self.port}/"


def _errno_text(exc: CannotListenError) -> str:
    socket_error = exc.socketError
    return getattr(socket_error, "strerror", None) or str(socket_error)


class ListeningService(Service):
    """Owns a set of listening ports; stopping it stops listening."""

    def __init__(self, name: str):
        self.setName(name)
        self.ports: list[Any] = []

    def stopService(self):
        super().stopService()
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)


def build_components(config: Config, run_blocking) -> tuple[Any, Any, Renderer]:
    """The backend (not yet opened), catalogue and renderer a config describes."""
    context = BackendContext(config.state_dir, config.path.resolve().parent, run_blocking, config.provisioning.server)
    try:
        backend = create_backend(config.backend.type, config.backend.options, context)
    except BackendError as exc:
        raise StartupError(f"{config.path}: [backend] {exc}") from None
    renderer = Renderer(config.templates.dirs)
    catalogue = load_catalogue(renderer.dirs)
    if catalogue.problems:
        raise StartupError("model catalogue: " + "; ".join(catalogue.problems))
    return backend, catalogue, renderer


class Daemon(MultiService):
    def __init__(self, config: Config, reactor):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=8, name="zprovd-blocking")
        self.provisioner: Provisioner | None = None
        self.backend = None
        self.bound: list[Bound] = []

    def run_blocking(self, function, *args, **kwargs):
        return deferToThreadPool(self.reactor, self.pool, function, *args, **kwargs)

    @defer.inlineCallbacks
    def start(self):
        """Open everything and bind every listener; fails with StartupError."""
        config = self.config
        self.pool.start()
        try:
            config.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(f"cannot create state_dir {config.state_dir}: {exc.strerror}")
        backend, catalogue, renderer = build_components(config, self.run_blocking)
        try:
            yield backend.open()
        except BackendError as exc:
            raise StartupError(f"backend {config.backend.type}: {exc}")
        self.backend = backend
        try:
            self.provisioner = Provisioner(config, catalogue, renderer, backend, self.run_blocking, self.reactor.seconds)
        except RenderError as exc:
            raise StartupError(str(exc))
        self._listen_http()
        self._listen_https()
        self._listen_tftp()
        self._start_dhcp()
        self.startService()
        for b in self.bound:
            log.info("listening on {url}", url=b.url() if b.protocol != "tftp" else f"tftp://{b.host}:{b.port}/")

    def current_provisioner(self) -> Provisioner:
        assert self.provisioner is not None
        return self.provisioner

    def _bind(self, service: ListeningService, protocol: str, listen: Listen, listen_call) -> None:
        try:
            port = listen_call()
        except CannotListenError as exc:
            raise StartupError(f"cannot listen for {protocol} on {listen}: {_errno_text(exc)}") from None
        service.ports.append(port)
        address = port.getHost()
        self.bound.append(Bound(protocol, address.host, address.port))

    def _listen_http(self) -> None:
        if not self.config.http.listen:
            return
        service = ListeningService("http")
        site = Site(ProvisioningResource(self.current_provisioner, "http", self.reactor.seconds), self.reactor)
        for listen in self.config.http.listen:
            self._bind(service, "http", listen, lambda: self.reactor.listenTCP(listen.port, site, interface=listen.host))
        service.setServiceParent(self)

    def _listen_https(self) -> None:
        cfg = self.config.https
        if not cfg.listen:
            return
        if cfg.certificate and cfg.private_key:
            paths = tls.CertificatePaths(cfg.certificate, cfg.private_key)
        else:
            try:
                paths = tls.ensure_self_signed(self.config.state_dir, self.config.provisioning.server)
            except OSError as exc:
                raise StartupError(f"cannot create a certificate in {self.config.state_dir}: {exc}") from None
        try:
            context = tls.server_context(paths)
        except tls.TLSError as exc:
            raise StartupError(f"https: {exc}") from None
        service = ListeningService("https")
        site = Site(ProvisioningResource(self.current_provisioner, "https", self.reactor.seconds), self.reactor)
        for listen in cfg.listen:
            self._bind(
                service, "https", listen,
                lambda: self.reactor.listenSSL(listen.port, site, context, interface=listen.host),
            )
        service.setServiceParent(self)

    def _listen_tftp(self) -> None:
        cfg = self.config.tftp
        if not cfg.listen:
            return
        from zprovd.tftp.service import TFTPServer
        from zprovd.tftpsource import ProvisioningSource

        server = TFTPServer(
            [(l.host, l.port) for l in cfg.listen],
            ProvisioningSource(self.current_provisioner),
            reactor=self.reactor,
            max_blksize=cfg.max_blksize,
            max_windowsize=cfg.max_windowsize,
            retries=cfg.retries,
            upload_dir=cfg.upload_dir,
            upload_max_bytes=cfg.upload_max_bytes,
        )
        try:
            server.privilegedStartService()
        except CannotListenError as exc:
            raise StartupError(f"cannot listen for tftp on {exc.interface}:{exc.port}: {_errno_text(exc)}") from None
        server.setName("tftp")
        for host, port in server.listening_ports():
            self.bound.append(Bound("tftp", host, port))
        server.setServiceParent(self)

    def _start_dhcp(self) -> None:
        dhcp = self.config.extra.get("dhcp")
        if dhcp is None or not getattr(dhcp, "enabled", False):
            return
        from zprovd.dhcp.service import DHCPService

        service = DHCPService(dhcp, self.config.state_dir, reactor=self.reactor)
        service.setName("dhcp")
        service.setServiceParent(self)

    @defer.inlineCallbacks
    def stop(self):
        """Stop accepting, let work in flight finish, release everything."""
        if self.running:
            log.info("stopping")
            yield self.stopService()
        if self.backend is not None:
            try:
                yield self.backend.close()
            except Exception as exc:  # closing must not hide the shutdown
                log.warn("closing the backend failed: {error}", error=exc)
            self.backend = None
        if self.pool.started:
            self.pool.stop()
