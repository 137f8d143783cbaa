"""Sets of TCP listeners that a reload can change without dropping the others.

``TCPListeners.apply(addresses)`` binds the addresses that are new (all of
them before touching anything, so a failure changes nothing), then stops
listening on the ones that went away; sockets whose address stayed keep
accepting throughout.  HTTPS listeners take a ``SwappableTLS``, so a reload
can change the certificate without closing them.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from zprovd.config import Listen


class ListenError(Exception):
    """An address could not be bound; the message is one line for the operator."""


def describe(exc: CannotListenError) -> str:
    socket_error = exc.socketError
    return getattr(socket_error, "strerror", None) or str(socket_error)


@implementer(IOpenSSLServerConnectionCreator)
class SwappableTLS:
    """Hands each new TLS connection to the current certificate options."""

    def __init__(self, options: Any):
        self.options = options

    def serverConnectionForTLS(self, protocol):
        return self.options.serverConnectionForTLS(protocol)


class TCPListeners(Service):
    """One protocol's listening sockets (HTTP, HTTPS or metrics)."""

    def __init__(self, name: str, listen_on: Callable[[Listen], Any]):
        """``listen_on(address)`` binds one address and returns the port."""
        self.setName(name)
        self.listen_on = listen_on
        self.ports: dict[Listen, Any] = {}

    def _adopt_ephemeral(self, addresses: list[Listen]) -> None:
        """A socket bound as port 0 is the same listener as its actual port."""
        for key in [k for k in self.ports if k.port == 0]:
            actual = Listen(key.host, self.ports[key].getHost().port)
            if actual in addresses and key not in addresses:
                self.ports[actual] = self.ports.pop(key)

    def apply(self, addresses: list[Listen]) -> list[Listen]:
        """Listen on exactly these addresses; return the ones newly bound."""
        self._adopt_ephemeral(addresses)
        new: dict[Listen, Any] = {}
        try:
            for address in addresses:
                if address not in self.ports and address not in new:
                    try:
                        new[address] = self.listen_on(address)
                    except CannotListenError as exc:
                        raise ListenError(f"cannot listen for {self.name} on {address}: {describe(exc)}") from None
        except ListenError:
            for port in new.values():
                port.stopListening()
            raise
        for address in [a for a in self.ports if a not in addresses]:
            self.ports.pop(address).stopListening()
        self.ports.update(new)
        return list(new)

    def bound(self) -> list[tuple[str, int]]:
        result = []
        for port in self.ports.values():
            host = port.getHost()
            result.append((host.host, host.port))
        return result

    def stopService(self):
        super().stopService()
        ports, self.ports = list(self.ports.values()), {}
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports], consumeErrors=True)
