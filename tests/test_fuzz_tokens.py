"""Structure-aware fuzzing of the token parser and verifier, both twins, seeded from tests/corpus/tokens/.

test_differential.py tampers with one token byte by byte and edits single claims of a fixed claim set.
Here whole tokens are generated: headers and claim sets drawn from strategies (realistic values and
hostile ones at any depth: grants, act chains, status, cnf), serialized in every JSON spelling a
sender could choose (member order, spacing, escaped names, duplicates, BOM, lone surrogates), and
signed with a test key, so that strictness, not the signature, decides. Real tokens minted by a dev
daemon (tests/corpus/make_corpus.py) are mutated and re-signed, and spliced segment by segment.

Every example asserts: neither twin raises from ``decide``; both give the same reason (and the same
``verify`` outcome, message included); the reason is a known constant; an allow happens only for a
token an independent reading of the README's rules accepts, and every untouched generated token
is allowed. Example counts come from the hypothesis profile (tests/conftest.py): ``make fuzz``.
"""

from __future__ import annotations

import base64
import copy
import json
import math
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from support import AUDIENCE, ISSUER, AllowAll, Forge, native_or_fail

from agentauthz import errors, reasons
from agentauthz.decision import _accel, tokens
from agentauthz.decision._accel import HotPath
from agentauthz.decision.policy import spiffe_problem

CORPUS = Path(__file__).resolve().parent / "corpus" / "tokens"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text())
CORPUS_TOKENS = {name: (CORPUS / name).read_text().strip() for name in MANIFEST["tokens"]}
VALID_CORPUS = sorted(n for n, meta in MANIFEST["tokens"].items() if n.startswith("valid-"))
VERIFYING = frozenset(CORPUS_TOKENS[n] for n, m in MANIFEST["tokens"].items() if m["expect"] == "verified")
REASONS = frozenset(v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str))
LEEWAY, MAX_LIFETIME, CAPACITY = 30, 3600, 1 << 16
RANK = tokens.SENSITIVITY_RANK


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


CORPUS_KEYS = {k["kid"]: unb64(k["x"]) for k in json.loads((CORPUS / "jwks.json").read_text())["keys"]}
FORGE = Forge()
NOW = FORGE.now


def twins() -> list[HotPath]:
    return [native_or_fail(), _accel.pure()]


def verifier(hot: HotPath, issuer: str, audiences: set[str], keys: dict[str, bytes]) -> Any:
    v = hot.Verifier(issuer=issuer, audiences=audiences, token_type=tokens.TOKEN_TYPE, leeway=LEEWAY,
                     max_lifetime=MAX_LIFETIME, revocations=hot.RevocationIndex(hot.Bitset(CAPACITY)))
    v.set_keys(keys)
    v.set_policy(AllowAll())
    return v


def outcome(v: Any, token: Any, now: int) -> tuple[Any, ...]:
    """What ``verify`` says: the refusal (class, message) or the verified token's fields."""
    try:
        e = v.verify(token, now)
    except errors.TokenError as exc:
        return ("refused", exc.reason, type(exc), str(exc))
    grants = [(g.tool, g.target, g.prefix, sorted(g.ops), g.level) for g in e.grants]
    return ("verified", e.claims, e.kid, e.jti, e.sub, e.task, e.iat, e.nbf, e.exp, grants, e.slots,
            e.subjects)


def decide_both(token: Any, request: tuple[str, str, str, str], now: int, issuer: str = ISSUER,
                audiences: set[str] | None = None,
                keys: dict[str, bytes] | None = None) -> tuple[str, tuple[Any, ...]]:
    """Both twins, fresh verifiers: the agreed decision reason (asked twice: cold, then cached) and
    the agreed verify outcome."""
    audiences = audiences or {AUDIENCE}
    keys = keys if keys is not None else {FORGE.kid: FORGE.public}
    decided, verified = [], []
    for hot in twins():
        v = verifier(hot, issuer, audiences, keys)
        first = v.decide(token, *request, now)
        again = v.decide(token, *request, now)
        assert first[0] == again[0], (hot, first, again)  # the cache answers as the cold path did
        assert (first[1] is None) == (first[0] != reasons.ALLOW)
        decided.append(first[0])
        verified.append(outcome(v, token, now))
        assert v.cache_len() == (1 if verified[-1][0] == "verified" else 0)  # refusals are never cached
    assert decided[0] == decided[1], (token, decided)
    assert verified[0] == verified[1], (token, verified)
    assert decided[0] in REASONS, decided[0]
    event(decided[0])  # shown by `make fuzz` (--hypothesis-show-statistics)
    return decided[0], verified[0]


# -- an independent reading of the rules (README "How a Check is decided", step 2) ------------------


def _time_ok(value: Any) -> bool:
    return type(value) is int and 0 <= value < 1 << 40


def _well_formed(g: Any) -> bool:
    if not isinstance(g, dict):
        return False
    tool, target, ops, sensitivity = g.get("tool"), g.get("target"), g.get("ops"), g.get("sensitivity")
    return (isinstance(tool, str) and bool(tool) and isinstance(target, str) and bool(target)
            and "*" not in target[:-1] and isinstance(ops, list) and 0 < len(ops) <= 64
            and all(isinstance(op, str) and op for op in ops) and len(set(ops)) == len(ops)
            and isinstance(sensitivity, str) and sensitivity in RANK)


def _covers(g: dict[str, Any], tool: str, target: str, op: str, level: int) -> bool:
    if g["tool"] != tool or op not in g["ops"] or level > RANK[g["sensitivity"]]:
        return False
    pattern = g["target"]
    return target.startswith(pattern[:-1]) if pattern.endswith("*") else target == pattern


def acceptable(header: Any, claims: Any, request: tuple[str, str, str, str], now: int,
               issuer: str = ISSUER, audiences: frozenset[str] = frozenset({AUDIENCE}),
               kids: frozenset[str] = frozenset({FORGE.kid})) -> str | None:
    """None when an allow of ``request`` is consistent with the rules, else what an allow would break."""
    if not isinstance(header, dict) or set(header) - {"alg", "typ", "kid"}:
        return "header members"
    if header.get("alg") != "EdDSA" or header.get("typ") != tokens.TOKEN_TYPE \
            or header.get("kid") not in kids:
        return "alg/typ/kid"
    if not isinstance(claims, dict):
        return "claims not an object"
    aud = claims.get("aud")
    if claims.get("iss") != issuer or not isinstance(aud, str) or aud not in audiences:
        return "iss/aud"
    iat, nbf, exp = claims.get("iat"), claims.get("nbf"), claims.get("exp")
    if not (_time_ok(iat) and _time_ok(nbf) and _time_ok(exp)):
        return "times are not integers"
    if not (iat <= nbf < exp and exp - iat <= MAX_LIFETIME and iat <= now + LEEWAY
            and nbf - LEEWAY <= now < exp + LEEWAY):
        return "times"
    for name in ("sub", "jti", "task"):  # they become header values: printable, no spaces (RFC 9110 §5.5)
        value = claims.get(name)
        if not isinstance(value, str) or not _header_safe(value):
            return name
    if spiffe_problem(claims["sub"]):
        return "sub is not a SPIFFE ID"
    intent = claims.get("intent", "")
    if not isinstance(intent, str) or len(intent) > tokens.MAX_INTENT_CHARS:
        return "intent"
    grants = claims.get("grants")
    if not isinstance(grants, list) or not 0 < len(grants) <= tokens.MAX_GRANTS \
            or not all(map(_well_formed, grants)):
        return "grants"
    tool, target, op, sensitivity = request
    if sensitivity not in RANK or not any(_covers(g, tool, target, op, RANK[sensitivity]) for g in grants):
        return "no grant covers the request"
    status = claims.get("status")
    holder = status.get("status_list") if isinstance(status, dict) else None
    slots = [holder.get("idx") if isinstance(holder, dict) else None]
    act, depth = claims.get("act"), 0
    while act is not None:
        depth += 1
        if depth > tokens.MAX_DELEGATION_DEPTH or not isinstance(act, dict):
            return "act chain"
        if spiffe_problem(act.get("sub")):
            return "act sub"
        slots.append(act.get("idx"))
        act = act.get("act")
    if not all(type(s) is int and 0 <= s < CAPACITY for s in slots):
        return "status slots"
    if claims.get("cnf") is not None and not isinstance(claims["cnf"], dict):
        return "cnf"
    return None


# -- strategies -----------------------------------------------------------------------------------

HOSTILE = st.sampled_from([
    None, True, False, 0, -1, 1, 2**31, 2**53 + 1, 2**63, 2**64, -(2**63) - 1, 10**30, 1.5, -0.0, 1e308,
    math.nan, math.inf, "", " ", "\x00", "é", "\ud800", "\u202e", "*", "a*b", "**", "spiffe://", "x" * 1025,
    [], {}, [[]], {"": ""}, ["read"], {"idx": 1}, [None], "EdDSA", tokens.TOKEN_TYPE, "https://agentauthz.test",
    "tools", "spiffe://dev.local/agent/alpha", "spiffe://dev.local/agent/ünï", "spiffe://dev.local/agent/a/../b",
    "spiffe://DEV.local/agent/a", "spiffe://dev.local", "spiffe://dev.local/agent/a/", "spiffe://u@dev.local/a",
]).map(copy.deepcopy)  # edits change values in place: never the strategy's own
TEXT = st.text(max_size=8) | st.sampled_from(["demo", "files", "reports/q3", "read", "write", "ω", "a b"])
NAME = st.text(alphabet=string.ascii_lowercase + string.digits + "_-./:", min_size=1, max_size=10)
AGENTS = st.sampled_from(["spiffe://dev.local/agent/alpha", "spiffe://dev.local/agent/beta",
                          "spiffe://dev.local/agent/a-b_c.d/e", "spiffe://other.example/ns/x/sa/y"])
TARGET_PATTERNS = st.sampled_from(["*", "reports/*", "reports/q3", "r*", "ops@example.com", "é*"]) | NAME


@st.composite
def grants(draw: st.DrawFn) -> dict[str, Any]:
    g = tokens.grant(draw(NAME), draw(TARGET_PATTERNS), draw(st.lists(NAME, min_size=1, max_size=3)),
                     draw(st.sampled_from(tokens.SENSITIVITY_LEVELS)))
    if draw(st.integers(0, 9)) == 0:  # argument constraints and budgets ride along in a few grants
        prefix = "/srv/" + draw(st.text(string.ascii_lowercase, min_size=1))
        g["arguments"] = [{"name": "path", "prefix": prefix, "required": draw(st.booleans())}]
    if draw(st.integers(0, 9)) == 0:
        g["budget"] = {"max_calls": draw(st.integers(1, 100))}
    return g


@st.composite
def acts(draw: st.DrawFn) -> dict[str, Any] | None:
    act = None
    for _ in range(draw(st.integers(0, 3))):
        outer = {"sub": draw(AGENTS), "idx": draw(st.integers(0, CAPACITY - 1))}
        act = {**outer, "act": act} if act else outer
    return act


def _header_safe(value: str) -> bool:
    """What task and jti must be (they become header values): printable, no spaces, not empty."""
    return bool(value) and value.isprintable() and " " not in value


@st.composite
def valid_claims(draw: st.DrawFn) -> dict[str, Any]:
    """A claim set the rules accept at ``NOW``: times around now, 1-4 grants, an act chain, a cnf."""
    ttl = draw(st.integers(1, MAX_LIFETIME))
    iat = draw(st.integers(NOW - ttl + 1, NOW + LEEWAY))  # live now, within leeway of issue
    claims = tokens.build_claims(
        issuer=ISSUER, audience=AUDIENCE, subject=draw(AGENTS), task=draw(TEXT.filter(_header_safe)),
        grants=draw(st.lists(grants(), min_size=1, max_size=4)), issued_at=iat, ttl=ttl,
        slot=draw(st.integers(0, CAPACITY - 1)), status_uri="http://127.0.0.1:9192/status-list",
        intent=draw(st.text(max_size=40) | st.just("i" * tokens.MAX_INTENT_CHARS)),
        not_before=draw(st.integers(iat, min(iat + ttl - 1, NOW + LEEWAY))), act=draw(acts()),
        cnf=draw(st.none() | st.fixed_dictionaries({"x5t#S256": st.text(string.ascii_letters, max_size=43)})))
    if draw(st.booleans()):
        claims["approval"] = {"id": draw(NAME), "approver": {"sub": draw(TEXT), "iss": draw(TEXT)}}
    return claims


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every member and element path inside ``obj`` (the root excluded)."""
    out = []
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        out.append(prefix + (key,))
        out.extend(_paths(value, prefix + (key,)))
    return out


@st.composite
def edited(draw: st.DrawFn, obj: dict[str, Any], names: list[str]) -> tuple[dict[str, Any], int]:
    """``obj`` with up to three edits at any depth: replace with a hostile value, delete, or add a member.
    Returns the edited copy and how many edits were made."""
    obj = json.loads(json.dumps(obj))
    count = draw(st.integers(0, 3))
    for _ in range(count):
        paths = _paths(obj)
        kind = draw(st.sampled_from(["replace", "replace", "delete", "add"]))
        if kind == "add" or not paths:
            obj[draw(st.sampled_from(names) | TEXT)] = draw(HOSTILE)
            continue
        path = draw(st.sampled_from(paths))
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if kind == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(HOSTILE | grants() | AGENTS)
    return obj, count


@st.composite
def rendering(draw: st.DrawFn) -> dict[str, Any]:
    """How a sender might spell a JSON object: order, spacing, escapes, duplicates, BOM."""
    return {
        "shuffle": draw(st.randoms(use_true_random=False)),
        "sep": draw(st.sampled_from([(",", ":"), (", ", ": "), (" ,\n", "\t:\r\n")])),
        "ascii": draw(st.booleans()),
        "escape_names": draw(st.integers(0, 5)) == 0,
        "duplicate": draw(st.integers(0, 9)) == 0,
        "around": draw(st.sampled_from([("", "")] * 6
                                       + [(" ", "\n"), ("\ufeff", ""), ("", "\x00"), ("", "x")])),
    }


def render(obj: dict[str, Any], style: dict[str, Any]) -> tuple[bytes, bool]:
    """The bytes of ``obj`` in ``style``; True when they are strict JSON for exactly ``obj``."""
    members = list(obj.items())
    style["shuffle"].shuffle(members)
    if style["duplicate"] and members:
        members.append(members[0])

    def name(k: str) -> str:
        if style["escape_names"]:  # every UTF-16 unit as \\uXXXX: the same name, spelled otherwise
            units = k.encode("utf-16-be", "surrogatepass")
            pairs = zip(units[::2], units[1::2], strict=True)
            return '"' + "".join(f"\\u{a:02x}{b:02x}" for a, b in pairs) + '"'
        return json.dumps(k, ensure_ascii=style["ascii"])

    comma, colon = style["sep"]
    body = comma.join(name(k) + colon + json.dumps(v, ensure_ascii=style["ascii"]) for k, v in members)
    before, after = style["around"]
    text = before + "{" + body + "}" + after
    raw = text.encode("utf-8", "surrogatepass")
    has_surrogate = any(0xD800 <= ord(c) <= 0xDFFF for c in text)
    non_finite = not _finite(obj)
    spaced_only = before.strip(" ") == "" and after.strip(" \n") == ""
    strict = (not style["duplicate"] or not members) and spaced_only \
        and not (has_surrogate and not style["ascii"]) and not non_finite
    return raw, strict


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(_finite, value.values()))
    if isinstance(value, list):
        return all(map(_finite, value))
    return True


def sign(header_raw: bytes, payload_raw: bytes, key: Any = None) -> str:
    key = key or FORGE.key
    h, p = tokens.b64url(header_raw), tokens.b64url(payload_raw)
    return f"{h}.{p}.{tokens.b64url(key.sign(f'{h}.{p}'.encode()).signature)}"


HEADER_BASE = {"alg": "EdDSA", "typ": tokens.TOKEN_TYPE, "kid": FORGE.kid}
HEADER_NAMES = ["alg", "typ", "kid", "jwk", "jku", "x5u", "x5c", "x5t", "crit", "cty", "zip", "b64", "nonce"]


RANDOM_REQUESTS = st.tuples(TEXT, TEXT, TEXT, st.sampled_from([*tokens.SENSITIVITY_LEVELS, "secret", ""]))


def covering_request(claims: Any) -> st.SearchStrategy[tuple[tuple[str, str, str, str], bool]]:
    """Mostly (a request the first grant covers, True), so that an allow is possible; else (random, False)."""
    randoms = st.tuples(RANDOM_REQUESTS, st.just(False))
    try:
        first = claims["grants"][0]
        pattern = first["target"]
        target = pattern[:-1] + "x" if pattern.endswith("*") else pattern
        covered = (first["tool"], target, first["ops"][0], tokens.SENSITIVITY_LEVELS[0])
    except (TypeError, KeyError, IndexError, AttributeError):
        return randoms
    if not all(isinstance(x, str) for x in covered):
        return randoms
    return st.one_of(*[st.just((covered, True))] * 4, randoms)


# -- the corpus as explicit seeds -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MANIFEST["tokens"]))
def test_fuzz_corpus_tokens_verify_as_recorded(hot: HotPath, name: str) -> None:
    """Every corpus token: the outcome recorded in tests/corpus/tokens/manifest.json, in verify and decide."""
    meta, token = MANIFEST["tokens"][name], CORPUS_TOKENS[name]
    v = verifier(hot, MANIFEST["issuer"], {meta["audience"]}, CORPUS_KEYS)
    got = outcome(v, token, MANIFEST["now"])
    assert (got[1] if got[0] == "refused" else "verified") == meta["expect"], got
    if meta["expect"] == "verified":
        first = json.loads(unb64(token.split(".")[1]))["grants"][0]
        target = first["target"][:-1] + "x" if first["target"].endswith("*") else first["target"]
        # A slot outside the revocation window counts as revoked (fail closed).
        live = all(slot < CAPACITY for slot in got[10])
        expected = reasons.ALLOW if live else reasons.TOKEN_REVOKED
        request = (first["tool"], target, first["ops"][0], "public")
        assert v.decide(token, *request, MANIFEST["now"])[0] == expected
    else:
        assert v.decide(token, "demo", "x", "read", "public", MANIFEST["now"]) == (meta["expect"], None)


def test_fuzz_corpus_twins_give_the_same_messages() -> None:
    for name, meta in MANIFEST["tokens"].items():
        verifiers = [verifier(hot, MANIFEST["issuer"], {meta["audience"]}, CORPUS_KEYS) for hot in twins()]
        got = [outcome(v, CORPUS_TOKENS[name], MANIFEST["now"]) for v in verifiers]
        assert got[0] == got[1], name


# -- generated tokens -------------------------------------------------------------------------------


@st.composite
def generated(draw: st.DrawFn) -> tuple[str, bool, Any, Any, tuple[str, str, str, str]]:
    """(token, untouched, header, claims, request): ``untouched`` when nothing hostile was drawn."""
    header, header_edits = draw(edited(HEADER_BASE, HEADER_NAMES))
    claims, claim_edits = draw(edited(draw(valid_claims()), list(tokens.build_claims(
        issuer="", audience="", subject="", task="", grants=[], issued_at=0, ttl=0, slot=0, status_uri=""))
        + ["act", "cnf", "approval"]))
    header_raw, header_strict = render(header, draw(rendering()))
    payload_raw, payload_strict = render(claims, draw(rendering()))
    untouched = header_edits == 0 and claim_edits == 0 and header_strict and payload_strict
    strict = header_strict and payload_strict
    request, covering = draw(covering_request(claims))
    return sign(header_raw, payload_raw), untouched and covering, header if strict else None, claims, request


@settings()
@given(generated())
def test_fuzz_generated_tokens(case: tuple[str, bool, Any, Any, tuple[str, str, str, str]]) -> None:
    token, untouched, header, claims, request = case
    reason, verified = decide_both(token, request, NOW)
    if untouched:
        assert verified[0] == "verified", verified
        assert reason == reasons.ALLOW, (reason, request)
    if reason == reasons.ALLOW:
        assert header is not None, "an allow for a token whose JSON is not strict"
        assert acceptable(header, claims, request, NOW) is None, acceptable(header, claims, request, NOW)
    for other in (token.encode(), None, 7, token + "\x00"):  # never raises on what Envoy cannot send
        assert decide_both(other, request, NOW)[0] != reasons.ALLOW


# -- real tokens, mutated and re-signed ---------------------------------------------------------------


@st.composite
def resigned_corpus(draw: st.DrawFn) -> tuple[str, Any, Any, tuple[str, str, str, str], bool]:
    token = CORPUS_TOKENS[draw(st.sampled_from(VALID_CORPUS))]
    h64, p64, _ = token.split(".")
    header = {**json.loads(unb64(h64)), "kid": FORGE.kid}
    original = json.loads(unb64(p64))
    claims, count = draw(edited(original, list(original)))
    header_raw, header_strict = render(header, draw(rendering()))
    payload_raw, payload_strict = render(claims, draw(rendering()))
    strict = header_strict and payload_strict
    request, covering = draw(covering_request(claims))
    return sign(header_raw, payload_raw), header if strict else None, claims, request, count == 0 and strict \
        and covering


@settings()
@given(resigned_corpus())
@example(("x.y.z", None, None, ("demo", "x", "read", "public"), False))
def test_fuzz_resigned_corpus_tokens(case: tuple[str, Any, Any, tuple[str, str, str, str], bool]) -> None:
    token, header, claims, request, untouched = case
    audiences = {"tools", "data"}
    reason, _ = decide_both(token, request, MANIFEST["now"], MANIFEST["issuer"], audiences,
                            {FORGE.kid: FORGE.public})
    if untouched:
        assert reason == reasons.ALLOW, (reason, request)
    if reason == reasons.ALLOW:
        problem = acceptable(header, claims, request, MANIFEST["now"], MANIFEST["issuer"],
                             frozenset(audiences))
        assert problem is None, problem


# -- real tokens spliced: segments of one with segments of another, or mangled ---------------------------

SEGMENT_OPS = st.sampled_from(["keep", "keep", "keep", "swap", "pad", "std-alphabet", "upper", "drop-last",
                               "double", "empty", "dot"])


def mangle(segment: str, other: str, op: str) -> str:
    return {"keep": segment, "swap": other, "pad": segment + "=" * (-len(segment) % 4 or 2),
            "std-alphabet": segment.replace("-", "+").replace("_", "/"), "upper": segment.upper(),
            "drop-last": segment[:-1], "double": segment + segment, "empty": "", "dot": segment + "."}[op]


@settings()
@given(st.lists(st.sampled_from(sorted(CORPUS_TOKENS)), min_size=2, max_size=2), st.lists(SEGMENT_OPS,
       min_size=3, max_size=3), st.sampled_from(["demo", "read_file", "mcp"]))
def test_fuzz_spliced_corpus_tokens(names: list[str], ops: list[str], tool: str) -> None:
    first, second = ((CORPUS_TOKENS[n].split(".") + ["", ""])[:3] for n in names)
    token = ".".join(mangle(a, b, op) for a, b, op in zip(first, second, ops, strict=True))
    request = (tool, "reports/q3", "read", "public")
    reason, verified = decide_both(token, request, MANIFEST["now"], MANIFEST["issuer"], {"tools", "data"},
                                   CORPUS_KEYS)
    if verified[0] == "verified" or reason == reasons.ALLOW:
        # A splice that verifies is byte for byte one of the tokens that verify on their own.
        assert token in VERIFYING, token


# -- found by the fuzzer: the verdict on deep nesting depended on the stack ---------------------------


@pytest.mark.parametrize("depth", [tokens.MAX_JSON_DEPTH - 1, tokens.MAX_JSON_DEPTH, 900, 1500])
def test_fuzz_nesting_verdict_does_not_depend_on_the_recursion_limit(depth: int) -> None:
    """Hypothesis raises the recursion limit while it runs a test: a 1500-deep claim then parsed, and a
    token refused under the daemon's limit verified here. The bound is now fixed (MAX_JSON_DEPTH)."""
    import sys
    payload = json.dumps(FORGE.claims())[:-1] + ',"x":' + "[" * (depth - 1) + "]" * (depth - 1) + "}"
    token = sign(json.dumps(HEADER_BASE).encode(), payload.encode())  # ``depth`` containers deep
    expected = "verified" if depth <= tokens.MAX_JSON_DEPTH else "refused"
    limit = sys.getrecursionlimit()
    try:
        for recursion_limit in (limit, 400, 20_000):
            sys.setrecursionlimit(recursion_limit)
            got = [outcome(verifier(hot, ISSUER, {AUDIENCE}, {FORGE.kid: FORGE.public}), token, NOW)
                   for hot in twins()]
            assert got[0] == got[1] and got[0][0] == expected, (recursion_limit, got[0][:4])
    finally:
        sys.setrecursionlimit(limit)


def test_fuzz_nesting_counts_brackets_in_strings_never() -> None:
    from agentauthz.decision import _strict_c, _strict_py  # type: ignore[attr-defined]
    quoted = '"' + "[{" * 100 + '\\"' + "[" * 100 + '"'
    raw = f'{{"a":{quoted}}}'.encode()
    for module in (_strict_c, _strict_py):
        assert module.json_object(raw, "claims") == {"a": json.loads(quoted)}
