"""The hot path's verification and decision, run against both twins (native and pure)."""

from __future__ import annotations

import gc
import json
from typing import Any, Callable

import pytest
from support import AGENT, AUDIENCE, ISSUER, AllowAll, Forge, make_verifier

from agentauthz import errors, reasons
from agentauthz.decision import tokens
from agentauthz.decision._accel import HotPath

LEEWAY = 30  # the Verifier default
OTHER_AGENT = "spiffe://dev.local/agent/beta"
ROOT_AGENT = "spiffe://dev.local/agent/root"
MY_TASK = tokens.task_key(AGENT, "task-1")
REQUEST = ("demo", "reports", "read", "public")


# -- helpers -----------------------------------------------------------------------------


def raw_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def sign_raw(forge: Forge, header: bytes, payload: bytes) -> str:
    """A correctly signed compact JWS over arbitrary header and payload bytes."""
    h, p = tokens.b64url(header), tokens.b64url(payload)
    signature = forge.key.sign(f"{h}.{p}".encode("ascii")).signature
    return f"{h}.{p}.{tokens.b64url(signature)}"


def header_of(forge: Forge, **overrides: Any) -> dict[str, Any]:
    header = {"alg": tokens.ALGORITHM, "typ": tokens.TOKEN_TYPE, "kid": forge.kid}
    header.update(overrides)
    return {k: v for k, v in header.items() if v is not _DROP}


_DROP = object()


def with_header(forge: Forge, **overrides: Any) -> str:
    return sign_raw(forge, raw_json(header_of(forge, **overrides)), raw_json(forge.claims()))


def with_payload_text(forge: Forge, payload: bytes) -> str:
    return sign_raw(forge, raw_json(header_of(forge)), payload)


def with_header_text(forge: Forge, header: bytes) -> str:
    return sign_raw(forge, header, raw_json(forge.claims()))


def without(forge: Forge, *names: str, **overrides: Any) -> str:
    claims = forge.claims(**overrides)
    for name in names:
        claims.pop(name)
    return tokens.encode(claims, forge.key, forge.kid)


def replace_char(token: str, index: int, char: str) -> str:
    return token[:index] + char + token[index + 1:]


def non_canonical_tail(segment: str) -> str:
    """The same bytes with a set unused low bit in the last character (RFC 4648 §3.5)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(segment) % 4 in (2, 3)
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) ^ 1]


def act_chain(depth: int, first_slot: int = 1000) -> dict[str, Any] | None:
    """A delegation chain ``depth`` actors deep, nearest actor outermost (RFC 8693 §4.1)."""
    act: dict[str, Any] | None = None
    for level in reversed(range(depth)):
        act = {"sub": f"spiffe://dev.local/agent/a{level}", "idx": first_slot + level,
               **({"act": act} if act else {})}
    return act


@pytest.fixture
def forge() -> Forge:
    return Forge()


@pytest.fixture
def verifier(hot: HotPath, forge: Forge) -> Any:
    return make_verifier(hot, forge)


def decide(verifier: Any, token: str, now: float, request: tuple[str, str, str, str] = REQUEST) -> str:
    reason, entry = verifier.decide(token, *request, now)
    assert (entry is None) == (reason != reasons.ALLOW)
    return reason


# -- the valid token ---------------------------------------------------------------------


def test_valid_token_verifies(verifier: Any, forge: Forge) -> None:
    token = forge.token(act=act_chain(2), cnf={"x5t#S256": "abc"})
    entry = verifier.verify(token, forge.now)
    assert (entry.sub, entry.task, entry.kid) == (AGENT, "task-1", forge.kid)
    assert entry.jti == entry.claims["jti"]
    assert (entry.iat, entry.nbf, entry.exp) == (forge.now, forge.now, forge.now + 300)
    assert entry.slots == (0, 1000, 1001)
    assert entry.subjects == (AGENT, "spiffe://dev.local/agent/a0", "spiffe://dev.local/agent/a1")
    assert [(g.tool, g.target, sorted(g.ops), g.level) for g in entry.grants] == [
        ("demo", "*", ["read", "write"], tokens.SENSITIVITY_RANK["internal"])]
    assert entry.attachment is None
    entry.attachment = b"pre-built response"
    assert verifier.verify(token, forge.now).attachment == b"pre-built response"


def test_valid_token_allows(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    result = verifier.decide(token, *REQUEST, forge.now)
    assert result[0] == reasons.ALLOW
    assert result[1] is verifier.verify(token, forge.now)  # the cached entry itself
    again = verifier.decide(token, *REQUEST, forge.now)
    assert again == result and again[1] is result[1]


def test_token_as_ascii_bytes_is_accepted(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    assert verifier.verify(token.encode("ascii"), forge.now) is verifier.verify(token, forge.now)


# -- every refusal, with its class and its reason ------------------------------------------

Case = Callable[[Forge], "str | bytes"]
MALFORMED = errors.TokenMalformed
CLAIMS = errors.TokenClaimsInvalid


def with_grant(forge: Forge, **fields: Any) -> str:
    grant = tokens.grant("demo", "*", ["read"])
    grant.update(fields)
    return forge.token(grants=[grant])


def with_status(forge: Forge, status_list: Any) -> str:
    return forge.token(status={"status_list": status_list})


def header_plus(forge: Forge, member: bytes) -> str:
    """A valid header with one more raw JSON member appended."""
    return with_header_text(forge, raw_json(header_of(forge))[:-1] + b"," + member + b"}")


def payload_plus(forge: Forge, member: bytes) -> str:
    """Valid claims with one more raw JSON member appended."""
    return with_payload_text(forge, raw_json(forge.claims())[:-1] + b"," + member + b"}")


def segments(token: str, index: int, segment: str) -> str:
    parts = token.split(".")
    parts[index] = segment
    return ".".join(parts)


REFUSALS: dict[str, tuple[Case, type[errors.TokenError]]] = {
    # shape and encoding
    "two segments": (lambda f: f.token().rsplit(".", 1)[0], MALFORMED),
    "four segments": (lambda f: f.token() + ".AAAA", MALFORMED),
    "empty": (lambda f: "", MALFORMED),
    "empty segment": (lambda f: segments(f.token(), 0, ""), MALFORMED),
    "padding in signature": (lambda f: f.token() + "==", MALFORMED),
    "padding in header": (lambda f: segments(f.token(), 0, f.token().split(".")[0] + "="), MALFORMED),
    "plus alphabet": (lambda f: replace_char(f.token(), -5, "+"), MALFORMED),
    "slash alphabet": (lambda f: replace_char(f.token(), -5, "/"), MALFORMED),
    "space inside": (lambda f: replace_char(f.token(), 40, " "), MALFORMED),
    "newline at end": (lambda f: f.token() + "\n", MALFORMED),
    "leading space": (lambda f: " " + f.token(), MALFORMED),
    "length 1 mod 4": (lambda f: f.token() + "A", MALFORMED),
    "non-canonical signature bits": (
        lambda f: segments(f.token(), 2, non_canonical_tail(f.token().split(".")[2])), MALFORMED),
    "non-ascii text": (lambda f: replace_char(f.token(), 40, "é"), MALFORMED),
    "non-ascii bytes": (lambda f: f.token().encode("ascii") + b"\xff", MALFORMED),
    "too large": (lambda f: f.token(intent="x" * 1000) + "A" * 8192, errors.TokenTooLarge),
    "too large as bytes": (lambda f: b"A" * 8193, errors.TokenTooLarge),
    # header
    "header not json": (lambda f: with_header_text(f, b"not json"), MALFORMED),
    "header not utf-8": (lambda f: with_header_text(f, b'{"alg":"\xff"}'), MALFORMED),
    "header not object": (lambda f: with_header_text(f, b"[1, 2]"), MALFORMED),
    "header trailing data": (lambda f: with_header_text(f, raw_json(header_of(f)) + b" {}"), MALFORMED),
    "header duplicate key": (lambda f: header_plus(f, b'"alg":"EdDSA"'), MALFORMED),
    "header NaN": (lambda f: header_plus(f, b'"x":NaN'), MALFORMED),
    "header Infinity": (lambda f: header_plus(f, b'"x":-Infinity'), MALFORMED),
    "header huge float": (lambda f: header_plus(f, b'"x":1e999'), MALFORMED),
    "header too deep": (lambda f: header_plus(f, b'"x":' + b"[" * 2000 + b"]" * 2000), MALFORMED),
    "alg none": (lambda f: with_header(f, alg="none"), errors.TokenAlgorithmRejected),
    "alg HS256": (lambda f: with_header(f, alg="HS256"), errors.TokenAlgorithmRejected),
    "alg ES256": (lambda f: with_header(f, alg="ES256"), errors.TokenAlgorithmRejected),
    "alg missing": (lambda f: with_header(f, alg=_DROP), errors.TokenAlgorithmRejected),
    "alg not a string": (lambda f: with_header(f, alg=["EdDSA"]), errors.TokenAlgorithmRejected),
    "jwk in header": (lambda f: with_header(f, jwk={"kty": "OKP"}), errors.TokenHeaderRejected),
    "jku in header": (lambda f: with_header(f, jku="https://evil/jwks"), errors.TokenHeaderRejected),
    "x5u in header": (lambda f: with_header(f, x5u="https://evil/cert"), errors.TokenHeaderRejected),
    "x5c in header": (lambda f: with_header(f, x5c=["MIIB"]), errors.TokenHeaderRejected),
    "jwk with alg none": (lambda f: with_header(f, alg="none", jwk={}), errors.TokenHeaderRejected),
    "crit": (lambda f: with_header(f, crit=["exp"]), errors.TokenHeaderRejected),
    "unknown header parameter": (lambda f: with_header(f, cty="JWT"), errors.TokenHeaderRejected),
    "typ mismatch": (lambda f: with_header(f, typ="JWT"), errors.TokenTypeMismatch),
    "typ missing": (lambda f: with_header(f, typ=_DROP), errors.TokenTypeMismatch),
    "kid missing": (lambda f: with_header(f, kid=_DROP), MALFORMED),
    "kid empty": (lambda f: with_header(f, kid=""), MALFORMED),
    "kid not a string": (lambda f: with_header(f, kid=7), MALFORMED),
    # key and signature
    "unknown kid": (lambda f: tokens.encode(f.claims(), f.key, "another-kid"), errors.TokenKeyUnknown),
    "signature too short": (lambda f: f.token()[:-4], MALFORMED),
    "signed by another key": (lambda f: tokens.encode(f.claims(), Forge().key, f.kid),
                              errors.TokenSignatureInvalid),
    "payload altered": (lambda f: segments(f.token(), 1, tokens.b64url(raw_json(f.claims(sub=OTHER_AGENT)))),
                        errors.TokenSignatureInvalid),
    "zero signature": (lambda f: segments(f.token(), 2, tokens.b64url(bytes(64))),
                       errors.TokenSignatureInvalid),
    # payload encoding (checked only after the signature)
    "payload not json": (lambda f: with_payload_text(f, b"{"), MALFORMED),
    "payload not utf-8": (lambda f: with_payload_text(f, b'{"iss":"\xc3"}'), MALFORMED),
    "payload not object": (lambda f: with_payload_text(f, b'"claims"'), MALFORMED),
    "payload null": (lambda f: with_payload_text(f, b"null"), MALFORMED),
    "payload duplicate key": (lambda f: payload_plus(f, b'"iss":"x"'), MALFORMED),
    "payload nested duplicate key": (lambda f: payload_plus(f, b'"cnf":{"a":1,"a":1}'), MALFORMED),
    "payload NaN": (lambda f: payload_plus(f, b'"x":NaN'), MALFORMED),
    # claims
    "iss mismatch": (lambda f: f.token(iss="https://elsewhere"), errors.TokenIssuerMismatch),
    "iss missing": (lambda f: without(f, "iss"), errors.TokenIssuerMismatch),
    "aud mismatch": (lambda f: f.token(aud="other-tools"), errors.TokenAudienceMismatch),
    "aud as list": (lambda f: f.token(aud=[AUDIENCE]), errors.TokenAudienceMismatch),
    "aud missing": (lambda f: without(f, "aud"), errors.TokenAudienceMismatch),
    "iat float": (lambda f: f.token(iat=f.now + 0.5), CLAIMS),
    "iat integral float": (lambda f: f.token(iat=float(f.now)), CLAIMS),
    "exp bool": (lambda f: f.token(exp=True), CLAIMS),
    "nbf string": (lambda f: f.token(nbf=str(f.now)), CLAIMS),
    "exp missing": (lambda f: without(f, "exp"), CLAIMS),
    "iat negative": (lambda f: f.token(iat=-1), CLAIMS),
    "exp beyond 2**40": (lambda f: f.token(exp=1 << 40), CLAIMS),
    "iat after nbf": (lambda f: f.token(iat=f.now, nbf=f.now - 1), CLAIMS),
    "nbf equals exp": (lambda f: f.token(nbf=f.now + 300), CLAIMS),
    "nbf after exp": (lambda f: f.token(nbf=f.now + 301), CLAIMS),
    "lifetime over the cap": (lambda f: f.token(exp=f.now + 3601), errors.TokenLifetimeExceeded),
    "issued in the future": (lambda f: f.token(iat=f.now + LEEWAY + 1, nbf=f.now + LEEWAY + 1,
                                               exp=f.now + LEEWAY + 100), errors.TokenNotYetValid),
    "expired": (lambda f: f.token(iat=f.now - 400, nbf=f.now - 400, exp=f.now - 100), errors.TokenExpired),
    "expired at exp, the leeway notwithstanding": (
        lambda f: f.token(iat=f.now - 400, nbf=f.now - 400, exp=f.now), errors.TokenExpired),
    "not yet valid": (lambda f: f.token(nbf=f.now + LEEWAY + 1), errors.TokenNotYetValid),
    "sub not spiffe": (lambda f: f.token(sub="alice@example.com"), CLAIMS),
    "sub not a string": (lambda f: f.token(sub=["spiffe://x"]), CLAIMS),
    "jti empty": (lambda f: f.token(jti=""), CLAIMS),
    "jti missing": (lambda f: without(f, "jti"), CLAIMS),
    "task empty": (lambda f: f.token(task=""), CLAIMS),
    "task not a string": (lambda f: f.token(task=1), CLAIMS),
    "intent too long": (lambda f: f.token(intent="x" * (tokens.MAX_INTENT_CHARS + 1)), CLAIMS),
    "intent not a string": (lambda f: f.token(intent=None), CLAIMS),
    "grants missing": (lambda f: without(f, "grants"), CLAIMS),
    "grants not a list": (lambda f: f.token(grants={"tool": "demo"}), CLAIMS),
    "grants empty": (lambda f: f.token(grants=[]), CLAIMS),
    "too many grants": (lambda f: f.token(grants=[tokens.grant("demo", f"t{i}", ["read"])
                                                  for i in range(tokens.MAX_GRANTS + 1)]), CLAIMS),
    "grant not an object": (lambda f: f.token(grants=["demo:*:read"]), CLAIMS),
    "grant tool empty": (lambda f: with_grant(f, tool=""), CLAIMS),
    "grant tool not a string": (lambda f: with_grant(f, tool=1), CLAIMS),
    "grant target empty": (lambda f: with_grant(f, target=""), CLAIMS),
    "grant star in the middle": (lambda f: with_grant(f, target="a*b"), CLAIMS),
    "grant double star": (lambda f: with_grant(f, target="**"), CLAIMS),
    "grant ops duplicated": (lambda f: with_grant(f, ops=["read", "read"]), CLAIMS),
    "grant ops empty": (lambda f: with_grant(f, ops=[]), CLAIMS),
    "grant op empty": (lambda f: with_grant(f, ops=[""]), CLAIMS),
    "grant op not a string": (lambda f: with_grant(f, ops=[1]), CLAIMS),
    "grant ops a string": (lambda f: with_grant(f, ops="read"), CLAIMS),
    "grant too many ops": (lambda f: with_grant(f, ops=[f"op{i}" for i in range(65)]), CLAIMS),
    "grant unknown sensitivity": (lambda f: with_grant(f, sensitivity="secret"), CLAIMS),
    "grant sensitivity null": (lambda f: with_grant(f, sensitivity=None), CLAIMS),
    "status missing": (lambda f: without(f, "status"), CLAIMS),
    "status idx negative": (lambda f: with_status(f, {"idx": -1, "uri": "x"}), CLAIMS),
    "status idx string": (lambda f: with_status(f, {"idx": "7", "uri": "x"}), CLAIMS),
    "status idx bool": (lambda f: with_status(f, {"idx": True, "uri": "x"}), CLAIMS),
    "status idx float": (lambda f: with_status(f, {"idx": 7.0, "uri": "x"}), CLAIMS),
    "status list not an object": (lambda f: with_status(f, [7]), CLAIMS),
    "act chain too deep": (lambda f: f.token(act=act_chain(tokens.MAX_DELEGATION_DEPTH + 1)), CLAIMS),
    "act not an object": (lambda f: f.token(act="spiffe://x"), CLAIMS),
    "act without sub": (lambda f: f.token(act={"idx": 3}), CLAIMS),
    "act sub empty": (lambda f: f.token(act={"sub": "", "idx": 3}), CLAIMS),
    "act without idx": (lambda f: f.token(act={"sub": OTHER_AGENT}), CLAIMS),
    "act idx negative": (lambda f: f.token(act={"sub": OTHER_AGENT, "idx": -3}), CLAIMS),
    "nested act bad": (lambda f: f.token(act={"sub": OTHER_AGENT, "idx": 3, "act": []}), CLAIMS),
    "cnf not an object": (lambda f: f.token(cnf="thumbprint"), CLAIMS),
}


@pytest.mark.parametrize("case", REFUSALS, ids=list(REFUSALS))
def test_refusal(hot: HotPath, forge: Forge, case: str) -> None:
    make, expected = REFUSALS[case]
    token = make(forge)
    verifier = make_verifier(hot, forge)
    with pytest.raises(errors.TokenError) as caught:
        verifier.verify(token, forge.now)
    assert type(caught.value) is expected, caught.value
    assert verifier.cache_len() == 0
    reason = decide(verifier, token, forge.now) if isinstance(token, str) else reasons.TOKEN_MALFORMED
    assert reason == (expected.reason if isinstance(token, str) else reasons.TOKEN_MALFORMED)
    assert reason in reasons.UNAUTHENTICATED


def test_refusal_messages(hot: HotPath, forge: Forge) -> None:
    """The exact messages the pure twin raises (the differential suite covers the rest)."""
    verifier = make_verifier(hot, forge)
    token = forge.token()
    header, payload, signature = token.split(".")
    cases = {
        f"{header}.{payload}": "token must have exactly three segments",
        segments(token, 2, non_canonical_tail(signature)): "segment has non-canonical base64url padding bits",
        f"{header}.{payload}.{signature}=": "segment is not unpadded base64url",
        with_header_text(forge, b'{"alg":1,"alg":2}'): "duplicate JSON key 'alg'",
        with_header_text(forge, b'{"alg":NaN}'): "non-finite number NaN in JSON",
        with_header_text(forge, b'{"alg":1e400}'): "non-finite number in JSON",
        with_header_text(forge, b"[]"): "header is not a JSON object",
        with_payload_text(forge, b"{"): "claims is not valid JSON",
        forge.token(iss="x"): "iss is not this daemon",
        forge.token(act={"sub": OTHER_AGENT, "idx": -1}): "act must carry a non-negative integer idx",
    }
    for text, message in cases.items():
        with pytest.raises(errors.TokenError) as caught:
            verifier.verify(text, forge.now)
        assert str(caught.value) == message


def test_a_token_is_split_into_exactly_three_segments_at_its_dots(hot: HotPath, forge: Forge) -> None:
    """Every dot counts, wherever it sits: the native twin finds them with memchr, not str.split."""
    verifier = make_verifier(hot, forge)
    token = forge.token()
    header, payload, signature = token.split(".")
    three = "token must have exactly three segments"
    refusals = {
        "": three, ".": three, "..": "segment is not unpadded base64url", "...": three,
        header: three, f"{header}.{payload}": three, f".{token}": three, f"{token}.": three,
        f"{token}.{signature}": three, f"{header}..{payload}.{signature}": three,
        f"{header}.{payload}{signature}": three,
        f"é.{payload}.{signature}": "segment is not unpadded base64url",  # a wider str kind
        f"{header}.{payload}.{signature}\u2024": "segment is not unpadded base64url",  # a dot leader
        f"{header}.{payload}.\U0001f600.": three,
    }
    for text, message in refusals.items():
        with pytest.raises(errors.TokenMalformed) as caught:
            verifier.verify(text, forge.now)
        assert str(caught.value) == message, text
    assert verifier.verify(token, forge.now).sub == AGENT


def test_task_and_jti_take_visible_characters_only(hot: HotPath, forge: Forge) -> None:
    """Header-bound claims (they reach the tool as header values): every ASCII character from "!" to
    "~", and printable text beyond ASCII; never a control character, a space or a separator."""
    verifier = make_verifier(hot, forge)
    for code in range(0x80):
        for name in ("task", "jti"):
            token = forge.token(**{name: f"t{chr(code)}t"})
            if 0x21 <= code <= 0x7E:
                assert getattr(verifier.verify(token, forge.now), name) == f"t{chr(code)}t"
            else:
                with pytest.raises(errors.TokenClaimsInvalid, match=f"{name} must be a non-empty string"):
                    verifier.verify(token, forge.now)
    wide_task = "tâche-задача-\U0001f600"
    assert verifier.verify(forge.token(task=wide_task), forge.now).task == wide_task
    for wide in ("t\u00a0t", "t\u2028t", "t\u200bt", "t\u3000t", "é\x7f"):
        with pytest.raises(errors.TokenClaimsInvalid, match="task must be a non-empty string"):
            verifier.verify(forge.token(task=wide), forge.now)


@pytest.mark.parametrize("bad", [None, 7, 1.5, ["a.b"], {"t": 1}, bytearray(b"a.b.c"), memoryview(b"a.b.c")])
def test_non_text_tokens_are_malformed_never_a_crash(verifier: Any, forge: Forge, bad: Any) -> None:
    with pytest.raises(errors.TokenMalformed):
        verifier.verify(bad, forge.now)
    assert verifier.decide(bad, *REQUEST, forge.now) == (reasons.TOKEN_MALFORMED, None)


def test_str_subclass_is_not_a_cache_key(verifier: Any, forge: Forge) -> None:
    class Sneaky(str):
        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    token = forge.token()
    verifier.verify(token, forge.now)
    with pytest.raises(errors.TokenMalformed):
        verifier.verify(Sneaky(token), forge.now)
    assert decide(verifier, Sneaky(token), forge.now) == reasons.TOKEN_MALFORMED


def test_delegation_depth_limit_is_inclusive(verifier: Any, forge: Forge) -> None:
    entry = verifier.verify(forge.token(act=act_chain(tokens.MAX_DELEGATION_DEPTH)), forge.now)
    assert len(entry.subjects) == len(entry.slots) == tokens.MAX_DELEGATION_DEPTH + 1


def test_time_boundaries(verifier: Any, forge: Forge) -> None:
    now = forge.now
    # Valid until exp, refused at it (RFC 7519 §4.1.4): the daemon's own exp gets no leeway (issue 16),
    # whether the token is cached or new.
    token = forge.token(iat=now - 300, nbf=now - 300, exp=now + 1)
    assert verifier.verify(token, now).exp == now + 1
    with pytest.raises(errors.TokenExpired):
        verifier.verify(token, now + 1)
    assert decide(verifier, token, now + 1) == reasons.TOKEN_EXPIRED
    assert decide(verifier, token, now + 0.999) == reasons.ALLOW
    assert decide(verifier, forge.token(iat=now - 300, nbf=now - 300, exp=now), now) == reasons.TOKEN_EXPIRED
    # nbf minus leeway is the first valid instant.
    early = forge.token(nbf=now + LEEWAY)
    assert verifier.verify(early, now).nbf == now + LEEWAY
    with pytest.raises(errors.TokenNotYetValid):
        verifier.verify(early, now - 0.5)
    assert decide(verifier, early, now - 0.5) == reasons.TOKEN_NOT_YET_VALID
    # iat may be up to the leeway in the future (clock skew), not more.
    skewed = forge.token(iat=now + LEEWAY, nbf=now + LEEWAY, exp=now + LEEWAY + 60)
    assert verifier.verify(skewed, now).iat == now + LEEWAY
    # Lifetime exactly at the cap is fine.
    assert verifier.verify(forge.token(exp=now + 3600), now).exp == now + 3600


def test_leeway_and_lifetime_are_configurable(hot: HotPath, forge: Forge) -> None:
    verifier = make_verifier(hot, forge, leeway=0, max_lifetime=60)
    with pytest.raises(errors.TokenLifetimeExceeded):
        verifier.verify(forge.token(exp=forge.now + 61), forge.now)
    token = forge.token(exp=forge.now + 60)
    with pytest.raises(errors.TokenExpired):
        verifier.verify(token, forge.now + 60)
    assert verifier.verify(token, forge.now + 59.9).exp == forge.now + 60


@pytest.mark.parametrize("option", ["leeway", "max_lifetime", "max_token_bytes", "cache_size"])
def test_verifier_options_are_validated(hot: HotPath, option: str) -> None:
    index = hot.RevocationIndex(hot.Bitset(64))
    with pytest.raises(ValueError):
        hot.Verifier(issuer=ISSUER, audiences={AUDIENCE}, token_type=tokens.TOKEN_TYPE, revocations=index,
                     **{option: -1})


def test_set_keys_validates(verifier: Any, forge: Forge) -> None:
    for bad in ({"": forge.public}, {7: forge.public}, {"k": b"short"}, {"k": forge.public + b"x"}):
        with pytest.raises(ValueError):
            verifier.set_keys(bad)
    verifier.verify(forge.token(), forge.now)  # the old keys are still in force


def test_audiences_accept_any_listed(hot: HotPath, forge: Forge) -> None:
    verifier = make_verifier(hot, forge)
    verifier.audiences = frozenset({AUDIENCE, "mesh"})
    assert verifier.verify(forge.token(aud="mesh"), forge.now).claims["aud"] == "mesh"


def test_max_token_bytes(hot: HotPath, forge: Forge) -> None:
    token = forge.token()
    verifier = make_verifier(hot, forge, max_token_bytes=len(token))
    assert verifier.verify(token, forge.now).sub == AGENT
    longer = forge.token(intent="a longer intent than before")
    with pytest.raises(errors.TokenTooLarge):
        verifier.verify(longer, forge.now)
    with pytest.raises(errors.TokenTooLarge):
        verifier.verify(longer.encode("ascii"), forge.now)
    assert decide(verifier, longer, forge.now) == reasons.TOKEN_TOO_LARGE


# -- the verified-token cache ----------------------------------------------------------


def test_cache_returns_the_same_entry(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    first = verifier.verify(token, forge.now)
    assert verifier.cache_len() == 1
    assert verifier.verify(token, forge.now) is first
    assert verifier.decide(token, *REQUEST, forge.now)[1] is first
    assert verifier.cache_len() == 1


def test_cached_token_is_refused_once_its_key_is_removed(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    verifier.verify(token, forge.now)
    other = Forge(kid="test-key-2")
    verifier.set_keys({other.kid: other.public})
    assert verifier.cache_len() == 0
    with pytest.raises(errors.TokenKeyUnknown):
        verifier.verify(token, forge.now)
    assert decide(verifier, token, forge.now) == reasons.TOKEN_KEY_UNKNOWN


def test_cached_token_is_reverified_when_its_kid_gets_another_key(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    verifier.verify(token, forge.now)
    impostor = Forge(kid=forge.kid)  # same kid, different key pair
    verifier.set_keys({forge.kid: impostor.public})
    assert verifier.cache_len() == 0
    with pytest.raises(errors.TokenSignatureInvalid):
        verifier.verify(token, forge.now)
    assert decide(verifier, token, forge.now) == reasons.TOKEN_SIGNATURE
    assert decide(verifier, impostor.token(), forge.now) == reasons.ALLOW


def test_cache_survives_a_rotation_that_keeps_its_key(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    entry = verifier.verify(token, forge.now)
    newer = Forge(kid="test-key-2")
    verifier.set_keys({forge.kid: bytes(forge.public), newer.kid: newer.public})
    assert verifier.cache_len() == 1
    assert verifier.verify(token, forge.now) is entry


def test_cache_is_bounded_first_in_first_out(hot: HotPath, forge: Forge) -> None:
    verifier = make_verifier(hot, forge, cache_size=3)
    minted = [forge.token() for _ in range(5)]
    entries = [verifier.verify(t, forge.now) for t in minted]
    assert verifier.cache_len() == 3
    # The two oldest were evicted: verifying them again yields new entries.
    assert verifier.verify(minted[4], forge.now) is entries[4]
    assert verifier.verify(minted[2], forge.now) is entries[2]
    again = verifier.verify(minted[0], forge.now)
    assert again is not entries[0] and again.jti == entries[0].jti
    assert verifier.cache_len() == 3
    # Inserting minted[0] evicted the oldest remaining one, minted[2].
    assert verifier.verify(minted[3], forge.now) is entries[3]
    assert verifier.verify(minted[2], forge.now) is not entries[2]


def test_an_evicted_token_is_freed_at_once_not_by_the_cycle_collector(hot: HotPath, forge: Forge) -> None:
    """Under distinct tokens every Check evicts one: an entry that referred to itself would live on as
    cyclic garbage until a full collection walked it (gc CPU and memory on the cold path)."""
    verifier = make_verifier(hot, forge, cache_size=4)
    minted = [forge.token() for _ in range(60)]

    def live_entries() -> int:
        return sum(type(o) is hot.VerifiedToken for o in gc.get_objects())
    gc.collect()
    before = live_entries()
    gc.disable()
    try:
        for token in minted:
            assert decide(verifier, token, forge.now) == reasons.ALLOW
        verifier.forget(minted[-1])
        assert live_entries() - before <= 3  # only what the cache still holds
    finally:
        gc.enable()


def test_cache_checks_time_on_every_hit(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    verifier.verify(token, forge.now)
    with pytest.raises(errors.TokenExpired):
        verifier.verify(token, forge.now + 300 + LEEWAY)
    with pytest.raises(errors.TokenNotYetValid):
        verifier.verify(token, forge.now - LEEWAY - 1)
    assert verifier.cache_len() == 1


def test_forget_and_purge_expired(verifier: Any, forge: Forge) -> None:
    short = forge.token(exp=forge.now + 10)
    long = forge.token(exp=forge.now + 300)
    verifier.verify(short, forge.now)
    verifier.verify(long, forge.now)
    assert verifier.purge_expired(forge.now + 9.5) == 0
    assert verifier.purge_expired(forge.now + 10) == 1  # at exp: no leeway, as the decision
    assert verifier.cache_len() == 1
    verifier.forget(long)
    verifier.forget(long)  # forgetting twice is harmless
    assert verifier.cache_len() == 0


def test_cache_key_is_the_exact_text(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    header, payload, signature = token.split(".")
    verifier.verify(token, forge.now)
    # Decodes to the very same bytes, but is another string: never the cached entry.
    twin = f"{header}.{payload}.{non_canonical_tail(signature)}"
    with pytest.raises(errors.TokenMalformed):
        verifier.verify(twin, forge.now)
    assert decide(verifier, twin, forge.now) == reasons.TOKEN_MALFORMED


# -- the decision -----------------------------------------------------------------------


class Recorder:
    """A policy that records what it was asked and answers from a table."""

    def __init__(self, answer: str | None = None) -> None:
        self.answer = answer
        self.calls: list[tuple[str, str, str, str, int]] = []

    def permits(self, agent: str, tool: str, target: str, operation: str, level: int) -> str | None:
        self.calls.append((agent, tool, target, operation, level))
        return self.answer


GRANTS = [tokens.grant("demo", "*", ["read", "write"], "internal"),
          tokens.grant("files", "reports/*", ["read"], "confidential"),
          tokens.grant("mail", "ops@example.com", ["send"], "public")]


@pytest.mark.parametrize(("request_", "expected"), [
    (("demo", "anything", "read", "public"), reasons.ALLOW),
    (("demo", "", "write", "internal"), reasons.ALLOW),
    (("demo", "x", "read", "confidential"), reasons.SENSITIVITY_EXCEEDED),
    (("demo", "x", "delete", "public"), reasons.SCOPE_DENIED),
    (("files", "reports/q3", "read", "confidential"), reasons.ALLOW),
    (("files", "reports/", "read", "public"), reasons.ALLOW),
    (("files", "reports", "read", "public"), reasons.SCOPE_DENIED),
    (("files", "reports/q3", "read", "restricted"), reasons.SENSITIVITY_EXCEEDED),
    (("files", "reports/q3", "write", "public"), reasons.SCOPE_DENIED),
    (("mail", "ops@example.com", "send", "public"), reasons.ALLOW),
    (("mail", "ops@example.com.evil", "send", "public"), reasons.SCOPE_DENIED),
    (("mail", "ops@example.com", "send", "internal"), reasons.SENSITIVITY_EXCEEDED),
    (("shell", "x", "run", "public"), reasons.SCOPE_DENIED),
    (("", "x", "read", "public"), reasons.REQUEST_INVALID),
    (("demo", "x", "", "public"), reasons.REQUEST_INVALID),
    (("demo", "x", "read", "secret"), reasons.REQUEST_INVALID),
    (("demo", "x", "read", ""), reasons.REQUEST_INVALID),
    (("demo", None, "read", "public"), reasons.REQUEST_INVALID),
    ((7, "x", "read", "public"), reasons.REQUEST_INVALID),
    (("demo", "x", b"read", "public"), reasons.REQUEST_INVALID),
    (("demo", "x", "read", 0), reasons.REQUEST_INVALID),
    ((["demo"], "x", "read", "public"), reasons.REQUEST_INVALID),
    (("demo", {"x": 1}, "read", "public"), reasons.REQUEST_INVALID),
])
def test_grant_matching(verifier: Any, forge: Forge, request_: tuple[Any, ...], expected: str) -> None:
    token = forge.token(grants=GRANTS)
    assert decide(verifier, token, forge.now, request_) == expected
    assert decide(verifier, token, forge.now, request_) == expected  # and again, from the memo


def test_policy_is_asked_once_per_request_and_generation(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    policy = Recorder()
    verifier.set_policy(policy)
    for _ in range(3):
        assert decide(verifier, token, forge.now) == reasons.ALLOW
    assert policy.calls == [(AGENT, "demo", "reports", "read", 0)]
    assert decide(verifier, token, forge.now, ("demo", "reports", "write", "internal")) == reasons.ALLOW
    assert policy.calls[-1] == (AGENT, "demo", "reports", "write", 1)
    # Out of scope never reaches the policy: it can tighten a token, never widen it.
    assert decide(verifier, token, forge.now, ("demo", "reports", "read", "restricted")) \
        == reasons.SENSITIVITY_EXCEEDED
    assert len(policy.calls) == 2


def test_set_policy_invalidates_memoised_answers(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    assert decide(verifier, token, forge.now) == reasons.ALLOW
    verifier.set_policy(Recorder(reasons.POLICY_DENIED))
    assert decide(verifier, token, forge.now) == reasons.POLICY_DENIED
    verifier.set_policy(Recorder("custom_reason"))
    assert decide(verifier, token, forge.now) == "custom_reason"
    verifier.set_policy(Recorder(""))  # a falsy answer is an allow
    assert decide(verifier, token, forge.now) == reasons.ALLOW
    verifier.set_policy(None)
    assert decide(verifier, token, forge.now) == reasons.POLICY_DENIED
    verifier.set_policy(AllowAll())
    assert decide(verifier, token, forge.now) == reasons.ALLOW


def test_memo_is_bounded(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    policy = Recorder()
    verifier.set_policy(policy)
    for i in range(200):
        assert decide(verifier, token, forge.now, ("demo", f"t{i}", "read", "public")) == reasons.ALLOW
    assert len(policy.calls) == 200
    assert decide(verifier, token, forge.now, ("demo", "t199", "read", "public")) == reasons.ALLOW
    assert len(policy.calls) == 200  # the latest answers are still remembered


def test_policy_errors_propagate(verifier: Any, forge: Forge) -> None:
    class Broken:
        def permits(self, *args: Any) -> str | None:
            raise RuntimeError("policy bug")

    verifier.set_policy(Broken())
    with pytest.raises(RuntimeError):
        verifier.decide(forge.token(), *REQUEST, forge.now)


@pytest.mark.parametrize("token", [
    "", "a", "a.b", "a.b.c", "..", "\x00", "é.é.é", "A" * 10_000, "eyJ.eyJ.AAAA",
])
def test_decide_never_raises_on_garbage(verifier: Any, forge: Forge, token: str) -> None:
    reason, entry = verifier.decide(token, *REQUEST, forge.now)
    assert entry is None and reason in reasons.UNAUTHENTICATED


# -- revocation at the moment of decision ----------------------------------------------------


def test_token_revoked_by_its_bit(verifier: Any, forge: Forge) -> None:
    token = forge.token(slot=77)
    assert decide(verifier, token, forge.now) == reasons.ALLOW
    assert verifier.revocations.revoke_slot(77) is True
    assert decide(verifier, token, forge.now) == reasons.TOKEN_REVOKED
    assert verifier.verify(token, forge.now).slots == (77,)  # verify() itself never consults revocation


def test_delegation_revoked_by_an_ancestor_bit(verifier: Any, forge: Forge) -> None:
    token = forge.token(slot=5, act=act_chain(3, first_slot=10))
    assert decide(verifier, token, forge.now) == reasons.ALLOW
    verifier.revocations.revoke_slot(12)  # the outermost delegator's token
    assert decide(verifier, token, forge.now) == reasons.DELEGATION_REVOKED
    verifier.revocations.revoke_slot(5)  # its own bit wins: the more specific reason
    assert decide(verifier, token, forge.now) == reasons.TOKEN_REVOKED


def test_slot_outside_the_window_is_refused(hot: HotPath, forge: Forge) -> None:
    verifier = make_verifier(hot, forge, capacity=64)
    assert decide(verifier, forge.token(slot=63), forge.now) == reasons.ALLOW
    assert decide(verifier, forge.token(slot=64), forge.now) == reasons.TOKEN_REVOKED
    assert decide(verifier, forge.token(slot=1 << 64), forge.now) == reasons.TOKEN_REVOKED
    assert decide(verifier, forge.token(slot=1, act={"sub": OTHER_AGENT, "idx": 1 << 70}), forge.now) \
        == reasons.DELEGATION_REVOKED
    early = forge.token(slot=3)
    assert decide(verifier, early, forge.now) == reasons.ALLOW
    verifier.revocations.bits.advance(4)  # the window slid past it: fail closed
    assert decide(verifier, early, forge.now) == reasons.TOKEN_REVOKED


def test_task_end_applies_to_every_token_of_the_task_whatever_its_iat(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    other_task = forge.token(task="task-2")
    assert decide(verifier, token, forge.now) == reasons.ALLOW
    # Ended "before" this token was signed, by the ending node's clock: the mint raced the end on a node
    # whose clock runs ahead (an ended task mints nothing more), and its token dies with the task.
    verifier.revocations.revoke_task(MY_TASK, forge.now - 5)
    assert decide(verifier, token, forge.now) == reasons.TASK_ENDED
    verifier.revocations.revoke_task(MY_TASK, forge.now)
    assert decide(verifier, token, forge.now) == reasons.TASK_ENDED
    assert decide(verifier, other_task, forge.now) == reasons.ALLOW
    verifier.revocations.revoke_task(MY_TASK, forge.now - 100)  # a lower cutoff never revives
    assert verifier.revocations.tasks[MY_TASK] == forge.now
    assert decide(verifier, token, forge.now) == reasons.TASK_ENDED
    verifier.revocations.forget(tasks=[MY_TASK])
    assert decide(verifier, token, forge.now) == reasons.ALLOW


def test_task_end_is_per_root_agent_and_takes_delegated_tokens_with_it(verifier: Any, forge: Forge) -> None:
    mine = forge.token()
    same_name_other_agent = forge.token(sub=OTHER_AGENT)
    delegated_from_me = forge.token(sub=OTHER_AGENT, act={"sub": AGENT, "idx": 901})
    verifier.revocations.revoke_task(MY_TASK, forge.now)
    assert decide(verifier, mine, forge.now) == reasons.TASK_ENDED
    assert decide(verifier, delegated_from_me, forge.now) == reasons.TASK_ENDED
    assert decide(verifier, same_name_other_agent, forge.now) == reasons.ALLOW


def test_agent_revocation_covers_the_whole_chain(verifier: Any, forge: Forge) -> None:
    direct = forge.token()
    delegated = forge.token(sub=OTHER_AGENT, act={"sub": ROOT_AGENT, "idx": 900})
    assert decide(verifier, delegated, forge.now) == reasons.ALLOW
    verifier.revocations.revoke_agent(ROOT_AGENT, forge.now)
    assert decide(verifier, delegated, forge.now) == reasons.AGENT_REVOKED
    assert decide(verifier, direct, forge.now) == reasons.ALLOW
    verifier.revocations.revoke_agent(AGENT, forge.now - 1)
    assert decide(verifier, direct, forge.now) == reasons.ALLOW
    verifier.revocations.revoke_agent(AGENT, forge.now)
    assert decide(verifier, direct, forge.now) == reasons.AGENT_REVOKED
    verifier.revocations.forget(agents=[AGENT, ROOT_AGENT])
    assert decide(verifier, direct, forge.now) == reasons.ALLOW
    assert decide(verifier, delegated, forge.now) == reasons.ALLOW


def test_key_revocation(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    assert decide(verifier, token, forge.now) == reasons.ALLOW
    verifier.revocations.revoke_key(forge.kid)
    assert decide(verifier, token, forge.now) == reasons.KEY_REVOKED
    verifier.revocations.kids.discard(forge.kid)
    verifier.revocations.generation += 1  # direct edits must bump the generation themselves
    assert decide(verifier, token, forge.now) == reasons.ALLOW


def test_revocation_reason_precedence(verifier: Any, forge: Forge) -> None:
    token = forge.token(act={"sub": ROOT_AGENT, "idx": 900})
    index = verifier.revocations
    index.revoke_agent(ROOT_AGENT, forge.now)
    index.revoke_task(tokens.task_key(ROOT_AGENT, "task-1"), forge.now)
    assert decide(verifier, token, forge.now) == reasons.TASK_ENDED
    index.revoke_key(forge.kid)
    assert decide(verifier, token, forge.now) == reasons.KEY_REVOKED
    entry = verifier.verify(token, forge.now)
    assert index.reason_for(entry) == reasons.KEY_REVOKED


def test_revocation_index_generation(hot: HotPath) -> None:
    index = hot.RevocationIndex(hot.Bitset(64))
    assert (index.generation, index.tasks, index.agents, index.kids) == (0, {}, {}, set())
    index.revoke_task("t", 5)
    index.revoke_agent("a", 6)
    index.revoke_key("k")
    index.forget(tasks=["t", "missing"], agents=["a"])
    assert index.generation == 4
    assert (index.tasks, index.agents, index.kids) == ({}, {}, {"k"})
    assert index.revoke_slot(3) is True and index.bits.test(3)


def test_expired_cached_token_is_refused_by_decide(verifier: Any, forge: Forge) -> None:
    token = forge.token()
    assert decide(verifier, token, forge.now) == reasons.ALLOW
    assert decide(verifier, token, forge.now + 300 + LEEWAY) == reasons.TOKEN_EXPIRED
    assert decide(verifier, token, forge.now - LEEWAY - 1) == reasons.TOKEN_NOT_YET_VALID


# -- verify_live: decide without a request (delegation asks it of a parent token) ------------


def test_verify_live_is_decide_without_grants_or_policy(verifier: Any, forge: Forge) -> None:
    # Grants that cover nothing anyone asks, and a policy that denies everything: still live.
    token = forge.token(slot=40, act=act_chain(2, first_slot=50), grants=[tokens.grant("x", "y", ["z"])])
    verifier.set_policy(None)
    result = verifier.verify_live(token, forge.now)
    entry = verifier.verify(token, forge.now)
    assert result == (reasons.ALLOW, entry) and result[1] is entry
    assert verifier.verify_live(token, forge.now + 300 + LEEWAY) == (reasons.TOKEN_EXPIRED, None)
    assert verifier.verify_live(token, forge.now - LEEWAY - 1) == (reasons.TOKEN_NOT_YET_VALID, None)
    verifier.revocations.revoke_slot(51)  # the innermost (root) actor's token
    assert verifier.verify_live(token, forge.now) == (reasons.DELEGATION_REVOKED, None)
    verifier.revocations.revoke_slot(40)
    assert verifier.verify_live(token, forge.now) == (reasons.TOKEN_REVOKED, None)


@pytest.mark.parametrize("bad", [None, 7, b"abc", bytearray(b"a.b.c"), "", "a.b.c", "x" * 9000])
def test_verify_live_never_raises_on_garbage(verifier: Any, forge: Forge, bad: Any) -> None:
    reason, entry = verifier.verify_live(bad, forge.now)
    assert entry is None and reason in reasons.UNAUTHENTICATED


def test_verify_live_sees_every_revocation_at_once(verifier: Any, forge: Forge) -> None:
    token = forge.token(act={"sub": ROOT_AGENT, "idx": 900})
    index = verifier.revocations
    assert decide(verifier, token, forge.now) == reasons.ALLOW  # caches "not revoked" for this generation
    index.kids.add(forge.kid)  # a direct edit that forgets to bump the generation
    assert verifier.verify_live(token, forge.now) == (reasons.KEY_REVOKED, None)
    index.kids.discard(forge.kid)
    for revoke, reason in ((lambda: index.revoke_agent(ROOT_AGENT, forge.now), reasons.AGENT_REVOKED),
                           (lambda: index.revoke_task(tokens.task_key(ROOT_AGENT, "task-1"), forge.now),
                            reasons.TASK_ENDED)):
        revoke()
        assert verifier.verify_live(token, forge.now) == (reason, None)
        assert decide(verifier, token, forge.now) == reason


# -- grants ----------------------------------------------------------------------------


def test_compile_grant(hot: HotPath) -> None:
    compile_grant: Any = hot.compile_grant  # HotPath types it as a plain object
    grant = compile_grant(tokens.grant("files", "reports/*", ["read", "list"], "confidential"))
    assert (grant.tool, grant.target, grant.prefix, grant.ops, grant.level) == (
        "files", "reports/*", "reports/", frozenset({"read", "list"}), 2)
    assert grant.covers("files", "reports/q3", "list", 2)
    assert not grant.covers("files", "reports/q3", "list", 3)
    assert not grant.covers("files", "report", "list", 0)
    assert repr(grant) == "Grant('files', 'reports/*', ['list', 'read'], 2)"
    exact = hot.Grant("mail", "ops", frozenset({"send"}), 0)
    assert exact.prefix is None and exact.covers("mail", "ops", "send", 0)
    assert not exact.covers("mail", "ops2", "send", 0)
    with pytest.raises(errors.TokenClaimsInvalid):
        compile_grant({"tool": "x"})
