"""Backends: where users and devices live.

The interface is small on purpose.  A backend is a class found through the
entry-point group ``zprovd.backends``; the ``[backend] type`` key names it,
and every other key of ``[backend]`` is its own option.  The daemon and the
CLI only ever talk to the ``Backend`` interface below; nothing outside this
package knows which backend runs.

Every method returns a Deferred.  Blocking work (SQLite, files) must not run
on the reactor thread: a backend receives a ``run_blocking`` callable in its
``BackendContext`` and runs its blocking functions through it.  The daemon
passes one that uses a thread pool; the CLI passes one that runs inline, so
that the same backend code serves both.

Rules every backend follows (the contract tests in
tests/unit/test_backend_contract.py check them): MACs are accepted in any
spelling; returned records are copies, lists are sorted (users by login,
devices by MAC, seen phones most recent first); ``remove_*`` raise NotFound
when absent; a user a device references cannot be removed, and a device
cannot name an unknown user; ``save_device`` with ``last_fetch=None`` keeps
the recorded fetch; ``record_fetch`` ignores unknown MACs and
``record_seen`` ignores configured ones and keeps at most ``MAX_SEEN``.

See "Writing a backend" in the README.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Hashable, Protocol

from twisted.internet.defer import Deferred, maybeDeferred

ENTRY_POINT_GROUP = "zprovd.backends"

MAX_SEEN = 10_000
"""Not-yet-configured phones a backend remembers; beyond it the least recently
seen are forgotten (scanners asking made-up MACs must not grow it forever)."""


class BackendError(Exception):
    """The backend cannot answer (unreachable, corrupt, misconfigured)."""


class ReadOnlyBackend(BackendError):
    """The backend does not support changes (e.g. the CSV backend)."""


class NotFound(KeyError):
    """No such user or device."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the text.
        return str(self.args[0]) if self.args else "not found"


@dataclass
class SipAccount:
    """One SIP account (one line on a desk phone, one account in Zoiper)."""

    sip_user: str
    sip_password: str
    sip_domain: str
    sip_auth_user: str = ""
    display_name: str = ""

    @property
    def auth_user(self) -> str:
        return self.sip_auth_user or self.sip_user


@dataclass
class User:
    login: str
    password_hash: str
    """From ``zprovd.passwords.hash_password``; never the password itself."""
    display_name: str = ""
    accounts: list[SipAccount] = field(default_factory=list)
    vars: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fetch:
    """Where and when a device last fetched (or asked for) a file."""

    when: float
    address: str
    file: str


@dataclass
class Device:
    mac: str
    """Canonical MAC: 12 lowercase hex digits."""
    model: str
    users: list[str] = field(default_factory=list)
    """Logins, in line order."""
    vars: dict[str, Any] = field(default_factory=dict)
    last_fetch: Fetch | None = None


@dataclass
class SeenDevice:
    """A phone that asked for its per-MAC file but is not configured yet."""

    mac: str
    model_guess: str
    address: str
    file: str
    user_agent: str
    first_seen: float
    last_seen: float
    count: int


@dataclass
class BackendContext:
    state_dir: Path
    config_dir: Path
    run_blocking: Callable[..., Deferred]
    """``run_blocking(f, *args)``: run a blocking function off the reactor."""
    default_sip_domain: str = ""
    """``[provisioning] server``: the SIP domain of accounts that name none."""
    call_later: Callable[[float, Callable[[], Any]], Any] | None = None
    """The daemon's ``reactor.callLater``, for work a backend may defer (the CLI
    passes None: do it now)."""


def run_inline(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred:
    """A ``run_blocking`` for the CLI: run now, return an already-fired Deferred."""
    return maybeDeferred(function, *args, **kwargs)


class Backend(Protocol):
    """What zprovd needs from a backend.  Every method returns a Deferred."""

    read_only: bool

    def __init__(self, options: dict[str, Any], context: BackendContext) -> None: ...

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        """Problems with the ``[backend]`` options, as ``key: reason`` strings."""

    def open(self) -> Deferred:
        """Connect, create or migrate; fails with BackendError if unusable."""

    def close(self) -> Deferred: ...

    # look-ups used by the daemon on every request
    def get_user(self, login: str) -> Deferred:  # -> User | None
        ...

    def get_device(self, mac: str) -> Deferred:  # -> Device | None
        ...

    # optional: lets the daemon keep rendered documents between requests
    def generation(self) -> Hashable | None:
        """A value that changes whenever a user or device changes, checked now,
        on the reactor thread, without blocking (no network, no disk read).
        None when the backend cannot tell cheaply right now.  A backend without
        this method is asked for every request (nothing is cached)."""

    # optional: lets the daemon hide every device's URL key in its logs
    def device_var_values(self, name: str) -> Deferred:  # -> set[str]
        """Every distinct string value of the device var ``name`` (the daemon
        asks for ``url_key`` when it starts and when ``generation`` moves).
        Without this method a device's key is known to the daemon, and hidden
        in its logs, from that device's first per-MAC request on."""

    # listing and changes used by the CLI
    def list_users(self) -> Deferred:  # -> list[User]
        ...

    def list_devices(self) -> Deferred:  # -> list[Device]
        ...

    def save_user(self, user: User) -> Deferred:
        """Create or replace."""

    def remove_user(self, login: str) -> Deferred:
        """Raise NotFound if absent."""

    def save_device(self, device: Device) -> Deferred: ...

    def remove_device(self, mac: str) -> Deferred: ...

    def import_records(self, users: list[User], devices: list[Device]) -> Deferred:
        """Save all of them, or (on any error) none."""

    # optional: CLI edits that a concurrent edit cannot undo
    def update_user(self, login: str, change: Callable[[User | None], User]) -> Deferred:  # -> User
        """Read the user (None if absent), save ``change(user)`` and fire with
        it, as one step: no other change to that user can come in between.
        If ``change`` raises, nothing is saved and the Deferred fails with
        that error.  Without this method the CLI reads, then saves, and of
        two edits of one user at the same moment the last one wins."""

    def update_device(self, mac: str, change: Callable[[Device | None], Device]) -> Deferred:  # -> Device
        """The same for a device (``mac`` in any spelling)."""

    # what the daemon learns from requests
    def record_fetch(self, mac: str, fetch: Fetch) -> Deferred: ...

    def record_seen(self, seen: SeenDevice) -> Deferred:
        """Add or update a not-yet-configured phone (count and last_seen grow)."""

    def list_seen(self) -> Deferred:  # -> list[SeenDevice]
        """At most ``MAX_SEEN``, most recently seen first."""

    # optional: ``zprovd device forget``
    def forget_seen(self, macs: list[str] | None) -> Deferred:  # -> int
        """Remove these MACs (None: all) from the seen phones; fire with how
        many were removed.  A backend whose seen phones live only in the
        daemon's memory (where the CLI cannot reach them) has no such method."""

    # optional: ``zprovd backup``
    def backup(self, path: Path) -> Deferred:
        """Write a consistent copy of everything the backend stores to ``path``
        (one file), while the daemon runs; ``path`` is replaced only once the
        copy is complete.  A backend whose data lives elsewhere (the operator's
        CSV file, a directory server) has no such method."""


def available_backends() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def backend_class(name: str) -> type:
    """The backend class registered under ``name``; BackendError if none."""
    found = available_backends()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise BackendError(f"no backend named {name!r} (installed: {known})")
    try:
        return found[name].load()
    except Exception as exc:  # a broken third-party package
        raise BackendError(f"backend {name!r} failed to load: {exc}") from exc


def create_backend(name: str, options: dict[str, Any], context: BackendContext) -> Backend:
    cls = backend_class(name)
    problems = cls.check_options(options)
    if problems:
        raise BackendError("; ".join(problems))
    return cls(options, context)
