"""The CSV backend: loading, re-reading on change, keeping good data, refusing changes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure

from zprovd.backends import (
    BackendContext,
    BackendError,
    Device,
    Fetch,
    ReadOnlyBackend,
    SeenDevice,
    User,
    run_inline,
)
from zprovd.backends import csv as csv_backend
from zprovd.backends.csv import CSVBackend
from zprovd.passwords import verify_password

GOOD = "login,password,mac,model\nalice,wonderland,001565aabbcc,t54w\n"
BETTER = "login,password,mac,model\nalice,wonderland,001565aabbcc,t54w\nbob,builder,,\n"


def result_of(d: Deferred) -> Any:
    """The result of an already-fired Deferred, or raise its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "users.csv"
    path.write_text(GOOD, encoding="utf-8")
    return path


def make(tmp_path: Path, clock: Clock, **options: Any) -> CSVBackend:
    options = {"path": "users.csv", "default_domain": "pbx.example.com", **options}
    assert CSVBackend.check_options(options) == []
    context = BackendContext(state_dir=tmp_path / "state", config_dir=tmp_path / "etc",
                             run_blocking=run_inline)
    return CSVBackend(options, context, clock=clock)


@pytest.fixture
def backend(tmp_path: Path, csv_file: Path, clock: Clock) -> CSVBackend:
    b = make(tmp_path, clock)
    result_of(b.open())
    return b


def rewrite(path: Path, text: str) -> None:
    """Change the file so that its signature surely changes (even on coarse clocks)."""
    stat = path.stat()
    path.write_text(text, encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))


def logins(backend: CSVBackend) -> list[str]:
    return [u.login for u in result_of(backend.list_users())]


def test_check_options() -> None:
    assert CSVBackend.check_options({}) == ["path: required (the CSV file of users and devices)"]
    assert CSVBackend.check_options({"path": "", "default_domain": 3, "x": 1}) == [
        "path: must be a non-empty string (a file name; relative to the configuration "
        "file's folder)",
        "default_domain: must be a string",
        "x: unknown option for the csv backend (known: path, default_domain)",
    ]


def test_path_relative_to_config_dir(tmp_path: Path, clock: Clock) -> None:
    assert make(tmp_path, clock).path == tmp_path / "etc" / "users.csv"
    assert make(tmp_path, clock, path="/srv/u.csv").path == Path("/srv/u.csv")


def test_loads(backend: CSVBackend) -> None:
    alice = result_of(backend.get_user("alice"))
    assert verify_password(alice.password_hash, "wonderland")
    assert alice.password_hash.split("$")[1] == str(csv_backend.HASH_ITERATIONS)
    assert result_of(backend.get_device("00:15:65:aa:bb:cc")).users == ["alice"]
    assert backend.read_only is True


def test_broken_file_at_open(tmp_path: Path, csv_file: Path, clock: Clock) -> None:
    csv_file.write_text(GOOD + "bob,pw,00:15:65,t54w\n", encoding="utf-8")
    with pytest.raises(BackendError) as info:
        result_of(make(tmp_path, clock).open())
    assert str(info.value) == (
        f"{csv_file}:3: mac: '00:15:65' is not a MAC address (expected 12 hex digits, "
        "optionally separated by ':' or '-', e.g. 00:15:65:aa:bb:cc)"
    )


def test_many_problems_at_open_fit_one_line(tmp_path: Path, csv_file: Path, clock: Clock) -> None:
    csv_file.write_text("login,password\n" + ",x\n" * 8, encoding="utf-8")
    with pytest.raises(BackendError) as info:
        result_of(make(tmp_path, clock).open())
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{csv_file}:2: login: required; {csv_file}:3: login: required")
    assert message.endswith("(and 3 more problems)")


def test_missing_file_at_open(tmp_path: Path, clock: Clock) -> None:
    with pytest.raises(BackendError) as info:
        result_of(make(tmp_path, clock, path="nope.csv").open())
    assert str(info.value) == f"{tmp_path / 'etc' / 'nope.csv'}: cannot read: No such file or directory"


def test_not_utf8_at_open(tmp_path: Path, csv_file: Path, clock: Clock) -> None:
    csv_file.write_bytes(b"login,password\n\xe9lise,pw\n")
    with pytest.raises(BackendError, match=r"users\.csv:2: not UTF-8 text"):
        result_of(make(tmp_path, clock).open())


def test_reread_on_change(backend: CSVBackend, csv_file: Path, clock: Clock) -> None:
    assert logins(backend) == ["alice"]
    rewrite(csv_file, BETTER)
    clock.now += 0.5
    assert logins(backend) == ["alice"]  # not checked again within a second
    clock.now += 0.6
    with capturedLogs() as events:
        assert logins(backend) == ["alice", "bob"]
    assert [formatEvent(e) for e in events] == [f"{csv_file}: reloaded (2 users, 1 devices)"]


def test_stat_at_most_once_per_second_and_parse_only_on_change(
    backend: CSVBackend, csv_file: Path, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    stats, loads = [], []
    real_stat, real_load = backend._stat, backend._load
    monkeypatch.setattr(backend, "_stat", lambda: stats.append(1) or real_stat())
    monkeypatch.setattr(backend, "_load", lambda: loads.append(1) or real_load())
    for _ in range(5):
        clock.now += 0.3
        for _ in range(10):
            result_of(backend.get_user("alice"))
    assert len(stats) == 1 and loads == []
    rewrite(csv_file, BETTER)
    clock.now += 1
    result_of(backend.get_user("alice"))
    assert len(loads) == 1


def test_broken_change_keeps_old_data(backend: CSVBackend, csv_file: Path, clock: Clock) -> None:
    rewrite(csv_file, BETTER + "carol,,,\n")
    with capturedLogs() as events:
        for _ in range(3):
            clock.now += 1.5
            assert logins(backend) == ["alice"]
            assert result_of(backend.get_device("001565aabbcc")).users == ["alice"]
    assert [(e["log_level"], formatEvent(e)) for e in events] == [
        (LogLevel.error, f"{csv_file}: changed but unusable, keeping the previous data: "
                         f"{csv_file}:4: password: required for login 'carol' (its first row)"),
    ]  # one line, not one per look-up
    rewrite(csv_file, BETTER)
    clock.now += 1.5
    assert logins(backend) == ["alice", "bob"]


def test_deleted_file_keeps_old_data(backend: CSVBackend, csv_file: Path, clock: Clock) -> None:
    csv_file.unlink()
    with capturedLogs() as events:
        for _ in range(3):
            clock.now += 1.5
            assert logins(backend) == ["alice"]
    assert [formatEvent(e) for e in events] == [
        f"{csv_file}: cannot read (No such file or directory); keeping the previous data"
    ]
    csv_file.write_text(BETTER, encoding="utf-8")
    clock.now += 1.5
    assert logins(backend) == ["alice", "bob"]


def test_replaced_by_rename(backend: CSVBackend, csv_file: Path, clock: Clock) -> None:
    """Editors and config management replace the file atomically."""
    new = csv_file.with_suffix(".tmp")
    new.write_text(BETTER.replace("bob", "bea"), encoding="utf-8")
    os.replace(new, csv_file)
    clock.now += 1.5
    assert logins(backend) == ["alice", "bea"]


def test_changes_are_refused(backend: CSVBackend, csv_file: Path) -> None:
    for attempt in (
        backend.save_user(User("bob", "x")),
        backend.remove_user("alice"),
        backend.save_device(Device("001565000001", "t54w")),
        backend.remove_device("001565aabbcc"),
        backend.import_records([], []),
    ):
        with pytest.raises(ReadOnlyBackend) as info:
            result_of(attempt)
        assert f"the csv backend is read-only; edit {csv_file} instead" in str(info.value)
    assert csv_file.read_text(encoding="utf-8") == GOOD


def test_fetches_and_seen_in_memory(backend: CSVBackend, csv_file: Path, clock: Clock,
                                    tmp_path: Path) -> None:
    fetch = Fetch(1.0, "192.0.2.1", "001565aabbcc.cfg")
    result_of(backend.record_fetch("001565aabbcc", fetch))
    result_of(backend.record_seen(SeenDevice("0004f2000001", "vvx", "a", "f", "ua", 1, 1, 1)))
    rewrite(csv_file, BETTER)
    clock.now += 2
    assert result_of(backend.get_device("001565aabbcc")).last_fetch == fetch  # survives a reload
    assert [s.mac for s in result_of(backend.list_seen())] == ["0004f2000001"]
    # a phone that was seen disappears from the list once the file configures it
    rewrite(csv_file, BETTER + "bob,,0004f2000001,vvx\n")
    clock.now += 2
    assert result_of(backend.get_device("0004f2000001")).users == ["bob"]
    assert result_of(backend.list_seen()) == []
    # nothing is persisted: a new backend on the same file knows nothing of it
    fresh = make(tmp_path, clock)
    result_of(fresh.open())
    assert result_of(fresh.get_device("001565aabbcc")).last_fetch is None


