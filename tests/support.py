"""Test helpers: a token factory and a verifier wired to it, for either twin."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Iterator

import pytest
from hypothesis import strategies as st
from nacl.signing import SigningKey

from agentauthz.decision import _accel, tokens
from agentauthz.decision._accel import HotPath

ISSUER = "https://agentauthz.test"
AUDIENCE = "tools"
AGENT = "spiffe://dev.local/agent/alpha"
STATUS_URI = "http://127.0.0.1:9192/status-list"


class AllowAll:
    """A policy that permits whatever the token grants."""

    def permits(self, agent: str, tool: str, target: str, operation: str, level: int) -> str | None:
        return None


class Forge:
    """Mints test tokens with a real Ed25519 key; slots are handed out in order."""

    def __init__(self, kid: str = "test-key-1") -> None:
        self.kid = kid
        self.key = SigningKey.generate()
        self.next_slot = 0
        self.now = int(time.time())

    @property
    def public(self) -> bytes:
        return bytes(self.key.verify_key)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        slot = overrides.pop("slot", None)
        if slot is None:
            slot, self.next_slot = self.next_slot, self.next_slot + 1
        base = tokens.build_claims(
            issuer=ISSUER, audience=AUDIENCE, subject=AGENT, task="task-1",
            grants=[tokens.grant("demo", "*", ["read", "write"], "internal")],
            issued_at=self.now, ttl=300, slot=slot, status_uri=STATUS_URI, intent="test",
        )
        base.update(overrides)
        return base

    def token(self, **overrides: Any) -> str:
        return tokens.encode(self.claims(**overrides), self.key, self.kid)


def make_verifier(hot: HotPath, forge: Forge, capacity: int = 1 << 16, **kwargs: Any) -> Any:
    """A verifier of ``hot``'s twin that trusts ``forge``'s key and allows by policy."""
    index = hot.RevocationIndex(hot.Bitset(capacity))
    verifier = hot.Verifier(issuer=ISSUER, audiences={AUDIENCE}, token_type=tokens.TOKEN_TYPE,
                            revocations=index, **kwargs)
    verifier.set_keys({forge.kid: forge.public})
    verifier.set_policy(AllowAll())
    return verifier


@contextlib.contextmanager
def daemon_twin(twin: str) -> Iterator[None]:
    """While inside, a daemon started (it inherits the environment) runs ``twin``'s hot path."""
    if twin == "native":
        native_or_fail()
    before = os.environ.get("AGENTAUTHZ_NO_EXTENSIONS")
    os.environ["AGENTAUTHZ_NO_EXTENSIONS"] = "1" if twin == "pure" else "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["AGENTAUTHZ_NO_EXTENSIONS"]
        else:
            os.environ["AGENTAUTHZ_NO_EXTENSIONS"] = before


def native_or_fail() -> HotPath:
    """The native twin; a normal build without it fails the test rather than silently testing pure."""
    try:
        return _accel.native()
    except ImportError as exc:
        if _accel.extensions_disabled():
            pytest.skip("AGENTAUTHZ_NO_EXTENSIONS set: native twin not built")
        pytest.fail(f"native module did not load: {exc}")


def damaged(raw: bytes, data: st.DataObject, edits: int = 4) -> bytes:
    """``raw`` with up to ``edits`` bytes flipped, cut, spliced in or made invalid UTF-8."""
    out = bytearray(raw)
    for _ in range(data.draw(st.integers(1, edits), label="edits")):
        if not out:
            break
        i = data.draw(st.integers(0, len(out) - 1), label="at")
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "invalid utf-8"]), label="edit")
        if kind == "flip":
            out[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "cut":
            del out[i:]
        elif kind == "insert":
            out[i:i] = data.draw(st.binary(min_size=1, max_size=4))
        else:
            out[i] = 0xFF
    return bytes(out)
