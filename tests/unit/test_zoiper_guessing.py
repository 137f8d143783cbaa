"""Zoiper password guessing: the limit holds for guesses sent all at once.

A real Provisioner over a real SQLite backend (``test_document_cache.World``);
the password checks, which the daemon runs in a thread, wait here until the
test fires them, as they would while a burst of requests arrives.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred

from test_document_cache import HeldCalls, World, result_of
from zprovd.provisioning import LOOKUPS_PER_CLIENT, Response
from zprovd.routing import Request
from zprovd.throttle import FailureLimiter

ATTACKER = "192.0.2.66"


def zoiper(world: World, password: str, client: str = ATTACKER, login: str = "alice") -> Response | Deferred:
    return world.provisioner.answer(Request(protocol="http", path="/zoiper", client=client,
                                            query={"user": [login], "password": [password]}))


def test_a_burst_of_guesses_gets_no_more_checks_than_guesses_in_a_row(tmp_path):
    world = World(tmp_path, "[zoiper]\nmax_failures = 5\nfailure_window = 300\nlockout = 300\n")
    checks = HeldCalls()
    world.provisioner.run_blocking = checks
    answers = [zoiper(world, f"guess{i}") for i in range(19)] + [zoiper(world, "pw")]  # the right one last
    assert len(checks.held) == LOOKUPS_PER_CLIENT  # one address: a few checks at a time, the others wait
    at_once = [a for a in answers if isinstance(a, Response)]
    assert len(at_once) == 15 and {a.status for a in at_once} == {429}  # one login: max_failures guesses at most
    checks.run_all()
    results = [result_of(a) for a in answers]
    assert [r.status for r in results[:5]] == [200] * 5 and all(b"<error" in r.body for r in results[:5])
    assert results[-1].status == 429  # the right password never got checked
    late = result_of(zoiper(world, "pw"))  # five failures: locked out now
    assert late.status == 429 and checks.held == []


def test_guesses_against_one_login_from_many_addresses_are_limited_too(tmp_path):
    world = World(tmp_path, "[zoiper]\nmax_failures = 3\n")
    checks = HeldCalls()
    world.provisioner.run_blocking = checks
    answers = [zoiper(world, f"guess{i}", client=f"192.0.2.{i + 1}") for i in range(10)]
    assert len(checks.held) == 3 and sum(isinstance(a, Response) for a in answers) == 7


def test_right_passwords_at_once_from_one_address_keep_working(tmp_path):
    """A NAT full of Zoiper users logging in at the same moment: they wait their turn, none is refused."""
    world = World(tmp_path, "[zoiper]\nmax_failures = 3\n")
    for n in range(15):
        world.add_user(f"user{n}", f"10{n}", password=f"pw{n}")
    checks = HeldCalls()
    world.provisioner.run_blocking = checks
    answers = [zoiper(world, f"pw{n}", login=f"user{n}") for n in range(15)]  # 15 at once, with a limit of 3
    assert len(checks.held) == LOOKUPS_PER_CLIENT
    checks.run_all()
    results = [result_of(a) for a in answers]
    assert [r.status for r in results] == [200] * 15 and all(b"<error" not in r.body for r in results)


def test_a_check_waiting_its_turn_is_refused_once_the_address_is_locked_out(tmp_path):
    world = World(tmp_path, "[zoiper]\nmax_failures = 3\n")
    for n in range(10):
        world.add_user(f"user{n}", f"10{n}", password=f"pw{n}")
    checks = HeldCalls()
    world.provisioner.run_blocking = checks
    answers = [zoiper(world, "wrong", login=f"user{n}") for n in range(10)]  # spraying: one guess per login
    checks.run_all()
    statuses = [result_of(a).status for a in answers]
    assert statuses.count(200) <= 3 + LOOKUPS_PER_CLIENT - 1 and statuses.count(429) >= 10 - 3 - LOOKUPS_PER_CLIENT + 1


def test_limiter_reservations():
    limiter = FailureLimiter(max_failures=2, window=60, lockout=60)
    assert limiter.admit("k", 0) and limiter.admit("k", 0) and not limiter.admit("k", 0)
    limiter.release("k")
    assert limiter.admit("k", 0)
    assert not limiter.failure("k", 1) and limiter.failure("k", 1)  # two failures: refused
    assert limiter.blocked_for("k", 2) > 0 and not limiter.admit("k", 2)
    limiter.success("k")
    assert limiter.blocked_for("k", 2) == 0 and limiter.admit("k", 2)
    unlimited = FailureLimiter(max_failures=1, window=60, lockout=0)
    assert all(unlimited.admit("k", 0) for _ in range(5))
