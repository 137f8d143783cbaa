"""The admin CLI as an operator runs it: messages, exit codes, no secrets."""

from __future__ import annotations

import pytest

from conftest import free_config, run_cli

pytestmark = pytest.mark.integration


@pytest.fixture
def config(tmp_path):
    return free_config(tmp_path)


def ok(config, *args):
    r = run_cli(config, *args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_user_defaults_and_show_never_prints_secrets(config):
    ok(config, "user", "add", "alice", "--password", "Top-Secret-1", "--var", "language=fr", "--var", "tz=Europe/Paris")
    out = ok(config, "user", "show", "alice")
    assert "sip user alice, auth user alice, domain 127.0.0.1" in out  # defaults: login, login, [provisioning] server
    assert "var:           language=fr" in out and "tz=Europe/Paris" in out
    assert "Top-Secret-1" not in out
    assert "alice" in ok(config, "user", "list")
    r = run_cli(config, "user", "add", "alice", "--password", "x")
    assert r.returncode == 1 and "user alice exists (use --replace to overwrite it)" in r.stderr
    ok(config, "user", "add", "alice", "--password", "y", "--replace")


def test_device_mac_in_any_spelling(config):
    ok(config, "user", "add", "bob", "--password", "pw")
    ok(config, "device", "add", "00-15-65-AA-BB-CC", "--model", "yealink-t48g", "--user", "bob", "--var", "language=de")
    for spelling in ("001565aabbcc", "00:15:65:AA:BB:CC", "0015.65aa.bbcc"):
        out = ok(config, "device", "show", spelling)
        assert "mac:           00:15:65:aa:bb:cc" in out and "model:         yealink-t48g" in out
    assert "00:15:65:aa:bb:cc  yealink-t48g  bob" in ok(config, "device", "list")
    ok(config, "device", "remove", "001565AABBCC")
    r = run_cli(config, "device", "show", "001565aabbcc")
    assert r.returncode == 1 and "no device 00:15:65:aa:bb:cc" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["device", "add", "00:15:65:aa:bb", "--model", "yealink-t48g"], "'00:15:65:aa:bb' is not a MAC address"),
    (["device", "add", "001565aabbcc", "--model", "yealink-t999"], "unknown model 'yealink-t999'; `zprovd models` lists them"),
    (["device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "ghost"], "no user ghost"),
    (["user", "add", "carol", "--password", "pw", "--var", "novalue"], "--var 'novalue': expected KEY=VALUE"),
    (["user", "remove", "nobody"], "no user nobody"),
    (["render", "--user", "nobody"], "no user nobody"),
    (["render", "--mac", "001565aabbcc"], "no device 00:15:65:aa:bb:cc"),
    (["templates", "diff", "acme-x1"], "unknown model 'acme-x1'"),
])
def test_bad_input_gets_one_clear_line(config, args, message):
    r = run_cli(config, *args)
    assert r.returncode == 1
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_removing_a_user_a_device_uses_is_refused(config):
    ok(config, "user", "add", "dave", "--password", "pw")
    ok(config, "device", "add", "001565000001", "--model", "yealink-t48g", "--user", "dave")
    r = run_cli(config, "user", "remove", "dave")
    assert r.returncode == 1 and "001565000001" in r.stderr.replace(":", "")
    assert "dave" in ok(config, "user", "list")


def test_import_is_all_or_nothing_and_names_the_line(config, tmp_path):
    good = tmp_path / "good.csv"
    good.write_text(
        "login,password,display_name,sip_user,sip_auth_user,sip_password,sip_domain,mac,model,language\n"
        "ann,ann-pw,Ann,201,,sip-201,pbx.example.org,00:15:65:00:00:01,yealink-t48g,es\n"
        "ann,ann-pw,Ann,202,,sip-202,pbx.example.org,,,es\n"
        "ben,ben-pw,Ben,203,,,,00:15:65:00:00:01,yealink-t48g,\n"
    )
    assert "imported 2 users (0 replaced) and 1 devices (0 replaced)" in ok(config, "import", str(good))
    out = ok(config, "user", "show", "ann")
    assert "account 2:" in out and "var:           language=es" in out
    assert "users:         ann, ben" in ok(config, "device", "show", "001565000001")
    bad = tmp_path / "bad.csv"
    bad.write_text(
        "login,password,display_name,sip_user,sip_auth_user,sip_password,sip_domain,mac,model\n"
        "cat,cat-pw,Cat,301,,,,,\n"
        "dan,dan-pw,Dan,302,,,,00:15:65:zz:00:02,yealink-t48g\n"
    )
    r = run_cli(config, "import", str(bad))
    assert r.returncode == 1
    assert f"{bad}:3:" in r.stderr and "nothing imported" in r.stderr
    assert "cat" not in ok(config, "user", "list")  # line 2 was fine, but nothing was written
    unknown = tmp_path / "unknown-model.csv"
    unknown.write_text("login,password,mac,model\neve,eve-pw,001565000003,acme-x1\n")
    r = run_cli(config, "import", str(unknown))
    assert r.returncode == 1 and f"{unknown}:2: model: unknown model 'acme-x1'" in r.stderr
    assert "eve" not in ok(config, "user", "list")
    # A row for an existing login or MAC replaces it, and the summary says so.
    again = tmp_path / "again.csv"
    again.write_text("login,password,mac,model\nann,new-pw,00:15:65:00:00:01,yealink-t46g\nfay,fay-pw,,\n")
    assert "imported 2 users (1 replaced) and 1 devices (1 replaced)" in ok(config, "import", str(again))


def test_default_config_path_comes_from_the_environment(config, tmp_path):
    import os
    import subprocess
    import sys

    env = dict(os.environ, ZPROVD_CONFIG=str(config))
    r = subprocess.run([sys.executable, "-m", "zprovd", "user", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("LOGIN")
    env["ZPROVD_CONFIG"] = str(tmp_path / "missing.toml")
    r = subprocess.run([sys.executable, "-m", "zprovd", "user", "list"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and f"{tmp_path / 'missing.toml'}: cannot read configuration" in r.stderr


def test_dhcp_commands_through_the_cli(config):
    r = run_cli(config, "dhcp", "probe", "--interface", "zpt-no-such-if0", "--timeout", "1")
    assert r.returncode == 2
    assert "zpt-no-such-if0" in r.stdout + r.stderr and "Traceback" not in r.stderr
    r = run_cli(config, "dhcp", "leases")
    assert r.returncode == 0 and "no DHCP leases" in r.stdout


def test_backup_while_the_daemon_serves_restores_as_a_working_database(tmp_path):
    from conftest import Daemon
    import urllib.request

    config = free_config(tmp_path)
    ok(config, "user", "add", "alice", "--password", "pw", "--sip-password", "sip-secret-9")
    ok(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "alice")
    d = Daemon(config).start()
    try:
        body = urllib.request.urlopen(d.url("http", "/001565aabbcc.cfg"), timeout=10).read()
        assert b"sip-secret-9" in body
        out = ok(config, "backup", str(tmp_path / "saved.sqlite3"))
        assert out == f"backed up to {tmp_path / 'saved.sqlite3'}\n"
    finally:
        d.stop()
    # Restoring is putting the file in place of the database: a second
    # install started on the copy serves the same phone.
    restored = tmp_path / "restored"
    restored.mkdir()
    (tmp_path / "saved.sqlite3").rename(restored / "zprovd.sqlite3")
    other = free_config(restored)
    other.write_text(other.read_text().replace(f'state_dir = "{restored / "state"}"', f'state_dir = "{restored}"'))
    assert "alice" in ok(other, "user", "list")
    d = Daemon(other).start()
    try:
        assert b"sip-secret-9" in urllib.request.urlopen(d.url("http", "/001565aabbcc.cfg"), timeout=10).read()
    finally:
        d.stop()


def test_backup_of_a_backend_without_data_of_its_own_says_so(tmp_path):
    (tmp_path / "users.csv").write_text("login,password\nbob,pw\n")
    config = free_config(tmp_path, backend='type = "csv"\npath = "users.csv"')
    r = run_cli(config, "backup", str(tmp_path / "b"))
    assert r.returncode == 1 and "backend csv keeps no data of its own to back up" in r.stderr
    assert not (tmp_path / "b").exists()


def test_device_forget_on_a_backend_that_keeps_seen_phones_in_memory_says_so(tmp_path):
    (tmp_path / "users.csv").write_text("login,password\nbob,pw\n")
    config = free_config(tmp_path, backend='type = "csv"\npath = "users.csv"')
    r = run_cli(config, "device", "forget", "--all")
    assert r.returncode == 1 and "backend csv keeps the phones it has seen in the daemon's memory only" in r.stderr
    r = run_cli(config, "device", "seen")  # an empty list, and why
    assert r.returncode == 0 and "backend csv keeps the phones it has seen in the daemon's memory only" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["device", "forget"], "give the MACs to forget, or --all"),
    (["device", "forget", "--all", "001565aabbcc"], "give the MACs to forget, or --all"),
    (["device", "forget", "nonsense"], "'nonsense' is not a MAC address"),
])
def test_device_forget_refusals(config, args, message):
    r = run_cli(config, *args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def _zoiper(d, login: str, password: str) -> bytes:
    import urllib.parse
    import urllib.request

    query = urllib.parse.urlencode({"user": login, "password": password, "version": "1.14"})
    return urllib.request.urlopen(d.url("http", "/zoiper?" + query), timeout=10).read()


def test_user_edit_changes_what_is_given_and_keeps_the_rest(tmp_path):
    from conftest import Daemon

    config = free_config(tmp_path)
    ok(config, "user", "add", "alice", "--password", "old-pw", "--display-name", "Alice A", "--sip-user", "100",
       "--sip-password", "sip-one", "--var", "language=fr")
    ok(config, "user", "add-account", "alice", "--sip-user", "200", "--sip-password", "sip-two", "--display-name", "Desk")
    ok(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "alice")
    assert ok(config, "user", "edit", "alice", "--password", "new-pw", "--display-name", "Alice B") == "user alice saved\n"
    ok(config, "user", "edit", "alice", "--account", "2", "--sip-password", "sip-two-b", "--sip-domain", "pbx.example")
    ok(config, "user", "edit", "alice", "--var", "tz=Europe/Paris", "--unset-var", "language")
    out = ok(config, "user", "show", "alice")
    # The first account showed the user's name and goes on showing it; the
    # second had its own.
    assert "sip user 100, auth user 100, domain 127.0.0.1, display name Alice B" in out
    assert "sip user 200, auth user 200, domain pbx.example, display name Desk" in out
    assert "var:           tz=Europe/Paris" in out and "language" not in out
    assert "alice" in ok(config, "device", "show", "001565aabbcc")  # the device still has its user
    d = Daemon(config).start()
    try:
        document = _zoiper(d, "alice", "new-pw")
        assert b"sip-one" in document and b"sip-two-b" in document and b"pbx.example" in document
        assert b'<error code="1">' in _zoiper(d, "alice", "old-pw")
    finally:
        d.stop()


def test_edits_at_the_same_moment_are_all_kept(config):
    """Eight `user edit` and eight `device edit` processes at once: every change lands."""
    from concurrent.futures import ThreadPoolExecutor

    ok(config, "user", "add", "alice", "--password", "pw")
    ok(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "alice")
    edits = [["user", "edit", "alice", "--var", f"u{i}={i}"] for i in range(8)]
    edits += [["device", "edit", "001565aabbcc", "--var", f"d{i}={i}"] for i in range(8)]
    with ThreadPoolExecutor(len(edits)) as pool:
        results = list(pool.map(lambda args: run_cli(config, *args), edits))
    assert [r.returncode for r in results] == [0] * len(edits), [r.stderr for r in results if r.returncode]
    user, device = ok(config, "user", "show", "alice"), ok(config, "device", "show", "001565aabbcc")
    assert all(f"u{i}={i}" in user for i in range(8)), user
    assert all(f"d{i}={i}" in device for i in range(8)), device


@pytest.mark.parametrize("args,message", [
    (["user", "edit", "alice"], "nothing to change (see `zprovd user edit --help`)"),
    (["user", "edit", "alice", "--account", "2", "--sip-user", "x"], "user alice has 1 SIP account(s), not an account 2"),
    (["user", "edit", "alice", "--sip-password", ""], "--sip-password must not be empty"),
    (["user", "add-account", "alice", "--sip-user", "", "--sip-password", "x"], "--sip-user must not be empty"),
    (["user", "add-account", "alice", "--sip-user", "200", "--sip-password", ""], "--sip-password must not be empty"),
    (["user", "edit", "alice", "--unset-var", "nope"], "--unset-var nope: the user has no such var"),
    (["user", "edit", "ghost", "--password", "x"], "no user ghost"),
    (["device", "edit", "001565aabbcc"], "nothing to change (see `zprovd device edit --help`)"),
    (["device", "edit", "001565aabbcc", "--model", "acme-x1"], "unknown model 'acme-x1'"),
    (["device", "edit", "001565aabbcc", "--user", "ghost"], "no user ghost"),
    (["device", "edit", "001565aabbcc", "--unset-var", "url_key"], "--unset-var url_key: remove it with --no-http-auth/--no-url-key"),
    (["device", "edit", "001565aabbcc", "--var", "http_user=x"], "--var http_user: set it with --http-user"),
    (["device", "edit", "001565aabbcc", "--http-user", "u"], "--http-user and --http-password go together"),
    (["device", "edit", "001565aabbcc", "--url-key", "k", "--no-url-key"], "--no-url-key and --url-key exclude each other"),
    (["device", "edit", "001565000009", "--model", "yealink-t48g"], "no device 00:15:65:00:00:09"),
    (["user", "remove-account", "alice", "--account", "1"], "account 1 is the only SIP account of user alice (remove the user instead)"),
    (["user", "remove-account", "alice", "--account", "2"], "user alice has 1 SIP account(s), not an account 2"),
    (["user", "remove-account", "alice", "--account", "0"], "user alice has 1 SIP account(s), not an account 0"),
    (["user", "remove-account", "ghost", "--account", "1"], "no user ghost"),
    # Control characters would break the phones' files (or add lines to them): refused up front.
    (["user", "edit", "alice", "--display-name", "Alice\nsip.key = 1"], "display name: contains a control character"),
    (["user", "edit", "alice", "--sip-password", "s3cr\x01t"], "sip password: contains a control character"),
    (["user", "add-account", "alice", "--sip-user", "200", "--sip-password", "tab\tpw"], "sip password: contains a control character"),
    (["user", "add", "bob", "--password", "pw", "--display-name", "Bob\rX"], "display name: contains a control character"),
    (["device", "edit", "001565aabbcc", "--var", "label=a\nb"], "var: contains a control character"),
    (["user", "edit", "alice", "--var", "sip_port=5o60"], "--var: sip_port must be a port number (0-65535), not '5o60'"),
    (["device", "edit", "001565aabbcc", "--var", "sip_transport=sctp"], "--var: sip_transport must be udp, tcp or tls"),
    (["device", "add", "001565aabbcd", "--model", "yealink-t48g", "--http-user", "u", "--http-password", "p\x07"],
     "http password: contains a control character"),
])
def test_edit_refusals_change_nothing(config, args, message):
    ok(config, "user", "add", "alice", "--password", "pw")
    ok(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "alice", "--url-key", "k1")
    before = ok(config, "user", "show", "alice") + ok(config, "device", "show", "001565aabbcc")
    r = run_cli(config, *args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr
    assert ok(config, "user", "show", "alice") + ok(config, "device", "show", "001565aabbcc") == before


def test_user_remove_account_keeps_the_others_and_the_lines_move_up(config):
    ok(config, "user", "add", "alice", "--password", "pw", "--sip-user", "100", "--sip-password", "sip-one",
       "--var", "language=fr")
    ok(config, "user", "add-account", "alice", "--sip-user", "200", "--sip-password", "sip-two")
    ok(config, "user", "add-account", "alice", "--sip-user", "300", "--sip-password", "sip-three")
    ok(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "alice")
    before = ok(config, "render", "--mac", "001565aabbcc")
    assert "account.2.password = sip-two" in before and "account.3.password = sip-three" in before
    out = ok(config, "user", "remove-account", "alice", "--account", "2")
    assert out == "user alice: account 2 (sip user 200) removed, 2 SIP account(s) left\n"
    shown = ok(config, "user", "show", "alice")
    assert "account 1:     sip user 100" in shown and "account 2:     sip user 300" in shown
    assert "200" not in shown and "account 3" not in shown and "var:           language=fr" in shown
    after = ok(config, "render", "--mac", "001565aabbcc")
    assert "sip-two" not in after and "account.2.password = sip-three" in after
    assert "account.1.password = sip-one" in after and "account.3.enable = 0" in after  # line 3 is free now


def test_device_edit_changes_what_is_given_and_keeps_the_rest(config):
    ok(config, "user", "add", "alice", "--password", "pw", "--sip-password", "sip-a")
    ok(config, "user", "add", "bob", "--password", "pw", "--sip-password", "sip-b")
    ok(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--user", "alice", "--var", "language=de",
       "--url-key", "k1", "--http-user", "phone1", "--http-password", "hp")
    ok(config, "device", "edit", "00:15:65:AA:BB:CC", "--user", "bob", "--user", "alice", "--no-url-key")
    out = ok(config, "device", "show", "001565aabbcc")
    assert "users:         bob, alice" in out and "url key" not in out
    assert "http auth:     user phone1, password (set)" in out and "var:           language=de" in out
    rendered = ok(config, "render", "--mac", "001565aabbcc")
    assert rendered.index("sip-b") < rendered.index("sip-a")  # line 1 is bob's now
    ok(config, "device", "edit", "001565aabbcc", "--model", "yealink-t46s", "--no-user", "--no-http-auth",
       "--unset-var", "language", "--var", "tz=UTC")
    out = ok(config, "device", "show", "001565aabbcc")
    assert "model:         yealink-t46s" in out and "users:         -" in out
    assert "http auth" not in out and "language" not in out and "var:           tz=UTC" in out


def test_passwords_from_standard_input_stay_off_the_command_line(config):
    r = run_cli(config, "user", "add", "alice", "--password", "-", "--sip-user", "100", input="pw from stdin\n")
    assert r.returncode == 0, r.stderr
    assert "pw from stdin" in ok(config, "render", "--user", "alice")  # the SIP password defaults to it
    r = run_cli(config, "user", "edit", "alice", "--sip-password", "-", input="sip-from-stdin\r\nignored\n")
    assert r.returncode == 0, r.stderr
    rendered = ok(config, "render", "--user", "alice")
    assert "sip-from-stdin" in rendered and "ignored" not in rendered and "pw from stdin" not in rendered
    r = run_cli(config, "device", "add", "001565aabbcc", "--model", "yealink-t48g", "--http-user", "ph",
                "--http-password", "-", input="http-pw\n")
    assert r.returncode == 0 and "http auth:     user ph" in ok(config, "device", "show", "001565aabbcc")
    r = run_cli(config, "user", "edit", "alice", "--password", "-", "--sip-password", "-", input="a\nb\n")
    assert r.returncode == 1 and "--password and --sip-password: only one password can be read" in r.stderr
    r = run_cli(config, "user", "add", "bob", "--password", "-", input="")
    assert r.returncode == 1 and "--password -: no password on standard input" in r.stderr
    r = run_cli(config, "user", "add", "bob", "--password", "-", input="Xq\tpw\n")
    assert r.returncode == 1 and "--password -: the password contains a control character" in r.stderr
    assert "Xq" not in r.stderr
    assert "bob" not in ok(config, "user", "list")


def test_password_asked_for_on_a_terminal_is_not_echoed(config):
    import os
    import pty
    import select
    import signal
    import sys
    import time

    from conftest import ROOT

    pid, master = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal
        os.chdir(ROOT)
        os.execv(sys.executable, [sys.executable, "-m", "zprovd", "-c", str(config), "user", "add", "alice",
                                  "--password", "-", "--sip-user", "100"])

    def read_until(wanted: bytes, seconds: float) -> bytes:
        """What the terminal shows until ``wanted``, the child's exit or ``seconds``."""
        got = b""
        deadline = time.monotonic() + seconds
        while wanted not in got and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                try:
                    chunk = os.read(master, 1024)
                except OSError:  # EIO: the child has exited
                    break
                if not chunk:
                    break
                got += chunk
        return got

    try:
        seen = read_until(b"password: ", 60)
        assert b"password: " in seen
        os.write(master, b"typed-secret\n")
        seen += read_until(b"saved", 60)
    finally:
        deadline = time.monotonic() + 10
        while (reaped := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        if reaped == (0, 0):
            os.kill(pid, signal.SIGKILL)  # stuck: the test has failed already
            reaped = os.waitpid(pid, 0)
        status = reaped[1]
        os.close(master)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    assert b"user alice saved" in seen and b"typed-secret" not in seen
    assert "typed-secret" in ok(config, "render", "--user", "alice")


def test_a_reader_that_goes_away_gets_no_traceback(config):
    """`zprovd user list | head -1`: the pipe closes before zprovd has written."""
    import subprocess
    import sys

    ok(config, "user", "add", "alice", "--password", "pw")
    for args in (["user", "list"], ["models"]):
        proc = subprocess.Popen([sys.executable, "-m", "zprovd", "-c", str(config), *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # before Python has even started
        stderr = proc.stderr.read().decode()
        assert proc.wait(timeout=60) == 1 and "Traceback" not in stderr and "Broken pipe" not in stderr, stderr
