"""A read-only backend: users and devices come from one CSV file.

Options (``[backend]`` with ``type = "csv"``):

``path`` (required)
    The CSV file, in the import format of ``zprovd.csvimport``; a relative
    path is relative to the configuration file's folder.
``default_domain``
    SIP domain for rows whose ``sip_domain`` is empty (default:
    ``[provisioning] server``, from ``BackendContext.default_sip_domain``).

Behaviour:

* The file is parsed at ``open()``; any problem fails ``open()`` with a
  BackendError naming the file, the line and the reason.
* On a look-up, the file is ``stat``-ed at most once per second and
  re-parsed only when its modification time, size or inode changed.  If the
  changed file is broken (or gone), the last good data stays in use and one
  line is logged (once per change, not once per look-up).
* Every change (``save_*``, ``remove_*``, ``import_records``) fails with
  ReadOnlyBackend: edit the CSV file instead.
* ``record_fetch`` and ``record_seen`` are kept **in memory only**: they are
  lost on restart and not shared with the CLI.  ``list_seen`` and
  ``Device.last_fetch`` report them.  At most ``MAX_SEEN`` unknown phones are
  remembered (the least recently seen are forgotten first).
* Passwords in the file are plain text, so the hashes built from them live
  in memory only and use ``HASH_ITERATIONS`` PBKDF2 iterations (1): strong
  hashing would protect nothing that the file does not already reveal, and
  would cost ~35 ms per user on every reload.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from zprovd.backends import (
    MAX_SEEN,
    BackendContext,
    BackendError,
    Device,
    Fetch,
    ReadOnlyBackend,
    SeenDevice,
    User,
)
from zprovd.csvimport import CSVImportError, load_csv
from zprovd.mac import InvalidMAC, normalize_mac
from zprovd.passwords import hash_password

log = Logger()

OPTIONS = ("path", "default_domain")
HASH_ITERATIONS = 1
CHECK_INTERVAL = 1.0
MAX_PROBLEMS_SHOWN = 5


def _cheap_hash(password: str) -> str:
    return hash_password(password, iterations=HASH_ITERATIONS)


def _summary(problems: list[str], limit: int = MAX_PROBLEMS_SHOWN) -> str:
    """Problems on one line."""
    shown = "; ".join(" ".join(p.split()) for p in problems[:limit])
    more = len(problems) - limit
    return shown + (f" (and {more} more problem{'s' if more > 1 else ''})" if more > 0 else "")


@dataclass
class _Snapshot:
    users: dict[str, User] = field(default_factory=dict)
    devices: dict[str, Device] = field(default_factory=dict)


Signature = tuple[int, int, int]


class CSVBackend:
    """Users and devices from a CSV file, re-read when it changes (read-only)."""

    read_only = True

    def __init__(
        self,
        options: dict[str, Any],
        context: BackendContext,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.context = context
        path = Path(str(options.get("path", ""))).expanduser()
        if not path.is_absolute():
            path = Path(context.config_dir) / path
        self.path: Path = path
        self.default_domain: str = str(options.get("default_domain", "") or context.default_sip_domain)
        self.check_interval = CHECK_INTERVAL
        self._clock = clock
        self._lock = threading.Lock()
        """Held while checking and re-reading the file (in a run_blocking thread)."""
        self._records_lock = threading.Lock()
        """Guards the in-memory fetches and seen phones (also used on the reactor thread,
        so it is never held for long and never while parsing)."""
        self._data = _Snapshot()
        self._version = 0
        """Counts the loads: the generation."""
        self._signature: Signature | None = None
        self._failed: Any = None
        self._checked_at = float("-inf")
        self._fetches: dict[str, Fetch] = {}
        self._seen: OrderedDict[str, SeenDevice] = OrderedDict()

    def __repr__(self) -> str:
        return f"<CSVBackend {self.path}>"

    @classmethod
    def check_options(cls, options: dict[str, Any]) -> list[str]:
        """Problems with the options as ``key: reason`` strings (empty if fine)."""
        problems = []
        if "path" not in options:
            problems.append("path: required (the CSV file of users and devices)")
        for key, value in options.items():
            if key == "path":
                if not isinstance(value, str) or not value:
                    problems.append("path: must be a non-empty string (a file name; relative "
                                    "to the configuration file's folder)")
            elif key == "default_domain":
                if not isinstance(value, str):
                    problems.append("default_domain: must be a string")
            else:
                problems.append(f"{key}: unknown option for the csv backend "
                                f"(known: {', '.join(OPTIONS)})")
        return problems

    # ------------------------------------------------------------------
    # loading

    def _stat(self) -> Signature:
        st = os.stat(self.path)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _load(self) -> tuple[Signature, _Snapshot]:
        signature = self._stat()
        users, devices = load_csv(self.path, self.default_domain, hasher=_cheap_hash)
        return signature, _Snapshot(
            users={u.login: u for u in users},
            devices={d.mac: d for d in devices},
        )

    def open(self) -> Deferred:
        """Parse the file; BackendError (file, line, reason) if it is unusable."""
        return self.context.run_blocking(self._open_blocking)

    def _open_blocking(self) -> None:
        try:
            signature, data = self._load()
        except OSError as exc:
            raise BackendError(f"{self.path}: cannot read: {exc.strerror or exc}") from None
        except CSVImportError as exc:
            raise BackendError(_summary(exc.problems)) from None
        with self._lock:
            self._signature, self._data, self._failed = signature, data, None
            self._version += 1
            self._checked_at = self._clock()

    def close(self) -> Deferred:
        return succeed(None)

    def _refresh(self) -> _Snapshot:
        """The current data, re-read first if the file changed (checked once per interval)."""
        now = self._clock()
        if now - self._checked_at < self.check_interval:
            return self._data
        with self._lock:
            if now - self._checked_at < self.check_interval:
                return self._data
            self._checked_at = now
            try:
                signature = self._stat()
            except OSError as exc:
                failure = ("stat", exc.strerror)
                if failure != self._failed:
                    self._failed = failure
                    log.error("{path}: cannot read ({reason}); keeping the previous data",
                              path=str(self.path), reason=exc.strerror or str(exc))
                return self._data
            if signature == self._signature or signature == self._failed:
                return self._data
            try:
                signature, data = self._load()
            except OSError as exc:
                self._failed = signature
                log.error("{path}: cannot read ({reason}); keeping the previous data",
                          path=str(self.path), reason=exc.strerror or str(exc))
                return self._data
            except CSVImportError as exc:
                self._failed = signature
                log.error("{path}: changed but unusable, keeping the previous data: {problems}",
                          path=str(self.path), problems=_summary(exc.problems))
                return self._data
            self._signature, self._data, self._failed = signature, data, None
            self._version += 1
            with self._records_lock:
                for mac in list(self._fetches):
                    if mac not in data.devices:
                        del self._fetches[mac]
            log.info("{path}: reloaded ({users} users, {devices} devices)", path=str(self.path),
                     users=len(data.users), devices=len(data.devices))
            return data

    def generation(self) -> int | None:
        """The number of loads, while the file is not due for a check (the
        look-ups would not look at it either); None when it is."""
        if self._clock() - self._checked_at < self.check_interval:
            return self._version
        return None

    # ------------------------------------------------------------------
    # look-ups (copies: callers may change what they get)

    def _device(self, device: Device) -> Device:
        with self._records_lock:
            fetch = self._fetches.get(device.mac)
        return replace(copy.deepcopy(device), last_fetch=fetch)

    def get_user(self, login: str) -> Deferred:
        return self.context.run_blocking(self._get_user, login)

    def _get_user(self, login: str) -> User | None:
        user = self._refresh().users.get(login)
        return None if user is None else copy.deepcopy(user)

    def get_device(self, mac: str) -> Deferred:
        return self.context.run_blocking(self._get_device, mac)

    def _get_device(self, mac: str) -> Device | None:
        try:
            mac = normalize_mac(mac)
        except (InvalidMAC, AttributeError):
            return None
        device = self._refresh().devices.get(mac)
        return None if device is None else self._device(device)

    def list_users(self) -> Deferred:
        return self.context.run_blocking(self._list_users)

    def _list_users(self) -> list[User]:
        users = self._refresh().users
        return [copy.deepcopy(users[login]) for login in sorted(users)]

    def list_devices(self) -> Deferred:
        return self.context.run_blocking(self._list_devices)

    def _list_devices(self) -> list[Device]:
        devices = self._refresh().devices
        return [self._device(devices[mac]) for mac in sorted(devices)]

    # ------------------------------------------------------------------
    # changes: refused

    def _read_only(self, what: str) -> Deferred:
        return fail(ReadOnlyBackend(
            f"cannot {what}: the csv backend is read-only; edit {self.path} instead "
            "(it is re-read when it changes)"
        ))

    def save_user(self, user: User) -> Deferred:
        return self._read_only(f"save user {user.login!r}")

    def remove_user(self, login: str) -> Deferred:
        return self._read_only(f"remove user {login!r}")

    def save_device(self, device: Device) -> Deferred:
        return self._read_only(f"save device {device.mac}")

    def remove_device(self, mac: str) -> Deferred:
        return self._read_only(f"remove device {mac}")

    def import_records(self, users: list[User], devices: list[Device]) -> Deferred:
        return self._read_only("import")

    # ------------------------------------------------------------------
    # what the daemon learns: in memory only

    def record_fetch(self, mac: str, fetch: Fetch) -> Deferred:
        """Remember the last fetch of a configured device, in memory (lost on restart)."""
        try:
            mac = normalize_mac(mac)
        except (InvalidMAC, AttributeError):
            return succeed(None)
        with self._records_lock:
            if mac in self._data.devices:
                self._fetches[mac] = fetch
        return succeed(None)

    def record_seen(self, seen: SeenDevice) -> Deferred:
        """Add or update an unknown phone, in memory (lost on restart); see SQLiteBackend."""
        try:
            mac = normalize_mac(seen.mac)
        except (InvalidMAC, AttributeError):
            return succeed(None)
        with self._records_lock:
            if mac in self._data.devices:
                return succeed(None)
            old = self._seen.pop(mac, None)
            if old is None:
                self._seen[mac] = replace(seen, mac=mac, count=max(seen.count, 1))
            else:
                self._seen[mac] = SeenDevice(
                    mac=mac,
                    model_guess=seen.model_guess or old.model_guess,
                    address=seen.address,
                    file=seen.file,
                    user_agent=seen.user_agent,
                    first_seen=min(old.first_seen, seen.first_seen),
                    last_seen=max(old.last_seen, seen.last_seen),
                    count=old.count + max(seen.count, 1),
                )
            while len(self._seen) > MAX_SEEN:
                self._seen.popitem(last=False)
        return succeed(None)

    def list_seen(self) -> Deferred:
        """The unknown phones seen since start, most recently seen first."""
        with self._records_lock:
            configured = self._data.devices
            seen = sorted((s for s in self._seen.values() if s.mac not in configured),
                          key=lambda s: (-s.last_seen, s.mac))
        return succeed([replace(s) for s in seen])
