"""The ``zprovd`` command: the daemon and every admin action.

Management commands talk to the same backend the daemon uses (through the
backend interface, run inline) and work while the daemon runs: the daemon
reads the backend on every request.
"""

from __future__ import annotations

import argparse
import difflib
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from zprovd import __version__
from zprovd.backends import (
    Backend,
    BackendContext,
    BackendError,
    Device,
    NotFound,
    SipAccount,
    User,
    create_backend,
    run_inline,
)
from zprovd.catalogue import Catalogue, bundled_templates_dir, load_catalogue
from zprovd.config import Config, ConfigError, default_config_path, load_config
from zprovd.context import RequestInfo
from zprovd.csvimport import CONTROL_CHARACTERS
from zprovd.mac import InvalidMAC, format_mac, normalize_mac
from zprovd.renderer import Renderer
from zprovd.sipvars import LineError, sip_transport_and_port

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class CommandError(Exception):
    """A problem the user can act on; printed as one line, exit status 1."""


def wait(d: Deferred) -> Any:
    """The result of a Deferred that has already fired (backends run inline here)."""
    results: list[Any] = []
    d.addBoth(results.append)
    if not results:
        raise RuntimeError("a backend call did not complete synchronously in the CLI")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


# -- shared set-up --------------------------------------------------------------


class Session:
    """What a command needs: the config, and on demand backend, catalogue, renderer."""

    def __init__(self, config: Config, out: TextIO):
        self.config = config
        self.out = out
        self._backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            context = BackendContext(self.config.state_dir, self.config.path.resolve().parent, run_inline, self.config.provisioning.server)
            try:
                backend = create_backend(self.config.backend.type, self.config.backend.options, context)
                wait(backend.open())
            except BackendError as exc:
                raise CommandError(f"backend {self.config.backend.type}: {exc}") from None
            self._backend = backend
        return self._backend

    def renderer(self) -> Renderer:
        return Renderer(self.config.templates.dirs)

    def catalogue(self) -> Catalogue:
        catalogue = load_catalogue(self.renderer().dirs)
        if catalogue.problems:
            raise CommandError("model catalogue: " + "; ".join(catalogue.problems))
        return catalogue

    def close(self) -> None:
        if self._backend is not None:
            wait(self._backend.close())


def _vars(pairs: list[str] | None) -> dict[str, str]:
    result = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise CommandError(f"--var {pair!r}: expected KEY=VALUE")
        result[key.strip()] = value
    try:
        sip_transport_and_port(result, "--var")
    except LineError as exc:
        raise CommandError(str(exc)) from None
    return result


def _mac(text: str) -> str:
    try:
        return normalize_mac(text)
    except InvalidMAC as exc:
        raise CommandError(str(exc)) from None


def _when(timestamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp)) if timestamp else "-"


def _table(out: TextIO, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)] if rows else [len(h) for h in header]
    for row in [header, *rows]:
        out.write("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")


# -- commands ------------------------------------------------------------------


def cmd_run(s: Session, args) -> int:
    import gc
    import signal

    from twisted.logger import LogLevel, Logger

    from zprovd import reactor as event_loop

    reactor = event_loop.install()  # before anything imports Twisted's default one

    from zprovd.daemon import Daemon, StartupError
    from zprovd.logs import buffer_lines, start_logging

    start_logging(s.config.log.format, LogLevel.levelWithName(s.config.log.level))
    daemon = Daemon(s.config, reactor)
    status = [EXIT_OK]
    json_lines = s.config.log.format == "json"
    run_log = Logger(namespace="zprovd.run")

    def say(text: str) -> None:
        """A start-up line: plain on stderr, or a log line where every line must be JSON."""
        if json_lines:
            run_log.info("{text}", text=text)
        else:
            print(f"zprovd: {text}", file=sys.stderr, flush=True)

    def started(_):
        # What start-up loaded (modules, templates, catalogue) lives as long
        # as the process: kept out of the cycle collector's full passes,
        # which otherwise walk it again every time, pausing the reactor.
        gc.collect()
        gc.freeze()
        for bound in daemon.bound:
            say(f"serving {bound.protocol} on {bound.host}:{bound.port}")
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(daemon.reload))

    def failed(failure: Failure):
        if json_lines:
            if failure.check(StartupError):
                run_log.error("{text}", text=str(failure.value))
            else:
                run_log.failure("cannot start: {text}", failure, text=failure.getErrorMessage())
        elif failure.check(StartupError):
            print(f"zprovd: {failure.value}", file=sys.stderr, flush=True)
        else:
            print(f"zprovd: cannot start: {failure.getErrorMessage()}", file=sys.stderr, flush=True)
            failure.printTraceback(file=sys.stderr)
        status[0] = EXIT_FAIL
        reactor.stop()

    reactor.callWhenRunning(buffer_lines, reactor)
    reactor.callWhenRunning(lambda: daemon.start().addCallbacks(started, failed))
    reactor.addSystemEventTrigger("before", "shutdown", daemon.stop)
    reactor.run()
    return status[0]


def cmd_check(s: Session, args) -> int:
    from zprovd.daemon import check_templates

    renderer = s.renderer()
    catalogue = load_catalogue(renderer.dirs)
    problems = catalogue.problems + check_templates(catalogue, renderer)
    try:
        s.backend
    except CommandError as exc:
        problems.append(str(exc))
    https = s.config.https
    if https.listen:
        from zprovd import tls

        try:
            if https.certificate and https.private_key:
                tls.load_pem_chain(tls.CertificatePaths(https.certificate, https.private_key))
            if https.client_ca is not None:
                tls.load_client_cas(https.client_ca)
        except tls.TLSError as exc:
            problems.append(f"https: {exc}")
    if s.config.server.user:
        from zprovd.privileges import PrivilegeError, user_and_group

        try:
            user_and_group(s.config.server.user, s.config.server.group)
        except PrivilegeError as exc:
            problems.append(str(exc))
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return EXIT_FAIL
    s.out.write(f"{s.config.path}: OK ({len(catalogue.models)} models, backend {s.config.backend.type})\n")
    return EXIT_OK


def _new_user(s: Session, args) -> User:
    from zprovd.passwords import hash_password

    account = SipAccount(
        sip_user=args.sip_user or args.login,
        sip_password=args.sip_password or args.password,
        sip_domain=args.sip_domain or s.config.provisioning.server,
        sip_auth_user=args.sip_auth_user or "",
        display_name=args.display_name or "",
    )
    return User(
        login=args.login,
        password_hash=hash_password(args.password),
        display_name=args.display_name or "",
        accounts=[account],
        vars=_vars(args.var),
    )


def _read_secrets(args, *names: str) -> None:
    """Password options given as ``-`` are read from standard input: asked
    for without echo on a terminal, else its first line.  A password on the
    command line is seen by every user of the machine (``ps``) and kept in
    the shell's history."""
    dashed = [name for name in names if getattr(args, name, None) == "-"]
    options = ["--" + name.replace("_", "-") for name in dashed]
    if len(dashed) > 1:
        raise CommandError(f"{' and '.join(options)}: only one password can be read from standard input")
    for name, option in zip(dashed, options):
        if sys.stdin.isatty():
            import getpass

            value = getpass.getpass(f"{option[2:]}: ")
        else:
            value = sys.stdin.readline().rstrip("\r\n")
        if not value:
            raise CommandError(f"{option} -: no password on standard input")
        if CONTROL_CHARACTERS.search(value):
            raise CommandError(f"{option} -: the password contains a control character (tab, NUL...)")
        setattr(args, name, value)


def _refuse_control_characters(args) -> None:
    """No argument may contain a control character, as no CSV cell may: a
    line break or a NUL in a name or password would break (or inject lines
    into) the files phones get, and every fetch of them would fail."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and CONTROL_CHARACTERS.search(item):
                raise CommandError(f"{name.replace('_', ' ')}: contains a control character (line break, tab, NUL...)")


def _update(s: Session, kind: str, key: str, change: Callable[[Any], Any]) -> Any:
    """Save ``change(the record or None)`` of a ``kind`` ("user" or "device");
    with a backend that has ``update_<kind>``, no other edit of that record
    can come in between (and be undone), else it is read, then saved."""
    update = getattr(s.backend, f"update_{kind}", None)
    if update is not None:
        return wait(update(key, change))
    record = change(wait(getattr(s.backend, f"get_{kind}")(key)))
    wait(getattr(s.backend, f"save_{kind}")(record))
    return record


def _require(record: Any, what: str) -> Any:
    """``record``, or CommandError "no ``what``" when it is None."""
    if record is None:
        raise CommandError(f"no {what}")
    return record


def cmd_user_add(s: Session, args) -> int:
    _read_secrets(args, "password", "sip_password")
    if not args.login or any(c.isspace() for c in args.login):
        raise CommandError(f"login {args.login!r} must be non-empty and contain no spaces")
    if not args.password:
        raise CommandError("--password must not be empty")
    new = _new_user(s, args)  # (hashing the password takes a while: not while saving)

    def add(existing: User | None) -> User:
        if existing is not None and not args.replace:
            raise CommandError(f"user {args.login} exists (use --replace to overwrite it)")
        return new

    _update(s, "user", args.login, add)
    s.out.write(f"user {args.login} saved\n")
    return EXIT_OK


def cmd_user_add_account(s: Session, args) -> int:
    _read_secrets(args, "sip_password")
    for name in ("sip_user", "sip_password"):
        if not getattr(args, name):
            raise CommandError(f"--{name.replace('_', '-')} must not be empty")
    account = SipAccount(
        sip_user=args.sip_user,
        sip_password=args.sip_password,
        sip_domain=args.sip_domain or s.config.provisioning.server,
        sip_auth_user=args.sip_auth_user or "",
        display_name=args.display_name or "",
    )

    def add_account(current: User | None) -> User:
        user = _require(current, f"user {args.login}")
        user.accounts.append(account)
        return user

    user = _update(s, "user", args.login, add_account)
    s.out.write(f"user {args.login} now has {len(user.accounts)} SIP accounts\n")
    return EXIT_OK


def cmd_user_remove_account(s: Session, args) -> int:
    """Remove SIP account N; the device lines after it move up by one."""
    removed: list[SipAccount] = []

    def remove_account(current: User | None) -> User:
        user = _require(current, f"user {args.login}")
        count = len(user.accounts)
        if not 1 <= args.account <= count:
            raise CommandError(f"user {args.login} has {count} SIP account(s), not an account {args.account}")
        if count == 1:
            raise CommandError(f"account {args.account} is the only SIP account of user {args.login} (remove the user instead)")
        removed[:] = [user.accounts.pop(args.account - 1)]
        return user

    user = _update(s, "user", args.login, remove_account)
    s.out.write(f"user {args.login}: account {args.account} (sip user {removed[0].sip_user}) removed, "
                f"{len(user.accounts)} SIP account(s) left\n")
    return EXIT_OK


def cmd_user_edit(s: Session, args) -> int:
    """Change what the options give, keep the rest (accounts, vars, devices)."""
    from dataclasses import replace

    from zprovd.passwords import hash_password

    _read_secrets(args, "password", "sip_password")
    # (hashing the password takes a while: before the change, not while saving it)
    password_hash = hash_password(args.password) if args.password else None

    def edit(current: User | None) -> User:
        user = _require(current, f"user {args.login}")
        sip = {name: getattr(args, name) for name in ("sip_user", "sip_auth_user", "sip_password", "sip_domain")}
        sip = {name: value for name, value in sip.items() if value is not None}
        for name, value in sip.items():
            if not value and name != "sip_auth_user":  # an empty auth user: the SIP user again
                raise CommandError(f"--{name.replace('_', '-')} must not be empty")
        if args.password is not None:
            if not password_hash:
                raise CommandError("--password must not be empty")
            user.password_hash = password_hash
        if args.account is not None or sip:
            number = args.account or 1
            if not 1 <= number <= len(user.accounts):
                raise CommandError(f"user {args.login} has {len(user.accounts)} SIP account(s), not an account {number}")
            user.accounts[number - 1] = replace(user.accounts[number - 1], **sip)
        if args.display_name is not None:
            if args.account is not None:
                user.accounts[args.account - 1] = replace(user.accounts[args.account - 1], display_name=args.display_name)
            else:
                # Accounts showing the user's name (``user add`` copies it to the
                # first one) go on showing it.
                old = user.display_name
                user.display_name = args.display_name
                user.accounts = [replace(a, display_name=args.display_name) if a.display_name == old else a
                                 for a in user.accounts]
        for key in args.unset_var or []:
            if key not in user.vars:
                raise CommandError(f"--unset-var {key}: the user has no such var")
            del user.vars[key]
        user.vars.update(_vars(args.var))
        if args.password is None and not sip and args.display_name is None and not args.var and not args.unset_var:
            raise CommandError("nothing to change (see `zprovd user edit --help`)")
        return user

    _update(s, "user", args.login, edit)
    s.out.write(f"user {args.login} saved\n")
    return EXIT_OK


def cmd_user_list(s: Session, args) -> int:
    users = wait(s.backend.list_users())
    _table(
        s.out,
        ["LOGIN", "DISPLAY NAME", "SIP ACCOUNTS"],
        [[u.login, u.display_name, ", ".join(f"{a.sip_user}@{a.sip_domain}" for a in u.accounts)] for u in users],
    )
    return EXIT_OK


def cmd_user_show(s: Session, args) -> int:
    user = wait(s.backend.get_user(args.login))
    if user is None:
        raise CommandError(f"no user {args.login}")
    out = s.out
    out.write(f"login:         {user.login}\ndisplay name:  {user.display_name}\npassword:      (hashed)\n")
    for i, a in enumerate(user.accounts, 1):
        out.write(
            f"account {i}:     sip user {a.sip_user}, auth user {a.auth_user}, domain {a.sip_domain}, "
            f"display name {a.display_name or '-'}, sip password (set)\n"
        )
    for key, value in sorted(user.vars.items()):
        out.write(f"var:           {key}={value}\n")
    return EXIT_OK


def cmd_user_remove(s: Session, args) -> int:
    try:
        wait(s.backend.remove_user(args.login))
    except NotFound:
        raise CommandError(f"no user {args.login}") from None
    s.out.write(f"user {args.login} removed\n")
    return EXIT_OK


_DEVICE_SECRETS = ("http_user", "http_ha1_sha256", "http_ha1_md5", "url_key")
"""Device vars set only through their own options (``--http-user``, ``--url-key``)."""


def _check_users(s: Session, logins: list[str]) -> None:
    for login in logins:
        if wait(s.backend.get_user(login)) is None:
            raise CommandError(f"no user {login}")


def _check_model(s: Session, model: str) -> str:
    if s.catalogue().get(model) is None:
        raise CommandError(f"unknown model {model!r}; `zprovd models` lists them")
    return model.lower()


def _device_vars(args, variables: dict[str, Any]) -> dict[str, Any]:
    """``variables`` with the device options of ``args`` applied: ``--var``,
    ``--http-user``/``--http-password``, ``--url-key`` (and, for ``device
    edit``, ``--unset-var``, ``--no-http-auth``, ``--no-url-key``)."""
    variables = dict(variables)
    given = _vars(args.var)
    removed = list(getattr(args, "unset_var", None) or [])
    if reserved := sorted(set(given) & set(_DEVICE_SECRETS)):
        raise CommandError(f"--var {reserved[0]}: set it with --http-user/--http-password/--url-key")
    if reserved := sorted(set(removed) & set(_DEVICE_SECRETS)):
        raise CommandError(f"--unset-var {reserved[0]}: remove it with --no-http-auth/--no-url-key")
    for key in removed:
        if key not in variables:
            raise CommandError(f"--unset-var {key}: the device has no such var")
        del variables[key]
    variables.update(given)
    if bool(args.http_user) != bool(args.http_password):
        raise CommandError("--http-user and --http-password go together")
    if getattr(args, "no_http_auth", False):
        for key in ("http_user", "http_ha1_sha256", "http_ha1_md5"):
            variables.pop(key, None)
    if args.http_user:
        from zprovd.httpauth import Credentials

        c = Credentials.from_password(args.http_user, args.http_password)
        variables.update(http_user=c.user, http_ha1_sha256=c.ha1_sha256, http_ha1_md5=c.ha1_md5)
    if getattr(args, "no_url_key", False):
        variables.pop("url_key", None)
    if args.url_key:
        if not args.url_key.replace("-", "").replace("_", "").isalnum() or not args.url_key.isascii():
            raise CommandError("--url-key: use letters, digits, '-' and '_' only (it is a path segment)")
        variables["url_key"] = args.url_key
    return variables


def cmd_device_add(s: Session, args) -> int:
    _read_secrets(args, "http_password")
    mac = _mac(args.mac)
    model = _check_model(s, args.model)
    _check_users(s, args.user or [])

    def add(existing: Device | None) -> Device:
        if existing is not None and not args.replace:
            raise CommandError(f"device {format_mac(mac, 'colon')} exists (use --replace to overwrite it)")
        return Device(mac=mac, model=model, users=list(args.user or []), vars=_device_vars(args, {}))

    _update(s, "device", mac, add)
    s.out.write(f"device {format_mac(mac, 'colon')} saved\n")
    return EXIT_OK


def cmd_device_edit(s: Session, args) -> int:
    _read_secrets(args, "http_password")
    mac = _mac(args.mac)
    if args.no_http_auth and args.http_user:
        raise CommandError("--no-http-auth and --http-user exclude each other")
    if args.no_url_key and args.url_key:
        raise CommandError("--no-url-key and --url-key exclude each other")
    if args.no_user and args.user:
        raise CommandError("--no-user and --user exclude each other")
    model = _check_model(s, args.model) if args.model is not None else None
    if args.user:
        _check_users(s, args.user)

    def edit(device: Device | None) -> Device:
        device = _require(device, f"device {format_mac(mac, 'colon')}")
        if model is not None:
            device.model = model
        if args.user:
            device.users = list(args.user)
        elif args.no_user:
            device.users = []
        variables = _device_vars(args, device.vars)
        changes = (args.model, args.user, args.no_user, args.var, args.unset_var, args.http_user,
                   args.no_http_auth, args.url_key, args.no_url_key)
        if not any(changes):
            raise CommandError("nothing to change (see `zprovd device edit --help`)")
        device.vars = variables
        return device

    _update(s, "device", mac, edit)
    s.out.write(f"device {format_mac(mac, 'colon')} saved\n")
    return EXIT_OK


def cmd_device_list(s: Session, args) -> int:
    devices = wait(s.backend.list_devices())
    _table(
        s.out,
        ["MAC", "MODEL", "USERS", "LAST FETCH"],
        [
            [format_mac(d.mac, "colon"), d.model, ",".join(d.users) or "-", _when(d.last_fetch.when) if d.last_fetch else "-"]
            for d in devices
        ],
    )
    return EXIT_OK


def cmd_device_show(s: Session, args) -> int:
    mac = _mac(args.mac)
    device = wait(s.backend.get_device(mac))
    if device is None:
        raise CommandError(f"no device {format_mac(mac, 'colon')}")
    out = s.out
    out.write(f"mac:           {format_mac(device.mac, 'colon')}\nmodel:         {device.model}\n")
    out.write(f"users:         {', '.join(device.users) or '-'}\n")
    if device.vars.get("http_user"):
        out.write(f"http auth:     user {device.vars['http_user']}, password (set)\n")
    if device.vars.get("url_key"):
        out.write(f"url key:       {device.vars['url_key']}\n")
    for key, value in sorted(device.vars.items()):
        if key not in _DEVICE_SECRETS:
            out.write(f"var:           {key}={value}\n")
    f = device.last_fetch
    out.write(f"last fetch:    {_when(f.when)} from {f.address}: {f.file}\n" if f else "last fetch:    never\n")
    return EXIT_OK


def cmd_device_remove(s: Session, args) -> int:
    mac = _mac(args.mac)
    try:
        wait(s.backend.remove_device(mac))
    except NotFound:
        raise CommandError(f"no device {format_mac(mac, 'colon')}") from None
    s.out.write(f"device {format_mac(mac, 'colon')} removed\n")
    return EXIT_OK


def cmd_device_seen(s: Session, args) -> int:
    if getattr(s.backend, "forget_seen", None) is None:
        print(f"zprovd: backend {s.config.backend.type} keeps the phones it has seen in the daemon's memory only: "
              "the daemon's log lists them (\"unknown phone\")", file=sys.stderr)
    seen = wait(s.backend.list_seen())
    _table(
        s.out,
        ["MAC", "MODEL GUESS", "ADDRESS", "FILE", "REQUESTS", "LAST SEEN", "USER AGENT"],
        [
            [format_mac(x.mac, "colon"), x.model_guess, x.address, x.file, str(x.count), _when(x.last_seen), x.user_agent or "-"]
            for x in seen
        ],
    )
    return EXIT_OK


def cmd_device_forget(s: Session, args) -> int:
    """Remove phones from the `device seen` list (they come back if they ask again)."""
    forget = getattr(s.backend, "forget_seen", None)
    if forget is None:
        raise CommandError(f"backend {s.config.backend.type} keeps the phones it has seen in the daemon's memory "
                           "only: restarting the daemon clears them")
    if args.all == bool(args.macs):
        raise CommandError("give the MACs to forget, or --all")
    macs = None  # --all
    if not args.all:
        macs = []
        for mac in args.macs:
            try:
                macs.append(normalize_mac(mac))
            except InvalidMAC:
                raise CommandError(f"{mac!r} is not a MAC address") from None
        listed = {x.mac for x in wait(s.backend.list_seen())}
        missing = [format_mac(mac, "colon") for mac in macs if mac not in listed]
        if missing:
            raise CommandError(f"not in the seen list: {', '.join(missing)}")
    count = wait(forget(macs))
    s.out.write(f"forgot {count} phone(s)\n")
    return EXIT_OK


def cmd_backup(s: Session, args) -> int:
    backup = getattr(s.backend, "backup", None)
    if backup is None:
        raise CommandError(f"backend {s.config.backend.type} keeps no data of its own to back up")
    try:
        wait(backup(args.file))
    except OSError as exc:
        raise CommandError(f"{args.file}: {exc.strerror or exc}") from None
    s.out.write(f"backed up to {args.file}\n")
    return EXIT_OK


def cmd_import(s: Session, args) -> int:
    from zprovd.csvimport import CSVImportError, parse_csv

    path = Path(args.file)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{path}: not UTF-8 text") from None
    catalogue = s.catalogue()
    try:
        users, devices = parse_csv(text, str(path), s.config.provisioning.server,
                                   known_model=lambda model: catalogue.get(model) is not None)
    except CSVImportError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        raise CommandError(f"{path}: nothing imported ({len(exc.problems)} problem(s))") from None
    # Rows replace the users and devices of the same login or MAC: say how many.
    replaced_users = sum(1 for u in users if wait(s.backend.get_user(u.login)) is not None)
    replaced_devices = sum(1 for d in devices if wait(s.backend.get_device(d.mac)) is not None)
    wait(s.backend.import_records(users, devices))
    s.out.write(f"imported {len(users)} users ({replaced_users} replaced) and {len(devices)} devices "
                f"({replaced_devices} replaced) from {path}\n")
    return EXIT_OK


def _render_provisioner(s: Session):
    """The daemon's pipeline as an allowed client sees it (no access policy)."""
    from dataclasses import replace

    from zprovd.config import open_access
    from zprovd.provisioning import Provisioner

    config = replace(s.config, access=open_access())
    return Provisioner(config, s.catalogue(), s.renderer(), _NoRecording(s.backend), run_inline)


class _NoRecording:
    """The backend, minus the writes a request makes: ``render`` is a dry run."""

    def __init__(self, backend: Backend):
        self._backend = backend

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def record_fetch(self, mac, fetch):
        return run_inline(lambda: None)

    def record_seen(self, seen):
        return run_inline(lambda: None)


def cmd_render(s: Session, args) -> int:
    from zprovd.routing import Request

    provisioner = _render_provisioner(s)
    if args.user:
        user = wait(s.backend.get_user(args.user))
        if user is None:
            raise CommandError(f"no user {args.user}")
        response = provisioner.render_zoiper(user, args.version, RequestInfo(protocol="cli"))
    else:
        mac = _mac(args.mac)
        name = args.file
        if not name:
            device = wait(s.backend.get_device(mac))
            if device is None:
                raise CommandError(f"no device {format_mac(mac, 'colon')}")
            model = provisioner.catalogue.get(device.model)
            if model is None or not model.per_mac:
                raise CommandError(f"device {format_mac(mac, 'colon')} has model {device.model}, unknown or without per-MAC files")
            name = model.per_mac[0].pattern.replace("{mac}", mac)
        # What an allowed HTTP client gets: render shows content, not policy.
        response = wait(provisioner.handle(Request(protocol="http", path=name, client="127.0.0.1")))
    if response.status != 200:
        raise CommandError(f"the daemon would answer {response.status}: {response.reason}")
    sys.stdout.buffer.write(response.body)
    sys.stdout.flush()
    return EXIT_OK


def cmd_models(s: Session, args) -> int:
    catalogue = s.catalogue()
    _table(
        s.out,
        ["MODEL", "LABEL", "GENERIC FILES", "PER-MAC FILES"],
        [
            [m.id, m.label, " ".join(g.name for g in m.generic) or "-", " ".join(p.pattern for p in m.per_mac) or "-"]
            for m in catalogue.models.values()
        ],
    )
    return EXIT_OK


def _model_templates(s: Session, model_id: str) -> list[str]:
    model = s.catalogue().get(model_id)
    if model is None:
        raise CommandError(f"unknown model {model_id!r}; `zprovd models` lists them")
    names = [f.template for f in [*model.generic, *model.per_mac]]
    return list(dict.fromkeys(names))


def cmd_templates_list(s: Session, args) -> int:
    renderer = s.renderer()
    bundled = bundled_templates_dir()
    rows = []
    for model in s.catalogue().models.values():
        for template in dict.fromkeys(f.template for f in [*model.generic, *model.per_mac]):
            source = renderer.source_of(template)
            where = "missing" if source is None else ("bundled" if source.is_relative_to(bundled) else str(source))
            rows.append([model.id, template, where])
    _table(s.out, ["MODEL", "TEMPLATE", "SOURCE"], rows)
    return EXIT_OK


def _overrides(s: Session, template: str) -> list[Path]:
    return [d / template for d in s.config.templates.dirs if (d / template).is_file()]


def cmd_templates_diff(s: Session, args) -> int:
    bundled = bundled_templates_dir()
    any_override = False
    for template in _model_templates(s, args.model):
        for override in _overrides(s, template)[:1]:
            any_override = True
            default = bundled / template
            old = default.read_text("utf-8").splitlines(keepends=True) if default.is_file() else []
            new = override.read_text("utf-8").splitlines(keepends=True)
            s.out.writelines(difflib.unified_diff(old, new, f"bundled/{template}", str(override)))
    if not any_override:
        s.out.write(f"{args.model}: no operator override; the bundled templates are used\n")
    return EXIT_OK


def cmd_templates_restore(s: Session, args) -> int:
    removed = []
    for template in _model_templates(s, args.model):
        if not (bundled_templates_dir() / template).is_file():
            continue  # an operator-only template: nothing to restore it to
        for override in _overrides(s, template):
            try:
                override.unlink()
            except OSError as exc:
                raise CommandError(f"cannot remove {override}: {exc.strerror}") from None
            removed.append(override)
    for path in removed:
        s.out.write(f"removed {path}\n")
    if not removed:
        s.out.write(f"{args.model}: no operator override to remove\n")
    return EXIT_OK


def cmd_zoiper_provision_file(s: Session, args) -> int:
    from zprovd.provisioning_file import provision_file

    sys.stdout.buffer.write(provision_file(s.config, s.renderer(), args.auth, args.user or ""))
    return EXIT_OK


def cmd_dhcp_leases(s: Session, args) -> int:
    from zprovd.dhcp.cli import show_leases

    return show_leases(s.config.extra["dhcp"], s.config.state_dir, s.out)


def cmd_dhcp_probe(s: Session, args) -> int:
    from zprovd.dhcp.cli import probe

    return probe(args.interface, args.timeout, s.out)


# -- argument parsing -------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zprovd", description="Provisioning server for VoIP phones.")
    p.add_argument("-c", "--config", type=Path, help="configuration file (default $ZPROVD_CONFIG, then /etc/zprovd/zprovd.toml)")
    p.add_argument("--version", action="version", version=f"zprovd {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(parent, name: str, handler: Callable, help: str):
        c = parent.add_parser(name, help=help, description=help)
        c.set_defaults(handler=handler)
        return c

    command(sub, "run", cmd_run, "run the daemon in the foreground")
    command(sub, "check", cmd_check, "validate the configuration, templates and backend")

    users = sub.add_parser("user", help="manage users").add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command(users, "add", cmd_user_add, "add a user (login, provisioning password and first SIP account)")
    c.add_argument("login")
    c.add_argument("--password", required=True, help="provisioning password (stored hashed); - reads it from standard input")
    c.add_argument("--display-name")
    c.add_argument("--sip-user", help="default: the login")
    c.add_argument("--sip-auth-user", help="default: the SIP user")
    c.add_argument("--sip-password", help="default: the provisioning password; - reads it from standard input")
    c.add_argument("--sip-domain", help="default: [provisioning] server")
    c.add_argument("--var", action="append", metavar="KEY=VALUE", help="template variable (repeatable)")
    c.add_argument("--replace", action="store_true", help="overwrite an existing user")
    c = command(users, "add-account", cmd_user_add_account, "add another SIP account to a user")
    c.add_argument("login")
    c.add_argument("--sip-user", required=True)
    c.add_argument("--sip-password", required=True, help="- reads it from standard input")
    c.add_argument("--sip-auth-user")
    c.add_argument("--sip-domain")
    c.add_argument("--display-name")
    c = command(users, "remove-account", cmd_user_remove_account, "remove one SIP account of a user (the others move up)")
    c.add_argument("login")
    c.add_argument("--account", type=int, required=True, metavar="N", help="the account's number, as `user show` lists them")
    c = command(users, "edit", cmd_user_edit, "change a user: only what the options give (accounts, vars and devices stay)")
    c.add_argument("login")
    c.add_argument("--password", help="new provisioning password; - reads it from standard input")
    c.add_argument("--display-name", help="the user's (and that of the accounts showing it); with --account, that account's")
    c.add_argument("--account", type=int, metavar="N", help="the SIP account the --sip-* options change (default 1)")
    c.add_argument("--sip-user")
    c.add_argument("--sip-auth-user", help="empty: the SIP user")
    c.add_argument("--sip-password", help="- reads it from standard input")
    c.add_argument("--sip-domain")
    c.add_argument("--var", action="append", metavar="KEY=VALUE", help="set a template variable (repeatable)")
    c.add_argument("--unset-var", action="append", metavar="KEY", help="remove a template variable (repeatable)")
    command(users, "list", cmd_user_list, "list users")
    command(users, "show", cmd_user_show, "show one user").add_argument("login")
    command(users, "remove", cmd_user_remove, "remove a user").add_argument("login")

    devices = sub.add_parser("device", help="manage desk phones").add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command(devices, "add", cmd_device_add, "add a desk phone")
    c.add_argument("mac", help="in any usual spelling")
    c.add_argument("--model", required=True, help="a model id from `zprovd models`")
    c.add_argument("--user", action="append", metavar="LOGIN", help="the user of line 1, 2, ... (repeatable)")
    c.add_argument("--var", action="append", metavar="KEY=VALUE", help="template variable (repeatable)")
    c.add_argument("--http-user", help="HTTP Basic/Digest user this phone must send ([access.per_mac] auth)")
    c.add_argument("--http-password", help="its password (stored as Digest HA1 values, not in clear); - reads it from standard input")
    c.add_argument("--url-key", help="serve this phone's files only under /<key>/")
    c.add_argument("--replace", action="store_true", help="overwrite an existing device")
    c = command(devices, "edit", cmd_device_edit, "change a desk phone: only what the options give")
    c.add_argument("mac", help="in any usual spelling")
    c.add_argument("--model", help="a model id from `zprovd models`")
    c.add_argument("--user", action="append", metavar="LOGIN", help="the users of its lines, in order, replacing the old ones (repeatable)")
    c.add_argument("--no-user", action="store_true", help="no user on any line")
    c.add_argument("--var", action="append", metavar="KEY=VALUE", help="set a template variable (repeatable)")
    c.add_argument("--unset-var", action="append", metavar="KEY", help="remove a template variable (repeatable)")
    c.add_argument("--http-user", help="new HTTP Basic/Digest user ([access.per_mac] auth)")
    c.add_argument("--http-password", help="its password; - reads it from standard input")
    c.add_argument("--no-http-auth", action="store_true", help="remove the phone's own HTTP credentials")
    c.add_argument("--url-key", help="new URL key: serve this phone's files only under /<key>/")
    c.add_argument("--no-url-key", action="store_true", help="remove the phone's own URL key")
    command(devices, "list", cmd_device_list, "list desk phones")
    command(devices, "show", cmd_device_show, "show one desk phone").add_argument("mac")
    command(devices, "remove", cmd_device_remove, "remove a desk phone").add_argument("mac")
    command(devices, "seen", cmd_device_seen, "phones that asked for a configuration but are not configured")
    c = command(devices, "forget", cmd_device_forget, "remove phones from the `device seen` list")
    c.add_argument("macs", nargs="*", metavar="MAC", help="in any usual spelling")
    c.add_argument("--all", action="store_true", help="forget every phone in the list")

    command(sub, "import", cmd_import, "import users and devices from a CSV file (all or nothing)").add_argument("file")

    c = command(sub, "backup", cmd_backup, "write a consistent copy of the users and devices to a file (the daemon may run)")
    c.add_argument("file", type=Path)

    c = command(sub, "render", cmd_render, "print exactly what the daemon would serve")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", metavar="LOGIN", help="the Zoiper document of a user")
    who.add_argument("--mac", help="a desk phone's per-MAC file")
    c.add_argument("--file", help="with --mac: the file name the phone asks for")
    c.add_argument("--version", help="with --user: the Zoiper version (default: the newest document)")

    command(sub, "models", cmd_models, "list the model catalogue")

    templates = sub.add_parser("templates", help="inspect and restore templates").add_subparsers(dest="action", required=True, metavar="ACTION")
    command(templates, "list", cmd_templates_list, "which template file wins for each model")
    command(templates, "diff", cmd_templates_diff, "an operator override against the bundled default").add_argument("model")
    command(templates, "restore", cmd_templates_restore, "remove the operator overrides of a model's templates").add_argument("model")

    zoiper = sub.add_parser("zoiper", help="Zoiper helpers").add_subparsers(dest="action", required=True, metavar="ACTION")
    c = command(zoiper, "provision-file", cmd_zoiper_provision_file, "print a Zoiper 3 Provision.xml pointing at this server")
    c.add_argument("--auth", choices=["url", "basic"], default="url")
    c.add_argument("--user", metavar="LOGIN", help="preset login (no prompt)")

    dhcp = sub.add_parser("dhcp", help="DHCP helper").add_subparsers(dest="action", required=True, metavar="ACTION")
    command(dhcp, "leases", cmd_dhcp_leases, "list DHCP leases")
    c = command(dhcp, "probe", cmd_dhcp_probe, "report DHCP servers answering on a link")
    c.add_argument("--interface", required=True)
    c.add_argument("--timeout", type=float, default=3.0)
    return p


def main(argv: list[str] | None = None, out: TextIO | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    path = args.config or default_config_path()
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    session = Session(config, out)
    try:
        _refuse_control_characters(args)
        return args.handler(session, args)
    except CommandError as exc:
        print(f"zprovd: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except BackendError as exc:
        print(f"zprovd: backend {config.backend.type}: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except BrokenPipeError:
        # The reader went away (`zprovd user list | head`): stop quietly, and
        # let nothing try to flush to the closed pipe at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAIL
    finally:
        if args.handler is not cmd_run:
            try:
                session.close()
            except Exception:
                pass
