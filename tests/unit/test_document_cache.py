"""The rendered-document cache: hits skip the look-ups and the render, never the checks.

A real Provisioner over a real SQLite backend (blocking calls run inline);
``calls`` counts the backend work, ``renders`` the template renders.
"""

from __future__ import annotations

import os
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import Clock

from zprovd import passwords
from zprovd.backends import BackendContext, Device, Fetch, SipAccount, User, run_inline
from zprovd.backends import sqlite as sqlite_module
from zprovd.backends.sqlite import SQLiteBackend
from zprovd.catalogue import load_catalogue
from zprovd.config import load_config
from zprovd.documentcache import Document, DocumentCache
from zprovd.provisioning import FETCH_RESOLUTION, Provisioner, Response
from zprovd.renderer import Renderer
from zprovd.routing import Request

MAC = "001565aabbcc"


def result_of(d):
    if isinstance(d, Response):
        return d
    out = []
    d.addBoth(out.append)
    assert out, "Deferred did not fire"
    return out[0]


class HeldCalls:
    """A ``run_blocking`` whose calls wait until :meth:`run_all`, as work in
    the daemon's thread pool waits while a burst of requests arrives."""

    def __init__(self) -> None:
        self.held: list[tuple[Deferred, Any, tuple]] = []

    def __call__(self, f, *args) -> Deferred:
        d: Deferred = Deferred()
        self.held.append((d, f, args))
        return d

    def run_all(self) -> None:
        """Run the held calls, and those that start meanwhile, until none is left."""
        while self.held:
            held, self.held = self.held, []
            for d, f, args in held:
                maybeDeferred(f, *args).chainDeferred(d)


class World:
    def __init__(self, tmp_path: Path, extra: str = ""):
        self.tmp = tmp_path
        self.ops = tmp_path / "ops"
        (self.ops / "yealink").mkdir(parents=True)
        path = tmp_path / "zprovd.toml"
        path.write_text(textwrap.dedent(f"""
            state_dir = "{tmp_path / 'state'}"
            [backend]
            type = "sqlite"
            [provisioning]
            server = "pbx.example"
            base_url = "http://pbx.example/"
            [templates]
            dirs = ["{self.ops}"]
            """) + textwrap.dedent(extra))
        self.config = load_config(path)
        self.calls: list[str] = []

        def run_blocking(f, *args):
            self.calls.append(getattr(f, "__name__", repr(f)))
            return maybeDeferred(f, *args)

        self.backend = SQLiteBackend({}, BackendContext(self.config.state_dir, tmp_path, run_blocking, "pbx.example"))
        result_of(self.backend.open())
        self.cli = SQLiteBackend({}, BackendContext(self.config.state_dir, tmp_path, run_inline, "pbx.example"))
        result_of(self.cli.open())
        self.renderer = Renderer(self.config.templates.dirs, keep_last_good=True)
        self.renders: list[str] = []
        real = self.renderer.render_tracked

        def counting(template, ctx):
            self.renders.append(template)
            return real(template, ctx)

        self.renderer.render_tracked = counting  # type: ignore[method-assign]
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.provisioner = Provisioner(
            self.config, load_catalogue(self.renderer.dirs), self.renderer, self.backend, run_blocking, clock=self.clock.seconds,
        )
        self.add_user("alice", "1001")
        result_of(self.cli.save_device(Device(MAC, "yealink-t48g", ["alice"])))

    def add_user(self, login: str, sip_user: str, password: str = "pw") -> None:
        user = User(login, passwords.hash_password(password, iterations=1), login, [SipAccount(sip_user, "s3cret", "pbx.example")])
        result_of(self.cli.save_user(user))

    def get(self, path: str, client: str = "192.0.2.10", **kw) -> Response:
        answer = self.provisioner.answer(Request(protocol="http", path=path, client=client, **kw))
        return result_of(answer)

    def settle(self) -> None:
        """Let generation() look at the database again (it trusts a check for 10 ms)."""
        self.backend._generation_checked = float("-inf")


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_a_repeat_fetch_is_answered_at_once_with_the_same_bytes(world):
    first = world.get(f"/{MAC}.cfg")
    assert first.status == 200 and b"1001" in first.body
    world.settle()
    second = world.get(f"/{MAC}.cfg")  # the generation is known now: rendered and kept
    world.settle()
    calls, renders = len(world.calls), len(world.renders)
    third = world.provisioner.answer(Request(protocol="http", path=f"/{MAC}.cfg", client="192.0.2.10"))
    assert isinstance(third, Response), "a cache hit is answered without a Deferred"
    assert third.body == second.body == first.body
    assert len(world.renders) == renders
    assert [c for c in world.calls[calls:] if c != "_guarded"] == []
    assert world.provisioner.documents.hits >= 1


def recorded(world: World) -> Fetch:
    result_of(world.backend._fetches_written())
    reader = SQLiteBackend({}, BackendContext(world.config.state_dir, world.tmp, run_inline, "pbx"))  # a fresh read cache
    result_of(reader.open())
    return result_of(reader.get_device(MAC)).last_fetch


def test_a_hit_still_records_the_fetch_like_relatime(world):
    for _ in range(3):
        world.get(f"/{MAC}.cfg", client="192.0.2.77")
        world.settle()
    first = world.clock.seconds()
    assert recorded(world) == Fetch(first, "192.0.2.77", f"{MAC}.cfg")
    world.clock.advance(FETCH_RESOLUTION - 1)
    world.get(f"/{MAC}.cfg", client="192.0.2.77")
    assert recorded(world).when == first  # the same fetch again soon after: not written again
    world.get(f"/{MAC}.cfg", client="192.0.2.78")
    assert recorded(world) == Fetch(world.clock.seconds(), "192.0.2.78", f"{MAC}.cfg")  # another address: at once
    world.clock.advance(FETCH_RESOLUTION)
    world.get(f"/{MAC}.cfg", client="192.0.2.78")
    assert recorded(world).when == world.clock.seconds()


def test_a_change_by_another_process_is_served_next(world):
    world.get(f"/{MAC}.cfg")
    world.settle()
    world.get(f"/{MAC}.cfg")
    world.add_user("alice", "2002")
    world.settle()
    body = world.get(f"/{MAC}.cfg").body
    assert b"2002" in body and b"1001" not in body


def test_an_edited_template_is_served_next(world):
    override = world.ops / "yealink" / "mac.cfg.j2"
    world.get(f"/{MAC}.cfg")
    world.settle()
    world.get(f"/{MAC}.cfg")
    override.write_text("account {{ lines[0].sip_user }} version A\n")
    world.renderer.recheck_after = 0
    assert world.get(f"/{MAC}.cfg").body == b"account 1001 version A\n"
    world.settle()
    assert world.get(f"/{MAC}.cfg").body == b"account 1001 version A\n"
    renders = len(world.renders)
    assert world.get(f"/{MAC}.cfg").body == b"account 1001 version A\n"
    assert len(world.renders) == renders
    override.write_text("account {{ lines[0].sip_user }} version B\n")
    stamp = time.time() + 5  # a distinct mtime even on coarse file systems
    os.utime(override, (stamp, stamp))
    assert world.get(f"/{MAC}.cfg").body == b"account 1001 version B\n"
    override.unlink()
    assert b"version B" not in world.get(f"/{MAC}.cfg").body


def test_an_included_template_edited_is_served_next(tmp_path):
    world = World(tmp_path)
    world.renderer.recheck_after = 0
    (world.ops / "yealink" / "mac.cfg.j2").write_text('{% include "yealink/_part.j2" %}\n')
    part = world.ops / "yealink" / "_part.j2"
    part.write_text("part one")
    for _ in range(3):
        assert world.get(f"/{MAC}.cfg").body == b"part one\n"
        world.settle()
    part.write_text("part two")
    stamp = time.time() + 5
    os.utime(part, (stamp, stamp))
    assert world.get(f"/{MAC}.cfg").body == b"part two\n"


def test_one_copy_serves_every_protocol_and_client_when_no_template_reads_the_request(world):
    for protocol, client in [("http", "192.0.2.10"), ("tftp", "192.0.2.11"), ("https", "192.0.2.12")] * 2:
        generic = result_of(world.provisioner.answer(Request(protocol=protocol, path="/y000000000035.cfg", client=client,
                                                             user_agent=f"Yealink SIP-T48G {client}")))
        assert generic.status == 200
        per_mac = result_of(world.provisioner.answer(Request(protocol=protocol, path=f"/{MAC}.cfg", client=client)))
        assert per_mac.status == 200
        world.settle()
    # One render each: the backend's generation, unknown on the very first
    # look (when the device URL keys are asked for), is known by the
    # per-MAC look-up.
    assert world.renders.count("yealink/common.cfg.j2") == 1
    assert world.renders.count("yealink/mac.cfg.j2") == 1
    assert len(world.provisioner.documents) == 2


def test_a_template_that_reads_the_request_gets_a_copy_per_request(tmp_path):
    world = World(tmp_path)
    # The mention is in an included file and in a branch: still a copy per request.
    (world.ops / "yealink" / "mac.cfg.j2").write_text('line {{ lines[0].sip_user }}{% include "yealink/_who.j2" %}\n')
    (world.ops / "yealink" / "_who.j2").write_text("{% if vars.get('show_client', true) %} for {{ request.client }}{% endif %}")
    for _ in range(2):
        for client in ("192.0.2.10", "192.0.2.20"):
            assert world.get(f"/{MAC}.cfg", client=client).body == f"line 1001 for {client}\n".encode()
            world.settle()
    renders = len(world.renders)
    assert world.get(f"/{MAC}.cfg", client="192.0.2.20").body == b"line 1001 for 192.0.2.20\n"
    assert len(world.renders) == renders  # each client's copy is kept


def test_a_template_edited_to_read_the_request_is_served_per_request_next(tmp_path):
    world = World(tmp_path)
    world.renderer.recheck_after = 0
    override = world.ops / "yealink" / "common.cfg.j2"
    override.write_text("generic\n")
    for client in ("192.0.2.10", "192.0.2.20"):
        assert world.get("/y000000000035.cfg", client=client).body == b"generic\n"
    assert world.renders.count("yealink/common.cfg.j2") == 1
    override.write_text("generic for {{ request.client }}\n")
    stamp = time.time() + 5
    os.utime(override, (stamp, stamp))
    for client in ("192.0.2.10", "192.0.2.20", "192.0.2.10"):
        assert world.get("/y000000000035.cfg", client=client).body == f"generic for {client}\n".encode()
    override.write_text("generic again\n")
    os.utime(override, (stamp + 5, stamp + 5))
    for client in ("192.0.2.10", "192.0.2.20"):
        assert world.get("/y000000000035.cfg", client=client).body == b"generic again\n"
    assert world.renders.count("yealink/common.cfg.j2") == 1 + 2 + 1


def test_a_hit_still_applies_access_checks(tmp_path):
    world = World(tmp_path, '[access.per_mac]\nallow = ["192.0.2.0/24"]\n')
    for _ in range(3):
        assert world.get(f"/{MAC}.cfg").status == 200
        world.settle()
    assert world.get(f"/{MAC}.cfg", client="198.51.100.1").status == 403


def test_a_hit_still_asks_for_credentials(tmp_path):
    world = World(tmp_path, '[access.per_mac]\nauth = "basic"\nhttp_user = "phone"\nhttp_password = "hunter2"\n')
    import base64

    good = "Basic " + base64.b64encode(b"phone:hunter2").decode()
    for _ in range(3):
        assert world.get(f"/{MAC}.cfg", authorization=good).status == 200
        world.settle()
    assert world.get(f"/{MAC}.cfg").status == 401
    bad = "Basic " + base64.b64encode(b"phone:wrong").decode()
    assert world.get(f"/{MAC}.cfg", authorization=bad).status == 401


def test_a_copy_cached_over_tftp_is_served_over_http_only_with_credentials(tmp_path):
    # One copy serves every protocol now: the checks of each protocol still apply on a hit.
    world = World(tmp_path, '[access.per_mac]\nauth = "basic"\nhttp_user = "phone"\nhttp_password = "hunter2"\n'
                            'tftp_allow = ["192.0.2.0/24"]\n')
    import base64

    for _ in range(3):
        over_tftp = result_of(world.provisioner.answer(Request(protocol="tftp", path=f"{MAC}.cfg", client="192.0.2.10")))
        assert over_tftp.status == 200
        world.settle()
    renders = len(world.renders)
    assert world.get(f"/{MAC}.cfg").status == 401
    good = "Basic " + base64.b64encode(b"phone:hunter2").decode()
    over_http = world.get(f"/{MAC}.cfg", authorization=good)
    assert over_http.status == 200 and over_http.body == over_tftp.body
    assert len(world.renders) == renders


def zoiper(world: World, password: str, version: str = "1.14") -> Response:
    return world.get("/zoiper", query={"user": ["alice"], "password": [password], "version": [version]})


def test_zoiper_repeat_login_is_a_hit_but_a_wrong_password_is_not(world):
    for _ in range(3):
        ok = zoiper(world, "pw")
        assert ok.status == 200 and b"<error" not in ok.body
        world.settle()
    renders = len(world.renders)
    assert zoiper(world, "pw").body == ok.body
    assert len(world.renders) == renders
    wrong = zoiper(world, "not-the-password")
    assert b'<error code="1">' in wrong.body
    assert world.provisioner.limiter.blocked_for("login:alice", world.clock.seconds()) == 0
    # a different version is a different document
    assert zoiper(world, "pw", "1.0").body != ok.body


def test_zoiper_password_change_is_not_served_from_the_cache(world):
    for _ in range(3):
        assert b"<error" not in zoiper(world, "pw").body
        world.settle()
    world.add_user("alice", "1001", password="new-pw")
    world.settle()
    assert b'<error code="1">' in zoiper(world, "pw").body
    assert b"<error" not in zoiper(world, "new-pw").body


def test_a_backend_without_generation_is_asked_every_time(world):
    world.provisioner._generation = lambda: None
    for _ in range(3):
        assert world.get(f"/{MAC}.cfg").status == 200
    assert world.provisioner.documents.hits == 0


def test_the_cache_keeps_at_most_max_bytes():
    cache = DocumentCache(max_bytes=100)
    for i in range(5):
        cache.put(i, Document(1, (), None, Response(200, b"x" * 40)))
    assert len(cache) == 2 and cache.size == 80
    assert cache.get(0, 1) is None and cache.get(4, 1) is not None
    assert cache.get(4, 2) is None and len(cache) == 1  # another generation: dropped
    cache.put("big", Document(1, (), None, Response(200, b"x" * 101)))
    assert cache.get("big", 1) is None
    cache.put("none", Document(None, (), None, Response(200, b"x")))
    assert cache.get("none", None) is None


def test_generation_trusts_a_check_for_a_short_while(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(sqlite_module.time, "monotonic", lambda: now[0])
    daemon = SQLiteBackend({}, BackendContext(tmp_path, tmp_path, run_inline, "pbx"))
    cli = SQLiteBackend({}, BackendContext(tmp_path, tmp_path, run_inline, "pbx"))
    result_of(daemon.open())
    result_of(cli.open())
    assert daemon.generation() is None  # first look: filling
    first = daemon.generation()
    assert first is not None
    result_of(cli.save_user(User("bob", "", "Bob", [])))
    assert daemon.generation() == first  # within GENERATION_RECHECK
    now[0] += sqlite_module.GENERATION_RECHECK
    assert daemon.generation() is None  # the change is seen: the read cache empties
    assert daemon.generation() not in (None, first)


def last_fetch(tmp_path: Path) -> str:
    reader = SQLiteBackend({}, BackendContext(tmp_path, tmp_path, run_inline, "pbx"))  # a fresh read cache
    result_of(reader.open())
    return result_of(reader.get_device("001565000001")).last_fetch.address


def test_busy_fetch_records_are_written_once_per_interval(tmp_path):
    clock = Clock()
    queued: list = []

    def deferred_run(f, *args):
        d = Deferred()
        queued.append((d, f, args))
        return d

    def run_one():
        d, f, args = queued.pop(0)
        d.callback(f(*args))

    setup = SQLiteBackend({}, BackendContext(tmp_path, tmp_path, run_inline, "pbx"))
    result_of(setup.open())
    result_of(setup.save_user(User("u", "", "", [])))
    result_of(setup.save_device(Device("001565000001", "yealink-t48g", ["u"])))
    b = SQLiteBackend({}, BackendContext(tmp_path, tmp_path, run_inline, "pbx"))
    result_of(b.open())
    b.context = BackendContext(tmp_path, tmp_path, deferred_run, "pbx", clock.callLater)
    first = b.record_fetch("001565000001", Fetch(1.0, "10.0.0.1", "a"))
    assert len(queued) == 1  # after a quiet spell: at once
    second = b.record_fetch("001565000001", Fetch(2.0, "10.0.0.2", "b"))
    run_one()
    assert result_of(first) is None and queued == []  # busy: the next write waits
    third = b.record_fetch("001565000001", Fetch(3.0, "10.0.0.3", "c"))
    clock.advance(sqlite_module.FETCH_WRITE_INTERVAL - 0.01)
    assert queued == []
    clock.advance(0.01)
    assert len(queued) == 1
    run_one()
    assert result_of(second) is None and result_of(third) is None
    assert last_fetch(tmp_path) == "10.0.0.3"
    # closing writes what waits at once
    b.record_fetch("001565000001", Fetch(4.0, "10.0.0.4", "d"))
    b.record_fetch("001565000001", Fetch(5.0, "10.0.0.5", "e"))
    assert len(queued) == 1
    run_one()
    assert queued == []
    closing = b._fetches_written()
    assert len(queued) == 1
    run_one()
    assert result_of(closing) is None
    assert last_fetch(tmp_path) == "10.0.0.5"


def test_device_url_keys_are_asked_once_per_generation_while_requests_wait(world):
    """Requests arriving while the keys are asked for wait for them; a failed
    look-up is logged and not retried until the backend's generation moves."""
    from twisted.python.failure import Failure

    asked: list[Deferred] = []

    def device_var_values(name):
        assert name == "url_key"
        asked.append(Deferred())
        return asked[-1]

    def get(protocol: str = "http") -> Response | Deferred:
        world.settle()
        return provisioner.answer(Request(protocol=protocol, path="/k1/y000000000035.cfg", client="192.0.2.10"))

    world.backend.device_var_values = device_var_values
    provisioner = Provisioner(world.config, load_catalogue(world.renderer.dirs), world.renderer, world.backend,
                              maybeDeferred, clock=world.clock.seconds)
    # The generation is unknown on the very first look, known on the next:
    # the keys are asked for twice at start.
    for expected in (1, 2):
        first, second = get(), get("tftp")
        assert len(asked) == expected and not first.called and not second.called
        asked[-1].callback({f"k{expected}"})
        assert result_of(first).status == 200 and result_of(second).status == 200
    assert {"k1", "k2"} <= provisioner.secret_segments
    assert get().status == 200 and len(asked) == 2  # nothing changed: answered at once, not asked again
    # A change: asked again; the look-up fails, the request is answered all the same.
    result_of(world.cli.save_device(Device("001565000002", "yealink-t48g", ["alice"], {"url_key": "k3"})))
    for _ in range(2):  # once for the unknown generation, once for the new one
        d = get()
        asked[-1].errback(Failure(RuntimeError("database is locked")))
        assert result_of(d).status == 200
    assert len(asked) == 4
    assert get().status == 200 and len(asked) == 4  # answered at once: not retried
    assert "k3" not in provisioner.secret_segments  # learnt at its device's first per-MAC request instead
