"""Replies come from the address the client asked, on a host with several, with real clients.

A client that sent its request to one address of a host ignores an answer
from any other (tftp-hpa's ``tftp`` does, as phones do), and a link-local
IPv6 address (``fe80::/10``) means something only on its own link.  The
daemon listens on the wildcard addresses (``0.0.0.0``, ``[::]``, as the
shipped configuration does) in a namespace whose interface has two IPv4
addresses and two link-local IPv6 ones; the clients (tftp-hpa ``tftp``,
``atftp``, curl) run in a second namespace across a veth pair and ask the
address the kernel would *not* pick as the source of a reply on its own
(the secondary IPv4 address; the older of the two IPv6 ones).

Both namespaces are created for this module only and removed afterwards,
even on failure (every process left in them is killed, then they are
deleted, which deletes the veth).  No traffic leaves them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
from conftest import SERVING, Daemon, free_config, namespace_pair, netns_unavailable, run_cli

pytestmark = [pytest.mark.integration, pytest.mark.netns]
_SKIP = netns_unavailable()
if _SKIP:
    pytestmark.append(pytest.mark.skip(reason=_SKIP))

needs_tftp = pytest.mark.skipif(shutil.which("tftp") is None, reason="tftp-hpa is not installed")
needs_atftp = pytest.mark.skipif(shutil.which("atftp") is None, reason="atftp is not installed")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

SERVER_V6 = "fe80::a"  # asked by the clients; added first
OTHER_V6 = "fe80::c"  # added second: the kernel's choice of source for a reply from a wildcard socket
CLIENT_V6 = "fe80::b"


def run(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, check=check, timeout=timeout)


@dataclass
class Link:
    server_ns: str
    client_ns: str
    client_if: str
    prefix: str  # "10.201.N"

    @property
    def primary_v4(self) -> str:
        return f"{self.prefix}.1"

    @property
    def server_v4(self) -> str:
        """The secondary address: the one the clients ask."""
        return f"{self.prefix}.2"

    @property
    def server_v6(self) -> str:
        """The server's link-local address as the client names it: with the client's interface as its scope."""
        return f"{SERVER_V6}%{self.client_if}"

    def client(self, *args: str) -> subprocess.CompletedProcess:
        """Run a command in the client's namespace."""
        return run("ip", "netns", "exec", self.client_ns, *args, check=False)


@pytest.fixture(scope="module")
def link() -> Iterator[Link]:
    tag = secrets.token_hex(3)
    n = Link(f"zpt-{tag}-as", f"zpt-{tag}-ac", f"zac{tag}", f"10.201.{secrets.randbelow(200) + 20}")
    server_if = f"zas{tag}"
    with namespace_pair(n.server_ns, n.client_ns, server_if, n.client_if):
        for address in (f"{n.primary_v4}/24", f"{n.server_v4}/24"):  # the second one is secondary
            run("ip", "-n", n.server_ns, "addr", "add", address, "dev", server_if)
        for address in (SERVER_V6, OTHER_V6):
            run("ip", "-n", n.server_ns, "-6", "addr", "add", f"{address}/64", "dev", server_if, "nodad")
        run("ip", "-n", n.client_ns, "addr", "add", f"{n.prefix}.9/24", "dev", n.client_if)
        run("ip", "-n", n.client_ns, "-6", "addr", "add", f"{CLIENT_V6}/64", "dev", n.client_if, "nodad")
        yield n


@pytest.fixture(scope="module")
def daemon(link: Link, tmp_path_factory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("addresses")
    firmware = tmp / "firmware"
    firmware.mkdir()
    (firmware / "fw.bin").write_bytes(os.urandom(200_000))
    config = free_config(tmp, https=False, metrics=False)
    text = config.read_text()
    text = text.replace('[http]\nlisten = ["127.0.0.1:0"]', '[http]\nlisten = ["[::]:0"]')
    text = text.replace('[tftp]\nlisten = ["127.0.0.1:0"]',
                        f'[tftp]\nlisten = ["0.0.0.0:0", "[::]:0"]\nfirmware_dir = "{firmware}"')
    config.write_text(text)
    assert run_cli(config, "user", "add", "u", "--password", "pw", "--sip-password", "sip-secret").returncode == 0
    assert run_cli(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "u").returncode == 0
    d = Daemon(config, netns=link.server_ns).start(expect=("http", "tftp"))
    d.firmware = firmware
    serving = [SERVING.search(line) for line in d.log.splitlines()]
    d.tftp_ports = {m.group(2): int(m.group(3)) for m in serving if m and m.group(1) == "tftp"}
    assert set(d.tftp_ports) == {"0.0.0.0", "::"}, d.log
    yield d
    d.stop()


def http_get(link: Link, daemon: Daemon, path: str) -> bytes:
    r = link.client("curl", "-sS", "--max-time", "20", "--fail", f"http://{link.server_v4}:{daemon.ports['http']}{path}")
    assert r.returncode == 0, r.stderr
    return r.stdout


def tftp_get(link: Link, daemon: Daemon, server: str, listener: str, name: str, out: Path) -> subprocess.CompletedProcess:
    """tftp-hpa fetches ``name`` from ``server`` at the port of the daemon's ``listener`` (0.0.0.0 or ::)."""
    family = ["-6"] if ":" in server else []
    return link.client("tftp", *family, "-m", "binary", server, str(daemon.tftp_ports[listener]), "-c", "get", name, str(out))


@needs_tftp
@needs_curl
@pytest.mark.parametrize("listener", ["0.0.0.0", "::"])
def test_a_secondary_ipv4_address_gets_its_answers_from_itself(link, daemon, tmp_path, listener):
    out = tmp_path / "per-mac.cfg"
    r = tftp_get(link, daemon, link.server_v4, listener, "001565aabbcc.cfg", out)
    assert r.returncode == 0 and not r.stderr, (r.stdout, r.stderr, daemon.log)
    assert out.read_bytes() == http_get(link, daemon, "/001565aabbcc.cfg")
    assert b"sip-secret" in out.read_bytes()
    r = tftp_get(link, daemon, link.server_v4, listener, "missing.cfg", tmp_path / "missing")
    assert b"Error code 1: file not found" in r.stdout + r.stderr, (r.stdout, r.stderr, daemon.log)


@needs_tftp
def test_a_link_local_client_is_answered_from_the_address_it_asked(link, daemon, tmp_path):
    out = tmp_path / "per-mac.cfg"
    r = tftp_get(link, daemon, link.server_v6, "::", "001565aabbcc.cfg", out)
    assert r.returncode == 0 and not r.stderr, (r.stdout, r.stderr, daemon.log)
    assert b"## Yealink SIP-T48G 001565aabbcc" in out.read_bytes()
    r = tftp_get(link, daemon, link.server_v6, "::", "missing.cfg", tmp_path / "missing")
    assert b"Error code 1: file not found" in r.stdout + r.stderr, (r.stdout, r.stderr, daemon.log)
    daemon.wait_for_log(f"tftp {CLIENT_V6} ")  # the access line shows the client's address, its scope aside


@needs_atftp
@pytest.mark.parametrize("server", ["v4", "v6"])
def test_atftp_with_options_from_either_address(link, daemon, tmp_path, server):
    out = tmp_path / "fw.bin"
    host, listener = (link.server_v4, "0.0.0.0") if server == "v4" else (link.server_v6, "::")
    r = link.client("atftp", "--option", "blksize 1468", "--option", "windowsize 4", "-g", "-r", "fw.bin", "-l", str(out),
                    host, str(daemon.tftp_ports[listener]))
    assert r.returncode == 0, (r.stdout, r.stderr, daemon.log)
    assert out.read_bytes() == (daemon.firmware / "fw.bin").read_bytes()
