"""Ed25519 against Project Wycheproof's vectors, and the keys the verifiers refuse to load.

Every vector runs against both twins' ``ed25519_verify``, the exact call token verification makes
(libsodium through PyNaCl). Keys: a public key of small order, with a torsion component, or in a
non-canonical encoding is refused where keys enter the system (``Verifier.set_keys`` of each twin,
the offline verifier's JWKS). Those keys are computed here from the curve itself (RFC 8032
§5.1), not taken from a list.
"""

from __future__ import annotations

import base64
import importlib
import json
import time
from pathlib import Path
from types import ModuleType

import pytest
from nacl.signing import SigningKey
from support import Forge, make_verifier

from agentauthz import errors
from agentauthz.decision import tokens
from agentauthz.decision._accel import HotPath
from agentauthz.offline import verify_offline
from agentauthz.state.keys import Keyring

VECTORS = Path(__file__).parent / "vectors" / "wycheproof_ed25519_test.json"
DOC = json.loads(VECTORS.read_text())
TESTS = [(group["publicKey"]["pk"], test) for group in DOC["testGroups"] for test in group["tests"]]


def twin(hot: HotPath) -> ModuleType:
    """The module of ``hot``'s token checks: where its ed25519_verify and valid_public_key live."""
    return importlib.import_module(hot.VerifiedToken.__module__)


def test_the_vector_file_is_whole_and_has_no_undecided_results() -> None:
    assert DOC["algorithm"] == "EDDSA" and DOC["schema"] == "eddsa_verify_schema_v1.json"
    assert len(TESTS) == DOC["numberOfTests"] == 151
    assert len({t["tcId"] for _, t in TESTS}) == len(TESTS)
    assert {t["result"] for _, t in TESTS} == {"valid", "invalid"}  # "acceptable" would need a decision
    assert {flag for _, t in TESTS for flag in t["flags"]} <= set(DOC["notes"])


@pytest.mark.parametrize("index", range(len(TESTS)), ids=[f"tc{t['tcId']}-{t['result']}" for _, t in TESTS])
def test_wycheproof_vector(hot: HotPath, index: int) -> None:
    pk, vector = TESTS[index]
    verify = twin(hot).ed25519_verify
    valid = vector["result"] == "valid"
    assert verify(bytes.fromhex(pk), bytes.fromhex(vector["msg"]), bytes.fromhex(vector["sig"])) is valid, (
        vector["tcId"], vector["comment"], vector["flags"])


def test_each_vector_public_key_loads(hot: HotPath) -> None:
    verifier = make_verifier(hot, Forge())
    verifier.set_keys({f"k{i}": bytes.fromhex(pk) for i, pk in enumerate(sorted({pk for pk, _ in TESTS}))})


def test_ed25519_verify_is_what_token_verification_uses(hot: HotPath) -> None:
    forge = Forge()
    verifier = make_verifier(hot, forge)
    token = forge.token()
    head, body, sig = token.split(".")
    signature = base64.urlsafe_b64decode(sig + "==")
    assert twin(hot).ed25519_verify(forge.public, f"{head}.{body}".encode(), signature) is True
    assert verifier.verify(token, forge.now).sub
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert twin(hot).ed25519_verify(forge.public, f"{head}.{body}".encode(), flipped) is False
    with pytest.raises(errors.TokenSignatureInvalid):
        verifier.verify(f"{head}.{body}.{tokens.b64url(flipped)}", forge.now)
    for bad_length in (b"", signature[:63], signature + b"\x00"):
        assert twin(hot).ed25519_verify(forge.public, b"m", bad_length) is False
    assert twin(hot).ed25519_verify(forge.public[:31], b"m", signature) is False


# -- the curve, from RFC 8032 §5.1 (affine twisted Edwards coordinates) --------------------------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = -121665 * pow(121666, -1, P) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENTITY = (0, 1)
Point = tuple[int, int]


def recover_x(y: int, sign: int) -> int | None:
    """RFC 8032 §5.1.3 steps 2-4, without step 1's range check (we build out-of-range encodings)."""
    y %= P
    x2 = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if x2 == 0:
        return 0
    x = pow(x2, (P + 3) // 8, P)
    if (x * x - x2) % P:
        x = x * SQRT_M1 % P
    if (x * x - x2) % P:
        return None
    return P - x if x & 1 != sign else x


def add(p: Point, q: Point) -> Point:
    (x1, y1), (x2, y2) = p, q
    t = D * x1 * x2 * y1 * y2 % P
    return (x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P, (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P


def mul(k: int, p: Point) -> Point:
    out = IDENTITY
    while k:
        if k & 1:
            out = add(out, p)
        p, k = add(p, p), k >> 1
    return out


def encode(p: Point, y_offset: int = 0, sign: int | None = None) -> bytes:
    """RFC 8032 §5.1.2; ``y_offset`` P makes a non-canonical y, ``sign`` forces the sign bit."""
    x, y = p
    return ((y + y_offset) | (x & 1 if sign is None else sign) << 255).to_bytes(32, "little")


def torsion() -> list[Point]:
    """The eight points of order dividing 8: L times any point lands there (the group has order 8L)."""
    found: set[Point] = set()
    y = 2
    while len(found) < 8:
        x = recover_x(y, 0)
        if x is not None:
            found.add(mul(L, (x, y)))
        y += 1
    assert all(mul(8, t) == IDENTITY for t in found)
    return sorted(found)


def order(t: Point) -> int:
    return next(n for n in (1, 2, 4, 8) if mul(n, t) == IDENTITY)


TORSION = torsion()


def bad_keys() -> dict[str, bytes]:
    """Public keys no verifier may load, each named for why."""
    keys: dict[str, bytes] = {}
    for i, t in enumerate(TORSION):
        name = f"order-{order(t)}-point-{i}"
        keys[f"small-{name}"] = encode(t)
        if t[0] == 0:  # x = 0 with the sign bit set: RFC 8032 §5.1.3 step 4 says decoding fails
            keys[f"small-{name}-negative-zero"] = encode(t, sign=1)
        if t[1] < 2**255 - P:  # y + p still fits in 255 bits: the same point spelled a second way
            keys[f"small-{name}-y-plus-p"] = encode(t, P)
            if t[0] == 0:
                keys[f"small-{name}-y-plus-p-negative-zero"] = encode(t, P, sign=1)
    for y in range(2, 2**255 - P):  # non-canonical spellings of points that are not small
        x = recover_x(y, 0)
        if x is not None:
            keys[f"noncanonical-y{y}-plus-p"] = encode((x, y), P)
    real = SigningKey(bytes(range(32))).verify_key
    a = recover_x(int.from_bytes(bytes(real), "little") & (2**255 - 1), bytes(real)[31] >> 7)
    assert a is not None
    point = (a, int.from_bytes(bytes(real), "little") & (2**255 - 1))
    assert encode(point) == bytes(real)
    order8 = next(t for t in TORSION if order(t) == 8)
    keys["mixed-order-real-key-plus-order-8"] = encode(add(point, order8))
    keys["mixed-order-real-key-plus-order-2"] = encode(add(point, (0, P - 1)))
    not_on_curve = next(y for y in range(2, 100) if recover_x(y, 0) is None)
    keys["not-a-point"] = encode((0, not_on_curve))
    return keys


BAD_KEYS = bad_keys()


def test_the_bad_key_set_is_what_the_curve_says() -> None:
    assert sorted(order(t) for t in TORSION) == [1, 2, 4, 4, 8, 8, 8, 8]  # the torsion group is cyclic, Z/8
    assert all(encode(t) in BAD_KEYS.values() for t in TORSION)
    assert (1).to_bytes(32, "little") in BAD_KEYS.values()  # the identity
    assert bytes(32) in BAD_KEYS.values()  # (sqrt(-1), 0), order 4: y = 0, x even
    assert (P - 1).to_bytes(32, "little") in BAD_KEYS.values()  # (0, -1), order 2
    assert len(set(BAD_KEYS.values())) == len(BAD_KEYS)


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_bad_public_keys_are_refused_when_loaded(hot: HotPath, name: str) -> None:
    key = BAD_KEYS[name]
    assert twin(hot).valid_public_key(key) is False
    verifier = make_verifier(hot, Forge())
    with pytest.raises(ValueError, match="prime order"):
        verifier.set_keys({"bad": key})
    forge = Forge()
    verifier = make_verifier(hot, forge)
    with pytest.raises(ValueError):  # one bad key spoils the set: nothing half-loaded
        verifier.set_keys({forge.kid: forge.public, "bad": key})
    assert verifier.decide(forge.token(), "demo", "x", "read", "public", forge.now)[0] == "allow"


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_bad_public_keys_are_refused_in_a_jwks(name: str) -> None:
    jwks = {"keys": [{"kty": "OKP", "crv": "Ed25519", "x": tokens.b64url(BAD_KEYS[name]), "kid": "k"}]}
    with pytest.raises(errors.KeySetInvalid, match="prime order"):
        verify_offline("x.y.z", jwks, "x.y.z")


@pytest.mark.parametrize("name", sorted(k for k in BAD_KEYS if k.startswith("small-order")))
def test_libsodium_also_refuses_the_trivial_forgery_under_a_small_order_key(hot: HotPath, name: str) -> None:
    """Verified, not assumed: with A of small order, R = identity and S = 0 satisfy the naive equation
    [S]B = R + [k]A whenever 8 divides k (always, for A the identity). libsodium refuses them anyway."""
    forged = encode(IDENTITY) + bytes(32)
    for message in (b"", b"x", b"pay me", bytes(range(64))):
        assert twin(hot).ed25519_verify(BAD_KEYS[name], message, forged) is False


def test_good_keys_are_accepted(hot: HotPath) -> None:
    for _ in range(32):
        assert twin(hot).valid_public_key(bytes(SigningKey.generate().verify_key)) is True


def test_the_keyring_only_holds_keys_derived_from_its_own_seeds(tmp_path: Path) -> None:
    """keys.py never takes a public key from outside: each is derived from a private seed on disk."""
    ring = Keyring.open(tmp_path / "keys", rotation_interval=3600, max_token_lifetime=600, leeway=30,
                        clock=time.time)
    for _ in range(3):
        ring.rotate()
    from agentauthz.decision._token_py import valid_public_key
    published = ring.verification_keys()
    assert len(published) >= 4 and all(valid_public_key(k) for k in published.values())
    reopened = Keyring.open(tmp_path / "keys", rotation_interval=3600, max_token_lifetime=600, leeway=30)
    assert reopened.verification_keys() == published
