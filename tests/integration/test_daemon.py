"""The real daemon as a subprocess: start-up errors, signals, logs, live changes."""

from __future__ import annotations

import base64
import signal
import socket
from urllib.parse import quote

import pytest

from conftest import curl, free_config, run_cli

pytestmark = pytest.mark.integration

PASSWORD = "S3cret-pass-Wörd"


def add_demo_user(config, login="alice", password=PASSWORD):
    r = run_cli(config, "user", "add", login, "--password", password, "--display-name", "Alice", "--sip-password", "sip-Secret-9")
    assert r.returncode == 0, r.stderr


def test_serves_zoiper_over_http_and_https_with_generated_certificate(tmp_path, daemon_factory):
    config = free_config(tmp_path)
    add_demo_user(config)
    d = daemon_factory(config).start()
    r = curl("-w", "\n%{http_code}", d.url("http", f"/zoiper?user=alice&password={quote(PASSWORD)}"))
    body, status = r.stdout.rsplit(b"\n", 1)
    assert status == b"200", r
    assert b"<username>alice</username>" in body
    cert = tmp_path / "state" / "tls" / "cert.pem"
    assert cert.exists()
    r = curl("--cacert", str(cert), "-w", "\n%{http_code}", d.url("https", f"/zoiper?user=alice&password={quote(PASSWORD)}"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.endswith(b"\n200") and b"<username>alice</username>" in r.stdout
    # TLS 1.2 is the floor.
    r = curl("--cacert", str(cert), "--tlsv1.1", "--tls-max", "1.1", d.url("https", "/"))
    assert r.returncode != 0
    assert "does not name" not in d.log
    # Moved to another address: the certificate is kept (phones trust it), and the log says it does not fit.
    assert d.stop() == 0
    config.write_text(config.read_text().replace('server = "127.0.0.1"', 'server = "192.0.2.44"'))
    d = daemon_factory(config).start()
    d.wait_for_log("the self-signed certificate")
    assert "does not name [provisioning] server 192.0.2.44" in d.log


def test_port_in_use_is_one_clear_line(tmp_path, daemon_factory):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        config = free_config(tmp_path)
        config.write_text(config.read_text().replace('[http]\nlisten = ["127.0.0.1:0"]', f'[http]\nlisten = ["127.0.0.1:{port}"]'))
        r = run_cli(config, "run")
    finally:
        busy.close()
    assert r.returncode == 1
    assert f"zprovd: cannot listen for http on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_unreadable_certificate_is_one_clear_line(tmp_path):
    config = free_config(tmp_path, extra="")
    text = config.read_text().replace('[https]\n', f'[https]\ncertificate = "{tmp_path}/missing.pem"\nprivate_key = "{tmp_path}/key.pem"\n')
    config.write_text(text)
    r = run_cli(config, "run")
    assert r.returncode == 1
    assert f"zprovd: https: cannot read private key {tmp_path}/key.pem: No such file or directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_certificate_that_is_not_pem_is_one_clear_line(tmp_path):
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    config = free_config(tmp_path)
    config.write_text(config.read_text().replace('[https]\n', f'[https]\ncertificate = "{tmp_path}/cert.pem"\nprivate_key = "{tmp_path}/key.pem"\n'))
    r = run_cli(config, "run")
    assert r.returncode == 1
    assert f"{tmp_path}/key.pem is not an unencrypted PEM private key" in r.stderr
    assert "Traceback" not in r.stderr


def test_broken_database_is_one_clear_line(tmp_path):
    config = free_config(tmp_path)
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "zprovd.sqlite3").write_bytes(b"this is not a database" * 100)
    r = run_cli(config, "run")
    assert r.returncode == 1
    assert "zprovd: backend sqlite:" in r.stderr and "zprovd.sqlite3" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr


def test_config_error_exits_2_naming_file_and_key(tmp_path):
    config = free_config(tmp_path, extra="[zoiper]\npath = ['/z']\n")
    r = run_cli(config, "run")
    assert r.returncode == 2
    assert r.stderr.strip() == f"{config}: [zoiper] path: unknown key"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_the_daemon_cleanly(tmp_path, daemon_factory, sig):
    d = daemon_factory(free_config(tmp_path)).start()
    assert d.stop(sig) == 0
    assert "Traceback" not in d.log


def test_access_log_never_shows_a_password(tmp_path, daemon_factory):
    config = free_config(tmp_path)
    add_demo_user(config)
    d = daemon_factory(config).start()
    curl(d.url("http", f"/zoiper?user=alice&password={quote(PASSWORD)}&version=1.14"))
    curl(d.url("http", "/zoiper?user=alice&password=wrong-guess-77"))
    curl("-u", f"alice:{PASSWORD}", d.url("http", "/zoiper"))
    curl("-H", "Authorization: Basic " + base64.b64encode(b"alice:basic-guess-55").decode(), d.url("http", "/zoiper"))
    d.wait_for_log('who=alice "wrong password"')
    assert d.stop() == 0
    log = d.log
    assert "password=***" in log
    for secret in (PASSWORD, "wrong-guess-77", "basic-guess-55", "sip-Secret-9", base64.b64encode(f"alice:{PASSWORD}".encode()).decode()):
        assert secret not in log
    # one access line per request: client, method, path, status, bytes, milliseconds
    access = [l for l in log.splitlines() if "[zprovd.access]" in l]
    assert len(access) == 4, log
    assert all("127.0.0.1 \"GET /zoiper" in l and "ms" in l for l in access)


def test_cli_changes_are_seen_without_restart(tmp_path, daemon_factory):
    config = free_config(tmp_path)
    d = daemon_factory(config).start()
    url = d.url("http", "/zoiper?user=bob&password=bob-password-1")
    assert b'<error code="1">' in curl(url).stdout
    add_demo_user(config, "bob", "bob-password-1")
    assert b"<username>bob</username>" in curl(url).stdout
    assert run_cli(config, "user", "remove", "bob").returncode == 0
    assert b'<error code="1">' in curl(url).stdout


def test_check_reports_ok_and_problems(tmp_path):
    config = free_config(tmp_path)
    r = run_cli(config, "check")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    broken = tmp_path / "ops"
    (broken / "yealink").mkdir(parents=True)
    (broken / "yealink" / "mac.cfg.j2").write_text("{% if %}")
    config.write_text(config.read_text() + f'\n[templates]\ndirs = ["{broken}"]\n')
    r = run_cli(config, "check")
    assert r.returncode == 1
    assert "template yealink/mac.cfg.j2: syntax error line 1" in r.stderr


@pytest.mark.parametrize("extra, problem", [
    ('[server]\nuser = "no-such-user-zp"\n', "[server] user: no such user 'no-such-user-zp'"),
    ('[server]\nuser = "root"\ngroup = "no-such-group-zp"\n', "[server] group: no such group 'no-such-group-zp'"),
])
def test_check_finds_what_run_would_refuse(tmp_path, extra, problem):
    config = free_config(tmp_path)
    config.write_text(config.read_text() + "\n" + extra)
    r = run_cli(config, "check")
    assert r.returncode == 1 and problem in r.stderr, r.stderr


def test_check_reads_the_client_ca(tmp_path):
    config = free_config(tmp_path)
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    config.write_text(config.read_text().replace("[https]\n", f'[https]\nclient_ca = "{ca}"\n', 1))
    r = run_cli(config, "check")
    assert r.returncode == 1 and f"https: {ca} is not a PEM bundle of CA certificates" in r.stderr, r.stderr


def test_the_open_files_limit_is_raised_for_transfers_and_connections(tmp_path, daemon_factory):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit ({hard}) leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # the daemon inherits it
    try:
        d = daemon_factory(free_config(tmp_path)).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = open(f"/proc/{d.proc.pid}/limits").read()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert line.split()[3] == str(wanted), line
    d.wait_for_log(f"open files limit raised from 256 to {wanted}")


def test_with_json_logs_every_line_is_json(tmp_path, daemon_factory):
    import json
    import time

    config = free_config(tmp_path)
    config.write_text(config.read_text() + '\n[log]\nformat = "json"\nlevel = "info"\n')
    d = daemon_factory(config).start(expect=())  # no plain "serving" lines to wait for
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and sum('"serving ' in line for line in d.lines) < 4:
        time.sleep(0.1)
    assert d.stop() == 0
    records = [json.loads(line) for line in d.log.splitlines()]  # every line parses
    serving = [r["message"] for r in records if r["message"].startswith("serving ")]
    assert [m.split()[1] for m in serving] == ["http", "https", "metrics", "tftp"], serving
