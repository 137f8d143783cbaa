"""The static firmware folder (``[tftp] firmware_dir``), served over TFTP and HTTP."""

from __future__ import annotations

from pathlib import Path


class FirmwareFolder:
    """Finds files of one folder by safe relative name; never leaves the folder.

    Names come already cleaned by ``zprovd.routing.split_path`` (no ``..``,
    no NUL, ``\\`` turned into ``/``); this adds the symlink rule: a file must
    resolve inside the folder.
    """

    def __init__(self, root: Path):
        self.root = Path(root).resolve()

    def lookup(self, name: str) -> str | None:
        if not name or name.startswith("/"):
            return None
        try:
            candidate = (self.root / name).resolve()
            candidate.relative_to(self.root)
            return name if candidate.is_file() else None
        except ValueError:
            return None  # a symlink pointing outside the folder
        except OSError:
            return None  # a name the file system cannot hold (too long, ...)

    def path(self, name: str) -> Path:
        return self.root / name
