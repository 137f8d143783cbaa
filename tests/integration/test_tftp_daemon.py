"""TFTP through the running daemon: the same bytes as HTTP, firmware, safety."""

from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from conftest import Daemon, curl, free_config, needs_ipv6, run_cli

pytestmark = pytest.mark.integration


def tftp_get(port: int, name: str, dest, host: str = "127.0.0.1") -> subprocess.CompletedProcess:
    return subprocess.run(["tftp", "-m", "binary", host, str(port), "-c", "get", name, str(dest)],
                          capture_output=True, text=True, timeout=60)


def http_get(d: Daemon, path: str) -> tuple[int, bytes]:
    r = curl("-w", "\n%{http_code}", d.url("http", path))
    body, _, status = r.stdout.rpartition(b"\n")
    return int(status), body


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tftpd")
    firmware = tmp / "firmware"
    (firmware / "sub").mkdir(parents=True)
    (firmware / "T48G-35.83.0.35.rom").write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    (firmware / "sub" / "nested.bin").write_bytes(b"nested")
    (firmware / "001565aabbcc.cfg").write_bytes(b"a static file that must lose to the rendered one")
    (tmp / "secret.txt").write_text("outside the firmware folder")
    os.symlink(tmp / "secret.txt", firmware / "escape.txt")
    config = free_config(tmp)
    config.write_text(config.read_text().replace('[tftp]\nlisten = ["127.0.0.1:0"]',
                                                 f'[tftp]\nlisten = ["127.0.0.1:0", "[::1]:0"]\nfirmware_dir = "{firmware}"'))
    assert run_cli(config, "user", "add", "u", "--password", "pw", "--sip-password", "s<&>ip").returncode == 0
    assert run_cli(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "u").returncode == 0
    assert run_cli(config, "device", "add", "0004f2000001", "--model", "polycom-vvx400", "--user", "u").returncode == 0
    d = Daemon(config).start()
    d.firmware = firmware
    yield d
    d.stop()


@pytest.mark.parametrize("name", ["001565aabbcc.cfg", "y000000000035.cfg", "0004f2000001-phone.cfg", "000000000000.cfg"])
def test_tftp_serves_the_same_bytes_as_http(daemon, tmp_path, name):
    r = tftp_get(daemon.ports["tftp"], name, tmp_path / "out")
    assert r.returncode == 0 and not r.stderr, r.stderr
    status, body = http_get(daemon, "/" + name)
    assert status == 200
    assert (tmp_path / "out").read_bytes() == body


def test_firmware_over_tftp_and_http_root_and_firmware_prefix(daemon, tmp_path):
    original = (daemon.firmware / "T48G-35.83.0.35.rom").read_bytes()
    digest = hashlib.sha256(original).hexdigest()
    assert tftp_get(daemon.ports["tftp"], "T48G-35.83.0.35.rom", tmp_path / "fw").returncode == 0
    assert hashlib.sha256((tmp_path / "fw").read_bytes()).hexdigest() == digest
    for path in ("/T48G-35.83.0.35.rom", "/firmware/T48G-35.83.0.35.rom"):
        status, body = http_get(daemon, path)
        assert status == 200 and hashlib.sha256(body).hexdigest() == digest
    assert tftp_get(daemon.ports["tftp"], "sub/nested.bin", tmp_path / "n").returncode == 0
    assert (tmp_path / "n").read_bytes() == b"nested"


def test_firmware_over_http_ranges_conditional_and_head(daemon, tmp_path):
    """curl resuming a download, asking for a range, or checking freshness."""
    original = (daemon.firmware / "T48G-35.83.0.35.rom").read_bytes()
    url = daemon.url("http", "/T48G-35.83.0.35.rom")
    r = curl("-D", str(tmp_path / "h"), "-r", "100-1099", url)
    assert r.stdout == original[100:1100]
    head = (tmp_path / "h").read_text().lower()
    assert head.startswith("http/1.1 206") and f"content-range: bytes 100-1099/{len(original)}" in head
    (tmp_path / "part").write_bytes(original[:1000])
    curl("-C", "-", "-o", str(tmp_path / "part"), url)  # resume: asks for bytes=1000-
    assert (tmp_path / "part").read_bytes() == original
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-r", f"{len(original)}-", url)
    assert r.stdout == b"416"
    mtime = os.stat(daemon.firmware / "T48G-35.83.0.35.rom").st_mtime
    r = curl("-o", "/dev/null", "-w", "%{http_code}", "-z", str(daemon.firmware / "T48G-35.83.0.35.rom"), url)
    assert r.stdout == b"304", mtime
    r = curl("-I", url)
    assert r.stdout.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(original)}".encode() in r.stdout
    assert b"Last-Modified: " in r.stdout


def test_rendered_files_win_a_name_clash(daemon, tmp_path):
    assert tftp_get(daemon.ports["tftp"], "001565aabbcc.cfg", tmp_path / "c").returncode == 0
    assert b"static file" not in (tmp_path / "c").read_bytes()
    assert b"account.1.password" in (tmp_path / "c").read_bytes()


@pytest.mark.parametrize("name", ["../secret.txt", "/etc/passwd", "sub/../../secret.txt", "escape.txt", "..\\secret.txt"])
def test_names_escaping_the_firmware_folder_are_refused(daemon, tmp_path, name):
    r = tftp_get(daemon.ports["tftp"], name, tmp_path / "x")
    assert r.returncode != 0 or "Error" in r.stdout + r.stderr
    assert not (tmp_path / "x").exists() or b"outside" not in (tmp_path / "x").read_bytes()


def test_windows_separators_are_normalised(daemon, tmp_path):
    r = tftp_get(daemon.ports["tftp"], "sub\\nested.bin", tmp_path / "w")
    assert r.returncode == 0 and (tmp_path / "w").read_bytes() == b"nested"


@needs_ipv6
def test_ipv6_loopback(daemon, tmp_path):
    v6_port = next(int(l.rsplit(":", 1)[1]) for l in daemon.log.splitlines() if l.startswith("zprovd: serving tftp on ::1:"))
    r = tftp_get(v6_port, "001565aabbcc.cfg", tmp_path / "v6", host="::1")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "v6").read_bytes() == http_get(daemon, "/001565aabbcc.cfg")[1]


def test_write_requests_are_refused_by_default(daemon, tmp_path):
    (tmp_path / "up.log").write_text("log")
    r = subprocess.run(["tftp", "127.0.0.1", str(daemon.ports["tftp"]), "-c", "put", str(tmp_path / "up.log"), "001565aabbcc-boot.log"],
                       capture_output=True, text=True, timeout=60)
    assert "Error code 2" in r.stdout + r.stderr
