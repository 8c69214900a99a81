"""Differential tests: the native and the pure twin agree on every input, and refuse every tampered token.

"Agree" means the same exception class with the same message, or the same
verified claims, grants, slots and subjects, or the same decision reason.
"""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import AGENT, AllowAll, Forge, make_verifier, native_or_fail

from agentauthz import errors, reasons
from agentauthz.decision import _accel, _strict_py, tokens

B64URL = string.ascii_letters + string.digits + "-_"
SUBSTITUTES = B64URL + ".=+/ \t\x00é"
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class Twins:
    """One forge, and a verifier of each twin trusting it."""

    def __init__(self) -> None:
        self.native, self.pure = native_or_fail(), _accel.pure()
        self.forge = Forge()
        self.now = self.forge.now
        self.token = self.forge.token(act={"sub": "spiffe://dev.local/agent/root", "idx": 99})
        self.verifiers = [make_verifier(hot, self.forge) for hot in (self.native, self.pure)]

    def verify_outcomes(self, token: str | bytes) -> list[tuple[Any, ...]]:
        return [verify_outcome(v, token, self.now) for v in self.verifiers]

    def agree_refused(self, token: str | bytes) -> tuple[Any, ...]:
        """Both twins refuse ``token`` with the same class and message; returns that outcome."""
        native, pure = self.verify_outcomes(token)
        assert native == pure, (token, native, pure)
        assert native[0] == "refused", (token, native)
        return native


def verify_outcome(verifier: Any, token: str | bytes, now: float) -> tuple[Any, ...]:
    try:
        entry = verifier.verify(token, now)
    except errors.TokenError as exc:
        return ("refused", type(exc), str(exc))
    grants = [(g.tool, g.target, g.prefix, g.ops, g.level) for g in entry.grants]
    return ("verified", entry.claims, entry.kid, entry.jti, entry.sub, entry.task, entry.iat, entry.nbf,
            entry.exp, grants, entry.slots, entry.subjects)


def json_outcome(function: Any, raw: bytes) -> tuple[Any, ...]:
    try:
        return ("parsed", repr(function(raw, "claims")))  # repr: NaN never gets this far, -0.0 != 0.0
    except errors.TokenError as exc:
        return ("refused", type(exc), str(exc))


@pytest.fixture(scope="module")
def twins() -> Twins:
    return Twins()


def sign_raw(forge: Forge, header: bytes, payload: bytes) -> str:
    h, p = tokens.b64url(header), tokens.b64url(payload)
    return f"{h}.{p}.{tokens.b64url(forge.key.sign(f'{h}.{p}'.encode('ascii')).signature)}"


# -- exhaustive tampering of one valid token ---------------------------------------------


def test_the_valid_token_verifies_alike(twins: Twins) -> None:
    native, pure = twins.verify_outcomes(twins.token)
    assert native == pure and native[0] == "verified"


def test_every_truncation_is_refused_alike(twins: Twins) -> None:
    token = twins.token
    for cut in range(len(token)):
        twins.agree_refused(token[:cut])
        twins.agree_refused(token[cut + 1:])


def test_every_bit_flip_is_refused_alike(twins: Twins) -> None:
    raw = twins.token.encode("ascii")
    for index in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[index] ^= 1 << bit
            twins.agree_refused(bytes(flipped))
            twins.agree_refused(flipped.decode("latin-1"))


def test_every_character_substitution_is_refused_alike(twins: Twins) -> None:
    token = twins.token
    for index, original in enumerate(token):
        for char in SUBSTITUTES:
            if char != original:
                twins.agree_refused(token[:index] + char + token[index + 1:])


def test_every_insertion_and_deletion_is_refused_alike(twins: Twins) -> None:
    token = twins.token
    for index in range(len(token) + 1):
        twins.agree_refused(token[:index] + "A" + token[index:])
        if index < len(token):
            twins.agree_refused(token[:index] + token[index + 1:])


def test_no_mutation_was_cached(twins: Twins) -> None:
    for verifier in twins.verifiers:
        assert verifier.cache_len() <= 1  # at most the valid token itself


# -- random inputs -------------------------------------------------------------------------


@SETTINGS
@given(st.text(alphabet=SUBSTITUTES, max_size=200) | st.text(max_size=200))
def test_random_text_agrees(twins: Twins, text: str) -> None:
    twins.agree_refused(text)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes_agree(twins: Twins, data: bytes) -> None:
    twins.agree_refused(data)


@SETTINGS
@given(st.lists(st.text(alphabet=B64URL + "=+/", max_size=40), min_size=1, max_size=5))
def test_random_segments_agree(twins: Twins, parts: list[str]) -> None:
    twins.agree_refused(".".join(parts))


@SETTINGS
@given(st.text(alphabet=SUBSTITUTES, max_size=64))
def test_b64url_decode_agrees(twins: Twins, segment: str) -> None:
    results: list[tuple[Any, ...]] = []
    decoders: tuple[Any, ...] = (twins.native.b64url_decode, twins.pure.b64url_decode)
    for decode in decoders:
        try:
            results.append(("ok", decode(segment)))
        except errors.TokenError as exc:
            results.append(("refused", type(exc), str(exc)))
    assert results[0] == results[1]


# -- strict JSON ------------------------------------------------------------------------------

KEYS = st.sampled_from(["a", "b", "iss", "x:y", 'q\\"uote', "\\u0061", ""])  # "\u0061" is "a" again
# JSON whitespace mostly; vertical tab and no-break space are not JSON whitespace.
SPACE = st.sampled_from(["", "", "", " ", "\n", "\t ", "\r\n"] * 4 + ["\x0b", "\u00a0"])


# Mostly valid JSON, so the interesting refusals (duplicates, NaN, Infinity,
# overflowing floats) are reached, with a sprinkling of syntax errors.
STRING_PARTS = st.sampled_from(
    ["a", ":", ",", "{", "[", "}", '\\"', "\\\\", "\\n", "\\u00e9", "\\ud800", "é"])
BAD_STRING_PARTS = st.sampled_from(["\x01", "\\x", "\\u12"])
VALID_SCALARS = st.one_of(
    st.sampled_from(["null", "true", "false", "-0.0", "0", "-0", "1e-999", "1e5", "2.5E-3",
                     "123456789012345678901234567890"]),
    st.integers(min_value=-(10**20), max_value=10**20).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.lists(STRING_PARTS, max_size=6).map(lambda parts: '"' + "".join(parts) + '"'),
)
REFUSED_SCALARS = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999"])
BROKEN_SCALARS = st.one_of(
    st.sampled_from(["01", "1.", ".5", "tru", "nul", "+1", "'a'", ""]),
    st.lists(STRING_PARTS | BAD_STRING_PARTS, min_size=1, max_size=4).map(lambda p: '"' + "".join(p) + '"'),
)
SCALARS = st.one_of(*[VALID_SCALARS] * 12, REFUSED_SCALARS, BROKEN_SCALARS)


def _json_texts() -> st.SearchStrategy[str]:
    def containers(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
        members = st.lists(st.tuples(SPACE, KEYS, SPACE, inner), max_size=4).map(
            lambda items: ",".join(f'{a}"{k}"{b}:{v}' for a, k, b, v in items))
        elements = st.lists(st.tuples(SPACE, inner), max_size=4).map(
            lambda items: ",".join(f"{a}{v}" for a, v in items))
        return st.one_of(members.map(lambda m: "{" + m + "}"), elements.map(lambda e: "[" + e + "]"))
    return st.recursive(SCALARS, containers, max_leaves=12)


@settings(max_examples=1500, deadline=None)
@given(SPACE, _json_texts(), SPACE, st.sampled_from([""] * 12 + [",", "}", " x", "\x00"]))
def test_strict_json_agrees(twins: Twins, before: str, text: str, after: str, junk: str) -> None:
    from agentauthz.decision import _strict_c  # type: ignore[attr-defined]
    raw = (before + text + after + junk).encode("utf-8", "surrogatepass")
    assert json_outcome(_strict_c.json_object, raw) == json_outcome(_strict_py.json_object, raw)


@SETTINGS
@given(st.binary(max_size=64))
def test_strict_json_agrees_on_bytes(twins: Twins, raw: bytes) -> None:
    from agentauthz.decision import _strict_c  # type: ignore[attr-defined]
    assert json_outcome(_strict_c.json_object, raw) == json_outcome(_strict_py.json_object, raw)


def test_strict_json_fast_path_cases(twins: Twins) -> None:
    """Texts where a shortcut could go wrong: duplicates hidden by escapes, colons in strings."""
    from agentauthz.decision import _strict_c  # type: ignore[attr-defined]
    cases = [b'{"a":1,"\\u0061":2}', b'{"a:":1,"b":"x:y"}', b'{"a\\"":1,"a\\"":2}', b'{"a":{"b":1,"b":2}}',
             b'[{"a":NaN}]', b'{"a":[1e999]}', b'{"a":"\\\\","b":":"}', b' {"a" : 1 } ', b'{"a":-Infinity}',
             b'{"":1,"":1}', b'{"a":1}{"b":2}', b'\xef\xbb\xbf{"a":1}', b'{"a":1,}', b'{"a":"\xed\xa0\x80"}']
    for raw in cases:
        assert json_outcome(_strict_c.json_object, raw) == json_outcome(_strict_py.json_object, raw), raw


def test_strict_json_where_orjson_and_json_read_numbers_differently(twins: Twins) -> None:
    """The native twin parses with orjson first, which reads an integer beyond 64 bits as a float and
    refuses a lone surrogate that json keeps: those texts must come out as the pure twin reads them."""
    from agentauthz.decision import _strict_c  # type: ignore[attr-defined]
    cases = [b'{"exp":18446744073709551616}', b'{"exp":-9223372036854775809}', b'{"a":[1,2e0]}',
             b'{"iat":1.0}', b'{"a":"\\ud800"}', b'{"a":0.1,"a":0.1}', b'{"a":1E400}', b'{"n":-0.0}']
    for raw in cases:
        native, pure = json_outcome(_strict_c.json_object, raw), json_outcome(_strict_py.json_object, raw)
        assert native == pure, raw  # compared by repr: 2**64 stays an int, 1.0 a float, -0.0 negative
    big = _strict_c.json_object(b'{"exp":18446744073709551616}', "claims")["exp"]
    assert type(big) is int and big == 1 << 64


@settings(max_examples=200, deadline=None)
@given(_json_texts())
def test_signed_random_payloads_agree(twins: Twins, text: str) -> None:
    header = json.dumps({"alg": "EdDSA", "typ": tokens.TOKEN_TYPE, "kid": twins.forge.kid}).encode()
    token = sign_raw(twins.forge, header, text.encode("utf-8", "surrogatepass"))
    twins.agree_refused(token)  # not one of these is a valid claims set


# -- random, correctly signed headers and claims ------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)

HEADER_NAMES = st.sampled_from(["alg", "typ", "kid", "jwk", "jku", "x5u", "x5c", "crit", "cty", "zip"])
HEADER_VALUES = (st.sampled_from(["EdDSA", "none", "HS256", tokens.TOKEN_TYPE, "JWT", "test-key-1", ""])
                 | JSON_VALUES)


@SETTINGS
@given(st.dictionaries(HEADER_NAMES, HEADER_VALUES, max_size=5))
def test_signed_random_headers_agree(twins: Twins, header: dict[str, Any]) -> None:
    token = sign_raw(twins.forge, json.dumps(header).encode(), json.dumps(twins.forge.claims()).encode())
    native, pure = twins.verify_outcomes(token)
    assert native == pure


def _claim_edits(forge: Forge) -> st.SearchStrategy[list[tuple[str, Any]]]:
    now = forge.now
    names = st.sampled_from(["iss", "aud", "sub", "iat", "nbf", "exp", "jti", "task", "grants", "intent",
                             "status", "act", "cnf", "extra"])
    times = st.sampled_from([now, now - 1, now + 1, now - 400, now + 400, now + 3600, now + 3601, now - 30,
                             now + 30, now + 31, 0, -1, 1 << 40, float(now), True, str(now)])
    grant = st.fixed_dictionaries({
        "tool": st.sampled_from(["demo", "files", "demo", ""]) | JSON_VALUES,
        "target": st.sampled_from(["*", "reports/*", "*", "a*b", "**", "x", ""]),
        "ops": st.lists(st.sampled_from(["read", "write", "read", "", 1]), min_size=1, max_size=3),
        "sensitivity": st.sampled_from([*tokens.SENSITIVITY_LEVELS, *tokens.SENSITIVITY_LEVELS, "secret"]),
    })
    acts = st.recursive(
        st.none(),
        lambda inner: st.fixed_dictionaries(
            {"sub": st.sampled_from(["spiffe://dev.local/agent/x", "spiffe://dev.local/agent/y", ""]),
             "idx": st.integers(min_value=-2, max_value=2**65) | st.sampled_from([1.0, True, "3"])},
            optional={"act": inner}),
        max_leaves=10)
    values = {
        "iat": times, "nbf": times, "exp": times,
        "grants": st.lists(grant, min_size=1, max_size=3) | st.lists(grant, max_size=3) | JSON_VALUES,
        "status": st.fixed_dictionaries({"status_list": st.fixed_dictionaries(
            {"idx": st.integers(min_value=-2, max_value=2**65) | JSON_VALUES})}),
        "act": acts | acts | JSON_VALUES,
        "sub": st.sampled_from([AGENT, "spiffe://", "spiffe://x/y", "alice", ""]),
        "aud": st.sampled_from(["tools", "tools", ["tools"], ""]),
        "iss": st.sampled_from(["https://agentauthz.test", "https://agentauthz.test", "x"]) | JSON_VALUES,
        "intent": st.text(max_size=5) | st.just("x" * 1025) | JSON_VALUES,
        "cnf": st.dictionaries(st.text(max_size=3), st.text(max_size=3)) | JSON_VALUES,
    }

    def value_for(name: str) -> st.SearchStrategy[Any]:
        return values.get(name, JSON_VALUES)

    edit = names.flatmap(lambda name: st.tuples(st.just(name), st.just(None) if name == "extra" else
                                                 st.one_of(st.just(_DELETE), value_for(name))))
    return st.lists(edit, min_size=1, max_size=3)


_DELETE = "<delete>"
_FORGE = Forge()


@settings(max_examples=400, deadline=None)
@given(_claim_edits(_FORGE))
def test_signed_random_claims_agree(twins: Twins, edits: list[tuple[str, Any]]) -> None:
    claims = _FORGE.claims()
    for name, value in edits:
        if value == _DELETE:
            claims.pop(name, None)
        else:
            claims[name] = value
    token = tokens.encode(claims, _FORGE.key, _FORGE.kid)
    verifiers = [make_verifier(hot, _FORGE) for hot in (twins.native, twins.pure)]
    native, pure = (verify_outcome(v, token, _FORGE.now) for v in verifiers)
    assert native == pure
    decisions = [v.decide(token, "demo", "reports/q3", "read", "public", _FORGE.now)[0] for v in verifiers]
    assert decisions[0] == decisions[1]


def test_delegation_depths_agree(twins: Twins) -> None:
    """Random chains rarely reach the cap; walk every depth around it."""
    for depth in range(tokens.MAX_DELEGATION_DEPTH + 3):
        act: dict[str, Any] | None = None
        for level in range(depth):
            outer: dict[str, Any] = {"sub": f"spiffe://dev.local/agent/a{level}", "idx": 100 + level}
            act = {**outer, "act": act} if act else outer
        token = _FORGE.token(act=act) if act else _FORGE.token()
        verifiers = [make_verifier(hot, _FORGE) for hot in (twins.native, twins.pure)]
        native, pure = (verify_outcome(v, token, _FORGE.now) for v in verifiers)
        assert native == pure
        assert (native[0] == "verified") == (depth <= tokens.MAX_DELEGATION_DEPTH)


# -- decisions ---------------------------------------------------------------------------------

GRANT_TOOLS = st.sampled_from(["demo", "files", "mail"])
GRANT_TARGETS = st.sampled_from(["*", "reports/*", "reports/q3", "r*", "ops@example.com"])
REQUEST_TEXT = st.sampled_from(["demo", "files", "mail", "reports/q3", "reports/", "r", "ops@example.com",
                                "read", "write", "send", "", "*"])


def revoke(index: Any, kind: str, forge: Forge) -> None:
    if kind == "slot":
        index.revoke_slot(7)
    elif kind == "delegation":
        index.revoke_slot(8)
    elif kind == "task":
        index.revoke_task("task-1", forge.now)
    elif kind == "agent":
        index.revoke_agent("spiffe://dev.local/agent/root", forge.now)
    else:
        index.revoke_key(forge.kid)


class DenyFiles:
    """Policy that refuses the files tool outright."""

    def permits(self, agent: str, tool: str, target: str, operation: str, level: int) -> str | None:
        return reasons.POLICY_DENIED if tool == "files" else None


@SETTINGS
@given(
    st.lists(st.builds(tokens.grant, GRANT_TOOLS, GRANT_TARGETS,
                       st.lists(st.sampled_from(["read", "write", "send"]), min_size=1, unique=True),
                       st.sampled_from(tokens.SENSITIVITY_LEVELS)), min_size=1, max_size=4),
    st.lists(st.tuples(REQUEST_TEXT | st.none() | st.integers(), REQUEST_TEXT, REQUEST_TEXT,
                       st.sampled_from([*tokens.SENSITIVITY_LEVELS, "secret", ""])), min_size=1, max_size=6),
    st.sampled_from([AllowAll(), DenyFiles(), None]),
    st.sets(st.sampled_from(["slot", "task", "agent", "key", "delegation"]), max_size=2),
)
def test_decisions_agree(twins: Twins, grants: list[dict[str, Any]], requests: list[tuple[Any, ...]],
                         policy: Any, revoked: set[str]) -> None:
    forge = _FORGE
    token = forge.token(grants=grants, slot=7, act={"sub": "spiffe://dev.local/agent/root", "idx": 8})
    results = []
    for hot in (twins.native, twins.pure):
        verifier = make_verifier(hot, forge)
        verifier.set_policy(policy)
        for kind in revoked:
            revoke(verifier.revocations, kind, forge)
        results.append([verifier.decide(token, *request, forge.now)[0] for request in requests * 2])
    assert results[0] == results[1]


@SETTINGS
@given(st.sets(st.sampled_from(["slot", "task", "agent", "key", "delegation"]), max_size=3),
       st.sampled_from([0, 299, 300 + 29, 300 + 30, -31]),
       st.sampled_from(["valid", "tampered", "not text"]))
def test_verify_live_agrees(twins: Twins, revoked: set[str], offset: int, shape: str) -> None:
    forge = _FORGE
    token: Any = forge.token(slot=7, act={"sub": "spiffe://dev.local/agent/root", "idx": 8})
    if shape == "tampered":
        token = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    elif shape == "not text":
        token = token.encode()
    results = []
    for hot in (twins.native, twins.pure):
        verifier = make_verifier(hot, forge)
        for kind in revoked:
            revoke(verifier.revocations, kind, forge)
        reason, entry = verifier.verify_live(token, forge.now + offset)
        results.append((reason, None if entry is None else entry.jti))
    assert results[0] == results[1]


# -- bitsets -------------------------------------------------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("set"), st.integers(min_value=-5, max_value=700)),
    st.tuples(st.just("test"), st.integers(min_value=-5, max_value=700)),
    st.tuples(st.just("advance"), st.integers(min_value=0, max_value=700)),
    st.tuples(st.just("count"), st.just(0)),
), max_size=60)


@SETTINGS
@given(st.sampled_from([64, 128, 256]), OPS)
def test_bitset_operations_agree(twins: Twins, capacity: int, ops: list[tuple[str, int]]) -> None:
    buffers = [bytearray(twins.pure.bitset_module.buffer_size(capacity)) for _ in range(2)]
    sets = [hot.Bitset(capacity, buf) for hot, buf in zip((twins.native, twins.pure), buffers, strict=True)]
    for op, arg in ops:
        outcomes = []
        for bits in sets:
            try:
                outcomes.append(("ok", getattr(bits, op)(*([] if op == "count" else [arg]))))
            except ValueError as exc:
                outcomes.append(("error", str(exc)))
        assert outcomes[0] == outcomes[1], (op, arg)
        assert sets[0].base == sets[1].base
    assert buffers[0] == buffers[1]
