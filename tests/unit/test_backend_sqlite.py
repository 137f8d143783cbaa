"""The SQLite backend: files, schema, concurrency (the contract is in test_backend_contract)."""

from __future__ import annotations

import os
import sqlite3
import threading
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from zprovd.backends import (
    BackendContext,
    BackendError,
    Device,
    Fetch,
    SeenDevice,
    SipAccount,
    User,
    run_inline,
)
from zprovd.backends import sqlite as sqlite_backend
from zprovd.backends.sqlite import SQLiteBackend, schema_version
from zprovd.passwords import hash_password


def result_of(d: Deferred) -> Any:
    """The result of an already-fired Deferred, or raise its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def make(tmp_path: Path, run_blocking: Any = run_inline, **options: Any) -> SQLiteBackend:
    context = BackendContext(state_dir=tmp_path / "state", config_dir=tmp_path / "etc",
                             run_blocking=run_blocking)
    assert SQLiteBackend.check_options(options) == []
    return SQLiteBackend(options, context)


def opened(tmp_path: Path, **options: Any) -> SQLiteBackend:
    backend = make(tmp_path, **options)
    result_of(backend.open())
    return backend


def open_error(backend: SQLiteBackend) -> str:
    with pytest.raises(BackendError) as info:
        result_of(backend.open())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{backend.path}: ")
    return message


def user(login: str, *sip_users: str) -> User:
    return User(login, "pbkdf2-sha256$1$AAAA$" + "A" * 43, login.title(),
                [SipAccount(s, "pw" + s, "pbx.example.com") for s in sip_users or (login,)])


@pytest.fixture
def backend(tmp_path: Path) -> SQLiteBackend:
    b = opened(tmp_path)
    yield b
    result_of(b.close())


def raw(path: Path) -> sqlite3.Connection:
    """Another connection, as another process (the CLI) would have."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA foreign_keys = ON")
    return db


# ---- options and paths -----------------------------------------------------


def test_check_options() -> None:
    assert SQLiteBackend.check_options({}) == []
    assert SQLiteBackend.check_options({"path": "/x/y.db", "timeout": 2.5}) == []
    assert SQLiteBackend.check_options(
        {"path": 3, "timeout": True, "pth": "x"}
    ) == [
        "path: must be a non-empty string (a file name; relative to state_dir)",
        "timeout: must be a number of seconds, 0 or more",
        "pth: unknown option for the sqlite backend (known: path, timeout)",
    ]
    assert SQLiteBackend.check_options({"path": ":memory:", "timeout": -1}) == [
        "path: must be a file name (not an in-memory or URI database: the daemon and the CLI "
        "must share it)",
        "timeout: must be a number of seconds, 0 or more",
    ]


def test_paths(tmp_path: Path) -> None:
    assert make(tmp_path).path == tmp_path / "state" / "zprovd.sqlite3"
    assert make(tmp_path, path="db/x.db").path == tmp_path / "state" / "db" / "x.db"
    assert make(tmp_path, path=str(tmp_path / "abs.db")).path == tmp_path / "abs.db"


def test_creates_folders_and_file(tmp_path: Path) -> None:
    backend = opened(tmp_path, path="a/b c/z?#.db")
    assert (tmp_path / "state" / "a" / "b c" / "z?#.db").is_file()
    result_of(backend.save_user(user("alice")))
    assert result_of(backend.get_user("alice")).login == "alice"


def test_not_open(tmp_path: Path) -> None:
    backend = make(tmp_path)
    with pytest.raises(BackendError, match="not open"):
        result_of(backend.get_user("alice"))


def test_closed(backend: SQLiteBackend) -> None:
    result_of(backend.close())
    with pytest.raises(BackendError, match="not open"):
        result_of(backend.get_user("alice"))
    result_of(backend.open())  # can be opened again
    assert result_of(backend.get_user("alice")) is None


# ---- schema ---------------------------------------------------------------------


def test_migrates_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "state" / "zprovd.sqlite3"
    path.parent.mkdir()
    path.write_bytes(b"")
    backend = opened(tmp_path)
    db = raw(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version() == 2
    assert db.execute("PRAGMA application_id").fetchone()[0] == sqlite_backend.APPLICATION_ID
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"users", "accounts", "devices", "device_users", "seen", "generation"}
    result_of(backend.close())
    opened(tmp_path)  # opening again changes nothing


def test_the_next_version_is_one_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result_of(opened(tmp_path).close())

    def migrate_next(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE users ADD COLUMN email TEXT NOT NULL DEFAULT ''")

    current = schema_version()
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", [*sqlite_backend.MIGRATIONS, migrate_next])
    backend = opened(tmp_path)
    db = raw(backend.path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == current + 1
    assert "email" in [row[1] for row in db.execute("PRAGMA table_info(users)")]


def test_failed_migration_changes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result_of(opened(tmp_path).close())

    def broken(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE half (x)")
        db.execute("THIS IS NOT SQL")

    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", [*sqlite_backend.MIGRATIONS, broken])
    message = open_error(make(tmp_path))
    assert "syntax error" in message
    db = raw(make(tmp_path).path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == schema_version() - 1
    assert db.execute("SELECT count(*) FROM sqlite_master WHERE name='half'").fetchone()[0] == 0


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    backend = make(tmp_path)
    backend.path.parent.mkdir(parents=True)
    raw(backend.path).execute("PRAGMA user_version = 7")
    assert open_error(backend) == (
        f"{backend.path}: cannot open database: its schema version 7 is newer than this "
        f"zprovd knows ({schema_version()}); upgrade zprovd or use another file"
    )


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    backend = make(tmp_path)
    backend.path.parent.mkdir(parents=True)
    backend.path.write_bytes(b"this is not a database, just some text\n" * 200)
    assert open_error(backend) == f"{backend.path}: cannot open database: file is not a database"


def test_truncated_database_is_refused(tmp_path: Path) -> None:
    backend = opened(tmp_path)
    result_of(backend.import_records([user(f"u{i}") for i in range(300)], []))
    result_of(backend.close())
    data = backend.path.read_bytes()
    backend.path.write_bytes(data[:100] + b"\xff" * (len(data) - 100))
    (backend.path.parent / "zprovd.sqlite3-wal").unlink(missing_ok=True)
    assert open_error(backend).startswith(f"{backend.path}: cannot open database: ")


def test_folder_instead_of_file(tmp_path: Path) -> None:
    backend = make(tmp_path)
    backend.path.mkdir(parents=True)
    assert open_error(backend) == f"{backend.path}: cannot open database: is a folder, not a file"


def test_folder_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the folder should be")
    backend = make(tmp_path)
    assert "cannot create its folder" in open_error(backend)


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root ignores file permissions")
def test_permission_denied(tmp_path: Path) -> None:
    backend = make(tmp_path)
    backend.path.parent.mkdir(parents=True)
    backend.path.write_bytes(b"")
    backend.path.chmod(0)
    assert "permission denied" in open_error(backend)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    backend = make(tmp_path)
    backend.path.parent.mkdir(parents=True)
    raw(backend.path).execute("CREATE TABLE invoices (id INTEGER)")
    assert "not a zprovd one" in open_error(backend)
    other = make(tmp_path, path="other.db")
    other.path.parent.mkdir(parents=True, exist_ok=True)
    raw(other.path).execute("PRAGMA application_id = 42")
    assert "belongs to another application (application_id 0x2a)" in open_error(other)


def test_wal_and_foreign_keys(backend: SQLiteBackend) -> None:
    assert raw(backend.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db = backend._connection()
    assert db.execute("PRAGMA foreign_keys").fetchone()[0] == 1


def test_lookups_use_indexes(backend: SQLiteBackend) -> None:
    db = backend._connection()
    for statement, args in [
        (sqlite_backend._GET_USER, ("a",)),
        (sqlite_backend._GET_ACCOUNTS, ("a",)),
        (sqlite_backend._GET_DEVICE, ("a",)),
        (sqlite_backend._GET_DEVICE_USERS, ("a",)),
        ("SELECT DISTINCT mac FROM device_users WHERE login = ? ORDER BY mac", ("a",)),
    ]:
        plan = " | ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + statement, args))
        assert "SCAN" not in plan and "SEARCH" in plan, (statement, plan)


# ---- other processes ----------------------------------------------------------------


def test_another_connection_sees_changes(tmp_path: Path) -> None:
    daemon = opened(tmp_path)
    cli = opened(tmp_path)  # the CLI opens the same file while the daemon runs
    assert result_of(daemon.get_user("alice")) is None
    result_of(cli.save_user(user("alice", "201")))
    assert result_of(daemon.get_user("alice")).accounts[0].sip_user == "201"
    result_of(cli.save_user(user("alice", "202", "203")))
    assert [a.sip_user for a in result_of(daemon.get_user("alice")).accounts] == ["202", "203"]
    result_of(cli.save_device(Device("001565aabbcc", "t54w", ["alice"])))
    assert result_of(daemon.get_device("001565aabbcc")).users == ["alice"]
    result_of(cli.remove_device("001565aabbcc"))
    result_of(cli.remove_user("alice"))
    assert result_of(daemon.get_user("alice")) is None
    assert result_of(daemon.get_device("001565aabbcc")) is None
    # and a plain sqlite3 client too
    result_of(daemon.save_user(user("bob")))
    raw(daemon.path).execute("UPDATE users SET display_name = 'Robert' WHERE login = 'bob'")
    assert result_of(daemon.get_user("bob")).display_name == "Robert"


def test_locked_database(tmp_path: Path) -> None:
    backend = opened(tmp_path, timeout=0.05)
    result_of(backend.save_user(user("alice")))
    other = raw(backend.path)
    other.execute("BEGIN IMMEDIATE")
    other.execute("DELETE FROM accounts")
    try:
        with pytest.raises(BackendError) as info:
            result_of(backend.save_user(user("bob")))
        assert str(info.value) == (
            f"{backend.path}: database is locked (another process or thread held it longer "
            "than the timeout)"
        )
        # WAL: readers are not blocked by the writer, and see the last commit
        assert len(result_of(backend.get_user("alice")).accounts) == 1
    finally:
        other.execute("ROLLBACK")
    result_of(backend.save_user(user("bob")))  # the connection is usable again


# ---- references and transactions -------------------------------------------------


def test_removing_a_referenced_user_lists_the_devices(backend: SQLiteBackend) -> None:
    result_of(backend.import_records(
        [user("alice")],
        [Device(f"0015650000{i:02x}", "t54w", ["alice"]) for i in range(12)],
    ))
    with pytest.raises(BackendError) as info:
        result_of(backend.remove_user("alice"))
    assert str(info.value) == (
        "user 'alice' is still a user of device(s) 001565000000, 001565000001, 001565000002, "
        "001565000003, 001565000004, 001565000005, 001565000006, 001565000007, 001565000008, "
        "001565000009 and 2 more: remove it from those devices (or remove the devices) first"
    )
    assert result_of(backend.get_user("alice")) is not None


def test_removing_things_cascades(backend: SQLiteBackend) -> None:
    result_of(backend.import_records([user("alice", "1", "2")],
                                     [Device("001565aabbcc", "t54w", ["alice", "alice"])]))
    db = raw(backend.path)
    assert db.execute("SELECT count(*) FROM device_users").fetchone()[0] == 2
    result_of(backend.remove_device("001565aabbcc"))
    assert db.execute("SELECT count(*) FROM device_users").fetchone()[0] == 0
    result_of(backend.remove_user("alice"))
    assert db.execute("SELECT count(*) FROM accounts").fetchone()[0] == 0


def test_import_is_all_or_nothing(backend: SQLiteBackend) -> None:
    result_of(backend.save_user(user("alice")))
    with pytest.raises(BackendError) as info:
        result_of(backend.import_records(
            [user(f"u{i}") for i in range(50)] + [user("alice", "999")],
            [Device("001565000001", "t54w", ["u1"]), Device("001565000002", "t54w", ["ghost"])],
        ))
    assert str(info.value) == "import: nothing imported: device 001565000002: no such user(s): 'ghost'"
    db = raw(backend.path)
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM devices").fetchone()[0] == 0
    assert [a.sip_user for a in result_of(backend.get_user("alice")).accounts] == ["alice"]


def test_import_of_unstorable_vars_fails_cleanly(backend: SQLiteBackend) -> None:
    bad = user("bob")
    bad.vars = {"x": object()}
    with pytest.raises(BackendError, match="user 'bob': vars cannot be stored as JSON"):
        result_of(backend.import_records([user("alice"), bad], []))
    assert result_of(backend.list_users()) == []


def test_plain_password_is_never_stored(backend: SQLiteBackend) -> None:
    with pytest.raises(BackendError, match="password_hash is not from zprovd.passwords"):
        result_of(backend.save_user(User("alice", "s3cret")))
    result_of(backend.save_user(User("alice", "")))  # empty: no Zoiper log-in
    assert result_of(backend.get_user("alice")).password_hash == ""


def test_bad_mac_on_save(backend: SQLiteBackend) -> None:
    with pytest.raises(BackendError, match="not a MAC address"):
        result_of(backend.save_device(Device("nope", "t54w", [])))


def test_seen_counts_grow(backend: SQLiteBackend) -> None:
    for when in (3.0, 1.0, 2.0):
        result_of(backend.record_seen(SeenDevice("001565000001", "", "a", "f", "ua", when, when, 1)))
    [seen] = result_of(backend.list_seen())
    assert (seen.first_seen, seen.last_seen, seen.count) == (1.0, 3.0, 3)


# ---- threads -----------------------------------------------------------------------


@pytest.fixture
def pool() -> ThreadPool:
    pool = ThreadPool(minthreads=8, maxthreads=8, name="test-sqlite")
    pool.start()
    yield pool
    pool.stop()


@pytest_twisted.inlineCallbacks
def test_thread_pool(tmp_path: Path, pool: ThreadPool) -> Any:
    """200 concurrent look-ups (and some writes) through a real thread pool."""
    backend = make(tmp_path, run_blocking=partial(deferToThreadPool, reactor, pool))
    yield backend.open()
    users = [user(f"user{i}", f"{1000 + i}") for i in range(20)]
    devices = [Device(f"001565{i:06x}", "t54w", [f"user{i % 20}"]) for i in range(20)]
    yield backend.import_records(users, devices)

    threads: set[str] = set()
    real_get_user = backend._get_user

    def get_user(db: sqlite3.Connection, login: str) -> Any:
        threads.add(threading.current_thread().name)
        return real_get_user(db, login)

    backend._get_user = get_user  # type: ignore[method-assign]

    calls = []
    for i in range(200):
        calls.append(backend.get_user(f"user{i % 20}"))
        calls.append(backend.get_device(f"00:15:65:00:00:{i % 20:02x}"))
        if i % 10 == 0:
            calls.append(backend.record_fetch(f"001565{i % 20:06x}", Fetch(i, "192.0.2.1", "f")))
            calls.append(backend.record_seen(SeenDevice(f"0004f2{i:06x}", "", "a", "f", "u", i, i, 1)))
    results = yield gatherResults(calls, consumeErrors=True)

    found_users = [r for r in results if isinstance(r, User)]
    found_devices = [r for r in results if isinstance(r, Device)]
    assert len(found_users) == 200 and len(found_devices) == 200
    for i, (u, d) in enumerate(zip(found_users, found_devices)):
        assert u.login == f"user{i % 20}" and u.accounts[0].sip_user == f"{1000 + i % 20}"
        assert d.mac == f"001565{i % 20:06x}" and d.users == [f"user{i % 20}"]
    assert len(threads) > 1, "all look-ups ran in one thread"
    assert len((yield backend.list_seen())) == 20
    assert len(backend._holders) > 1  # one connection per thread
    yield backend.close()
    assert len(backend._holders) == 0


def test_a_version_1_file_is_migrated_keeping_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_backend, "MIGRATIONS", sqlite_backend.MIGRATIONS[:1])
    old = opened(tmp_path)
    result_of(old.save_user(User("keep", hash_password("pw", iterations=1), "Keep", [SipAccount("1", "s", "d")])))
    result_of(old.close())
    monkeypatch.undo()
    backend = opened(tmp_path)
    assert result_of(backend.get_user("keep")).display_name == "Keep"
    db = raw(backend.path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == 2
    before = db.execute("SELECT value FROM generation").fetchone()[0]
    result_of(backend.save_user(User("new", hash_password("pw", iterations=1))))
    assert db.execute("SELECT value FROM generation").fetchone()[0] > before


# ---------------------------------------------------------------------------
# backup


def test_a_new_database_is_its_owners_only_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        backend = opened(tmp_path)
        result_of(backend.save_user(user("alice", "201", "202")))
    finally:
        os.umask(old)
    files = sorted((tmp_path / "state").glob("zprovd.sqlite3*"))
    assert [f.name for f in files][:2] == ["zprovd.sqlite3", "zprovd.sqlite3-shm"] and files
    assert {f.name: f.stat().st_mode & 0o777 for f in files} == {f.name: 0o600 for f in files}  # SIP passwords inside
    result_of(backend.close())


def test_a_database_every_user_could_read_is_closed_to_them(tmp_path):
    backend = opened(tmp_path)
    result_of(backend.save_user(user("alice", "201", "202")))
    result_of(backend.close())
    db = tmp_path / "state" / "zprovd.sqlite3"
    db.chmod(0o644)  # made by an older zprovd, or by hand
    reopened = opened(tmp_path)
    assert db.stat().st_mode & 0o777 == 0o640
    assert result_of(reopened.get_user("alice")) is not None
    result_of(reopened.close())


def test_backup_is_a_private_copy_that_opens_as_the_same_records(tmp_path):
    backend = opened(tmp_path)
    result_of(backend.save_user(user("alice", "201", "202")))
    result_of(backend.save_device(Device("001565aabbcc", "yealink-t48g", ["alice"], vars={"url_key": "k"})))
    result_of(backend.record_fetch("001565aabbcc", Fetch(1_700_000_000.0, "192.0.2.7", "001565aabbcc.cfg")))
    result_of(backend._fetches_written())
    target = tmp_path / "saved" / "zprovd-backup.sqlite3"
    target.parent.mkdir()
    target.write_text("an older backup")
    result_of(backend.backup(target))
    assert target.stat().st_mode & 0o777 == 0o600  # SIP passwords inside
    assert sorted(p.name for p in target.parent.iterdir()) == ["zprovd-backup.sqlite3"]  # no temporary left
    copy = opened(tmp_path / "elsewhere", path=str(target))
    assert result_of(copy.list_users()) == result_of(backend.list_users())
    assert result_of(copy.list_devices()) == result_of(backend.list_devices())
    assert result_of(copy.get_device("001565aabbcc")).last_fetch.address == "192.0.2.7"


def test_a_failed_backup_leaves_the_target_and_no_temporary(tmp_path):
    backend = opened(tmp_path)
    result_of(backend.save_user(user("alice")))
    folder = tmp_path / "a-folder"
    (folder / "x").mkdir(parents=True)  # os.replace cannot put a file over a non-empty folder
    with pytest.raises(OSError):
        result_of(backend.backup(folder))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert (folder / "x").is_dir()
    with pytest.raises(OSError):
        result_of(backend.backup(tmp_path / "missing" / "b.sqlite3"))
    with pytest.raises(BackendError, match="that is the live database"):
        result_of(backend.backup(backend.path))
    assert result_of(backend.get_user("alice")) is not None


def test_device_var_values(backend: SQLiteBackend) -> None:
    result_of(backend.save_user(user("alice", "100")))
    devices = [
        ("001565000001", {"url_key": "key-one"}),
        ("001565000002", {"url_key": "key-two", "language": "fr"}),
        ("001565000003", {"url_key": "key-one"}),  # the same key twice: one value
        ("001565000004", {"language": "url_key"}),  # the name as another var's value
        ("001565000005", {"url_key": 7}),  # not a string: not a key
        ("001565000006", {"url_key": ""}),
        ("001565000007", {"URL_KEY": "upper"}),  # another var (LIKE ignores case, the look-up does not)
        ("001565000008", {}),
    ]
    for mac, variables in devices:
        result_of(backend.save_device(Device(mac, "yealink-t48g", ["alice"], variables)))
    assert result_of(backend.device_var_values("url_key")) == {"key-one", "key-two"}
    assert result_of(backend.device_var_values("language")) == {"fr", "url_key"}
    assert result_of(backend.device_var_values("l%")) == set()  # LIKE wildcards in the name match nothing more
    assert result_of(backend.device_var_values("nothing")) == set()
