"""Keyring of Ed25519 signing keys (EdDSA, RFC 8037): publish, rotate, retire, persist, serve JWKS."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nacl.signing import SigningKey

from .. import durable
from ..decision import tokens
from ..errors import StateError

log = logging.getLogger("agentauthz.keys")  # the name operators filter on, kept across the layout

NEXT, CURRENT, PREVIOUS, RETIRED = "next", "current", "previous", "retired"
METADATA = "keyring.json"
_FORMAT = 1
_FIELDS = ("kid", "state", "created_at", "activated_at", "deactivated_at")
# A kid is base64url(SHA-256): 43 characters, which also makes it safe as a file name.
_KID = re.compile(r"[A-Za-z0-9_-]{43}")


def thumbprint(public_key: bytes) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of an Ed25519 public key; used as its kid."""
    # RFC 7638 §3.2 / RFC 8037 §2: required members only, sorted, no whitespace.
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": tokens.b64url(public_key)}
    canonical = json.dumps(jwk, separators=(",", ":"), sort_keys=True).encode("ascii")
    return tokens.b64url(hashlib.sha256(canonical).digest())


@dataclasses.dataclass(frozen=True)
class _Key:
    kid: str
    state: str
    created_at: float
    activated_at: float | None = None
    deactivated_at: float | None = None
    # None once retired: a compromised key's private half is gone for good.
    signing_key: SigningKey | None = dataclasses.field(default=None, repr=False, compare=False)

    def meta(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _FIELDS}

    def public(self) -> bytes:
        assert self.signing_key is not None
        return bytes(self.signing_key.verify_key)


_Keys = list[_Key]  # an alias: inside Keyring, ``list`` names the method


def _generate(now: float) -> _Key:
    key = SigningKey.generate()
    return _Key(thumbprint(bytes(key.verify_key)), NEXT, now, signing_key=key)


def _read_owner_only(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise StateError(f"{path}: cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode) or mode & 0o077:
            raise StateError(f"{path}: must be a regular file accessible by its owner only "
                             f"(0600), found {stat.filemode(mode)}; refusing to start")
        return f.read()


def _read_private(path: Path, kid: str) -> SigningKey:
    data = _read_owner_only(path)
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise StateError(f"{path}: not a readable unencrypted PKCS#8 private key") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise StateError(f"{path}: not an Ed25519 private key")
    key = SigningKey(private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption()))
    if thumbprint(bytes(key.verify_key)) != kid:
        raise StateError(f"{path}: public key does not match kid {kid}")
    return key


def _pem(key: _Key) -> bytes:
    assert key.signing_key is not None
    return Ed25519PrivateKey.from_private_bytes(bytes(key.signing_key)).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _record(raw: Any) -> _Key:
    if not isinstance(raw, dict) or set(raw) != set(_FIELDS):
        raise ValueError(f"key entry must have exactly the fields {', '.join(_FIELDS)}")
    kid, state = raw["kid"], raw["state"]
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise ValueError(f"invalid kid {kid!r}")
    if state not in (NEXT, CURRENT, PREVIOUS, RETIRED):
        raise ValueError(f"key {kid}: unknown state {state!r}")
    times = [raw[name] for name in _FIELDS[2:]]
    for t in times:
        if t is not None and (type(t) not in (int, float) or not math.isfinite(t)):
            raise ValueError(f"key {kid}: times must be numbers or null")
    created, activated, deactivated = times
    if (created is None or (state == CURRENT and activated is None)
            or (state in (PREVIOUS, RETIRED)) != (deactivated is not None)):
        raise ValueError(f"key {kid}: times do not fit state {state!r}")
    return _Key(kid, state, created, activated, deactivated)


def _load(directory: Path) -> list[_Key] | None:
    """The persisted keys with their private halves, or None on first start."""
    path = directory / METADATA
    if not os.path.lexists(path):
        strays = sorted(directory.glob("*.pem"))
        if strays:
            raise StateError(f"{strays[0]}: key file present but {path} is missing; refusing to start")
        return None
    try:
        doc = json.loads(_read_owner_only(path))
        if doc.get("format") != _FORMAT:
            raise ValueError(f"unsupported format {doc.get('format')!r}")
        keys = [_record(raw) for raw in doc["keys"]]
        states = [k.state for k in keys]
        if states.count(CURRENT) != 1 or states.count(NEXT) != 1:
            raise ValueError("need exactly one current and one next key")
        if len({k.kid for k in keys}) != len(keys):
            raise ValueError("duplicate kid")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateError(f"{path}: corrupted keyring metadata: {exc}") from exc
    live = {k.kid for k in keys if k.state != RETIRED}
    for pem in directory.glob("*.pem"):
        # A retirement interrupted before its unlink, or a key written by a change that
        # crashed before its metadata landed (so never published): neither may sign again.
        if pem.stem not in live:
            log.warning("removing key file %s: not a live key in %s", pem, path)
            pem.unlink()
    return [dataclasses.replace(k, signing_key=_read_private(directory / f"{k.kid}.pem", k.kid))
            if k.kid in live else k for k in keys]


class Keyring:
    """One current signer, a published next key, previous keys until their tokens expire."""

    def __init__(self, directory: Path, *, rotation_interval: float, max_token_lifetime: int,
                 leeway: int, clock: Callable[[], float]) -> None:
        """Use ``Keyring.open``; this makes an empty, unpersisted keyring."""
        self._dir = directory
        self._interval = rotation_interval
        # A token signed at deactivation lives at most max lifetime, plus the verifier's leeway.
        self._horizon = max_token_lifetime + leeway
        self._clock = clock
        self._keys: _Keys = []
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[dict[str, bytes]], None]] = []

    @classmethod
    def open(cls, directory: Path, *, rotation_interval: float, max_token_lifetime: int, leeway: int,
             clock: Callable[[], float] = time.time) -> Keyring:
        """Load the keyring in ``directory``, or create it (current + next) on first start."""
        if rotation_interval <= 0 or max_token_lifetime <= 0 or leeway < 0:
            raise ValueError("rotation_interval and max_token_lifetime must be positive, leeway >= 0")
        directory = Path(directory)
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = os.stat(directory).st_mode
        except OSError as exc:
            raise StateError(f"{directory}: cannot create key directory: {exc.strerror}") from exc
        if not stat.S_ISDIR(mode) or mode & 0o077:
            raise StateError(f"{directory}: key directory must be accessible by its owner only (0700), "
                             f"found {stat.filemode(mode)}; refusing to start")
        ring = cls(directory, rotation_interval=rotation_interval, max_token_lifetime=max_token_lifetime,
                   leeway=leeway, clock=clock)
        keys = _load(directory)
        with ring._lock:
            if keys is None:
                now = clock()
                first = dataclasses.replace(_generate(now), state=CURRENT, activated_at=now)
                ring._commit([first, _generate(now)])
            else:
                ring._keys = keys
        return ring

    def _one(self, state: str) -> _Key:
        return next(k for k in self._keys if k.state == state)

    def signer(self) -> tuple[str, SigningKey]:
        """The (kid, key) of the current signer."""
        with self._lock:
            key = self._one(CURRENT)
        assert key.signing_key is not None
        return key.kid, key.signing_key

    def sign(self, claims: Mapping[str, Any]) -> str:
        """Encode and sign ``claims`` with the current signer."""
        kid, key = self.signer()
        return tokens.encode(claims, key, kid)

    def verification_keys(self) -> dict[str, bytes]:
        """kid -> 32-byte raw Ed25519 public key, for next, current and previous keys."""
        with self._lock:
            return {k.kid: k.public() for k in self._keys if k.state != RETIRED}

    def jwks(self) -> dict[str, Any]:
        """The public keys as a JWK Set (RFC 7517 §5, OKP keys per RFC 8037 §2)."""
        order = (CURRENT, NEXT, PREVIOUS)
        with self._lock:
            live = sorted((k for k in self._keys if k.state in order), key=lambda k: order.index(k.state))
        return {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": tokens.b64url(k.public()), "kid": k.kid,
                          "use": "sig", "alg": tokens.ALGORITHM} for k in live]}

    def list(self) -> list[dict[str, Any]]:
        """Metadata of every key, retired ones included, oldest first."""
        with self._lock:
            return [k.meta() for k in sorted(self._keys, key=lambda k: k.created_at)]

    def rotate(self) -> str:
        """Forced rotation: next signs, current is kept for verification, a new next is published."""
        with self._lock:
            self._commit(self._rotated(self._keys, self._clock()))
            kid = self._one(CURRENT).kid
        log.info("rotated signing key: current is now %s", kid)
        return kid

    def retire(self, kid: str) -> None:
        """Remove a compromised key at once; its tokens stop verifying. KeyError if unknown."""
        with self._lock:
            target = next((k for k in self._keys if k.kid == kid), None)
            if target is None:
                raise KeyError(kid)
            if target.state == RETIRED:
                return
            now = self._clock()
            keys = [dataclasses.replace(k, state=RETIRED, deactivated_at=now, signing_key=None)
                    if k.kid == kid else k for k in self._keys]
            if target.state == CURRENT:
                # Promote next at once so signing never stops.
                keys = [dataclasses.replace(k, state=CURRENT, activated_at=now) if k.state == NEXT else k
                        for k in keys]
            if target.state in (CURRENT, NEXT):
                keys.append(_generate(now))
            self._commit(keys)
        log.warning("retired key %s (was %s)", kid, target.state)

    def maintain(self) -> bool:
        """Rotate if due and drop keys past their horizon; True if anything changed."""
        with self._lock:
            now = self._clock()
            keys = self._keys
            # A clock that went backwards only postpones this; it never rotates twice.
            rotate = now >= self._due(self._one(CURRENT))
            if rotate:
                keys = self._rotated(keys, now)
            kept = [k for k in keys if k.deactivated_at is None or now < self._due(k)]
            if not rotate and len(kept) == len(keys):
                return False
            self._commit(kept)
        log.info("key maintenance: %s", "rotated" if rotate else "dropped expired keys")
        return True

    def seconds_until_due(self) -> float:
        """Seconds (never negative, by the injected clock) until ``maintain`` next has work."""
        with self._lock:
            due = min(self._due(k) for k in self._keys if k.state != NEXT)
            return max(0.0, due - self._clock())

    def subscribe(self, callback: Callable[[dict[str, bytes]], None]) -> None:
        """Call ``callback(verification_keys())`` now and after every change, in order."""
        with self._lock:
            callback(self.verification_keys())
            self._subscribers.append(callback)

    def _due(self, key: _Key) -> float:
        if key.state == CURRENT:
            assert key.activated_at is not None
            return key.activated_at + self._interval
        assert key.deactivated_at is not None
        return key.deactivated_at + self._horizon

    @staticmethod
    def _rotated(keys: _Keys, now: float) -> _Keys:
        return [dataclasses.replace(k, state=PREVIOUS, deactivated_at=now) if k.state == CURRENT
                else dataclasses.replace(k, state=CURRENT, activated_at=now) if k.state == NEXT else k
                for k in keys] + [_generate(now)]

    def _commit(self, keys: _Keys) -> None:
        """Persist ``keys`` (new PEMs, then metadata, then removals), adopt them, tell subscribers."""
        old = {k.kid for k in self._keys if k.state != RETIRED}
        new = {k.kid for k in keys if k.state != RETIRED}
        for k in keys:
            if k.kid in new - old:
                durable.write_new(self._dir / f"{k.kid}.pem", _pem(k))
        # PEMs are durable before the metadata that names them, so a crash never loses a key.
        durable.fsync_dir(self._dir)
        doc = {"format": _FORMAT, "keys": [k.meta() for k in keys]}
        # Durable before anything acts on it.
        durable.replace(self._dir / METADATA, json.dumps(doc, indent=1, allow_nan=False).encode("ascii"))
        self._keys = keys
        for kid in old - new:
            try:
                (self._dir / f"{kid}.pem").unlink(missing_ok=True)
            except OSError as exc:  # _load removes it on the next start; subscribers must still hear
                log.error("cannot remove key file of %s: %s", kid, exc.strerror)
        self._notify()

    def _notify(self) -> None:
        # Called under the lock so subscribers see key sets in order: a late stale set
        # must never bring a retired key back.
        keys = self.verification_keys()
        failure: BaseException | None = None
        for callback in self._subscribers:
            try:
                callback(dict(keys))
            except Exception as exc:  # every subscriber must hear of a retirement
                log.exception("key subscriber failed")
                failure = failure or exc
        if failure is not None:
            raise failure


class RotationThread:
    """Daemon thread that calls ``keyring.maintain()`` when it is due, until ``stop()``."""

    def __init__(self, keyring: Keyring, *, min_wait: float = 0.05, max_wait: float = 30.0) -> None:
        """``min_wait`` rules out busy loops; ``max_wait`` bounds how stale a clock jump can leave us."""
        if not 0 < min_wait <= max_wait:
            raise ValueError("need 0 < min_wait <= max_wait")
        self._keyring = keyring
        self._min_wait = min_wait
        self._max_wait = max_wait
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="agentauthz-keys", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout: float | None = 5.0) -> bool:
        """Ask the thread to stop and wait up to ``timeout``; True if it has stopped."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._keyring.maintain()
                wait = self._keyring.seconds_until_due()
            except Exception:
                log.exception("key maintenance failed; retrying in %.0f s", self._max_wait)
                wait = self._max_wait
            # Event.wait runs on the monotonic clock; the clamp keeps a wall-clock jump from
            # producing a zero wait (busy loop) or a wait of years.
            self._stopping.wait(min(max(wait, self._min_wait), self._max_wait))
