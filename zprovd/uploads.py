"""Phone log uploads: which names are taken, and writing one safely.

Polycom phones upload ``<mac>-boot.log`` and ``<mac>-app.log`` to their
provisioning server: TFTP write requests (``zprovd.tftp.service``) and HTTP
PUT (``zprovd.web``) are stored the same way, into ``[tftp] upload_dir``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from zprovd.tftp.source import safe_relative_name

__all__ = ["UploadWriter", "upload_name"]

_UPLOAD_NAME = re.compile(r"([0-9a-fA-F]{12})-(boot|app)\.log")


def upload_name(name: str) -> str | None:
    """The file name to store an upload under, or None if it is not accepted.

    Only Polycom log uploads are accepted: ``<12 hex digits>-boot.log`` and
    ``<12 hex digits>-app.log`` as a plain file name (one leading ``/`` is
    tolerated, no folders).  The MAC is lower-cased.
    """
    relative = safe_relative_name(name)
    if relative is None or "/" in relative:
        return None
    match = _UPLOAD_NAME.fullmatch(relative)
    if match is None:
        return None
    return f"{match.group(1).lower()}-{match.group(2)}.log"


class UploadWriter:
    """Writes an upload to a temporary file in ``directory``, renamed on commit.

    ``filename`` must be a plain name (no separators); the final file is
    always directly inside the real path of ``directory``.  A symlink already
    sitting at the final name is replaced, never followed.
    """

    def __init__(self, directory: str | os.PathLike[str], filename: str):
        if not filename or "/" in filename or "\\" in filename or filename in (".", ".."):
            raise ValueError(f"not a plain file name: {filename!r}")
        self.directory = Path(os.path.realpath(directory))
        self.final_path = self.directory / filename
        fd, tmp = tempfile.mkstemp(prefix=".upload-", suffix=".part", dir=self.directory)
        self.temp_path = Path(tmp)
        self._file = os.fdopen(fd, "wb")
        self.size = 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.size += len(data)

    def commit(self) -> None:
        self._file.close()
        self.closed = True
        try:
            os.chmod(self.temp_path, 0o644)
            os.replace(self.temp_path, self.final_path)
        except BaseException:
            self._remove_temp()
            raise

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            try:
                self._file.close()
            except OSError:
                pass
        self._remove_temp()

    def _remove_temp(self) -> None:
        try:
            os.unlink(self.temp_path)
        except FileNotFoundError:
            pass
