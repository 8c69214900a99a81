"""The audit log's hash chain: the pure-Python twin of ``native/_chain_c.pyx``.

Every record names its sequence number and the SHA-256 of the record before
it (``prev``), so an edited, inserted, deleted or reordered record breaks the
chain (``audit.verify``). ``append_check`` is an allow's record in one call:
formatted, linked and written, because the allow is answered only once its
record is in the log file (``AuditLog.write_allow``).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Callable, NoReturn, Sized

from .redact import _json_str, _redacted

GENESIS = "0" * 64
SEQ_MAX = 2**63 - 2  # the native twin's seq + 1 must fit a C long long
_HEX = frozenset("0123456789abcdef")
# A record's ts is the clock to the microsecond (the wall clock's resolution, and a fixed-point text the
# native twin writes in a few instructions where the shortest repr of a double costs a bignum division
# per digit). Within 2**32 s (the year 2106) a double holds every microsecond; beyond it (and for NaN or
# infinity, which no clock reads) a record says repr(ts).
TS_FIXED_MAX = 2.0**32


def ts_text(ts: float) -> str:
    """``ts`` as a record writes it: seconds, to the microsecond, with no trailing zeros after the first
    decimal (``1764400000.5``, ``1764400000.123457``); ``repr(ts)`` outside ``TS_FIXED_MAX``."""
    if not -TS_FIXED_MAX < ts < TS_FIXED_MAX:
        return repr(ts)
    micros = round(ts * 1e6)  # half to even, as C's nearbyint: the twins round alike
    whole, fraction = divmod(abs(micros), 1_000_000)
    return f"{'-' if micros < 0 else ''}{whole}.{f'{fraction:06d}'.rstrip('0') or '0'}"


class Chain:
    """The last record's ``seq`` and ``prev`` hash, and the next records linked to them.

    Not thread-safe: ``AuditLog`` calls it with its ``_mutex`` held.
    """

    __slots__ = ("_seq", "_prev", "last", "inline_fd", "inline_room", "_inline_records", "_inline_bytes")

    def __init__(self, seq: int = 0, prev: str = GENESIS) -> None:
        self.seq, self.prev = seq, prev
        self.last = b""  # append_check's line, newline included: kept to write again after a failure
        # The inline gate (InlineAllow): the log file an allow is appended to at once, -1 while shut;
        # the bytes left in that file; the allows appended through it since the log last took the count.
        self.inline_fd, self.inline_room = -1, 0
        self._inline_records = self._inline_bytes = 0

    @property
    def seq(self) -> int:
        return self._seq

    @seq.setter
    def seq(self, value: int) -> None:
        if value.__class__ is not int or not 0 <= value <= SEQ_MAX:
            raise ValueError(f"seq out of range: {value!r}")
        self._seq = value

    @property
    def prev(self) -> str:
        return self._prev

    @prev.setter
    def prev(self, value: str) -> None:
        if not (isinstance(value, str) and len(value) == len(GENESIS) and _HEX.issuperset(value)):
            raise ValueError(f"prev must be {len(GENESIS)} lowercase hex digits: {value!r}")
        self._prev = value

    def link(self, line: bytes) -> bytes:
        """Make ``line`` (one encoded record, no newline) the last record; the bytes to write."""
        if self._seq >= SEQ_MAX:
            raise OverflowError("audit seq exhausted")
        self._seq, self._prev = self._seq + 1, hashlib.sha256(line).hexdigest()
        return line + b"\n"

    def check_record(self, ts: float, decision_id: str, request_id: str, prepared: str) -> bytes:
        """The next check record, not linked yet (no newline): one f-string, no dict to encode.

        ``prepared`` holds the members every Check of a token, request and outcome shares
        (``audit.records.prepare``). ``request_id`` is Envoy's x-request-id, which a client may set:
        it is escaped and redacted like any field.
        """
        if self._seq >= SEQ_MAX:
            raise OverflowError("audit seq exhausted")
        rid = _json_str(_redacted(request_id)) if request_id else "null"
        return (f'{{"seq":{self._seq + 1},"prev":"{self._prev}","ts":{ts_text(ts)},"kind":"check",'
                f'"decision_id":{_json_str(decision_id)},"request_id":{rid},{prepared}}}').encode()

    def append_check(self, fd: int, room: int, ts: float, decision_id: str, request_id: str,
                     prepared: str) -> int | None:
        """Link the next check record and write it to ``fd``; the bytes written (all of ``last``).

        None, with nothing changed, when the record (without its newline) needs ``room`` bytes or
        more. An ``OSError`` from the write is raised after the record was linked: part of ``last``
        may be in the file, and ``last`` must still be written for the chain to hold.
        """
        line = self.check_record(ts, decision_id, request_id, prepared)
        if len(line) >= room:
            return None
        self.last = self.link(line)
        view = memoryview(self.last)
        while view:  # a short write is how a full disk first shows; the next write raises
            view = view[os.write(fd, view):]
        return len(self.last)

    def open_inline(self, fd: int, room: int, queue: Sized) -> None:
        """Let ``InlineAllow`` append to ``fd``, ``room`` bytes short of full, unless ``queue`` holds
        records (they go first). Called with the log's mutex held, once the log was checked as
        ``AuditLog._write_allow`` checks it; whatever changes what was checked shuts the gate again."""
        if fd >= 0 and room > 0 and not len(queue):
            self.inline_fd, self.inline_room = fd, room

    def shut_inline(self) -> None:
        """Send every allow to ``AuditLog._write_allow`` until the gate is opened again."""
        self.inline_fd = -1

    def take_inline(self) -> tuple[int, int]:
        """Shut the gate; (records, bytes) appended through it since the last take."""
        counted = (self._inline_records, self._inline_bytes)
        self.inline_fd = -1
        self._inline_records = self._inline_bytes = 0
        return counted

    def count_inline(self, written: int) -> None:
        """One record of ``written`` bytes appended through the gate."""
        self.inline_room -= written
        self._inline_records += 1
        self._inline_bytes += written


class InlineAllow:
    """``AuditLog.write_allow``: an allow's record written to the log file now, on the caller's thread,
    in one call while the chain's inline gate is open.

    The gate stands for every check ``AuditLog._write_allow`` makes (the log healthy and open, no
    batch in flight, nothing queued, its file open and not full), made by that method while it held
    the log's mutex; whatever changes one of them shuts it. With the gate shut, or no ``ts``, the call
    is ``_write_allow``'s. The mutex is still taken: the writer thread writes batches and moves to the
    next file with it held.
    """

    __slots__ = ("_chain", "_acquire", "_release", "_slow", "_failed")

    def __init__(self, chain: Chain, mutex: Any, slow: Callable[..., bool],
                 failed: Callable[[OSError, str], NoReturn]) -> None:
        self._chain, self._acquire, self._release = chain, mutex.acquire, mutex.release
        self._slow, self._failed = slow, failed

    def __call__(self, decision_id: str, request_id: str, prepared: str, ts: float | None = None) -> bool:
        chain = self._chain
        if chain.inline_fd < 0 or ts is None:
            return self._slow(decision_id, request_id, prepared, ts)
        if not self._acquire(False):
            return False  # the writer holds the log: the caller waits for it
        fd = chain.inline_fd
        if fd < 0:  # shut between the two reads (the native twin keeps the GIL: it cannot be)
            self._release()
            return self._slow(decision_id, request_id, prepared, ts)
        try:
            try:
                written = chain.append_check(fd, chain.inline_room, ts, decision_id, request_id, prepared)
            except OSError as exc:
                chain.shut_inline()
                self._failed(exc, decision_id)  # raises AuditUnavailable
                raise
            if written is None:
                chain.shut_inline()  # this file is full: the writer starts the next
                return False
            chain.count_inline(written)
            return True
        finally:
            self._release()
