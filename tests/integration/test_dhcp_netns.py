"""The DHCP helper against real clients, inside throw-away network namespaces.

Two namespaces joined by a veth pair are created for this module only
(``zpt-<random>-s`` holds the helper, ``zpt-<random>-c`` the clients); no
traffic touches an interface that existed before.  The helper runs as
``python -m zprovd.dhcp.service`` in the server namespace; the clients are
busybox udhcpc, ISC dhclient and small scapy scripts in the client
namespace.  Everything is removed afterwards, even on failure: processes
started here are terminated, then every process left in the namespaces is
killed by pid, then the namespaces are deleted (which deletes the veth).
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path
from typing import Iterator

import pytest
from conftest import kill_namespace_processes, namespace_pair, netns_unavailable

from zprovd.dhcp.cli import show_leases
from zprovd.dhcp.config import load_dhcp_config
from zprovd.dhcp.packets import ACK, decode

pytestmark = [pytest.mark.integration, pytest.mark.netns]

ROOT = Path(__file__).resolve().parents[2]
_VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(_VENV_PYTHON if _VENV_PYTHON.exists() else Path(sys.executable))
START_TIMEOUT = 20.0


_SKIP = netns_unavailable()
if _SKIP:
    pytestmark.append(pytest.mark.skip(reason=_SKIP))

needs_udhcpc = pytest.mark.skipif(shutil.which("busybox") is None, reason="busybox (udhcpc) is not installed")
needs_dhclient = pytest.mark.skipif(shutil.which("dhclient") is None, reason="isc-dhcp-client is not installed")


def run(*args: str, check: bool = True, timeout: float = 15) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=timeout)


# --------------------------------------------------------------------------
# Namespaces.


@dataclass
class Net:
    server_ns: str
    client_ns: str
    server_if: str
    client_if: str
    prefix: str  # "10.200.N"

    @property
    def server_ip(self) -> str:
        return f"{self.prefix}.1"

    def ns_exec(self, ns: str, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args]

    def client_addresses(self) -> list[str]:
        out = run("ip", "-n", self.client_ns, "-4", "-o", "addr", "show", "dev", self.client_if).stdout
        return [line.split()[3] for line in out.splitlines()]

    def reset_client(self) -> None:
        """Kill what runs in the client namespace and remove its addresses."""
        kill_namespace_processes(self.client_ns)
        run("ip", "-n", self.client_ns, "addr", "flush", "dev", self.client_if)

    def set_client_mac(self, mac: str) -> None:
        run("ip", "-n", self.client_ns, "link", "set", "dev", self.client_if, "address", mac)

    def client_mac(self) -> str:
        out = run("ip", "-n", self.client_ns, "-o", "link", "show", "dev", self.client_if).stdout
        return out.split("link/ether ")[1].split()[0].replace(":", "")


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    tag = secrets.token_hex(3)
    n = Net(
        server_ns=f"zpt-{tag}-s",
        client_ns=f"zpt-{tag}-c",
        server_if=f"zs{tag}",
        client_if=f"zc{tag}",
        prefix=f"10.200.{secrets.randbelow(200) + 20}",
    )
    with namespace_pair(n.server_ns, n.client_ns, n.server_if, n.client_if):
        run("ip", "-n", n.server_ns, "addr", "add", f"{n.server_ip}/24", "dev", n.server_if)
        yield n


@pytest.fixture
def client(net: Net) -> Iterator[Net]:
    net.reset_client()
    yield net
    net.reset_client()


# --------------------------------------------------------------------------
# The helper as a subprocess.


@dataclass
class Helper:
    process: subprocess.Popen
    log_path: Path
    state_dir: Path
    config_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return True
            time.sleep(0.1)
        return text in self.log()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@dataclass
class HelperFactory:
    net: Net
    tmp_path: Path
    started: list[Helper] = field(default_factory=list)
    count: int = 0

    def config_text(self, mode: str, extra: str = "", interface: str | None = None, **keys: str) -> str:
        p = self.net.prefix
        lines = {
            "enabled": "true",
            "interface": f'"{interface or self.net.server_if}"',
            "mode": f'"{mode}"',
            "pool": f'["{p}.100-{p}.119"]',
            "subnet_mask": '"255.255.255.0"',
            "router": f'"{self.net.server_ip}"',
            "lease_time": "600",
        }
        lines.update(keys)
        body = "\n".join(f"{k} = {v}" for k, v in lines.items())
        return textwrap.dedent(f"""\
            [dhcp]
            {body}

            [dhcp.options]
            tftp-server-name = "tftp.zprovd.test"
            ntp-servers = ["{p}.5"]

            [[dhcp.match]]
            vendor_class = "Yealink"
            options = {{ "150" = ["{p}.2", "{p}.3"], "160" = "http://prov.zprovd.test/yealink/" }}
            """) + extra

    def start(self, config: str, ns: str | None = None, expect_ready: bool = True,
              state_dir: Path | None = None) -> Helper:
        self.count += 1
        directory = self.tmp_path / f"helper{self.count}"
        directory.mkdir()
        config_path = directory / "zprovd.toml"
        config_path.write_text(config)
        state = state_dir or directory / "state"
        log_path = directory / "helper.log"
        with open(log_path, "wb") as log_file:
            process = subprocess.Popen(
                self.net.ns_exec(ns or self.net.server_ns, PYTHON, "-m", "zprovd.dhcp.service",
                                 "--config", str(config_path), "--state-dir", str(state), "-v"),
                stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT,
            )
        helper = Helper(process, log_path, state, config_path)
        self.started.append(helper)
        if expect_ready:
            deadline = time.monotonic() + START_TIMEOUT
            while "DHCP helper listening" not in helper.log():
                if process.poll() is not None or time.monotonic() > deadline:
                    helper.stop()
                    pytest.fail(f"the DHCP helper did not start:\n{helper.log()}")
                time.sleep(0.1)
        return helper


@pytest.fixture
def helpers(net: Net, tmp_path: Path) -> Iterator[HelperFactory]:
    factory = HelperFactory(net, tmp_path)
    try:
        yield factory
    finally:
        for helper in factory.started:
            helper.stop()


# --------------------------------------------------------------------------
# Clients.

UDHCPC_SCRIPT = """#!/bin/sh
# Record what udhcpc learnt, and configure the address so that renewals work.
env | grep -E '^(interface|ip|subnet|mask|router|serverid|lease|tftp|bootfile|opt[0-9]+)=' | sort \\
    > "{dir}/udhcpc-$1.env"
case "$1" in
    bound|renew)
        if [ "$ip" != "0.0.0.0" ]; then
            ip addr flush dev "$interface"
            ip addr add "$ip/${{mask:-24}}" dev "$interface"
        fi ;;
esac
exit 0
"""

DHCLIENT_SCRIPT = """#!/bin/sh
env | grep -E '^(reason|interface|new_)' | sort > "{dir}/dhclient-$reason.env"
case "$reason" in
    BOUND|RENEW|REBIND|REBOOT) ip addr replace "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
esac
exit 0
"""

DHCLIENT_CONF = """option tftp150 code 150 = array of ip-address;
option prov160 code 160 = text;
send vendor-class-identifier "{vendor}";
request subnet-mask, routers, domain-name-servers, tftp-server-name, tftp150, prov160;
timeout 15;
initial-interval 1;
"""


def read_env(path: Path) -> dict[str, str]:
    result = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition("=")
        result[key] = value
    return result


def _unhex(value: str) -> bytes:
    return bytes.fromhex(value)


def udhcpc(net: Net, directory: Path, vendor: str, *extra: str, timeout: float = 20) -> tuple[int, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(dir=directory))
    script.chmod(0o755)
    command = net.ns_exec(net.client_ns, "busybox", "udhcpc", "-f", "-i", net.client_if, "-V", vendor,
                          "-O", "66", "-O", "150", "-O", "160", "-s", str(script), "-t", "3", "-T", "1",
                          *extra)
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    (directory / "udhcpc.out").write_text(result.stdout + result.stderr)
    return result.returncode, directory


def ip_of(addresses: list[str]) -> list[str]:
    return [a.split("/")[0] for a in addresses]


# Script run inside the client namespace: send one datagram (built with
# scapy, independently of zprovd's encoder) and print the reply as hex.
SCAPY_CLIENT = r"""
import json, select, socket, sys
from scapy.layers.dhcp import BOOTP, DHCP

args = json.loads(sys.argv[1])
mac = bytes.fromhex(args["mac"])
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, args["interface"].encode())
sock.bind((args.get("bind", "0.0.0.0"), 68))
for raw in args.get("garbage", []):
    for destination in args["garbage_to"]:
        sock.sendto(bytes.fromhex(raw), (destination, 67))
if args.get("inform"):
    packet = BOOTP(op=1, xid=0x5A5A5A5A, ciaddr=args["ciaddr"], chaddr=mac + bytes(10)) / DHCP(options=[
        ("message-type", "inform"),
        ("vendor_class_id", args["vendor"].encode()),
        ("param_req_list", [1, 3, 66, 150, 160]),
        "end",
    ])
    sock.sendto(bytes(packet), (args["server"], 67))
    ready, _, _ = select.select([sock], [], [], 5.0)
    if ready:
        data, source = sock.recvfrom(4096)
        print(json.dumps({"reply": data.hex(), "source": source[0]}))
    else:
        print(json.dumps({"reply": None}))
"""


def scapy_client(net: Net, tmp_path: Path, **args) -> dict:
    script = tmp_path / "scapy_client.py"
    script.write_text(SCAPY_CLIENT)
    args.setdefault("interface", net.client_if)
    args.setdefault("mac", net.client_mac())
    result = subprocess.run(net.ns_exec(net.client_ns, PYTHON, str(script), json.dumps(args)),
                            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else {}


def dhclient_until_bound(net: Net, out: Path, vendor: str = "Yealink SIP-T54W") -> Path:
    """ISC dhclient in the client namespace until it is bound (at most 30 s), then stopped.

    In ``out``: its script's environment per reason (``dhclient-BOUND.env``...)
    and its -v output (``dhclient.log``)."""
    out.mkdir()
    (out / "dhclient.conf").write_text(DHCLIENT_CONF.format(vendor=vendor))
    (out / "dhclient.sh").write_text(DHCLIENT_SCRIPT.format(dir=out))
    (out / "dhclient.sh").chmod(0o755)
    (out / "dhclient.leases").touch()
    with open(out / "dhclient.log", "w") as log:
        process = subprocess.Popen(
            net.ns_exec(net.client_ns, "dhclient", "-1", "-d", "-v", "-cf", str(out / "dhclient.conf"),
                        "-sf", str(out / "dhclient.sh"), "-lf", str(out / "dhclient.leases"),
                        "-pf", str(out / "dhclient.pid"), net.client_if),
            stdout=subprocess.DEVNULL, stderr=log,
        )
        try:
            deadline = time.monotonic() + 30
            while not (out / "dhclient-BOUND.env").exists() and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            process.terminate()
            process.wait(timeout=10)
    return out


# --------------------------------------------------------------------------
# Tests.


@needs_udhcpc
def test_udhcpc_gets_pool_address_and_provisioning_options(client: Net, helpers: HelperFactory, tmp_path: Path):
    helper = helpers.start(helpers.config_text("server"))
    rc, out = udhcpc(client, tmp_path / "u", "Yealink SIP-T46S", "-q", "-n")
    assert rc == 0, (out / "udhcpc.out").read_text() + helper.log()
    env = read_env(out / "udhcpc-bound.env")
    p = client.prefix
    assert env["ip"] == f"{p}.100"
    assert env["subnet"] == "255.255.255.0"
    assert env["router"] == client.server_ip
    assert env["serverid"] == client.server_ip
    assert env["lease"] == "600"
    assert env["tftp"] == "tftp.zprovd.test"                                   # option 66
    assert _unhex(env["opt150"]) == IPv4Address(f"{p}.2").packed + IPv4Address(f"{p}.3").packed
    assert _unhex(env["opt160"]) == b"http://prov.zprovd.test/yealink/"
    assert "opt42" not in env  # configured, but udhcpc did not ask for NTP servers
    assert ip_of(client.client_addresses()) == [f"{p}.100"]
    log = helper.log()
    assert "DHCPOFFER to" in log and "DHCPACK to" in log
    assert f"address {p}.100 (selecting)" in log
    assert "vendor class 'Yealink SIP-T46S'" in log
    # Replies are logged at debug level (the helper runs with -v); the info
    # summary of what happened since the last one comes at the latest at stop.
    assert "[zprovd.dhcp#debug] DHCP: DHCPOFFER to" in log
    helper.stop()
    assert "DHCP: last " in helper.log() and "replies 1 DHCPACK, 1 DHCPOFFER" in helper.log(), helper.log()


@needs_udhcpc
def test_non_matching_client_gets_no_answer(client: Net, helpers: HelperFactory, tmp_path: Path):
    helper = helpers.start(helpers.config_text("server"))
    rc, out = udhcpc(client, tmp_path / "u", "Android-Phone", "-q", "-n")
    assert rc != 0
    assert not (out / "udhcpc-bound.env").exists()
    assert client.client_addresses() == []
    log = helper.log()
    assert "no [[dhcp.match]] selects this client" in log
    assert "DHCPOFFER" not in log


@needs_udhcpc
def test_udhcpc_renews_a_short_lease(client: Net, helpers: HelperFactory, tmp_path: Path):
    helper = helpers.start(helpers.config_text("server", lease_time="10"))
    out = tmp_path / "u"
    out.mkdir()
    script = out / "udhcpc.sh"
    script.write_text(UDHCPC_SCRIPT.format(dir=out))
    script.chmod(0o755)
    process = subprocess.Popen(
        client.ns_exec(client.client_ns, "busybox", "udhcpc", "-f", "-i", client.client_if, "-V", "Yealink",
                       "-s", str(script), "-t", "3", "-T", "1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        # lease 10 s; busybox raises very short leases to its own minimum and
        # renews after about 15 s.
        deadline = time.monotonic() + 40
        while not (out / "udhcpc-renew.env").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert (out / "udhcpc-bound.env").exists(), helper.log()
    assert (out / "udhcpc-renew.env").exists(), helper.log()
    renewed = read_env(out / "udhcpc-renew.env")
    assert renewed["ip"] == read_env(out / "udhcpc-bound.env")["ip"] == f"{client.prefix}.100"
    assert renewed["lease"] == "10"
    assert f"via {client.prefix}.100:68: address {client.prefix}.100 (renewing)" in helper.log()


@needs_dhclient
@needs_udhcpc
def test_dhclient_lease_survives_a_restart(client: Net, helpers: HelperFactory, tmp_path: Path):
    config = helpers.config_text("server")
    helper = helpers.start(config)
    out = dhclient_until_bound(client, tmp_path / "d")
    assert (out / "dhclient-BOUND.env").exists(), helper.log()
    env = read_env(out / "dhclient-BOUND.env")
    p = client.prefix
    assert env["new_ip_address"] == f"{p}.100"
    assert env["new_subnet_mask"] == "255.255.255.0"
    assert env["new_routers"] == client.server_ip
    assert env["new_tftp_server_name"] == "tftp.zprovd.test"
    assert env["new_tftp150"] == f"{p}.2 {p}.3"
    assert env["new_prov160"] == "http://prov.zprovd.test/yealink/"
    assert env["new_dhcp_lease_time"] == "600"

    # The lease is on disk once the helper stops, and `zprovd dhcp leases` shows it.
    helper.stop()
    mac = client.client_mac()
    dhcp_config, _ = load_dhcp_config(helper.config_path)
    listing = io.StringIO()
    assert show_leases(dhcp_config, helper.state_dir, listing) == 0
    table = listing.getvalue()
    pretty_mac = ":".join(mac[i:i + 2] for i in range(0, 12, 2))
    assert pretty_mac in table and f"{p}.100" in table and "bound" in table and "Yealink SIP-T54W" in table

    # After a restart the address is still held: another client gets the next one.
    restarted = helpers.start(config, state_dir=helper.state_dir)
    assert "1 lease records loaded" in restarted.log()
    client.reset_client()
    client.set_client_mac("02:00:00:aa:bb:cc")
    try:
        rc, udhcpc_out = udhcpc(client, tmp_path / "u", "Yealink", "-q", "-n")
        assert rc == 0, restarted.log()
        assert read_env(udhcpc_out / "udhcpc-bound.env")["ip"] == f"{p}.101"
    finally:
        client.set_client_mac(":".join(mac[i:i + 2] for i in range(0, 12, 2)))


def test_real_dhcpinform_gets_options_without_an_address(client: Net, helpers: HelperFactory, tmp_path: Path):
    helper = helpers.start(helpers.config_text("inform"))
    p = client.prefix
    run("ip", "-n", client.client_ns, "addr", "add", f"{p}.50/24", "dev", client.client_if)
    answer = scapy_client(client, tmp_path, inform=True, bind=f"{p}.50", ciaddr=f"{p}.50",
                          server=client.server_ip, vendor="Yealink SIP-T46S")
    assert answer["reply"] is not None, helper.log()
    reply = decode(bytes.fromhex(answer["reply"]))
    assert answer["source"] == client.server_ip
    assert reply.message_type == ACK and reply.xid == 0x5A5A5A5A
    assert str(reply.yiaddr) == "0.0.0.0"
    assert str(reply.ciaddr) == f"{p}.50"
    assert reply.options[66] == b"tftp.zprovd.test"
    assert reply.ip_list(150) == [IPv4Address(f"{p}.2"), IPv4Address(f"{p}.3")]
    assert reply.options[160] == b"http://prov.zprovd.test/yealink/"
    assert reply.server_id == IPv4Address(client.server_ip)
    assert 51 not in reply.options
    assert f"via {p}.50:68: options only (inform)" in helper.log()


@needs_dhclient
def test_replies_come_from_the_server_address_on_an_interface_with_several(client: Net, helpers: HelperFactory,
                                                                            tmp_path: Path):
    """A second address on the server's interface (a shared virtual address) as the server identifier:
    the replies come from it, broadcast or unicast, not from the interface's first address."""
    p = client.prefix
    run("ip", "-n", client.server_ns, "addr", "add", f"{p}.9/24", "dev", client.server_if)
    helper = helpers.start(helpers.config_text("server", server_address=f'"{p}.9"'))
    # dhclient -v names each reply's source address: "DHCPOFFER of A from S", "DHCPACK of A from S".
    out = dhclient_until_bound(client, tmp_path / "d")
    log = (out / "dhclient.log").read_text()
    assert f"DHCPOFFER of {p}.100 from {p}.9" in log, log + helper.log()  # broadcast to the new client
    assert f"DHCPACK of {p}.100 from {p}.9" in log, log
    assert read_env(out / "dhclient-BOUND.env")["new_dhcp_server_identifier"] == f"{p}.9"
    # Unicast, to a client with an address (DHCPINFORM): from the server address too.
    run("ip", "-n", client.client_ns, "addr", "add", f"{p}.50/24", "dev", client.client_if)
    answer = scapy_client(client, tmp_path, inform=True, bind=f"{p}.50", ciaddr=f"{p}.50", server=f"{p}.9",
                          vendor="Yealink SIP-T46S")
    assert answer["reply"] is not None and answer["source"] == f"{p}.9", helper.log()


def test_a_server_address_not_of_this_host_still_gets_replies_out(client: Net, helpers: HelperFactory, tmp_path: Path):
    p = client.prefix
    helper = helpers.start(helpers.config_text("inform", server_address=f'"{p}.77"'))
    run("ip", "-n", client.client_ns, "addr", "add", f"{p}.50/24", "dev", client.client_if)
    answer = scapy_client(client, tmp_path, inform=True, bind=f"{p}.50", ciaddr=f"{p}.50", server=client.server_ip,
                          vendor="Yealink SIP-T46S")
    assert answer["reply"] is not None and answer["source"] == client.server_ip, helper.log()
    assert decode(bytes.fromhex(answer["reply"])).server_id == IPv4Address(f"{p}.77")
    assert f"cannot send from the server address {p}.77" in helper.log()


@needs_udhcpc
def test_inform_mode_does_not_answer_discover(client: Net, helpers: HelperFactory, tmp_path: Path):
    helper = helpers.start(helpers.config_text("inform"))
    rc, out = udhcpc(client, tmp_path / "u", "Yealink", "-q", "-n")
    assert rc != 0 and not (out / "udhcpc-bound.env").exists()
    assert "inform mode answers DHCPINFORM only" in helper.log()


@needs_udhcpc
def test_proxy_mode_gives_options_and_no_address(client: Net, helpers: HelperFactory, tmp_path: Path):
    helper = helpers.start(helpers.config_text("proxy"))
    rc, out = udhcpc(client, tmp_path / "u", "Yealink SIP-T46S", "-q", "-n")
    assert rc == 0, (out / "udhcpc.out").read_text() + helper.log()
    env = read_env(out / "udhcpc-bound.env")
    assert env.get("ip", "0.0.0.0") == "0.0.0.0"
    assert env["tftp"] == "tftp.zprovd.test"
    assert _unhex(env["opt160"]) == b"http://prov.zprovd.test/yealink/"
    assert "lease" not in env  # no lease time: no address was given
    assert client.client_addresses() == []
    log = helper.log()
    assert "DHCPOFFER to" in log and "options only (proxy)" in log
    assert not (helper.state_dir / "dhcp-leases.json").exists()


@needs_udhcpc
def test_malformed_datagrams_are_survived(client: Net, helpers: HelperFactory, tmp_path: Path):
    helper = helpers.start(helpers.config_text("server"))
    p = client.prefix
    valid_start = bytes([1, 1, 6, 0]) + bytes(232) + bytes([0x63, 0x82, 0x53, 0x63])
    garbage = [
        b"",
        b"\x00",
        b"hello dhcp",
        bytes(100),
        valid_start,                                          # no options at all, no end
        valid_start + bytes([53, 1]),                         # truncated option
        valid_start + bytes([53, 7, 1]),                      # option longer than the datagram
        bytes([2, 1, 6, 0]) + bytes(300),                     # no magic cookie
        bytes(range(256)) * 4,
        os.urandom(600),
        os.urandom(1400),
    ]
    run("ip", "-n", client.client_ns, "addr", "add", f"{p}.60/24", "dev", client.client_if)
    scapy_client(client, tmp_path, garbage=[g.hex() for g in garbage],
                 garbage_to=[client.server_ip, "255.255.255.255"])
    run("ip", "-n", client.client_ns, "addr", "flush", "dev", client.client_if)
    assert helper.wait_for_log("malformed so far", timeout=5), helper.log()
    rc, out = udhcpc(client, tmp_path / "u", "Yealink", "-q", "-n")
    assert rc == 0, helper.log()
    assert read_env(out / "udhcpc-bound.env")["ip"] == f"{p}.100"
    assert helper.process.poll() is None
    assert "Traceback" not in helper.log() and "Unhandled" not in helper.log()
    assert "malformed datagram from" in helper.log()


def test_server_mode_refuses_to_start_next_to_another_server(client: Net, helpers: HelperFactory,
                                                              tmp_path: Path):
    p = client.prefix
    # Another DHCP server, on the client side of the link.
    run("ip", "-n", client.client_ns, "addr", "add", f"{p}.2/24", "dev", client.client_if)
    other_config = helpers.config_text("server", interface=client.client_if, answer='"all"',
                                       pool=f'["{p}.150-{p}.160"]', server_address=f'"{p}.2"')
    helpers.start(other_config, ns=client.client_ns)

    # `zprovd dhcp probe` finds it (run from the server side).
    probe = subprocess.run(
        client.ns_exec(client.server_ns, PYTHON, "-c",
                       "import sys; from zprovd.dhcp.cli import probe; "
                       f"sys.exit(probe({client.server_if!r}, 2.0, sys.stdout))"),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert probe.returncode == 1, probe.stdout + probe.stderr
    assert f"DHCP server {p}.2 (from {p}.2) sent DHCPOFFER, address {p}.150" in probe.stdout
    assert "66(tftp-server-name)=tftp.zprovd.test" in probe.stdout

    refused = helpers.start(helpers.config_text("server"), expect_ready=False)
    assert refused.process.wait(timeout=START_TIMEOUT) == 1
    assert f"another DHCP server answers on {client.server_if}: {p}.2" in refused.log()
    assert "refusing to start in server mode" in refused.log()

    allowed = helpers.start(helpers.config_text("server", allow_other_servers="true"))
    assert "WARNING: ANOTHER DHCP SERVER ANSWERS" in allowed.log()


def test_probe_finds_nothing_on_a_quiet_link(net: Net):
    result = subprocess.run(
        net.ns_exec(net.server_ns, PYTHON, "-c",
                    "import sys; from zprovd.dhcp.cli import probe; "
                    f"sys.exit(probe({net.server_if!r}, 1.0, sys.stdout))"),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"no DHCP server answered on {net.server_if}" in result.stdout


def test_probe_reports_a_missing_interface(net: Net):
    result = subprocess.run(
        net.ns_exec(net.server_ns, PYTHON, "-c",
                    "import sys; from zprovd.dhcp.cli import probe; "
                    "sys.exit(probe('zpt-nosuch0', 1.0, sys.stdout))"),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "error: cannot probe zpt-nosuch0" in result.stdout


def test_start_fails_clearly_without_the_interface(net: Net, helpers: HelperFactory):
    helper = helpers.start(helpers.config_text("inform", interface="zpt-nosuch0"), expect_ready=False)
    assert helper.process.wait(timeout=START_TIMEOUT) == 1
    assert "interface zpt-nosuch0 does not exist or has no IPv4 address" in helper.log()


# --------------------------------------------------------------------------
# The whole daemon on a lab network: DHCP hands out option 66, the phone
# follows it, and the admin commands see what happened.


@needs_udhcpc
def test_daemon_lab_flow_option_66_then_the_phone_fetches_its_file(client: Net, tmp_path: Path):
    p = client.prefix
    mac = client.client_mac()
    state = tmp_path / "state"
    config = tmp_path / "zprovd.toml"
    config.write_text(textwrap.dedent(f"""\
        state_dir = "{state}"
        [http]
        listen = ["{client.server_ip}:8080"]
        [https]
        listen = []
        [tftp]
        listen = []
        [metrics]
        listen = ["127.0.0.1:9151"]
        [provisioning]
        server = "{client.server_ip}"
        base_url = "http://{client.server_ip}:8080/provision/"
        [dhcp]
        enabled = true
        interface = "{client.server_if}"
        mode = "server"
        pool = ["{p}.150-{p}.159"]
        subnet_mask = "255.255.255.0"
        router = "{client.server_ip}"
        lease_time = 600
        [dhcp.options]
        tftp-server-name = "{client.server_ip}"
        [[dhcp.match]]
        vendor_class = "Yealink"
        options = {{ "160" = "http://{client.server_ip}:8080/provision/" }}
        """))

    def zprovd(*args: str, ns: str | None = None) -> subprocess.CompletedProcess:
        command = [PYTHON, "-m", "zprovd", "-c", str(config), *args]
        return subprocess.run(client.ns_exec(ns, *command) if ns else command, capture_output=True, text=True,
                              timeout=60, cwd=ROOT)

    assert zprovd("user", "add", "lab", "--password", "pw", "--sip-password", "lab-sip-secret").returncode == 0
    r = zprovd("device", "add", mac, "--model", "yealink-t48g", "--user", "lab")
    assert r.returncode == 0, r.stderr
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(client.ns_exec(client.server_ns, PYTHON, "-m", "zprovd", "-c", str(config), "run"),
                                  stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while "zprovd: serving http" not in log_path.read_text():
            if daemon.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the daemon did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        code, directory = udhcpc(client, tmp_path / "udhcpc", "Yealink SIP-T48G", "-q", "-n")
        assert code == 0, (directory / "udhcpc.out").read_text() + log_path.read_text()
        env = read_env(directory / "udhcpc-bound.env")
        assert env["ip"].startswith(f"{p}.15")
        # busybox passes option 66 through its host-name check, so the full
        # URL travels in option 160 (as Polycom phones take it).
        assert env["tftp"] == client.server_ip
        url = bytes.fromhex(env["opt160"]).decode()
        assert url == f"http://{client.server_ip}:8080/provision/"
        # The phone follows it to its per-MAC file.
        fetched = subprocess.run(client.ns_exec(client.client_ns, "curl", "-sS", "-A", "Yealink SIP-T48G 35.83.0.35",
                                                f"{url}{mac}.cfg"), capture_output=True, text=True, timeout=30)
        assert "lab-sip-secret" in fetched.stdout, fetched.stderr + log_path.read_text()
        # The admin sees the lease (the daemon writes lease changes within a
        # second) and the reply counters.
        deadline = time.monotonic() + 10
        while True:
            leases = zprovd("dhcp", "leases")
            if env["ip"] in leases.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert leases.returncode == 0 and env["ip"] in leases.stdout, leases.stdout + leases.stderr
        metrics = subprocess.run(client.ns_exec(client.server_ns, "curl", "-sS", "http://127.0.0.1:9151/metrics"),
                                 capture_output=True, text=True, timeout=30).stdout
        assert 'zprovd_dhcp_replies_total{type="DHCPOFFER"} 1.0' in metrics
        assert 'zprovd_dhcp_replies_total{type="DHCPACK"} 1.0' in metrics
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=20)
        except subprocess.TimeoutExpired:
            daemon.kill()
    assert daemon.returncode == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
