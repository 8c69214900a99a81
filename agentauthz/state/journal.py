"""The revocation journal's file: one JSON record a line, locked to one writer, fsynced before any ack.

What the records mean is the RevocationStore's (revocation.py); this module keeps them durable: an
append is whole or undone, a torn last line left by a crash is cut at open, a rewrite (compaction)
replaces the file atomically, and a file that is empty or unreadable refuses the start.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path
from typing import Any

from .. import durable, errors

log = logging.getLogger("agentauthz.revocation")  # the name operators filter on, kept across the layout

JOURNAL = "journal.jsonl"
NAMED = ("task", "agent", "key")  # revoked by name; "at" is the cutoff (task, agent) or the revocation time
BANS = ("ban", "unban")  # an agent banned at "at" until an unban at "at": never compacted away while in force

# Every record the journal may hold: op -> field -> type. Anything else refuses the start.
_FIELDS: dict[str, dict[str, type]] = {
    "reserve": {"from": int, "upto": int},  # slots [from, upto) may have been handed out
    "seal": {"from": int, "upto": int, "exp": int},  # and every token given one has exp <= exp
    "base": {"base": int},  # every slot below base is dead (written by compaction)
    "token": {"jti": str, "slot": int, "exp": int},
    **{op: {"name": str, "at": int} for op in NAMED + BANS},
}


def encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode() + b"\n"


def parse(line: bytes, where: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError
        raise errors.StateError(f"{where}: not a JSON record") from None
    op = record.get("op") if isinstance(record, dict) else None
    fields = _FIELDS.get(op) if isinstance(op, str) else None
    if fields is None or record.keys() != fields.keys() | {"op"}:
        raise errors.StateError(f"{where}: unknown record")
    for name, kind in fields.items():
        value = record[name]
        in_range = value >= 0 if type(value) is int else bool(value)
        # type() rather than isinstance(): a bool is not a slot number or a time.
        if type(value) is not kind or not in_range:
            raise errors.StateError(f"{where}: field {name!r} is invalid")
    if "upto" in record and record["from"] >= record["upto"]:
        raise errors.StateError(f"{where}: empty slot block")
    return record


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]



class JournalFile:
    """The open journal of one store: ``records()`` once at open, then ``append`` and ``rewrite``."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / JOURNAL
        self._fd = self._lock_fd = -1
        self.size = 0  # bytes of whole records in the file
        self.live_size = 0  # bytes after the last rewrite: compaction is due when the file doubles
        self._broken = False

    @classmethod
    def open(cls, directory: Path) -> JournalFile:
        """Lock (one writer), create with a first record if new, cut a torn last line."""
        journal = cls(directory)
        directory = journal.path.parent
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        try:
            # Two writers would interleave appends and hand out the same slots.
            journal._lock_fd = os.open(directory / "journal.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                       0o600)
            try:
                fcntl.flock(journal._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise errors.StateError(f"{journal.path}: in use by another process") from None
            if not os.path.lexists(journal.path):
                # Born with a first record, atomically: an empty journal is never a state it had, so
                # one found empty was truncated and is refused (it would forget every revocation).
                durable.replace(journal.path, encode({"op": "base", "base": 0}))
            journal._fd = os.open(journal.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            os.fchmod(journal._fd, 0o600)
            durable.fsync_dir(directory)
        except BaseException:
            journal.close()
            raise
        return journal

    def records(self) -> list[dict[str, Any]]:
        """Every record, parsed and checked; a torn last line (a crash mid-append) is cut first."""
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end == 0:
            raise errors.StateError(f"{self.path}: no complete record (a journal starts with one): truncated "
                                    "or damaged; refusing to start without the revocations it held")
        if end < len(data):
            # A crash mid-append: that record was never acknowledged, so cutting it loses nothing.
            log.warning("%s: cutting a torn last line of %d bytes", self.path, len(data) - end)
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        self.size = self.live_size = end
        return [parse(line, f"{self.path}:{n}") for n, line in enumerate(data[:end].split(b"\n")[:-1], 1)]

    def append(self, records: list[dict[str, Any]]) -> None:
        """Durable when this returns; on failure nothing of it stays in the file (or the file is broken)."""
        if not records:
            return
        self.check_open()
        data = b"".join(encode(r) for r in records)
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError:
            # Not acknowledged: remove any partial line, or the next append would
            # bury it mid-file and the journal would refuse to replay.
            try:
                os.ftruncate(self._fd, self.size)
            except OSError:
                self._broken = True
            raise
        self.size += len(data)

    def rewrite(self, records: list[dict[str, Any]]) -> None:
        """Replace the file with ``records``: temp file, fsync, rename, fsync directory."""
        data = b"".join(encode(r) for r in records)
        tmp = self.path.with_name(JOURNAL + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        durable.fsync_dir(self.path.parent)
        new_fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        os.close(self._fd)
        self._fd = new_fd
        self.size = self.live_size = len(data)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def broken(self) -> bool:
        return self._broken

    def check_open(self) -> None:
        if self._fd < 0:
            raise errors.StateError(f"{self.path}: revocation store is closed")
        if self._broken:
            raise errors.StateError(f"{self.path}: journal has a partial write that could not be removed")

    def close(self) -> None:
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1
