"""Command-line helpers behind ``zprovd dhcp leases`` and ``zprovd dhcp probe``.

Both write everything (results and errors) to ``out`` and return the exit
status; the main CLI parses arguments and calls them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TextIO

from zprovd.dhcp.config import DHCPConfig
from zprovd.dhcp.leases import BOUND, LEASE_FILE_NAME, OFFERED, LeaseFileError, read_lease_file
from zprovd.mac import format_mac

MAX_PROBE_TIMEOUT = 60.0


def _dhcp_config(config: Any) -> DHCPConfig | None:
    """Accept the whole ``zprovd.config.Config`` or its ``DHCPConfig``."""
    if isinstance(config, DHCPConfig):
        return config
    extra = getattr(config, "extra", None)
    if isinstance(extra, dict) and isinstance(extra.get("dhcp"), DHCPConfig):
        return extra["dhcp"]
    return None


def _printable(text: str) -> str:
    """Client-supplied text, without control characters that could mess up a terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _format_time(when: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))


def show_leases(config: Any, state_dir: Path, out: TextIO) -> int:
    """Print the lease table of ``state_dir``; 0 on success, 2 if the file is unreadable."""
    path = Path(state_dir) / LEASE_FILE_NAME
    try:
        leases, skipped = read_lease_file(path)
    except LeaseFileError as exc:
        print(f"error: {exc}", file=out)
        return 2
    dhcp = _dhcp_config(config)
    if dhcp is not None and dhcp.mode != "server":
        print(f"note: [dhcp] mode is {dhcp.mode!r}; only server mode gives leases", file=out)
    for reason in skipped:
        print(f"warning: {path}: skipped {reason}", file=out)
    if not leases:
        print(f"no DHCP leases in {path}", file=out)
        return 0
    now = time.time()
    rows = [("MAC", "IP", "STATE", "EXPIRES", "HOSTNAME", "VENDOR CLASS")]
    for lease in sorted(leases, key=lambda l: l.ip):
        state = lease.state
        if state in (BOUND, OFFERED) and lease.expires <= now:
            state = "expired"
        rows.append((
            format_mac(lease.mac, "colon") if lease.mac else "-",
            str(lease.ip),
            state,
            _format_time(lease.expires),
            _printable(lease.hostname) or "-",
            _printable(lease.vendor_class) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip(), file=out)
    return 0


def probe(interface: str, timeout: float, out: TextIO) -> int:
    """Look for DHCP servers on ``interface``: 0 none answered, 1 some did, 2 error."""
    if not interface:
        print("error: name the interface to probe", file=out)
        return 2
    if not 0 < timeout <= MAX_PROBE_TIMEOUT:
        print(f"error: the timeout must be between 0 and {MAX_PROBE_TIMEOUT:g} seconds", file=out)
        return 2
    from zprovd.dhcp.service import probe_servers  # imports Twisted: only when probing

    try:
        answers = probe_servers(interface, timeout)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print(f"error: cannot probe {interface}: {reason} (this needs root, and port 68 free)", file=out)
        return 2
    if not answers:
        print(f"no DHCP server answered on {interface} within {timeout:g} s", file=out)
        return 0
    for answer in answers:
        print(f"DHCP server {answer.describe()}", file=out)
    return 1
