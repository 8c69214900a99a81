"""Micro benchmarks of the hot path, native and pure side by side, with the baselines a user would compare.

    make bench            (or: pytest benchmarks/bench_hotpath.py --benchmark-only)

Cold verify: a token never seen before (cache miss) vs a bare PyNaCl verify of
the same bytes and PyJWT's EdDSA decode. Warm decide: a cached token, the path
every call after the first takes. Read the ratios, not the absolute times.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest
from nacl.signing import SigningKey

from agentauthz.decision import _accel, tokens

ISSUER = "https://agentauthz.bench"
AUDIENCE = "tools"


class AllowAll:
    def permits(self, agent: str, tool: str, target: str, operation: str, level: int) -> None:
        return None


def implementations() -> list[Any]:
    impls = [pytest.param(_accel.pure(), id="pure")]
    try:
        impls.insert(0, pytest.param(_accel.native(), id="native"))
    except ImportError:
        pass
    return impls


KEY = SigningKey.generate()
KID = "bench-key"
NOW = int(time.time())


def token(slot: int = 1, **extra: Any) -> str:
    claims = tokens.build_claims(
        issuer=ISSUER, audience=AUDIENCE, subject="spiffe://dev.local/agent/bench", task="bench",
        grants=[tokens.grant("demo", "*", ["read", "write"], "internal")], issued_at=NOW, ttl=600,
        slot=slot, status_uri="http://127.0.0.1:9192/status-list", intent="benchmark", **extra)
    return tokens.encode(claims, KEY, KID)


def verifier(hot: Any) -> Any:
    v = hot.Verifier(issuer=ISSUER, audiences={AUDIENCE}, token_type=tokens.TOKEN_TYPE,
                     revocations=hot.RevocationIndex(hot.Bitset(1 << 16)))
    v.set_keys({KID: bytes(KEY.verify_key)})
    v.set_policy(AllowAll())
    return v


@pytest.mark.benchmark(group="cold-verify")
@pytest.mark.parametrize("hot", implementations())
def test_cold_verify(benchmark: Any, hot: Any) -> None:
    v = verifier(hot)
    t = token()

    def cold() -> Any:
        v.forget(t)
        return v.verify(t, NOW)
    assert benchmark(cold).jti


@pytest.mark.benchmark(group="cold-verify")
def test_cold_verify_bare_pynacl(benchmark: Any) -> None:
    """The floor: libsodium's Ed25519 verify alone, on the same signing input."""
    t = token()
    signing_input, _, sig = t.rpartition(".")
    signature = _accel.pure().b64url_decode(sig)
    key = KEY.verify_key
    benchmark(key.verify, signing_input.encode(), signature)


@pytest.mark.benchmark(group="cold-verify")
def test_cold_verify_pyjwt(benchmark: Any) -> None:
    """What a Python developer would write: PyJWT decoding an EdDSA token."""
    jwt = pytest.importorskip("jwt")
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    public = Ed25519PublicKey.from_public_bytes(bytes(KEY.verify_key))
    t = token()
    claims = benchmark(jwt.decode, t, public, algorithms=["EdDSA"], audience=AUDIENCE, issuer=ISSUER)
    assert claims["sub"].startswith("spiffe://")


@pytest.mark.benchmark(group="warm-decide")
@pytest.mark.parametrize("hot", implementations())
def test_warm_decide(benchmark: Any, hot: Any) -> None:
    v = verifier(hot)
    t = token()
    assert v.decide(t, "demo", "reports", "read", "public", NOW)[0] == "allow"
    reason, _ = benchmark(v.decide, t, "demo", "reports", "read", "public", NOW)
    assert reason == "allow"


@pytest.mark.benchmark(group="warm-decide-revoked")
@pytest.mark.parametrize("revoked", [0, 10_000_000])
@pytest.mark.parametrize("hot", implementations())
def test_warm_decide_with_revocations(benchmark: Any, hot: Any, revoked: int) -> None:
    """Decide cost must not grow with the number of revoked tokens: one bit test each."""
    from agentauthz.decision._bitset_py import HEADER_BYTES, buffer_size
    capacity = 1 << 24
    buffer = bytearray(buffer_size(capacity))
    buffer[HEADER_BYTES:HEADER_BYTES + revoked // 8] = b"\xff" * (revoked // 8)  # slots [0, revoked)
    index = hot.RevocationIndex(hot.Bitset(capacity, buffer))
    v = hot.Verifier(issuer=ISSUER, audiences={AUDIENCE}, token_type=tokens.TOKEN_TYPE, revocations=index)
    v.set_keys({KID: bytes(KEY.verify_key)})
    v.set_policy(AllowAll())
    t = token(slot=capacity - 1)
    assert v.decide(t, "demo", "reports", "read", "public", NOW)[0] == "allow"
    reason, _ = benchmark(v.decide, t, "demo", "reports", "read", "public", NOW)
    assert reason == "allow"
    assert index.bits.count() == revoked


@pytest.mark.benchmark(group="bitset-test")
@pytest.mark.parametrize("hot", implementations())
def test_bitset_test(benchmark: Any, hot: Any) -> None:
    bits = hot.Bitset(1 << 20)
    bits.set(12345)
    slots = itertools.cycle(range(0, 1 << 20, 4099))
    benchmark(lambda: bits.test(next(slots)))
    assert bits.test(12345)
