"""The SIP transport and port variables of a line: what phones can use.

``vars.sip_transport`` is udp, tcp or tls (default udp) and ``vars.sip_port``
a port number, by default 5061 for tls and 5060 otherwise (RFC 3261,
19.1.2); 0 is kept for the phones that read it as "look the port up in
DNS SRV" (Yealink, Polycom).  The configuration (``[provisioning] vars``), the CLI (``--var``)
and the template context check them with :func:`sip_transport_and_port`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["LineError", "TRANSPORTS", "sip_transport_and_port"]


class LineError(ValueError):
    """A SIP line's port or transport variable is not one a phone can use."""


TRANSPORTS = ("udp", "tcp", "tls")


def sip_transport_and_port(variables: dict[str, Any], whose: str) -> tuple[str, int]:
    """``vars.sip_transport`` (lower case) and ``vars.sip_port`` (default 5061
    for tls, else 5060); :class:`LineError` naming ``whose`` vars if either
    is unusable."""
    transport = str(variables.get("sip_transport", "udp")).strip().lower()
    if transport not in TRANSPORTS:
        raise LineError(f"{whose}: sip_transport must be udp, tcp or tls, not {variables['sip_transport']!r}")
    port = variables.get("sip_port")
    if port is None:
        return transport, 5061 if transport == "tls" else 5060
    try:
        number = int(str(port), 10)
    except ValueError:
        number = -1
    if isinstance(port, bool) or not 0 <= number <= 65535:
        raise LineError(f"{whose}: sip_port must be a port number (0-65535), not {port!r}")
    return transport, number
