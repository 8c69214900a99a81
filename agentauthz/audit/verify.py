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
from .files import CHECKPOINTS, KEY_DIR, PINNED_FILE, log_files, parse_line
from .records import _canon, thumbprint

WORKER_LOGS = "worker-*"  # each Check worker's own log, in a subdirectory of the primary's


@dataclass
class VerifyReport:
    """Outcome of verify_dir; ``checkpoints`` counts checkpoints-file entries checked against the chain.

    ``unsigned_tail``: records after the last checkpoint under the pinned key (written since, or a crash).
    """

    ok: bool
    records: int
    checkpoints: int
    first_bad: str | None = None
    unsigned_tail: int = 0


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
    A log with records must have at least one checkpoint under ``public_key``.
    """
    directory = Path(directory)
    cp_path = Path(checkpoints) if checkpoints is not None else directory / CHECKPOINTS
    try:
        key = _public_key(public_key)
        anchors = cp_path.read_bytes() if checkpoints is not None or cp_path.exists() else b""
    except (OSError, ValueError) as exc:
        return VerifyReport(False, 0, 0, f"cannot read key or checkpoints: {exc}")
    kid, records, seq, prev, where, last_file = thumbprint(key), 0, 0, GENESIS, cp_path.name, ""
    first_pinned = signed_to = 0  # seq of the first and of the last record a pinned checkpoint covers

    def bad(line_no: int, why: str) -> VerifyReport:
        return VerifyReport(False, records, 0, f"{where}:{line_no}: {why}")

    entries = [(n, parse_line(raw, chained=False), raw) for n, raw in enumerate(anchors.splitlines(True), 1)]
    for n, cp, raw in entries:
        if cp is None or not raw.endswith(b"\n"):
            return bad(n, "not a checkpoint")
    wanted: dict[int, tuple[str, str] | None] = {cp["seq"]: None for _, cp, _ in entries if cp}
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
    return VerifyReport(True, records, len(entries), unsigned_tail=max(0, records - signed_to - 1))


def log_dirs(directory: Path) -> list[tuple[str, Path]]:
    """(name, directory) of the primary's log ("") and of every worker's log under it."""
    directory = Path(directory)
    return [("", directory)] + [(p.name, p) for p in sorted(directory.glob(WORKER_LOGS)) if p.is_dir()]


def verify_logs(directory: Path, public_key: bytes,
                checkpoints: Path | None = None) -> list[tuple[str, VerifyReport]]:
    """The primary's log in ``directory`` and every worker's log under it, all under one key.

    ``checkpoints`` (an exported copy) is the primary's.
    """
    return [(name, verify_dir(where, public_key, None if name else checkpoints))
            for name, where in log_dirs(directory)]


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
    message = (f"OK: {records} records, {cps} checkpoints verified{logs}" if bad is None
               else f"FAIL: {first_bad}") + f" (audit key {kid} from {source})"
    if bad is None and tail:
        message += f"; {tail} records after the last checkpoint are not yet signed"
    if bad is None and anchored:
        message += f"; and against {sum(r.checkpoints for _, r in anchored)} checkpoints the cluster holds"
    result.update(ok=bad is None, records=records, checkpoints=cps, first_bad=first_bad, message=message,
                  key=source, key_id=kid, logs=[{"log": name or ".", "ok": r.ok, "records": r.records,
                                                 "first_bad": r.first_bad} for name, r in reports])
    return (0 if bad is None else 1), result
