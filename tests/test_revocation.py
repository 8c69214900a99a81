"""Durable revocation: journal, restart, torn tails, slot window, compaction, concurrency, kill -9."""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import support

import agentauthz
from agentauthz import errors, reasons
from agentauthz.decision import tokens
from agentauthz.decision._accel import HotPath
from agentauthz.state.journal import JOURNAL
from agentauthz.state.revocation import RevocationStore

MAX_LIFETIME = 600
LEEWAY = 30
OTHER_AGENT = "spiffe://dev.local/agent/beta"
ROOT = Path(agentauthz.__file__).resolve().parent.parent


class Clock:
    """An injected wall clock the test moves by hand."""

    def __init__(self, now: float) -> None:
        self.now = float(now)

    def __call__(self) -> float:
        return self.now


class World:
    """One state directory, a clock, a forge, and the store + verifier currently open on them."""

    def __init__(self, hot: HotPath, directory: Path, capacity: int = 1 << 12, **options: Any) -> None:
        self.hot, self.directory, self.capacity, self.options = hot, directory, capacity, options
        self.forge = support.Forge()
        self.other_forge = support.Forge(kid="test-key-2")
        self.clock = Clock(self.forge.now)
        self.open()

    def open(self) -> None:
        self.index = self.hot.RevocationIndex(self.hot.Bitset(self.capacity))
        self.store = RevocationStore.open(self.directory, self.index, max_lifetime=MAX_LIFETIME,
                                          leeway=LEEWAY, clock=self.clock, **self.options)
        self.verifier = self.hot.Verifier(
            issuer=support.ISSUER, audiences={support.AUDIENCE}, token_type=tokens.TOKEN_TYPE,
            revocations=self.index, leeway=LEEWAY, max_lifetime=MAX_LIFETIME)
        self.verifier.set_keys({f.kid: f.public for f in (self.forge, self.other_forge)})
        self.verifier.set_policy(support.AllowAll())

    def restart(self) -> None:
        self.store.close()
        self.open()

    def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.forge.now = self.other_forge.now = int(self.clock.now)

    def mint(self, forge: support.Forge | None = None, ttl: int = 300, **overrides: Any) -> tuple[str, dict]:
        """A token whose status slot comes from the store."""
        forge = forge or self.forge
        exp = forge.now + ttl
        claims = forge.claims(slot=self.store.allocate_slot(exp), exp=exp, **overrides)
        return tokens.encode(claims, forge.key, forge.kid), claims

    def decide(self, token: str) -> str:
        return self.verifier.decide(token, "demo", "doc-1", "read", "internal", self.clock.now)[0]

    @property
    def journal(self) -> Path:
        return self.directory / JOURNAL

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.journal.read_bytes().splitlines()]


@pytest.fixture
def world(hot: HotPath, tmp_path: Path):
    w = World(hot, tmp_path / "state")
    yield w
    w.store.close()


def _slot(claims: dict) -> int:
    return claims["status"]["status_list"]["idx"]


KINDS = {
    # kind: (reason the victim gets, last journal op)
    "token": (reasons.TOKEN_REVOKED, "token"),
    "parent": (reasons.DELEGATION_REVOKED, "token"),
    "task": (reasons.TASK_ENDED, "task"),
    "agent": (reasons.AGENT_REVOKED, "agent"),
    "key": (reasons.KEY_REVOKED, "key"),
}


def _scenario(w: World, kind: str) -> tuple[str, str]:
    """Mint a victim and a bystander, revoke the victim by ``kind``; returns both tokens."""
    bystander, _ = w.mint(w.other_forge if kind == "key" else w.forge)
    if kind == "token":
        victim, claims = w.mint()
        w.store.revoke_token(claims["jti"], _slot(claims), claims["exp"])
    elif kind == "parent":
        _, parent = w.mint(sub=OTHER_AGENT)
        victim, _ = w.mint(act={"sub": OTHER_AGENT, "idx": _slot(parent)})
        w.store.revoke_token(parent["jti"], _slot(parent), parent["exp"])
    elif kind == "task":
        victim, _ = w.mint(task="task-victim")
        assert w.store.revoke_task(tokens.task_key(support.AGENT, "task-victim")) == int(w.clock.now)
    elif kind == "agent":
        victim, _ = w.mint(sub=OTHER_AGENT)
        assert w.store.revoke_agent(OTHER_AGENT) == int(w.clock.now)
    else:
        victim, _ = w.mint()
        w.store.revoke_key(w.forge.kid)
    return victim, bystander


@pytest.mark.parametrize("kind", list(KINDS))
def test_revocation_refuses_with_its_reason(world: World, kind: str) -> None:
    victim, bystander = world.mint()[0], world.mint()[0]
    assert world.decide(victim) == reasons.ALLOW  # cached as allowed before the revocation
    victim, bystander = _scenario(world, kind)
    assert world.decide(victim) == KINDS[kind][0]
    assert world.decide(bystander) == reasons.ALLOW


@pytest.mark.parametrize("kind", list(KINDS))
def test_revocation_is_on_disk_before_return(world: World, kind: str) -> None:
    before = world.journal.stat().st_size
    _scenario(world, kind)
    # Read straight back from the file, no close or flush in between.
    last = world.records()[-1]
    assert world.journal.stat().st_size > before
    assert last["op"] == KINDS[kind][1]


@pytest.mark.parametrize("kind", list(KINDS))
def test_revocation_survives_restart(world: World, kind: str) -> None:
    victim, bystander = _scenario(world, kind)
    world.restart()
    assert world.decide(victim) == KINDS[kind][0]
    assert world.decide(bystander) == reasons.ALLOW


def test_state_is_owner_only(world: World) -> None:
    world.store.revoke_task("t")
    assert stat.S_IMODE(world.directory.stat().st_mode) == 0o700
    assert stat.S_IMODE(world.journal.stat().st_mode) == 0o600
    world.store.compact()
    assert stat.S_IMODE(world.journal.stat().st_mode) == 0o600


def test_second_writer_is_refused(world: World) -> None:
    index = world.hot.RevocationIndex(world.hot.Bitset(64))
    with pytest.raises(errors.StateError, match="in use"):
        RevocationStore.open(world.directory, index, max_lifetime=MAX_LIFETIME, leeway=LEEWAY)


def test_bad_arguments_are_refused_before_the_journal(world: World) -> None:
    size = world.journal.stat().st_size
    with pytest.raises(ValueError):
        world.store.revoke_token("jti", world.store.stats()["reserved"], 0)  # never allocated
    with pytest.raises(ValueError):
        world.store.allocate_slot(int(world.clock.now) + MAX_LIFETIME + LEEWAY + 1)
    with pytest.raises(ValueError):
        world.store.revoke_task("")
    assert world.journal.stat().st_size == size


def test_torn_last_line_is_cut_and_the_rest_replayed(world: World, caplog: pytest.LogCaptureFixture) -> None:
    victim, claims = world.mint()
    world.store.revoke_token(claims["jti"], _slot(claims), claims["exp"])
    world.store.revoke_task("t1")
    world.store.close()
    good = world.journal.read_bytes()
    with open(world.journal, "ab") as f:
        f.write(b'{"op":"task","name":"t2","a')  # the crash hit mid-append
    with caplog.at_level(logging.WARNING, logger="agentauthz.revocation"):
        world.open()
    assert "torn" in caplog.text
    assert world.journal.read_bytes() == good
    assert world.store.stats()["tasks"] == 1
    assert world.decide(victim) == reasons.TOKEN_REVOKED
    world.store.revoke_task("t3")  # appends start on a clean line
    world.restart()
    assert world.store.stats()["tasks"] == 2


@pytest.mark.parametrize("bad", [
    b"not json at all",
    b"",
    b'{"op":"frobnicate","x":1}',
    b'{"op":"task","name":"t","at":true}',
    b'{"op":"task","name":"t","at":5,"extra":1}',
    b'{"op":"key","name":"","at":5}',
    b'{"op":"token","jti":"j","slot":-1,"exp":5}',
    b'["op","task"]',
])
def test_corruption_mid_file_refuses_to_start(world: World, bad: bytes) -> None:
    for task in ("a", "b", "c"):
        world.store.revoke_task(task)
    world.store.close()
    lines = world.journal.read_bytes().split(b"\n")
    good = b"\n".join(lines)
    lines.insert(2, bad)
    world.journal.write_bytes(b"\n".join(lines))
    with pytest.raises(errors.StateError, match=rf"{world.journal}:3:"):
        world.open()
    world.journal.write_bytes(good)
    world.open()  # the refused open released the journal
    assert world.store.stats()["tasks"] == 3


def test_slots_are_never_reused_across_restarts(hot: HotPath, tmp_path: Path) -> None:
    w = World(hot, tmp_path / "state", capacity=1024, reserve_block=16)
    seen: list[int] = []
    for run in range(6):
        slots = [w.store.allocate_slot(int(w.clock.now) + 60) for _ in range(run * 7 + 1)]
        assert min(slots) > max(seen, default=-1)
        seen += slots
        w.advance(5)
        w.store.slide()
        w.restart()
    assert len(set(seen)) == len(seen)
    w.store.close()


def test_window_slides_as_the_clock_advances(hot: HotPath, tmp_path: Path) -> None:
    w = World(hot, tmp_path / "state", capacity=256, reserve_block=32)
    capacity = w.index.bits.capacity
    for i in range(40 * capacity):
        _, claims = w.mint(ttl=5)
        if i % 3 == 0:
            w.store.revoke_token(claims["jti"], _slot(claims), claims["exp"])
        if i % 2:  # ~(ttl + leeway) * 2 slots live at once, well under the capacity
            w.advance(1)
            w.store.slide()
    stats = w.store.stats()
    assert stats["next_slot"] == 40 * capacity
    assert stats["window_base"] > 30 * capacity
    assert stats["revoked_tokens"] <= capacity
    assert w.index.bits.capacity == capacity
    # Ring positions are reused: a fresh token must not inherit an old token's bit.
    fresh = [w.mint()[0] for _ in range(capacity // 4)]
    assert all(w.decide(t) == reasons.ALLOW for t in fresh)
    w.store.close()


def test_capacity_exhausted_when_every_slot_is_live(hot: HotPath, tmp_path: Path) -> None:
    w = World(hot, tmp_path / "state", capacity=64, reserve_block=8)
    tokens_ = [w.mint(ttl=100)[0] for _ in range(64)]
    with pytest.raises(errors.CapacityExhausted):
        w.store.allocate_slot(int(w.clock.now) + 100)
    w.advance(50)
    w.store.slide()  # still live: nothing may be reused
    with pytest.raises(errors.CapacityExhausted):
        w.store.allocate_slot(int(w.clock.now) + 100)
    assert all(w.decide(t) == reasons.ALLOW for t in tokens_)
    w.advance(100 - 50 + LEEWAY + 1)
    w.store.slide()
    assert w.store.allocate_slot(int(w.clock.now) + 100) == 64
    w.store.close()


def test_compaction_shrinks_the_journal_and_keeps_live_state(world: World) -> None:
    for i in range(200):
        _, claims = world.mint(ttl=10)
        world.store.revoke_token(claims["jti"], _slot(claims), claims["exp"])
        world.store.revoke_task(f"old-task-{i}")
    world.store.revoke_key("old-key")
    world.advance(MAX_LIFETIME + 2 * LEEWAY + 1)  # past an ended task's horizon too
    world.store.slide()
    live_token, claims = world.mint()
    world.store.revoke_token(claims["jti"], _slot(claims), claims["exp"])
    task_victim, _ = world.mint(task="live-task")
    world.store.revoke_task(tokens.task_key(support.AGENT, "live-task"))
    agent_victim, _ = world.mint(sub=OTHER_AGENT)
    world.store.revoke_agent(OTHER_AGENT)
    key_victim, _ = world.mint(world.other_forge)
    world.store.revoke_key(world.other_forge.kid)
    size = world.journal.stat().st_size
    world.store.compact()
    assert world.journal.stat().st_size < size // 10
    assert world.store.stats()["journal_bytes"] == world.journal.stat().st_size
    ops = [r["op"] for r in world.records()]
    assert ops.count("token") == 1 and ops.count("task") == 1 and ops.count("key") == 1
    world.restart()
    assert world.decide(live_token) == reasons.TOKEN_REVOKED
    assert world.decide(task_victim) == reasons.TASK_ENDED
    assert world.decide(agent_victim) == reasons.AGENT_REVOKED
    assert world.decide(key_victim) == reasons.KEY_REVOKED
    assert world.store.allocate_slot(int(world.clock.now) + 10) > _slot(claims)


def test_slide_compacts_when_the_journal_grows(hot: HotPath, tmp_path: Path) -> None:
    w = World(hot, tmp_path / "state", compact_bytes=4096)
    for i in range(100):
        w.store.revoke_task(f"t{i}")
    w.advance(MAX_LIFETIME + 2 * LEEWAY + 1)  # an ended task's horizon (test_cutoffs_older_than_...)
    w.store.revoke_task("kept")
    assert w.journal.stat().st_size > 4096
    w.store.slide()
    assert [r for r in w.records() if r["op"] == "task"] == [
        {"op": "task", "name": "kept", "at": int(w.clock.now)}]
    w.store.close()


def test_cutoffs_older_than_the_horizon_are_dropped(world: World) -> None:
    old, _ = world.mint(task="t-old", ttl=MAX_LIFETIME)
    world.store.revoke_task(tokens.task_key(support.AGENT, "t-old"))
    world.store.revoke_agent(OTHER_AGENT)
    world.advance(MAX_LIFETIME)
    world.store.revoke_task(tokens.task_key(support.AGENT, "t-new"))
    world.advance(LEEWAY - 1)
    world.store.slide()
    assert world.store.stats()["tasks"] == 2  # not yet: kept a leeway past the last token's exp
    assert world.decide(old) == reasons.TOKEN_EXPIRED  # the daemon's own exp gets no leeway (item 4)
    world.advance(2)
    world.store.slide()
    stats = world.store.stats()
    # The agent's cutoff goes; the ended task stays one leeway more, for the tokens of a mint that raced
    # the end on a node whose clock ran ahead (they die whatever their iat).
    assert (stats["tasks"], stats["agents"]) == (2, 0)
    assert world.decide(world.mint(task="t-old")[0]) == reasons.TASK_ENDED
    world.advance(LEEWAY)
    world.store.slide()
    stats = world.store.stats()
    assert (stats["tasks"], stats["agents"]) == (1, 0)
    if world.hot.name == "pure":
        assert set(world.index.tasks) == {tokens.task_key(support.AGENT, "t-new")} and not world.index.agents
    assert world.decide(old) == reasons.TOKEN_EXPIRED
    assert world.decide(world.mint(task="t-old")[0]) == reasons.ALLOW
    world.restart()
    assert world.store.stats()["tasks"] == 1


def test_concurrent_revokers_and_readers(world: World) -> None:
    minted = [world.mint(task=f"task-{i}") for i in range(160)]
    for token, _ in minted:
        assert world.decide(token) == reasons.ALLOW
    failures: list[BaseException] = []
    done = threading.Event()

    def revoker(part: list[tuple[str, dict]]) -> None:
        try:
            for n, (_, claims) in enumerate(part):
                if n % 2:
                    world.store.revoke_token(claims["jti"], _slot(claims), claims["exp"])
                else:
                    world.store.revoke_task(tokens.task_key(claims["sub"], claims["task"]))
        except BaseException as exc:
            failures.append(exc)

    def reader() -> None:
        try:
            while not done.is_set():
                for token, _ in minted:
                    assert world.decide(token) in (reasons.ALLOW, reasons.TOKEN_REVOKED, reasons.TASK_ENDED)
                world.store.stats()
        except BaseException as exc:
            failures.append(exc)

    def slider() -> None:
        try:
            while not done.is_set():
                world.store.slide()
        except BaseException as exc:
            failures.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=slider)]
    revokers = [threading.Thread(target=revoker, args=(minted[i::4],)) for i in range(4)]
    for t in readers + revokers:
        t.start()
    for t in revokers:
        t.join()
    done.set()
    for t in readers:
        t.join()
    assert not failures
    assert all(world.decide(token) != reasons.ALLOW for token, _ in minted)
    assert len(world.records()) >= len(minted)
    world.restart()
    assert all(world.decide(token) != reasons.ALLOW for token, _ in minted)


_CHILD = r"""
import sys, time
from pathlib import Path
from agentauthz.decision import _accel
from agentauthz.state.revocation import RevocationStore
hot = _accel.native() if sys.argv[2] == "native" else _accel.pure()
index = hot.RevocationIndex(hot.Bitset(1024))
store = RevocationStore.open(Path(sys.argv[1]), index, max_lifetime=600, leeway=30, reserve_block=64)
exp = int(time.time()) + 5
slot = store.allocate_slot(exp)
store.revoke_token("jti-killed", slot, exp)
store.revoke_task("task-killed")
print("acked", slot, flush=True)
time.sleep(60)
"""


def test_acknowledged_revocation_survives_kill_9(hot: HotPath, tmp_path: Path) -> None:
    directory = tmp_path / "state"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(directory), hot.name],
                             stdout=subprocess.PIPE, cwd=ROOT, env=env)
    try:
        line = child.stdout.readline().decode() if child.stdout else ""
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
        if child.stdout:
            child.stdout.close()
    assert line.startswith("acked"), line
    slot = int(line.split()[1])

    index = hot.RevocationIndex(hot.Bitset(1024))
    clock = Clock(time.time())
    restarted = clock.now
    store = RevocationStore.open(directory, index, max_lifetime=600, leeway=30, clock=clock,
                                 reserve_block=64)
    try:
        assert index.bits.test(slot)
        assert store.stats()["tasks"] == 1
        assert store.allocate_slot(int(clock.now) + 1) >= 64  # the killed block is never handed out again
        # The killed process's block expiries died with it: it stays live for a full lifetime.
        clock.now = restarted + 600
        store.slide()
        assert store.stats()["window_base"] <= slot
        clock.now = restarted + 600 + 2 * 30 + 1
        store.slide()
        assert store.stats()["window_base"] > slot
    finally:
        store.close()


def test_a_ban_outlives_the_horizon_compaction_and_restarts_until_unbanned(world: World) -> None:
    before, _ = world.mint(sub=OTHER_AGENT)
    banned_at = world.store.ban_agent(OTHER_AGENT)
    world.advance(1)
    after, _ = world.mint(sub=OTHER_AGENT)  # signed anyway (a mint racing the ban): dead all the same
    assert world.decide(before) == world.decide(after) == reasons.AGENT_REVOKED
    # Long past every cutoff's horizon, compacted, reopened: a cutoff would be forgotten, a ban is not.
    world.advance(MAX_LIFETIME + LEEWAY + 1)
    world.store.slide()
    world.store.compact()
    assert [r for r in world.records() if r["op"] in ("ban", "unban", "agent")] == [
        {"op": "ban", "name": OTHER_AGENT, "at": banned_at}]
    world.restart()
    assert world.store.banned(["someone", OTHER_AGENT]) == OTHER_AGENT
    assert world.store.stats()["banned_agents"] == 1
    late, _ = world.mint(sub=OTHER_AGENT)
    assert world.decide(late) == reasons.AGENT_REVOKED
    world.advance(1)
    assert world.store.unban_agent(OTHER_AGENT) == int(world.clock.now)
    assert world.store.unban_agent(OTHER_AGENT) is None  # not banned any more
    assert world.decide(late) == reasons.AGENT_REVOKED  # issued while banned: stays dead
    # The unban's own second belongs to new tokens: while banned nothing could be minted in it.
    new, _ = world.mint(sub=OTHER_AGENT)
    assert world.decide(new) == reasons.ALLOW and world.store.banned([OTHER_AGENT]) is None
    world.restart()  # the unban is journaled too
    assert (world.decide(late), world.decide(new)) == (reasons.AGENT_REVOKED, reasons.ALLOW)
    world.store.compact()
    world.restart()
    assert (world.decide(late), world.decide(new)) == (reasons.AGENT_REVOKED, reasons.ALLOW)
