"""The event loop ``zprovd run`` installs: Twisted's epoll reactor, minus a per-event log context.

Twisted's epoll reactor wraps every readiness event in ``callWithLogger``,
which copies a dict and pushes it on a thread-local context stack so that a
legacy ``twisted.python.log`` message sent from inside the callback carries
the descriptor's ``logPrefix`` as its "system".  zprovd's log lines never
show that field (``zprovd.logs`` formats its own), and the wrapping costs
about 2 us per event: in a lockstep TFTP transfer, where one event is one
block, that was a tenth of the time of a block on loopback (see
``bench/results/FINDINGS.md``).

:class:`LeanEPollReactor` dispatches each event straight to the reactor's
own ``_doReadOrWrite``, which already logs an exception from ``doRead`` or
``doWrite`` and disconnects the descriptor, exactly as before; only the
"system" of such a log event is lost.  The loop body overrides a private
method of Twisted (``doPoll``, with ``_poller`` and ``_selectables``), so
:func:`install` checks that those still exist and falls back to Twisted's
own reactor when they do not: a Twisted release that renames them costs
speed, never correctness.
"""

from __future__ import annotations

import errno
import sys
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.logger import Logger

_log = Logger()


class LeanEPollReactor(EPollReactor):
    """``EPollReactor`` whose events go to their descriptor without ``callWithLogger``."""

    def doPoll(self, timeout: float | None) -> None:
        if timeout is None:
            timeout = -1  # wait until something happens
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        dispatch = self._doReadOrWrite
        selectable_of = self._selectables.get
        for fd, event in events:
            selectable = selectable_of(fd)
            if selectable is None:  # removed by an earlier event of this turn
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:  # as callWithLogger: Ctrl-C still stops the process
                raise
            except BaseException:  # _doReadOrWrite catches its callbacks' errors; this is its own
                _log.failure("event dispatch failed for {selectable!r}", selectable=selectable)

    doIteration = doPoll


def lean_dispatch_available() -> bool:
    """Whether this Twisted still has the private pieces ``LeanEPollReactor.doPoll`` uses."""
    names = EPollReactor.__init__.__code__.co_names  # the attributes its constructor sets
    return callable(getattr(EPollReactor, "_doReadOrWrite", None)) and "_poller" in names and "_selectables" in names


def install() -> Any:
    """Install and return the reactor zprovd runs on (once per process).

    :class:`LeanEPollReactor` when this Twisted has what it needs, else
    Twisted's default reactor.  If a reactor is already installed (an
    embedding program, a test runner), that one is returned unchanged.
    """
    if "twisted.internet.reactor" not in sys.modules and lean_dispatch_available():
        from twisted.internet.main import installReactor

        installReactor(LeanEPollReactor())
    from twisted.internet import reactor

    return reactor
