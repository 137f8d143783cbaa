"""The Backend contract, run against every backend.

* ``sqlite``: a fresh database in a temporary folder;
* ``csv``: a temporary CSV file (read-only: the writing tests instead check
  that every change fails with ReadOnlyBackend);
* ``dummy``: the third-party backend in tests/fixtures/dummy_backend,
  registered through a temporary ``*.dist-info`` entry point.

All three start from the same data, ``SEED_CSV``, found through the
``zprovd.backends`` entry-point group and created with ``create_backend``.
Calls use ``run_inline``, so every Deferred has already fired:
``result_of`` takes its result or raises its failure.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from zprovd.backends import (
    Backend,
    BackendContext,
    BackendError,
    Device,
    Fetch,
    NotFound,
    ReadOnlyBackend,
    SeenDevice,
    SipAccount,
    User,
    backend_class,
    create_backend,
    run_inline,
)
from zprovd.csvimport import parse_csv
from zprovd.passwords import hash_password, verify_password

HELPERS_FILE = Path(__file__).resolve().parents[1] / "fixtures" / "dummy_backend" / "conftest_helpers.py"


def _load_helpers() -> ModuleType:
    name = "zprovd_dummy_backend_helpers"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, HELPERS_FILE)
        assert spec and spec.loader
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


register_dummy_backend = _load_helpers().register_dummy_backend  # a pytest fixture


def result_of(d: Deferred) -> Any:
    """The result of an already-fired Deferred, or raise its failure."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired (run_inline should fire it at once)"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


SEED_CSV = """\
login,password,display_name,sip_user,sip_password,sip_domain,mac,model,department
alice,wonderland,Alice,201,pw201,pbx.example.com,00:15:65:AA:BB:CC,yealink-t54w,sales
alice,,,202,pw202,pbx.example.com,,,
bob,builder,Bob,,,,001565aabbcc,yealink-t54w,support
bob,,,,,,0004f2000001,polycom-vvx,
carol,c4rol,Carol,,,,,,
"""
DOMAIN = "default.example.com"


def cheap_hash(password: str) -> str:
    return hash_password(password, iterations=1)


@dataclass
class Case:
    name: str
    backend: Backend
    writable: bool


ALL = ["sqlite", "csv", "dummy"]
WRITABLE = ["sqlite", "dummy"]
READ_ONLY = ["csv"]


def open_case(name: str, request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    """Create backend ``name`` through its entry point, open it and load SEED_CSV."""
    context = BackendContext(state_dir=tmp_path / "state", config_dir=tmp_path / "etc",
                             run_blocking=run_inline)
    options: dict[str, Any] = {}
    if name == "csv":
        (tmp_path / "etc").mkdir()
        (tmp_path / "etc" / "users.csv").write_text(SEED_CSV, encoding="utf-8")
        options = {"path": "users.csv", "default_domain": DOMAIN}
    elif name == "dummy":
        request.getfixturevalue("register_dummy_backend")
    backend = create_backend(name, options, context)
    result_of(backend.open())
    if not backend.read_only:
        users, devices = parse_csv(SEED_CSV, "seed.csv", DOMAIN, hasher=cheap_hash)
        result_of(backend.import_records(users, devices))
    request.addfinalizer(lambda: result_of(backend.close()))
    return Case(name, backend, not backend.read_only)


@pytest.fixture(params=ALL)
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Case:
    """Every backend, with the seed data."""
    return open_case(request.param, request, tmp_path)


@pytest.fixture(params=WRITABLE)
def writable(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every writable backend, with the seed data."""
    return open_case(request.param, request, tmp_path).backend


@pytest.fixture(params=READ_ONLY)
def read_only(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every read-only backend, with the seed data."""
    return open_case(request.param, request, tmp_path).backend


# ---- discovery and options -------------------------------------------------


@pytest.mark.usefixtures("register_dummy_backend")
@pytest.mark.parametrize("name", ALL)
def test_found_through_entry_point(name: str) -> None:
    cls = backend_class(name)
    assert cls.__name__.lower().startswith(name)
    problems = cls.check_options({"no_such_option": 1})
    assert len([p for p in problems if p.startswith("no_such_option: ")]) == 1


def test_dummy_is_unknown_without_registration() -> None:
    with pytest.raises(BackendError, match="no backend named 'dummy'"):
        backend_class("dummy")


# ---- look-ups ------------------------------------------------------------------


def test_get_user(case: Case) -> None:
    alice = result_of(case.backend.get_user("alice"))
    assert isinstance(alice, User)
    assert alice.login == "alice"
    assert alice.display_name == "Alice"
    assert verify_password(alice.password_hash, "wonderland")
    assert not verify_password(alice.password_hash, "builder")
    assert [(a.sip_user, a.sip_password, a.sip_domain) for a in alice.accounts] == [
        ("201", "pw201", "pbx.example.com"),
        ("202", "pw202", "pbx.example.com"),
    ]
    assert alice.vars == {"department": "sales"}


def test_get_user_defaults(case: Case) -> None:
    bob = result_of(case.backend.get_user("bob"))
    assert bob.accounts == [SipAccount("bob", "builder", DOMAIN)]


def test_get_user_missing(case: Case) -> None:
    assert result_of(case.backend.get_user("nobody")) is None
    assert result_of(case.backend.get_user("")) is None
    assert result_of(case.backend.get_user("ALICE")) is None  # logins are case-sensitive


@pytest.mark.parametrize("spelling", ["001565aabbcc", "00:15:65:AA:BB:CC", "0015.65aa.bbcc"])
def test_get_device(case: Case, spelling: str) -> None:
    device = result_of(case.backend.get_device(spelling))
    assert isinstance(device, Device)
    assert device.mac == "001565aabbcc"
    assert device.model == "yealink-t54w"
    assert device.users == ["alice", "bob"]
    assert device.last_fetch is None


def test_get_device_missing(case: Case) -> None:
    assert result_of(case.backend.get_device("001565000000")) is None
    assert result_of(case.backend.get_device("not a mac")) is None


def test_list_users_and_devices(case: Case) -> None:
    users = result_of(case.backend.list_users())
    logins = [u.login for u in users]
    assert logins == sorted(logins)
    assert {"alice", "bob", "carol"} <= set(logins)
    by_login = {u.login: u for u in users}
    assert len(by_login["alice"].accounts) == 2
    devices = result_of(case.backend.list_devices())
    assert [(d.mac, d.model, d.users) for d in devices] == [
        ("0004f2000001", "polycom-vvx", ["bob"]),
        ("001565aabbcc", "yealink-t54w", ["alice", "bob"]),
    ]


def test_results_are_copies(case: Case) -> None:
    alice = result_of(case.backend.get_user("alice"))
    alice.accounts.clear()
    alice.vars["x"] = 1
    device = result_of(case.backend.get_device("001565aabbcc"))
    device.users.append("carol")
    again = result_of(case.backend.get_user("alice"))
    assert len(again.accounts) == 2 and "x" not in again.vars
    assert result_of(case.backend.get_device("001565aabbcc")).users == ["alice", "bob"]


# ---- what the daemon learns ----------------------------------------------------


def test_record_fetch(case: Case) -> None:
    fetch = Fetch(when=1700000000.5, address="192.0.2.10", file="001565aabbcc.cfg")
    assert result_of(case.backend.record_fetch("00:15:65:aa:bb:cc", fetch)) is None
    assert result_of(case.backend.get_device("001565aabbcc")).last_fetch == fetch
    listed = {d.mac: d for d in result_of(case.backend.list_devices())}
    assert listed["001565aabbcc"].last_fetch == fetch
    assert listed["0004f2000001"].last_fetch is None
    later = Fetch(when=1700000100.0, address="192.0.2.11", file="y000000000044.cfg")
    result_of(case.backend.record_fetch("001565aabbcc", later))
    assert result_of(case.backend.get_device("001565aabbcc")).last_fetch == later


def test_record_fetch_unknown_mac_is_ignored(case: Case) -> None:
    fetch = Fetch(when=1.0, address="192.0.2.10", file="x.cfg")
    assert result_of(case.backend.record_fetch("001565000000", fetch)) is None
    assert result_of(case.backend.get_device("001565000000")) is None


def test_record_seen(case: Case) -> None:
    assert result_of(case.backend.list_seen()) == []
    first = SeenDevice("00:15:65:00:00:01", "yealink-t54w", "192.0.2.20", "001565000001.cfg",
                       "Yealink SIP-T54W 96.86.0.23", 100.0, 100.0, 1)
    result_of(case.backend.record_seen(first))
    result_of(case.backend.record_seen(SeenDevice(
        "001565000001", "", "192.0.2.21", "001565000001.boot", "Yealink", 200.0, 200.0, 1)))
    result_of(case.backend.record_seen(SeenDevice(
        "001565000002", "", "192.0.2.22", "x", "ua", 150.0, 150.0, 1)))
    seen = result_of(case.backend.list_seen())
    assert seen == [
        SeenDevice("001565000001", "yealink-t54w", "192.0.2.21", "001565000001.boot", "Yealink",
                   100.0, 200.0, 2),
        SeenDevice("001565000002", "", "192.0.2.22", "x", "ua", 150.0, 150.0, 1),
    ]


def test_seen_is_bounded(case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most MAX_SEEN phones are remembered: the least recently seen go first."""
    monkeypatch.setattr(sys.modules[type(case.backend).__module__], "MAX_SEEN", 3)
    for i in range(5):  # last seen at time i
        result_of(case.backend.record_seen(SeenDevice(f"0004f2ff00{i:02x}", "", "a", "f", "u", i, i, 1)))
    assert [s.mac for s in result_of(case.backend.list_seen())] == ["0004f2ff0004", "0004f2ff0003", "0004f2ff0002"]


def test_forget_seen(case: Case) -> None:
    forget = getattr(case.backend, "forget_seen", None)
    if forget is None:
        pytest.skip(f"{case.name} has no forget_seen (optional)")
    for i in range(4):
        result_of(case.backend.record_seen(SeenDevice(f"0004f2ff00{i:02x}", "", "a", "f", "u", i, i, 1)))
    # any spelling; a MAC not in the list and a non-MAC remove nothing
    assert result_of(forget(["00:04:F2:FF:00:01", "0004.f2ff.0003", "0004f2ff0099", "junk"])) == 2
    assert [s.mac for s in result_of(case.backend.list_seen())] == ["0004f2ff0002", "0004f2ff0000"]
    assert result_of(forget(None)) == 2
    assert result_of(case.backend.list_seen()) == []


def test_record_seen_ignores_configured_devices(case: Case) -> None:
    result_of(case.backend.record_seen(SeenDevice(
        "001565aabbcc", "", "192.0.2.20", "f", "ua", 1.0, 1.0, 1)))
    assert result_of(case.backend.list_seen()) == []


# ---- changes -------------------------------------------------------------------


def test_writable_flag(case: Case) -> None:
    assert case.writable == (case.name in WRITABLE)


def test_read_only_backends_refuse_changes(read_only: Backend) -> None:
    backend = read_only
    attempts = [
        backend.save_user(User("dave", "x")),
        backend.remove_user("alice"),
        backend.save_device(Device("001565000009", "t54w", ["alice"])),
        backend.remove_device("001565aabbcc"),
        backend.import_records([User("dave", "x")], []),
    ]
    for attempt in attempts:
        with pytest.raises(ReadOnlyBackend, match=r"read-only; edit .*users\.csv"):
            result_of(attempt)
    assert result_of(backend.get_user("dave")) is None
    assert result_of(backend.get_user("alice")) is not None


def test_save_user_creates_and_replaces(writable: Backend) -> None:
    dave = User("dave", cheap_hash("d"), "Dave",
                [SipAccount("301", "p1", "d.example"), SipAccount("302", "p2", "d.example", "a302",
                                                                 "Dave 2")],
                {"lang": "de", "n": 3, "nested": {"a": [1, 2]}})
    result_of(writable.save_user(dave))
    assert result_of(writable.get_user("dave")) == dave
    replaced = User("dave", cheap_hash("e"), "David", [SipAccount("303", "p3", "d.example")])
    result_of(writable.save_user(replaced))
    assert result_of(writable.get_user("dave")) == replaced
    # a user on devices can be replaced too (the devices keep it)
    result_of(writable.save_user(User("bob", cheap_hash("b2"), "Bobby")))
    assert result_of(writable.get_device("001565aabbcc")).users == ["alice", "bob"]


def test_remove_user(writable: Backend) -> None:
    result_of(writable.remove_user("carol"))
    assert result_of(writable.get_user("carol")) is None
    with pytest.raises(NotFound, match="carol"):
        result_of(writable.remove_user("carol"))


def test_remove_referenced_user_is_refused(writable: Backend) -> None:
    with pytest.raises(BackendError, match=r"0004f2000001, 001565aabbcc"):
        result_of(writable.remove_user("bob"))
    assert result_of(writable.get_user("bob")) is not None


def test_save_device(writable: Backend) -> None:
    device = Device("00:04:F2:00:00:02", "polycom-vvx", ["carol", "alice"], {"ring": "r1"})
    result_of(writable.save_device(device))
    saved = result_of(writable.get_device("0004f2000002"))
    assert saved == Device("0004f2000002", "polycom-vvx", ["carol", "alice"], {"ring": "r1"})
    result_of(writable.save_device(Device("0004f2000002", "polycom-vvx-2", ["bob"])))
    assert result_of(writable.get_device("0004f2000002")).users == ["bob"]
    result_of(writable.remove_user("carol"))  # no longer referenced


def test_save_device_keeps_recorded_fetch(writable: Backend) -> None:
    fetch = Fetch(5.0, "192.0.2.1", "f")
    result_of(writable.record_fetch("001565aabbcc", fetch))
    result_of(writable.save_device(Device("001565aabbcc", "yealink-t54w", ["bob"])))
    assert result_of(writable.get_device("001565aabbcc")).last_fetch == fetch


def test_save_device_with_unknown_user_fails(writable: Backend) -> None:
    with pytest.raises(BackendError, match="nobody"):
        result_of(writable.save_device(Device("001565000009", "t54w", ["alice", "nobody"])))
    assert result_of(writable.get_device("001565000009")) is None


def test_adding_a_device_removes_it_from_seen(writable: Backend) -> None:
    result_of(writable.record_seen(SeenDevice("001565000009", "t54w", "a", "f", "ua", 1, 1, 1)))
    assert [s.mac for s in result_of(writable.list_seen())] == ["001565000009"]
    result_of(writable.save_device(Device("001565000009", "t54w", ["alice"])))
    assert result_of(writable.list_seen()) == []


def test_remove_device(writable: Backend) -> None:
    result_of(writable.remove_device("00:04:f2:00:00:01"))
    assert result_of(writable.get_device("0004f2000001")) is None
    with pytest.raises(NotFound):
        result_of(writable.remove_device("0004f2000001"))
    with pytest.raises(BackendError, match="001565aabbcc"):
        result_of(writable.remove_user("bob"))  # still on the other device


def test_import_is_all_or_nothing(writable: Backend) -> None:
    users = [User("erin", cheap_hash("e"), accounts=[SipAccount("erin", "e", "x")]),
             User("alice", cheap_hash("changed"), "Changed")]
    devices = [Device("001565000010", "t54w", ["erin"]),
               Device("001565000011", "t54w", ["ghost"])]
    with pytest.raises(BackendError, match="ghost"):
        result_of(writable.import_records(users, devices))
    assert result_of(writable.get_user("erin")) is None
    assert result_of(writable.get_device("001565000010")) is None
    assert result_of(writable.get_user("alice")).display_name == "Alice"
    # and the same import without the bad device works, devices referring to new users
    result_of(writable.import_records(users, devices[:1]))
    assert result_of(writable.get_device("001565000010")).users == ["erin"]
    assert result_of(writable.get_user("alice")).display_name == "Changed"


# ---- updates that a concurrent edit cannot undo (optional) -----------------------------


def _update_methods(backend: Backend) -> tuple[Any, Any]:
    update_user = getattr(backend, "update_user", None)
    update_device = getattr(backend, "update_device", None)
    if update_user is None or update_device is None:
        pytest.skip(f"{type(backend).__name__} has no update_user/update_device (optional)")
    return update_user, update_device


def test_update_saves_the_changed_record(writable: Backend) -> None:
    update_user, update_device = _update_methods(writable)
    seen: list[Any] = []

    def add_var(user: User | None) -> User:
        seen.append(user)
        assert user is not None
        user.vars["floor"] = "3"
        return user

    saved = result_of(update_user("alice", add_var))
    assert saved.vars["floor"] == "3" and seen[0].login == "alice"
    alice = result_of(writable.get_user("alice"))
    assert alice.vars["floor"] == "3" and [a.sip_user for a in alice.accounts] == ["201", "202"]
    # absent: the change gets None and may create the record
    created = result_of(update_user("dave", lambda user: user or User("dave", cheap_hash("d"), "Dave")))
    assert created.login == "dave" and result_of(writable.get_user("dave")).display_name == "Dave"

    def move(device: Device | None) -> Device:
        assert device is not None and device.mac == "001565aabbcc"
        device.users = ["carol"]
        return device

    result_of(update_device("00:15:65:AA:BB:CC", move))  # any spelling
    assert result_of(writable.get_device("001565aabbcc")).users == ["carol"]
    new = result_of(update_device("001565000020", lambda d: d or Device("001565000020", "yealink-t54w", ["bob"])))
    assert new.mac == "001565000020" and result_of(writable.get_device("001565000020")).users == ["bob"]


def test_a_failing_update_saves_nothing(writable: Backend) -> None:
    update_user, update_device = _update_methods(writable)

    def half_done(user: User | None) -> User:
        assert user is not None
        user.display_name = "Half"
        raise ValueError("changed my mind")

    with pytest.raises(ValueError, match="changed my mind"):
        result_of(update_user("alice", half_done))
    assert result_of(writable.get_user("alice")).display_name == "Alice"
    with pytest.raises(BackendError, match="ghost"):  # the backend's own refusal
        result_of(update_device("001565aabbcc", lambda d: Device(d.mac, d.model, ["ghost"]) if d else d))
    assert result_of(writable.get_device("001565aabbcc")).users == ["alice", "bob"]


def test_concurrent_updates_are_not_lost(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Two backends on one database (two CLI processes): an update that starts while
    another is between its read and its save waits for it, and keeps its change."""
    import threading

    first = open_case("sqlite", request, tmp_path).backend
    context = BackendContext(state_dir=tmp_path / "state", config_dir=tmp_path / "etc", run_blocking=run_inline)
    second = create_backend("sqlite", {}, context)
    result_of(second.open())
    request.addfinalizer(lambda: result_of(second.close()))
    outcome: list[Any] = []

    def second_edit() -> None:
        def add_b(user: User | None) -> User:
            assert user is not None
            user.vars["b"] = "2"
            return user

        try:
            outcome.append(result_of(second.update_user("alice", add_b)))  # type: ignore[attr-defined]
        except BaseException as e:  # reported by the assertion below
            outcome.append(e)

    thread = threading.Thread(target=second_edit)

    def add_a(user: User | None) -> User:
        assert user is not None
        thread.start()  # the other edit starts between this one's read and its save
        thread.join(0.5)  # bounded: it must wait for this one (and so is still running)
        user.vars["a"] = "1"
        return user

    result_of(first.update_user("alice", add_a))  # type: ignore[attr-defined]
    thread.join(10)
    assert not thread.is_alive() and len(outcome) == 1 and isinstance(outcome[0], User), outcome
    assert {k: v for k, v in result_of(first.get_user("alice")).vars.items() if k in "ab"} == {"a": "1", "b": "2"}
