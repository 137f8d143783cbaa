"""One TFTP transfer as a sans-I/O state machine.

Nothing here touches sockets, reactors or clocks.  A session is driven by
three calls, each given the current time ``now`` (seconds, any monotonic
origin) and each returning an :class:`Output`:

* ``start(now)``: the request was accepted; returns the first datagrams
  (OACK, the first DATA window, or ACK 0 for uploads).
* ``receive(datagram, now)``: a datagram arrived from the client's transfer ID
  (the I/O layer filters out other addresses and ports).
* ``timeout(now)``: the deadline of the last Output passed.  Calling it early
  is harmless (nothing happens and the same deadline comes back).

``Output.send`` lists datagrams to send to the client in order,
``Output.deadline`` is when to call ``timeout`` next (None once done),
``Output.done`` says the transfer is over, ``Output.error`` why, if it ended
badly (None on success).  Sessions close their reader (or commit/abort their
writer) themselves as they end; :meth:`ReadSession.abort` ends one early.

Behaviour (RFC 1350, 2347, 2348, 2349, 7440):

* Block numbers roll over from 65535 to 0.
* A duplicate ACK (the block before the first unacknowledged one) never
  causes a retransmission, so there is no Sorcerer's Apprentice bug.
* With windowsize W the session sends W blocks; an ACK for block k inside
  the window slides the window to k+1 and sends it (RFC 7440: an ACK before
  the window's end means the client missed k+1).  On timeout the window is
  resent from the first unacknowledged block.
* Retransmission timeout: the client's ``timeout`` option if it gave one,
  else adaptive: max(2 x SRTT, SRTT + 4 x RTTVAR) from RTT samples taken
  Karn-style (never from retransmitted blocks), bounded to
  [min_rto, max_rto], starting at ``initial_rto`` and doubling on each
  retransmission.  After ``retries`` retransmissions of the same window
  without progress the session gives up.
* Uploads (:class:`WriteSession`) use lock-step (windowsize is not
  negotiated for WRQ), and "dally" after the final ACK for one timeout so a
  lost final ACK can be answered again.
"""

from __future__ import annotations

import collections
import errno
import struct
from dataclasses import dataclass, field
from typing import Mapping, Protocol

from zprovd.tftp.packets import (
    MAX_BLOCK_PAYLOAD,
    Ack,
    Data,
    Error,
    ErrorCode,
    MalformedPacket,
    OptionAck,
    decode,
    parse_numeric_option,
)
from zprovd.tftp.source import Reader

__all__ = [
    "Limits",
    "Output",
    "Negotiation",
    "OptionError",
    "negotiate",
    "ReadSession",
    "WriteSession",
    "Writer",
    "NetasciiEncoder",
    "NetasciiDecoder",
    "SUPPORTED_MODES",
    "TIMER_SLACK",
]

SUPPORTED_MODES = ("octet", "netascii")
DEFAULT_BLKSIZE = 512
MIN_BLKSIZE = 8
MAX_BLKSIZE = MAX_BLOCK_PAYLOAD  # 65464
MIN_TIMEOUT = 1
MAX_TIMEOUT = 255
MAX_WINDOWSIZE = 65535

_DATA_HEADER = struct.Struct("!HH")
#: A timer firing this much before its deadline (float rounding) counts as due.
TIMER_SLACK = 1e-6


@dataclass(frozen=True)
class Limits:
    """Operator limits and timer tuning for sessions."""

    max_blksize: int = 1468
    max_windowsize: int = 64
    retries: int = 5
    upload_max_bytes: int = 1 << 20
    initial_rto: float = 1.0
    min_rto: float = 0.2
    max_rto: float = 5.0
    read_chunk: int = 16384
    """Bytes asked of a reader at once (rounded down to whole blocks, at
    least one block): one ``read`` serves many DATA packets.  Small enough
    that a thousand concurrent transfers hold only a few MiB of buffers."""


class Output:
    """What the I/O layer must do after a session call.

    (A plain class with slots rather than a dataclass: one is built for
    every datagram, so its constructor is kept cheap.)
    """

    __slots__ = ("send", "deadline", "done", "error")

    def __init__(
        self,
        send: list[bytes] | None = None,
        deadline: float | None = None,
        done: bool = False,
        error: str | None = None,
    ):
        self.send: list[bytes] = [] if send is None else send
        self.deadline = deadline
        self.done = done
        self.error = error

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Output):
            return NotImplemented
        return (self.send, self.deadline, self.done, self.error) == (other.send, other.deadline, other.done, other.error)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Output(send={self.send!r}, deadline={self.deadline!r}, done={self.done!r}, error={self.error!r})"


@dataclass(frozen=True)
class Negotiation:
    """The result of option negotiation.

    ``accepted`` holds the options to put in the OACK, in the client's order;
    if it is empty no OACK is sent.
    """

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: int | None = None
    tsize: int | None = None
    accepted: Mapping[str, str] = field(default_factory=dict)


class OptionError(ValueError):
    """A known option has a value that is not a number (answer with ERROR 8)."""


def negotiate(
    requested: Mapping[str, str],
    limits: Limits = Limits(),
    *,
    size: int | None = None,
    write: bool = False,
) -> Negotiation:
    """Decide which of the client's options to accept and with what values.

    ``requested`` maps lower-case option names to values (as decoded).
    ``size`` is the file size to report as ``tsize`` for reads (None: do not
    answer tsize); for writes (``write=True``) the client's tsize is echoed.

    * blksize: 8..65464; larger requests are clamped to ``limits.max_blksize``
      (and 65464); smaller ones are ignored.
    * timeout: 1..255 seconds, otherwise ignored.
    * tsize: see above; a read of an empty file does not answer tsize,
      because curl treats ``tsize 0`` in an OACK as an error.
    * windowsize: >= 1, clamped to ``limits.max_windowsize``; 0 is ignored;
      not negotiated for writes.
    * unknown options are ignored.

    Raise :class:`OptionError` if a known option's value is not a number.
    """
    blksize, windowsize, timeout, tsize = DEFAULT_BLKSIZE, 1, None, None
    accepted: dict[str, str] = {}
    for raw_name, value in requested.items():
        name = raw_name.lower()
        if name not in ("blksize", "timeout", "tsize", "windowsize"):
            continue
        number = parse_numeric_option(value)
        if number is None:
            raise OptionError(f"option {name} has a bad value {value[:32]!r}")
        if name == "blksize":
            if number < MIN_BLKSIZE:
                continue
            blksize = max(MIN_BLKSIZE, min(number, MAX_BLKSIZE, limits.max_blksize))
            accepted["blksize"] = str(blksize)
        elif name == "timeout":
            if not MIN_TIMEOUT <= number <= MAX_TIMEOUT:
                continue
            timeout = number
            accepted["timeout"] = str(timeout)
        elif name == "tsize":
            if write:
                tsize = number
            elif size:  # not None and not 0: curl rejects "tsize 0" in an OACK
                tsize = size
            else:
                continue
            accepted["tsize"] = str(tsize)
        elif name == "windowsize":
            if write or number < 1:
                continue
            windowsize = max(1, min(number, MAX_WINDOWSIZE, limits.max_windowsize))
            accepted["windowsize"] = str(windowsize)
    return Negotiation(blksize=blksize, windowsize=windowsize, timeout=timeout, tsize=tsize, accepted=accepted)


class _Rto:
    """Retransmission timeout: fixed (client's timeout option) or adaptive.

    ``value`` is the current timeout, recomputed whenever an input changes
    (it is read for every DATA packet sent).
    """

    __slots__ = ("limits", "fixed", "srtt", "rttvar", "backoff", "value", "_min", "_max")

    def __init__(self, limits: Limits, fixed: float | None):
        self.limits = limits
        self.fixed = fixed
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.backoff = 0
        self._min = limits.min_rto
        self._max = limits.max_rto
        self.value = 0.0
        self._update()

    def current(self) -> float:
        return self.value

    def _update(self) -> None:
        if self.fixed is not None:
            self.value = self.fixed
            return
        if self.srtt is None:
            base = self.limits.initial_rto
        else:
            base = max(2.0 * self.srtt, self.srtt + 4.0 * self.rttvar)
        base = min(max(base, self._min), self._max)
        self.value = min(base * (2**self.backoff), self._max)

    def sample(self, rtt: float) -> None:
        if rtt < 0.0:
            rtt = 0.0
        srtt = self.srtt
        if srtt is None:
            self.srtt = rtt
            self.rttvar = rtt / 2
        else:
            self.rttvar = rttvar = 0.75 * self.rttvar + 0.25 * (srtt - rtt if srtt > rtt else rtt - srtt)
            self.srtt = srtt = 0.875 * srtt + 0.125 * rtt
            if self.fixed is None and not self.backoff:
                # _update() inlined for the common case (one sample per ACK).
                base = srtt + 4.0 * rttvar
                if base < 2.0 * srtt:
                    base = 2.0 * srtt
                if base < self._min:
                    base = self._min
                if base > self._max:
                    base = self._max
                self.value = base
                return
        self._update()

    def progress(self) -> None:
        if self.backoff:
            self.backoff = 0
            self._update()

    def retransmitted(self) -> None:
        self.backoff = min(self.backoff + 1, 16)
        self._update()


class NetasciiEncoder:
    """Wraps a Reader, converting LF -> CR LF and CR -> CR NUL on the fly."""

    def __init__(self, reader: Reader):
        self._reader = reader
        self._buffer = b""
        self._eof = False

    def read(self, n: int) -> bytes:
        while len(self._buffer) < n and not self._eof:
            chunk = self._reader.read(max(n, 4096))
            if not chunk:
                self._eof = True
                break
            self._buffer += chunk.replace(b"\r", b"\r\x00").replace(b"\n", b"\r\n")
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        return out

    def close(self) -> None:
        self._reader.close()


class NetasciiDecoder:
    """Incremental netascii -> local text: CR LF -> LF, CR NUL -> CR.

    A CR followed by anything else is kept as is (lenient).
    """

    def __init__(self) -> None:
        self._pending_cr = False

    def feed(self, data: bytes) -> bytes:
        if self._pending_cr:
            data = b"\r" + data
            self._pending_cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._pending_cr = True
        return data.replace(b"\r\n", b"\n").replace(b"\r\x00", b"\r")

    def flush(self) -> bytes:
        if self._pending_cr:
            self._pending_cr = False
            return b"\r"
        return b""


def _error(code: int, message: str) -> bytes:
    return Error(code, message).encode()


class ReadSession:
    """Serves one read request (RRQ) from ``reader``.

    ``options`` are the client's options (lower-case names), ``mode`` is
    ``octet`` or ``netascii`` (case-insensitive).  The reader is closed when
    the session ends.

    The reader is asked for ``limits.read_chunk`` bytes at a time and the
    blocks are sliced out of that buffer, so a transfer costs one ``read``
    per chunk instead of one per block.  ``receive`` handles an ACK during
    the data phase (nearly every datagram of a transfer) without going
    through the general decoder.
    """

    def __init__(
        self,
        reader: Reader,
        options: Mapping[str, str] | None = None,
        mode: str = "octet",
        limits: Limits = Limits(),
    ):
        self.reader = reader
        self.options = dict(options or {})
        self.mode = mode.lower()
        self.limits = limits
        self.negotiation = Negotiation()
        self.done = False
        self.error: str | None = None
        self.bytes_sent = 0  # payload bytes acknowledged
        self.retransmissions = 0
        self._source: Reader | NetasciiEncoder = reader
        self._state = "new"
        self._rto = _Rto(limits, None)
        # The blocks sent and not yet acknowledged, oldest first, as
        # (datagram, time first sent); the first is block number _base.
        self._window: collections.deque[tuple[bytes, float]] = collections.deque()
        self._base = 1  # first unacknowledged absolute block
        self._next = 1  # next absolute block to read
        self._resent_upto = 0  # blocks up to this one were sent more than once (Karn)
        self._eof = False  # the final (short) block has been read
        self._last_block: int | None = None
        self._retries = limits.retries
        self._retries_left = limits.retries
        self._deadline: float | None = None
        self._blksize = DEFAULT_BLKSIZE
        self._windowsize = 1
        self._chunk = DEFAULT_BLKSIZE
        self._buffer = b""  # read ahead from the source; blocks are sliced from _position
        self._position = 0
        self._oack = b""
        self._oack_sent = 0.0
        self._oack_resent = False

    # -- public API ---------------------------------------------------------

    def start(self, now: float) -> Output:
        """Negotiate and send the OACK or the first window of DATA."""
        if self._state != "new":
            raise RuntimeError("session already started")
        if self.mode not in SUPPORTED_MODES:
            return self._finish(f"unsupported mode {self.mode!r}", _error(ErrorCode.ILLEGAL_OPERATION, "unsupported mode"))
        if self.mode == "netascii":
            self._source = NetasciiEncoder(self.reader)
        size = self.reader.size if self.mode == "octet" else None
        try:
            self.negotiation = negotiate(self.options, self.limits, size=size)
        except OptionError as e:
            return self._finish(str(e), _error(ErrorCode.OPTION_REFUSED, "bad option value"))
        blksize = self._blksize = self.negotiation.blksize
        self._windowsize = self.negotiation.windowsize
        self._chunk = max(blksize, self.limits.read_chunk // blksize * blksize)
        if self.negotiation.timeout is not None:
            self._rto = _Rto(self.limits, float(self.negotiation.timeout))
        if self.negotiation.accepted:
            self._state = "oack"
            self._oack = OptionAck(self.negotiation.accepted).encode()
            self._oack_sent = now
            return self._arm(now, [self._oack])
        self._state = "data"
        return self._send_window(now)

    def receive(self, datagram: bytes, now: float) -> Output:
        """Handle a datagram from the client's transfer ID."""
        # Fast path: an ACK (opcode 4, at least 4 bytes) during the data phase.
        if self._state == "data" and len(datagram) >= 4 and datagram[1] == 4 and datagram[0] == 0:
            return self._on_ack((datagram[2] << 8) | datagram[3], now)
        if self.done:
            return Output(done=True, error=self.error)
        try:
            packet = decode(datagram)
        except MalformedPacket:
            return self._idle()  # junk from the client's TID: ignore it
        if isinstance(packet, Error):
            quiet = self._state == "oack" and packet.code == ErrorCode.OPTION_REFUSED
            what = "client refused options" if quiet else "client sent ERROR"
            return self._finish(f"{what} {packet.code}: {packet.message[:100]}")
        if not isinstance(packet, Ack):
            return self._finish(
                f"unexpected {type(packet).__name__} during a read",
                _error(ErrorCode.ILLEGAL_OPERATION, "illegal operation"),
            )
        if self._state == "oack":
            if packet.block != 0:
                return self._idle()
            if not self._oack_resent:
                self._rto.sample(now - self._oack_sent)
            self._rto.progress()
            self._retries_left = self._retries
            self._state = "data"
            return self._send_window(now)
        if self._state != "data":
            return self._idle()
        return self._on_ack(packet.block, now)  # pragma: no cover - the fast path takes these

    def timeout(self, now: float) -> Output:
        """The deadline passed: retransmit, or give up after ``retries``."""
        if self.done:
            return Output(done=True, error=self.error)
        if self._deadline is None or now < self._deadline - TIMER_SLACK:
            return self._idle()
        if self._retries_left <= 0:
            return self._finish(f"timed out after {self.limits.retries} retransmissions")
        self._retries_left -= 1
        self.retransmissions += 1
        self._rto.retransmitted()
        if self._state == "oack":
            self._oack_resent = True
            return self._arm(now, [self._oack])
        self._resent_upto = self._next - 1
        return self._arm(now, [datagram for datagram, _ in self._window])

    def abort(self, reason: str, notify: bool = True) -> Output:
        """End the session now (e.g. server shutdown), optionally telling the client."""
        if self.done:
            return Output(done=True, error=self.error)
        return self._finish(reason, _error(ErrorCode.NOT_DEFINED, "transfer aborted") if notify else None)

    # -- internals ----------------------------------------------------------

    def _idle(self) -> Output:
        return Output(None, self._deadline)

    def _arm(self, now: float, send: list[bytes]) -> Output:
        self._deadline = deadline = now + self._rto.value
        return Output(send, deadline)

    def _finish(self, error: str | None, packet: bytes | None = None) -> Output:
        self.done = True
        self.error = error
        self._state = "done"
        self._deadline = None
        self._window.clear()
        self._buffer = b""
        try:
            self.reader.close()
        except Exception as e:  # a broken close must not break the I/O layer
            if error is None:
                self.error = f"closing the reader failed: {e!r}"
        return Output([packet] if packet else [], None, True, self.error)

    def _refill(self) -> bytes:
        """The next block's payload when the buffer holds less than a block.

        Reads ``_chunk`` bytes at a time until there is a whole block or the
        source is exhausted (a short payload then: the final block).
        """
        size = self._blksize
        chunk_size = self._chunk
        rest = self._buffer[self._position :]
        while len(rest) < size:
            chunk = self._source.read(chunk_size)
            if not chunk:
                break
            if len(chunk) > chunk_size:
                raise ValueError("reader returned more than requested")
            rest = rest + chunk if rest else chunk
        self._buffer = rest
        self._position = min(size, len(rest))
        return rest[:size]

    def _send_window(self, now: float) -> Output:
        """Top the window up to W blocks and send all of it."""
        window = self._window
        windowsize = self._windowsize
        if not self._eof and len(window) < windowsize:
            blksize = self._blksize
            pack = _DATA_HEADER.pack
            try:
                while len(window) < windowsize:
                    position = self._position
                    end = position + blksize
                    if end <= len(self._buffer):
                        payload = self._buffer[position:end]
                        self._position = end
                    else:
                        payload = self._refill()
                    number = self._next
                    self._next = number + 1
                    window.append((pack(3, number & 0xFFFF) + payload, now))
                    if len(payload) < blksize:
                        self._eof = True
                        self._last_block = number
                        self._buffer = b""
                        break
            except Exception as e:
                return self._finish(f"reading the file failed: {e!r}", _error(ErrorCode.NOT_DEFINED, "read error"))
        self._deadline = deadline = now + self._rto.value
        if len(window) == 1:
            return Output([window[0][0]], deadline)
        return Output([datagram for datagram, _ in window], deadline)

    def _on_ack(self, wire: int, now: float) -> Output:
        before = self._base - 1
        acked = before + ((wire - before) & 0xFFFF)
        window = self._window
        if acked == before or acked > before + len(window):
            # A duplicate ACK (never resend on it), or one for a block we did
            # not send (stale or bogus): nothing to do.
            return Output(None, self._deadline)
        datagram, sent = window.popleft()
        size = len(datagram) - 4
        if acked - before > 1:  # more than one block acknowledged (windows)
            for _ in range(acked - before - 1):
                datagram, sent = window.popleft()
                size += len(datagram) - 4
        self.bytes_sent += size
        self._base = acked + 1
        rto = self._rto
        if acked > self._resent_upto:
            rto.sample(now - sent)
        if rto.backoff:
            rto.progress()
        self._retries_left = self._retries
        if acked == self._last_block:
            return self._finish(None)
        if window:
            # Blocks still in the window were sent but the client asks for
            # the one after ``acked``: send them again (RFC 7440), plus new ones.
            self._resent_upto = self._next - 1
            self.retransmissions += 1
        return self._send_window(now)


class Writer(Protocol):
    """Where an upload goes; see :class:`WriteSession`."""

    def write(self, data: bytes) -> None: ...

    def commit(self) -> None:
        """The upload is complete: make it visible."""
        ...

    def abort(self) -> None:
        """The upload failed: remove what was written."""
        ...


class WriteSession:
    """Receives one upload (WRQ) into ``writer``, lock-step.

    The total size is limited to ``limits.upload_max_bytes`` (ERROR 3 and
    the writer aborted when exceeded, also up front if the client's tsize
    says so).  On the final (short) block the writer is committed, the final
    ACK sent, and the session dallies for one timeout to re-ACK a repeated
    final block; then it is done.
    """

    def __init__(
        self,
        writer: Writer,
        options: Mapping[str, str] | None = None,
        mode: str = "octet",
        limits: Limits = Limits(),
    ):
        self.writer = writer
        self.options = dict(options or {})
        self.mode = mode.lower()
        self.limits = limits
        self.negotiation = Negotiation()
        self.done = False
        self.error: str | None = None
        self.bytes_received = 0
        self.retransmissions = 0
        self._decoder = NetasciiDecoder() if self.mode == "netascii" else None
        self._state = "new"
        self._rto = _Rto(limits, None)
        self._expected = 1  # absolute number of the next DATA block
        self._last_reply = b""
        self._last_reply_at = 0.0
        self._reply_resent = False
        self._retries_left = limits.retries
        self._deadline: float | None = None

    @property
    def lingering(self) -> bool:
        """The upload is complete and committed; only dallying remains."""
        return self._state == "dally"

    def start(self, now: float) -> Output:
        """Negotiate and send the OACK or ACK 0."""
        if self._state != "new":
            raise RuntimeError("session already started")
        if self.mode not in SUPPORTED_MODES:
            return self._fail(f"unsupported mode {self.mode!r}", ErrorCode.ILLEGAL_OPERATION, "unsupported mode")
        try:
            self.negotiation = negotiate(self.options, self.limits, write=True)
        except OptionError as e:
            return self._fail(str(e), ErrorCode.OPTION_REFUSED, "bad option value")
        if self.negotiation.tsize is not None and self.negotiation.tsize > self.limits.upload_max_bytes:
            return self._fail(f"announced size {self.negotiation.tsize} is over the limit", ErrorCode.DISK_FULL, "file too large")
        if self.negotiation.timeout is not None:
            self._rto = _Rto(self.limits, float(self.negotiation.timeout))
        self._state = "receiving"
        if self.negotiation.accepted:
            return self._reply(now, OptionAck(self.negotiation.accepted).encode())
        return self._reply(now, Ack(0).encode())

    def receive(self, datagram: bytes, now: float) -> Output:
        """Handle a datagram from the client's transfer ID."""
        if self.done:
            return Output(done=True, error=self.error)
        try:
            packet = decode(datagram)
        except MalformedPacket:
            return Output(deadline=self._deadline)
        if isinstance(packet, Error):
            if self._state == "dally":
                return self._end(None)
            return self._fail(f"client sent ERROR {packet.code}: {packet.message[:100]}")
        if not isinstance(packet, Data):
            return self._fail(f"unexpected {type(packet).__name__} during a write", ErrorCode.ILLEGAL_OPERATION, "illegal operation")
        expected_wire = self._expected & 0xFFFF
        if packet.block == expected_wire and self._state == "receiving":
            return self._on_data(packet.payload, now)
        if packet.block == (self._expected - 1) & 0xFFFF:
            # The client did not get our last ACK: repeat it (no new state).
            self.retransmissions += 1
            self._reply_resent = True
            return Output(send=[self._last_reply], deadline=self._deadline)
        return Output(deadline=self._deadline)

    def timeout(self, now: float) -> Output:
        """The deadline passed: repeat the last ACK/OACK, end dallying, or give up."""
        if self.done:
            return Output(done=True, error=self.error)
        if self._deadline is None or now < self._deadline - TIMER_SLACK:
            return Output(deadline=self._deadline)
        if self._state == "dally":
            return self._end(None)
        if self._retries_left <= 0:
            return self._fail(f"timed out after {self.limits.retries} retransmissions")
        self._retries_left -= 1
        self.retransmissions += 1
        self._rto.retransmitted()
        self._reply_resent = True
        self._deadline = now + self._rto.current()
        return Output(send=[self._last_reply], deadline=self._deadline)

    def abort(self, reason: str, notify: bool = True) -> Output:
        """End now; a lingering (already committed) upload just ends."""
        if self.done:
            return Output(done=True, error=self.error)
        if self._state == "dally":
            return self._end(None)
        if notify:
            return self._fail(reason, ErrorCode.NOT_DEFINED, "transfer aborted")
        return self._fail(reason)

    # -- internals ----------------------------------------------------------

    def _reply(self, now: float, datagram: bytes) -> Output:
        self._last_reply = datagram
        self._last_reply_at = now
        self._reply_resent = False
        self._deadline = now + self._rto.current()
        return Output(send=[datagram], deadline=self._deadline)

    def _on_data(self, payload: bytes, now: float) -> Output:
        if len(payload) > self.negotiation.blksize:
            return self._fail("DATA block larger than blksize", ErrorCode.ILLEGAL_OPERATION, "block too large")
        if not self._reply_resent:
            self._rto.sample(now - self._last_reply_at)
        self._rto.progress()
        self._retries_left = self.limits.retries
        final = len(payload) < self.negotiation.blksize
        data = payload
        if self._decoder is not None:
            data = self._decoder.feed(payload)
            if final:
                data += self._decoder.flush()
        if self.bytes_received + len(data) > self.limits.upload_max_bytes:
            return self._fail("upload larger than the limit", ErrorCode.DISK_FULL, "file too large")
        try:
            if data:
                self.writer.write(data)
            if final:
                self.writer.commit()
        except OSError as e:
            code = ErrorCode.DISK_FULL if e.errno in (errno.ENOSPC, errno.EDQUOT) else ErrorCode.NOT_DEFINED
            return self._fail(f"writing the upload failed: {e!r}", code, "write error")
        except Exception as e:
            return self._fail(f"writing the upload failed: {e!r}", ErrorCode.NOT_DEFINED, "write error")
        self.bytes_received += len(data)
        ack = Ack(self._expected & 0xFFFF).encode()
        self._expected += 1
        out = self._reply(now, ack)
        if final:
            self._state = "dally"
            dally = self._rto.fixed if self._rto.fixed is not None else self.limits.max_rto
            self._deadline = now + dally
            out.deadline = self._deadline
        return out

    def _end(self, error: str | None) -> Output:
        self.done = True
        self.error = error
        self._state = "done"
        self._deadline = None
        return Output(done=True, error=error)

    def _fail(self, reason: str, code: int | None = None, message: str = "") -> Output:
        try:
            self.writer.abort()
        except Exception:
            pass
        out = self._end(reason)
        if code is not None:
            out.send = [_error(code, message)]
        return out
