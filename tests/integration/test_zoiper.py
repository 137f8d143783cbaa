"""Zoiper provisioning against the running daemon, with curl as the client."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from lxml import etree

from conftest import curl, free_config, run_cli

pytestmark = pytest.mark.integration

SCHEMAS = Path(__file__).resolve().parents[2] / "zprovd" / "schemas"
PASSWORD = "Pa$$ wörd&<1>"
MD5 = hashlib.md5(PASSWORD.encode()).hexdigest()
DISPLAY = 'Zoë "Z" <O\'Brien> & Co'
SIP_PASSWORD = "sip<&>'\"секрет"


def schema(name: str) -> etree.RelaxNG:
    return etree.RelaxNG(etree.parse(str(SCHEMAS / name)))


def get(url: str, *args: str) -> tuple[int, bytes, str]:
    r = curl("-g", "-D", "-", *args, url)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = head.decode("latin-1").lower()
    return status, body, headers


def assert_config_document(body: bytes, accounts: int = 1) -> etree._Element:
    doc = etree.fromstring(body)
    schema("zoiper-1.14.rng").assertValid(doc)
    assert len(doc.findall("accounts/account")) == accounts
    return doc


def assert_error_document(body: bytes, text: str) -> None:
    assert body.startswith(b'<?xml version="1.0"?>')
    doc = etree.fromstring(body)
    schema("zoiper-error.rng").assertValid(doc)
    assert doc.tag == "error" and doc.get("code") == "1" and doc.text == text


@pytest.fixture(scope="module")
def zoiper(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoiper")
    config = free_config(
        tmp,
        extra="""
        [zoiper]
        paths = ["/zoiper", "/prov/zoiper.php"]
        user_params = ["user", "login"]
        password_params = ["password", "pw"]
        version_params = ["version", "ver"]
        error_text = "Login failed: check your username & password."
        max_failures = 50
        """,
    )
    r = run_cli(config, "user", "add", "alice", "--password", PASSWORD, "--display-name", DISPLAY,
                "--sip-user", "1001", "--sip-password", SIP_PASSWORD, "--sip-domain", "pbx.example.net",
                "--var", "customer_sid=855")
    assert r.returncode == 0, r.stderr
    r = run_cli(config, "user", "add-account", "alice", "--sip-user", "1002", "--sip-password", "second-Secret",
                "--display-name", "Ålice mobile")
    assert r.returncode == 0, r.stderr
    r = run_cli(config, "user", "add", "bob", "--password", "bob-password")
    assert r.returncode == 0, r.stderr
    from conftest import Daemon

    d = Daemon(config).start()
    yield d, config
    d.stop()


@pytest.mark.parametrize("password", [PASSWORD, MD5, MD5.upper()], ids=["plain", "md5", "MD5"])
def test_plain_and_md5_passwords_verify(zoiper, password):
    d, _ = zoiper
    status, body, headers = get(d.url("http", "/zoiper"), "--get", "--data-urlencode", "user=alice",
                                "--data-urlencode", f"password={password}", "--data-urlencode", "version=1.14")
    assert status == 200
    assert "content-type: application/xml; charset=utf-8" in headers
    doc = assert_config_document(body, accounts=2)
    first, second = doc.findall("accounts/account")
    assert first.findtext("name") == DISPLAY
    assert first.findtext("username") == "1001"
    assert first.findtext("password") == SIP_PASSWORD
    assert first.findtext("SIP_domain") == "pbx.example.net"
    assert second.findtext("username") == "1002"
    assert second.findtext("name") == "Ålice mobile"
    assert doc.findtext("customer_sid") == "855"


@pytest.mark.parametrize("user_param,password_param,version_param,path", [
    ("user", "password", "version", "/zoiper"),
    ("login", "pw", "ver", "/prov/zoiper.php"),
    ("user", "pw", None, "/zoiper"),
])
def test_each_configured_parameter_name_and_path(zoiper, user_param, password_param, version_param, path):
    d, _ = zoiper
    query = f"{user_param}=bob&{password_param}=bob-password" + (f"&{version_param}=1.14" if version_param else "")
    status, body, _ = get(d.url("http", f"{path}?{query}"))
    assert status == 200
    assert assert_config_document(body).findtext("accounts/account/username") == "bob"


def test_version_selects_the_document(zoiper):
    d, _ = zoiper
    _, newest, _ = get(d.url("http", "/zoiper?user=bob&password=bob-password"))
    _, v114, _ = get(d.url("http", "/zoiper?user=bob&password=bob-password&version=1.14"))
    _, v115, _ = get(d.url("http", "/zoiper?user=bob&password=bob-password&version=2.3"))
    _, unknown, _ = get(d.url("http", "/zoiper?user=bob&password=bob-password&version=banana"))
    _, v10, _ = get(d.url("http", "/zoiper?user=bob&password=bob-password&version=1.0"))
    assert newest == v114 == v115 == unknown
    assert_config_document(newest)
    old = etree.fromstring(v10)
    schema("zoiper-1.0.rng").assertValid(old)
    assert old.findtext(".//username") == "bob"
    assert v10 != v114


def test_basic_authentication_without_credentials_in_the_url(zoiper):
    d, _ = zoiper
    status, body, _ = get(d.url("http", "/zoiper?version=1.14"), "-u", "bob:bob-password")
    assert status == 200 and assert_config_document(body).findtext("accounts/account/username") == "bob"
    status, body, _ = get(d.url("http", "/zoiper"), "-u", "bob:nope")
    assert status == 200
    assert_error_document(body, "Login failed: check your username & password.")


def test_basic_challenge_when_no_credentials_at_all(zoiper):
    d, _ = zoiper
    status, body, headers = get(d.url("http", "/zoiper"))
    assert status == 401 and 'www-authenticate: basic realm="zprovd"' in headers
    assert_error_document(body, "Login failed: check your username & password.")


@pytest.mark.parametrize("query", ["user=bob&password=wrong", "user=nobody&password=x", "user=bob", "password=bob-password", "user=&password=x"],
                         ids=["wrong-password", "unknown-user", "missing-password", "missing-user", "empty-user"])
def test_refusals_get_the_error_document_with_status_200(zoiper, query):
    d, _ = zoiper
    status, body, headers = get(d.url("http", f"/zoiper?{query}"))
    assert status == 200
    assert "content-type: application/xml; charset=utf-8" in headers
    assert_error_document(body, "Login failed: check your username & password.")


def test_https_with_the_generated_certificate(zoiper):
    d, config = zoiper
    cert = config.parent / "state" / "tls" / "cert.pem"
    status, body, _ = get(d.url("https", "/zoiper?user=bob&password=bob-password&version=1.14"), "--cacert", str(cert))
    assert status == 200
    assert_config_document(body)


def test_render_prints_the_same_bytes_as_http(zoiper):
    d, config = zoiper
    _, served, _ = get(d.url("http", f"/zoiper?user=alice&password={MD5}&version=1.14"))
    rendered = subprocess.run([sys.executable, "-m", "zprovd", "-c", str(config), "render", "--user", "alice", "--version", "1.14"],
                              capture_output=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert rendered.stdout == served
    _, served10, _ = get(d.url("http", "/zoiper?user=bob&password=bob-password&version=1.0"))
    rendered10 = subprocess.run([sys.executable, "-m", "zprovd", "-c", str(config), "render", "--user", "bob", "--version", "1.0"],
                                capture_output=True, timeout=60)
    assert rendered10.stdout == served10


def test_failed_logins_are_logged_without_the_password(zoiper):
    d, _ = zoiper
    get(d.url("http", "/zoiper?user=bob&password=Guess-That-Leaks-1"))
    d.wait_for_log("failed login bob from 127.0.0.1 (wrong password)")
    assert "Guess-That-Leaks-1" not in d.log
    assert PASSWORD not in d.log and SIP_PASSWORD not in d.log


def test_repeated_failures_lock_the_address_out_then_expire(tmp_path, daemon_factory):
    config = free_config(tmp_path, extra="[zoiper]\nmax_failures = 3\nfailure_window = 60\nlockout = 2\n")
    assert run_cli(config, "user", "add", "carol", "--password", "carol-pw").returncode == 0
    d = daemon_factory(config).start()
    for _ in range(3):
        assert get(d.url("http", "/zoiper?user=carol&password=bad"))[0] == 200
    status, body, headers = get(d.url("http", "/zoiper?user=carol&password=carol-pw"))
    assert status == 429 and "retry-after:" in headers
    assert_error_document(body, "Too many failed attempts. Please try again later.")
    d.wait_for_log("refused login carol from 127.0.0.1: too many failures")
    # the lockout is temporary: poll (bounded) until it lifts
    import time
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body, _ = get(d.url("http", "/zoiper?user=carol&password=carol-pw"))
        if status == 200:
            break
        time.sleep(0.5)
    assert status == 200
    assert_config_document(body)


def test_error_status_is_configurable(tmp_path, daemon_factory):
    config = free_config(tmp_path, extra='[zoiper]\nerror_status = 403\nerror_text = "Nope"\n')
    d = daemon_factory(config).start()
    status, body, _ = get(d.url("http", "/zoiper?user=x&password=y"))
    assert status == 403
    assert_error_document(body, "Nope")


def test_provision_file_points_at_this_server(tmp_path):
    config = free_config(tmp_path)
    config.write_text(config.read_text().replace('[https]\nlisten = ["127.0.0.1:0"]', '[https]\nlisten = ["0.0.0.0:8443"]')
                      .replace('[http]\nlisten = ["127.0.0.1:0"]', '[http]\nlisten = ["0.0.0.0:80"]'))
    r = subprocess.run([sys.executable, "-m", "zprovd", "-c", str(config), "zoiper", "provision-file", "--auth", "url"],
                       capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr
    doc = etree.fromstring(r.stdout)
    schema("zoiper-provision.rng").assertValid(doc)
    urls = [u.text for u in doc.findall("base_urls/base_url")]
    assert urls == ["https://127.0.0.1:8443/zoiper?user=[user]&password=[pass]", "http://127.0.0.1/zoiper?user=[user]&password=[pass]"]
    assert b"?user=[user]&amp;password=[pass]" in r.stdout
    assert doc.findtext("options/authentication_type") == "url"
    r = subprocess.run([sys.executable, "-m", "zprovd", "-c", str(config), "zoiper", "provision-file", "--auth", "basic", "--user", "alice"],
                       capture_output=True, timeout=60)
    doc = etree.fromstring(r.stdout)
    assert doc.findtext("options/authentication_type") == "basic"
    assert doc.findtext("options/user") == "alice"
    assert [u.text for u in doc.findall("base_urls/base_url")] == ["https://127.0.0.1:8443/zoiper", "http://127.0.0.1/zoiper"]
