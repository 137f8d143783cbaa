"""What TFTP serves: the provisioning pipeline, seen as TFTP readers.

The same ``Provisioner`` answers HTTP and TFTP, so a file is byte-identical
on both.  404 becomes TFTP "file not found", 400 (a path escaping the
folder, NUL, ...) "access violation", anything else an error whose message
is the reason (the provisioner has logged why).
"""

from __future__ import annotations

from typing import Callable
from urllib.parse import quote

from twisted.internet.defer import Deferred, maybeDeferred

from zprovd import logs
from zprovd.metrics import Metrics
from zprovd.provisioning import Provisioner, Response, Upload, hide_segments
from zprovd.routing import Request
from zprovd.tftp.source import AccessDenied, BytesReader, FileReader, SourceError


class ProvisioningSource:
    def __init__(self, provisioner: Callable[[], Provisioner], metrics: Metrics | None = None):
        self.provisioner = provisioner
        self.metrics = metrics

    def __call__(self, name: str, client: tuple[str, int]) -> Deferred:
        request = Request(protocol="tftp", path=name, client=client[0])
        d = self.provisioner().handle(request)
        d.addCallback(self._reader, name, client[0])
        return d

    def accept_upload(self, name: str, client: tuple[str, int]) -> Deferred:
        """A write request: the name to store it under, or None (access
        violation).  The same decision as an HTTP PUT (``Provisioner.upload``)."""
        d = maybeDeferred(self.provisioner().upload, Request(protocol="tftp", path=name, client=client[0]))
        return d.addCallback(self._upload_decided, name, client[0])

    def _upload_decided(self, answer: Response | Upload, name: str, client: str) -> str | None:
        if isinstance(answer, Response):
            self._access("WRQ", name, client, answer.status, answer.who, answer.reason)
            return None
        self._access("WRQ", name, client, 200, answer.mac, "upload")
        return answer.name

    def _access(self, kind: str, name: str, client: str, status: int, who: str, reason: str) -> None:
        """The access line of one RRQ or WRQ (URL keys hidden, as over HTTP)."""
        logs.access(f'tftp {client} "{kind} {quote(self.shown_name(name), safe="/@.:-_+*")}" {status} - - '
                    f'who={quote(who, safe="@.:-_+")} "{reason or "-"}"')

    def shown_name(self, name: str) -> str:
        """The file name as log lines show it: URL keys hidden (``hide_segments``)."""
        hidden = self.provisioner().secret_segments
        return hide_segments(name, hidden, percent_encoded=False) if hidden else name

    def _reader(self, response: Response, name: str, client: str):
        self._access("RRQ", name, client, response.status, response.who, response.reason)
        if self.metrics is not None:
            self.metrics.answered("tftp", response.status, len(response.body))
        if response.status == 200:
            return FileReader(response.file) if response.file is not None else BytesReader(response.body)
        if response.status == 404:
            return None
        if response.status in (400, 401, 403):
            raise AccessDenied(response.reason or "access violation")
        raise SourceError(response.reason or f"status {response.status}")
