"""The audit hash chain (``_chain_c`` / ``_chain_py``): an allow's record, formatted, linked and written.

Both twins must write the same bytes for every input, since ``audit verify``
reads what either wrote, and must keep the chain whole when the write fails.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import native_or_fail

from agentauthz.decision import _accel
from agentauthz.decision._chain_py import GENESIS, SEQ_MAX

PREPARED = '"decision":true,"reason":"allow","tool":"demo","agent":"spiffe://dev.local/agent/a"'
TOKEN = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJzcGlmZmU6Ly9kZXYubG9jYWwvYWdlbnQvYSJ9.c2lnbmF0dXJlc2lnbmF0dXJl"


def _twins() -> tuple[Any, Any]:
    return native_or_fail().Chain, _accel.pure().Chain


def _append(chain: Any, path: Path, *args: Any, room: int = 1 << 20) -> int | None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        return chain.append_check(fd, room, *args)  # type: ignore[no-any-return]
    finally:
        os.close(fd)


def test_a_check_record_is_linked_to_the_one_before(hot: _accel.HotPath, tmp_path: Path) -> None:
    chain = hot.Chain()
    log = tmp_path / "log"
    first = _append(chain, log, 1764400000.5, "00aa11bb22cc33dd", "", PREPARED)
    chain.link(b'{"seq":2,"kind":"mint"}')  # a record the writer thread chained in between
    _append(chain, log, 1764400001.25, "00aa11bb22cc33de", "req-7", PREPARED)
    lines = log.read_bytes().splitlines(keepends=True)
    assert first == len(lines[0]) and len(lines) == 2
    one, three = (json.loads(line) for line in lines)
    assert one == {"seq": 1, "prev": GENESIS, "ts": 1764400000.5, "kind": "check",
                   "decision_id": "00aa11bb22cc33dd", "request_id": None, **json.loads("{" + PREPARED + "}")}
    # The third record names the second, which was never written here: the chain is the twin's.
    assert three["seq"] == 3 and three["request_id"] == "req-7"
    assert three["prev"] == hashlib.sha256(b'{"seq":2,"kind":"mint"}').hexdigest()
    assert chain.seq == 3 and chain.prev == hashlib.sha256(lines[1].rstrip(b"\n")).hexdigest()
    assert chain.last == lines[1]


def test_a_record_that_does_not_fit_changes_nothing(hot: _accel.HotPath, tmp_path: Path) -> None:
    chain = hot.Chain()
    size = len(chain.check_record(2.0, "d", "", PREPARED))
    log = tmp_path / "log"
    assert _append(chain, log, 2.0, "d", "", PREPARED, room=size) is None
    assert (chain.seq, chain.prev, chain.last) == (0, GENESIS, b"") and log.read_bytes() == b""
    assert _append(chain, log, 2.0, "d", "", PREPARED, room=size + 1) == size + 1
    assert chain.seq == 1


def test_a_token_in_the_request_id_is_redacted(hot: _accel.HotPath) -> None:
    line = hot.Chain().check_record(1.0, "d", f"x-{TOKEN}", PREPARED)
    assert TOKEN.encode() not in line and b"eyJ" not in line
    assert json.loads(line)["request_id"].startswith("x-[redacted")


@pytest.mark.parametrize("request_id", ['a"b', "a\\b", "tab\there", "nl\n", "caf\u00e9", "\ud800", "\x7f"])
def test_request_ids_are_escaped_like_json_does(hot: _accel.HotPath, request_id: str) -> None:
    line = hot.Chain().check_record(1.0, "d", request_id, PREPARED)
    assert line.isascii() and b"\n" not in line
    assert json.loads(line)["request_id"] == request_id


def test_a_failed_write_is_raised_after_the_record_was_linked(hot: _accel.HotPath, tmp_path: Path) -> None:
    """The caller undoes the file and keeps ``last`` to write again: the chain must already name it."""
    chain = hot.Chain()
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as raised:
            chain.append_check(full, 1 << 20, 3.0, "d", "", PREPARED)
    finally:
        os.close(full)
    assert raised.value.errno == errno.ENOSPC
    assert chain.seq == 1 and chain.prev == hashlib.sha256(chain.last.rstrip(b"\n")).hexdigest()
    with pytest.raises(OSError) as raised:
        chain.append_check(-1, 1 << 20, 3.0, "d", "", PREPARED)
    assert raised.value.errno == errno.EBADF and chain.seq == 2


def test_a_short_write_is_finished_or_raised_with_the_rest_kept(hot: _accel.HotPath) -> None:
    """A pipe with room for part of the record: that part is written, then the error is raised."""
    read, write = os.pipe()
    chain = hot.Chain()
    PREFILL = 16384 - 4096 - 1000  # one page of the four left free: a write takes one page, then EAGAIN
    try:
        fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 16384)
        os.set_blocking(write, False)
        os.write(write, b"x" * PREFILL)
        big = PREPARED + ',"intent":"' + "i" * 6000 + '"'  # past PIPE_BUF: the pipe may take part
        with pytest.raises(BlockingIOError):
            chain.append_check(write, 1 << 20, 4.0, "d", "", big)
        taken = os.read(read, 1 << 16)[PREFILL:]
    finally:
        os.close(read)
        os.close(write)
    assert 0 < len(taken) < len(chain.last) and chain.last.startswith(taken)
    assert chain.seq == 1


def test_seq_and_prev_are_validated(hot: _accel.HotPath) -> None:
    chain = hot.Chain()
    for bad in ("0" * 63, "G" * 64, "A" * 64, 7):
        with pytest.raises(ValueError):
            chain.prev = bad
    for bad_seq in (-1, SEQ_MAX + 1, 1.0, True, "1"):
        with pytest.raises(ValueError):
            chain.seq = bad_seq
    chain.seq = SEQ_MAX
    with pytest.raises(OverflowError):
        chain.link(b"{}")
    with pytest.raises(OverflowError):
        chain.check_record(1.0, "d", "", PREPARED)
    assert chain.seq == SEQ_MAX


_TEXT = st.text(st.characters(codec="utf-8"), max_size=40) | st.sampled_from(["", TOKEN, f"{TOKEN} x", "eyJ"])
_TS = st.floats(allow_nan=False) | st.floats(-2.0**32, 2.0**32) | st.sampled_from(
    [0.0, -0.0, 1e16, 1764400000.123456, 2.5e-7, 5e-7, 1.5e-6, 2.0**32, -2.0**32, 4294967295.9999995])


@pytest.mark.parametrize(("ts", "text"), [
    (1764400000.5, "1764400000.5"), (1764400000.0, "1764400000.0"), (1764400000.1234567, "1764400000.123457"),
    (1764400000.000001, "1764400000.000001"), (2.5e-6, "0.000002"), (3.5e-6, "0.000004"), (-1.25, "-1.25"),
    (2.0**32, "4294967296.0"), (1e16, "1e+16"), (float("inf"), "inf")])
def test_a_record_writes_its_time_to_the_microsecond(hot: _accel.HotPath, ts: float, text: str) -> None:
    # Fixed point to the microsecond (half to even), trailing zeros cut; repr beyond 2**32 s (year 2106).
    line = hot.Chain().check_record(ts, "d", "", PREPARED)
    assert line.split(b',"ts":', 1)[1].split(b',"kind"', 1)[0].decode() == text


@given(ts=_TS, decision_id=_TEXT, request_id=_TEXT, prepared=st.sampled_from([PREPARED, '"a":[1,2]', ""]),
       seq=st.integers(0, SEQ_MAX - 1), prev=st.text("0123456789abcdef", min_size=64, max_size=64))
def test_twins_write_the_same_bytes(ts: float, decision_id: str, request_id: str, prepared: str,
                                    seq: int, prev: str) -> None:
    native, pure = (twin(seq, prev) for twin in _twins())
    line = native.check_record(ts, decision_id, request_id, prepared)
    assert line == pure.check_record(ts, decision_id, request_id, prepared)
    assert native.link(line) == pure.link(line) == line + b"\n"
    assert (native.seq, native.prev) == (pure.seq, pure.prev) == (seq + 1, hashlib.sha256(line).hexdigest())


@pytest.mark.parametrize("size", [0, 1, 55, 56, 63, 64, 65, 119, 120, 128, 420, 4096, 100_003])
def test_the_link_hash_is_sha256_across_block_and_padding_boundaries(size: int) -> None:
    """The native twin hashes through OpenSSL's block code: every size where SHA-256 padding or a
    block boundary changes, and lines longer than any record, must give hashlib's digest."""
    line = bytes((i * 7 + size) % 251 for i in range(size))
    if hashlib.sha256.__module__ == "_hashlib":  # an OpenSSL behind hashlib: the native twin uses it
        native_or_fail()
        from agentauthz.decision import _chain_c  # type: ignore[attr-defined]
        assert _chain_c.SHA256_FROM == "openssl"
    for twin in _twins():
        chain = twin()
        assert chain.link(line) == line + b"\n"
        assert chain.prev == hashlib.sha256(line).hexdigest()


def test_without_openssl_behind_hashlib_the_native_twin_hashes_with_libsodium() -> None:
    """The fallback is chosen at import: a fresh interpreter that cannot import _hashlib."""
    native_or_fail()
    code = ("import sys; sys.modules['_hashlib'] = None\n"
            "from agentauthz.decision import _chain_c\n"
            "c = _chain_c.Chain(); c.link(b'x' * 420)\n"
            "print(_chain_c.SHA256_FROM, c.prev)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["libsodium", hashlib.sha256(b"x" * 420).hexdigest()]


def test_twins_write_the_same_log(tmp_path: Path) -> None:
    logs = []
    for n, twin in enumerate(_twins()):
        chain, log = twin(), tmp_path / f"log{n}"
        for i in range(50):
            _append(chain, log, 1764400000.0 + i / 7, f"{i:016x}", f"req-{i}" if i % 3 else "", PREPARED)
            if i % 10 == 0:
                with log.open("ab") as f:
                    f.write(chain.link(json.dumps({"seq": chain.seq + 1, "prev": chain.prev}).encode()))
        logs.append(log.read_bytes())
    assert logs[0] == logs[1] and logs[0].count(b"\n") == 55


# -- the inline gate (InlineAllow: AuditLog.write_allow in one call) ----------------------------------

class Slow:
    """AuditLog._write_allow's place: what the gate sends on, and what it answers."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any) -> bool:
        self.calls.append(args)
        return True


def _never_failed(exc: OSError, decision_id: str) -> None:
    raise AssertionError(f"no write should fail here: {exc}")


def test_the_inline_gate_writes_only_while_open(hot: _accel.HotPath, tmp_path: Path) -> None:
    chain, mutex, slow = hot.Chain(), threading.Lock(), Slow()
    allow = hot.InlineAllow(chain, mutex, slow, _never_failed)
    log = tmp_path / "log"
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        assert allow("d1", "", PREPARED, 1.0) and len(slow.calls) == 1  # shut from the start
        chain.open_inline(fd, 1 << 20, collections.deque(["queued"]))
        assert allow("d2", "", PREPARED, 2.0) and len(slow.calls) == 2  # records queued ahead go first
        chain.open_inline(fd, 1 << 20, collections.deque())
        assert allow("d3", "r3", PREPARED, 3.0) and allow("d4", "", PREPARED, 4.0)
        assert allow("d5", "", PREPARED) and len(slow.calls) == 3  # no time given: _write_allow's
        with mutex:  # the writer holds the log: declined, nothing written
            assert allow("d6", "", PREPARED, 6.0) is False
        size = log.stat().st_size
        assert chain.take_inline() == (2, size) and chain.take_inline() == (0, 0)
        assert allow("d7", "", PREPARED, 7.0) and len(slow.calls) == 4, "take_inline shuts the gate"
        chain.open_inline(fd, 1 << 20, collections.deque())
        chain.shut_inline()
        assert allow("d8", "", PREPARED, 8.0) and len(slow.calls) == 5
    finally:
        os.close(fd)
    written = [json.loads(line) for line in log.read_bytes().splitlines()]
    assert [(r["seq"], r["decision_id"], r["ts"]) for r in written] == [(1, "d3", 3.0), (2, "d4", 4.0)]
    assert [c[0] for c in slow.calls] == ["d1", "d2", "d5", "d7", "d8"]
    assert not mutex.locked()


def test_the_inline_gate_shuts_on_a_full_file(hot: _accel.HotPath, tmp_path: Path) -> None:
    chain, slow = hot.Chain(), Slow()
    allow = hot.InlineAllow(chain, threading.Lock(), slow, _never_failed)
    fd = os.open(tmp_path / "log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        one = len(chain.check_record(1.0, "d1", "", PREPARED)) + 1
        chain.open_inline(fd, 2 * one + 1, collections.deque())
        assert allow("d1", "", PREPARED, 1.0) and allow("d2", "", PREPARED, 1.0)
        assert allow("d3", "", PREPARED, 1.0) is False, "a record that does not fit"
        assert chain.seq == 2 and chain.take_inline() == (2, 2 * one)
        assert allow("d4", "", PREPARED, 1.0) and [c[0] for c in slow.calls] == ["d4"]  # shut by it
        chain.open_inline(fd, 0, collections.deque())  # a full file is never opened
        assert allow("d5", "", PREPARED, 1.0) and len(slow.calls) == 2
    finally:
        os.close(fd)


def test_an_inline_write_that_fails_shuts_the_gate_with_the_record_linked(hot: _accel.HotPath) -> None:
    chain, mutex, slow = hot.Chain(), threading.Lock(), Slow()
    failures: list[tuple[int, str, bool, bytes]] = []

    def failed(exc: OSError, decision_id: str) -> None:
        # AuditLog._inline_failed: still holding the log; the record linked, kept to write again.
        failures.append((exc.errno, decision_id, mutex.locked(), chain.last))
        raise ValueError("withdrawn")

    allow = hot.InlineAllow(chain, mutex, slow, failed)
    fd = os.open("/dev/full", os.O_WRONLY)  # every write(2) fails: ENOSPC
    try:
        chain.open_inline(fd, 1 << 20, collections.deque())
        with pytest.raises(ValueError, match="withdrawn"):
            allow("doomed", "", PREPARED, 1.0)
    finally:
        os.close(fd)
    assert [f[:3] for f in failures] == [(errno.ENOSPC, "doomed", True)]
    assert json.loads(failures[0][3])["decision_id"] == "doomed" and chain.seq == 1
    assert not mutex.locked() and chain.take_inline() == (0, 0)
    assert allow("next", "", PREPARED, 2.0) and len(slow.calls) == 1, "shut by the failure"
