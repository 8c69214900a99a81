"""``agentauthz audit verify``: the hash chain, sequence and signed checkpoints of an audit log, offline."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ._chain_py import GENESIS
from .audit_files import CHECKPOINTS, PUB_FILE, log_files, parse_line
from .audit_records import _canon, thumbprint


@dataclass
class VerifyReport:
    """Outcome of verify_dir; ``checkpoints`` counts checkpoints-file entries checked against the chain."""

    ok: bool
    records: int
    checkpoints: int
    first_bad: str | None = None


def _public_key(directory: Path, public_key: bytes | None) -> Ed25519PublicKey:
    data = public_key if public_key is not None else (directory / PUB_FILE).read_bytes()
    key = Ed25519PublicKey.from_public_bytes(data) if len(data) == 32 else \
        serialization.load_pem_public_key(data)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("audit public key is not Ed25519")
    return key


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


def verify_dir(directory: Path, public_key: bytes | None = None,
               checkpoints: Path | None = None) -> VerifyReport:
    """Verify every line, the seq and hash chain, and every signed checkpoint (log and checkpoints file)."""
    directory = Path(directory)
    cp_path = Path(checkpoints) if checkpoints is not None else directory / CHECKPOINTS
    try:
        key = _public_key(directory, public_key)
        anchors = cp_path.read_bytes() if checkpoints is not None or cp_path.exists() else b""
    except (OSError, ValueError) as exc:
        return VerifyReport(False, 0, 0, f"cannot read key or checkpoints: {exc}")
    kid, records, seq, prev, where, last_file = thumbprint(key), 0, 0, GENESIS, cp_path.name, ""

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
                    why = _check_sig(key, kid, cp, rec.get("sig"))
                    if why is None and isinstance(cp, dict):
                        if cp.get("seq") != seq or cp.get("hash") != prev:
                            why = f"checkpoint does not match record {seq}"
                        elif cp.get("file") != last_file:
                            why = f"checkpoint names file {cp.get('file')!r} for record {seq}"
                    if why:
                        return bad(n, why)
                seq, prev, records, last_file = seq + 1, hashlib.sha256(line).hexdigest(), records + 1, where
                if seq in wanted:
                    wanted[seq] = (prev, where)
    where = cp_path.name
    for n, cp, _ in entries:
        assert cp is not None
        why = _check_sig(key, kid, {k: v for k, v in cp.items() if k != "sig"}, cp.get("sig"))
        if why:
            return bad(n, why)
        if cp["seq"] > seq:
            return bad(n, f"log ends at record {seq}, before checkpoint {cp['seq']} (truncated)")
        if wanted[cp["seq"]] != (cp.get("hash"), cp.get("file")):
            return bad(n, f"checkpoint disagrees with the chain at record {cp['seq']}")
    return VerifyReport(True, records, len(entries))


def main_verify(directory: Path, checkpoints: Path | None = None,
                public_key: Path | None = None) -> tuple[int, dict[str, Any]]:
    """`agentauthz audit verify`: (exit code, 0 ok / 1 bad; result dict with a one-line ``message``)."""
    r = verify_dir(Path(directory), Path(public_key).read_bytes() if public_key else None, checkpoints)
    message = (f"OK: {r.records} records, {r.checkpoints} checkpoints verified" if r.ok
               else f"FAIL: {r.first_bad}")
    return (0 if r.ok else 1), {"ok": r.ok, "records": r.records, "checkpoints": r.checkpoints,
                                "first_bad": r.first_bad, "directory": str(directory), "message": message}
