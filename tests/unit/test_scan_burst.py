"""Unknown MACs sent all at once meet the scan detector as MACs asked in a row.

A real Provisioner over a real SQLite backend (``test_document_cache.World``)
whose look-ups, which the daemon runs in a thread, wait until the test lets
them run, as they would while a burst of requests arrives.
"""

from __future__ import annotations

from dataclasses import replace

from twisted.internet.defer import Deferred

from test_document_cache import HeldCalls, MAC, World, result_of
from zprovd.provisioning import LOOKUPS_PER_CLIENT
from zprovd.routing import Request
from zprovd.throttle import KeyedGate

SCANNER = "192.0.2.66"


def test_a_burst_of_unknown_macs_is_refused_like_macs_asked_in_a_row(tmp_path):
    world = World(tmp_path, "[access.scan]\nmax_misses = 5\n")
    calls = HeldCalls()
    world.backend.context = replace(world.backend.context, run_blocking=calls)
    for _ in range(2):  # the first requests learn the URL keys (again after the fetch they record): out of the way
        warm = world.provisioner.answer(Request(protocol="http", path=f"/{MAC}.cfg", client="192.0.2.10"))
        calls.run_all()
        assert result_of(warm).status == 200
        world.settle()
    answers = [world.provisioner.answer(Request(protocol="http", path=f"/001565{n:06x}.cfg", client=SCANNER))
               for n in range(1, 41)]
    assert len(calls.held) == LOOKUPS_PER_CLIENT  # one look-up each; the others wait their turn
    calls.run_all()
    statuses = [result_of(a).status for a in answers]
    assert statuses.count(404) <= 5 + LOOKUPS_PER_CLIENT - 1 < 20  # max_misses, plus those already running
    assert statuses.count(403) == 40 - statuses.count(404)
    # A phone elsewhere is not held up, nor refused.
    phone = world.provisioner.answer(Request(protocol="http", path=f"/{MAC}.cfg", client="192.0.2.11"))
    calls.run_all()
    assert result_of(phone).status == 200


def test_known_phones_behind_one_address_all_get_their_files(tmp_path):
    """A site behind NAT booting at once: its look-ups wait, none is refused."""
    world = World(tmp_path, "[access.scan]\nmax_misses = 5\n")
    for n in range(1, 21):
        world.add_user(f"u{n}", f"10{n}")
        mac = f"001565{n:06x}"
        from zprovd.backends import Device

        result_of(world.cli.save_device(Device(mac, "yealink-t48g", [f"u{n}"])))
    world.settle()
    calls = HeldCalls()
    world.backend.context = replace(world.backend.context, run_blocking=calls)
    answers = [world.provisioner.answer(Request(protocol="http", path=f"/001565{n:06x}.cfg", client="198.51.100.1"))
               for n in range(1, 21)]
    calls.run_all()
    assert [result_of(a).status for a in answers] == [200] * 20


def test_a_boot_storm_behind_one_address_waits_and_is_served(tmp_path):
    """3,000 known phones behind one NAT address, all at once (the bench's boot storm found 1,000 too few)."""
    world = World(tmp_path)
    world.add_user("site", "100")
    from zprovd.backends import Device

    macs = [f"0015650{n:05x}" for n in range(3000)]
    result_of(world.cli.import_records([], [Device(mac, "yealink-t48g", ["site"]) for mac in macs]))
    world.settle()
    calls = HeldCalls()
    world.backend.context = replace(world.backend.context, run_blocking=calls)
    answers = [world.provisioner.answer(Request(protocol="http", path=f"/{mac}.cfg", client="198.51.100.1"))
               for mac in macs]
    calls.run_all()
    statuses = [result_of(a).status for a in answers]
    assert statuses == [200] * 3000, sorted(set(statuses))


def test_keyed_gate_runs_a_few_per_key_in_order_without_recursion():
    gate = KeyedGate(limit=2, max_waiting=3000)
    started: list[int] = []
    pending: list[Deferred] = []

    def call(n: int):
        started.append(n)
        d: Deferred = Deferred()
        pending.append(d)
        return d

    results = [gate.run("a", lambda n=n: call(n)) for n in range(4)]
    assert started == [0, 1] and gate.run("b", lambda: "other key") is not None
    pending[0].callback("r0")
    assert started == [0, 1, 2] and result_of(results[0]) == "r0"
    # 2,500 calls that end at once wait behind two that do not: once those
    # end, they run one after another in a loop, not in a recursion.
    blockers: list[Deferred] = [Deferred(), Deferred()]
    for b in blockers:
        gate.run("c", lambda b=b: b)
    waiting = [gate.run("c", lambda n=n: n) for n in range(2500)]
    assert not any(d.called for d in waiting)
    for b in blockers:
        b.callback(None)
    assert [result_of(d) for d in waiting] == list(range(2500))
    # A waiting call that is cancelled never runs, and leaves nothing behind.
    gate2 = KeyedGate(limit=1, max_waiting=10)
    first: Deferred = Deferred()
    gate2.run("k", lambda: first)
    ran: list[int] = []
    waiter = gate2.run("k", lambda: ran.append(1))
    waiter.addErrback(lambda f: None)
    waiter.cancel()
    first.callback(None)
    assert ran == [] and gate2._waiting == {} and gate2._running == {}
    # With no room to wait, nothing is left behind either.
    none = KeyedGate(limit=1, max_waiting=0)
    blocking: Deferred = Deferred()
    none.run("k", lambda: blocking)
    assert none.run("k", lambda: 1) is None and none._waiting == {}
    blocking.callback(None)
    assert result_of(none.run("k", lambda: "free again")) == "free again"
    full = KeyedGate(limit=1, max_waiting=1)
    blocker: Deferred = Deferred()
    assert full.run("k", lambda: blocker) is not None and full.run("k", lambda: 1) is not None
    assert full.run("k", lambda: 2) is None  # too many waiting
