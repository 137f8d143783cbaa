"""Who may fetch a phone's secrets: each policy with real clients (curl,
curl --digest, curl --cert, tftp), scan detection, hostile requests."""

from __future__ import annotations

import datetime
import http.client
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from lxml import etree
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from conftest import Daemon, free_config, run_cli

pytestmark = pytest.mark.integration

MAC = "001565aabbcc"
SECRET = "sip-secret-77"


def curl_status(url: str, *args: str) -> tuple[int, bytes]:
    r = subprocess.run(["curl", "-sS", "-g", "-w", "\n%{http_code}", *args, url], capture_output=True, timeout=30)
    body, _, status = r.stdout.rpartition(b"\n")
    return int(status or 0), body


def tftp_get(port: int, name: str, dest: Path) -> bytes | None:
    dest.unlink(missing_ok=True)
    r = subprocess.run(["tftp", "-m", "binary", "127.0.0.1", str(port), "-c", "get", name, str(dest)],
                       capture_output=True, text=True, timeout=60)
    return dest.read_bytes() if r.returncode == 0 and "Error" not in r.stdout + r.stderr and dest.exists() else None


def start(tmp_path: Path, access: str, device_args: tuple[str, ...] = (), https_extra: str = "") -> Daemon:
    config = free_config(tmp_path, extra=access)
    if https_extra:
        config.write_text(config.read_text().replace("[https]\n", "[https]\n" + https_extra))
    assert run_cli(config, "user", "add", "u", "--password", "pw", "--sip-password", SECRET).returncode == 0
    r = run_cli(config, "device", "add", MAC, "--model", "yealink-t48g", "--user", "u", *device_args)
    assert r.returncode == 0, r.stderr
    return Daemon(config).start()


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


def test_cidr_allow_lists_per_group_and_protocol(tmp_path, daemons):
    d = start(tmp_path, '[access.per_mac]\nallow = ["127.0.0.2/32"]\ntftp_allow = []\n'
                        '[access.zoiper]\nallow = ["127.0.0.2/32"]\n')
    daemons.append(d)
    status, body = curl_status(d.url("http", "/zoiper?user=u&password=p"))  # Zoiper shows an <error> document
    assert status == 403 and etree.fromstring(body).get("code") == "1"
    url = d.url("http", f"/{MAC}.cfg")
    status, body = curl_status(url, "--interface", "127.0.0.2")
    assert status == 200 and SECRET.encode() in body
    status, body = curl_status(url)  # from 127.0.0.1
    assert status == 403 and SECRET.encode() not in body
    d.wait_for_log('who=001565aabbcc "address not allowed for per-mac files over http"')
    # the generic file is another group: still open
    assert curl_status(d.url("http", "/y000000000035.cfg"))[0] == 200
    # TFTP per-MAC refused (tftp_allow = []), generic still served over TFTP
    assert tftp_get(d.ports["tftp"], f"{MAC}.cfg", tmp_path / "t") is None
    assert tftp_get(d.ports["tftp"], "y000000000035.cfg", tmp_path / "g") is not None
    d.wait_for_log("address not allowed for per-mac files over tftp")


def test_x_forwarded_for_is_believed_only_from_trusted_proxies(tmp_path, daemons):
    d = start(tmp_path, '[access]\ntrusted_proxies = ["127.0.0.1/32"]\n[access.per_mac]\nallow = ["10.9.8.0/24"]\n')
    daemons.append(d)
    url = d.url("http", f"/{MAC}.cfg")
    assert curl_status(url, "-H", "X-Forwarded-For: 10.9.8.7")[0] == 200  # from the trusted proxy
    assert curl_status(url, "-H", "X-Forwarded-For: 198.51.100.1")[0] == 403
    assert curl_status(url, "--interface", "127.0.0.2", "-H", "X-Forwarded-For: 10.9.8.7")[0] == 403  # untrusted


def test_url_key_per_install_and_per_device(tmp_path, daemons):
    d = start(tmp_path, '[access.per_mac]\nurl_key = "k3y-for-site"\n')
    daemons.append(d)
    assert curl_status(d.url("http", f"/provision/k3y-for-site/{MAC}.cfg"))[0] == 200
    assert curl_status(d.url("http", f"/provision/{MAC}.cfg"))[0] == 404
    assert curl_status(d.url("http", f"/wrong-key/{MAC}.cfg"))[0] == 404
    assert tftp_get(d.ports["tftp"], f"k3y-for-site/{MAC}.cfg", tmp_path / "t") is not None
    assert tftp_get(d.ports["tftp"], f"{MAC}.cfg", tmp_path / "t") is None
    # a device with its own key needs both
    r = run_cli(d.config, "device", "add", "001565000002", "--model", "yealink-t48g", "--user", "u", "--url-key", "dev2-key")
    assert r.returncode == 0, r.stderr
    assert curl_status(d.url("http", "/k3y-for-site/dev2-key/001565000002.cfg"))[0] == 200
    assert curl_status(d.url("http", "/k3y-for-site/001565000002.cfg"))[0] == 404
    assert curl_status(d.url("http", "/%6B3y-for-site/dev2-key/001565000002.cfg?x=1"))[0] == 200
    assert curl_status(d.url("http", "/k3y-for-site/y000000000035.cfg"))[0] == 200  # generic: no key needed
    assert curl_status(d.url("http", "/k3y-for-site/dev2-key/y000000000035.cfg"))[0] == 200  # the phone's own URL
    # The keys are credentials: the access lines show them as ***.
    d.wait_for_log('"GET /provision/***/001565aabbcc.cfg" 200')
    d.wait_for_log('"GET /***/***/001565000002.cfg" 200')
    d.wait_for_log('"GET /***/***/001565000002.cfg?x=1" 200')
    d.wait_for_log('"GET /***/y000000000035.cfg" 200')
    d.wait_for_log('"GET /***/***/y000000000035.cfg" 200')
    d.wait_for_log('"RRQ ***/001565aabbcc.cfg" 200')
    d.wait_for_log('"GET /wrong-key/001565aabbcc.cfg" 404')
    assert "k3y-for-site" not in d.log and "dev2-key" not in d.log


def test_device_url_keys_are_hidden_from_the_first_request_and_after_a_change(tmp_path, daemons):
    # The device has its key before the daemon starts; its first request
    # since is for a generic file under the key, over TFTP then HTTP.
    d = start(tmp_path, "", ("--url-key", "dev1-key"))
    daemons.append(d)
    assert tftp_get(d.ports["tftp"], "dev1-key/y000000000035.cfg", tmp_path / "t") is not None
    assert curl_status(d.url("http", "/dev1-key/y000000000035.cfg"))[0] == 200
    # A key given to another device while the daemon runs, used at once.
    r = run_cli(d.config, "device", "add", "001565000002", "--model", "yealink-t48g", "--url-key", "dev2-key")
    assert r.returncode == 0, r.stderr
    assert curl_status(d.url("http", "/dev2-key/y000000000035.cfg"))[0] == 200
    assert curl_status(d.url("http", "/dev2-key/nothing-here.cfg"))[0] == 404
    d.wait_for_log('"RRQ ***/y000000000035.cfg" 200')
    d.wait_for_log('"GET /***/y000000000035.cfg" 200')
    d.wait_for_log('"GET /***/nothing-here.cfg" 404')
    assert "dev1-key" not in d.log and "dev2-key" not in d.log


@pytest.mark.parametrize("algorithms", [["SHA-256", "MD5"], ["MD5"]])
def test_digest_per_device(tmp_path, daemons, algorithms):
    quoted = ", ".join(f'"{a}"' for a in algorithms)
    d = start(tmp_path, f'[access.per_mac]\nauth = "digest"\ndigest_algorithms = [{quoted}]\n',
              ("--http-user", "phone1", "--http-password", "Ph0ne-pass"))
    daemons.append(d)
    url = d.url("http", f"/{MAC}.cfg")
    status, body = curl_status(url, "--digest", "-u", "phone1:Ph0ne-pass", "-v")
    assert status == 200 and SECRET.encode() in body
    status, _ = curl_status(url, "--digest", "-u", "phone1:wrong")
    assert status == 401
    r = subprocess.run(["curl", "-s", "-D", "-", "-o", "/dev/null", url], capture_output=True, text=True, timeout=30)
    offered = [l for l in r.stdout.splitlines() if l.lower().startswith("www-authenticate: digest")]
    assert [l.split("algorithm=")[1].split(",")[0] for l in offered] == algorithms
    # Basic is not accepted when auth = "digest"; TFTP per-MAC is refused by default
    assert curl_status(url, "--basic", "-u", "phone1:Ph0ne-pass")[0] == 401
    assert tftp_get(d.ports["tftp"], f"{MAC}.cfg", tmp_path / "t") is None
    # an unknown MAC is challenged like a known one: a scanner learns nothing
    assert curl_status(d.url("http", "/001565000077.cfg"))[0] == 401
    assert "Ph0ne-pass" not in d.log


def test_basic_with_one_shared_pair(tmp_path, daemons):
    d = start(tmp_path, '[access.per_mac]\nauth = "basic"\nhttp_user = "site"\nhttp_password = "shared-Pw"\n')
    daemons.append(d)
    url = d.url("https", f"/{MAC}.cfg")
    cert = d.config.parent / "state" / "tls" / "cert.pem"
    assert curl_status(url, "--cacert", str(cert), "-u", "site:shared-Pw")[0] == 200
    assert curl_status(url, "--cacert", str(cert), "-u", "site:nope")[0] == 401
    assert curl_status(url, "--cacert", str(cert))[0] == 401
    assert "shared-Pw" not in d.log


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject_cn: str, key, issuer_cert=None, issuer_key=None, ca: bool = False, san_dns: str | None = None):
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san_dns:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san_dns)]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, cert, key=None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


def test_mutual_tls_binds_the_certificate_to_the_mac(tmp_path, daemons):
    ca_key, other_ca_key = _key(), _key()
    ca = _cert("Test Vendor Device CA", ca_key, ca=True)
    other_ca = _cert("Somebody Else CA", other_ca_key, ca=True)
    _write(tmp_path / "ca.pem", ca)
    k1, k2, k3 = _key(), _key(), _key()
    _write(tmp_path / "dev1.pem", _cert(MAC.upper(), k1, ca, ca_key), k1)  # Yealink style: CN = MAC
    _write(tmp_path / "dev2.pem", _cert("SEP001565000002", k2, ca, ca_key, san_dns="phone-2"), k2)  # Cisco style
    _write(tmp_path / "rogue.pem", _cert(MAC, k3, other_ca, other_ca_key), k3)
    d = start(tmp_path, "[access.per_mac]\nclient_certificate = true\n", https_extra=f'client_ca = "{tmp_path / "ca.pem"}"\n')
    daemons.append(d)
    server_cert = str(d.config.parent / "state" / "tls" / "cert.pem")
    url = d.url("https", f"/{MAC}.cfg")

    def with_cert(name: str, target: str = url):
        return curl_status(target, "--cacert", server_cert, "--cert", str(tmp_path / f"{name}.pem"),
                           "--key", str(tmp_path / f"{name}.key"))

    status, body = with_cert("dev1")
    assert status == 200 and SECRET.encode() in body
    assert with_cert("dev2")[0] == 403  # a valid device certificate, for another MAC
    assert with_cert("rogue")[0] == 0  # not chained to a configured CA: the handshake fails
    assert curl_status(url, "--cacert", server_cert)[0] == 403  # no certificate
    assert curl_status(d.url("http", f"/{MAC}.cfg"))[0] == 403  # plain HTTP
    assert curl_status(d.url("https", "/y000000000035.cfg"), "--cacert", server_cert)[0] == 200  # generic: no cert needed
    d.wait_for_log("client certificate of another device")


def test_scan_from_one_address_is_refused_and_a_real_phone_still_served(tmp_path, daemons):
    d = start(tmp_path, "")
    daemons.append(d)
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=10)
    rng = random.Random(1)
    statuses = []
    deadline = time.monotonic() + 120
    for _ in range(1000):
        if time.monotonic() > deadline:
            break
        mac = "001565" + "".join(rng.choice("0123456789abcdef") for _ in range(6))
        conn.request("GET", f"/{mac}.cfg")
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    conn.close()
    assert len(statuses) == 1000
    assert statuses[:19] == [404] * 19
    assert set(statuses[20:]) == {403}  # refused once the window filled
    d.wait_for_log("refusing 127.0.0.1 for 600 s")
    d.wait_for_log('who=- "scanning"')
    # the scanner is refused everything, a real phone elsewhere is served
    assert curl_status(d.url("http", f"/{MAC}.cfg"))[0] == 403
    status, body = curl_status(d.url("http", "/zoiper?user=u&password=p"))  # Zoiper shows an <error> document
    assert status == 403 and etree.fromstring(body).tag == "error" and etree.fromstring(body).get("code") == "1"
    status, body = curl_status(d.url("http", f"/{MAC}.cfg"), "--interface", "127.0.0.2")
    assert status == 200 and SECRET.encode() in body
    seen = run_cli(d.config, "device", "seen").stdout.strip().splitlines()
    assert len(seen) <= 21  # the scan stopped being recorded once refused


def test_one_unknown_phone_booting_is_not_a_scan(tmp_path, daemons):
    d = start(tmp_path, "")
    daemons.append(d)
    for _ in range(30):  # a phone retrying its own files, as unregistered phones do
        for name in ("001565999999.boot", "001565999999.cfg"):
            assert curl_status(d.url("http", "/" + name), "--interface", "127.0.0.3")[0] == 404
    assert curl_status(d.url("http", f"/{MAC}.cfg"), "--interface", "127.0.0.3")[0] == 200
    assert "00:15:65:99:99:99" in run_cli(d.config, "device", "seen").stdout
    assert "scanning" not in d.log


def test_never_ban_ranges_are_never_refused(tmp_path, daemons):
    d = start(tmp_path, '[access.scan]\nmax_misses = 5\nnever_ban = ["127.0.0.0/8"]\n')
    daemons.append(d)
    for i in range(20):
        assert curl_status(d.url("http", f"/0015650000{i:02x}.cfg"))[0] == 404
    assert curl_status(d.url("http", f"/{MAC}.cfg"))[0] == 200


def _raw(port: int, data: bytes, timeout: float = 15) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)


def test_oversized_requests_are_refused_early(tmp_path, daemons):
    d = start(tmp_path, "")
    daemons.append(d)
    port = d.ports["http"]
    assert _raw(port, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 414")
    assert _raw(port, b"GET /" + b"a" * 20000).startswith(b"HTTP/1.1 414")
    big = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 200) for i in range(60))
    assert _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n").startswith(b"HTTP/1.1 431")
    many = b"".join(b"X-%d: v\r\n" % i for i in range(100))
    assert _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n").startswith(b"HTTP/1.1 431")
    assert _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n").startswith(b"HTTP/1.1 413")
    assert _raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n").startswith(b"HTTP/1.1 413")
    # the daemon still serves
    assert curl_status(d.url("http", f"/{MAC}.cfg"))[0] == 200


def test_slow_clients_are_timed_out(tmp_path, daemons):
    d = start(tmp_path, "")
    daemons.append(d)
    with socket.create_connection(("127.0.0.1", d.ports["http"]), timeout=20) as s:
        s.sendall(b"GET / HTTP/1.1\r\n")
        answer = b""
        for i in range(40):  # one header line a second: a slowloris client (bounded)
            try:
                s.sendall(b"X-Slow-%d: a\r\n" % i)
            except OSError:
                break
            s.settimeout(1)
            try:
                answer += s.recv(1024)
            except socket.timeout:
                continue
            if answer:
                break
    # The loop is bounded (40 lines, one a second): only a deadline in the
    # server ends it with a 408 before the client runs out of lines.
    assert answer.startswith(b"HTTP/1.1 408"), answer


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_memory_stays_bounded_under_a_flood_of_unknown_files(tmp_path, daemons):
    d = start(tmp_path, "")
    daemons.append(d)
    conn = http.client.HTTPConnection("127.0.0.1", d.ports["http"], timeout=10)

    def flood(n: int) -> None:
        for i in range(n):
            conn.request("GET", f"/{os.urandom(8).hex()}/{os.urandom(12).hex()}.cfg?x={i}")
            conn.getresponse().read()

    flood(1000)  # warm up: caches, interned strings, allocator pools
    before = _rss_kb(d.proc.pid)
    flood(8000)
    grown = _rss_kb(d.proc.pid) - before
    conn.close()
    assert grown < 8 * 1024, f"RSS grew {grown} KiB over 8000 requests for unknown files"


def test_log_level_set_and_changed_by_sighup_never_shows_a_url_key(tmp_path, daemons):
    access = '[access.per_mac]\nurl_key = "k3y-for-site"\n'
    d = start(tmp_path, access + '[log]\nlevel = "warn"\n')
    daemons.append(d)
    good = d.config.read_text()
    assert curl_status(d.url("http", f"/k3y-for-site/{MAC}.cfg"))[0] == 200
    # An error line is written after everything logged before it: no access line came.
    d.config.write_text(good.replace('level = "warn"', 'level = "loud"'))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log("reload refused, keeping the running configuration:")
    assert "[log] level: must be one of 'debug', 'info', 'warn', 'error', not 'loud'" in d.log
    assert '"GET ' not in d.log
    # Debug on a running daemon: each TFTP transfer's lines, the key hidden in them too.
    d.config.write_text(good.replace('level = "warn"', 'level = "debug"'))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log("reloaded")
    assert tftp_get(d.ports["tftp"], f"k3y-for-site/{MAC}.cfg", tmp_path / "t") is not None
    d.wait_for_log(f"TFTP RRQ '***/{MAC}.cfg' (octet) for 127.0.0.1:")
    d.wait_for_log(f'"RRQ ***/{MAC}.cfg" 200')
    d.wait_for_log("bytes in")  # the transfer's last line: done, N bytes in T s
    assert "k3y-for-site" not in d.log
    # The format changes on a reload too.
    d.config.write_text(good.replace('level = "warn"', 'level = "info"\nformat = "json"'))
    d.proc.send_signal(signal.SIGHUP)
    d.wait_for_log('"level": "info", "namespace": "zprovd.daemon", "message": "reloaded ')
