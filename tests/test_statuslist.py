"""Token Status List: bit order, the publisher over the real bitset, and offline verification
against a real daemon (revoke, end task, revoke agent, delegation, forged and broken lists)."""

from __future__ import annotations

import base64
import json
import urllib.request
import zlib
from pathlib import Path
from typing import Any, Iterator

import pytest
from nacl.signing import SigningKey
from processes import Daemon, http_get, wait_for

from agentauthz import errors
from agentauthz.client import Client, Identity, verify_offline
from agentauthz.decision import tokens
from agentauthz.decision._accel import HotPath
from agentauthz.decision._bitset_py import Bitset, buffer_size
from agentauthz.decision._verify_py import RevocationIndex
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.offline import MAX_LIST_BYTES, _inflate, status_at, verify_status_list
from agentauthz.state import statuslist
from agentauthz.state.keys import Keyring, _read_private
from agentauthz.state.revocation import RevocationStore

ALPHA = "spiffe://dev.local/agent/alpha"
BETA = "spiffe://dev.local/agent/beta"
GAMMA = "spiffe://dev.local/agent/gamma"


def segment(jwt: str, i: int) -> dict[str, Any]:
    part = jwt.split(".")[i]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def payload(jwt: str) -> dict[str, Any]:
    return segment(jwt, 1)


# -- the format ---------------------------------------------------------------

def test_bit_order_is_the_drafts_example() -> None:
    # draft-ietf-oauth-status-list §4.1: 16 one-bit statuses, these invalid, are 0xb9 0xa3.
    invalid = [0, 3, 4, 5, 7, 8, 9, 13, 15]
    assert statuslist.pack(invalid, 16) == b"\xb9\xa3"
    assert statuslist.encode_lst(b"\xb9\xa3") == "eNrbuRgAAhcBXQ"
    raw = _inflate("eNrbuRgAAhcBXQ", MAX_LIST_BYTES)
    assert [status_at(raw, 1, i) for i in range(16)] == [int(i in invalid) for i in range(16)]
    with pytest.raises(errors.StatusListTooShort):
        status_at(raw, 1, 16)
    # The two-bit example: statuses 1 2 0 3 / 0 1 0 1 / 1 2 3 3, lowest bits first in each byte.
    raw = _inflate("eNo76fITAAPfAgc", MAX_LIST_BYTES)
    assert [status_at(raw, 2, i) for i in range(12)] == [1, 2, 0, 3, 0, 1, 0, 1, 1, 2, 3, 3]


def test_inflate_refuses_bombs_garbage_and_truncation() -> None:
    bomb = statuslist.encode_lst(bytes(MAX_LIST_BYTES + 1))
    assert len(bomb) < 100_000
    with pytest.raises(errors.StatusListTooLarge):
        _inflate(bomb, MAX_LIST_BYTES)
    whole = zlib.compress(b"\x00" * 64, 9)
    for bad in (whole[:-2], whole + b"x", b"not zlib at all"):
        with pytest.raises(errors.StatusListInvalid):
            _inflate(tokens.b64url(bad), MAX_LIST_BYTES)
    with pytest.raises(errors.StatusListInvalid):  # canonical base64url only
        _inflate(tokens.b64url(whole) + "=", MAX_LIST_BYTES)


# -- the publisher over the real bitset and store -----------------------------

class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def published(publisher: statuslist.StatusListPublisher, ring: Keyring, clock: Clock) -> bytes:
    bits, raw = verify_status_list(publisher.token(), ring.verification_keys(), uri="u", issuer="i",
                                   now=clock.now, leeway=0)
    assert bits == 1
    return raw


def make_publisher(tmp_path: Path, capacity: int, block: int, hot: HotPath | None = None,
                   min_headroom: int = statuslist.MIN_HEADROOM) -> tuple[Any, ...]:
    clock = Clock(1_700_000_000.0)
    buffer = bytearray(buffer_size(capacity))
    # The publisher reads the buffer the Check path's bitset (either twin) writes.
    index = (hot.RevocationIndex(hot.Bitset(capacity, buffer)) if hot
             else RevocationIndex(Bitset(capacity, buffer)))
    store = RevocationStore.open(tmp_path / "rev", index, max_lifetime=100, leeway=0, clock=clock,
                                 reserve_block=block)
    ring = Keyring.open(tmp_path / "keys", rotation_interval=3600, max_token_lifetime=100, leeway=0,
                        clock=clock)
    publisher = statuslist.StatusListPublisher(buffer, capacity=capacity, store=store, index=index,
                                               lists={"tools": (ring, "u")}, issuer="i", leeway=0,
                                               clock=clock, min_headroom=min_headroom)
    return clock, store, ring, publisher


@pytest.mark.parametrize("block", [64, 12])  # 12: window bases that are not byte-aligned
def test_published_list_is_prefix_window_and_overlay(hot: HotPath, tmp_path: Path, block: int) -> None:
    capacity = 256
    clock, store, ring, publisher = make_publisher(tmp_path, capacity, block, hot)
    # Three blocks of short-lived tokens, then one long-lived block, so the window slides past three.
    slots = [store.allocate_slot(int(clock.now) + 10) for _ in range(3 * block)]
    slots += [store.allocate_slot(int(clock.now) + 90) for _ in range(block // 2)]
    store.revoke_token("a", slots[3 * block + 2], int(clock.now) + 90)
    publisher.remember_minted("alpha t1", ["alpha"], slots[-1], int(clock.now) + 90)
    publisher.task_ended("alpha t1")
    clock.now += 20
    store.slide()
    base = store.stats()["window_base"]
    assert base == 3 * block
    raw = published(publisher, ring, clock)
    assert len(raw) * 8 >= base + capacity  # covers every slot the window can hand out
    expected = set(range(base)) | {slots[3 * block + 2], slots[-1]}
    assert {i for i in range(len(raw) * 8) if status_at(raw, 1, i)} == expected
    store.close()


def test_a_window_that_slid_with_nothing_revoked_is_published(tmp_path: Path) -> None:
    capacity = 256
    clock, store, ring, publisher = make_publisher(tmp_path, capacity, 64)
    for _ in range(64):
        store.allocate_slot(int(clock.now) + 10)
    store.allocate_slot(int(clock.now) + 90)
    assert len(published(publisher, ring, clock)) * 8 == capacity
    clock.now += statuslist.TTL  # every short-lived token has expired, and the last list is stale
    store.slide()
    base = store.stats()["window_base"]
    assert base == 64
    raw = published(publisher, ring, clock)
    assert len(raw) * 8 >= base + capacity  # a token minted in the new window finds its bit
    assert {i for i in range(len(raw) * 8) if status_at(raw, 1, i)} == set(range(base))
    store.close()


@pytest.mark.parametrize("block", [64, 12])
def test_published_list_is_the_live_range_and_its_headroom(hot: HotPath, tmp_path: Path, block: int) -> None:
    capacity, headroom = 1 << 12, 16
    clock, store, ring, publisher = make_publisher(tmp_path, capacity, block, hot, headroom)
    slots = [store.allocate_slot(int(clock.now) + 10) for _ in range(3 * block)]
    slots += [store.allocate_slot(int(clock.now) + 90) for _ in range(block // 2)]
    store.revoke_token("a", slots[3 * block + 1], int(clock.now) + 90)
    publisher.remember_minted("alpha t1", ["alpha"], slots[-1], int(clock.now) + 90)
    publisher.task_ended("alpha t1")
    clock.now += 20
    store.slide()
    base, next_slot = store.stats()["window_base"], store.next_slot
    assert (base, next_slot) == (3 * block, slots[-1] + 1)
    raw = published(publisher, ring, clock)
    # Ones below the window, the live range, then as much again (at least the headroom): not the window.
    assert len(raw) * 8 == statuslist.list_end(base, next_slot, capacity, headroom) < capacity
    assert len(raw) * 8 >= next_slot + max(headroom, next_slot - base)
    assert {i for i in range(len(raw) * 8) if status_at(raw, 1, i)} == set(range(base)) | {
        slots[3 * block + 1], slots[-1]}
    store.close()


def test_a_full_window_on_an_unaligned_base_publishes_no_bit_past_it(hot: HotPath, tmp_path: Path) -> None:
    capacity = 256
    clock, store, ring, publisher = make_publisher(tmp_path, capacity, 12, hot)
    for _ in range(36):
        store.allocate_slot(int(clock.now) + 10)
    clock.now += 20
    store.slide()
    assert store.stats()["window_base"] == 36  # slot 36 is bit 4 of its byte
    for _ in range(capacity):  # every slot of the window handed out: 292 is the next one
        store.allocate_slot(int(clock.now) + 90)
    for slot in (36, 291):
        store.revoke_token("a", slot, int(clock.now) + 90)
    raw = published(publisher, ring, clock)
    # Slots 292-295 end the last byte; they share ring bits with 36-39 (36 revoked) but read clear.
    assert len(raw) * 8 == 296
    assert {i for i in range(296) if status_at(raw, 1, i)} == set(range(36)) | {36, 291}
    store.close()


def test_a_slot_past_the_published_end_rebuilds_the_list_at_once(tmp_path: Path) -> None:
    """A consumer refuses a token past its list's end: never serve a list older than the newest slot."""
    clock, store, ring, publisher = make_publisher(tmp_path, 1 << 12, 64, min_headroom=16)
    store.allocate_slot(int(clock.now) + 50)
    assert len(published(publisher, ring, clock)) * 8 == 24  # slot 0, then 16 of headroom, in bytes
    for _ in range(23):  # slots 1-23: still inside the list, which stands (built under a second ago)
        store.allocate_slot(int(clock.now) + 50)
    assert len(published(publisher, ring, clock)) * 8 == 24 and publisher.builds == 1
    slot = store.allocate_slot(int(clock.now) + 50)  # 24: past the end
    raw = published(publisher, ring, clock)
    assert publisher.builds == 2 and status_at(raw, 1, slot) == 0
    assert len(raw) * 8 == statuslist.list_end(0, 25, 1 << 12, 16) == 56
    store.close()


def test_content_negotiation_headers() -> None:
    jwt, cwt = statuslist.CONTENT_TYPE, "application/statuslist+cwt"
    for accept in (None, "", " ", jwt, "*/*", "application/*", f"{cwt}, {jwt};q=0.001", f" {jwt} ; q=1 ",
                   f"{cwt};q=1, */*;q=0.5", f"text/html,{jwt};charset=x"):
        assert statuslist.accepts_jwt(accept), accept
    for accept in (cwt, f"{jwt};q=0", f"{jwt};q=2", f"{jwt};q=-1", f"{jwt};q=nan", f"{jwt};q=", "text/*",
                   ",", ";;", f"{jwt};q=0, */*", "application/*;q=0.0"):
        assert not statuslist.accepts_jwt(accept), accept
    for encoding in ("gzip", "x-gzip", "*", "deflate, gzip;q=0.1", "GZip ; Q=1"):
        assert statuslist.accepts_gzip(encoding), encoding
    for encoding in (None, "", "identity", "br", "gzip;q=0", "*;q=0", "gzip;q=0, *", "gzip;q=x", ","):
        assert not statuslist.accepts_gzip(encoding), encoding


def test_rebuilt_only_when_something_moved(tmp_path: Path) -> None:
    clock, store, ring, publisher = make_publisher(tmp_path, 1 << 12, 64)
    slot = store.allocate_slot(int(clock.now) + 50)
    first = publisher.token()
    assert publisher.token() == first and publisher.builds == 1
    store.revoke_token("a", slot, int(clock.now) + 50)
    assert publisher.token() == first  # within a second of the last build: a storm is batched
    clock.now += statuslist.MIN_REBUILD_INTERVAL
    assert status_at(published(publisher, ring, clock), 1, slot) == 1 and publisher.builds == 2
    clock.now += statuslist.TTL / 2 - 1
    assert publisher.builds == 2 and publisher.token()
    clock.now += 1  # half its ttl gone: a fresh one, so a fetcher always gets most of a ttl
    publisher.token()
    assert publisher.builds == 3
    ring.rotate()  # a new signer: never served a list the old key signed
    header = segment(publisher.token(), 0)
    assert header == {"alg": "EdDSA", "typ": "statuslist+jwt", "kid": ring.signer()[0]}
    store.close()


def test_minted_slots_mark_late_mints_and_forget_expired_ones() -> None:
    index = RevocationIndex(Bitset(64))
    clock = Clock(1000.0)
    minted = statuslist.MintedSlots(index, leeway=0, clock=clock)
    minted.remember("alpha t", ["alpha"], 1, 1100, 1000)
    minted.remember("beta u", ["beta", "alpha"], 2, 1050, 1000)  # delegated by alpha
    assert minted.mark_agent("alpha") == 2 and minted.marked() == [1, 2]
    index.revoke_task("alpha t", 1000)
    minted.remember("alpha t", ["alpha"], 3, 1100, 1000)  # minted before the cutoff, remembered after
    # After it by the minting node's clock (one running ahead, its mint racing the end): dead too, as
    # Check decides (an ended task mints nothing more).
    minted.remember("alpha t", ["alpha"], 4, 1100, 1001)
    index.revoke_agent("delta", 1000)
    minted.remember("delta w", ["delta"], 6, 1100, 1001)  # a revoked agent's later mint: alive
    assert minted.marked() == [1, 2, 3, 4]
    clock.now = 1000 + statuslist.SWEEP_INTERVAL + 100  # past 1100: the sweep forgets all of them
    minted.remember("gamma v", ["gamma"], 5, int(clock.now) + 10, int(clock.now))
    assert minted.marked() == [] and len(minted) == 2  # slot 5, once for its task, once for gamma


# -- against a real daemon ----------------------------------------------------

def identity_for(daemon: Daemon, out: Path, agent: str = ALPHA) -> Identity:
    issue_svid(ensure_dev_pki(daemon.state_dir), agent, out)
    return Identity.from_dir(out)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("statuslist") / "state").start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Client:
    return Client(daemon.api_address, identity_for(daemon, tmp_path_factory.mktemp("id")),
                  check_server=daemon.check_address)


def fetch(daemon: Daemon, path: str) -> tuple[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{daemon.http_port}{path}", timeout=5) as r:
        return r.headers["content-type"], r.read().decode()


def jwks(daemon: Daemon) -> dict[str, Any]:
    return json.loads(fetch(daemon, "/.well-known/jwks.json")[1])


def status_list(daemon: Daemon) -> str:
    content_type, body = fetch(daemon, "/status-list")
    assert content_type == "application/statuslist+jwt"
    return body


def signer(daemon: Daemon) -> tuple[str, SigningKey]:
    """The daemon's current signing key, from its state dir (as an insider forging lists would)."""
    keys = daemon.state_dir / "keys"
    kid = next(k["kid"] for k in json.loads((keys / "keyring.json").read_text())["keys"]
               if k["state"] == "current")
    return kid, _read_private(keys / f"{kid}.pem", kid)


def bit(daemon: Daemon, slot: int) -> int:
    lst = payload(status_list(daemon))["status_list"]["lst"]
    return status_at(_inflate(lst, MAX_LIST_BYTES), 1, slot)


def test_revoking_a_token_flips_its_published_bit(daemon: Daemon, client: Client) -> None:
    minted = client.mint("sl-revoke", ["demo:*:read"])
    listing = status_list(daemon)
    header = segment(listing, 0)
    assert header == {"alg": "EdDSA", "typ": "statuslist+jwt", "kid": signer(daemon)[0]}
    body = payload(listing)
    claims = verify_offline(minted.token, jwks(daemon), listing, audience="tools")
    status = claims["status"]["status_list"]
    assert body["sub"] == status["uri"] == f"http://127.0.0.1:{daemon.http_port}/status-list"
    assert body["exp"] - body["iat"] == statuslist.LIFETIME and body["ttl"] == statuslist.TTL
    assert body["status_list"]["bits"] == 1 and bit(daemon, status["idx"]) == 0
    assert len(body["status_list"]["lst"]) < 20_000  # two MiB of window, compressed
    client.revoke(token_id=minted.token_id)
    wait_for(lambda: bit(daemon, status["idx"]) == 1, 10, "published revocation")
    with pytest.raises(errors.TokenRevoked):
        verify_offline(minted.token, jwks(daemon), status_list(daemon))
    # The stale list still says valid: offline verification is as fresh as the list it is given.
    assert verify_offline(minted.token, jwks(daemon), listing)["jti"] == claims["jti"]


def test_ending_a_task_and_revoking_an_agent_are_published(daemon: Daemon, client: Client,
                                                           tmp_path: Path) -> None:
    first, second = client.mint("sl-task", ["demo:*:read"]), client.mint("sl-task", ["demo:*:write"])
    other = client.mint("sl-other", ["demo:*:read"])
    client.end_task("sl-task")
    wait_for(lambda: bit(daemon, payload(second.token)["status"]["status_list"]["idx"]) == 1, 10,
             "published task end")
    for ended in (first, second):
        with pytest.raises(errors.TokenRevoked):
            verify_offline(ended.token, jwks(daemon), status_list(daemon))
    assert verify_offline(other.token, jwks(daemon), status_list(daemon))
    # Online the reason stays specific: the overlay is published only, never a journaled bit.
    assert client.check(first.token, "demo", "a", "read").reason == "task_ended"

    # An agent may revoke itself: a ban, so an agent of its own (later tests still delegate to beta).
    quitter = "spiffe://dev.local/agent/quitter"
    beta = Client(daemon.api_address, identity_for(daemon, tmp_path / "quitter", quitter))
    held = beta.mint("sl-agent", ["demo:*:read"])
    beta.revoke(agent=quitter)
    wait_for(lambda: bit(daemon, payload(held.token)["status"]["status_list"]["idx"]) == 1, 10,
             "published agent revocation")
    with pytest.raises(errors.TokenRevoked):
        verify_offline(held.token, jwks(daemon), status_list(daemon))


def test_a_delegated_token_dies_offline_with_its_ancestor(daemon: Daemon, client: Client) -> None:
    root = client.mint("sl-delegate", ["demo:*:read"])
    root_claims = payload(root.token)
    root_slot = root_claims["status"]["status_list"]["idx"]
    kid, key = signer(daemon)
    # alpha -> beta -> gamma; the children's own slots are never handed out, so clear.
    act = {"sub": BETA, "idx": root_slot + 101, "act": {"sub": root_claims["sub"], "idx": root_slot}}
    child = tokens.encode(tokens.build_claims(
        issuer=root_claims["iss"], audience=root_claims["aud"], subject=GAMMA, task="sl-delegate",
        grants=root_claims["grants"], issued_at=root_claims["iat"], ttl=60, slot=root_slot + 102,
        status_uri=root_claims["status"]["status_list"]["uri"], act=act), key, kid)
    assert verify_offline(child, jwks(daemon), status_list(daemon))["sub"] == GAMMA
    client.revoke(token_id=root.token_id)
    wait_for(lambda: bit(daemon, root_slot) == 1, 10, "published revocation")
    with pytest.raises(errors.DelegationRevoked, match="agent/alpha"):
        verify_offline(child, jwks(daemon), status_list(daemon))


def test_ending_the_root_task_reaches_a_real_delegated_child(daemon: Daemon, client: Client) -> None:
    root = client.mint("sl-real-delegate", ["demo:*:read"])
    child = client.delegate(root.token, BETA, ["demo:*:read"])
    claims = verify_offline(child.token, jwks(daemon), status_list(daemon))
    assert claims["sub"] == BETA and claims["act"]["sub"] == ALPHA
    # The child's own bit: the daemon remembered it under the root agent's task when it minted it.
    client.end_task("sl-real-delegate")
    wait_for(lambda: bit(daemon, claims["status"]["status_list"]["idx"]) == 1, 10, "published task end")
    with pytest.raises(errors.TokenRevoked):
        verify_offline(child.token, jwks(daemon), status_list(daemon))


def forged(daemon: Daemon, raw: bytes | None = None, *, key: tuple[str, SigningKey] | None = None,
           **changes: Any) -> str:
    """A status list as the daemon would sign it, with ``changes``."""
    good = payload(status_list(daemon))
    claims = {**good, **changes}
    if raw is not None:
        claims["status_list"] = {"bits": 1, "lst": statuslist.encode_lst(raw)}
    kid, signing_key = key or signer(daemon)
    return tokens.encode(claims, signing_key, kid, typ=statuslist.TYP)


def test_forged_stale_and_broken_lists_are_refused(daemon: Daemon, client: Client) -> None:
    minted = client.mint("sl-forged", ["demo:*:read"])
    keys = jwks(daemon)
    assert verify_offline(minted.token, keys, forged(daemon))  # the forger itself is sound
    kid, _ = signer(daemon)
    good = status_list(daemon)
    head, body, sig = good.split(".")
    lst = payload(good)["status_list"]["lst"]
    tampered = json.dumps({**payload(good), "status_list": {"bits": 1, "lst": lst[:-4] + "AAAA"}})
    now = payload(good)["iat"]
    cases = {
        "another key, our kid": (forged(daemon, key=(kid, SigningKey.generate())), errors.StatusListInvalid),
        "another key, its kid": (forged(daemon, key=("k2", SigningKey.generate())), errors.StatusListInvalid),
        "expired": (forged(daemon, iat=now - 600, exp=now - 400), errors.StatusListExpired),
        "past its ttl": (forged(daemon, iat=now - 200, exp=now + 400, ttl=60), errors.StatusListExpired),
        "another uri": (forged(daemon, sub="http://elsewhere/status-list"), errors.StatusListMismatch),
        "another issuer": (forged(daemon, iss="https://other"), errors.StatusListMismatch),
        "tampered lst": (f"{head}.{tokens.b64url(tampered.encode())}.{sig}", errors.StatusListInvalid),
        "zlib bomb": (forged(daemon, bytes(MAX_LIST_BYTES + 8)), errors.StatusListTooLarge),
        "truncated": (forged(daemon, b""), errors.StatusListTooShort),
        "a token, not a list": (minted.token, errors.StatusListInvalid),
        "wrong bits": (forged(daemon, status_list={"bits": 3, "lst": lst}), errors.StatusListInvalid),
        "not a JWS": (head + "." + body, errors.StatusListInvalid),
    }
    for name, (listing, refusal) in cases.items():
        try:
            verify_offline(minted.token, keys, listing)
        except errors.AgentAuthzError as exc:
            assert type(exc) is refusal, f"{name}: {exc!r}"
        else:
            pytest.fail(f"{name}: accepted")
    # And the token side stays strict: another issuer or audience, a JWKS without its key.
    with pytest.raises(errors.TokenIssuerMismatch):
        verify_offline(minted.token, keys, good, issuer="https://other")
    with pytest.raises(errors.TokenAudienceMismatch):
        verify_offline(minted.token, keys, good, audience="other")
    with pytest.raises(errors.TokenKeyUnknown):
        verify_offline(minted.token, {"keys": [k for k in keys["keys"] if k["kid"] != kid]}, good)
    with pytest.raises(errors.KeySetInvalid):
        verify_offline(minted.token, {"keys": [{**keys["keys"][0], "d": "AAAA"}]}, good)
    with pytest.raises(errors.TokenAudienceMismatch):  # a key of another trust boundary
        verify_offline(minted.token, {"keys": [{**k, "agentauthz_boundary": "other"} for k in keys["keys"]]},
                       good)
    assert verify_offline(minted.token, json.dumps(keys), good.encode())  # JSON text and a raw body


def test_status_list_endpoint_is_served_with_the_others(daemon: Daemon) -> None:
    assert http_get(f"http://127.0.0.1:{daemon.http_port}/status-list?x=1")[0] == 200
