"""Backends through the running daemon: a third-party entry point, outages, CSV."""

from __future__ import annotations

import os
import sys

import pytest

from conftest import curl, free_config, run_cli

pytestmark = pytest.mark.integration

helpers = sys.modules["zprovd_dummy_backend_helpers"]


@pytest.fixture
def dummy_env(tmp_path):
    env = dict(os.environ)
    env["PYTHONPATH"] = helpers.pythonpath(helpers.write_distribution(tmp_path / "site"))
    return env


def test_third_party_backend_is_found_through_its_entry_point(tmp_path, dummy_env, daemon_factory):
    config = free_config(tmp_path, backend='type = "dummy"\nalice_password = "looking-glass"')
    d = daemon_factory(config, env=dummy_env).start()
    body = curl(d.url("http", "/zoiper?user=alice&password=looking-glass")).stdout
    assert b"<username>alice</username>" in body and b"dummy.invalid" in body
    # Its own options are validated by the backend itself, named in one line.
    (tmp_path / "bad").mkdir()
    bad = free_config(tmp_path / "bad", backend='type = "dummy"\nalice_pasword = "x"')
    r = run_cli(bad, "check", env=dummy_env)
    assert r.returncode == 1
    assert "alice_pasword: unknown option for the dummy backend" in r.stderr


def test_cli_edits_on_a_backend_without_update_methods(tmp_path, dummy_env):
    """update_user/update_device are optional: the CLI then reads, changes and saves."""
    config = free_config(tmp_path, backend='type = "dummy"')
    for args, out in [
        (["user", "edit", "alice", "--display-name", "Alice L."], "user alice saved"),
        (["user", "add-account", "alice", "--sip-user", "202", "--sip-password", "pw"], "user alice now has 2 SIP accounts"),
        (["device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "alice"], "device 00:15:65:aa:bb:cc saved"),
    ]:
        r = run_cli(config, *args, env=dummy_env)
        assert r.returncode == 0 and out in r.stdout, r.stderr
    for args, message in [
        (["user", "edit", "ghost", "--password", "x"], "no user ghost"),
        (["user", "add", "alice", "--password", "x"], "user alice exists (use --replace to overwrite it)"),
        (["device", "edit", "001565aabbcc", "--var", "a=b"], "no device 00:15:65:aa:bb:cc"),  # in memory: gone
    ]:
        r = run_cli(config, *args, env=dummy_env)
        assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_unknown_backend_type_is_one_clear_line(tmp_path):
    config = free_config(tmp_path, backend='type = "ldap"')
    r = run_cli(config, "run")
    assert r.returncode == 1
    assert "no backend named 'ldap' (installed: csv, sqlite)" in r.stderr
    assert "Traceback" not in r.stderr


def test_backend_outage_gives_503_and_the_error_document(tmp_path, dummy_env, daemon_factory):
    outage = tmp_path / "outage"
    config = free_config(tmp_path, backend=f'type = "dummy"\noutage_file = "{outage}"')
    d = daemon_factory(config, env=dummy_env).start()
    url = d.url("http", "/zoiper?user=alice&password=wonderland")
    r = curl("-w", "\n%{http_code}", url)
    assert r.stdout.endswith(b"\n200")
    outage.touch()
    r = curl("-w", "\n%{http_code}", url)
    assert r.stdout.endswith(b"\n503")
    assert b'<error code="1">The provisioning service is unavailable. Please try again later.</error>' in r.stdout
    r = curl("-w", "\n%{http_code}", d.url("http", "/001565aabbcc.cfg"))
    assert r.stdout.endswith(b"\n503")
    d.wait_for_log("backend failed looking up alice")
    outage.unlink()
    assert curl("-w", "\n%{http_code}", url).stdout.endswith(b"\n200")


def test_csv_backend_serves_and_rereads_its_file(tmp_path, daemon_factory):
    users = tmp_path / "users.csv"
    users.write_text("login,password,display_name,sip_user\nann,ann-pw,Ann,201\n")
    config = free_config(tmp_path, backend='type = "csv"\npath = "users.csv"')
    d = daemon_factory(config).start()
    assert b"<username>201</username>" in curl(d.url("http", "/zoiper?user=ann&password=ann-pw")).stdout
    # read-only: the CLI says so and names the file
    r = run_cli(config, "user", "add", "zed", "--password", "zed-pw")
    assert r.returncode == 1 and "read-only" in r.stderr and "users.csv" in r.stderr
    # an edit is picked up without restart (the backend stats at most once a second)
    users.write_text("login,password,display_name,sip_user\nann,ann-pw,Ann,202\nben,ben-pw,Ben,203\n")
    import time

    deadline = time.monotonic() + 10
    body = b""
    while time.monotonic() < deadline:
        body = curl(d.url("http", "/zoiper?user=ben&password=ben-pw")).stdout
        if b"<username>203</username>" in body:
            break
        time.sleep(0.3)
    assert b"<username>203</username>" in body
