"""Audit log: real files, real writer thread, real tampering."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faults_support import fill, tmpfs
from hypothesis import given
from hypothesis import strategies as st
from support import Forge

from agentauthz.audit import batches as audit_batches
from agentauthz.audit import files as audit_files
from agentauthz.audit import records as audit_records
from agentauthz.audit import verify as audit_verify
from agentauthz.audit.records import thumbprint
from agentauthz.audit.verify import main_verify, verify_dir
from agentauthz.audit.writer import WITHDRAWN, AuditLog
from agentauthz.decision import _accel
from agentauthz.decision._chain_py import GENESIS
from agentauthz.errors import AuditUnavailable, StateError

LOG1 = "audit-0000000001.jsonl"
# The checkpoint key lives outside the audit directory (audit_files.open_key); verify is given its public key.
KEY = Ed25519PrivateKey.generate()
PUB = KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
PUB_B64 = base64.urlsafe_b64encode(PUB).decode().rstrip("=")


def lines(directory: Path) -> list[bytes]:
    out: list[bytes] = []
    for _, path in audit_files.log_files(directory):
        out += path.read_bytes().splitlines(keepends=True)
    return out


def records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(raw) for raw in lines(directory)]


def sha(raw: bytes) -> str:
    return hashlib.sha256(raw.rstrip(b"\n")).hexdigest()


def wait_for(predicate: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


ALLOW = audit_records.prepare(decision=True, reason="allow", agent="spiffe://dev.local/agent/alpha")


def allow(log: AuditLog, decision_id: str, request_id: str = "", prepared: str = ALLOW) -> bool:
    """An allow's record as the Check's warm path writes it (``write_allow`` with the time it decided
    at): through the inline gate while it is open, else ``_write_allow``."""
    return log.write_allow(decision_id, request_id, prepared, time.time())  # type: ignore[no-any-return]


def check(log: AuditLog, i: int, **extra: Any) -> bool:
    return log.record("check", decision="allow", reason="allow", agent="spiffe://dev.local/agent/a",
                      task="task-1", tool="demo", target=f"t{i}", operation="read", intent="test",
                      token_id=f"tok-{i}", chain=["spiffe://dev.local/agent/root"], decision_id=f"d{i}",
                      **extra)


def build(directory: Path, groups: int = 4, per: int = 5, **kwargs: Any) -> None:
    """A deterministic log: ``groups`` batches of ``per`` records, each followed by its checkpoint."""
    log = AuditLog.open(directory, **{"key": KEY, "flush_interval": 60, **kwargs})
    log.start()
    for g in range(groups):
        for i in range(per):
            assert check(log, g * per + i)
        assert log.flush()
    log.stop()


def test_records_are_batched_by_the_thread_and_chain_verifies(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path, key=KEY, batch_size=100, flush_interval=0.02)
    for i in range(50):
        assert check(log, i)
    assert not audit_files.log_files(tmp_path), "record() must not touch the disk"
    log.start()
    for i in range(50, 1000):
        assert check(log, i)
    assert log.flush()
    assert log.pending == 0 and log.healthy
    log.stop()
    assert not log.healthy
    recs = records(tmp_path)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    checks = [r for r in recs if r["kind"] == "check"]
    cps = [r for r in recs if r["kind"] == "checkpoint"]
    assert [r["target"] for r in checks] == [f"t{i}" for i in range(1000)]
    assert 10 <= len(cps) < 200, "one checkpoint per batch: records must have been grouped"
    report = verify_dir(tmp_path, PUB)
    assert report.ok and report.records == len(recs) and report.checkpoints == len(cps)


def test_an_allow_written_on_the_callers_thread_joins_the_chain(tmp_path: Path, hot: _accel.HotPath) -> None:
    """write_allow: declined (False, nothing recorded) until the writer has a file open, then written
    at once, in chain order with the queued records, and rotated into the next file by the writer."""
    prepared = ALLOW
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=0.02, max_file_bytes=4096, hot=hot)
    log.start()
    try:
        assert not allow(log, "first")  # a fresh log: no file open yet
        assert log.healthy and log.pending == 0
        log.record("start")
        assert log.flush()
        written = 0
        for i in range(200):  # as the Check does: declined means queued for the writer instead
            if allow(log, f"allow-{i}", f"req-{i}"):
                written += 1
            else:
                assert log.record_check(f"allow-{i}", f"req-{i}", prepared)
                assert log.flush()
        assert written > 150 and log.healthy
    finally:
        log.stop()
    assert not allow(log, "stopped")  # a stopped log writes nothing inline, whatever the gate was
    recs = records(tmp_path)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    allows = [r["decision_id"] for r in recs if r["kind"] == "check"]
    assert allows == [f"allow-{i}" for i in range(200)]
    assert len(audit_files.log_files(tmp_path)) > 1, "the files rotated"
    assert all(p.stat().st_size <= 4096 + 1024 for _, p in audit_files.log_files(tmp_path))
    assert verify_dir(tmp_path, PUB).ok


def test_record_shape_and_hash_chain(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path, key=KEY, clock=lambda: 1700000000.5)
    log.start()
    assert log.record("mint", agent="a", task="t", token_id="tok-1", grants=[{"tool": "demo"}])
    log.stop()
    raw = lines(tmp_path)
    first, cp = json.loads(raw[0]), json.loads(raw[1])
    assert list(first)[:4] == ["seq", "prev", "ts", "kind"]
    assert first == {"seq": 1, "prev": GENESIS, "ts": 1700000000.5, "kind": "mint", "agent": "a", "task": "t",
                     "token_id": "tok-1", "grants": [{"tool": "demo"}]}
    assert cp["kind"] == "checkpoint" and cp["prev"] == sha(raw[0])
    assert cp["checkpoint"] == {"seq": 1, "hash": sha(raw[0]), "file": LOG1, "ts": 1700000000.5,
                                "kid": thumbprint(KEY.public_key())}
    exported = json.loads((tmp_path / "checkpoints.jsonl").read_bytes())
    assert exported == {**cp["checkpoint"], "sig": cp["sig"]}


def test_audit_key_files(tmp_path: Path) -> None:
    audit_dir, key_dir = tmp_path / "audit", tmp_path / "audit-key"
    key, created = audit_files.open_key(key_dir, audit_dir)
    assert created and not audit_dir.exists()  # nothing of the key beside the log
    private, pinned = key_dir / "audit-key.pem", key_dir / "public.pem"
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert private.stat().st_mode & 0o777 == 0o600 and key_dir.stat().st_mode & 0o777 == 0o700
    assert audit_verify._public_key(pinned.read_bytes()) == key.public_key()
    again, created = audit_files.open_key(key_dir, audit_dir)  # reopened: same key, same kid
    assert not created and thumbprint(again.public_key()) == thumbprint(key.public_key())
    private.chmod(0o644)
    with pytest.raises(StateError, match="owner-only"):
        audit_files.open_key(key_dir, audit_dir)
    private.chmod(0o600)
    pinned.write_bytes(audit_verify._public_key(RFC8037_X).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(StateError, match="does not match"):
        audit_files.open_key(key_dir, audit_dir)


def test_a_key_kept_in_the_audit_directory_moves_out_and_its_checkpoints_still_verify(tmp_path: Path) -> None:
    audit_dir, key_dir = tmp_path / "audit", tmp_path / "audit-key"
    build(audit_dir, groups=2)  # as signed before: KEY sat in the audit directory
    (audit_dir / "audit-key.pem").write_bytes(KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (audit_dir / "audit-key.pem").chmod(0o600)
    (audit_dir / "audit-key.pub.pem").write_bytes(audit_files.public_pem(KEY.public_key()))
    key, created = audit_files.open_key(key_dir, audit_dir)
    assert not created and thumbprint(key.public_key()) == thumbprint(KEY.public_key())
    assert not (audit_dir / "audit-key.pem").exists() and not (audit_dir / "audit-key.pub.pem").exists()
    code, result = main_verify(audit_dir)  # the shipped default: the pinned copy in <state>/audit-key/
    assert code == 0 and result["key"] == str(key_dir / "public.pem"), result


# RFC 8037 appendix A.2/A.3: the Ed25519 public key and its RFC 7638 thumbprint.
RFC8037_X = base64.urlsafe_b64decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo=")


def test_thumbprint_rfc8037_vector(tmp_path: Path) -> None:
    pub = audit_verify._public_key(RFC8037_X)
    assert thumbprint(pub) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_second_writer_refused(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path, key=KEY)
    with pytest.raises(StateError, match="another process"):
        AuditLog.open(tmp_path, key=KEY)
    log.stop()
    AuditLog.open(tmp_path, key=KEY).stop()


def test_seq_continues_across_restart_and_files(tmp_path: Path) -> None:
    build(tmp_path, groups=3, max_file_bytes=1500)
    build(tmp_path, groups=3, max_file_bytes=1500)
    files = audit_files.log_files(tmp_path)
    assert len(files) > 2
    for first, path in files:
        assert path.name == f"audit-{first:010d}.jsonl"
        assert json.loads(path.read_bytes().splitlines()[0])["seq"] == first
    recs = records(tmp_path)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert sum(r["kind"] == "check" for r in recs) == 30
    assert verify_dir(tmp_path, PUB).ok


def _rewrite(directory: Path, raw: list[bytes]) -> None:
    (directory / LOG1).write_bytes(b"".join(raw))


def _rechain(raw: list[bytes], start: int = 0) -> list[bytes]:
    """What an attacker without the audit key can do: recompute seq and prev after an edit."""
    out: list[bytes] = []
    prev = sha(raw[start - 1]) if start else GENESIS
    for i, line in enumerate(raw):
        if i < start:
            out.append(line)
            continue
        rec = json.loads(line)
        rec["seq"], rec["prev"] = len(out) + 1, prev
        line = json.dumps(rec, separators=(",", ":")).encode() + b"\n"
        prev = sha(line)
        out.append(line)
    return out


def _resign(line: bytes, **change: Any) -> bytes:
    """A checkpoint re-signed with a key that is not the audit key (same kid claimed)."""
    rec = json.loads(line)
    body = {k: v for k, v in rec.items() if k != "sig"}
    body.update(change)
    rec = {**body, "sig": audit_records._b64(Ed25519PrivateKey.generate().sign(audit_records._canon(body)))}
    return json.dumps(rec, separators=(",", ":")).encode() + b"\n"


def _edit(raw: list[bytes], i: int, **change: Any) -> list[bytes]:
    rec = json.loads(raw[i])
    rec.update(change)
    return raw[:i] + [json.dumps(rec, separators=(",", ":")).encode() + b"\n"] + raw[i + 1:]


# Layout from build(): seq 1-5 checks, 6 checkpoint(5), 7-11, 12 cp(11), 13-17, 18 cp(17), 19-23, 24 cp(23).
def t_edit(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, _edit(raw, 7, decision="deny"))


def t_edit_before_checkpoint(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, _edit(raw, 22, decision="deny"))


def t_insert(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, raw[:3] + [raw[2]] + raw[3:])


def t_insert_rechained(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, _rechain(raw[:3] + [raw[2]] + raw[3:], 3))


def t_delete(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, raw[:9] + raw[10:])


def t_delete_rechained(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, _rechain(raw[:9] + raw[10:], 9))


def t_reorder(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, raw[:7] + [raw[8], raw[7]] + raw[9:])


def t_truncate(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, raw[:14])


def t_torn(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, raw[:-1] + [raw[-1][:-5]])


def t_forged_chain_checkpoint(d: Path, raw: list[bytes]) -> None:
    rec = json.loads(raw[11])
    body = rec["checkpoint"]
    rec["sig"] = audit_records._b64(Ed25519PrivateKey.generate().sign(audit_records._canon(body)))
    _rewrite(d, raw[:11] + [json.dumps(rec).encode() + b"\n"] + raw[12:])


def t_forged_checkpoint_file(d: Path, raw: list[bytes]) -> None:
    cps = (d / "checkpoints.jsonl").read_bytes().splitlines(keepends=True)
    cps[1] = _resign(cps[1], hash="ab" * 32)
    (d / "checkpoints.jsonl").write_bytes(b"".join(cps))


def t_edit_rechained(d: Path, raw: list[bytes]) -> None:
    _rewrite(d, _rechain(_edit(raw, 7, decision="deny"), 7))


def t_edit_rechained_checkpoints_dropped(d: Path, raw: list[bytes]) -> None:
    # Drop the chain's checkpoint records too: only the signed checkpoints file is left to catch it.
    kept = [line for line in _edit(raw, 7, decision="deny") if b'"kind":"checkpoint"' not in line]
    _rewrite(d, _rechain(kept))


def t_checkpoints_from_another_log(d: Path, raw: list[bytes]) -> None:
    other = d.parent / "other"
    other.mkdir()
    log = AuditLog.open(other, key=KEY, flush_interval=60)
    log.start()
    for i in range(5):
        log.record("revoke", token_id=f"other-{i}")
    log.stop()
    shutil.copy(other / "checkpoints.jsonl", d / "checkpoints.jsonl")


TAMPER = {
    t_edit: f"{LOG1}:9: prev hash does not match record 8",
    t_edit_before_checkpoint: f"{LOG1}:24: prev hash does not match record 23",
    t_insert: f"{LOG1}:4: seq 3, expected 4",
    t_insert_rechained: f"{LOG1}:7: checkpoint does not match record 6",
    t_delete: f"{LOG1}:10: seq 11, expected 10",
    t_delete_rechained: f"{LOG1}:11: checkpoint does not match record 10",
    t_reorder: f"{LOG1}:8: seq 9, expected 8",
    t_truncate: "checkpoints.jsonl:3: log ends at record 14, before checkpoint 17 (truncated)",
    t_torn: f"{LOG1}:24: torn line (no newline)",
    t_forged_chain_checkpoint: f"{LOG1}:12: checkpoint signature invalid",
    t_forged_checkpoint_file: "checkpoints.jsonl:2: checkpoint signature invalid",
    t_edit_rechained: f"{LOG1}:12: checkpoint does not match record 11",
    t_edit_rechained_checkpoints_dropped:
        "checkpoints.jsonl:2: checkpoint disagrees with the chain at record 11",
    t_checkpoints_from_another_log: "checkpoints.jsonl:1: checkpoint disagrees with the chain at record 5",
}


@pytest.mark.parametrize("tamper", list(TAMPER), ids=lambda f: f.__name__[2:])
def test_tampering_is_detected(tmp_path: Path, tamper: Any) -> None:
    d = tmp_path / "audit"
    build(d)
    raw = lines(d)
    assert len(raw) == 24 and verify_dir(d, PUB).ok
    tamper(d, raw)
    report = verify_dir(d, PUB)
    assert not report.ok
    assert report.first_bad == TAMPER[tamper]
    code, result = main_verify(d, key=PUB_B64)
    assert code == 1 and result["first_bad"] == TAMPER[tamper] and result["message"].startswith("FAIL")


def test_main_verify_ok(tmp_path: Path) -> None:
    build(tmp_path)
    code, result = main_verify(tmp_path, key=PUB_B64)
    assert code == 0 and result["ok"] and result["records"] == 24 and result["checkpoints"] == 4
    kid = thumbprint(KEY.public_key())
    assert result["message"] == (
        f"OK: 24 records, 4 checkpoints verified (audit key {kid} from --key (inline))")
    json.dumps(result)


def test_exported_checkpoints_catch_truncation_the_local_copy_cannot(tmp_path: Path) -> None:
    d = tmp_path / "audit"
    build(d, groups=2)
    exported = tmp_path / "offhost.jsonl"
    shutil.copy(d / "checkpoints.jsonl", exported)
    build(d, groups=2)
    assert verify_dir(d, PUB, checkpoints=exported) == audit_verify.VerifyReport(True, 24, 2, None)
    # An intruder cuts the log back and trims the local checkpoints to match: locally consistent.
    _rewrite(d, lines(d)[:6])
    cps = (d / "checkpoints.jsonl").read_bytes().splitlines(keepends=True)
    (d / "checkpoints.jsonl").write_bytes(cps[0])
    assert verify_dir(d, PUB).ok
    report = verify_dir(d, PUB, checkpoints=exported)
    assert report.first_bad == "offhost.jsonl:2: log ends at record 6, before checkpoint 11 (truncated)"
    assert main_verify(d, checkpoints=exported, key=PUB_B64)[0] == 1
    assert not verify_dir(d, PUB, checkpoints=tmp_path / "missing.jsonl").ok


def test_pinned_public_key(tmp_path: Path) -> None:
    build(tmp_path, groups=1)
    for form in (PUB, audit_files.public_pem(KEY.public_key()), PUB_B64.encode(), json.dumps(
            {"kty": "OKP", "crv": "Ed25519", "x": PUB_B64}).encode()):
        assert verify_dir(tmp_path, form).ok
    other = Ed25519PrivateKey.generate().public_key()
    raw = other.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert verify_dir(tmp_path, raw).first_bad == (
        f"{tmp_path.name}: no checkpoint signed by the pinned key {thumbprint(other)} "
        "(rewritten, or signed by another key)")


def test_checkpoints_under_an_earlier_key_count_only_before_the_first_under_the_pinned_one(
        tmp_path: Path) -> None:
    """A log begun when each worker signed with a key of its own (kept in its directory) still verifies:
    the first checkpoint under the pinned key covers what came before it through the chain."""
    earlier = Ed25519PrivateKey.generate()
    build(tmp_path, groups=2, key=earlier)
    build(tmp_path, groups=1)  # the pinned KEY from here on
    assert verify_dir(tmp_path, PUB) == audit_verify.VerifyReport(True, 18, 3, None)
    # A checkpoint under another key after one under the pinned key is a forgery.
    log = AuditLog.open(tmp_path, key=earlier)
    log.start()
    check(log, 99)
    log.stop()
    assert verify_dir(tmp_path, PUB).first_bad == (
        f"{LOG1}:20: checkpoint signed by unknown key {thumbprint(earlier.public_key())!r}")


def test_records_after_the_last_checkpoint_are_reported_not_yet_signed(tmp_path: Path) -> None:
    build(tmp_path, groups=1)
    last = lines(tmp_path)[-1]
    record = {"seq": json.loads(last)["seq"] + 1, "prev": sha(last[:-1]), "ts": 1.0, "kind": "check"}
    with open(tmp_path / LOG1, "ab") as f:
        f.write(json.dumps(record, separators=(",", ":")).encode() + b"\n")
    assert verify_dir(tmp_path, PUB) == audit_verify.VerifyReport(True, 7, 1, None, unsigned_tail=1)
    code, result = main_verify(tmp_path, key=PUB_B64)
    assert code == 0
    assert result["message"].endswith("; 1 records after the last checkpoint are not yet signed")


@pytest.mark.parametrize("tail", [b'{"seq":25,"prev":"ab', b"garbage\n", b'{"seq":25}\n{"se'])
def test_torn_tail_is_cut_and_recorded(tmp_path: Path, tail: bytes) -> None:
    build(tmp_path)
    good = (tmp_path / LOG1).read_bytes()
    (tmp_path / LOG1).write_bytes(good + tail)
    log = AuditLog.open(tmp_path, key=KEY)
    assert (tmp_path / LOG1).read_bytes() == good
    log.start()
    assert log.record("mint", token_id="tok-after")
    log.stop()
    recs = records(tmp_path)
    cut = recs[24]
    assert cut["seq"] == 25 and cut["kind"] == "audit_truncated"
    assert cut["prev"] == sha(good.splitlines()[-1])
    assert cut["bytes_cut"] == len(tail) and cut["offset"] == len(good) and cut["file"] == LOG1
    assert cut["cut_sha256"] == hashlib.sha256(tail).hexdigest()
    assert recs[25]["kind"] == "mint"
    assert verify_dir(tmp_path, PUB).ok


def test_torn_checkpoints_file_is_cut(tmp_path: Path) -> None:
    build(tmp_path, groups=2)
    with open(tmp_path / "checkpoints.jsonl", "ab") as f:
        f.write(b'{"seq":99,"ha')
    AuditLog.open(tmp_path, key=KEY).stop()
    cut = [r for r in records(tmp_path) if r["kind"] == "audit_truncated"]
    assert [(c["file"], c["bytes_cut"]) for c in cut] == [("checkpoints.jsonl", 13)]
    assert verify_dir(tmp_path, PUB) == audit_verify.VerifyReport(True, 14, 3, None)


def test_jws_looking_values_are_redacted_by_the_writer(tmp_path: Path) -> None:
    token = Forge().token()
    log = AuditLog.open(tmp_path, key=KEY)
    for bad in ({"token": token}, {"chain": ["a", token]}, {"intent": f"Bearer {token}"},
                {"meta": {"header": f"authorization: Bearer {token}"}}):
        assert log.record("check", **bad)  # never refused: a request path could carry one
    with pytest.raises(ValueError):
        log.record("check", prev="x")
    with pytest.raises(ValueError):
        log.record("checkpoint")
    # Short or non-JWS values that merely start alike are kept as they are.
    assert log.record("check", token_id="eyJ.a.b", intent="eyJust saying", n=3, chain=None)
    log.stop()
    written = b"".join(lines(tmp_path))
    assert token.encode() not in written
    assert written.count(audit_records.REDACTED.encode()) == 4
    assert b"eyJust saying" in written and b"eyJ.a.b" in written


def test_prepared_check_records_chain_escape_and_redact(tmp_path: Path) -> None:
    """record_check writes the same JSON a dict would, inside the chain, with hostile ids tamed."""
    token = Forge().token()
    log = AuditLog.open(tmp_path, key=KEY)
    prepared = audit_records.prepare(decision=True, reason="allow", target='quote" and \\ and \n', chain=[],
                             intent=f"Bearer {token}")
    assert log.record("check", token_id="first")
    assert log.record_check("d1", 'evil", "decision": true, "x": "', prepared)
    assert log.record_check("d2", f"Bearer {token}", prepared)
    assert log.record_check("d3", "", prepared)
    log.stop()
    written = b"".join(lines(tmp_path))
    assert token.encode() not in written
    checks = [r for r in records(tmp_path) if r["kind"] == "check" and "decision_id" in r]
    assert [r["decision_id"] for r in checks] == ["d1", "d2", "d3"]
    assert checks[0]["request_id"] == 'evil", "decision": true, "x": "'  # a value, not new members
    assert checks[1]["request_id"] == f"Bearer {audit_records.REDACTED}"
    assert checks[2]["request_id"] is None
    assert all(r["target"] == 'quote" and \\ and \n' and r["intent"] == f"Bearer {audit_records.REDACTED}"
               and r["decision"] is True for r in checks)
    assert verify_dir(tmp_path, PUB).ok


def test_record_check_refuses_when_full_or_closed(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path, key=KEY, queue_max=2)
    prepared = audit_records.prepare(reason="allow")
    assert log.record_check("a", "", prepared) and log.record_check("b", "", prepared)
    assert not log.record_check("c", "", prepared)
    log.stop()
    assert not log.record_check("d", "", prepared)
    assert [r.get("decision_id") for r in records(tmp_path) if r["kind"] == "check"] == ["a", "b"]


def test_queue_full_refuses_without_blocking(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path, key=KEY, queue_max=3)
    assert [check(log, i) for i in range(5)] == [True, True, True, False, False]
    assert log.pending == 3 and not log.healthy and not log.flush(0.1)
    log.stop()  # drains what was taken: nothing that returned True is lost
    assert not check(log, 9), "a stopped log takes nothing"
    assert [r["target"] for r in records(tmp_path) if r["kind"] == "check"] == ["t0", "t1", "t2"]
    assert verify_dir(tmp_path, PUB).ok


def test_disk_full_holds_records_then_writes_them_all(tmp_path: Path, monkeypatch: Any) -> None:
    with tmpfs(tmp_path / "fs", "64k") as fs:
        _disk_full_holds_records_then_writes_them_all(fs, monkeypatch)


def _disk_full_holds_records_then_writes_them_all(fs: Path, monkeypatch: Any) -> None:
    attempts = []
    real_append = audit_batches.append

    def counting_append(fd: int, offset: int, data: bytes, retry: bool, sync: bool = True) -> int:
        attempts.append(time.monotonic())
        return real_append(fd, offset, data, retry, sync)

    monkeypatch.setattr(audit_batches, "append", counting_append)
    log = None
    try:
        d = fs / "audit"
        log = AuditLog.open(d, key=KEY, flush_interval=0.01, batch_size=8, queue_max=40)
        log.start()
        taken = [i for i in range(5) if check(log, i)]
        assert log.flush() and log.healthy
        fill(fs / "filler")
        # Records big enough not to fit in the log file's last partly used page.
        taken += [i for i in range(5, 25) if check(log, i, note="x" * 1000)]
        assert taken == list(range(25))
        assert wait_for(lambda: not log.healthy), "ENOSPC must turn the log unhealthy"
        assert not log.flush(0.2)
        more = [check(log, i) for i in range(25, 200)]
        assert True in more and more[-1] is False, "records are taken until the queue is full"
        taken += [i for i, ok in zip(range(25, 200), more, strict=True) if ok]
        assert not log.healthy
        failing_since = time.monotonic()
        time.sleep(0.5)
        retries = sum(t >= failing_since for t in attempts)
        assert retries <= 20, f"capped backoff, not a busy loop: {retries} tries in 0.5s"
        (fs / "filler").unlink()
        assert wait_for(lambda: log.healthy)
        assert log.flush() and log.pending == 0
        log.stop()
        recs = records(d)
        assert [r["target"] for r in recs if r["kind"] == "check"] == [f"t{i}" for i in taken]
        assert verify_dir(d, PUB).ok
    finally:
        if log is not None:
            log.stop(timeout=1)
        subprocess.run(["umount", "-l", str(fs)], check=False)


def test_checkpoint_every_n_batches_and_final(tmp_path: Path) -> None:
    build(tmp_path, groups=5, per=2, checkpoint_every=2)
    kinds = [r["kind"] for r in records(tmp_path)]
    # Batches 2 and 4 are checkpointed; the 5th batch gets the final checkpoint from stop().
    assert [i + 1 for i, k in enumerate(kinds) if k == "checkpoint"] == [5, 10, 13]
    assert verify_dir(tmp_path, PUB) == audit_verify.VerifyReport(True, 13, 3, None)


def test_torn_line_alone_in_a_new_file(tmp_path: Path) -> None:
    build(tmp_path, groups=3, max_file_bytes=1500)
    last_seq = records(tmp_path)[-1]["seq"]
    fresh = tmp_path / f"audit-{last_seq + 1:010d}.jsonl"
    fresh.write_bytes(b'{"seq":%d,"pr' % (last_seq + 1))  # crashed mid-way through its first line
    log = AuditLog.open(tmp_path, key=KEY)
    log.start()
    log.record("revoke", token_id="tok-9")
    log.stop()
    recs = json.loads(fresh.read_bytes().splitlines()[0])
    assert recs["seq"] == last_seq + 1 and recs["kind"] == "audit_truncated" and recs["offset"] == 0
    assert verify_dir(tmp_path, PUB).ok


def test_unencodable_fields_do_not_kill_the_writer(tmp_path: Path) -> None:
    loop: dict[str, Any] = {}
    loop["self"] = loop
    log = AuditLog.open(tmp_path, key=KEY)
    log.start()
    assert log.record("check", meta=loop)  # written with the loop cut, not a dead writer
    assert log.record("check", meta={("tuple", "key"): 1}, when=object())
    assert log.record("check", token_id="tok-2")
    assert log.flush() and log.healthy
    log.stop()
    recs = records(tmp_path)
    assert "[nested too deep]" in json.dumps(recs[0]["meta"])
    assert recs[1]["unencodable"] == ["meta", "when"] and recs[2]["token_id"] == "tok-2"
    assert verify_dir(tmp_path, PUB).ok


def test_record_racing_stop_is_never_lost(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=0.001, batch_size=64, queue_max=2000)
    log.start()
    taken: list[list[str]] = [[] for _ in range(4)]

    def hammer(mine: list[str], w: int) -> None:
        for i in range(100000):
            if log.record("check", token_id=f"{w}-{i}"):
                mine.append(f"{w}-{i}")
            elif log._closed:
                return

    threads = [threading.Thread(target=hammer, args=(taken[w], w)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.05)
    log.stop()
    for t in threads:
        t.join()
    written = [r["token_id"] for r in records(tmp_path) if r["kind"] == "check"]
    assert sorted(written) == sorted(sum(taken, [])) and written
    assert verify_dir(tmp_path, PUB).ok


TEXTS = st.one_of(st.text(), st.sampled_from(["eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhZ2VudCIsImV4cCI6MX0.c2ln" * 2,
                                              "é\u2028\"\\\x00", "spiffe://dev.local/agent/a"]))
JSON_VALUES = st.one_of(st.none(), st.booleans(), TEXTS, st.lists(TEXTS, max_size=3), st.integers(),
                        st.floats(allow_nan=False), st.dictionaries(st.text(), TEXTS, max_size=2),
                        st.lists(st.one_of(st.integers(), TEXTS), max_size=3))


@given(st.dictionaries(st.text(min_size=1), JSON_VALUES, max_size=8))
def test_prepare_writes_what_the_json_encoder_writes(fields: dict[str, Any]) -> None:
    """prepare's own encoding of strings, None, booleans and lists of strings is the encoder's, byte
    for byte (tokens redacted alike); anything else goes through the encoder itself."""
    expected = audit_records._dumps(audit_records._redacted_fields(fields)).decode()[1:-1]
    assert audit_records.prepare(**fields) == expected
    assert json.loads("{" + audit_records.prepare(**fields) + "}") == json.loads("{" + expected + "}")


CHECK_TEXTS = st.one_of(TEXTS, st.sampled_from(["allow", "scope_denied", "e", "yJ", "read"]))


TOKEN_FIELDS = st.tuples(CHECK_TEXTS, CHECK_TEXTS, CHECK_TEXTS, st.lists(CHECK_TEXTS, max_size=3),
                         st.one_of(st.none(), CHECK_TEXTS))


@given(CHECK_TEXTS, st.tuples(CHECK_TEXTS, CHECK_TEXTS, CHECK_TEXTS, CHECK_TEXTS),
       st.one_of(st.none(), TOKEN_FIELDS))
def test_check_members_are_what_prepare_writes(reason: str, request: tuple[str, ...],
                                               token: tuple[Any, ...] | None) -> None:
    """A Check's record members, formatted in one go, are prepare's byte for byte, with every
    token-shaped value redacted alike (also one split across two values, which takes prepare)."""
    tool, target, operation, sensitivity = request
    fields = dict(decision=reason == "allow", reason=reason, tool=tool, target=target, operation=operation,
                  sensitivity=sensitivity, agent=None, task=None, token_id=None, chain=None, intent=None)
    if token is None:
        members = audit_records.check_members(reason, *request)
    else:
        agent, task, token_id, chain, intent = token
        fields.update(agent=agent, task=task, token_id=token_id, chain=chain, intent=intent)
        members = audit_records.check_members(reason, *request, (agent, task, token_id, tuple(chain), intent))
    assert members == audit_records.prepare(**fields)
    assert "eyJhbGciOiJFZERTQSJ9." not in members  # the token among TEXTS never reaches the log


def watch_appends(monkeypatch: Any) -> list[bool]:
    """Per append of the audit log from now on: fsynced or not; and True for each fsync of its own
    (the writer's, after a checkpoint batch: _copy_checkpoint), once it has returned."""
    synced: list[bool] = []
    real_append, real_fsync = audit_batches.append, os.fsync

    def watching_append(fd: int, offset: int, data: bytes, retry: bool, sync: bool = True) -> int:
        synced.append(sync)
        return real_append(fd, offset, data, retry, sync)

    def watching_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(True)

    monkeypatch.setattr(audit_batches, "append", watching_append)
    monkeypatch.setattr(audit_batches.os, "fsync", watching_fsync)
    return synced


def test_a_flush_is_answered_only_after_an_fsync_even_when_the_loop_writes_the_batch(
        tmp_path: Path, monkeypatch: Any) -> None:
    """flush() (Mint, Revoke and approvals wait on it) promises fsync. The loop thread also writes
    batches, unsynced, for allows waiting on the writer (record_check_durable): a flush queued ahead of
    such an allow must still be answered only after the writer's fsync, never by the loop's write."""
    synced = watch_appends(monkeypatch)
    prepared = audit_records.prepare(decision=True, reason="allow", agent="spiffe://dev.local/agent/alpha")
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=30)  # the writer sleeps until woken
    log.start()
    try:
        log.record("start")
        assert log.flush()
        flushed = threading.Event()
        log._q.append(flushed)  # what flush() queues, caught before the writer has woken to take it

        async def allow_behind_the_flush() -> bool:
            durable = log.record_check_durable("d-1", "", prepared)
            assert durable is not None
            await asyncio.sleep(0)  # the loop's _kick runs now
            answered_unsynced = flushed.is_set() and True not in synced[before:]
            await asyncio.wait_for(durable, 10)
            return answered_unsynced

        before = len(synced)
        assert not asyncio.run(allow_behind_the_flush()), "a flush answered by an unsynced write"
        assert flushed.wait(10) and True in synced[before:]
    finally:
        log.stop()
    assert [r["decision_id"] for r in records(tmp_path) if r["kind"] == "check"] == ["d-1"]
    assert verify_dir(tmp_path, PUB).ok


def test_allows_the_writer_commits_are_written_not_fsynced_batch_by_batch(tmp_path: Path,
                                                                          monkeypatch: Any) -> None:
    """An allow that finds the writer busy is answered once the writer has written it, as an inline
    allow is: an fsync per such batch kept the writer in fsync, holding the log, and sent more allows
    its way. The next checkpoint or flush() fsyncs them."""
    synced = watch_appends(monkeypatch)
    prepared = audit_records.prepare(decision=True, reason="allow", agent="spiffe://dev.local/agent/alpha")
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=5)  # a checkpoint just written: none due for 5 s
    log.start()
    try:
        log.record("start")
        assert log.flush()

        async def allows_while_the_writer_holds_the_log() -> None:
            with log._mutex:  # the writer mid-batch: the loop's _kick cannot write these
                waiting = [log.record_check_durable(f"d-{i}", "", prepared) for i in range(5)]
                await asyncio.sleep(0)
            await asyncio.wait_for(asyncio.gather(*waiting), 10)  # type: ignore[arg-type]

        before = len(synced)
        asyncio.run(allows_while_the_writer_holds_the_log())
        assert synced[before:] == [False], "the writer's batch of waiting allows was fsynced"
        on_disk = b"".join(p.read_bytes() for p in tmp_path.glob("audit-*.jsonl"))
        assert all(f'"decision_id":"d-{i}"'.encode() in on_disk for i in range(5))
        assert log.flush() and synced[-1] is True  # flush() still promises an fsync
    finally:
        log.stop()
    checks = [r["decision_id"] for r in records(tmp_path) if r["kind"] == "check"]
    assert checks == [f"d-{i}" for i in range(5)]
    assert verify_dir(tmp_path, PUB).ok


def test_a_flush_with_nothing_queued_still_fsyncs_what_was_written_unsynced(tmp_path: Path,
                                                                             monkeypatch: Any) -> None:
    """Between checkpoints (here every 5 batches) allows are written unsynced; a flush() that finds
    nothing new to write must still fsync them before it answers."""
    prepared = audit_records.prepare(decision=True, reason="allow", agent="spiffe://dev.local/agent/alpha")
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=30, checkpoint_every=5)
    log.start()
    fsynced: list[int] = []
    real_fsync = os.fsync
    try:
        log.record("start")
        assert log.flush()

        async def one_waiting_allow() -> None:
            with log._mutex:
                waiting = log.record_check_durable("d-1", "", prepared)
                await asyncio.sleep(0)
            await asyncio.wait_for(waiting, 10)  # type: ignore[arg-type]

        asyncio.run(one_waiting_allow())
        monkeypatch.setattr(os, "fsync", lambda fd: (fsynced.append(fd), real_fsync(fd))[1])
        assert log.flush()
        assert log._fd in fsynced, "flush() answered with the allow's record unsynced"
    finally:
        log.stop()
    assert verify_dir(tmp_path, PUB).ok


def test_a_full_log_file_is_fsynced_before_it_is_closed(tmp_path: Path, monkeypatch: Any,
                                                        hot: _accel.HotPath) -> None:
    """Allows written inline (unsynced) fill a file; when the writer moves to the next file it must
    fsync the full one first: no later fsync ever reaches a closed file."""
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=30, max_file_bytes=4096, hot=hot)
    log.start()
    calls: list[tuple[str, int]] = []
    real_fsync, real_close = os.fsync, os.close
    try:
        log.record("start")
        assert log.flush()
        full, full_name = log._fd, log._fd_name
        written = 0
        while allow(log, f"d-{written}"):  # inline, as the Check's fast path writes
            written += 1
        assert written > 2 and log._fd_name == full_name  # the next does not fit: the writer moves on
        monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync", fd)), real_fsync(fd))[1])
        monkeypatch.setattr(os, "close", lambda fd: (calls.append(("close", fd)), real_close(fd))[1])
        log.record("next")
        assert log.flush()
        assert log._fd_name != full_name
        mine = [c for c, fd in calls if fd == full]  # the new file may reuse the number, after these
        assert mine[:2] == ["fsync", "close"], f"the full file was closed unsynced: {mine}"
    finally:
        log.stop()
    assert len([r for r in records(tmp_path) if r["kind"] == "check"]) == written
    assert verify_dir(tmp_path, PUB).ok


def test_a_key_inside_the_audit_directory_is_never_trusted(tmp_path: Path) -> None:
    audit_dir = tmp_path / "audit"
    build(audit_dir, groups=1)
    build(audit_dir / "worker-1", groups=1)
    planted = audit_dir / "planted.pem"
    planted.write_bytes(audit_files.public_pem(KEY.public_key()))  # even the right key: it proves nothing
    outside_link = tmp_path / "link.pem"
    outside_link.symlink_to(planted)
    inside_link = audit_dir / "link.pem"
    outside = tmp_path / "pinned.pem"
    outside.write_bytes(planted.read_bytes())
    inside_link.symlink_to(outside)
    for named in (planted, outside_link, inside_link):
        code, result = main_verify(audit_dir, key=str(named))
        assert code == 1 and "inside the audit directory" in result["first_bad"], result
    # A worker's log verified on its own: its parent is an audit directory, not the state directory.
    code, result = main_verify(audit_dir / "worker-1")
    assert code == 1 and "is an audit directory, not the state directory" in result["first_bad"]
    code, result = main_verify(audit_dir, key=str(outside))
    assert code == 0 and [log["log"] for log in result["logs"]] == [".", "worker-1"], result


def test_allows_are_written_inline_while_the_writer_fsyncs_a_checkpoint(tmp_path: Path, monkeypatch: Any,
                                                                        hot: _accel.HotPath) -> None:
    """The writer fsyncs a checkpoint batch after it has let go of the log: an allow arriving during that
    fsync is written inline (under load ~8% of allows otherwise waited, each costing several times an
    inline one), and the checkpoint is copied to the checkpoints file only once the fsync returned."""
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=30, hot=hot)
    log.start()
    in_fsync, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        if threading.current_thread() is log._thread and not release.is_set():
            in_fsync.set()
            assert release.wait(10)
        real_fsync(fd)

    try:
        log.record("start")
        assert log.flush()
        copied = (tmp_path / "checkpoints.jsonl").read_bytes()
        assert allow(log, "before")
        monkeypatch.setattr(os, "fsync", slow_fsync)
        log.record("next")
        flushed = threading.Thread(target=log.flush)
        flushed.start()  # wakes the writer: a batch, its checkpoint, its fsync
        assert in_fsync.wait(10)
        assert allow(log, "during"), "an allow waited for the writer's fsync"
        assert (tmp_path / "checkpoints.jsonl").read_bytes() == copied  # not yet durable: not copied
        release.set()
        flushed.join(10)
        assert (tmp_path / "checkpoints.jsonl").read_bytes() != copied
    finally:
        release.set()
        log.stop()
    checks = [r["decision_id"] for r in records(tmp_path) if r["kind"] == "check"]
    assert checks == ["before", "during"]
    assert verify_dir(tmp_path, PUB).ok


def copied_checkpoints(directory: Path) -> list[int]:
    """The seq of each checkpoint in the checkpoints file."""
    return [json.loads(line)["seq"] for line in (directory / "checkpoints.jsonl").read_bytes().splitlines()]


def test_a_checkpoint_whose_fsync_fails_is_never_copied_and_checks_deny_until_the_next(
        tmp_path: Path, monkeypatch: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The writer's fsync after a checkpoint batch fails (EIO: the kernel may have dropped the pages):
    the log reports unhealthy, that checkpoint never reaches the checkpoints file, and the writer
    writes and fsyncs a new one before the log is healthy again."""
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=0.05)
    log.start()
    real_fsync = os.fsync
    failures = [OSError(5, "Input/output error")]

    def failing_once(fd: int) -> None:
        if threading.current_thread() is log._thread and failures:
            raise failures.pop()
        real_fsync(fd)

    try:
        log.record("start")
        assert log.flush()
        copied = copied_checkpoints(tmp_path)
        monkeypatch.setattr(os, "fsync", failing_once)
        log.record("next")
        deadline = time.monotonic() + 10
        while failures and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not failures
        assert log.flush() and log.healthy
    finally:
        log.stop()
    cps = copied_checkpoints(tmp_path)
    in_log = [r["checkpoint"]["seq"] for r in records(tmp_path) if r["kind"] == "checkpoint"]
    # Reported as a failed write (healthy False until the retry's fsync), then recovered.
    assert "audit: write failed" in caplog.text and "audit: writing again" in caplog.text
    failed = [seq for seq in in_log if seq not in cps]
    assert len(failed) == 1 and cps[:len(copied)] == copied and cps[-1] > failed[0]
    assert verify_dir(tmp_path, PUB).ok


def test_an_allow_writes_the_records_queued_ahead_of_it_first(tmp_path: Path, hot: _accel.HotPath) -> None:
    """An allow that found the writer holding the log was queued (record_check_durable); the next
    inline allow writes it first rather than queueing behind it until the next loop iteration, even
    with the inline gate open before it was queued."""
    prepared = ALLOW
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=30, hot=hot)
    log.start()
    try:
        log.record("start")
        assert log.flush()
        assert allow(log, "gate") and allow(log, "open")

        async def queued_then_inline() -> bool:
            with log._mutex:  # the writer mid-batch: this one queues
                waiting = log.record_check_durable("queued", "", prepared)
            written = allow(log, "inline")  # before the loop's _kick has run
            await asyncio.wait_for(waiting, 10)  # type: ignore[arg-type]
            return written

        assert asyncio.run(queued_then_inline())
    finally:
        log.stop()
    assert [r["decision_id"] for r in records(tmp_path) if r["kind"] == "check"] == ["gate", "open", "queued",
                                                                                    "inline"]
    assert verify_dir(tmp_path, PUB).ok


def test_inline_allows_racing_every_other_writer_keep_one_chain(tmp_path: Path, hot: _accel.HotPath) -> None:
    """Allows written inline on one thread while another enqueues records and flushes, and the writer
    thread writes batches, signs checkpoints and moves through small files: the inline gate opens and
    shuts over and over. Each allow is written inline or, declined, queued as the Check queues it: every
    one is in the log once and in order, and the chain and every file are whole."""
    log = AuditLog.open(tmp_path, key=KEY, flush_interval=0.002, max_file_bytes=32768, hot=hot)
    log.start()
    stop, enqueued = threading.Event(), []

    def other_records() -> None:
        while not stop.is_set():
            assert log.record("rotation", n=len(enqueued))
            enqueued.append(len(enqueued))
            if len(enqueued) % 20 == 0:
                assert log.flush()
            time.sleep(0.001)

    other = threading.Thread(target=other_records)
    written, declined = [], []
    try:
        log.record("start")
        assert log.flush()
        other.start()
        for i in range(20000):
            if i % 100 == 0:
                time.sleep(0.0001)  # the other threads get the GIL, as between a loop's requests
            if allow(log, f"a{i}", f"r{i}"):
                written.append(f"a{i}")
            else:
                assert log.record_check(f"a{i}", f"r{i}", ALLOW)
                declined.append(f"a{i}")
    finally:
        stop.set()
        other.join(10)
        log.stop()
    recs = records(tmp_path)
    assert [r["seq"] for r in recs] == list(range(1, len(recs) + 1))
    assert [r["decision_id"] for r in recs if r["kind"] == "check"] == [f"a{i}" for i in range(20000)]
    assert [r["n"] for r in recs if r["kind"] == "rotation"] == enqueued
    assert len(written) > 2000 and declined and len(enqueued) > 10, (len(written), len(declined))
    files = audit_files.log_files(tmp_path)
    assert len(files) > 5  # moved through files (a batch of queued ones may overfill one: as ever)
    report = verify_dir(tmp_path, PUB)
    assert report.ok and report.records == len(recs)


def test_an_inline_allow_the_disk_refuses_is_withdrawn_and_written_once_it_can(tmp_path: Path,
                                                                              hot: _accel.HotPath) -> None:
    """The disk fills under the inline gate: that allow raises AuditUnavailable (the Check answers
    audit_unavailable), the allows before it stay whole in the file, its record is written once the disk
    takes it again, followed by the record that withdraws it; meanwhile allows are declined."""
    with tmpfs(tmp_path / "fs", "64k") as fs:
        directory = fs / "audit"
        log = AuditLog.open(directory, key=KEY, flush_interval=30, hot=hot)
        log.start()
        try:
            log.record("start")
            assert log.flush()
            assert allow(log, "first") and allow(log, "second")  # the second through the open gate
            fill(fs / "filler")
            # Bigger than what is left of the file's last, partly used page: a short write, then ENOSPC.
            big = audit_records.prepare(decision=True, reason="allow", note="x" * 8192)
            with pytest.raises(AuditUnavailable):
                allow(log, "doomed", prepared=big)
            assert not log.healthy
            assert not allow(log, "declined")  # nothing recorded: the Check waits or denies
            (fs / "filler").unlink()
            assert wait_for(lambda: log.healthy) and log.flush()
            assert allow(log, "after")
        finally:
            log.stop()
        recs = records(directory)
        kinds = [(r["kind"], r.get("decision_id") or r.get("decision_ids")) for r in recs
                 if r["kind"] in ("check", WITHDRAWN)]
        assert kinds == [("check", "first"), ("check", "second"), ("check", "doomed"),
                         (WITHDRAWN, ["doomed"]), ("check", "after")]
        assert verify_dir(directory, PUB).ok
