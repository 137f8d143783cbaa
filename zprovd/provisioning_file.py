"""Zoiper 3's local ``Provision.xml`` (seed 002), pointing at this server.

An operator ships it with a branded installer; Zoiper then fetches its
accounts from zprovd over HTTPS, with HTTP as the fall-back ``base_url``.
"""

from __future__ import annotations

from zprovd.config import Config
from zprovd.renderer import Renderer

TEMPLATE = "zoiper/Provision.xml.j2"


def _url(scheme: str, server: str, port: int, default_port: int, path: str) -> str:
    host = f"[{server}]" if ":" in server else server
    return f"{scheme}://{host}" + ("" if port == default_port else f":{port}") + path


def zoiper_urls(config: Config, auth: str) -> list[str]:
    """HTTPS first (if it listens), then HTTP; with [user]/[pass] for URL auth."""
    z = config.zoiper
    path = z.paths[0]
    if auth == "url":
        path += f"?{z.user_params[0]}=[user]&{z.password_params[0]}=[pass]"
    server = config.provisioning.server
    urls = []
    if config.https.listen:
        urls.append(_url("https", server, config.https.listen[0].port, 443, path))
    if config.http.listen:
        urls.append(_url("http", server, config.http.listen[0].port, 80, path))
    return urls


def provision_file(config: Config, renderer: Renderer, auth: str, user: str = "") -> bytes:
    return renderer.render(
        TEMPLATE,
        {"base_urls": zoiper_urls(config, auth), "auth": auth, "user": user, "password": "", "refresh_rate": 0},
    )
