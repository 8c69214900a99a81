"""Hostile tokens and requests, case by case from the threat catalogues.

Sources: RFC 8725 (JWT BCP) §2 threats and §3 practices, RFC 7515 (JWS), RFC 4648 §3.5 and
RFC 8032 §5.1.7 (one encoding per token), the SPIFFE-ID spec, and the published JOSE library
advisories (PyJWT, python-jose, Authlib, jwcrypto, node-jose, jsonwebtoken). Each case names its
source in its id. Most cases are signed with the verifier's own key, so that nothing but
strictness refuses them.

Two layers: (a) both hot-path twins' ``verify`` and ``decide``: each case refused with its own
reason, never cached; (b) a real daemon's Check, the token signed with the daemon's own key from
``<state>/keys``: each case denied 401 (a token defect) or 403/400 (a request the token does not
cover), with its own reason, no traceback in the daemon log, nothing of the token in the audit
log, and the daemon still serving afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from nacl.signing import SigningKey
from processes import Daemon, wait_for
from support import Forge, daemon_twin, make_verifier, native_or_fail

from agentauthz import errors, reasons
from agentauthz.client import Client, Identity, decision_from
from agentauthz.decision import _accel, tokens
from agentauthz.decision._accel import HotPath
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

AGENT = "spiffe://dev.local/agent/alpha"
REQUEST = ("demo", "reports", "read", "public")  # what every token case asks for
L = 2**252 + 27742317777372353535851937790883648493  # the order of the Ed25519 base point (RFC 8032 §5.1)
DROP = object()  # a header parameter or claim to leave out

MALFORMED = reasons.TOKEN_MALFORMED
TOO_LARGE = reasons.TOKEN_TOO_LARGE
ALG = reasons.TOKEN_ALGORITHM
HEADER = reasons.TOKEN_HEADER
TYPE = reasons.TOKEN_TYPE
KID = reasons.TOKEN_KEY_UNKNOWN
SIGNATURE = reasons.TOKEN_SIGNATURE
CLAIMS = reasons.TOKEN_CLAIMS
ISSUER = reasons.TOKEN_ISSUER
AUDIENCE = reasons.TOKEN_AUDIENCE
LIFETIME = reasons.TOKEN_LIFETIME
EXPIRED = reasons.TOKEN_EXPIRED
NOT_YET = reasons.TOKEN_NOT_YET_VALID
REVOKED = reasons.TOKEN_REVOKED
INVALID = reasons.REQUEST_INVALID


# -- building tokens by hand ---------------------------------------------------------------------
#
# A "signer" is anything with ``key`` (nacl SigningKey), ``kid``, ``now`` and ``claims(**changes)``:
# the unit tests' Forge, or a DaemonSigner holding the daemon's own key.


def b64(data: bytes) -> str:
    return tokens.b64url(data)


def text(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def header(s: Any, **changes: Any) -> dict[str, Any]:
    h = {"alg": tokens.ALGORITHM, "typ": tokens.TOKEN_TYPE, "kid": s.kid, **changes}
    return {k: v for k, v in h.items() if v is not DROP}


def claims(s: Any, **changes: Any) -> dict[str, Any]:
    c = s.claims(**{k: v for k, v in changes.items() if v is not DROP})
    for k, v in changes.items():
        if v is DROP:
            c.pop(k, None)
    return c


def sign(s: Any, head: dict[str, Any] | bytes, body: dict[str, Any] | bytes,
         key: SigningKey | None = None) -> str:
    """A compact JWS over exactly these header and payload bytes, Ed25519-signed (by ``s`` unless ``key``)."""
    signing_input = f"{b64(head if isinstance(head, bytes) else text(head))}." \
                    f"{b64(body if isinstance(body, bytes) else text(body))}"
    signature = (key or s.key).sign(signing_input.encode("ascii")).signature
    return f"{signing_input}.{b64(signature)}"


def claimed(s: Any, **changes: Any) -> str:
    """The normal header, these claims, a valid signature."""
    return sign(s, header(s), claims(s, **changes))


def headed(s: Any, key: SigningKey | None = None, **changes: Any) -> str:
    """This header, the normal claims, a valid signature (by ``key`` if given)."""
    return sign(s, header(s, **changes), claims(s), key)


def raw_claims(s: Any, member: bytes) -> str:
    """The normal claims with one more member spliced in as raw JSON text, validly signed."""
    return sign(s, header(s), text(claims(s))[:-1] + b"," + member + b"}")


def raw_header(s: Any, member: bytes) -> str:
    return sign(s, text(header(s))[:-1] + b"," + member + b"}", claims(s))


def unsigned(s: Any, alg: str) -> str:
    """An Unsecured JWS (RFC 7515 Appendix A.5): ``alg`` none in some spelling, empty signature."""
    return f"{b64(text(header(s, alg=alg)))}.{b64(text(claims(s)))}."


def hmac_token(s: Any, alg: str, secret: bytes) -> str:
    """HS256/384/512 keyed with ``secret``: the algorithm-confusion forgery (RFC 8725 §2.1)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[alg]
    signing_input = f"{b64(text(header(s, alg=alg)))}.{b64(text(claims(s)))}"
    mac = hmac.new(secret, signing_input.encode("ascii"), digest).digest()
    return f"{signing_input}.{b64(mac)}"


def public_forms(s: Any) -> dict[str, bytes]:
    """Every published spelling of the verification key an attacker could use as an HMAC secret."""
    raw = bytes(s.key.verify_key)
    public = Ed25519PublicKey.from_public_bytes(raw)
    enc, fmt = serialization.Encoding, serialization.PublicFormat
    jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64(raw), "kid": s.kid}
    return {
        "raw": raw,
        "jwk-json": json.dumps(jwk).encode(),
        "x": b64(raw).encode(),
        "pem": public.public_bytes(enc.PEM, fmt.SubjectPublicKeyInfo),
        "der": public.public_bytes(enc.DER, fmt.SubjectPublicKeyInfo),
        "openssh": public.public_bytes(enc.OpenSSH, fmt.OpenSSH),
        "empty": b"",
    }


def segment(token: str, index: int, value: str) -> str:
    parts = token.split(".")
    parts[index] = value
    return ".".join(parts)


def signature_of(token: str) -> bytes:
    return base64.urlsafe_b64decode(token.split(".")[2] + "==")


def with_signature(token: str, signature: bytes) -> str:
    return segment(token, 2, b64(signature))


def s_plus_l(token: str) -> str:
    """The same signature with S replaced by S + L: equal mod L, a second encoding (RFC 8032 §5.1.7)."""
    sig = signature_of(token)
    s = int.from_bytes(sig[32:], "little") + L
    return with_signature(token, sig[:32] + s.to_bytes(32, "little"))


def flip_r_sign(token: str) -> str:
    sig = bytearray(signature_of(token))
    sig[31] ^= 0x80  # the sign bit of R's x coordinate (RFC 8032 §5.1.2)
    return with_signature(token, bytes(sig))


def noncanonical(seg: str) -> str:
    """The same bytes with an unused low bit set in the last character (RFC 4648 §3.5)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return seg[:-1] + alphabet[alphabet.index(seg[-1]) ^ 1]


def noncanonical_segment(s: Any, index: int) -> str:
    """A valid token with a non-canonical last character in segment ``index`` (minted until it has one)."""
    for attempt in range(64):
        # JSON may end in whitespace: it moves the header's length off a multiple of three.
        token = sign(s, text(header(s)) + b" " * (attempt % 3), claims(s, jti=tokens.new_token_id()))
        seg = token.split(".")[index]
        if len(seg) % 4 in (2, 3):
            return segment(token, index, noncanonical(seg))
    raise AssertionError("no token with a partial last quantum")


def standard_alphabet(s: Any) -> str:
    """A valid token re-spelled in the standard base64 alphabet (RFC 4648 §4, not §5)."""
    for _ in range(64):
        token = claimed(s, jti=tokens.new_token_id())
        swapped = token.replace("-", "+").replace("_", "/")
        if swapped != token:
            return swapped
    raise AssertionError("no token with - or _")


def padded(token: str) -> str:
    return ".".join(p + "=" * (-len(p) % 4) for p in token.split("."))


def deflated_bomb(s: Any) -> str:
    """``zip: DEF`` over a payload that would inflate 1000-fold, to 4 MiB (CVE-2024-33664, CVE-2024-28102)."""
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = bomb.compress(b'{"x":"') + bomb.compress(b"A" * (4 << 20)) + bomb.compress(b'"}') + bomb.flush()
    return sign(s, header(s, zip="DEF"), body)


def lookalike(value: str) -> str:
    """``value`` with its first Latin letter that has a Cyrillic twin swapped for it (a homoglyph)."""
    twins = {"a": "а", "e": "е", "o": "о", "p": "р", "c": "с", "x": "х", "y": "у", "i": "і", "s": "ѕ"}
    for i, ch in enumerate(value):
        if ch in twins:
            return value[:i] + twins[ch] + value[i + 1:]
    raise AssertionError(f"no homoglyph for {value!r}")


def fullwidth(value: str) -> str:
    """The first ASCII letter or digit of ``value`` in its fullwidth form (NFKC folds it back)."""
    for i, ch in enumerate(value):
        if ch.isalnum() and ch.isascii():
            return value[:i] + chr(ord(ch) + 0xFEE0) + value[i + 1:]
    raise AssertionError(value)


def act_chain(depth: int) -> dict[str, Any] | None:
    act: dict[str, Any] | None = None
    for level in reversed(range(depth)):
        act = {"sub": f"spiffe://dev.local/agent/a{level}", "idx": 1000 + level,
               **({"act": act} if act else {})}
    return act


def deep(n: int) -> bytes:
    return b"[" * n + b"]" * n


ATTACKER = SigningKey.generate()  # a key the verifier has never seen


# -- the cases -------------------------------------------------------------------------------------
#
# id -> (builder, reason). Each id starts with its source; every reason is a 401 reason.

Make = Callable[[Any], str]
CASES: dict[str, tuple[Make, str]] = {}


def cases(reason: str, makes: dict[str, Make]) -> None:
    for name, make in makes.items():
        assert name not in CASES, name
        CASES[name] = (make, reason)


def via(change: Callable[[str], str]) -> Make:
    """A builder applying ``change`` to one valid token."""
    return lambda s: change(claimed(s))


def with_exp(raw: bytes) -> Make:
    """Valid claims whose exp is this raw JSON text."""
    return lambda s: sign(s, header(s), text(claims(s, exp=DROP))[:-1] + b',"exp":' + raw + b"}")


# RFC 8725 §2.1, §3.1 (algorithm verification); CVE-2015-9235 (jsonwebtoken accepted alg none).
for alg in ("none", "None", "NONE", "nOnE", "none "):
    cases(ALG, {f"rfc8725-3.1:unsigned-alg-{alg!r}": lambda s, a=alg: unsigned(s, a),
                f"rfc8725-3.1:alg-{alg!r}-validly-signed": lambda s, a=alg: headed(s, alg=a)})
# CVE-2016-10555 (jwt-simple), CVE-2022-29217 (PyJWT), CVE-2024-33663 (python-jose), CVE-2024-37568
# (Authlib): HMAC keyed with the published public key, in each of its spellings. HS512's MAC is 64
# bytes, the length of an Ed25519 signature: a length check alone would not catch it.
for hs in ("HS256", "HS384", "HS512"):
    for form in ("raw", "jwk-json", "x", "pem", "der", "openssh", "empty"):
        cases(ALG, {f"cve-2022-29217:{hs}-keyed-with-the-public-key-{form}":
                    lambda s, a=hs, f=form: hmac_token(s, a, public_forms(s)[f])})
for alg in ("Ed25519", "ES256", "RS256", "PS256", "ES256K", "EdDSA ", " EdDSA", "eddsa", "EDDSA", "EdDSA\x00",
            "EdDS\u0410", None, 0, {"name": "EdDSA"}, ["EdDSA", "none"]):
    cases(ALG, {f"rfc8725-3.1:alg-{alg!r}": lambda s, a=alg: headed(s, alg=a)})

# RFC 7515 §4 (header parameter names MUST be unique), RFC 8725 §2.6 (multiplicity of JSON
# encodings): a parser differential between this checker and a library reading the last key.
cases(MALFORMED, {
    "rfc7515-4:duplicate-alg-none-last": lambda s: raw_header(s, b'"alg":"none"'),
    "rfc7515-4:duplicate-alg-none-first": lambda s: sign(
        s, b'{"alg":"none",' + text(header(s))[1:], claims(s)),
    "rfc7515-4:duplicate-alg-by-escape": lambda s: raw_header(s, b'"\\u0061lg":"none"'),
    "rfc7515-4:duplicate-kid": lambda s: raw_header(s, b'"kid":"attacker"'),
    "rfc7515-4:duplicate-typ": lambda s: raw_header(s, b'"typ":"JWT"'),
})

# RFC 7515 §4.1.2-§4.1.8, RFC 8725 §3.10 (do not trust received claims); CVE-2018-0114 (node-jose
# verified tokens with the key embedded in their own header). Refused even when validly signed.
cases(HEADER, {
    "cve-2018-0114:attacker-jwk-signed-by-attacker": lambda s: headed(
        s, key=ATTACKER, jwk={"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(ATTACKER.verify_key))}),
    "rfc7515-4.1.3:own-public-jwk-validly-signed": lambda s: headed(
        s, jwk={"kty": "OKP", "crv": "Ed25519", "x": b64(bytes(s.key.verify_key))}),
    "rfc7515-4.1.2:jku-signed-by-attacker": lambda s: headed(s, key=ATTACKER, jku="https://evil.example/k"),
    "rfc7515-4.1.2:jku-own-jwks-validly-signed": lambda s: headed(
        s, jku="http://127.0.0.1:9192/.well-known/jwks.json"),
    "rfc7515-4.1.5:x5u": lambda s: headed(s, key=ATTACKER, x5u="https://evil.example/cert.pem"),
    "rfc7515-4.1.6:x5c": lambda s: headed(s, key=ATTACKER, x5c=["MIIBszCCAVmgAwIBAgIU"]),
    "rfc7515-4.1.7:x5t": lambda s: headed(s, x5t="dGh1bWI"),
    "rfc7515-4.1.8:x5t#S256": lambda s: headed(s, **{"x5t#S256": "dGh1bWI"}),
    "rfc7515-4.1.3:jwk-naming-only-the-real-kid": lambda s: headed(s, jwk={"kid": s.kid}),
    "rfc7519-5.2:cty-jwt-nested": lambda s: headed(s, cty="JWT"),
    "rfc7516-4.1.2:enc-jwe-header-on-a-jws": lambda s: headed(s, enc="A256GCM"),
    "rfc7516-4.1.3:zip-def-plain-payload": lambda s: headed(s, zip="DEF"),
    "cve-2024-33664:zip-def-bomb-4MiB": deflated_bomb,
    "rfc7515-4.1.11:crit-exp": lambda s: headed(s, crit=["exp"]),
    "rfc7515-4.1.11:crit-empty": lambda s: headed(s, crit=[]),
    "rfc7515-4.1.11:crit-not-a-list": lambda s: headed(s, crit="exp"),
    "rfc7515-4.1.11:crit-private-parameter": lambda s: headed(s, crit=["agentauthz"], agentauthz=1),
    "rfc7797-6:b64-false-without-crit": lambda s: headed(s, b64=False),
    "rfc7797-6:crit-b64-false": lambda s: headed(s, crit=["b64"], b64=False),
    "rfc7797-6:crit-b64-false-unencoded-payload": lambda s: (
        f"{b64(text(header(s, crit=['b64'], b64=False)))}." + '{"x":1}' + f".{b64(bytes(64))}"),
    "rfc7515-4:claim-name-in-header": lambda s: headed(s, sub=AGENT),
})

# RFC 8725 §3.10: kid is attacker text; it only ever selects among known keys, never a file or URL.
cases(KID, {
    "rfc8725-3.10:kid-path-traversal": lambda s: headed(s, key=ATTACKER, kid="../../../../../../dev/null"),
    "rfc8725-3.10:kid-key-file-path": lambda s: headed(s, key=ATTACKER, kid=f"../keys/{s.kid}.pem"),
    "rfc8725-3.10:kid-absolute-path": lambda s: headed(s, key=ATTACKER, kid="/proc/self/environ"),
    "rfc8725-3.10:kid-sql-injection": lambda s: headed(s, key=ATTACKER, kid="x' UNION SELECT 'secret' --"),
    "rfc8725-3.10:kid-url": lambda s: headed(s, key=ATTACKER, kid="https://evil.example/key"),
    "rfc8725-3.10:kid-nul-suffix": lambda s: headed(s, kid=s.kid + "\x00"),
    "rfc8725-3.10:kid-trailing-space": lambda s: headed(s, kid=s.kid + " "),
    "rfc8725-3.10:kid-case-swapped": lambda s: headed(s, kid=s.kid.swapcase()),
    "rfc8725-3.10:kid-fullwidth": lambda s: headed(s, kid=fullwidth(s.kid)),
    "rfc8725-3.10:kid-with-padding": lambda s: headed(s, kid=s.kid + "="),
})
cases(MALFORMED, {
    "rfc8725-3.10:kid-nosql-operator": lambda s: headed(s, key=ATTACKER, kid={"$ne": ""}),
    "rfc8725-3.10:kid-list": lambda s: headed(s, kid=[s.kid]),
    "rfc8725-3.10:kid-null": lambda s: headed(s, kid=None),
    "rfc8725-3.10:kid-number": lambda s: headed(s, kid=0),
    "rfc8725-3.10:kid-bool": lambda s: headed(s, kid=True),
})

# RFC 8725 §2.8, §3.11, §3.12 (explicit, mutually exclusive types; cross-JWT confusion); CVE-2022-3102
# (jwcrypto: a token of one kind accepted as another). statuslist+jwt is what this daemon's own
# key also signs; at+jwt is RFC 9068's access token. "application/agentauthz+jwt" is the same type
# under RFC 7515 §4.1.9, but this daemon never writes it: refused, not normalised.
for typ in (DROP, "JWT", "jwt", "JOSE", "at+jwt", "statuslist+jwt", "AGENTAUTHZ+JWT",
            "application/agentauthz+jwt", "agentauthz+jwt ", "agentauthz+jwt\x00",
            lookalike("agentauthz+jwt"), "agentauthz", None, ["agentauthz+jwt"]):
    label = "missing" if typ is DROP else repr(typ)
    cases(TYPE, {f"rfc8725-3.11:typ-{label}": lambda s, t=typ: headed(s, typ=t)})

# RFC 7515 §7.1 (compact serialization: three segments), RFC 7516 §9 and RFC 8725 §2.3 (a JWE has
# five; nested shapes), RFC 7515 §7.2 (the JSON serialization is not accepted at all).
cases(MALFORMED, {
    "rfc7516-9:five-segment-jwe-shape": lambda s: ".".join(
        [b64(text({"alg": "dir", "enc": "A256GCM", "kid": s.kid})), "", b64(bytes(12)), b64(b"ct"),
         b64(bytes(16))]),
    "rfc7516-9:valid-token-plus-two-segments": via(lambda t: t + ".AAAA.AAAA"),
    "rfc7515-7.1:two-segments": via(lambda t: t.rsplit(".", 1)[0]),
    "rfc7515-7.1:four-segments": via(lambda t: t + ".AAAA"),
    "rfc7515-7.1:only-dots": lambda s: "..",
    "rfc7515-7.1:empty-signature": via(lambda t: segment(t, 2, "")),
    "rfc7515-7.1:empty-header": via(lambda t: segment(t, 0, "")),
    "rfc7515-7.2:json-serialization": via(lambda t: json.dumps(dict(zip(("protected", "payload", "signature"),
                                                                         t.split("."), strict=True)))),
    "rfc7515-7.2:json-serialization-in-base64url": via(lambda t: b64(json.dumps({"payload": t}).encode())),
    "rfc7519-7.2:nested-jws-as-a-json-string-payload": lambda s: sign(
        s, header(s), json.dumps(claimed(s)).encode()),
    "rfc7519-7.2:nested-jws-as-the-payload": lambda s: sign(s, header(s), claimed(s).encode()),
})

# RFC 7515 §2 (base64url, no padding), RFC 4648 §3.3, §3.5 (no characters outside the alphabet;
# canonical encoding), RFC 8725 §2.6: each other spelling of a token is refused, or the cache and
# the audit log would see several tokens where there is one.
cases(MALFORMED, {
    "rfc7515-2:padding-on-every-segment": via(padded),
    "rfc7515-2:percent-encoded-padding": via(lambda t: t + "%3D%3D"),
    "rfc4648-4:standard-alphabet": standard_alphabet,
    "rfc4648-3.5:noncanonical-bits-in-header": lambda s: noncanonical_segment(s, 0),
    "rfc4648-3.5:noncanonical-bits-in-payload": lambda s: noncanonical_segment(s, 1),
    "rfc4648-3.5:noncanonical-bits-in-signature": lambda s: noncanonical_segment(s, 2),
    "rfc4648-3.3:line-folded-like-pem": via(lambda t: "\n".join(t[i:i + 64] for i in range(0, len(t), 64))),
    "rfc4648-3.3:crlf-at-the-end": via(lambda t: t + "\r\n"),
    "rfc4648-3.3:tab-inside": via(lambda t: t.replace(".", ".\t", 1)),
    "rfc4648-3.3:space-inside": via(lambda t: t.replace(".", ". ", 2)),
    "rfc4648-3.3:nbsp-inside": via(lambda t: t.replace(".", ".\u00a0", 1)),
    "rfc4648-3.3:zero-width-space-inside": via(lambda t: t.replace(".", "\u200b.", 1)),
    "rfc4648-3.3:nul-at-the-end": via(lambda t: t + "\x00"),
    "rfc4648-3.3:nul-inside": via(lambda t: t.replace(".", ".\x00", 1)),
    "rfc4648-3.5:one-leftover-character": via(lambda t: segment(t, 2, t.split(".")[2] + "AAA")),
    # Python's base64.b64decode (validate=False, its default) silently drops what is not in the alphabet.
    "python:b64decode-would-drop-these": via(lambda t: t.replace(".", ".!*~$", 1)),
    "unicode:fullwidth-full-stops": via(lambda t: t.replace(".", "\uff0e")),
    "unicode:ideographic-full-stops": via(lambda t: t.replace(".", "\u3002")),
    "unicode:fullwidth-letter-in-payload": via(lambda t: segment(t, 1, fullwidth(t.split(".")[1]))),
    "unicode:lone-surrogate-in-token": via(lambda t: t + "\udcff"),
})

# RFC 8032 §5.1.7, §8.4 and Wycheproof's Ed25519 flags: one signature per message and key.
cases(SIGNATURE, {
    "rfc8032-5.1.7:s-plus-l": via(s_plus_l),
    "rfc8032-5.1.3:r-sign-bit-flipped": via(flip_r_sign),
    "wycheproof:zero-signature": via(lambda t: with_signature(t, bytes(64))),
    "wycheproof:identity-r-zero-s": via(lambda t: with_signature(t, b"\x01" + bytes(63))),
    "wycheproof:s-equals-l": via(lambda t: with_signature(
        t, signature_of(t)[:32] + L.to_bytes(32, "little"))),
    "rfc7515-5.2:signature-of-another-token": lambda s: with_signature(
        claimed(s, jti="one"), signature_of(claimed(s, jti="two"))),
    "rfc7515-5.2:header-respelled-same-meaning": lambda s: segment(
        claimed(s), 0, b64(json.dumps(header(s), indent=1).encode())),
    "rfc7515-5.2:payload-swapped-for-admin": lambda s: segment(
        claimed(s), 1, b64(text(claims(s, grants=[tokens.grant("*", "*", ["admin"], "restricted")])))),
    "rfc8725-3.1:unknown-key-with-a-known-kid": lambda s: headed(s, key=ATTACKER),
})
cases(MALFORMED, {
    "wycheproof:truncated-signature-63": via(lambda t: with_signature(t, signature_of(t)[:63])),
    "wycheproof:signature-with-garbage-65": via(lambda t: with_signature(t, signature_of(t) + b"\x00")),
    "wycheproof:signature-doubled-128": via(lambda t: with_signature(t, signature_of(t) * 2)),
})

# RFC 8725 §3.8 (validate the issuer), §3.9 (validate the audience): exact equality, never a prefix,
# suffix, case-folded, trimmed, normalised or list match.
VARIANTS: dict[str, Callable[[str], Any]] = {
    "prefix": lambda v: v[:-1], "suffix": lambda v: v + ".evil.example", "trailing-slash": lambda v: v + "/",
    "upper-case": lambda v: v.upper(), "padded": lambda v: f" {v} ", "nul-suffix": lambda v: v + "\x00",
    "homoglyph": lookalike, "fullwidth": fullwidth, "as-list": lambda v: [v],
    "list-with-another": lambda v: [v, "x"],
    "empty-list": lambda v: [], "empty": lambda v: "", "wildcard": lambda v: "*", "null": lambda v: None,
    "object": lambda v: {v: True}, "missing": lambda v: DROP,
}
for label, change in VARIANTS.items():
    cases(ISSUER, {f"rfc8725-3.8:iss-{label}": lambda s, f=change: claimed(s, iss=f(s.claims()["iss"]))})
    cases(AUDIENCE, {f"rfc8725-3.9:aud-{label}": lambda s, f=change: claimed(s, aud=f(s.claims()["aud"]))})
cases(ISSUER, {"rfc8725-3.8:iss-userinfo": lambda s: claimed(
    s, iss=s.claims()["iss"].replace("://", "://x@"))})
cases(AUDIENCE, {"rfc8725-3.9:aud-is-the-issuer": lambda s: claimed(s, aud=s.claims()["iss"])})

# RFC 8725 §3.8 (validate the subject), SPIFFE-ID §2: sub (and each actor) must be one workload's
# SPIFFE ID in its one spelling. Policy, revocation by agent and the upstream's x-agentauthz-agent
# header all compare it as a string: a second spelling would be a second agent.
SUBJECTS = {
    "scheme-upper-case": "SPIFFE://dev.local/agent/alpha",
    "trust-domain-upper-case": "spiffe://DEV.local/agent/alpha",
    "percent-encoded": "spiffe://dev.local/agent/%61lpha",
    "trailing-slash": "spiffe://dev.local/agent/alpha/",
    "dot-dot-segment": "spiffe://dev.local/agent/../admin/root",
    "dot-segment": "spiffe://dev.local/agent/./alpha",
    "empty-segment": "spiffe://dev.local/agent//alpha",
    "port": "spiffe://dev.local:443/agent/alpha",
    "userinfo": "spiffe://admin@dev.local/agent/alpha",
    "query": "spiffe://dev.local/agent/alpha?admin=1",
    "fragment": "spiffe://dev.local/agent/alpha#x",
    "no-path": "spiffe://dev.local",
    "empty-trust-domain": "spiffe:///agent/alpha",
    "scheme-only": "spiffe://",
    "crlf-header-injection": "spiffe://dev.local/agent/a\r\nx-agentauthz-agent: spiffe://dev.local/admin",
    "nul": "spiffe://dev.local/agent/alpha\x00",
    "homoglyph-path": "spiffe://dev.local/agent/\u0430lpha",
    "homoglyph-trust-domain": "spiffe://d\u0435v.local/agent/alpha",
    "fullwidth": "spiffe://dev.local/agent/\uff41lpha",
    "space": "spiffe://dev.local/agent/al pha",
    "backslash": "spiffe://dev.local/agent\\alpha",
    "other-scheme": "https://dev.local/agent/alpha",
    "too-long": "spiffe://dev.local/" + "a" * 2048,
}
for label, sub in SUBJECTS.items():
    cases(CLAIMS, {f"spiffe-id-2:sub-{label}": lambda s, v=sub: claimed(s, sub=v),
                   f"spiffe-id-2:act-sub-{label}": lambda s, v=sub: claimed(s, act={"sub": v, "idx": 4000})})
# RFC 9110 §5.5: sub, task and jti reach the upstream as x-agentauthz-* header values; a control,
# format or space character there is header injection (CR LF), truncation (NUL) or spoofing (U+202E).
HEADER_TEXT = {"crlf-injection": "t\r\nx-agentauthz-agent: spiffe://dev.local/admin/root", "nul": "t\x00",
               "tab": "t\tx", "del": "t\x7f", "space": "t x", "bidi-override": "t\u202eevil",
               "zero-width-joiner": "t\u200dx", "line-separator": "t\u2028x"}
for claim in ("task", "jti"):
    for label, value in HEADER_TEXT.items():
        cases(CLAIMS, {f"rfc9110-5.5:{claim}-{label}": lambda s, c=claim, v=value: claimed(s, **{c: v})})
cases(CLAIMS, {
    "rfc8725-3.8:sub-missing": lambda s: claimed(s, sub=DROP),
    "rfc8725-3.8:sub-list": lambda s: claimed(s, sub=[AGENT]),
    "rfc8725-3.8:sub-object": lambda s: claimed(s, sub={"id": AGENT}),
})

# RFC 7519 §2 NumericDate, and Python's traps: bool is an int, floats are not times, integers are
# unbounded up to the parser's 4300-digit cap (CVE-2020-10735).
TIMES: dict[str, Callable[[int], Any]] = {
    "float": lambda t: t + 0.5, "integral-float": float, "bool-true": lambda t: True,
    "bool-false": lambda t: False,
    "string": str, "null": lambda t: None, "negative": lambda t: -t, "list": lambda t: [t],
    "object": lambda t: {"$date": t}, "2**63": lambda t: 2**63, "2**64": lambda t: 2**64,
    "2**64-plus-t": lambda t: 2**64 + t, "4000-digits": lambda t: 10**3999, "missing": lambda t: DROP,
}
for name in ("exp", "nbf", "iat"):
    for label, value in TIMES.items():
        cases(CLAIMS, {f"rfc7519-2:{name}-{label}":
                       lambda s, n=name, f=value: claimed(s, **{n: f(s.now + 300)})})
cases(MALFORMED, {
    "cve-2020-10735:exp-5000-digits": with_exp(b"9" * 5000),
    "rfc8259-6:exp-NaN": with_exp(b"NaN"),
    "rfc8259-6:exp-Infinity": with_exp(b"Infinity"),
    "rfc8259-6:exp-1e400": with_exp(b"1e400"),
    "rfc8259-6:exp-leading-zero": with_exp(b"0123"),
    "rfc8259-6:exp-plus-sign": with_exp(b"+1"),
    "rfc8259-6:exp-hex": with_exp(b"0x7fffffff"),
})
cases(CLAIMS, {
    "rfc7519-2:exp-exponent-form": lambda s: with_exp(f"{s.now + 300}e0".encode())(s),
    "rfc7519-2:exp-negative-zero": with_exp(b"-0"),
    "rfc7519-4.1.4:exp-before-nbf": lambda s: claimed(s, nbf=s.now + 10, exp=s.now + 5),
    "rfc7519-4.1.5:nbf-before-iat": lambda s: claimed(s, nbf=s.now - 10),
})
cases(LIFETIME, {
    "rfc8725-3:lifetime-over-the-cap": lambda s: claimed(s, exp=s.now + 3601),
    "rfc8725-3:ancient-iat-far-exp": lambda s: claimed(s, iat=0, nbf=0, exp=s.now + 300),
})
cases(NOT_YET, {
    "rfc7519-4.1.5:nbf-in-the-future": lambda s: claimed(s, nbf=s.now + 3000, exp=s.now + 3300),
    "rfc7519-4.1.6:iat-in-the-future": lambda s: claimed(
        s, iat=s.now + 600, nbf=s.now + 600, exp=s.now + 900),
})
cases(EXPIRED, {
    "rfc7519-4.1.4:expired": lambda s: claimed(s, iat=s.now - 900, nbf=s.now - 900, exp=s.now - 600),
    "rfc7519-4.1.4:expired-by-the-leeway": lambda s: claimed(
        s, iat=s.now - 900, nbf=s.now - 900, exp=s.now - 30),
    # The daemon wrote exp on the clock it checks it by: no leeway past it (issue 16).
    "rfc7519-4.1.4:expired-at-exp-with-no-leeway": lambda s: claimed(
        s, iat=s.now - 900, nbf=s.now - 900, exp=s.now),
})

# RFC 8259, RFC 7519 §4 and RFC 8725 §3.7 (UTF-8 JSON, unique claim names): a second parser must
# never read these differently, so none is read at all.
cases(MALFORMED, {
    "rfc7519-4:duplicate-sub-admin-last": lambda s: raw_claims(s, b'"sub":"spiffe://dev.local/admin/root"'),
    "rfc7519-4:duplicate-grants": lambda s: raw_claims(
        s, b'"grants":[{"tool":"*","target":"*","ops":["admin"],"sensitivity":"restricted"}]'),
    "rfc7519-4:duplicate-by-escape": lambda s: raw_claims(s, b'"\\u0073ub":"spiffe://dev.local/admin/root"'),
    "rfc7519-4:duplicate-inside-a-grant": lambda s: sign(
        s, header(s), text(claims(s)).replace(b'"tool":', b'"tool":"billing","tool":', 1)),
    "rfc8725-3.7:utf8-bom": lambda s: sign(s, header(s), b"\xef\xbb\xbf" + text(claims(s))),
    "rfc8725-3.7:utf16": lambda s: sign(s, header(s), json.dumps(claims(s)).encode("utf-16")),
    "rfc8725-3.7:overlong-utf8": lambda s: raw_claims(s, b'"x":"\xc0\xaf"'),
    "rfc8725-3.7:cesu8-surrogate": lambda s: raw_claims(s, b'"x":"\xed\xa0\x80"'),
    "rfc8725-3.7:latin1-byte": lambda s: raw_claims(s, b'"x":"caf\xe9"'),
    "rfc8259:comment": lambda s: sign(s, header(s), b"/* admin */" + text(claims(s))),
    "rfc8259:trailing-comma": lambda s: sign(s, header(s), text(claims(s))[:-1] + b",}"),
    "rfc8259:single-quotes": lambda s: sign(s, header(s), text(claims(s)).replace(b'"iss"', b"'iss'")),
    "rfc8259:trailing-data": lambda s: sign(s, header(s), text(claims(s)) + b"{}"),
    "rfc8259:claims-an-array": lambda s: sign(s, header(s), b"[" + text(claims(s)) + b"]"),
    "rfc8259:claims-a-string": lambda s: sign(s, header(s), b'"claims"'),
    "rfc8259:claims-empty": lambda s: sign(s, header(s), b""),
    "python:deep-nesting-in-claims": lambda s: raw_claims(s, b'"x":' + deep(2500)),
    "python:deep-nesting-in-the-unsigned-header": lambda s: raw_header(s, b'"x":' + deep(2500)),
    "cve-2020-10735:huge-integer-in-the-unsigned-header": lambda s: raw_header(s, b'"x":' + b"7" * 5000),
    "rfc8259-6:NaN-in-the-unsigned-header": lambda s: raw_header(s, b'"x":NaN'),
})
# RFC 7493 §2.1 (I-JSON): no escaped lone surrogate. UTF-8 cannot carry one, and parsers read it
# differently (json keeps it, orjson and serde refuse it, others put U+FFFD in): a parser differential.
LONE_SURROGATES: dict[str, Make] = {
    "rfc7493-2.1:lone-high-surrogate-in-claims": lambda s: raw_claims(s, b'"x":"\\ud800"'),
    "rfc7493-2.1:lone-low-surrogate-in-claims": lambda s: raw_claims(s, b'"x":"a\\uDFFFb"'),
    "rfc7493-2.1:reversed-pair-in-claims": lambda s: raw_claims(s, b'"x":"\\udc00\\ud800"'),
    "rfc7493-2.1:high-surrogate-then-a-letter": lambda s: raw_claims(s, b'"x":"\\ud83d\\u0041"'),
    "rfc7493-2.1:lone-surrogate-as-a-key": lambda s: raw_claims(s, b'"\\uD800":1'),
    "rfc7493-2.1:lone-surrogate-deep-in-a-list": lambda s: raw_claims(s, b'"x":[{"y":["ok","\\ud800"]}]'),
    "rfc7493-2.1:lone-surrogate-in-intent": lambda s: sign(
        s, header(s), text(claims(s, intent=DROP))[:-1] + b',"intent":"\\ud83d"}'),
    # A sub json.dumps writes with its lone surrogate escaped: refused before the SPIFFE ID is read.
    "rfc7493-2.1:sub-lone-surrogate": lambda s: claimed(s, sub="spiffe://dev.local/agent/\ud800"),
    "rfc7493-2.1:act-sub-lone-surrogate": lambda s: claimed(
        s, act={"sub": "spiffe://dev.local/agent/\ud800", "idx": 4000}),
    "rfc7493-2.1:lone-surrogate-in-the-header": lambda s: sign(
        s, text(header(s, kid=DROP))[:-1] + b',"kid":"' + s.kid.encode() + b'\\ud800"}', claims(s)),
}
cases(MALFORMED, LONE_SURROGATES)
cases(TOO_LARGE, {
    "rfc8725-2.9:just-over-the-size-cap": lambda s: claimed(s, pad="x" * 8192),
    "rfc8725-2.9:one-megabyte": lambda s: "A" * (1 << 20),
    "rfc8725-2.9:deep-nesting-beyond-the-cap": lambda s: raw_claims(s, b'"x":' + deep(100_000)),
})

# Grants, status and delegation claims a minting daemon never writes (RFC 8725 §3.10).
cases(CLAIMS, {
    "rfc8725-3.10:grant-sensitivity-case": lambda s: claimed(
        s, grants=[tokens.grant("demo", "*", ["read"], "Public")]),
    "rfc8725-3.10:grant-target-inner-star": lambda s: claimed(
        s, grants=[tokens.grant("demo", "re*ports", ["read"])]),
    "rfc8725-3.10:grant-ops-a-string": lambda s: claimed(
        s, grants=[{"tool": "demo", "target": "*", "ops": "*", "sensitivity": "public"}]),
    "rfc8725-3.10:grants-an-object": lambda s: claimed(s, grants={"demo": ["read"]}),
    "rfc8725-3.10:status-idx-bool": lambda s: claimed(s, status={"status_list": {"idx": False, "uri": "x"}}),
    "rfc8725-3.10:status-idx-float": lambda s: claimed(s, status={"status_list": {"idx": 0.0, "uri": "x"}}),
    "rfc8725-3.10:status-idx-negative": lambda s: claimed(s, status={"status_list": {"idx": -1, "uri": "x"}}),
    "rfc8693-4.1:act-deeper-than-the-cap": lambda s: claimed(
        s, act=act_chain(tokens.MAX_DELEGATION_DEPTH + 1)),
    "rfc8693-4.1:act-a-list": lambda s: claimed(s, act=[{"sub": AGENT, "idx": 1}]),
    "rfc8705-3.1:cnf-a-string": lambda s: claimed(s, cnf="x5t#S256"),
})
cases(REVOKED, {  # a slot outside every window can never be looked up: it counts as revoked
    "rfc8725-3.10:status-idx-2**64": lambda s: claimed(s, status={"status_list": {"idx": 2**64}}),
    "rfc8725-3.10:status-idx-10**30": lambda s: claimed(s, status={"status_list": {"idx": 10**30}}),
})

assert len(CASES) > 300, len(CASES)
UNIT_IDS = sorted(CASES)

# Accepted on purpose: what RFC 8259 / RFC 7515 allow and this daemon can read unambiguously.
ACCEPTED: dict[str, Make] = {
    "rfc8259-2:insignificant-whitespace-in-header": lambda s: sign(
        s, b' {\n "alg" : "EdDSA",\t"typ":"agentauthz+jwt", "kid":' + json.dumps(s.kid).encode() + b"}\r\n",
        claims(s)),
    "rfc8259-7:escaped-letters-in-header": lambda s: sign(
        s, b'{"\\u0061lg":"\\u0045dDSA","typ":"agentauthz+jwt","kid":' + json.dumps(s.kid).encode() + b"}",
        claims(s)),
    "rfc7519-4:unknown-claims-are-ignored": lambda s: claimed(s, admin=True, roles=["root"]),
    "rfc7493-2.1:escaped-surrogate-pair-is-one-character": lambda s: raw_claims(s, b'"x":"\\ud83d\\ude00"'),
    "rfc7519-4:member-order-is-free": lambda s: sign(s, dict(reversed(header(s).items())),
                                                       dict(reversed(claims(s).items()))),
    "rfc7515-7.1:bytes-token": lambda s: claimed(s),  # decide() takes text; verify() also takes ASCII bytes
}


# -- (a) both twins ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def forge() -> Forge:
    return Forge()


@pytest.mark.parametrize("name", UNIT_IDS)
def test_hostile_token_is_refused_by_both_twins(hot: HotPath, forge: Forge, name: str) -> None:
    make, reason = CASES[name]
    token = make(forge)
    verifier = make_verifier(hot, forge)
    started = time.perf_counter()
    assert verifier.decide(token, *REQUEST, forge.now) == (reason, None)
    assert time.perf_counter() - started < 0.5  # no bomb is inflated, no huge number parsed slowly
    assert verifier.verify_live(token, forge.now) == (reason, None)
    if reason != REVOKED:  # a revoked token verifies (and is cached): its slot denies it
        with pytest.raises(errors.TokenError) as refused:
            verifier.verify(token, forge.now)
        assert refused.value.reason == reason
        assert verifier.cache_len() == 0
    assert reason in reasons.UNAUTHENTICATED
    # The verifier still works, and a valid token of the same key is allowed.
    assert verifier.decide(forge.token(), *REQUEST, forge.now)[0] == reasons.ALLOW


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_unambiguous_spellings_are_accepted(hot: HotPath, forge: Forge, name: str) -> None:
    token = ACCEPTED[name](forge)
    verifier = make_verifier(hot, forge)
    if name.endswith("bytes-token"):
        assert verifier.verify(token.encode("ascii"), forge.now).sub == forge.claims()["sub"]
    assert verifier.decide(token, *REQUEST, forge.now)[0] == reasons.ALLOW


def test_both_twins_give_the_same_message_for_every_case(forge: Forge) -> None:
    twins = [make_verifier(hot, forge) for hot in (native_or_fail(), _accel.pure())]
    for name in UNIT_IDS:
        token = CASES[name][0](forge)
        outcomes = []
        for verifier in twins:
            try:
                verifier.verify(token, forge.now)
                outcomes.append(("verified",))
            except errors.TokenError as exc:
                outcomes.append((type(exc).__name__, str(exc)))
        assert outcomes[0] == outcomes[1], name


# Requests a valid token does not cover: 403 insufficient_scope (RFC 6750 §3.1), or 400 when the request
# names nothing decidable. Matching is exact or a literal prefix: no case folding, trimming, Unicode
# normalisation or wildcards in the request (Unicode TR 36 §2 on look-alikes; RFC 8725 §3.10).
GRANTS = [tokens.grant("demo", "reports/*", ["read"], "internal")]
COVERAGE: dict[str, tuple[tuple[str, str, str, str], str]] = {
    "tool-case": (("Demo", "reports/q3", "read", "public"), reasons.SCOPE_DENIED),
    "tool-homoglyph": ((lookalike("demo"), "reports/q3", "read", "public"), reasons.SCOPE_DENIED),
    "tool-fullwidth": ((fullwidth("demo"), "reports/q3", "read", "public"), reasons.SCOPE_DENIED),
    "tool-trailing-space": (("demo ", "reports/q3", "read", "public"), reasons.SCOPE_DENIED),
    "tool-nul-suffix": (("demo\x00", "reports/q3", "read", "public"), reasons.SCOPE_DENIED),
    "tool-wildcard": (("*", "reports/q3", "read", "public"), reasons.SCOPE_DENIED),
    "target-prefix-without-slash": (("demo", "reports", "read", "public"), reasons.SCOPE_DENIED),
    "target-sibling-prefix": (("demo", "reportsX/q3", "read", "public"), reasons.SCOPE_DENIED),
    "target-homoglyph": (("demo", lookalike("reports") + "/q3", "read", "public"), reasons.SCOPE_DENIED),
    "target-case": (("demo", "Reports/q3", "read", "public"), reasons.SCOPE_DENIED),
    "target-wildcard": (("demo", "*", "read", "public"), reasons.SCOPE_DENIED),
    "operation-case": (("demo", "reports/q3", "READ", "public"), reasons.SCOPE_DENIED),
    "operation-wildcard": (("demo", "reports/q3", "*", "public"), reasons.SCOPE_DENIED),
    "operation-padded": (("demo", "reports/q3", " read", "public"), reasons.SCOPE_DENIED),
    "sensitivity-above-grant": (("demo", "reports/q3", "read", "restricted"), reasons.SENSITIVITY_EXCEEDED),
    "sensitivity-case": (("demo", "reports/q3", "read", "Public"), reasons.REQUEST_INVALID),
    "sensitivity-unknown": (("demo", "reports/q3", "read", "secret"), reasons.REQUEST_INVALID),
    "tool-empty": (("", "reports/q3", "read", "public"), reasons.REQUEST_INVALID),
    "operation-empty": (("demo", "reports/q3", "", "public"), reasons.REQUEST_INVALID),
}


@pytest.mark.parametrize("name", sorted(COVERAGE))
def test_requests_outside_the_grant_are_denied(hot: HotPath, forge: Forge, name: str) -> None:
    request, reason = COVERAGE[name]
    verifier = make_verifier(hot, forge)
    token = forge.token(grants=GRANTS)
    assert verifier.decide(token, *request, forge.now) == (reason, None)
    assert verifier.decide(token, "demo", "reports/q3", "read", "internal", forge.now)[0] == reasons.ALLOW


# -- (b) through a real daemon's Check ---------------------------------------------------------------


class DaemonSigner:
    """The daemon's current signing key (read from ``<state>/keys``) and a token it minted, as a base."""

    def __init__(self, state_dir: Path, minted: str) -> None:
        keys = state_dir / "keys"
        ring = json.loads((keys / "keyring.json").read_text())
        self.kid = next(k["kid"] for k in ring["keys"] if k["state"] == "current")
        private = serialization.load_pem_private_key((keys / f"{self.kid}.pem").read_bytes(), password=None)
        self.key = SigningKey(private.private_bytes(  # type: ignore[union-attr]
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()))
        head, body, _ = minted.split(".")
        assert json.loads(base64.urlsafe_b64decode(head + "=="))["kid"] == self.kid
        self.base = json.loads(base64.urlsafe_b64decode(body + "=="))
        self.now = self.base["iat"]

    def claims(self, **changes: Any) -> dict[str, Any]:
        return {**json.loads(json.dumps(self.base)), **changes}

    def token(self, **changes: Any) -> str:
        return tokens.encode(self.claims(**changes), self.key, self.kid)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("hostile")
    d = Daemon(work / "state").start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def client(daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Client:
    out = tmp_path_factory.mktemp("hostile-id")
    issue_svid(ensure_dev_pki(daemon.state_dir), AGENT, out)
    return Client(daemon.api_address, Identity.from_dir(out), check_server=daemon.check_address)


@pytest.fixture(scope="module")
def signer(daemon: Daemon, client: Client) -> DaemonSigner:
    minted = client.mint("hostile", ["demo:*:read"], intent="be attacked")
    return DaemonSigner(daemon.state_dir, minted.token)


SENT: list[str] = []  # every hostile token sent, to prove none reaches the audit log or the daemon log


def check_raw(client: Client, request: ext_authz.CheckRequest) -> Any:
    """Check with a whole CheckRequest: headers and routes Client.check does not build."""
    return check_bytes(client, request.SerializeToString())


def check_request(headers: dict[str, str], tool: str = "demo", target: str = "reports",
                  operation: str = "read", sensitivity: str = "public") -> ext_authz.CheckRequest:
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            method="TRACE", path="/", headers=headers)),  # a method no policy default maps
        context_extensions={"tool": tool, "target": target, "operation": operation,
                            "sensitivity": sensitivity}))


def check_headers(client: Client, headers: dict[str, str], *request: str) -> Any:
    return check_raw(client, check_request(headers, *request))


def check_bytes(client: Client, raw: bytes) -> Any:
    """Check with a hand-made request body: what a client (or Envoy) may send but protobuf won't make."""
    call = client._check  # the client's raw Check channel
    assert call is not None
    return decision_from(call(raw, timeout=5))


def with_raw_header_value(name: str, value: bytes) -> bytes:
    """A serialized CheckRequest whose header ``name`` has exactly these bytes (valid UTF-8 or not)."""
    placeholder = "\x01" * len(value)
    raw = check_request({name: placeholder}).SerializeToString()
    assert raw.count(placeholder.encode()) == 1
    return raw.replace(placeholder.encode(), value)


def assert_denied(decision: Any, status: int, reason: str) -> None:
    assert (decision.allowed, decision.status, decision.reason) == (False, status, reason)
    challenge = decision.headers.get("www-authenticate", "")
    if status == 401:
        assert 'error="invalid_token"' in challenge or reason == reasons.TOKEN_MISSING, challenge
    elif status == 403:
        assert 'error="insufficient_scope"' in challenge, challenge


@pytest.mark.parametrize("name", UNIT_IDS)
def test_hostile_token_is_denied_by_the_daemon(client: Client, signer: DaemonSigner, name: str) -> None:
    make, reason = CASES[name]
    token = make(signer)
    SENT.append(token)
    if not token.encode("utf-8", "surrogatepass").decode("utf-8", "replace") == token:
        # Not UTF-8 at all: no protobuf library makes such a request, but a client may send the bytes.
        raw = with_raw_header_value("authorization", f"Bearer {token}".encode("utf-8", "surrogatepass"))
        assert_denied(check_bytes(client, raw), 400, INVALID)
        return
    if " " in token:  # RFC 6750 §2.1: a b64token has no space, so the header carries no bearer token
        reason = reasons.TOKEN_MISSING
    assert_denied(check_headers(client, {"authorization": f"Bearer {token}"}), 401, reason)


def test_valid_tokens_of_the_daemon_key_are_allowed(client: Client, signer: DaemonSigner) -> None:
    """The control: the signer builds what the daemon accepts, so only the hostile part is refused."""
    for name, make in ACCEPTED.items():
        decision = client.check(make(signer), *REQUEST)
        assert decision.allowed, (name, decision)


@pytest.mark.parametrize("twin", ["native", "pure"])
def test_lone_surrogates_are_refused_by_a_daemon_on_either_twin(tmp_path: Path, twin: str) -> None:
    """RFC 7493 §2.1 through a daemon running each twin, the tokens signed with its own key; an
    escaped pair (one character) and the expiry at exp alike (issue 16)."""
    with daemon_twin(twin):
        d = Daemon(tmp_path / "state").start()
    try:
        issue_svid(ensure_dev_pki(d.state_dir), AGENT, tmp_path / "id")
        client = Client(d.api_address, Identity.from_dir(tmp_path / "id"), check_server=d.check_address)
        s = DaemonSigner(d.state_dir, client.mint("surrogates", ["demo:*:read"]).token)
        for make in LONE_SURROGATES.values():
            assert_denied(check_headers(client, {"authorization": f"Bearer {make(s)}"}), 401, MALFORMED)
        pair = ACCEPTED["rfc7493-2.1:escaped-surrogate-pair-is-one-character"](s)
        assert client.check(pair, *REQUEST).allowed
        at_exp = CASES["rfc7519-4.1.4:expired-at-exp-with-no-leeway"][0](s)
        assert_denied(check_headers(client, {"authorization": f"Bearer {at_exp}"}), 401, EXPIRED)
        assert "Traceback" not in d.log()
    finally:
        d.stop()


AUTHORIZATION = {  # RFC 6750 §2.1: exactly "Bearer" SP token; anything else is no credential at all
    "scheme-only": "Bearer",
    "scheme-and-space": "Bearer ",
    "basic-scheme": "Basic {t}",
    "double-space": "Bearer  {t}",
    "tab-separator": "Bearer\t{t}",
    "two-credentials": "Bearer {t}, Bearer {t}",
    "token-then-garbage": "Bearer {t} x",
    "token-with-trailing-space": "Bearer {t} ",
    "dpop-scheme": "DPoP {t}",
    "quoted-token": 'Bearer "{t}"',
}


@pytest.mark.parametrize("name", sorted(AUTHORIZATION))
def test_malformed_authorization_headers_carry_no_token(client: Client, signer: DaemonSigner,
                                                        name: str) -> None:
    value = AUTHORIZATION[name].format(t=signer.token())
    decision = check_headers(client, {"authorization": value})
    if name == "quoted-token":
        assert_denied(decision, 401, MALFORMED)  # a token, but not a compact JWS
    else:
        assert_denied(decision, 401, reasons.TOKEN_MISSING)


def test_bearer_scheme_is_case_insensitive_and_other_headers_are_ignored(client: Client,
                                                                         signer: DaemonSigner) -> None:
    token = signer.token()
    assert check_headers(client, {"authorization": f"bEaReR {token}"}).allowed  # RFC 7235 §2.1
    for header_name in ("x-authorization", "proxy-authorization", "cookie"):
        assert_denied(check_headers(client, {header_name: f"Bearer {token}"}), 401, reasons.TOKEN_MISSING)


UNDECODABLE = {  # a request that is no CheckRequest is denied and recorded, never a gRPC error
    "obs-text-latin1-in-a-header": with_raw_header_value("user-agent", b"caf\xe9"),
    "utf8-encoded-surrogate-in-a-header": with_raw_header_value("x-note", b"\xed\xa0\x80"),
    "overlong-slash-in-a-header": with_raw_header_value("x-path", b"\xc0\xaf"),
    "corrupt-wire-format": b"\xff\xff\xff\xff",
    "truncated-message": check_request({"authorization": "Bearer x"}).SerializeToString()[:-3],
    "wrong-message-type": b"\x0a\x05hello",  # field 1 as a string: CheckRequest's is a message
}


@pytest.mark.parametrize("name", sorted(UNDECODABLE))
def test_undecodable_requests_are_denied_not_errors(client: Client, signer: DaemonSigner, name: str) -> None:
    assert_denied(check_bytes(client, UNDECODABLE[name]), 400, INVALID)
    assert client.check(signer.token(), *REQUEST).allowed


@pytest.mark.parametrize("name", sorted(COVERAGE))
def test_requests_outside_the_grant_are_denied_by_the_daemon(client: Client, signer: DaemonSigner,
                                                               name: str) -> None:
    request, reason = COVERAGE[name]
    token = signer.token(grants=GRANTS)
    status = 400 if reason == reasons.REQUEST_INVALID else 403
    assert_denied(check_headers(client, {"authorization": f"Bearer {token}"}, *request), status, reason)
    assert client.check(token, "demo", "reports/q3", "read", "internal").allowed


# Requests whose route names no tool or target: the daemon reads them from "/<tool>/<target>". Envoy
# forwards the path as sent (normalize_path is off by default), and the upstream may resolve "..",
# "%2e", "\\" or ";" to another tool than the one decided on: CVE-2019-9901 (Envoy RBAC bypassed by
# unnormalised paths), CVE-2021-29492 (escaped slashes). A path that is not in its one normal form
# names nothing: 400 request_invalid. The token: demo:reports/*:read (narrow) or demo:*:read (wide).
PATHS: dict[str, tuple[str, str, int, str]] = {
    "control-narrow": ("narrow", "/demo/reports/q3", 200, reasons.ALLOW),
    "control-query-is-not-path": ("narrow", "/demo/reports/q3?next=/../../billing", 200, reasons.ALLOW),
    "control-trailing-slash": ("narrow", "/demo/reports/", 200, reasons.ALLOW),
    "tool-case": ("wide", "/Demo/reports/q3", 403, reasons.SCOPE_DENIED),
    "cve-2019-9901:dot-dot-out-of-the-target": ("narrow", "/demo/reports/../../billing/invoices", 400,
                                                reasons.REQUEST_INVALID),
    "cve-2019-9901:dot-dot-out-of-the-tool": ("wide", "/demo/../billing/invoices", 400, INVALID),
    "cve-2019-9901:trailing-dot-dot": ("wide", "/demo/reports/..", 400, INVALID),
    "cve-2019-9901:dot-segment": ("narrow", "/demo/reports/./q3", 400, INVALID),
    "cve-2019-9901:percent-encoded-dots": ("wide", "/demo/%2e%2e/billing/invoices", 400, INVALID),
    "cve-2021-29492:percent-encoded-slash": ("wide", "/demo/..%2Fbilling%2Finvoices", 400, INVALID),
    "backslash-traversal": ("wide", "/demo/..\\billing\\invoices", 400, INVALID),
    "path-parameter-traversal": ("wide", "/demo/..;/billing/invoices", 400, INVALID),
    "double-slash": ("narrow", "/demo//reports/q3", 400, INVALID),
    "leading-double-slash": ("wide", "//billing/invoices", 400, INVALID),
    "percent-encoded-nul": ("narrow", "/demo/reports/q3%00.txt", 400, INVALID),
    "fragment": ("narrow", "/demo/reports/q3#/../../x", 400, INVALID),
}


@pytest.mark.parametrize("name", sorted(PATHS))
def test_path_derived_requests_must_be_in_normal_form(client: Client, signer: DaemonSigner,
                                                       name: str) -> None:
    width, path, status, reason = PATHS[name]
    token = signer.token(grants=GRANTS) if width == "narrow" else signer.token()
    decision = check_raw(client, ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            method="GET", path=path, headers={"authorization": f"Bearer {token}"})),
        context_extensions={"sensitivity": "internal"})))
    if status == 200:
        assert decision.allowed, decision
    else:
        assert_denied(decision, status, reason)


@pytest.mark.parametrize("label", sorted(HEADER_TEXT))
def test_mint_refuses_a_task_name_no_header_can_carry(client: Client, label: str) -> None:
    """RFC 9110 §5.5: the task name becomes x-agentauthz-task; mint refuses what a header cannot carry."""
    with pytest.raises(grpc.RpcError) as err:
        client.mint(HEADER_TEXT[label], ["demo:*:read"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request_invalid: task must be")


def test_the_daemon_survives_every_case(daemon: Daemon, client: Client, signer: DaemonSigner) -> None:
    """Runs after the cases above (file order): still serving, no traceback, no token in any log."""
    for name in UNIT_IDS:  # when run alone, send them all here
        if len(SENT) >= len(UNIT_IDS):
            break
        token = CASES[name][0](signer)
        SENT.append(token)
        assert not client.check(token, *REQUEST).allowed
    assert daemon.healthz() == 200
    assert client.check(signer.token(), *REQUEST).allowed
    fresh = client.mint("after-the-storm", ["demo:*:read"])
    assert client.check(fresh.token, *REQUEST).allowed
    log = daemon.log()
    assert "Traceback" not in log and "Exception" not in log, log[-4000:]

    def audit_text() -> bytes:
        return b"".join(p.read_bytes() for p in (daemon.state_dir / "audit").rglob("*.jsonl"))
    # Every denial is a check record (the writer batches: wait until they have landed).
    wait_for(lambda: audit_text().count(b'"kind":"check"') >= len(UNIT_IDS), 15, "check audit records")
    text = audit_text() + log.encode()
    for token in SENT:
        for part in token.split("."):
            if len(part) >= 24 and part.isascii():  # long enough to be unique to the token
                assert part.encode() not in text, part[:40]
