"""The audit log's files: appending with an undo, the signing key, and finding (and cutting) a torn tail.

``audit.AuditLog`` writes through these; ``audit_verify`` reads the same files.
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
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from . import durable
from .errors import StateError

log = logging.getLogger("agentauthz.audit")  # audit.py's logger: operators follow one name

CHECKPOINTS, KEY_FILE, PUB_FILE = "checkpoints.jsonl", "audit-key.pem", "audit-key.pub.pem"
LOG_NAME = re.compile(r"audit-(\d{10,})\.jsonl")


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


def load_key(directory: Path) -> Ed25519PrivateKey:
    path, pub_path = directory / KEY_FILE, directory / PUB_FILE
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        durable.replace(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()), 0o600)
    elif path.stat().st_mode & 0o077:
        raise StateError(f"{path}: audit key must be owner-only (0600)")
    else:
        try:
            loaded = serialization.load_pem_private_key(path.read_bytes(), None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:  # TypeError: an encrypted key
            raise StateError(f"{path}: unreadable audit key: {exc}") from exc
        if not isinstance(loaded, Ed25519PrivateKey):
            raise StateError(f"{path}: audit key is not Ed25519")
        key = loaded
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    if not pub_path.exists():
        durable.replace(pub_path, pub, 0o644)
    elif pub_path.read_bytes() != pub:
        raise StateError(f"{pub_path} does not match {path}")
    return key


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
