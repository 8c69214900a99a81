"""``agentauthz audit verify``: the hash chain, sequence and signed checkpoints of an audit log, offline.

Trust comes from the public key the operator pinned, never from a file in the audit directory:
whoever can write the log could write such a file too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..decision._chain_py import GENESIS
from ..errors import AgentAuthzError
from .files import CHECKPOINTS, KEY_DIR, PINNED_FILE, WORKER_LOG, log_files, parse_line, worker_log
from .records import _canon, thumbprint

WORKER_LOGS = "worker-*"  # each Check worker's own log, in a subdirectory of the primary's
# Where a daemon's run begins in a log: the primary and each worker write "start" first, after the
# "audit_truncated" record of a torn tail it cut.
RUN_STARTS = ("start", "audit_truncated")


@dataclass
class VerifyReport:
    """Outcome of verify_dir; ``checkpoints`` counts checkpoints-file entries checked against the chain.

    ``unsigned_tail``: records after the last checkpoint under the pinned key (written since, or a crash).
    ``worker_logs``: the worker logs the chain says were written, each with the seq of the first record
    that says so; None when no start record lists them. ``unlisted``: a start record does not (it was
    written by an earlier version, which did not).
    """

    ok: bool
    records: int
    checkpoints: int
    first_bad: str | None = None
    unsigned_tail: int = 0
    worker_logs: dict[str, int] | None = None
    unlisted: bool = False


def _public_key(data: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from raw bytes, PEM, a JWK, or base64/base64url text of the raw key."""
    data = data.strip() if len(data) != 32 else data
    if len(data) == 32:
        return Ed25519PublicKey.from_public_bytes(data)
    if data.startswith(b"-----BEGIN"):
        key = serialization.load_pem_public_key(data)
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("audit public key is not Ed25519")
        return key
    if data.startswith(b"{"):
        jwk = json.loads(data)
        if not isinstance(jwk, dict) or (jwk.get("kty"), jwk.get("crv")) != ("OKP", "Ed25519") \
                or not isinstance(jwk.get("x"), str) or "d" in jwk:
            raise ValueError("not an Ed25519 public JWK")
        data = jwk["x"].encode()
    try:
        raw = base64.urlsafe_b64decode(data.replace(b"+", b"-").replace(b"/", b"_") + b"=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not an Ed25519 public key (PEM, JWK, or base64 of 32 bytes)") from None
    if len(raw) != 32:
        raise ValueError("not an Ed25519 public key (PEM, JWK, or base64 of 32 bytes)")
    return Ed25519PublicKey.from_public_bytes(raw)


def _inside(path: Path, directory: Path) -> bool:
    """Whether ``path``, as named or as resolved (a symlink either way), lies in ``directory``."""
    return any(p.is_relative_to(d) for p in (path.absolute(), path.resolve())
               for d in (directory.absolute(), directory.resolve()))


def pinned_key(directory: Path, key: str | None, state_dir: Path | None = None) -> tuple[bytes, str]:
    """(public key bytes, where they came from) for verifying ``directory``; raises ValueError.

    ``key``: a file (PEM, JWK, raw or base64) or the base64 key itself. Without it, the pinned copy the
    daemon keeps in <state>/audit-key/ (``state_dir``, else the audit directory's parent). A key file
    inside the audit directory is refused either way.
    """
    if key:
        path = Path(key)
        if path.is_file():
            if _inside(path, directory):
                raise ValueError(f"refusing {path}: a key inside the audit directory proves nothing")
            return path.read_bytes(), f"--key {path}"
        _public_key(key.encode())  # not a file: it must be the key itself
        return key.encode(), "--key (inline)"
    state = Path(state_dir) if state_dir else Path(directory).resolve().parent
    path = state / KEY_DIR / PINNED_FILE
    # A worker's log sits inside the primary's: its parent is an audit directory, not the state directory.
    if _inside(path, directory) or log_files(state) or (state / CHECKPOINTS).exists():
        raise ValueError(f"{state} is an audit directory, not the state directory: verify the primary's "
                         "log (its workers' logs are verified with it) or pass --key FILE-or-base64")
    if not path.is_file():
        raise ValueError(f"no pinned audit key at {path}: pass --key FILE-or-base64 (the key the daemon "
                         "logged at first start, or its /.well-known/agentauthz-audit-key)")
    return path.read_bytes(), str(path)


def _check_sig(key: Ed25519PublicKey, kid: str, cp: Any, sig: Any) -> str | None:
    if not isinstance(cp, dict) or not isinstance(sig, str):
        return "malformed checkpoint"
    if cp.get("kid") != kid:
        return f"checkpoint signed by unknown key {cp.get('kid')!r}"
    try:
        key.verify(base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4)), _canon(cp))
    except (InvalidSignature, ValueError):
        return "checkpoint signature invalid"
    return None


def verify_dir(directory: Path, public_key: bytes, checkpoints: Path | None = None) -> VerifyReport:
    """Verify every line, the seq and hash chain, and every signed checkpoint (log and checkpoints file).

    Checkpoints under another key are accepted only before the first under ``public_key`` (a log
    written before the key moved out of the audit directory): that first one covers them by the chain.
    A log with records must have at least one checkpoint under ``public_key``. The log's own
    checkpoints file (not an exported copy, which may be older) must hold every checkpoint under it
    but the last of each run (``_uncopied``).
    """
    directory = Path(directory)
    own = checkpoints is None
    cp_path = Path(checkpoints) if checkpoints is not None else directory / CHECKPOINTS
    try:
        key = _public_key(public_key)
        have_file = not own or cp_path.exists()
        anchors = cp_path.read_bytes() if have_file else b""
    except (OSError, ValueError) as exc:
        return VerifyReport(False, 0, 0, f"cannot read key or checkpoints: {exc}")
    kid, records, seq, prev, where, last_file = thumbprint(key), 0, 0, GENESIS, cp_path.name, ""
    first_pinned = signed_to = 0  # seq of the first and of the last record a pinned checkpoint covers
    uncopied = 0  # this run's pinned checkpoint that the log's own checkpoints file lacks
    late: VerifyReport | None = None  # more uncopied than a crash leaves: said after the file's own faults
    named: dict[str, int] | None = None
    unlisted = False  # a start record that does not list worker logs (an earlier version's)

    def bad(line_no: int, why: str) -> VerifyReport:
        return VerifyReport(False, records, 0, f"{where}:{line_no}: {why}")

    entries = [(n, parse_line(raw, chained=False), raw) for n, raw in enumerate(anchors.splitlines(True), 1)]
    for n, cp, raw in entries:
        if cp is None or not raw.endswith(b"\n"):
            return bad(n, "not a checkpoint")
    wanted: dict[int, tuple[str, str] | None] = {cp["seq"]: None for _, cp, _ in entries if cp}
    copied = max(wanted, default=0)
    for first, path in log_files(directory):
        where = path.name
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                line, rec = raw[:-1], parse_line(raw)
                if not raw.endswith(b"\n"):
                    return bad(n, "torn line (no newline)")
                if rec is None:
                    return bad(n, "not a record")
                if rec["seq"] != seq + 1:
                    return bad(n, f"seq {rec['seq']}, expected {seq + 1}")
                if n == 1 and first != rec["seq"]:
                    return bad(n, f"file name says first record {first}")
                if rec["prev"] != prev:
                    return bad(n, f"prev hash does not match record {seq}")
                if rec.get("kind") in RUN_STARTS:
                    uncopied, unlisted = 0, unlisted or (rec["kind"] == "start" and "worker_logs" not in rec)
                names = _named_logs(rec, named is not None)
                if isinstance(names, str):
                    return bad(n, names)
                if names is not None:
                    named = {name: seq + 1 for name in names} | (named or {})  # the first to name it
                if rec.get("kind") == "checkpoint":
                    cp = rec.get("checkpoint")
                    legacy = isinstance(cp, dict) and cp.get("kid") != kid and not first_pinned
                    why = None if legacy else _check_sig(key, kid, cp, rec.get("sig"))
                    if why is None and isinstance(cp, dict):
                        if cp.get("seq") != seq or cp.get("hash") != prev:
                            why = f"checkpoint does not match record {seq}"
                        elif cp.get("file") != last_file:
                            why = f"checkpoint names file {cp.get('file')!r} for record {seq}"
                    if why:
                        return bad(n, why)
                    if not legacy:
                        first_pinned, signed_to = first_pinned or seq, seq
                        if own and seq > copied:
                            why = _uncopied(have_file, uncopied, seq, copied)
                            late = late or (bad(n, why) if why else None)
                            uncopied = seq
                seq, prev, records, last_file = seq + 1, hashlib.sha256(line).hexdigest(), records + 1, where
                if seq in wanted:
                    wanted[seq] = (prev, where)
    where = cp_path.name
    pinned_seqs = [cp["seq"] for _, cp, _ in entries if cp and cp.get("kid") == kid]
    first_pinned = min([s for s in (first_pinned, *pinned_seqs) if s], default=seq + 1)
    for n, cp, _ in entries:
        assert cp is not None
        body = {k: v for k, v in cp.items() if k != "sig"}
        if cp.get("kid") == kid or cp["seq"] >= first_pinned:
            why = _check_sig(key, kid, body, cp.get("sig"))
            if why:
                return bad(n, why)
            signed_to = max(signed_to, cp["seq"])
        if cp["seq"] > seq:
            return bad(n, f"log ends at record {seq}, before checkpoint {cp['seq']} (truncated)")
        if wanted[cp["seq"]] != (cp.get("hash"), cp.get("file")):
            return bad(n, f"checkpoint disagrees with the chain at record {cp['seq']}")
    if records and not signed_to:
        return VerifyReport(False, records, 0, f"{directory.name}: no checkpoint signed by the pinned key "
                            f"{kid} (rewritten, or signed by another key)")
    return late or VerifyReport(True, records, len(entries), unsigned_tail=max(0, records - signed_to - 1),
                                worker_logs=named, unlisted=unlisted)


def _uncopied(have_file: bool, earlier: int, seq: int, copied: int) -> str | None:
    """Why a pinned checkpoint (of record ``seq``) missing from the log's own checkpoints file is not a
    crash's doing; None if it may be.

    The writer fsyncs the log, then appends each checkpoint to that file (batches._copy_checkpoint),
    which it creates before writing any record: a kill -9 between the two leaves out that run's last
    checkpoint, and only that one (a failed fsync drops one too, then writes another, which is copied).
    """
    if not have_file:
        return f"signed checkpoint of record {seq}, but {CHECKPOINTS} is missing (deleted?)"
    if earlier:
        return (f"checkpoints of records {earlier} and {seq} are missing from {CHECKPOINTS}, which ends at "
                f"record {copied}: a crash leaves out at most the last (cut back or replaced?)")
    return None


def _named_logs(rec: dict[str, Any], listed: bool) -> list[str] | str | None:
    """The worker logs ``rec`` says exist (None: it says nothing; text: why it is malformed).

    The primary lists its workers' logs in its start record and names a replacement worker's log when it
    records its restart; either only once the worker acknowledged it started, with a start record of its
    own fsynced (server.serve_worker). ``listed``: an earlier start record listed them (restart records of
    a daemon that did not list them prove nothing).
    """
    if rec.get("kind") == "start" and "worker_logs" in rec:
        names = rec["worker_logs"]
        if not isinstance(names, list) or not all(isinstance(x, str) and WORKER_LOG.fullmatch(x)
                                                  for x in names):
            return f"start record names {names!r} as worker logs"
        return names
    if listed and rec.get("kind") == "worker_restart" and rec.get("started") is True \
            and type(rec.get("worker")) is int and rec["worker"] > 0:
        return [worker_log(rec["worker"])]
    return None


def log_dirs(directory: Path) -> list[tuple[str, Path]]:
    """(name, directory) of the primary's log ("") and of every worker's log under it."""
    directory = Path(directory)
    return [("", directory)] + [(p.name, p) for p in sorted(directory.glob(WORKER_LOGS)) if p.is_dir()]


def verify_logs(directory: Path, public_key: bytes,
                checkpoints: Path | None = None) -> list[tuple[str, VerifyReport]]:
    """The primary's log in ``directory`` and every worker's log under it, all under one key.

    ``checkpoints`` (an exported copy) is the primary's. The primary's log and every worker log its
    chain names must be there with records: the daemon writes a start record in each before naming it.
    """
    directory = Path(directory)
    primary = verify_dir(directory, public_key, checkpoints)
    named = primary.worker_logs or {}
    reports = [("", _with_records(primary, "the daemon writes a start record first"))]
    found = dict(log_dirs(directory)[1:])
    for name in sorted(found.keys() | named.keys()):
        why = f"record {named[name]} of the primary's log names this log" if name in named else None
        if name not in found:
            reports.append((name, VerifyReport(False, 0, 0, f": missing, but {why} (deleted?)")))
        else:
            reports.append((name, _with_records(verify_dir(found[name], public_key), why)))
    return reports


def _with_records(report: VerifyReport, why: str | None) -> VerifyReport:
    """``report``, failed if it verified no record although ``why`` says the daemon wrote some."""
    if not report.ok or report.records or why is None:
        return report
    return VerifyReport(False, 0, report.checkpoints, f"audit-*.jsonl: no records, but {why} (deleted?)")


def main_verify(directory: Path, checkpoints: Path | None = None, key: str | None = None,
                state_dir: Path | None = None,
                also: Callable[[bytes], list[tuple[str, VerifyReport]]] | None = None
                ) -> tuple[int, dict[str, Any]]:
    """`agentauthz audit verify`: (exit code, 0 ok / 1 bad; result dict with a one-line ``message``).

    ``also(public_key)``: more reports under the same key (the cluster's copies of the checkpoints).
    """
    directory = Path(directory)
    result: dict[str, Any] = {"directory": str(directory), "key": None, "key_id": None, "logs": []}
    try:
        if not directory.is_dir():
            raise ValueError(f"{directory} is not a directory")
        public, source = pinned_key(directory, key, state_dir)
        kid = thumbprint(_public_key(public))
    except (OSError, ValueError) as exc:
        why = f"cannot use an audit key: {exc}"
        return 1, {**result, "ok": False, "records": 0, "checkpoints": 0, "first_bad": why,
                   "message": f"FAIL: {why}"}
    reports = verify_logs(directory, public, checkpoints)
    anchored: list[tuple[str, VerifyReport]] = []  # the same logs again, against the cluster's copies
    if also is not None:
        try:
            anchored = [(f"cluster:{name or '.'}", r) for name, r in also(public)]
        except AgentAuthzError as exc:
            why = f"cannot read the cluster's checkpoints: {exc}"
            anchored = [("cluster", VerifyReport(False, 0, 0, why))]
    bad = next(((name, r) for name, r in reports + anchored if not r.ok), None)
    first_bad = None if bad is None else f"{bad[0]}/{bad[1].first_bad}" if bad[0] else bad[1].first_bad
    records, cps = sum(r.records for _, r in reports), sum(r.checkpoints for _, r in reports)
    tail = sum(r.unsigned_tail for _, r in reports)
    logs = f" in {len(reports)} logs" if len(reports) > 1 else ""
    named = reports[0][1].worker_logs
    message = (f"OK: {records} records, {cps} checkpoints verified{logs}" if bad is None
               else f"FAIL: {first_bad}") + f" (audit key {kid} from {source})"
    if bad is None and tail:
        message += f"; {tail} records after the last checkpoint are not yet signed"
    if bad is None and named is None and reports[0][1].unlisted:
        message += ("; the primary's log does not list its worker logs (written by an earlier version): "
                    "a worker log deleted whole would go unnoticed")
    if bad is None and anchored:
        message += f"; and against {sum(r.checkpoints for _, r in anchored)} checkpoints the cluster holds"
    result.update(ok=bad is None, records=records, checkpoints=cps, first_bad=first_bad, message=message,
                  worker_logs=None if named is None else sorted(named),
                  key=source, key_id=kid, logs=[{"log": name or ".", "ok": r.ok, "records": r.records,
                                                 "first_bad": r.first_bad} for name, r in reports])
    return (0 if bad is None else 1), result
