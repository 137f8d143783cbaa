"""Running as a service: sd_notify, SIGHUP reload, SIGTERM draining, fail2ban,
/metrics, the systemd unit."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, Daemon, free_config, run_cli

pytestmark = pytest.mark.integration


def fetch(url: str, timeout: float = 10) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(predicate, timeout: float = 10, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


class NotifySocket:
    """A NOTIFY_SOCKET like systemd's: collects the daemon's messages."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def collect(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (socket.timeout, BlockingIOError):
                return self.messages
            self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line))

    def wait_for(self, key: str, value: str = "1", timeout: float = 10) -> dict[str, str]:
        return wait_until(
            lambda: next((m for m in self.collect() if m.get(key) == value), None), timeout, f"{key}={value}"
        )


def test_sd_notify_ready_reloading_watchdog_stopping(tmp_path):
    notify = NotifySocket(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="400000")
    d = Daemon(free_config(tmp_path), env=env).start()
    try:
        ready = notify.wait_for("READY")
        assert "serving http 127.0.0.1:" in ready["STATUS"] and "tftp" in ready["STATUS"]
        assert ready["MAINPID"] == str(d.proc.pid)
        notify.wait_for("WATCHDOG", timeout=5)
        before = len(notify.collect())
        d.proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING")
        wait_until(lambda: any(m.get("READY") == "1" for m in notify.collect()[before:]), what="READY after reload")
    finally:
        assert d.stop() == 0
    notify.wait_for("STOPPING")


@pytest.fixture
def override_daemon(tmp_path):
    ops = tmp_path / "ops" / "yealink"
    ops.mkdir(parents=True)
    bundled = (ROOT / "templates" / "yealink" / "mac.cfg.j2").read_text()
    (ops / "mac.cfg.j2").write_text(bundled + "# version A\n")
    config = free_config(tmp_path, extra='[templates]\ndirs = ["ops"]\n')
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    assert run_cli(config, "device", "add", "001565000001", "--model", "yealink-t48g", "--user", "u").returncode == 0
    d = Daemon(config).start()
    yield d, config, ops / "mac.cfg.j2", bundled
    d.stop()


def test_sighup_with_a_broken_template_keeps_the_old_one(override_daemon):
    d, _, template, bundled = override_daemon
    url = d.url("http", "/001565000001.cfg")
    assert b"# version A" in fetch(url)[1]
    template.write_text(bundled + "{% if %}\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log("reload refused, keeping the running configuration: template yealink/mac.cfg.j2: syntax error")
    status, body = fetch(url)
    assert status == 200 and b"# version A" in body
    template.write_text(bundled + "# version B\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log("reloaded")
    status, body = fetch(url)
    assert status == 200 and b"# version B" in body


def test_sighup_with_a_broken_config_keeps_the_running_one(override_daemon):
    d, config, _, _ = override_daemon
    good = config.read_text()
    config.write_text(good.replace("[http]\nlisten", "[http]\nlisen"))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log("reload refused, keeping the running configuration:")
    assert "[http] lisen: unknown key" in d.log
    assert fetch(d.url("http", "/001565000001.cfg"))[0] == 200


def test_sighup_rebinds_only_changed_listeners(tmp_path):
    config = free_config(tmp_path)
    d = Daemon(config).start()
    try:
        https_port = d.ports["https"]
        # a connection to the unchanged HTTPS listener, open across the reload
        held = socket.create_connection(("127.0.0.1", https_port))
        spare = socket.socket()
        spare.bind(("127.0.0.1", 0))
        new_port = spare.getsockname()[1]
        spare.close()
        text = config.read_text().replace('[http]\nlisten = ["127.0.0.1:0"]', f'[http]\nlisten = ["127.0.0.1:{new_port}"]')
        text = text.replace('[https]\nlisten = ["127.0.0.1:0"]', f'[https]\nlisten = ["127.0.0.1:{https_port}"]')
        # https was bound as port 0: name the port it got so it counts as unchanged
        config.write_text(text)
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for_log("reloaded")
        assert fetch(f"http://127.0.0.1:{new_port}/nothing")[0] == 404
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=2).close()
        held.sendall(b"\x16")  # still connected to the same socket
        held.close()
    finally:
        assert d.stop() == 0


def test_reload_under_load_fails_no_request(tmp_path):
    config = free_config(tmp_path)
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    d = Daemon(config).start()
    url = d.url("http", "/zoiper?user=u&password=pw")
    failures: list = []
    done = threading.Event()
    count = [0]

    def load():
        deadline = time.monotonic() + 30
        while not done.is_set() and time.monotonic() < deadline and count[0] < 3000:
            status, body = fetch(url)
            count[0] += 1
            if status != 200 or b"<username>u</username>" not in body:
                failures.append((status, body[:200]))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(5):
            wait_until(lambda: count[0] > 40 * (i + 1), what="requests")
            d.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: d.log.count("reloaded") > i, what=f"reload {i + 1}")
    finally:
        done.set()
        for t in threads:
            t.join()
    assert d.log.count("reloaded") >= 5
    assert count[0] > 200 and failures == []
    assert d.stop() == 0


def test_sigterm_during_a_tftp_transfer_lets_it_finish(tmp_path):
    firmware = tmp_path / "firmware"
    firmware.mkdir()
    data = os.urandom(24 * 1024 * 1024)
    (firmware / "big.rom").write_bytes(data)
    config = free_config(tmp_path)
    config.write_text(config.read_text().replace('[tftp]\nlisten = ["127.0.0.1:0"]', f'[tftp]\nlisten = ["127.0.0.1:0"]\nfirmware_dir = "{firmware}"'))
    d = Daemon(config).start()
    out = tmp_path / "out.rom"
    client = subprocess.Popen(["atftp", "-g", "-r", "big.rom", "-l", str(out), "127.0.0.1", str(d.ports["tftp"])],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(lambda: out.exists() and out.stat().st_size > 1024 * 1024, what="transfer under way")
    d.proc.send_signal(signal.SIGTERM)
    assert client.wait(120) == 0
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert d.proc.wait(60) == 0
    # no new transfer was accepted while it drained, and it said so
    assert "stopping" in d.log


def test_fail2ban_filter_matches_refusals_and_not_phones_or_successes(tmp_path):
    conf = (ROOT / "etc" / "fail2ban" / "filter.d" / "zprovd.conf").read_text()
    failregex = re.search(r"^failregex = (.+)$", conf, re.M).group(1)
    # fail2ban's <HOST> is a named group for an IPv4/IPv6 address or name.
    regex = re.compile(failregex.replace("<HOST>", r"(?P<host>[\w.:\-\[\]]+)"))
    config = free_config(tmp_path, extra="[zoiper]\nmax_failures = 3\nlockout = 60\n")
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    d = Daemon(config).start()
    fetch(d.url("http", "/zoiper?user=u&password=pw"))
    fetch(d.url("http", "/001565aabbcc.cfg"))  # a phone not registered yet
    fetch(d.url("http", "/zoiper?user=u&password=bad"))
    fetch(d.url("http", "/zoiper?user=nobody&password=bad"))
    fetch(d.url("http", "/zoiper?user=u&password=bad"))
    fetch(d.url("http", "/zoiper?user=u&password=pw"))  # locked out by now
    fetch(d.url("http", "/zoiper?user=a%0Afake%20line&password=bad"))
    # A quote in the request cannot end the quoted request early and slip past the filter.
    with socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=10) as s:
        s.sendall(b'GET /zoiper?user=v&password=bad&x=" HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n')
        assert s.recv(100).startswith(b"HTTP/1.1 ")
    fetch(d.url("http", "/zoiper?user=nul%00esc%1B&password=bad"))
    d.wait_for_log('"locked out"')
    d.wait_for_log("login nul\\x00esc\\x1b from")  # control characters written escaped
    d.stop()
    assert "\x00" not in d.log and "\x1b" not in d.log
    access = [line for line in d.log.splitlines() if "[zprovd.access]" in line]
    matched = [line for line in access if regex.search(line)]
    assert len(access) == 9
    assert len(matched) == 7, "\n".join(access)
    assert all(regex.search(line).group("host") == "127.0.0.1" for line in matched)
    unknown_phone = [line for line in access if '"unknown MAC"' in line]
    served = [line for line in access if '"zoiper zoiper/config-1.14.xml.j2"' in line]
    assert len(unknown_phone) == 1 and len(served) == 1
    assert not regex.search(unknown_phone[0]) and not regex.search(served[0])
    # a line break in a login cannot forge a second log line
    assert not any(line.startswith("fake line") for line in d.log.splitlines())


def test_metrics_and_healthz(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    config = free_config(tmp_path)
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    d = Daemon(config).start(expect=("http", "https", "tftp", "metrics"))
    try:
        def sample(name: str, **labels) -> float | None:
            text = fetch(f"http://127.0.0.1:{d.ports['metrics']}/metrics")[1].decode()
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                        return s.value
            return None

        assert sample("zprovd_requests_total", protocol="http", status="200") is None  # nothing answered yet
        before = 0
        for _ in range(3):
            assert fetch(d.url("http", "/zoiper?user=u&password=pw"))[0] == 200
        assert fetch(d.url("http", "/nothing.cfg"))[0] == 404
        subprocess.run(["curl", "-s", "-o", "/dev/null", f"tftp://127.0.0.1:{d.ports['tftp']}/001565aabbcc.cfg"], timeout=30)
        assert sample("zprovd_requests_total", protocol="http", status="200") == before + 3
        assert sample("zprovd_requests_total", protocol="http", status="404") >= 1
        assert sample("zprovd_requests_total", protocol="tftp", status="404") >= 1
        assert sample("zprovd_response_bytes_total", protocol="http", status="200") > 0
        # the first answers need a look-up and a render; a repeat comes from the document cache
        assert sample("zprovd_render_seconds_count", kind="zoiper") >= 1
        assert sample("zprovd_backend_lookup_seconds_count", operation="get_user") >= 1
        assert sample("zprovd_document_cache_hits_total") >= 1
        assert sample("zprovd_document_cache_misses_total") >= 1
        assert sample("zprovd_document_cache_bytes") > 0
        assert sample("zprovd_tftp_sessions_active") == 0
        assert sample("zprovd_tftp_retransmissions_total") == 0
        status, body = fetch(f"http://127.0.0.1:{d.ports['metrics']}/healthz")
        assert status == 200 and body == b"ok\n"
    finally:
        d.stop()


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "systemd" / "zprovd.service").read_text()
    assert "Type=notify" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    for directive in ("ProtectSystem=strict", "ProtectHome=true", "PrivateTmp=true", "NoNewPrivileges=true",
                      "RestrictAddressFamilies=", "SystemCallFilter=@system-service", "StateDirectory=zprovd",
                      "ConfigurationDirectory=zprovd", "AmbientCapabilities=CAP_NET_BIND_SERVICE"):
        assert directive in unit, directive
    # The unit names /opt/zprovd/bin/zprovd; verify checks that it exists, so
    # point it at this checkout's entry point.
    import sys

    zprovd = Path(sys.executable).parent / "zprovd"
    (tmp_path / "zprovd.service").write_text(unit.replace("/opt/zprovd/bin/zprovd", str(zprovd)))
    dropin = tmp_path / "zprovd.service.d"
    dropin.mkdir()
    shutil.copy(ROOT / "systemd" / "zprovd.service.d" / "dhcp.conf", dropin)
    r = subprocess.run([analyze, "verify", str(tmp_path / "zprovd.service")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_started_as_root_it_binds_then_runs_as_the_configured_user(daemons_root_dir):
    import pwd

    base = daemons_root_dir
    nobody = pwd.getpwnam("nobody")
    config = free_config(base, extra='[server]\nuser = "nobody"\n')
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    assert run_cli(config, "device", "add", "001565000001", "--model", "yealink-t48g", "--user", "u").returncode == 0
    d = Daemon(config).start()
    try:
        status = Path(f"/proc/{d.proc.pid}/status").read_text()
        uids = next(l for l in status.splitlines() if l.startswith("Uid:")).split()[1:]
        assert uids == [str(nobody.pw_uid)] * 4
        d.wait_for_log("running as user nobody")
        # it still reads and writes its state
        assert fetch(d.url("http", "/zoiper?user=u&password=pw"))[0] == 200
        assert fetch(d.url("http", "/001565000001.cfg"))[0] == 200
        assert (base / "state" / "zprovd.sqlite3").stat().st_uid == nobody.pw_uid
        assert "Traceback" not in d.log and "error" not in d.log.lower()
    finally:
        assert d.stop() == 0


@pytest.fixture
def daemons_root_dir():
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("dropping privileges needs root")
    try:
        import pwd

        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    # pytest's tmp_path is private to root (0700): the dropped user could not
    # reach its state there.
    base = Path(tempfile.mkdtemp(prefix="zprovd-drop-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)
