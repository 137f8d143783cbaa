"""Dropping root after the ports are bound (``zprovd run`` started as root by hand).

Under systemd the unit starts zprovd as its own user with
CAP_NET_BIND_SERVICE instead, and ``[server] user`` stays empty.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path


class PrivilegeError(Exception):
    """The user or group cannot be switched to; one line for the operator."""


def user_and_group(user: str, group: str) -> tuple[int, int]:
    """The uid of ``user`` and the gid of ``group`` (or of the user's primary group)."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise PrivilegeError(f"[server] user: no such user {user!r}") from None
    if not group:
        return entry.pw_uid, entry.pw_gid
    try:
        return entry.pw_uid, grp.getgrnam(group).gr_gid
    except KeyError:
        raise PrivilegeError(f"[server] group: no such group {group!r}") from None


def drop_privileges(user: str, group: str, state_dir: Path) -> None:
    """Hand state_dir to ``user`` and switch to it (and ``group``, or its primary group)."""
    uid, gid = user_and_group(user, group)
    try:
        for folder, _, files in os.walk(state_dir):
            os.chown(folder, uid, gid)
            for name in files:
                os.chown(os.path.join(folder, name), uid, gid)
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)
    except OSError as exc:
        raise PrivilegeError(f"cannot switch to user {user}: {exc.strerror}") from None
