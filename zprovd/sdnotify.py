"""systemd's notification protocol (sd_notify), without libsystemd.

Messages are datagrams on the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(a leading ``@`` means the abstract namespace).  Outside systemd the
variable is unset and every call does nothing.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None):
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_usec = env.get("WATCHDOG_USEC", "")
        watchdog_pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if watchdog_usec.isdigit() and int(watchdog_usec) > 0 and watchdog_pid in ("", str(os.getpid())):
            # Ping at half the timeout, as sd_watchdog_enabled(3) advises.
            self.watchdog_interval = int(watchdog_usec) / 1e6 / 2

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines (``notify(READY="1", STATUS="...")``)."""
        if not self.address:
            return False
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=status, MAINPID=str(os.getpid()))

    def reloading(self) -> bool:
        return self.notify(RELOADING="1")

    def status(self, status: str) -> bool:
        return self.notify(READY="1", STATUS=status)

    def stopping(self) -> bool:
        return self.notify(STOPPING="1", STATUS="stopping")

    def watchdog(self) -> bool:
        return self.notify(WATCHDOG="1")
