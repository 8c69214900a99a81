"""Keyring: RFC 7638 kids, publish-before-sign, rotation, retirement, persistence, the rotation thread."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from nacl.signing import SigningKey
from support import AGENT, AUDIENCE, ISSUER, STATUS_URI, AllowAll

from agentauthz import errors
from agentauthz.decision import tokens
from agentauthz.decision._bitset_py import Bitset
from agentauthz.decision._verify_py import RevocationIndex, Verifier
from agentauthz.state import keys

START = 1_700_000_000.0
INTERVAL = 3600.0
LIFETIME = 300
LEEWAY = 30


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def open_ring(directory: Path, clock: Clock, **overrides: Any) -> keys.Keyring:
    options: dict[str, Any] = dict(rotation_interval=INTERVAL, max_token_lifetime=LIFETIME,
                                   leeway=LEEWAY, clock=clock)
    options.update(overrides)
    return keys.Keyring.open(directory, **options)


def states(ring: keys.Keyring) -> dict[str, str]:
    return {k["kid"]: k["state"] for k in ring.list()}


def kid_in(state: str, ring: keys.Keyring) -> str:
    (kid,) = [k for k, s in states(ring).items() if s == state]
    return kid


def claims(now: float) -> dict[str, Any]:
    return tokens.build_claims(issuer=ISSUER, audience=AUDIENCE, subject=AGENT, task="task-1",
                               grants=[tokens.grant("demo", "*", ["read"])], issued_at=int(now),
                               ttl=LIFETIME, slot=0, status_uri=STATUS_URI)


def verifier() -> Verifier:
    v = Verifier(issuer=ISSUER, audiences={AUDIENCE}, token_type=tokens.TOKEN_TYPE,
                 revocations=RevocationIndex(Bitset(1 << 16)), leeway=LEEWAY, max_lifetime=LIFETIME)
    v.set_policy(AllowAll())
    return v


def header_kid(token: str) -> str:
    header = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))["kid"]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "keys"


def test_thumbprint_matches_rfc8037_example() -> None:
    # RFC 8037 Appendix A.1 (key) and A.3 (its RFC 7638 thumbprint).
    seed = base64.urlsafe_b64decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
    public = bytes(SigningKey(seed).verify_key)
    assert b64(public) == "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"
    assert keys.thumbprint(public) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"


def test_kids_are_thumbprints_of_the_stored_keys(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    for kid in states(ring):
        private = serialization.load_pem_private_key((keydir / f"{kid}.pem").read_bytes(), None)
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        canonical = '{"crv":"Ed25519","kty":"OKP","x":"' + b64(raw) + '"}'
        assert kid == b64(hashlib.sha256(canonical.encode()).digest())
        assert ring.verification_keys()[kid] == raw


def test_first_open_publishes_current_and_next_but_only_current_signs(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    current, nxt = kid_in("current", ring), kid_in("next", ring)
    assert set(ring.verification_keys()) == {current, nxt}
    jwks = ring.jwks()
    assert {k["kid"] for k in jwks["keys"]} == {current, nxt}
    for jwk in jwks["keys"]:
        assert set(jwk) == {"kty", "crv", "x", "kid", "use", "alg"}
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("OKP", "Ed25519", "sig", "EdDSA")
        assert base64.urlsafe_b64decode(jwk["x"] + "=") == ring.verification_keys()[jwk["kid"]]
    assert ring.signer()[0] == current
    token = ring.sign(claims(clock.now))
    assert header_kid(token) == current
    v = verifier()
    v.set_keys(ring.verification_keys())
    assert v.verify(token, clock.now).claims["sub"] == AGENT
    meta = {k["kid"]: k for k in ring.list()}
    assert meta[current]["activated_at"] == START and meta[nxt]["activated_at"] is None


def test_rotation_on_schedule_keeps_old_tokens_valid(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    v = verifier()
    ring.subscribe(v.set_keys)
    first, second = kid_in("current", ring), kid_in("next", ring)
    old_token = ring.sign(claims(clock.now))

    clock.now = START + INTERVAL - 1
    assert ring.maintain() is False
    assert ring.seconds_until_due() == 1
    clock.now = START + INTERVAL
    assert ring.maintain() is True

    assert states(ring)[first] == "previous"
    assert ring.signer()[0] == second == kid_in("current", ring)
    third = kid_in("next", ring)
    assert set(ring.verification_keys()) == {first, second, third}
    new_token = ring.sign(claims(clock.now))
    assert header_kid(new_token) == second
    assert v.verify(old_token, START + 10).claims["jti"] != v.verify(new_token, clock.now).claims["jti"]
    assert ring.maintain() is False


def test_previous_key_dropped_after_its_tokens_expire(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    v = verifier()
    ring.subscribe(v.set_keys)
    old = kid_in("current", ring)
    clock.now = START + INTERVAL - LIFETIME
    token = ring.sign(claims(clock.now))  # signed as late as possible by the old key
    clock.now = START + INTERVAL
    assert ring.maintain()
    v.verify(token, clock.now - 1)  # still verifies under the old key (its exp is now: no leeway on exp)

    clock.now = START + INTERVAL + LIFETIME + LEEWAY - 1
    assert ring.maintain() is False
    assert old in ring.verification_keys()
    clock.now += 1
    assert ring.maintain() is True
    assert old not in ring.verification_keys()
    assert old not in states(ring)
    assert not (keydir / f"{old}.pem").exists()
    with pytest.raises(errors.TokenKeyUnknown):
        v.verify(token, START + INTERVAL)  # refused for its key even at a time it was valid


def test_forced_rotate(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    first, second = kid_in("current", ring), kid_in("next", ring)
    clock.now += 5
    assert ring.rotate() == second
    assert states(ring)[first] == "previous"
    assert {k["kid"]: k for k in ring.list()}[second]["activated_at"] == START + 5
    # The schedule restarts from the forced rotation.
    clock.now = START + INTERVAL
    ring.maintain()
    assert ring.signer()[0] == second
    clock.now = START + 5 + INTERVAL
    assert ring.maintain() and ring.signer()[0] != second


def test_retire_current_promotes_next_and_refuses_old_tokens(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    v = verifier()
    ring.subscribe(v.set_keys)
    bad, nxt = kid_in("current", ring), kid_in("next", ring)
    token = ring.sign(claims(clock.now))
    v.verify(token, clock.now)  # now cached: retirement must evict it too

    ring.retire(bad)
    assert ring.signer()[0] == nxt
    assert states(ring)[bad] == "retired"
    assert bad not in ring.verification_keys() and bad not in {k["kid"] for k in ring.jwks()["keys"]}
    assert kid_in("next", ring) not in (bad, nxt)
    assert not (keydir / f"{bad}.pem").exists()
    with pytest.raises(errors.TokenKeyUnknown):
        v.verify(token, clock.now)
    v.verify(ring.sign(claims(clock.now)), clock.now)

    ring.retire(bad)  # already retired: nothing to do
    with pytest.raises(KeyError):
        ring.retire("no-such-kid")


def test_retire_next_and_previous(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    current, nxt = kid_in("current", ring), kid_in("next", ring)
    ring.retire(nxt)
    assert kid_in("current", ring) == current and kid_in("next", ring) != nxt
    ring.rotate()
    ring.retire(current)  # now previous
    assert states(ring)[current] == "retired"
    assert current not in ring.verification_keys()
    assert len(ring.verification_keys()) == 2


def test_retired_record_forgotten_after_horizon(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock, rotation_interval=1e9)
    bad = kid_in("current", ring)
    ring.retire(bad)
    clock.now += LIFETIME + LEEWAY
    assert ring.maintain() is True
    assert bad not in states(ring)


def test_restart_keeps_kids_states_and_signer(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    clock.now += 10
    ring.rotate()
    ring.retire(kid_in("next", ring))
    before = ring.list()
    body = claims(clock.now)
    token = ring.sign(body)

    again = open_ring(keydir, clock)
    assert again.list() == before
    assert again.verification_keys() == ring.verification_keys()
    assert again.signer()[0] == ring.signer()[0]
    assert again.sign(body) == token  # Ed25519 is deterministic: same key, same token


def test_file_and_directory_modes(keydir: Path, clock: Clock) -> None:
    previous = os.umask(0)  # even a permissive umask must not loosen the files
    try:
        ring = open_ring(keydir, clock)
        ring.rotate()
    finally:
        os.umask(previous)
    assert stat.S_IMODE(keydir.stat().st_mode) == 0o700
    files = sorted(p.name for p in keydir.iterdir())
    assert files == sorted([f"{kid}.pem" for kid in ring.verification_keys()] + ["keyring.json"])
    for path in keydir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def _corrupt_metadata(keydir: Path, kid: str) -> Path:
    path = keydir / "keyring.json"
    path.write_text('{"format": 1, "keys": [')
    return path


def _truncate_pem(keydir: Path, kid: str) -> Path:
    path = keydir / f"{kid}.pem"
    path.write_bytes(path.read_bytes()[:40])
    return path


def _mismatched_pem(keydir: Path, kid: str) -> Path:
    other = keys._pem(keys._generate(0.0))
    path = keydir / f"{kid}.pem"
    path.write_bytes(other)
    return path


def _world_readable_pem(keydir: Path, kid: str) -> Path:
    path = keydir / f"{kid}.pem"
    path.chmod(0o644)
    return path


def _missing_pem(keydir: Path, kid: str) -> Path:
    path = keydir / f"{kid}.pem"
    path.unlink()
    return path


def _traversal_kid(keydir: Path, kid: str) -> Path:
    path = keydir / "keyring.json"
    doc = json.loads(path.read_text())
    doc["keys"][0]["kid"] = "../../" + "a" * 37
    path.write_text(json.dumps(doc))
    return path


def _two_currents(keydir: Path, kid: str) -> Path:
    path = keydir / "keyring.json"
    doc = json.loads(path.read_text())
    for entry in doc["keys"]:
        entry["state"], entry["activated_at"] = "current", START
    path.write_text(json.dumps(doc))
    return path


def _loose_directory(keydir: Path, kid: str) -> Path:
    keydir.chmod(0o755)
    return keydir


@pytest.mark.parametrize("damage", [_corrupt_metadata, _truncate_pem, _mismatched_pem, _world_readable_pem,
                                    _missing_pem, _traversal_kid, _two_currents, _loose_directory])
def test_damaged_state_refuses_to_start(keydir: Path, clock: Clock, damage: Any) -> None:
    ring = open_ring(keydir, clock)
    path = damage(keydir, kid_in("current", ring))
    with pytest.raises(errors.StateError, match=re.escape(str(path))):
        open_ring(keydir, clock)


def test_key_file_without_metadata_refuses_to_start(keydir: Path, clock: Clock) -> None:
    open_ring(keydir, clock)
    (keydir / "keyring.json").unlink()
    with pytest.raises(errors.StateError, match="keyring.json is missing"):
        open_ring(keydir, clock)


def test_unreferenced_key_file_is_removed_on_load(keydir: Path, clock: Clock) -> None:
    open_ring(keydir, clock)
    stray = keydir / f"{keys.thumbprint(b'x' * 32)}.pem"
    stray.write_bytes(b"never published")
    stray.chmod(0o600)
    open_ring(keydir, clock)
    assert not stray.exists()


def test_invalid_settings_rejected(keydir: Path, clock: Clock) -> None:
    with pytest.raises(ValueError):
        open_ring(keydir, clock, rotation_interval=0)
    with pytest.raises(ValueError):
        keys.RotationThread(open_ring(keydir, clock), min_wait=0)


def test_subscribers_hear_every_change_in_order(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    seen: list[set[str]] = []
    ring.subscribe(lambda ks: seen.append(set(ks)))
    assert seen == [set(ring.verification_keys())]
    ring.rotate()
    ring.retire(kid_in("previous", ring))
    assert len(seen) == 3 and seen[-1] == set(ring.verification_keys())


def test_clock_going_backwards_causes_no_rotation_storm(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    rotations = 0

    def count(_: dict[str, bytes]) -> None:
        nonlocal rotations
        rotations += 1

    ring.subscribe(count)
    rotations = 0
    clock.now = START + INTERVAL
    assert ring.maintain()
    clock.now = START - 10 * INTERVAL  # wall clock stepped back
    for _ in range(100):
        ring.maintain()
        assert ring.seconds_until_due() >= 0
    clock.now = START + 50 * INTERVAL  # and far forward again
    for _ in range(100):
        ring.maintain()
    # One rotation per forward step (the jump's rotation also drops the old previous key).
    assert rotations == 2
    assert len(ring.verification_keys()) == 3


def test_concurrent_signing_during_rotation(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    signed: list[str] = []

    def sign_many() -> None:
        for _ in range(50):
            signed.append(ring.sign(claims(clock.now)))

    threads = [threading.Thread(target=sign_many) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(5):
        ring.rotate()
    for t in threads:
        t.join()
    v = verifier()
    v.set_keys(ring.verification_keys())
    assert len(signed) == 200
    for token in signed:
        v.verify(token, clock.now)


def test_rotation_thread_rotates_and_stops(keydir: Path) -> None:
    ring = keys.Keyring.open(keydir, rotation_interval=0.05, max_token_lifetime=1, leeway=0)
    changes = threading.Semaphore(0)
    ring.subscribe(lambda _: changes.release())
    changes.acquire()
    first = ring.signer()[0]
    thread = keys.RotationThread(ring, min_wait=0.01, max_wait=0.5)
    thread.start()
    try:
        for _ in range(3):
            assert changes.acquire(timeout=10)
        assert ring.signer()[0] != first
    finally:
        started = time.monotonic()
        assert thread.stop(timeout=10)
        assert time.monotonic() - started < 10


class FlakyKeyring:
    """Fails once, then reports work due in the past forever (a clock gone haywire)."""

    def __init__(self) -> None:
        self.calls = 0
        self.done = threading.Event()

    def maintain(self) -> bool:
        self.calls += 1
        if self.calls == 1:
            raise OSError("disk full")
        if self.calls >= 3:
            self.done.set()
        return False

    def seconds_until_due(self) -> float:
        return -1e9


def test_rotation_thread_survives_errors_and_never_busy_loops() -> None:
    ring = FlakyKeyring()
    thread = keys.RotationThread(ring, min_wait=0.05, max_wait=0.05)  # type: ignore[arg-type]
    thread.start()
    try:
        assert ring.done.wait(timeout=10)
        time.sleep(0.2)
    finally:
        assert thread.stop(timeout=10)
    # 0.05 s minimum between calls: a busy loop would have made many thousands.
    assert ring.calls < 200


def test_stop_before_start() -> None:
    assert keys.RotationThread(FlakyKeyring()).stop(timeout=1)  # type: ignore[arg-type]


def test_failing_subscriber_does_not_hide_a_retirement(keydir: Path, clock: Clock) -> None:
    ring = open_ring(keydir, clock)
    v = verifier()
    calls = 0

    def broken(_: dict[str, bytes]) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise RuntimeError("subscriber down")

    ring.subscribe(broken)
    ring.subscribe(v.set_keys)
    bad = kid_in("current", ring)
    token = ring.sign(claims(clock.now))
    with pytest.raises(RuntimeError):
        ring.retire(bad)
    assert states(ring)[bad] == "retired"
    with pytest.raises(errors.TokenKeyUnknown):
        v.verify(token, clock.now)
