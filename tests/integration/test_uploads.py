"""Polycom log uploads over HTTP PUT, against the real daemon with curl."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from conftest import Daemon, free_config, run_cli

pytestmark = pytest.mark.integration

MAC = "0004f2aabbcc"


def put(url: str, data: Path, *args: str) -> tuple[int, str]:
    """curl -T: a PUT with Content-Length (and Expect: 100-continue for a big file)."""
    r = subprocess.run(["curl", "-sS", "-g", "-T", str(data), "-w", "\n%{http_code}", *args, url],
                       capture_output=True, text=True, timeout=60)
    body, _, status = r.stdout.rpartition("\n")
    return int(status or 0), body + r.stderr


def install(tmp_path: Path, access: str, tftp: str = "", device_args: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A config with an upload folder, a user and the phone MAC: (config, folder)."""
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    config = free_config(tmp_path, extra=access)
    config.write_text(config.read_text().replace("[tftp]\n", f'[tftp]\nupload_dir = "{uploads}"\n{tftp}'))
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    r = run_cli(config, "device", "add", MAC, "--model", "polycom-vvx400", "--user", "u", *device_args)
    assert r.returncode == 0, r.stderr
    return config, uploads


@pytest.fixture
def daemon(tmp_path):
    config, uploads = install(tmp_path, '[access.per_mac]\nurl_key = "site-key"\n', "upload_max_bytes = 3000000\n")
    d = Daemon(config).start()
    yield d, uploads
    d.stop()


def test_a_phone_uploads_its_logs_by_put(daemon, tmp_path):
    d, uploads = daemon
    log = tmp_path / "app.log"
    log.write_bytes(os.urandom(2_500_000))  # curl sends Expect: 100-continue for it
    status, out = put(d.url("http", f"/site-key/{MAC.upper()}-app.log"), log, "-v")
    assert status == 201 and "HTTP/1.1 100 Continue" in out
    assert (uploads / f"{MAC}-app.log").read_bytes() == log.read_bytes()
    assert oct((uploads / f"{MAC}-app.log").stat().st_mode & 0o777) == "0o644"
    small = tmp_path / "boot.log"
    small.write_text("boot line\n")
    assert put(d.url("https", f"/site-key/{MAC}-boot.log"), small, "-k")[0] == 201
    assert put(d.url("http", f"/site-key/{MAC}-boot.log"), small)[0] == 200  # replaced
    assert (uploads / f"{MAC}-boot.log").read_text() == "boot line\n"
    d.wait_for_log(f'"PUT /***/{MAC.upper()}-app.log" 201')
    d.wait_for_log('"upload 2500000 bytes"')
    assert sorted(p.name for p in uploads.iterdir()) == [f"{MAC}-app.log", f"{MAC}-boot.log"]


@pytest.mark.parametrize("path,status", [
    (f"/{MAC}-app.log", 404),  # no URL key: as for its per-MAC files
    (f"/wrong/{MAC}-app.log", 404),
    ("/site-key/0004f2000001-app.log", 404),  # not a known phone
    (f"/site-key/{MAC}-phone.cfg", 403),  # not a log
    (f"/site-key/{MAC}.cfg", 403),
    ("/site-key/../x-app.log", 400),
])
def test_refused_uploads_store_nothing(daemon, tmp_path, path, status):
    d, uploads = daemon
    log = tmp_path / "x.log"
    log.write_bytes(b"x" * 5000)
    got, out = put(d.url("http", path), log, "--path-as-is")
    assert got == status, out
    assert list(uploads.iterdir()) == []


def test_too_big_or_cut_short_stores_nothing_and_keeps_the_old_file(daemon, tmp_path):
    d, uploads = daemon
    (uploads / f"{MAC}-app.log").write_text("the old log\n")
    big = tmp_path / "big.log"
    big.write_bytes(b"x" * 3_000_001)
    assert put(d.url("http", f"/site-key/{MAC}-app.log"), big)[0] == 413
    # A client that sends half its body and goes away.
    port = d.ports["http"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"PUT /site-key/{MAC}-app.log HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n".encode() + b"y" * 500)
        deadline = time.monotonic() + 10
        while not list(uploads.glob(".upload-*")) and time.monotonic() < deadline:
            time.sleep(0.02)  # until the upload has started: its temporary file is there
        assert list(uploads.glob(".upload-*"))
    d.wait_for_log(f'"PUT /***/{MAC}-app.log" 400')
    d.wait_for_log("connection lost after 500 bytes")
    assert [p.name for p in uploads.iterdir()] == [f"{MAC}-app.log"]
    assert (uploads / f"{MAC}-app.log").read_text() == "the old log\n"
    # Chunked bodies (no length) are refused.
    chunked = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-T", "-", "-H",
                              "Transfer-Encoding: chunked", d.url("http", f"/site-key/{MAC}-app.log")],
                             input=b"data", capture_output=True, timeout=30)
    assert chunked.stdout == b"413"
    assert (uploads / f"{MAC}-app.log").read_text() == "the old log\n"


def test_uploads_are_off_without_an_upload_folder(tmp_path):
    config = free_config(tmp_path)
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    assert run_cli(config, "device", "add", MAC, "--model", "polycom-vvx400", "--user", "u").returncode == 0
    d = Daemon(config).start()
    try:
        log = tmp_path / "x.log"
        log.write_text("x\n")
        r = subprocess.run(["curl", "-sS", "-i", "-T", str(log), d.url("http", f"/{MAC}-app.log")],
                           capture_output=True, text=True, timeout=30)
        assert r.stdout.startswith("HTTP/1.1 405") and "\nAllow: GET, HEAD\n" in r.stdout
    finally:
        d.stop()


def tftp_put(port: int, local: Path, remote: str) -> str:
    r = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "put", str(local), remote],
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr


def test_tftp_write_requests_get_the_same_decision(daemon, tmp_path):
    d, uploads = daemon
    log = tmp_path / "boot.log"
    log.write_bytes(os.urandom(70_000))
    assert "Error" not in tftp_put(d.ports["tftp"], log, f"site-key/{MAC}-boot.log")
    assert (uploads / f"{MAC}-boot.log").read_bytes() == log.read_bytes()
    for refused in (f"{MAC}-app.log", "site-key/0004f2000001-app.log", f"site-key/{MAC}.cfg"):
        assert "Error code 2" in tftp_put(d.ports["tftp"], log, refused)
    assert [p.name for p in uploads.iterdir()] == [f"{MAC}-boot.log"]
    d.wait_for_log(f'tftp 127.0.0.1 "WRQ ***/{MAC}-boot.log" 200 - - who={MAC} "upload"')
    d.wait_for_log('"WRQ ***/0004f2000001-app.log" 404')
    assert "site-key" not in d.log


def test_with_credentials_required_an_unknown_phone_is_challenged_like_a_known_one(tmp_path):
    config, uploads = install(tmp_path, '[access.per_mac]\nauth = "digest"\n',
                              device_args=("--http-user", "phone1", "--http-password", "Ph0ne-pass"))
    d = Daemon(config).start()
    try:
        log = tmp_path / "app.log"
        log.write_text("app log\n")
        assert put(d.url("http", f"/{MAC}-app.log"), log)[0] == 401
        assert put(d.url("http", "/0004f2000001-app.log"), log)[0] == 401  # unknown: the same answer
        assert put(d.url("http", f"/{MAC}-app.log"), log, "--digest", "-u", "phone1:wrong")[0] == 401
        assert list(uploads.iterdir()) == []
        assert put(d.url("http", f"/{MAC}-app.log"), log, "--digest", "-u", "phone1:Ph0ne-pass")[0] == 201
        assert (uploads / f"{MAC}-app.log").read_text() == "app log\n"
        assert "Ph0ne-pass" not in d.log
    finally:
        d.stop()
