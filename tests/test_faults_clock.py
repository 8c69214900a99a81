"""Wall-clock jumps, in-process with the real Authority, CheckService, keyring and audit writer.

NTP steps, a VM resumed from a snapshot, an operator's `date -s`: the wall clock jumps both ways.
An expired token must never become valid again, a live one must not be refused, and the timers
(key rotation, audit flushing) must neither stall nor storm.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Iterator

import pytest
from faults_support import AGENT
from processes import audit_records

from agentauthz.authority.core import Authority
from agentauthz.client import check_request, decision_from
from agentauthz.config import Config
from agentauthz.decision import _accel
from agentauthz.decision.tokens import grant
from agentauthz.serve.extauthz import CheckService, parse_check_request
from agentauthz.state.clock import steady_clock
from agentauthz.state.keys import Keyring, RotationThread

READ = [grant("demo", "*", ["read"])]
HOUR = 3600.0


class Wall:
    """The injected wall clock: stands still unless the test moves it, in either direction."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
def authority(tmp_path: Path, wall: Wall) -> Iterator[Authority]:
    a = Authority(Config(state_dir=tmp_path / "state", leeway=0, revocation_capacity=1 << 16,
                         audit_flush_interval=0.02), clock=wall)
    a.start()
    yield a
    a.stop()


def decide(a: Authority, token: str) -> str:
    """One Check through the real CheckService (as the daemon builds it), on a fresh event loop."""
    service = CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets)
    request = parse_check_request(check_request(token, "demo", "a", "read"))
    return decision_from(asyncio.run(service.check(request, None))).reason


def test_an_expired_token_never_becomes_valid_again_when_the_clock_goes_back(authority: Authority,
                                                                              wall: Wall) -> None:
    a = authority
    short = a.mint(AGENT, "short", READ, ttl=60).token
    assert decide(a, short) == "allow"  # verified and cached, with its per-request memo
    wall.now += 61
    assert decide(a, short) == "token_expired"
    wall.now -= 30  # an NTP step back, into the token's old lifetime
    assert decide(a, short) == "token_expired", "the cached entry came back to life"
    for verifier in a.verifiers.values():
        verifier.purge_expired(a.clock())
        verifier.forget(short)
    assert decide(a, short) == "token_expired", "verified afresh, it came back to life"


def test_a_live_token_is_not_refused_when_the_clock_goes_back(authority: Authority, wall: Wall) -> None:
    a = authority
    live = a.mint(AGENT, "live", READ, ttl=300).token
    wall.now -= 120
    assert decide(a, live) == "allow", "issued 'in the future' by the stepped-back clock"
    fresh = a.mint(AGENT, "fresh", READ, ttl=300).token
    assert decide(a, fresh) == "allow"


def test_a_jump_forward_expires_tokens_and_a_jump_back_does_not_revive_them(authority: Authority,
                                                                             wall: Wall) -> None:
    a = authority
    token = a.mint(AGENT, "jump", READ, ttl=300).token
    assert decide(a, token) == "allow"
    wall.now += HOUR  # forward: by this clock the token is long dead (fail closed)
    assert decide(a, token) == "token_expired"
    a.revocations.slide()  # the window slides past it
    wall.now -= HOUR  # back to where it was: the clock was wrong, but what expired stays expired
    assert decide(a, token) == "token_expired"
    assert decide(a, a.mint(AGENT, "after", READ, ttl=300).token) == "allow"


def test_audit_timestamps_never_go_back_and_flushing_keeps_its_pace(authority: Authority,
                                                                    wall: Wall) -> None:
    a = authority
    for step in (0, -HOUR, +2 * HOUR, -HOUR, 0):
        wall.now += step
        assert a.audit.record("clock_probe", step=step)
        started = time.monotonic()
        # No flush(): the writer's own timer must write it, a flush interval later, jump or not.
        while not any(r["kind"] == "clock_probe" and r["step"] == step
                      for r in audit_records(a.config.state_dir / "audit")[-4:]):
            assert time.monotonic() - started < 2, f"record not written 2 s after a {step:+} s jump"
            time.sleep(0.01)
    records = audit_records(a.config.state_dir / "audit")
    stamps = [r["ts"] for r in records]
    assert stamps == sorted(stamps)
    checkpoints = sum(r["kind"] == "checkpoint" for r in records)
    assert checkpoints <= sum(r["kind"] != "checkpoint" for r in records), "no checkpoint storm"


def _rotations(ring: Keyring) -> int:
    return sum(k["activated_at"] is not None for k in ring.list()) - 1


def test_key_rotation_neither_storms_after_a_jump_forward_nor_stalls_after_a_jump_back(
        tmp_path: Path, wall: Wall) -> None:
    ring = Keyring.open(tmp_path / "keys", rotation_interval=0.5, max_token_lifetime=3600,
                        leeway=0, clock=steady_clock(wall))
    thread = RotationThread(ring, min_wait=0.01, max_wait=0.05)
    thread.start()
    try:
        wall.now += 10 * HOUR  # forward, many intervals at once: one rotation, not one per interval
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:
            time.sleep(0.01)
        assert _rotations(ring) == 1
        wall.now -= 20 * HOUR  # back: rotation still comes after an interval of real time, not 20 hours
        before = _rotations(ring)
        started = time.monotonic()
        while _rotations(ring) == before:
            assert time.monotonic() - started < 3, "rotation stalled after the clock went back"
            time.sleep(0.01)
        elapsed = time.monotonic() - started
        assert 0.3 <= elapsed, f"rotated {elapsed:.2f}s after the jump, before its interval"
        assert _rotations(ring) - before <= 2
    finally:
        thread.stop()


def test_steady_clock_follows_the_wall_and_never_goes_back(wall: Wall, hot: _accel.HotPath) -> None:
    mono = [100.0]
    clock = steady_clock(wall, lambda: mono[0], hot)
    start = wall.now
    assert clock() == start
    wall.now += 5
    assert clock() == start + 5  # follows the wall exactly while it moves forward
    wall.now -= HOUR
    mono[0] += 2
    assert clock() == start + 7  # wall went back: counts on by the monotonic clock instead
    mono[0] += 3
    wall.now += HOUR - 4  # wall catching up (start + 1), still behind
    assert clock() == start + 10
    wall.now = start + 20
    assert clock() == start + 20  # wall ahead again: follow it


def test_steady_clock_stands_still_for_a_reading_another_thread_overtook(
        wall: Wall, caplog: pytest.LogCaptureFixture, hot: _accel.HotPath) -> None:
    """Two threads read the wall and store in the other order: no step back is declared or logged."""
    mono = [100.0]
    clock = steady_clock(wall, lambda: mono[0], hot)
    start = wall.now
    wall.now = start + 0.004
    assert clock() == start + 0.004  # the reader that stored first read the later time
    wall.now = start + 0.001  # the overtaken reading, or a 3 ms step back: never backwards, no warning
    mono[0] += 0.001
    with caplog.at_level(logging.WARNING, logger="agentauthz.clock"):
        assert clock() == start + 0.004
        wall.now = start + 0.005
        assert clock() == start + 0.005  # and the wall is followed again at once
        assert not caplog.records
        wall.now = start - 1.0  # a real step back is still declared, and counted on monotonic time
        mono[0] += 0.5
        assert clock() == start + 0.505
        assert "went back" in caplog.text


def test_steady_clock_on_the_system_clocks_reads_them(hot: _accel.HotPath) -> None:
    """On time.time and time.monotonic (the native twin reads them in C), the same readings, and the
    step-back rule kept: a clock last read in the future stands still rather than go back to now."""
    clock = steady_clock(hot=hot)
    for _ in range(1000):
        before = time.time()
        now = clock()
        assert before <= now <= time.time()
    assert clock.last == now and time.monotonic() - 1 < clock.last_mono <= time.monotonic()  # type: ignore
    clock.last = future = time.time() + 0.01  # type: ignore[attr-defined]  # as if another thread read it
    assert clock() == future and not clock.behind  # type: ignore[attr-defined]
    clock.last = time.time() + HOUR  # type: ignore[attr-defined]  # a wall clock an hour back from there
    later = clock()
    assert later >= time.time() + HOUR - 1 and clock.behind  # type: ignore[attr-defined]
