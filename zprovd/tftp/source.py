"""Where the TFTP server gets its files from.

The server asks a *source* for every read request::

    source(name: str, client: tuple[str, int]) -> Deferred[Reader | None]

* ``name`` is the file name exactly as the client sent it (decoded as UTF-8);
  sources must check it themselves, :func:`safe_relative_name` does the usual
  checks.  ``client`` is the client's (host, port).
* The Deferred fires with a :class:`Reader`, or with ``None`` for "file not
  found" (TFTP ERROR 1).
* It fails with :class:`AccessDenied` for "access violation" (ERROR 2), and
  with :class:`SourceError` for a failure the source has already reported
  (a backend down, a template error): ERROR 0 with its message, and a debug
  line.  Any other failure becomes ERROR 0 "internal error" for the client
  and is logged once by the server with its traceback (the client never sees
  the exception text).
* If the Deferred is cancelled (server shutdown) the source should release
  what it holds.

A :class:`Reader` has ``size`` (the exact byte count of the *octet* content;
the server reports it as ``tsize``), ``read(n)`` returning up to ``n`` bytes
and ``b""`` at the end, and ``close()``.  The server calls ``close()`` exactly
once when the transfer ends in any way (including when it turns the reader
down because the server is stopping).  ``read`` is called from the reactor
thread and should be quick (local files, memory).

netascii: the server converts on the fly (LF -> CR LF, CR -> CR NUL) and does
*not* answer ``tsize`` for netascii transfers, because the converted size is
not known without reading the whole file first.  Phones use octet mode.

Implementations here: :class:`BytesReader` (rendered configs held in memory),
:class:`FileReader` (a file read in chunks on demand) and
:class:`DirectorySource` (serves a folder safely).
"""

from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import Protocol, runtime_checkable

from twisted.internet import defer

__all__ = [
    "AccessDenied",
    "SourceError",
    "Reader",
    "Source",
    "BytesReader",
    "FileReader",
    "DirectorySource",
    "safe_relative_name",
]


class AccessDenied(Exception):
    """The client may not read this file (TFTP ERROR 2, access violation)."""


class SourceError(Exception):
    """The source cannot answer and has logged why: TFTP ERROR 0 with this message."""


@runtime_checkable
class Reader(Protocol):
    """The content of one file, read sequentially once."""

    size: int

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (``n`` > 0); ``b""`` only at the end."""
        ...

    def close(self) -> None:
        """Release resources; called once, reads stop after it."""
        ...


class Source(Protocol):
    """Finds the file for a read request; see the module docstring."""

    def __call__(self, name: str, client: tuple[str, int]) -> defer.Deferred[Reader | None]: ...


class BytesReader:
    """A reader over bytes held in memory (e.g. a rendered configuration)."""

    def __init__(self, data: bytes):
        self._data = memoryview(bytes(data))
        self._pos = 0
        self.size = len(self._data)
        self.closed = False

    def read(self, n: int) -> bytes:
        if self.closed:
            raise ValueError("read from a closed reader")
        chunk = self._data[self._pos : self._pos + max(0, n)]
        self._pos += len(chunk)
        return bytes(chunk)

    def close(self) -> None:
        self.closed = True


class FileReader:
    """A reader over a regular file, read in chunks as the transfer needs them.

    ``size`` is taken when the file is opened and the reader never returns
    more than that many bytes, so ``tsize`` stays true even if the file grows.
    """

    def __init__(self, path: str | os.PathLike[str]):
        # O_NONBLOCK so that opening a FIFO cannot hang the reactor; it has no
        # effect on regular files, and anything else is refused below.
        flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
        fd = os.open(path, flags)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, "not a regular file", str(path))
            os.set_blocking(fd, True)
            self._file = os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise
        self.size = st.st_size
        self._remaining = st.st_size
        self.closed = False

    def read(self, n: int) -> bytes:
        if self.closed:
            raise ValueError("read from a closed reader")
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        chunk = self._file.read(n)
        self._remaining -= len(chunk)
        if not chunk:
            self._remaining = 0
        return chunk

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._file.close()


_DRIVE = re.compile(r"[A-Za-z]:")


def safe_relative_name(name: str) -> str | None:
    """A request name made safe to join below a root folder, or None.

    Windows ``\\`` separators become ``/``; one leading ``/`` is stripped
    (phones often ask for ``/000000000000.cfg``); empty and ``.`` components
    are dropped.  Refused (None): NUL or other control characters, ``..``
    components, names still absolute after that (``//x``), Windows drive
    names (``C:/x``), and names that are empty after normalisation.

    The result uses ``/`` separators and never starts with ``/``.  It does not
    protect against symlinks: callers must check the resolved path (see
    :class:`DirectorySource`).
    """
    if not isinstance(name, str) or not name:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return None
    name = name.replace("\\", "/")
    if name.startswith("/"):
        name = name[1:]
    if name.startswith("/") or _DRIVE.match(name):
        return None
    parts = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            return None
        parts.append(part)
    if not parts:
        return None
    return "/".join(parts)


class DirectorySource:
    """Serves the regular files below ``root``.

    Unsafe names (see :func:`safe_relative_name`) and names whose resolved
    path (following symlinks) leaves the root are refused with
    :class:`AccessDenied`; missing files and non-regular files (folders,
    devices) are "not found"; unreadable files are :class:`AccessDenied`.
    """

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(os.path.realpath(root))

    def resolve(self, name: str) -> Path:
        """The real path for ``name``; raise AccessDenied if it is not allowed."""
        relative = safe_relative_name(name)
        if relative is None:
            raise AccessDenied(f"unsafe file name {name!r}")
        real = Path(os.path.realpath(self.root / relative))
        if real != self.root and self.root not in real.parents:
            raise AccessDenied(f"{name!r} resolves outside the served folder")
        return real

    def open(self, name: str) -> FileReader | None:
        """Synchronous lookup; see the class docstring."""
        real = self.resolve(name)
        try:
            return FileReader(real)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except PermissionError:
            raise AccessDenied(f"{name!r} is not readable") from None

    def __call__(self, name: str, client: tuple[str, int]) -> defer.Deferred[Reader | None]:
        try:
            return defer.succeed(self.open(name))
        except Exception:
            return defer.fail()
