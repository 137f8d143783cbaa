"""Shared plumbing of the benchmarks: paths, processes, namespaces, the daemon.

Everything the bench starts is registered with ``CLEANUP`` and stopped by
pid (never by name) when the bench ends, also on Ctrl-C, SIGTERM or an
exception.  Network namespaces are created with a ``zpb-<pid>-<random>`` prefix
and deleted afterwards; traffic only ever goes to 127.0.0.1 or to the
namespaces and veth pairs created here.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENV = ROOT / ".venv"
PYTHON = str(VENV / "bin" / "python") if (VENV / "bin" / "python").exists() else sys.executable
ZPROVD = [PYTHON, "-m", "zprovd"]
RESULTS = BENCH / "results"
TMP = RESULTS / "tmp"
TOOLS = BENCH / ".tools"
NS_PREFIX = "zpb-"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------
# Cleanup: everything started is stopped, in reverse order, exactly once.


class Cleanup:
    def __init__(self) -> None:
        self._actions: list[tuple[str, Callable[[], None]]] = []
        self._lock = threading.Lock()

    def push(self, name: str, action: Callable[[], None]) -> Callable[[], None]:
        with self._lock:
            self._actions.append((name, action))
        return action

    def run_one(self, action: Callable[[], None]) -> None:
        with self._lock:
            self._actions = [(n, a) for n, a in self._actions if a is not action]
        try:
            action()
        except Exception as exc:  # cleanup goes on whatever happens
            print(f"[bench] cleanup failed: {exc}", file=sys.stderr)

    def run_all(self) -> None:
        while True:
            with self._lock:
                if not self._actions:
                    return
                name, action = self._actions.pop()
            try:
                action()
            except Exception as exc:
                print(f"[bench] cleanup of {name} failed: {exc}", file=sys.stderr)


CLEANUP = Cleanup()
atexit.register(CLEANUP.run_all)


def _on_signal(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)


# ---------------------------------------------------------------------------
# Processes.


class Proc:
    """A subprocess with its output in a log file; stopped by pid."""

    def __init__(self, name: str, argv: list[str], log_path: Path | None = None, env: dict | None = None,
                 cwd: Path | None = None, stdout_pipe: bool = False):
        self.name = name
        self.argv = argv
        self.log_path = log_path or (TMP / f"{name}.log")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")
        self.popen = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log, stderr=self._log,
            env=env, cwd=str(cwd or ROOT), start_new_session=True,
        )
        self.pid = self.popen.pid
        self._cleanup = CLEANUP.push(f"process {name} ({self.pid})", self._stop)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def _stop(self, timeout: float = 15.0) -> None:
        p = self.popen
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        self._log.close()

    def stop(self) -> None:
        CLEANUP.run_one(self._cleanup)


def run(argv: list[str], timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """A command that must finish within ``timeout`` seconds."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_tcp(host: str, port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {timeout}s")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM... of a process, in KiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Vm"):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU time used so far by a process."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


# ---------------------------------------------------------------------------
# Network namespaces.


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return run(["ip", *args], timeout=20, check=check)


def _ns_name(rest: str) -> str:
    """``zpb-<pid of this run>-<rest>``: a later run can tell whether its owner still runs."""
    return f"{NS_PREFIX}{os.getpid()}-{rest}"


def _owner_alive(name: str) -> bool:
    owner = name[len(NS_PREFIX):].split("-", 1)[0]
    if not owner.isdigit() or int(owner) == os.getpid():
        return False
    try:
        os.kill(int(owner), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_namespaces() -> None:
    """Namespaces left by an earlier run of the bench that was killed hard
    (not those of another run still going)."""
    out = ip("netns", "list", check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if name.startswith(NS_PREFIX) and not _owner_alive(name):
            _kill_ns(name)
            ip("netns", "del", name, check=False)


def _kill_ns(ns: str) -> None:
    out = ip("netns", "pids", ns, check=False).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def ns_exec(ns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv] if ns else argv


@dataclass
class NetPair:
    """Two namespaces joined by a veth pair: server ``prefix.0.1``, client ``prefix.0.2`` (/16)."""

    tag: str
    prefix: str  # "10.211"
    server_ns: str = ""
    client_ns: str = ""
    server_if: str = ""
    client_if: str = ""
    created: list[str] = field(default_factory=list)
    remove: Callable[[], None] | None = None

    def close(self) -> None:
        if self.remove is not None:
            CLEANUP.run_one(self.remove)
            self.remove = None

    @property
    def server_ip(self) -> str:
        return f"{self.prefix}.0.1"

    @property
    def client_ip(self) -> str:
        return f"{self.prefix}.0.2"


def make_pair(prefix: str = "10.211") -> NetPair:
    tag = secrets.token_hex(3)
    n = NetPair(tag, prefix, _ns_name(f"{tag}-s"), _ns_name(f"{tag}-c"), f"zbs{tag}", f"zbc{tag}")

    def remove() -> None:
        for ns in n.created:
            _kill_ns(ns)
        time.sleep(0.2)
        for ns in n.created:
            ip("netns", "del", ns, check=False)

    n.remove = CLEANUP.push(f"namespaces {n.server_ns} {n.client_ns}", remove)
    for ns in (n.server_ns, n.client_ns):
        ip("netns", "add", ns)
        n.created.append(ns)
    # The veth is created inside the server namespace with its peer in the
    # client namespace: it never exists in the host's namespace.
    ip("-n", n.server_ns, "link", "add", n.server_if, "type", "veth", "peer", "name", n.client_if,
       "netns", n.client_ns)
    ip("-n", n.server_ns, "addr", "add", f"{n.server_ip}/16", "dev", n.server_if)
    ip("-n", n.client_ns, "addr", "add", f"{n.client_ip}/16", "dev", n.client_if)
    for ns, interface in ((n.server_ns, n.server_if), (n.client_ns, n.client_if)):
        ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", ns, "link", "set", interface, "up")
    return n


def make_single_ns(name: str) -> tuple[str, Callable[[], None]]:
    """One namespace with only its loopback up (for dnsmasq's TFTP on port 69), and its remover."""
    ns = _ns_name(f"{secrets.token_hex(3)}-{name}")

    def remove() -> None:
        _kill_ns(ns)
        time.sleep(0.2)
        ip("netns", "del", ns, check=False)

    action = CLEANUP.push(f"namespace {ns}", remove)
    ip("netns", "add", ns)
    ip("-n", ns, "link", "set", "lo", "up")
    return ns, lambda: CLEANUP.run_one(action)


# ---------------------------------------------------------------------------
# The daemon.

SERVING = re.compile(r"zprovd: serving (\w+) on (\S+):(\d+)$", re.MULTILINE)


def _daemon_knows(section: str) -> bool:
    """Whether the checked-out zprovd has a config section (the tree moves)."""
    return _config_mentions(f'section("{section}")')


def _config_mentions(text: str) -> bool:
    """Whether the checked-out zprovd's config.py has ``text`` (a section, a key)."""
    try:
        return text in (ROOT / "zprovd" / "config.py").read_text()
    except OSError:
        return False


class Zprovd:
    """``zprovd run`` with a config of its own, optionally inside a namespace."""

    def __init__(self, name: str, workdir: Path, host: str = "127.0.0.1", firmware_dir: Path | None = None,
                 http: bool = True, https: bool = True, tftp: bool = True, dhcp: str = "",
                 db: Path | None = None, ns: str | None = None, extra: str = "",
                 base_url: str | None = None, ports: dict[str, int] | None = None):
        self.name = name
        self.workdir = workdir
        self.ns = ns
        self.host = host
        workdir.mkdir(parents=True, exist_ok=True)
        self.state = workdir / "state"
        self.state.mkdir(exist_ok=True)
        if db is not None and not (self.state / "zprovd.sqlite3").exists():
            shutil.copy(db, self.state / "zprovd.sqlite3")
        ports = ports or {}

        def listen(protocol: str, enabled: bool) -> str:
            return f'["{host}:{ports.get(protocol, 0)}"]' if enabled else "[]"
        metrics = "\n[metrics]\nlisten = []\n" if _daemon_knows("metrics") else ""
        # The bench's clients all share one address (tftpd-hpa has no such limit).
        per_client = "\n            max_transfers_per_client = 4096" if _config_mentions('"max_transfers_per_client"') else ""
        text = textwrap.dedent(f"""\
            state_dir = "{self.state}"
            [http]
            listen = {listen("http", http)}
            [https]
            listen = {listen("https", https)}
            [tftp]
            listen = {listen("tftp", tftp)}
            firmware_dir = "{firmware_dir or ''}"{per_client}
            [backend]
            type = "sqlite"
            [provisioning]
            server = "{host}"
            base_url = "{base_url or f'http://{host}/'}"
            """) + metrics + extra + ("\n" + dhcp if dhcp else "")
        self.config = workdir / "zprovd.toml"
        self.config.write_text(text)
        self.proc: Proc | None = None
        self.ports: dict[str, int] = {}

    def cli(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return run([*ZPROVD, "-c", str(self.config), *args], timeout=timeout)

    def start(self, expect: tuple[str, ...] = ("http",), timeout: float = 60) -> "Zprovd":
        self.proc = Proc(self.name, ns_exec(self.ns, [*ZPROVD, "-c", str(self.config), "run"]),
                         log_path=self.workdir / "daemon.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.proc.log_text()
            for m in SERVING.finditer(text):
                self.ports.setdefault(m.group(1), int(m.group(3)))
            if all(p in self.ports for p in expect):
                return self
            if not self.proc.alive():
                break
            time.sleep(0.1)
        tail = self.proc.log_text()[-3000:]
        self.stop()
        raise RuntimeError(f"zprovd {self.name} did not start:\n{tail}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


def bulk_import(config: Path, csv_path: Path, iterations: int | None) -> float:
    """``zprovd import``, optionally with fewer PBKDF2 iterations (bench data only); seconds taken."""
    code = (
        "import sys, zprovd.passwords as p\n"
        "if sys.argv[1] != 'default': p.ITERATIONS = int(sys.argv[1])\n"
        "from zprovd.cli import main\n"
        "sys.exit(main(['-c', sys.argv[2], 'import', sys.argv[3]]))\n"
    )
    started = time.monotonic()
    run([PYTHON, "-c", code, str(iterations or "default"), str(config), str(csv_path)], timeout=3600)
    return time.monotonic() - started


def dump_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str))
