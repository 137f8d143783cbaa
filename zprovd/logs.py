"""Logging to stderr, as text or JSON lines (journald adds the rest)."""

from __future__ import annotations

import json
import sys
import time
from typing import IO

from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    globalLogBeginner,
)


def _text_observer(stream: IO[str]):
    def observe(event: dict) -> None:
        # One event, one line: a line break in a logged value (a TFTP file
        # name, a login) must not forge a line that fail2ban would read.
        text = formatEvent(event).replace("\r", "\\r").replace("\n", "\\n")
        failure = event.get("log_failure")
        if failure is not None:
            text += "\n" + failure.getTraceback()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(event.get("log_time", time.time())))
        level = event.get("log_level", LogLevel.info).name
        namespace = event.get("log_namespace", "-")
        stream.write(f"{stamp} {level:<5} [{namespace}] {text}\n")
        stream.flush()

    return observe


def _json_observer(stream: IO[str]):
    def observe(event: dict) -> None:
        record = {
            "time": event.get("log_time"),
            "level": event.get("log_level", LogLevel.info).name,
            "namespace": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        stream.write(json.dumps(record, default=str) + "\n")
        stream.flush()

    return observe


def start_logging(format: str = "text", level: LogLevel = LogLevel.info, stream: IO[str] | None = None) -> None:
    stream = stream or sys.stderr
    observer = _json_observer(stream) if format == "json" else _text_observer(stream)
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    # Twisted's own chatter ("Site starting on 80", "Main loop terminated")
    # says nothing an operator needs; its warnings and errors still show.
    for namespace in ("log_legacy", "twisted"):
        predicate.setLogLevelForNamespace(namespace, max(level, LogLevel.warn))
    globalLogBeginner.beginLoggingTo([FilteringLogObserver(observer, [predicate])], redirectStandardIO=False)
