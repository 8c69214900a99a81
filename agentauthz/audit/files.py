"""The audit log's files: appending with an undo, the signing key kept outside the log, a torn tail.

``writer.AuditLog`` writes through these; ``verify`` reads the same files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .. import durable
from ..errors import StateError

log = logging.getLogger("agentauthz.audit")  # the writer's logger: operators follow one name

CHECKPOINTS = "checkpoints.jsonl"
# Where the checkpoint key was kept before it moved out of the audit directory: migrated, never trusted.
KEY_FILE, PUB_FILE = "audit-key.pem", "audit-key.pub.pem"
# <state>/audit-key/: the signing key (owner-only) and the operator's pinned copy of its public key.
KEY_DIR, PRIVATE_FILE, PINNED_FILE = "audit-key", "audit-key.pem", "public.pem"
LOG_NAME = re.compile(r"audit-(\d{10,})\.jsonl")
# Check worker N's own log: a subdirectory of the primary's, named in the primary's log (audit verify).
WORKER_LOG = re.compile(r"worker-[1-9][0-9]*")


def worker_log(number: int) -> str:
    """The name of Check worker ``number``'s log directory under the primary's."""
    return f"worker-{number}"


def append(fd: int, offset: int, data: bytes, retry: bool, sync: bool = True) -> int:
    """Write ``data`` at ``offset`` and (``sync``) fsync; return the new end.

    A write that fails is undone before the error is raised: the whole lines a short write left
    would otherwise survive a crash as allows whose callers were told ``audit_unavailable``.
    """
    if retry:  # the undo of an earlier failed try may itself have failed
        os.ftruncate(fd, offset)
    view = memoryview(data)
    try:
        while view:  # a short write is how a full disk first shows; the next write raises
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    except OSError:
        try:
            os.ftruncate(fd, offset)
        except OSError:
            pass  # ``retry`` truncates again before the next try
        raise
    return offset + len(data)


def _read_private(path: Path) -> Ed25519PrivateKey:
    if path.stat().st_mode & 0o077:
        raise StateError(f"{path}: audit key must be owner-only (0600)")
    try:
        loaded = serialization.load_pem_private_key(path.read_bytes(), None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: an encrypted key
        raise StateError(f"{path}: unreadable audit key: {exc}") from exc
    if not isinstance(loaded, Ed25519PrivateKey):
        raise StateError(f"{path}: audit key is not Ed25519")
    return loaded


def _pem_private(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def open_key(key_dir: Path, audit_dir: Path) -> tuple[Ed25519PrivateKey, bool]:
    """The checkpoint signing key, kept in ``key_dir`` outside the audit log: (key, created now).

    Whoever can write the log must not be able to re-sign it, so neither the key nor the public key
    verify trusts lives beside the log. A key kept in the audit directory (as before) is moved here
    first, so the checkpoints it signed still verify under the pinned key.
    """
    key_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(key_dir, 0o700)
    path, pin = key_dir / PRIVATE_FILE, key_dir / PINNED_FILE
    legacy, legacy_pub = audit_dir / KEY_FILE, audit_dir / PUB_FILE
    created = False
    if not path.exists():
        if legacy.exists():
            durable.replace(path, _pem_private(_read_private(legacy)), 0o600)
            log.warning("audit: moved the checkpoint signing key out of the audit directory to %s", path)
        else:
            durable.replace(path, _pem_private(Ed25519PrivateKey.generate()), 0o600)
            created = True
    key = _read_private(path)
    pub = public_pem(key.public_key())
    if not pin.exists():
        durable.replace(pin, pub, 0o644)
    elif pin.read_bytes() != pub:
        raise StateError(f"{pin} (the pinned audit public key) does not match {path}")
    if legacy.exists():
        _drop_moved(legacy, legacy_pub, key, path)
    return key, created


def _drop_moved(legacy: Path, legacy_pub: Path, key: Ed25519PrivateKey, path: Path) -> None:
    """Remove the moved key from the audit directory: left there, it would only invite trusting it."""
    try:
        moved = _pem_private(_read_private(legacy)) == _pem_private(key)
    except StateError:
        moved = False
    if not moved:  # not ours to delete: someone put it there; it signs nothing
        log.warning("audit: ignoring %s: checkpoints are signed by %s only", legacy, path)
        return
    legacy.unlink()
    legacy_pub.unlink(missing_ok=True)
    durable.fsync_dir(legacy.parent)


def log_files(directory: Path) -> list[tuple[int, Path]]:
    found = ((LOG_NAME.fullmatch(p.name), p) for p in directory.glob("audit-*.jsonl"))
    return sorted((int(m.group(1)), p) for m, p in found if m)


def parse_line(line: bytes, chained: bool = True) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(obj, dict) and type(obj.get("seq")) is int
    return obj if ok and (not chained or isinstance(obj.get("prev"), str)) else None


def last_line(path: Path, chained: bool = True) -> tuple[int, bytes | None]:
    """(end offset of the last complete, parsable line; that line): everything after it is torn."""
    with open(path, "rb") as f:
        size, span = f.seek(0, os.SEEK_END), 1 << 16
        while True:  # read backwards in a growing window: startup cost does not grow with the file
            start = max(0, size - span)
            f.seek(start)
            buf = f.read(size - start)
            end = buf.rfind(b"\n")
            while end >= 0:
                begin = buf.rfind(b"\n", 0, end) + 1
                if begin == 0 and start > 0:
                    break  # the line may begin before the window
                if parse_line(buf[begin:end], chained) is not None:
                    return start + end + 1, buf[begin:end]
                end = begin - 1
            if start == 0:
                return 0, None
            span *= 4


def cut_tail(path: Path, keep: int) -> dict[str, Any] | None:
    """Truncate a torn tail after ``keep`` bytes; describe the cut by size and hash, never content."""
    size = path.stat().st_size
    if size <= keep:
        return None
    with open(path, "r+b") as f:
        f.seek(keep)
        digest = hashlib.sha256(f.read()).hexdigest()
        f.truncate(keep)
        os.fsync(f.fileno())
    log.warning("audit: cut %d torn bytes from %s", size - keep, path)
    return {"file": path.name, "offset": keep, "bytes_cut": size - keep, "cut_sha256": digest}
