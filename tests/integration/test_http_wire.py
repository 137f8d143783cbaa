"""zprovd's own HTTP/1.1 layer against real clients: curl, openssl s_client and raw sockets."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from conftest import Daemon, curl, free_config, run_cli

pytestmark = pytest.mark.integration

MAC = "001565aabbcc"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wire")
    firmware = tmp / "firmware"
    firmware.mkdir()
    (firmware / "big.rom").write_bytes(os.urandom(8 * 1024 * 1024))
    config = free_config(tmp)
    config.write_text(config.read_text().replace('[tftp]\nlisten = ["127.0.0.1:0"]',
                                                 f'[tftp]\nlisten = ["127.0.0.1:0"]\nfirmware_dir = "{firmware}"'))
    assert run_cli(config, "user", "add", "u", "--password", "pw").returncode == 0
    assert run_cli(config, "device", "add", MAC, "--model", "yealink-t48g", "--user", "u").returncode == 0
    d = Daemon(config).start()
    d.firmware = firmware
    yield d
    d.stop()


def test_curl_reuses_one_connection_for_several_files(daemon):
    r = curl("-v", "-o", "/dev/null", "-o", "/dev/null", "-o", "/dev/null",
             daemon.url("http", f"/{MAC}.cfg"), daemon.url("http", "/y000000000035.cfg"),
             daemon.url("http", f"/{MAC}.cfg"))
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(b"< HTTP/1.1 200") == 3
    assert r.stderr.count(b"Connected to") == 1 and b"Re-using existing connection" in r.stderr


def test_http10_clients_get_their_file_and_a_closed_connection(daemon):
    r = curl("-0", "-i", daemon.url("http", f"/{MAC}.cfg"))
    assert r.returncode == 0 and r.stdout.startswith(b"HTTP/1.1 200")
    assert b"Connection: close" in r.stdout and b"account.1" in r.stdout


def test_pipelined_requests_are_answered_in_order(daemon):
    requests = b"".join(b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path
                        for path in (f"/{MAC}.cfg".encode(), b"/nothing-here.cfg", b"/y000000000035.cfg"))
    with socket.create_connection(("127.0.0.1", daemon.ports["http"]), timeout=15) as s:
        s.sendall(requests + b"GET /last HTTP/1.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", data)  # bodies do not end in a newline
    assert statuses == [b"200", b"404", b"200", b"404"]
    assert data.index(b"account.1") < data.index(b"HTTP/1.1 404")


def test_tls_clients_offering_h2_get_http11(daemon):
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{daemon.ports['https']}",
                        "-alpn", "h2,http/1.1", "-quiet", "-ign_eof"],
                       input=b"GET /y000000000035.cfg HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                       capture_output=True, timeout=30)
    assert r.stdout.startswith(b"HTTP/1.1 200"), (r.stdout[:200], r.stderr[-500:])
    r = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{daemon.ports['https']}",
                        "-alpn", "h2,http/1.1"], input=b"", capture_output=True, timeout=30)
    assert b"ALPN protocol: http/1.1" in r.stdout


def test_a_client_leaving_in_the_middle_of_a_firmware_download_harms_nothing(daemon):
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", daemon.ports["http"]), timeout=15) as s:
            s.sendall(b"GET /big.rom HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200")
        # closed with most of 8 MiB unsent
    r = curl("-o", "/dev/null", "-w", "%{http_code} %{size_download}", daemon.url("http", "/big.rom"))
    assert r.stdout == b"200 %d" % (8 * 1024 * 1024)
    daemon.wait_for_log('"GET /big.rom" 200 ')
    assert "Traceback" not in daemon.log and "Unhandled" not in daemon.log


def test_http_listeners_queue_a_boot_storm_of_connections(daemon):
    # For a listening socket ss shows the accept backlog as Send-Q.  Twisted's
    # default of 50 drops the handshakes of phones rebooting together.
    for proto in ("http", "https"):
        r = subprocess.run(["ss", "-ltnH", f"sport = :{daemon.ports[proto]}"], capture_output=True, text=True,
                           timeout=15)
        rows = [line.split() for line in r.stdout.splitlines()]
        assert [row[:3] for row in rows] == [["LISTEN", "0", "1024"]], r.stdout
