"""Shared fixtures: the real daemon as a subprocess, and the CLI."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"zprovd: serving (\w+) on (\S+):(\d+)$")


def ipv6_loopback() -> bool:
    """Whether this host can bind ::1."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")


def netns_unavailable() -> str | None:
    """Why this host cannot run the network-namespace tests, or None."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    try:
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"ip netns is unavailable: {exc}"
    if probe.returncode != 0:
        return f"ip netns is unavailable: {probe.stderr.decode(errors='replace').strip()}"
    return None


def kill_namespace_processes(ns: str) -> None:
    """Kill, by pid, every process left in a namespace a test created."""
    result = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=15)
    for pid in result.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@contextlib.contextmanager
def namespace_pair(server_ns: str, client_ns: str, server_if: str, client_if: str) -> Iterator[None]:
    """Two network namespaces joined by a veth pair, ``lo`` and both ends up, no address on them yet.

    The veth is created inside the server namespace with its peer in the
    client one: it never exists in the host's namespace.  No IPv6 link-local
    address is generated (the tests add the addresses they want).  Removed
    afterwards, even on failure: every process left in them is killed, then
    they are deleted, which deletes the veth.
    """

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], capture_output=True, check=True, timeout=30)

    created: list[str] = []
    try:
        for ns in (server_ns, client_ns):
            ip("netns", "add", ns)
            created.append(ns)
        ip("-n", server_ns, "link", "add", server_if, "type", "veth", "peer", "name", client_if, "netns", client_ns)
        for ns, interface in ((server_ns, server_if), (client_ns, client_if)):
            ip("-n", ns, "link", "set", interface, "addrgenmode", "none")
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "set", interface, "up")
        yield
    finally:
        for ns in created:
            kill_namespace_processes(ns)
        for ns in created:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def free_config(tmp: Path, extra: str = "", backend: str = 'type = "sqlite"', http: bool = True,
                https: bool = True, tftp: bool = True, metrics: bool = True) -> Path:
    """A config on free loopback ports (port 0: the daemon reports what it bound)."""
    state = tmp / "state"
    text = f"""
    state_dir = "{state}"
    [http]
    listen = [{'"127.0.0.1:0"' if http else ''}]
    [https]
    listen = [{'"127.0.0.1:0"' if https else ''}]
    [tftp]
    listen = [{'"127.0.0.1:0"' if tftp else ''}]
    [backend]
    {backend}
    [provisioning]
    server = "127.0.0.1"
    base_url = "http://127.0.0.1:8080/provision/"
    [metrics]
    listen = [{'"127.0.0.1:0"' if metrics else ''}]
    """
    path = tmp / "zprovd.toml"
    path.write_text(textwrap.dedent(text) + textwrap.dedent(extra))
    return path


def run_cli(config: Path, *args: str, env: dict | None = None, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "zprovd", "-c", str(config), *args],
        capture_output=True, text=True, timeout=120, env=env, input=input,
    )


_STARTED: list[subprocess.Popen] = []
"""Every daemon process the tests started (``_no_daemon_outlives_the_run`` ends them)."""


@pytest.fixture(scope="session", autouse=True)
def _no_daemon_outlives_the_run():
    """A test that fails before stopping its daemon must not leave it running after the suite."""
    yield
    for proc in _STARTED:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


class Daemon:
    """``zprovd run`` as a subprocess; knows the ports it bound and its log.

    ``netns``: run it inside that network namespace (``ip netns exec``, which
    execs the daemon itself: signals reach it).
    """

    def __init__(self, config: Path, env: dict | None = None, netns: str | None = None):
        self.config = config
        self.env = env
        self.netns = netns
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self._serving = threading.Event()
        self._lock = threading.Lock()

    @property
    def log(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def start(self, expect: tuple[str, ...] = ("http", "https", "tftp"), timeout: float = 30) -> "Daemon":
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        self.proc = subprocess.Popen(
            [*inside, sys.executable, "-m", "zprovd", "-c", str(self.config), "run"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=self.env,
        )
        _STARTED.append(self.proc)
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(p in self.ports for p in expect):
                return self
            if self.proc.poll() is not None:
                break
            self._serving.wait(0.1)
        raise AssertionError(f"daemon did not start (exit {self.proc.poll()}):\n{self.log}")

    def _read(self) -> None:
        assert self.proc and self.proc.stderr
        for line in self.proc.stderr:
            line = line.rstrip("\n")
            with self._lock:
                self.lines.append(line)
            m = SERVING.search(line)
            if m:
                self.ports.setdefault(m.group(1), int(m.group(3)))
                self._serving.set()

    def url(self, protocol: str, path: str = "/") -> str:
        return f"{protocol}://127.0.0.1:{self.ports[protocol]}{path}"

    def wait_for_log(self, text: str, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not in log:\n{self.log}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop on signal {sig}:\n{self.log}")


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return free_config(tmp_path)


@pytest.fixture
def daemon_factory():
    started: list[Daemon] = []

    def make(config: Path, env: dict | None = None) -> Daemon:
        d = Daemon(config, env)
        started.append(d)
        return d

    yield make
    for d in started:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()


def curl(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """curl with status code and body captured: returns (stdout=body+status line)."""
    return subprocess.run(["curl", "-sS", *args], capture_output=True, timeout=timeout)


# The third-party backend used by the contract tests and the entry-point test:
# registered at run time through a *.dist-info folder on sys.path.
import importlib.util  # noqa: E402

_name = "zprovd_dummy_backend_helpers"
if _name not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_name, Path(__file__).parent / "fixtures" / "dummy_backend" / "conftest_helpers.py")
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_name])
register_dummy_backend = sys.modules[_name].register_dummy_backend
