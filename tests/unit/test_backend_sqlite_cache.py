"""The SQLite backend's read cache and coalesced fetch writes."""

from pathlib import Path

from twisted.internet.defer import Deferred, maybeDeferred

from zprovd.backends import BackendContext, Device, Fetch, SipAccount, User, run_inline
from zprovd.backends.sqlite import SQLiteBackend
from zprovd.passwords import hash_password


def result_of(d):
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


def backend(tmp_path: Path, run_blocking=run_inline) -> SQLiteBackend:
    b = SQLiteBackend({}, BackendContext(tmp_path, tmp_path, run_blocking, "pbx"))
    result_of(b.open())
    return b


def user(login: str, sip_user: str) -> User:
    return User(login, hash_password("pw", iterations=1), login, [SipAccount(sip_user, "s", "d")])


def test_a_commit_by_another_process_is_seen_on_the_next_lookup(tmp_path):
    daemon, cli = backend(tmp_path), backend(tmp_path)
    result_of(cli.save_user(user("alice", "100")))
    assert result_of(daemon.get_user("alice")).accounts[0].sip_user == "100"
    calls = []
    daemon.context = BackendContext(tmp_path, tmp_path, lambda f, *a: (calls.append(f), maybeDeferred(f, *a))[1], "pbx")
    assert result_of(daemon.get_user("alice")).accounts[0].sip_user == "100"
    assert calls == []  # answered from memory: nothing changed
    result_of(cli.save_user(user("alice", "200")))
    assert result_of(daemon.get_user("alice")).accounts[0].sip_user == "200"
    assert len(calls) == 1  # the commit made it read the database again
    result_of(cli.remove_user("alice"))
    assert result_of(daemon.get_user("alice")) is None


def test_cached_records_are_copies(tmp_path):
    b = backend(tmp_path)
    result_of(b.save_user(user("bob", "300")))
    first = result_of(b.get_user("bob"))
    first.accounts.clear()
    assert result_of(b.get_user("bob")).accounts[0].sip_user == "300"


def test_fetch_records_are_coalesced_while_a_write_is_in_flight(tmp_path):
    setup = backend(tmp_path)
    result_of(setup.save_user(user("u", "1")))
    for i in range(3):
        result_of(setup.save_device(Device(f"00156500000{i}", "yealink-t48g", ["u"])))
    queued: list = []

    def deferred_run(f, *args):
        d = Deferred()
        queued.append((d, f, args))
        return d

    def run_one():
        d, f, args = queued.pop(0)
        d.callback(f(*args))

    b = backend(tmp_path)
    b.context = BackendContext(tmp_path, tmp_path, deferred_run, "pbx")
    waits = [b.record_fetch(f"00156500000{i}", Fetch(float(i), "10.0.0.1", "f.cfg")) for i in range(3)]
    waits.append(b.record_fetch("001565000000", Fetch(9.0, "10.0.0.2", "g.cfg")))
    assert len(queued) == 1  # one write in flight; the rest wait together
    run_one()
    assert len(queued) == 1  # the next batch holds every fetch that arrived meanwhile
    run_one()
    assert queued == [] and all(result_of(w) is None for w in waits)
    check = backend(tmp_path)
    assert result_of(check.get_device("001565000000")).last_fetch.address == "10.0.0.2"
    assert result_of(check.get_device("001565000002")).last_fetch.when == 2.0
