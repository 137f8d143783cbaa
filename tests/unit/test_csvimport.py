"""zprovd.csvimport: the CSV import format and its error messages."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zprovd.backends import SipAccount
from zprovd.csvimport import CSVImportError, decode_csv, load_csv, parse_csv
from zprovd.passwords import verify_password

HEADER = "login,password,display_name,sip_user,sip_auth_user,sip_password,sip_domain,mac,model\n"


def plain(password: str) -> str:
    """A stand-in hasher: makes tests fast and the results readable."""
    return f"plain:{password}"


def parse(text: str, domain: str = "pbx.example.com"):
    return parse_csv(text, "users.csv", domain, hasher=plain)


def problems_of(text: str, domain: str = "pbx.example.com") -> list[str]:
    with pytest.raises(CSVImportError) as info:
        parse(text, domain)
    return info.value.problems


def test_minimal() -> None:
    users, devices = parse("login,password\nalice,s3cret\n")
    assert devices == []
    [alice] = users
    assert alice.login == "alice"
    assert alice.password_hash == "plain:s3cret"
    assert alice.accounts == [SipAccount("alice", "s3cret", "pbx.example.com")]
    assert alice.vars == {}


def test_full_row() -> None:
    users, devices = parse(
        HEADER + "alice,pw,Alice L,201,auth201,sip201,sip.example.org,00-15-65-AA-BB-CC,yealink-t54w\n"
    )
    [alice] = users
    assert alice.display_name == "Alice L"
    assert alice.accounts == [SipAccount("201", "sip201", "sip.example.org", "auth201", "")]
    [device] = devices
    assert device.mac == "001565aabbcc"
    assert device.model == "yealink-t54w"
    assert device.users == ["alice"]


def test_real_hasher_by_default() -> None:
    users, _ = parse_csv("login,password\nalice,s3cret\n", "x.csv", "d")
    assert users[0].password_hash.startswith("pbkdf2-sha256$")
    assert verify_password(users[0].password_hash, "s3cret")


def test_several_accounts_and_lines_in_row_order() -> None:
    users, devices = parse(
        "login,password,sip_user,mac,model\n"
        "alice,pw,201,0015.65aa.bbcc,t54w\n"
        "bob,pw2,,001565aabbcc,t54w\n"
        "alice,,202,,\n"
        "alice,pw,,00:04:f2:00:00:01,vvx\n"  # same account as row 1? no: sip_user=login
        "alice,,201,00:04:f2:00:00:01,vvx\n"  # identical to row 1: no new account
    )
    alice, bob = users
    assert [a.sip_user for a in alice.accounts] == ["201", "202", "alice"]
    assert [a.sip_password for a in alice.accounts] == ["pw", "pw", "pw"]
    assert bob.accounts == [SipAccount("bob", "pw2", "pbx.example.com")]
    d1, d2 = devices
    assert (d1.mac, d1.users) == ("001565aabbcc", ["alice", "bob"])
    assert (d2.mac, d2.users) == ("0004f2000001", ["alice"])  # not twice


def test_extra_columns_become_user_vars() -> None:
    users, devices = parse(
        "login,password,mac,model,Department,language\n"
        "alice,pw,001565aabbcc,t54w,sales,fr\n"
        "alice,,,,,\n"
        "bob,pw,,,,\n"
    )
    alice, bob = users
    assert alice.vars == {"Department": "sales", "language": "fr"}
    assert bob.vars == {}
    assert devices[0].vars == {}


def test_header_is_case_insensitive_and_order_free() -> None:
    users, _ = parse(" Password , LOGIN \ns3cret,alice\n")
    assert users[0].login == "alice" and users[0].password_hash == "plain:s3cret"


def test_bom_blank_lines_and_crlf() -> None:
    users, _ = parse("\ufefflogin,password\r\n\r\n,\r\nalice,pw\r\n\r\n")
    assert [u.login for u in users] == ["alice"]


def test_decode_bom_and_bad_utf8() -> None:
    assert decode_csv("\ufefflogin".encode("utf-8"), "x.csv") == "login"
    with pytest.raises(CSVImportError) as info:
        decode_csv(b"login,password\nal\xffice,pw\n", "x.csv")
    assert info.value.problems == ["x.csv:2: not UTF-8 text (byte offset 17)"]


def test_load_csv_file(tmp_path) -> None:
    path = tmp_path / "u.csv"
    path.write_bytes("\ufefflogin,password,display_name\nzoë,pw,Zoë\n".encode("utf-8"))
    users, _ = load_csv(path, "d", hasher=plain)
    assert users[0].login == "zoë" and users[0].display_name == "Zoë"
    with pytest.raises(CSVImportError) as info:
        load_csv(tmp_path / "missing.csv", "d")
    assert info.value.problems == [f"{tmp_path / 'missing.csv'}: cannot read: No such file or directory"]


def test_semicolon_delimiter() -> None:
    users, devices = parse("login;password;mac;model\nalice;pw;001565aabbcc;t54w\n")
    assert users[0].login == "alice" and devices[0].mac == "001565aabbcc"


def test_passwords_are_verbatim_other_cells_stripped() -> None:
    users, _ = parse("login,password,sip_user\n alice , pw ,  201 \n")
    assert users[0].login == "alice"
    assert users[0].password_hash == "plain: pw "
    assert users[0].accounts[0].sip_user == "201"
    assert users[0].accounts[0].sip_password == " pw "


def test_quoted_multiline_cell_keeps_line_numbers() -> None:
    problems = problems_of('login,password,display_name\nalice,pw,"two\nlines"\n,pw,x\n')
    assert problems == [
        "users.csv:2: display_name: contains a control character (line break, tab, NUL...)",
        "users.csv:4: login: required",
    ]


def test_header_only_is_empty() -> None:
    assert parse("login,password\n") == ([], [])


# ---- every error message --------------------------------------------------


def test_empty_text() -> None:
    assert problems_of("") == [
        "users.csv:1: no header row (expected columns: login, password, display_name, "
        "sip_user, sip_auth_user, sip_password, sip_domain, mac, model)"
    ]


def test_missing_required_header_column() -> None:
    assert problems_of("\nlogin,display_name\nalice,Alice\n") == [
        "users.csv:2: header: required column 'password' is missing (known columns: login, "
        "password, display_name, sip_user, sip_auth_user, sip_password, sip_domain, mac, model)"
    ]


def test_mac_column_needs_model_column() -> None:
    assert problems_of("login,password,mac\nalice,pw,001565aabbcc\n") == [
        "users.csv:1: header: a 'mac' column needs a 'model' column"
    ]


def test_bad_header_names() -> None:
    assert problems_of("login,password,,Login,x,x\n") == [
        "users.csv:1: header: column 3 has no name",
        "users.csv:1: header: column 'Login' appears twice",
        "users.csv:1: header: column 'x' appears twice",
    ]


def test_bad_mac_names_line() -> None:
    problems = problems_of(HEADER + "alice,pw,,,,,,00:15:65:aa:bb,t54w\n")
    assert problems == [
        "users.csv:2: mac: '00:15:65:aa:bb' is not a MAC address (expected 12 hex digits, "
        "optionally separated by ':' or '-', e.g. 00:15:65:aa:bb:cc)"
    ]


def test_model_missing() -> None:
    assert problems_of("login,password,mac,model\nalice,pw,001565aabbcc,\n") == [
        "users.csv:2: model: required when mac is set (001565aabbcc)"
    ]


def test_conflicting_passwords() -> None:
    assert problems_of("login,password\nalice,pw\nbob,x\nalice,other\n") == [
        "users.csv:4: password: differs from line 2 for login 'alice' "
        "(leave it empty on later rows of a login)"
    ]


def test_duplicate_mac_with_different_model() -> None:
    assert problems_of(
        "login,password,mac,model\nalice,pw,001565aabbcc,t54w\nbob,pw,00:15:65:AA:BB:CC,t46s\n"
    ) == ["users.csv:3: model: 't46s' differs from 't54w' (line 2) for MAC 00:15:65:AA:BB:CC"]


def test_login_and_first_password_required() -> None:
    assert problems_of("login,password\n,pw\nalice,\n") == [
        "users.csv:2: login: required",
        "users.csv:3: password: required for login 'alice' (its first row)",
    ]


def test_no_domain() -> None:
    assert problems_of("login,password\nalice,pw\n", domain="") == [
        "users.csv:2: sip_domain: empty and no default domain is configured"
    ]


def test_display_name_of_later_rows_labels_the_account() -> None:
    users, _ = parse("login,password,display_name,sip_user\nalice,pw,Alice,201\n"
                     "alice,,Sales line,202\nalice,,,203\n")
    assert users[0].display_name == "Alice"
    assert [a.display_name for a in users[0].accounts] == ["", "Sales line", ""]


def test_conflicting_vars() -> None:
    assert problems_of(
        "login,password,dept\nalice,pw,a\nalice,,\nalice,,a\nalice,,b\n"
    ) == ["users.csv:5: dept: 'b' differs from 'a' (line 2) for login 'alice'"]


def test_too_many_cells() -> None:
    assert problems_of("login,password\nalice,pw,extra\n") == [
        "users.csv:2: 3 cells but the header has 2 columns"
    ]


def test_control_characters() -> None:
    assert problems_of("login,password\nal\x00ice,pw\nbob,p\x7f\n") == [
        "users.csv:2: login: contains a control character (line break, tab, NUL...)",
        "users.csv:3: password: contains a control character (line break, tab, NUL...)",
    ]


def test_sip_port_and_transport_columns_must_be_usable() -> None:
    assert problems_of("login,password,sip_port,sip_transport\na,pw,5o60,udp\nb,pw,5080,sctp\nc,pw,5061,TLS\n") == [
        "users.csv:2: sip_port: must be a port number (0-65535), not '5o60'",
        "users.csv:3: sip_transport: must be udp, tcp or tls, not 'sctp'",
    ]


def test_unreadable_csv() -> None:
    problems = problems_of("login,password\n" + "x" * 200_000 + ",pw\n")
    assert problems == ["users.csv:2: unreadable CSV: field larger than field limit (131072)"]


def test_all_problems_are_reported_and_nothing_hashed() -> None:
    hashed = []
    with pytest.raises(CSVImportError) as info:
        parse_csv(
            "login,password,mac,model\nok,pw,,\n,pw,,\nbad,pw,nomac,x\nalso,pw,001565aabbcc,\n",
            "f.csv", "d", hasher=hashed.append,
        )
    assert [p.split(":")[1] for p in info.value.problems] == ["3", "4", "5"]
    assert hashed == []
    assert str(info.value) == "\n".join(info.value.problems)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list(',;\t"\n\r \x00abc:0123456789ABCDEF\ufeff')) |
               st.characters(), max_size=200))
def test_any_text_raises_only_csv_import_error(text: str) -> None:
    for candidate in (text, HEADER + text, "login,password,mac,model,x\n" + text):
        try:
            users, devices = parse(candidate)
        except CSVImportError as exc:
            assert exc.problems and all(p.startswith("users.csv:") for p in exc.problems)
        else:
            assert all(u.login and u.accounts for u in users)
            assert all(len(d.mac) == 12 and d.users for d in devices)
