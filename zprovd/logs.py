"""Logging to stderr, as text or JSON lines (journald adds the rest).

Every line goes through one ``LineWriter``.  Outside the daemon it writes
each line at once.  In the daemon (``buffer_lines``) info lines are
gathered and written every ``FLUSH_SECONDS`` or ``FLUSH_BYTES``, whichever
comes first, and at exit; a warning or an error writes everything waiting,
then itself, at once, so the order of lines is kept.

``access(text)`` writes one access-log line (namespace ``zprovd.access``,
level info) directly, without twisted.logger's per-event work: formatting
an event costs more than answering a request from the document cache.
"""

from __future__ import annotations

import atexit
import json
import re
import sys
import time
from typing import IO, Any

from twisted.internet import task
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    Logger,
    formatEvent,
    globalLogBeginner,
)

FLUSH_SECONDS = 0.2
FLUSH_BYTES = 64 * 1024
ACCESS_NAMESPACE = "zprovd.access"


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 controls (U+009B starts a terminal escape sequence too) and the
Unicode line separators, written as escapes; tab stays."""


def _one_line(text: str) -> str:
    # One event, one line: a line break in a logged value (a TFTP file name,
    # a login) must not forge a line that fail2ban would read, and no other
    # control character (NUL, an escape sequence) reaches a terminal or
    # makes journald store the line as a blob.
    text = text.replace("\r", "\\r").replace("\n", "\\n")
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text) if _CONTROL.search(text) else text


class LineWriter:
    def __init__(self, stream: IO[str], format: str):
        self.stream = stream
        self.json = format == "json"
        self.buffering = False
        self._pending: list[str] = []
        self._pending_size = 0
        self._second = -1
        self._stamp = ""

    def line(self, when: float, level: LogLevel, namespace: str, text: str, traceback: str | None = None) -> None:
        if self.json:
            record: dict[str, Any] = {"time": when, "level": level.name, "namespace": namespace, "message": text}
            if traceback is not None:
                record["traceback"] = traceback
            out = json.dumps(record, default=str) + "\n"
        else:
            second = int(when)
            if second != self._second:
                self._second = second
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(second))
            out = f"{self._stamp} {level.name:<5} [{namespace}] {_one_line(text)}\n"
            if traceback is not None:
                out += traceback.rstrip("\n") + "\n"
        if self.buffering and level < LogLevel.warn:
            self._pending.append(out)
            self._pending_size += len(out)
            if self._pending_size >= FLUSH_BYTES:
                self.flush()
            return
        self._pending.append(out)
        self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # stderr gone (closed pipe): nothing to tell it
            pass


_writer: LineWriter | None = None
_predicate: LogLevelFilterPredicate | None = None
_access_enabled = True
_access_logger = Logger(namespace=ACCESS_NAMESPACE)


def _observer(writer: LineWriter):
    def observe(event: dict) -> None:
        failure = event.get("log_failure")
        writer.line(
            event.get("log_time") or time.time(),
            event.get("log_level", LogLevel.info),
            event.get("log_namespace", "-"),
            formatEvent(event),
            failure.getTraceback() if failure is not None else None,
        )

    return observe


def start_logging(format: str = "text", level: LogLevel = LogLevel.info, stream: IO[str] | None = None) -> None:
    global _writer, _predicate
    _writer = LineWriter(stream or sys.stderr, format)
    _predicate = LogLevelFilterPredicate()
    configure(format, level)
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(_observer(_writer), [_predicate])], redirectStandardIO=False)


def configure(format: str, level: LogLevel) -> None:
    """Set the format and the lowest level written (at start, and on a reload)."""
    global _access_enabled
    _access_enabled = level <= LogLevel.info
    if _writer is not None:
        _writer.json = format == "json"
    if _predicate is not None:
        _predicate.setLogLevelForNamespace("", level)
        # Twisted's own chatter ("Site starting on 80", "Main loop terminated")
        # says nothing an operator needs; its warnings and errors still show.
        for namespace in ("log_legacy", "twisted"):
            _predicate.setLogLevelForNamespace(namespace, max(level, LogLevel.warn))


def buffer_lines(reactor: Any) -> task.LoopingCall | None:
    """From now on gather info lines and write them every FLUSH_SECONDS (the daemon)."""
    writer = _writer
    if writer is None:
        return None
    writer.buffering = True
    atexit.register(writer.flush)
    reactor.addSystemEventTrigger("after", "shutdown", writer.flush)
    flusher = task.LoopingCall(writer.flush)
    flusher.clock = reactor
    flusher.start(FLUSH_SECONDS, now=False)
    return flusher


def access(text: str) -> None:
    """One access-log line (already free of secrets)."""
    writer = _writer
    if writer is None:  # logging not started here (library use, tests): the usual way
        _access_logger.info("{line}", line=text)
    elif _access_enabled:
        writer.line(time.time(), LogLevel.info, ACCESS_NAMESPACE, text)
