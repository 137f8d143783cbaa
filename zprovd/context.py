"""What a template sees: the documented variables, built in one place.

Generic (per-model) files get::

    server, base_url, language, file, model, vars, request

Per-MAC files get all of those plus::

    mac, device, lines

Zoiper documents get::

    server, base_url, language, user, accounts, version, prov_id, vars, request

``lines``/``accounts`` are lists of dicts with ``index`` (1-based), ``login``,
``display_name``, ``label``, ``sip_user``, ``sip_auth_user``,
``sip_password``, ``sip_domain``, ``sip_port``, ``sip_transport``.  The
transport is ``vars.sip_transport`` (udp, tcp or tls; default udp), the
port ``vars.sip_port``, by default 5061 for tls and 5060 otherwise
(RFC 3261, 19.1.2); anything else is a ``zprovd.sipvars.LineError``.

``vars`` merges, later winning: ``[provisioning] vars``, the model's vars,
the users' vars (in line order), the device's vars.  ``language`` is
``vars.language`` if set, else ``[provisioning] language``.

``request`` holds ``protocol`` (http, https, tftp), ``host``, ``client`` and
``user_agent``.  The bundled templates never use it, so that the same file
is byte-identical over HTTP, HTTPS and TFTP and in ``zprovd render``, and
one rendered copy serves them all.  A template that mentions ``request``
(or includes or imports one that does) is kept per request fields instead.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from zprovd.backends import Device, User
from zprovd.catalogue import Model
from zprovd.config import ProvisioningConfig
from zprovd.sipvars import sip_transport_and_port

# Access settings kept in device vars (zprovd.policy); never shown to templates.
PRIVATE_DEVICE_VARS = frozenset({"http_user", "http_ha1_sha256", "http_ha1_md5"})


@dataclass(frozen=True)
class RequestInfo:
    protocol: str = "http"
    host: str = ""
    client: str = ""
    user_agent: str = ""

    def context(self) -> dict[str, str]:
        return {
            "protocol": self.protocol,
            "host": self.host,
            "client": self.client,
            "user_agent": self.user_agent,
        }


def _merge(*layers: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return merged


def _base(prov: ProvisioningConfig, merged_vars: dict[str, Any], request: RequestInfo) -> dict[str, Any]:
    return {
        "server": prov.server,
        "base_url": prov.base_url,
        "language": str(merged_vars.get("language") or prov.language),
        "vars": merged_vars,
        "request": request.context(),
    }


def account_lines(users: list[User], base_vars: dict[str, Any]) -> list[dict[str, Any]]:
    """Every SIP account of the users, in order, numbered from 1.

    A line's ``sip_port``/``sip_transport`` come from its own user's vars,
    then ``base_vars`` (global, model and device): never from another user.
    """
    lines = []
    for user in users:
        line_vars = _merge(base_vars, user.vars)
        transport, port = sip_transport_and_port(line_vars, f"user {user.login}")
        for account in user.accounts:
            display = account.display_name or user.display_name or account.sip_user
            lines.append(
                {
                    "index": len(lines) + 1,
                    "login": user.login,
                    "display_name": display,
                    "label": display,
                    "sip_user": account.sip_user,
                    "sip_auth_user": account.auth_user,
                    "sip_password": account.sip_password,
                    "sip_domain": account.sip_domain,
                    "sip_port": port,
                    "sip_transport": transport,
                }
            )
    return lines


def generic_context(prov: ProvisioningConfig, model: Model, file: str, request: RequestInfo) -> dict[str, Any]:
    merged = _merge(prov.vars, model.vars)
    ctx = _base(prov, merged, request)
    ctx.update(model=model.context(), file=file)
    return ctx


def device_context(
    prov: ProvisioningConfig, model: Model, device: Device, users: list[User], file: str, request: RequestInfo
) -> dict[str, Any]:
    public = {k: v for k, v in device.vars.items() if k not in PRIVATE_DEVICE_VARS}
    merged = _merge(prov.vars, model.vars, *[u.vars for u in users], public)
    ctx = _base(prov, merged, request)
    ctx.update(
        model=model.context(),
        file=file,
        mac=device.mac,
        device={"mac": device.mac, "model": device.model, "vars": public},
        lines=account_lines(users, _merge(prov.vars, model.vars, public)),
    )
    return ctx


def zoiper_context(prov: ProvisioningConfig, user: User, version: str, request: RequestInfo) -> dict[str, Any]:
    merged = _merge(prov.vars, user.vars)
    ctx = _base(prov, merged, request)
    ctx.update(
        user={"login": user.login, "display_name": user.display_name or user.login},
        accounts=account_lines([user], prov.vars),
        version=version,
        # Stable per user and server, changes when the login does: Zoiper uses
        # it to tell provisioned configurations apart.
        prov_id=hashlib.md5(f"{prov.server}\0{user.login}".encode()).hexdigest(),
    )
    return ctx
