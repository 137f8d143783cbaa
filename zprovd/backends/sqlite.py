"""The default backend: one SQLite file in the state folder.

Options (``[backend]`` with ``type = "sqlite"``):

``path``
    The database file, default ``zprovd.sqlite3``; a relative path is
    relative to ``state_dir``.  The folder is created if missing.
``timeout``
    Seconds to wait for a lock held by another connection (the CLI while the
    daemon runs, or another daemon thread) before failing; default 5.

Design notes:

* **Threads.**  The daemon runs every call through ``context.run_blocking``
  in a thread pool; the CLI runs them inline.  Each thread gets its own
  connection (``threading.local``); no connection is ever used by two
  threads at once.  ``close()`` closes all of them.
* **Transactions.**  Connections run in autocommit mode
  (``isolation_level=None``) and every multi-statement operation is an
  explicit ``BEGIN`` (reads: a consistent snapshot) or ``BEGIN IMMEDIATE``
  (writes: take the write lock up front, so two writers never dead-lock on
  a lock upgrade).  ``journal_mode=WAL`` lets readers proceed while the CLI
  writes; ``synchronous=NORMAL`` is the usual WAL setting (a power cut may
  lose the last commit, never corrupt the file).
* **Read cache.**  ``get_user``/``get_device`` answer from memory while
  no user or device changed.  ``PRAGMA data_version`` (on a connection of
  the caller's thread; in WAL mode read from shared memory, no disk I/O)
  moves on every commit by any other connection, the CLI's included; only
  then is the ``generation`` row read, which triggers bump on every change
  to users, accounts, devices and device_users, but not on fetch or seen
  records.  So a change made by another process is seen on the next
  look-up, and the daemon's own bookkeeping does not empty the cache.  Look-ups are primary key or index look-ups; the statement texts
  are constant, so the sqlite3 module's statement cache keeps them prepared.
* **Fetch records** are coalesced: ``record_fetch`` keeps the latest fetch
  per MAC in memory and at most one write of the waiting ones is in flight,
  so a boot storm does not queue one transaction per request.  A fetch
  after a quiet spell is written at once; while fetches keep coming (and
  the context has ``call_later``), the next write waits
  ``FETCH_WRITE_INTERVAL`` seconds and carries everything gathered.
* **Schema.**  ``PRAGMA user_version`` holds the schema version and
  ``MIGRATIONS[i]`` takes a database from version ``i`` to ``i + 1``; all
  pending migrations run in one transaction when ``open()`` finds an older
  file.  Version 2 will be one more function appended to ``MIGRATIONS``.
  A file with a newer version than this code knows is refused, as is an
  SQLite file that is somebody else's (tables but no zprovd version, or a
  different ``application_id``).
* **Passwords.**  ``save_user`` refuses a ``password_hash`` that is neither
  empty (no Zoiper log-in) nor a ``zprovd.passwords`` hash, so that a plain
  password can never be stored by mistake.
* **References.**  Removing a user that devices still reference is refused
  with a BackendError listing the MACs; saving a device that references a
  missing user is refused.  Adding a device removes its "seen" row; at
  most ``MAX_SEEN`` seen rows are kept (the least recently seen go first)
  and ``forget_seen`` removes them on request (``zprovd device forget``).
* **Errors.**  Every sqlite3 error becomes a one-line BackendError naming the
  file.  ``record_fetch`` for a MAC that is not configured does nothing.
"""

from __future__ import annotations

import json
import os
import sqlite3
import copy
import tempfile
import dataclasses
import threading
import time
import urllib.parse
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure
from twisted.logger import Logger

from zprovd.backends import (
    MAX_SEEN,
    BackendContext,
    BackendError,
    Device,
    Fetch,
    NotFound,
    SeenDevice,
    SipAccount,
    User,
)
from zprovd.mac import InvalidMAC, normalize_mac
from zprovd.passwords import is_password_hash

log = Logger()

DEFAULT_PATH = "zprovd.sqlite3"
DEFAULT_TIMEOUT = 5.0
FETCH_WRITE_INTERVAL = 0.5  # seconds between fetch-record writes while busy
GENERATION_RECHECK = 0.01  # seconds generation() trusts its last data_version check
CACHE_SIZE = 200_000  # users and devices each kept in memory, least recently used dropped
APPLICATION_ID = 0x7A70726F  # "zpro": marks the file as a zprovd database
OPTIONS = ("path", "timeout")

# --------------------------------------------------------------------------
# Schema and migrations.  Never edit a published migration: append one.

_SCHEMA_1 = (
    """CREATE TABLE users (
        login          TEXT PRIMARY KEY NOT NULL,
        password_hash  TEXT NOT NULL,
        display_name   TEXT NOT NULL DEFAULT '',
        vars           TEXT NOT NULL DEFAULT '{}'
    )""",
    """CREATE TABLE accounts (
        login          TEXT NOT NULL REFERENCES users (login) ON DELETE CASCADE ON UPDATE CASCADE,
        position       INTEGER NOT NULL,
        sip_user       TEXT NOT NULL,
        sip_auth_user  TEXT NOT NULL DEFAULT '',
        sip_password   TEXT NOT NULL,
        sip_domain     TEXT NOT NULL,
        display_name   TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (login, position)
    )""",
    """CREATE TABLE devices (
        mac                 TEXT PRIMARY KEY NOT NULL,
        model               TEXT NOT NULL,
        vars                TEXT NOT NULL DEFAULT '{}',
        last_fetch_when     REAL,
        last_fetch_address  TEXT,
        last_fetch_file     TEXT
    )""",
    """CREATE TABLE device_users (
        mac       TEXT NOT NULL REFERENCES devices (mac) ON DELETE CASCADE ON UPDATE CASCADE,
        position  INTEGER NOT NULL,
        login     TEXT NOT NULL REFERENCES users (login) ON DELETE RESTRICT ON UPDATE CASCADE,
        PRIMARY KEY (mac, position)
    )""",
    "CREATE INDEX device_users_login ON device_users (login)",
    """CREATE TABLE seen (
        mac          TEXT PRIMARY KEY NOT NULL,
        model_guess  TEXT NOT NULL DEFAULT '',
        address      TEXT NOT NULL DEFAULT '',
        file         TEXT NOT NULL DEFAULT '',
        user_agent   TEXT NOT NULL DEFAULT '',
        first_seen   REAL NOT NULL,
        last_seen    REAL NOT NULL,
        count        INTEGER NOT NULL DEFAULT 1
    )""",
    "CREATE INDEX seen_last_seen ON seen (last_seen)",
)


def _migrate_to_1(db: sqlite3.Connection) -> None:
    """The first schema: users, accounts, devices, device_users, seen."""
    for statement in _SCHEMA_1:
        db.execute(statement)


def _migrate_to_2(db: sqlite3.Connection) -> None:
    """A generation counter that every change to users, accounts, devices
    (their model and vars) and device_users bumps, through triggers; fetch
    and seen records leave it alone.  The daemon's read cache keys on it."""
    db.execute("CREATE TABLE generation (id INTEGER PRIMARY KEY CHECK (id = 1), value INTEGER NOT NULL)")
    db.execute("INSERT INTO generation (id, value) VALUES (1, 0)")
    bump = "BEGIN UPDATE generation SET value = value + 1 WHERE id = 1; END"
    for table in ("users", "accounts", "device_users", "devices"):
        db.execute(f"CREATE TRIGGER {table}_inserted AFTER INSERT ON {table} {bump}")
        db.execute(f"CREATE TRIGGER {table}_deleted AFTER DELETE ON {table} {bump}")
        columns = " OF model, vars, mac" if table == "devices" else ""
        db.execute(f"CREATE TRIGGER {table}_updated AFTER UPDATE{columns} ON {table} {bump}")


MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [_migrate_to_1, _migrate_to_2]
"""``MIGRATIONS[i]`` upgrades version ``i`` to ``i + 1`` (inside a transaction)."""


def schema_version() -> int:
    """The schema version this code writes."""
    return len(MIGRATIONS)


# --------------------------------------------------------------------------
# Statements (constant texts: the sqlite3 statement cache keeps them prepared).

_GET_GENERATION = "SELECT value FROM generation WHERE id = 1"
_GET_USER = "SELECT login, password_hash, display_name, vars FROM users WHERE login = ?"
_GET_ACCOUNTS = (
    "SELECT sip_user, sip_password, sip_domain, sip_auth_user, display_name "
    "FROM accounts WHERE login = ? ORDER BY position"
)
_GET_DEVICE = (
    "SELECT mac, model, vars, last_fetch_when, last_fetch_address, last_fetch_file "
    "FROM devices WHERE mac = ?"
)
_GET_DEVICE_USERS = "SELECT login FROM device_users WHERE mac = ? ORDER BY position"
_UPSERT_USER = (
    "INSERT INTO users (login, password_hash, display_name, vars) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (login) DO UPDATE SET password_hash = excluded.password_hash, "
    "display_name = excluded.display_name, vars = excluded.vars"
)
_INSERT_ACCOUNT = (
    "INSERT INTO accounts (login, position, sip_user, sip_auth_user, sip_password, "
    "sip_domain, display_name) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPSERT_DEVICE = (
    "INSERT INTO devices (mac, model, vars, last_fetch_when, last_fetch_address, last_fetch_file) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (mac) DO UPDATE SET model = excluded.model, "
    "vars = excluded.vars, "
    "last_fetch_when = coalesce(excluded.last_fetch_when, devices.last_fetch_when), "
    "last_fetch_address = coalesce(excluded.last_fetch_address, devices.last_fetch_address), "
    "last_fetch_file = coalesce(excluded.last_fetch_file, devices.last_fetch_file)"
)
_RECORD_FETCH = (
    "UPDATE devices SET last_fetch_when = ?, last_fetch_address = ?, last_fetch_file = ? "
    "WHERE mac = ?"
)
_RECORD_SEEN = (
    "INSERT INTO seen (mac, model_guess, address, file, user_agent, first_seen, last_seen, count) "
    "SELECT ?, ?, ?, ?, ?, ?, ?, max(?, 1) WHERE NOT EXISTS (SELECT 1 FROM devices WHERE mac = ?) "
    "ON CONFLICT (mac) DO UPDATE SET "
    "model_guess = CASE WHEN excluded.model_guess != '' THEN excluded.model_guess "
    "ELSE seen.model_guess END, "
    "address = excluded.address, file = excluded.file, user_agent = excluded.user_agent, "
    "first_seen = min(seen.first_seen, excluded.first_seen), "
    "last_seen = max(seen.last_seen, excluded.last_seen), "
    "count = seen.count + excluded.count"
)
_LIST_SEEN = (
    "SELECT mac, model_guess, address, file, user_agent, first_seen, last_seen, count "
    "FROM seen ORDER BY last_seen DESC, mac"
)
_COUNT_SEEN = "SELECT count(*) FROM seen"
_TRIM_SEEN = (  # all but the MAX_SEEN most recently seen (LIMIT -1: no limit)
    "DELETE FROM seen WHERE mac IN (SELECT mac FROM seen ORDER BY last_seen DESC, mac LIMIT -1 OFFSET ?)"
)


class _Holder:
    """One thread's connection (weak-referenceable, unlike sqlite3.Connection)."""

    __slots__ = ("connection", "__weakref__")

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection


def _dump_vars(what: str, value: dict[str, Any]) -> str:
    if not isinstance(value, dict):
        raise BackendError(f"{what}: vars must be a dict, not {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise BackendError(f"{what}: vars cannot be stored as JSON: {exc}") from None


def _list_macs(macs: list[str], limit: int = 10) -> str:
    shown = ", ".join(macs[:limit])
    return shown + (f" and {len(macs) - limit} more" if len(macs) > limit else "")


class SQLiteBackend:
    """Users and devices in one SQLite file (read-write; the default backend)."""

    read_only = False

    def __init__(self, options: dict[str, Any], context: BackendContext) -> None:
        self.context = context
        path = Path(str(options.get("path", DEFAULT_PATH))).expanduser()
        if not path.is_absolute():
            path = Path(context.state_dir) / path
        self.path: Path = path.absolute()
        self.timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
        self._local = threading.local()
        self._holders: weakref.WeakSet[_Holder] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._opened = False
        # read cache (see the module notes), used from the caller's thread only
        self._watch: sqlite3.Connection | None = None
        self._data_version: int | None = None
        self._generation: int | None = None
        self._generation_checked = float("-inf")
        self._users: OrderedDict[str, User | None] = OrderedDict()
        self._devices: OrderedDict[str, Device | None] = OrderedDict()
        # coalesced fetch records
        self._pending_fetches: dict[str, Fetch] = {}
        self._fetch_waiters: list[Deferred] = []
        self._idle_waiters: list[Deferred] = []
        self._flushing = False
        self._flush_call: Any = None

    def __repr__(self) -> str:
        return f"<SQLiteBackend {self.path}>"

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        """Problems with the options as ``key: reason`` strings (empty if fine)."""
        problems = []
        for key, value in options.items():
            if key == "path":
                if not isinstance(value, str) or not value:
                    problems.append("path: must be a non-empty string (a file name; "
                                    "relative to state_dir)")
                elif value == ":memory:" or value.startswith("file:"):
                    problems.append("path: must be a file name (not an in-memory or URI "
                                    "database: the daemon and the CLI must share it)")
            elif key == "timeout":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                    problems.append("timeout: must be a number of seconds, 0 or more")
            else:
                problems.append(f"{key}: unknown option for the sqlite backend "
                                f"(known: {', '.join(OPTIONS)})")
        return problems

    def _withdraw_other_access(self) -> None:
        """A database every user may read (made before zprovd created them
        0600, or by hand) loses the others' access; owner and group keep theirs."""
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            try:
                mode = path.stat().st_mode & 0o777
                if mode & 0o007:
                    path.chmod(mode & 0o770)
                    log.warn("{path} could be read by every user of this host (mode {mode:o}): now {new:o}",
                             path=str(path), mode=mode, new=mode & 0o770)
            except OSError:  # not there, or not ours: opening it says what matters
                pass

    # ------------------------------------------------------------------
    # connections

    def _connect(self, create: bool) -> sqlite3.Connection:
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode={'rwc' if create else 'rw'}"
        db = sqlite3.connect(
            uri,
            uri=True,
            timeout=self.timeout,
            isolation_level=None,
            check_same_thread=False,  # only so that close() may close it; never shared
            cached_statements=256,
        )
        try:
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA synchronous = NORMAL")
        except BaseException:
            db.close()
            raise
        return db

    def _adopt(self, db: sqlite3.Connection) -> None:
        holder = _Holder(db)
        self._local.holder = holder
        with self._lock:
            self._holders.add(holder)

    def _connection(self) -> sqlite3.Connection:
        holder = getattr(self._local, "holder", None)
        if holder is not None:
            return holder.connection
        if not self._opened:
            raise BackendError(f"{self.path}: the backend is not open")
        db = self._connect(create=False)
        self._adopt(db)
        return db

    @contextmanager
    def _transaction(self, db: sqlite3.Connection, write: bool) -> Iterator[sqlite3.Connection]:
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def _call(self, function: Callable[..., Any], *args: Any) -> Deferred:
        """Run ``function(db, *args)`` through ``run_blocking``; sqlite3 errors -> BackendError."""
        return self.context.run_blocking(self._guarded, function, *args)

    def _guarded(self, function: Callable[..., Any], *args: Any) -> Any:
        try:
            return function(self._connection(), *args)
        except sqlite3.Error as exc:
            raise BackendError(f"{self.path}: {_describe(exc)}") from exc

    # ------------------------------------------------------------------
    # open / close

    def open(self) -> Deferred:
        """Create the folder and file if needed, check and migrate the schema, enable WAL."""
        return self.context.run_blocking(self._open_blocking)

    def _open_blocking(self) -> None:
        if self.path.is_dir():
            raise BackendError(f"{self.path}: cannot open database: is a folder, not a file")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BackendError(
                f"{self.path}: cannot create its folder {self.path.parent}: "
                f"{exc.strerror or exc}"
            ) from None
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise BackendError(f"{self.path}: cannot open database: permission denied "
                               "(zprovd needs to read and write it)")
        try:
            # A new database is its owner's only, whatever the umask: it holds
            # SIP passwords.  SQLite gives its -wal and -shm files the same mode.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
        except FileExistsError:
            pass
        except OSError as exc:
            raise BackendError(f"{self.path}: cannot create database: {exc.strerror or exc}") from None
        try:
            db = self._connect(create=True)
        except sqlite3.Error as exc:
            raise BackendError(f"{self.path}: cannot open database: {_describe(exc)}") from None
        try:
            self._prepare(db)
        except BaseException as exc:
            db.close()
            if isinstance(exc, sqlite3.Error):
                raise BackendError(
                    f"{self.path}: cannot open database: {_describe(exc)}"
                ) from None
            raise
        self._withdraw_other_access()  # (once it is known to be a database)
        with self._lock:
            self._local = threading.local()
            self._opened = True
        self._adopt(db)
        self._watch = self._connect(create=False)
        self._forget()

    def _prepare(self, db: sqlite3.Connection) -> None:
        version = db.execute("PRAGMA user_version").fetchone()[0]  # reads: "not a database"?
        self._check_version(version)
        self._check_application(db)
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warn("{path}: journal_mode is {mode}, not WAL (file system without "
                     "shared memory?); readers may wait for writers", path=str(self.path),
                     mode=mode)
        if version == schema_version():
            return
        with self._transaction(db, write=True):
            version = db.execute("PRAGMA user_version").fetchone()[0]  # again, under the lock
            self._check_version(version)
            self._check_application(db)
            if version == 0:
                tables = db.execute(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'"
                ).fetchone()[0]
                if tables:
                    raise BackendError(f"{self.path}: cannot open database: an SQLite database "
                                       "but not a zprovd one (it has tables but no zprovd "
                                       "schema version)")
            for target in range(version + 1, schema_version() + 1):
                MIGRATIONS[target - 1](db)
                log.info("{path}: database schema migrated to version {version}",
                         path=str(self.path), version=target)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute(f"PRAGMA user_version = {schema_version()}")

    def _check_application(self, db: sqlite3.Connection) -> None:
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        if application_id not in (0, APPLICATION_ID):
            raise BackendError(f"{self.path}: cannot open database: it belongs to another "
                               f"application (application_id {application_id:#x})")

    def _check_version(self, version: int) -> None:
        if version > schema_version():
            raise BackendError(
                f"{self.path}: cannot open database: its schema version {version} is newer "
                f"than this zprovd knows ({schema_version()}); upgrade zprovd or use another file"
            )

    def close(self) -> Deferred:
        """Write the fetches still waiting, then close every thread's connection."""
        d = self._fetches_written()
        d.addBoth(lambda _: self.context.run_blocking(self._close_blocking))
        return d

    def _close_blocking(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.close()
        self._forget()
        with self._lock:
            self._opened = False
            holders = list(self._holders)
            self._holders = weakref.WeakSet()
            self._local = threading.local()
        for holder in holders:
            try:
                holder.connection.close()
            except sqlite3.Error:
                pass

    # ------------------------------------------------------------------
    # look-ups

    def _forget(self) -> None:
        self._users.clear()
        self._devices.clear()
        self._data_version = None
        self._generation = None

    def _cache_is_current(self) -> bool:
        """Whether no user or device changed since the cache was filled (empties it if one did).

        ``PRAGMA data_version`` (shared memory, no disk I/O) says whether any
        other connection committed; only then is the one-row generation read,
        which moves for users and devices but not for fetch or seen records,
        so the daemon's own bookkeeping does not empty the cache.
        """
        if self._watch is None:
            return False
        try:
            version = self._watch.execute("PRAGMA data_version").fetchone()[0]
            if version == self._data_version:
                return True
            generation = self._watch.execute(_GET_GENERATION).fetchone()[0]
        except sqlite3.Error:
            self._forget()
            return False
        self._data_version = version
        if generation != self._generation:
            self._users.clear()
            self._devices.clear()
            self._generation = generation
            return False
        return True

    def generation(self) -> int | None:
        """The generation counter, if no user or device changed since the
        read cache was filled (``PRAGMA data_version``: shared memory).
        Checked at most every GENERATION_RECHECK seconds: a change is seen
        by requests that arrive that long after its commit."""
        now = time.monotonic()
        if self._generation is not None and now - self._generation_checked < GENERATION_RECHECK:
            return self._generation
        if not self._cache_is_current():
            return None
        self._generation_checked = now
        return self._generation

    def _cached(self, cache: OrderedDict, key: str, load: Callable[..., Any]) -> Deferred:
        if self._cache_is_current() and key in cache:
            cache.move_to_end(key)
            return succeed(_copy(cache[key]))
        generation = self._generation

        def remember(record):
            if generation is not None and generation == self._generation:
                cache[key] = _copy(record)
                while len(cache) > CACHE_SIZE:
                    cache.popitem(last=False)
            return record

        return self._call(load, key).addCallback(remember)

    def get_user(self, login: str) -> Deferred:
        """The user, or None."""
        return self._cached(self._users, login, self._get_user)

    def _get_user(self, db: sqlite3.Connection, login: str) -> User | None:
        with self._transaction(db, write=False):
            return self._read_user(db, login)

    def _read_user(self, db: sqlite3.Connection, login: str) -> User | None:
        row = db.execute(_GET_USER, (login,)).fetchone()
        if row is None:
            return None
        return self._user(row, db.execute(_GET_ACCOUNTS, (login,)).fetchall())

    def get_device(self, mac: str) -> Deferred:
        """The device (``mac`` in any spelling), or None."""
        try:
            canonical = normalize_mac(mac)
        except (InvalidMAC, AttributeError):
            return succeed(None)
        return self._cached(self._devices, canonical, self._get_device)

    def _get_device(self, db: sqlite3.Connection, mac: str) -> Device | None:
        try:
            mac = normalize_mac(mac)
        except (InvalidMAC, AttributeError):
            return None
        with self._transaction(db, write=False):
            return self._read_device(db, mac)

    def _read_device(self, db: sqlite3.Connection, mac: str) -> Device | None:
        row = db.execute(_GET_DEVICE, (mac,)).fetchone()
        if row is None:
            return None
        return self._device(row, [login for (login,) in db.execute(_GET_DEVICE_USERS, (mac,))])

    def list_users(self) -> Deferred:
        """Every user, by login."""
        return self._call(self._list_users)

    def _list_users(self, db: sqlite3.Connection) -> list[User]:
        with self._transaction(db, write=False):
            users = db.execute(
                "SELECT login, password_hash, display_name, vars FROM users ORDER BY login"
            ).fetchall()
            accounts: dict[str, list[tuple]] = {}
            for login, *account in db.execute(
                "SELECT login, sip_user, sip_password, sip_domain, sip_auth_user, display_name "
                "FROM accounts ORDER BY login, position"
            ):
                accounts.setdefault(login, []).append(tuple(account))
        return [self._user(row, accounts.get(row[0], [])) for row in users]

    def device_var_values(self, name: str) -> Deferred:
        """Every distinct string value of the device var ``name``."""
        return self._call(self._device_var_values, name)

    def _device_var_values(self, db: sqlite3.Connection, name: str) -> set[str]:
        # LIKE (its wildcards make it a superset) skips the devices whose vars
        # do not even mention the name without decoding their JSON.
        pattern = "%" + json.dumps(name) + "%"
        with self._transaction(db, write=False):
            rows = db.execute("SELECT vars FROM devices WHERE vars LIKE ?", (pattern,)).fetchall()
        values = set()
        for (text,) in rows:
            try:
                value = json.loads(text).get(name)
            except (ValueError, AttributeError):
                continue  # get_device reports a broken row when it is asked for it
            if isinstance(value, str) and value:
                values.add(value)
        return values

    def list_devices(self) -> Deferred:
        """Every device, by MAC."""
        return self._call(self._list_devices)

    def _list_devices(self, db: sqlite3.Connection) -> list[Device]:
        with self._transaction(db, write=False):
            devices = db.execute(
                "SELECT mac, model, vars, last_fetch_when, last_fetch_address, last_fetch_file "
                "FROM devices ORDER BY mac"
            ).fetchall()
            logins: dict[str, list[str]] = {}
            for mac, login in db.execute(
                "SELECT mac, login FROM device_users ORDER BY mac, position"
            ):
                logins.setdefault(mac, []).append(login)
        return [self._device(row, logins.get(row[0], [])) for row in devices]

    def _load_vars(self, what: str, text: str) -> dict[str, Any]:
        try:
            value = json.loads(text)
        except ValueError:
            raise BackendError(f"{self.path}: {what}: vars are not valid JSON") from None
        if not isinstance(value, dict):
            raise BackendError(f"{self.path}: {what}: vars are not a JSON object")
        return value

    def _user(self, row: tuple, accounts: list[tuple]) -> User:
        login, password_hash, display_name, vars_text = row
        return User(
            login=login,
            password_hash=password_hash,
            display_name=display_name,
            accounts=[
                SipAccount(
                    sip_user=a[0], sip_password=a[1], sip_domain=a[2],
                    sip_auth_user=a[3], display_name=a[4],
                )
                for a in accounts
            ],
            vars=self._load_vars(f"user {login!r}", vars_text),
        )

    def _device(self, row: tuple, logins: list[str]) -> Device:
        mac, model, vars_text, when, address, file = row
        return Device(
            mac=mac,
            model=model,
            users=logins,
            vars=self._load_vars(f"device {mac}", vars_text),
            last_fetch=None if when is None else Fetch(when=when, address=address or "",
                                                       file=file or ""),
        )

    # ------------------------------------------------------------------
    # changes

    def save_user(self, user: User) -> Deferred:
        """Create or replace a user and all of its accounts."""
        return self._call(self._write, self._save_user, user)

    def remove_user(self, login: str) -> Deferred:
        """Remove a user; NotFound if absent, BackendError if devices still use it."""
        return self._call(self._write, self._remove_user, login)

    def save_device(self, device: Device) -> Deferred:
        """Create or replace a device; BackendError if one of its users does not exist.

        ``last_fetch`` is learned, not configured: None keeps what is recorded.
        """
        return self._call(self._write, self._save_device, device)

    def remove_device(self, mac: str) -> Deferred:
        """Remove a device; NotFound if absent."""
        return self._call(self._write, self._remove_device, mac)

    def import_records(self, users: list[User], devices: list[Device]) -> Deferred:
        """Save the users, then the devices, in one transaction: all or nothing."""
        return self._call(self._write, self._import, users, devices)

    def update_user(self, login: str, change: Callable[[User | None], User]) -> Deferred:
        """Save ``change(the user or None)`` in the write transaction that read it (see Backend)."""
        return self._call(self._write, self._update_user, login, change)

    def _update_user(self, db: sqlite3.Connection, login: str, change: Callable[[User | None], User]) -> User:
        user = change(self._read_user(db, login))
        self._save_user(db, user)
        return user

    def update_device(self, mac: str, change: Callable[[Device | None], Device]) -> Deferred:
        """Save ``change(the device or None)`` in the write transaction that read it (see Backend)."""
        return self._call(self._write, self._update_device, mac, change)

    def _update_device(self, db: sqlite3.Connection, mac: str, change: Callable[[Device | None], Device]) -> Device:
        try:
            current = self._read_device(db, normalize_mac(mac))
        except (InvalidMAC, AttributeError):
            current = None
        device = change(current)
        self._save_device(db, device)
        return device

    def _write(self, db: sqlite3.Connection, function: Callable[..., Any], *args: Any) -> Any:
        with self._transaction(db, write=True):
            return function(db, *args)

    def _save_user(self, db: sqlite3.Connection, user: User) -> None:
        if not isinstance(user.login, str) or not user.login:
            raise BackendError("a user needs a non-empty login")
        what = f"user {user.login!r}"
        if user.password_hash and not is_password_hash(user.password_hash):
            raise BackendError(f"{what}: password_hash is not from zprovd.passwords.hash_password "
                               "(refusing to store what may be a plain password)")
        db.execute(_UPSERT_USER, (user.login, user.password_hash, user.display_name or "",
                                  _dump_vars(what, user.vars)))
        db.execute("DELETE FROM accounts WHERE login = ?", (user.login,))
        db.executemany(
            _INSERT_ACCOUNT,
            [
                (user.login, position, a.sip_user, a.sip_auth_user or "", a.sip_password,
                 a.sip_domain, a.display_name or "")
                for position, a in enumerate(user.accounts)
            ],
        )

    def _remove_user(self, db: sqlite3.Connection, login: str) -> None:
        if db.execute("SELECT 1 FROM users WHERE login = ?", (login,)).fetchone() is None:
            raise NotFound(f"no user {login!r}")
        macs = [mac for (mac,) in db.execute(
            "SELECT DISTINCT mac FROM device_users WHERE login = ? ORDER BY mac", (login,))]
        if macs:
            raise BackendError(
                f"user {login!r} is still a user of device(s) {_list_macs(macs)}: "
                "remove it from those devices (or remove the devices) first"
            )
        db.execute("DELETE FROM users WHERE login = ?", (login,))

    def _save_device(self, db: sqlite3.Connection, device: Device) -> None:
        try:
            mac = normalize_mac(device.mac)
        except (InvalidMAC, AttributeError):
            raise BackendError(f"device {device.mac!r}: not a MAC address") from None
        missing = [login for login in dict.fromkeys(device.users)
                   if db.execute("SELECT 1 FROM users WHERE login = ?", (login,)).fetchone()
                   is None]
        if missing:
            raise BackendError(f"device {mac}: no such user(s): "
                               + ", ".join(repr(login) for login in missing))
        fetch = device.last_fetch
        db.execute(_UPSERT_DEVICE, (
            mac, device.model, _dump_vars(f"device {mac}", device.vars),
            None if fetch is None else fetch.when,
            None if fetch is None else fetch.address,
            None if fetch is None else fetch.file,
        ))
        db.execute("DELETE FROM device_users WHERE mac = ?", (mac,))
        db.executemany(
            "INSERT INTO device_users (mac, position, login) VALUES (?, ?, ?)",
            [(mac, position, login) for position, login in enumerate(device.users)],
        )
        db.execute("DELETE FROM seen WHERE mac = ?", (mac,))

    def _remove_device(self, db: sqlite3.Connection, mac: str) -> None:
        try:
            canonical = normalize_mac(mac)
        except (InvalidMAC, AttributeError):
            raise NotFound(f"no device {mac!r}") from None
        if db.execute("DELETE FROM devices WHERE mac = ?", (canonical,)).rowcount == 0:
            raise NotFound(f"no device {canonical}")

    def _import(self, db: sqlite3.Connection, users: list[User], devices: list[Device]) -> None:
        for user in users:
            try:
                self._save_user(db, user)
            except BackendError as exc:
                raise BackendError(f"import: nothing imported: {exc}") from None
        for device in devices:
            try:
                self._save_device(db, device)
            except BackendError as exc:
                raise BackendError(f"import: nothing imported: {exc}") from None

    # ------------------------------------------------------------------
    # backup

    def backup(self, path: Path) -> Deferred:
        """Write a consistent copy of the database to ``path``, while the daemon runs.

        The copy is a database file like the live one, readable by its owner
        only (it holds SIP passwords).  It is written beside ``path`` and
        renamed over it once complete: a failed backup leaves ``path`` as it was.
        """
        return self._call(self._backup, Path(path).absolute())

    def _backup(self, db: sqlite3.Connection, path: Path) -> None:
        if path == self.path:
            raise BackendError(f"{path}: that is the live database")
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
        os.close(fd)
        try:
            copy_db = sqlite3.connect(temp)
            try:
                db.backup(copy_db)
            finally:
                copy_db.close()
            os.replace(temp, path)
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise

    # ------------------------------------------------------------------
    # what the daemon learns

    def record_fetch(self, mac: str, fetch: Fetch) -> Deferred:
        """Remember the last fetch of a configured device (ignored for unknown MACs).

        Coalesced: the Deferred fires once the write that carries this fetch
        (or a later fetch of the same device) is committed.
        """
        try:
            mac = normalize_mac(mac)
        except (InvalidMAC, AttributeError):
            return succeed(None)
        self._pending_fetches[mac] = fetch
        cached = self._devices.get(mac)
        if cached is not None:  # fetch writes leave the generation alone: keep the copy true
            cached.last_fetch = Fetch(fetch.when, fetch.address, fetch.file)
        waiter: Deferred = Deferred()
        self._fetch_waiters.append(waiter)
        self._start_flush()
        return waiter

    def _start_flush(self) -> None:
        if self._flushing or self._flush_call is not None or not self._pending_fetches:
            return
        batch, self._pending_fetches = self._pending_fetches, {}
        waiters, self._fetch_waiters = self._fetch_waiters, []
        self._flushing = True

        def done(result):
            self._flushing = False
            for waiter in waiters:
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(None)
            call_later = self.context.call_later
            if self._pending_fetches and call_later is not None and not self._idle_waiters:
                # Busy: gather what arrives for a while (one thread hop and
                # one transaction per FETCH_WRITE_INTERVAL, not per request).
                self._flush_call = call_later(FETCH_WRITE_INTERVAL, self._paced_flush)
                return
            self._start_flush()
            if not self._flushing:
                idle, self._idle_waiters = self._idle_waiters, []
                for waiter in idle:
                    waiter.callback(None)

        self._call(self._record_fetches, batch).addBoth(done)

    def _paced_flush(self) -> None:
        self._flush_call = None
        self._start_flush()

    def _fetches_written(self) -> Deferred:
        """Fires when no fetch is waiting or being written (writing them now)."""
        if not self._flushing and not self._pending_fetches:
            return succeed(None)
        waiter: Deferred = Deferred()
        self._idle_waiters.append(waiter)
        if self._flush_call is not None:
            self._flush_call.cancel()
            self._flush_call = None
        self._start_flush()
        return waiter

    def _record_fetches(self, db: sqlite3.Connection, batch: dict[str, Fetch]) -> None:
        if not batch:
            return
        with self._transaction(db, write=True):
            db.executemany(_RECORD_FETCH, [(f.when, f.address, f.file, mac) for mac, f in batch.items()])

    def record_seen(self, seen: SeenDevice) -> Deferred:
        """Add or update a not-yet-configured phone (ignored if the MAC is configured).

        Each call adds ``max(seen.count, 1)`` to the count (pass 1 per
        request); ``first_seen`` keeps the earliest, ``last_seen`` the latest
        time; a non-empty ``model_guess`` replaces the previous guess.
        """
        return self._call(self._record_seen, seen)

    def _record_seen(self, db: sqlite3.Connection, seen: SeenDevice) -> None:
        try:
            mac = normalize_mac(seen.mac)
        except (InvalidMAC, AttributeError):
            return
        with self._transaction(db, write=True):
            db.execute(_RECORD_SEEN, (
                mac, seen.model_guess or "", seen.address or "", seen.file or "",
                seen.user_agent or "", seen.first_seen, seen.last_seen, seen.count, mac,
            ))
            if db.execute(_COUNT_SEEN).fetchone()[0] > MAX_SEEN:
                db.execute(_TRIM_SEEN, (MAX_SEEN,))

    def list_seen(self) -> Deferred:
        """The not-yet-configured phones, most recently seen first."""
        return self._call(self._list_seen)

    def _list_seen(self, db: sqlite3.Connection) -> list[SeenDevice]:
        return [SeenDevice(*row) for row in db.execute(_LIST_SEEN)]

    def forget_seen(self, macs: list[str] | None) -> Deferred:
        """Remove these MACs (any spelling; None: all) from the seen phones; fires with the count removed."""
        return self._call(self._forget_seen, None if macs is None else list(macs))

    def _forget_seen(self, db: sqlite3.Connection, macs: list[str] | None) -> int:
        with self._transaction(db, write=True):
            if macs is None:
                return db.execute("DELETE FROM seen").rowcount
            canonical = set()
            for mac in macs:
                try:
                    canonical.add(normalize_mac(mac))
                except (InvalidMAC, AttributeError):
                    continue  # not a MAC: never seen
            return sum(db.execute("DELETE FROM seen WHERE mac = ?", (mac,)).rowcount for mac in sorted(canonical))


def _copy(record: User | Device | None) -> User | Device | None:
    """A copy callers may change freely (cheaper than deepcopy: the fields are
    strings, numbers, small lists and JSON dicts of plain values)."""
    if record is None:
        return None
    if isinstance(record, User):
        return dataclasses.replace(
            record, accounts=[dataclasses.replace(a) for a in record.accounts], vars=copy.deepcopy(record.vars)
        )
    return dataclasses.replace(
        record, users=list(record.users), vars=copy.deepcopy(record.vars),
        last_fetch=dataclasses.replace(record.last_fetch) if record.last_fetch else None,
    )


def _describe(exc: sqlite3.Error) -> str:
    """One line for an sqlite3 error."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if text == "database is locked":
        text += " (another process or thread held it longer than the timeout)"
    return text
