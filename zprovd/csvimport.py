"""The CSV import format: users, their SIP accounts and their devices, one row each.

The same format is read by ``zprovd import`` (into a writable backend) and by
the read-only CSV backend.  Example::

    login,password,display_name,sip_user,sip_password,sip_domain,mac,model,department
    alice,s3cret,Alice Liddell,201,,pbx.example.com,00:15:65:aa:bb:cc,yealink-t54w,sales
    alice,,,202,,pbx.example.com,00:15:65:aa:bb:cc,yealink-t54w,
    bob,hunter2,Bob,,,,,,support

Rules:

* A header row is required.  Known columns are ``login``, ``password``,
  ``display_name``, ``sip_user``, ``sip_auth_user``, ``sip_password``,
  ``sip_domain``, ``mac`` and ``model`` (names are case-insensitive); the
  ``login`` and ``password`` columns are required, and a ``mac`` column
  needs a ``model`` column.  Column order is free.
* Any other column becomes a template variable **of the user** (``vars``),
  named as in the header (case kept).  Device variables are not expressible
  in CSV: a column cannot tell whether it describes the person or the phone,
  and users are what an import mainly describes.  An empty cell sets nothing.
* ``login`` is required on every row.  ``password`` is required on the first
  row of a login; later rows of the same login may repeat it or leave it
  empty, a different password is an error.  The same goes for extra
  columns (a different value on a later row is an error).
* ``display_name`` on the first row of a login is the user's name; on a
  later row it labels that row's account only (e.g. "Sales line").
* Each row is one SIP account of its login, in row order: ``sip_user``
  defaults to the login, ``sip_password`` to the password, ``sip_domain`` to
  ``default_domain``.  A row whose account is the same as an earlier one of that login
  (same SIP user, auth user, password and domain) adds no account: that is
  how one user is put on a second device (repeat the login with the other
  MAC and leave the SIP columns empty).
* ``mac`` is optional, in any usual spelling.  When set, ``model`` is
  required, and the row's login becomes a user (line) of that device.  A MAC
  on several rows collects their logins in row order (a login already on the
  device is not added twice: a user brings all of its accounts); every row
  of one MAC must name the same model.
* No cell may contain a control character (a quoted line break, a tab,
  NUL...): they would break the generated configuration files.
* Empty lines (and rows whose cells are all empty) are skipped.  Cells are
  stripped of surrounding white space, except passwords, which are taken
  verbatim.  Text is UTF-8 with an optional byte-order mark.  The delimiter
  is a comma, or a semicolon or tab if the header row contains no comma
  (spreadsheets in some locales export that way).

Every problem is collected (not just the first) as ``source:line: reason``,
and ``CSVImportError`` carries them all: nothing is returned (hence nothing
imported) if any row is bad.  Passwords are hashed with
``zprovd.passwords.hash_password`` only after the whole file is valid (one
thread per core: PBKDF2 releases the GIL).
"""

from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from zprovd.backends import Device, SipAccount, User
from zprovd.mac import InvalidMAC, normalize_mac
from zprovd.sipvars import LineError, sip_transport_and_port

KNOWN_COLUMNS = (
    "login",
    "password",
    "display_name",
    "sip_user",
    "sip_auth_user",
    "sip_password",
    "sip_domain",
    "mac",
    "model",
)
REQUIRED_COLUMNS = ("login", "password")
_VERBATIM = ("password", "sip_password")
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")
"""What no cell may contain (nor a CLI argument: ``zprovd.cli``)."""


class CSVImportError(Exception):
    """The CSV text is unusable; ``problems`` lists every ``source:line: reason``."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class _PendingUser:
    login: str
    line: int
    password: str
    display_name: str
    accounts: list[SipAccount] = field(default_factory=list)
    vars: dict[str, str] = field(default_factory=dict)
    var_lines: dict[str, int] = field(default_factory=dict)


@dataclass
class _PendingDevice:
    mac: str
    line: int
    model: str
    users: list[str] = field(default_factory=list)


def _same_account(a: SipAccount, b: SipAccount) -> bool:
    return (a.sip_user, a.sip_auth_user, a.sip_password, a.sip_domain) == (
        b.sip_user, b.sip_auth_user, b.sip_password, b.sip_domain)


def _delimiter(text: str) -> str:
    for line in text.splitlines():
        if line.strip():
            if "," not in line:
                for candidate in (";", "\t"):
                    if candidate in line:
                        return candidate
            break
    return ","


def parse_csv(
    text: str,
    source: str,
    default_domain: str,
    *,
    hasher: Callable[[str], str] | None = None,
    known_model: Callable[[str], bool] | None = None,
) -> tuple[list[User], list[Device]]:
    """Parse the import format into users and devices (both in first-appearance order).

    ``source`` names the text in problems (usually the file name).
    ``known_model(model)``, if given, says whether the catalogue has that
    model; a row naming another is a problem of its line.
    ``hasher`` turns a plain password into ``User.password_hash``; it
    defaults to ``zprovd.passwords.hash_password``.  Raises CSVImportError
    listing every problem; never anything else for any text.
    """
    if hasher is None:
        from zprovd.passwords import hash_password as hasher

    problems: list[str] = []

    def problem(line: int, reason: str) -> None:
        problems.append(f"{source}:{line}: {reason}")

    if text.startswith("\ufeff"):
        text = text[1:]
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=_delimiter(text), strict=False)

    header: list[str] | None = None
    extra_columns: list[tuple[int, str]] = []
    index: dict[str, int] = {}
    users: dict[str, _PendingUser] = {}
    devices: dict[str, _PendingDevice] = {}
    next_line = 1

    while True:
        line = next_line
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problem(max(line, reader.line_num), f"unreadable CSV: {exc}")
            break
        next_line = reader.line_num + 1
        if not any(cell.strip() for cell in row):
            continue

        if header is None:
            header = [cell.strip() for cell in row]
            header_ok = True
            for position, name in enumerate(header, start=1):
                lowered = name.lower()
                if not name:
                    problem(line, f"header: column {position} has no name")
                    header_ok = False
                elif lowered in KNOWN_COLUMNS:
                    if lowered in index:
                        problem(line, f"header: column {name!r} appears twice")
                        header_ok = False
                    index[lowered] = position - 1
                else:
                    if any(other == name for _, other in extra_columns):
                        problem(line, f"header: column {name!r} appears twice")
                        header_ok = False
                    extra_columns.append((position - 1, name))
            for name in REQUIRED_COLUMNS:
                if name not in index:
                    problem(line, f"header: required column {name!r} is missing "
                            f"(known columns: {', '.join(KNOWN_COLUMNS)})")
                    header_ok = False
            if "mac" in index and "model" not in index:
                problem(line, "header: a 'mac' column needs a 'model' column")
                header_ok = False
            if not header_ok:
                break
            continue

        if len(row) > len(header):
            problem(line, f"{len(row)} cells but the header has {len(header)} columns")
            continue
        bad = [header[i] for i, value in enumerate(row) if CONTROL_CHARACTERS.search(value)]
        if bad:
            problem(line, f"{bad[0]}: contains a control character (line break, tab, NUL...)")
            continue

        def cell(name: str) -> str:
            position = index.get(name)
            if position is None or position >= len(row):
                return ""
            value = row[position]
            return value if name in _VERBATIM else value.strip()

        login = cell("login")
        if not login:
            problem(line, "login: required")
            continue
        password = cell("password")
        display_name = cell("display_name")
        user = users.get(login)
        if user is None:
            if not password:
                problem(line, f"password: required for login {login!r} (its first row)")
                continue
            user = users[login] = _PendingUser(login, line, password, display_name)
        else:
            if password and password != user.password:
                problem(line, f"password: differs from line {user.line} for login {login!r} "
                        "(leave it empty on later rows of a login)")

        for position, name in extra_columns:
            value = row[position].strip() if position < len(row) else ""
            if not value:
                continue
            if name not in user.vars:
                try:
                    sip_transport_and_port({name: value}, name)
                except LineError as exc:
                    problem(line, str(exc).replace(f"{name}: {name} ", f"{name}: ", 1))
                    continue
                user.vars[name], user.var_lines[name] = value, line
            elif user.vars[name] != value:
                problem(line, f"{name}: {value!r} differs from {user.vars[name]!r} "
                        f"(line {user.var_lines[name]}) for login {login!r}")

        domain = cell("sip_domain") or default_domain
        if not domain:
            problem(line, "sip_domain: empty and no default domain is configured")
        account = SipAccount(
            sip_user=cell("sip_user") or login,
            sip_password=cell("sip_password") or user.password,
            sip_domain=domain,
            sip_auth_user=cell("sip_auth_user"),
            display_name=display_name if user.line != line else "",
        )
        if not any(_same_account(account, other) for other in user.accounts):
            user.accounts.append(account)

        mac_text = cell("mac")
        if not mac_text:
            continue
        try:
            mac = normalize_mac(mac_text)
        except InvalidMAC as exc:
            problem(line, f"mac: {exc}")
            continue
        model = cell("model")
        if not model:
            problem(line, f"model: required when mac is set ({mac_text})")
            continue
        if known_model is not None and not known_model(model):
            problem(line, f"model: unknown model {model!r} (`zprovd models` lists them)")
            continue
        device = devices.get(mac)
        if device is None:
            device = devices[mac] = _PendingDevice(mac, line, model)
        elif model != device.model:
            problem(line, f"model: {model!r} differs from {device.model!r} (line {device.line}) "
                    f"for MAC {mac_text}")
            continue
        if login not in device.users:
            device.users.append(login)

    if header is None and not problems:
        problem(1, "no header row (expected columns: " + ", ".join(KNOWN_COLUMNS) + ")")
    if problems:
        raise CSVImportError(problems)

    rows = list(users.values())
    # PBKDF2 releases the GIL: one thread per core hashes that many times faster.
    with ThreadPoolExecutor(max_workers=max(1, min(len(rows), os.cpu_count() or 1))) as pool:
        hashes = list(pool.map(hasher, [u.password for u in rows])) if rows else []
    result_users = [
        User(
            login=u.login,
            password_hash=password_hash,
            display_name=u.display_name,
            accounts=u.accounts,
            vars=dict(u.vars),
        )
        for u, password_hash in zip(rows, hashes)
    ]
    result_devices = [Device(mac=d.mac, model=d.model, users=d.users) for d in devices.values()]
    return result_users, result_devices


def decode_csv(data: bytes, source: str) -> str:
    """Decode UTF-8 (with or without a BOM); CSVImportError naming the line if not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CSVImportError([f"{source}:{line}: not UTF-8 text (byte offset {exc.start})"]) from None


def load_csv(
    path: Path | str,
    default_domain: str,
    *,
    hasher: Callable[[str], str] | None = None,
) -> tuple[list[User], list[Device]]:
    """Read and parse a CSV file; CSVImportError (with the file name) on any problem."""
    source = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CSVImportError([f"{source}: cannot read: {exc.strerror or exc}"]) from None
    return parse_csv(decode_csv(data, source), source, default_domain, hasher=hasher)
