"""Pure-Python token checks: the reference twin of ``native/_token_c.pyx``.

What a token must be before the verifier believes it: a JOSE header this daemon
accepts, an Ed25519 signature, claims of the right shape and times, grants
compiled once; the result is a ``VerifiedToken``. Stateless but for a memo of
valid agent IDs: the verifier (``_verify_py``) owns the keys and the cache.
"""

from __future__ import annotations

from typing import Any

from nacl.bindings import crypto_core_ed25519_is_valid_point, crypto_sign_open
from nacl.exceptions import BadSignatureError

from .. import errors
from .constraints import Extras, compile_extras
from .tokens import (
    ALGORITHM,
    MAX_DELEGATION_DEPTH,
    MAX_GRANTS,
    MAX_INTENT_CHARS,
    SENSITIVITY_RANK,
    is_agent,
    task_key,
)

_HEADER_KEY_MATERIAL = frozenset({"jwk", "jku", "x5u", "x5c"})
_HEADER_ALLOWED = frozenset({"alg", "typ", "kid"})
_TIME_MAX = 1 << 40  # far beyond any real NumericDate; keeps arithmetic exact


def ed25519_verify(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """Ed25519 (RFC 8032 §5.1.7) as token verification checks it: libsodium, strict encodings."""
    if len(public_key) != 32 or len(signature) != 64:
        return False
    try:
        crypto_sign_open(bytes(signature) + bytes(message), bytes(public_key))
    except BadSignatureError:
        return False
    return True


def valid_public_key(key: bytes) -> bool:
    """A canonical encoding of a point of prime order (RFC 8032 §5.1.3): not small order, no torsion."""
    return len(key) == 32 and bool(crypto_core_ed25519_is_valid_point(bytes(key)))


class Grant:
    """One grant: tool, target pattern, operations, maximum sensitivity rank, optional constraints."""

    __slots__ = ("tool", "target", "prefix", "ops", "level", "extras")

    def __init__(self, tool: str, target: str, ops: frozenset[str], level: int,
                 extras: Extras | None = None) -> None:
        self.tool = tool
        self.target = target
        # "*" matches any target, "p*" any target starting with p, else exact.
        self.prefix = target[:-1] if target.endswith("*") else None
        self.ops = ops
        self.level = level
        self.extras = extras  # argument constraints and budget (constraints.py), None for most grants

    def covers(self, tool: str, target: str, operation: str, level: int) -> bool:
        if tool != self.tool or operation not in self.ops or level > self.level:
            return False
        if self.prefix is None:
            return target == self.target
        return target.startswith(self.prefix)

    def __repr__(self) -> str:
        return f"Grant({self.tool!r}, {self.target!r}, {sorted(self.ops)!r}, {self.level})"


def compile_grant(raw: Any) -> Grant:
    """Validate one grant object from a token; raises TokenClaimsInvalid."""
    if not isinstance(raw, dict):
        raise errors.TokenClaimsInvalid("grant is not an object")
    tool, target, ops = raw.get("tool"), raw.get("target"), raw.get("ops")
    sensitivity = raw.get("sensitivity")
    if not isinstance(tool, str) or not tool:
        raise errors.TokenClaimsInvalid("grant tool must be a non-empty string")
    if not isinstance(target, str) or not target or "*" in target[:-1]:
        raise errors.TokenClaimsInvalid("grant target must be a non-empty pattern with '*' only at the end")
    if (not isinstance(ops, list) or not ops or len(ops) > 64
            or not all(isinstance(op, str) and op for op in ops) or len(set(ops)) != len(ops)):
        raise errors.TokenClaimsInvalid("grant ops must be a non-empty list of distinct strings")
    if not isinstance(sensitivity, str) or sensitivity not in SENSITIVITY_RANK:
        raise errors.TokenClaimsInvalid("grant sensitivity is not a known level")
    return Grant(tool, target, frozenset(ops), SENSITIVITY_RANK[sensitivity], compile_extras(raw))


def approval_covers(approval: Any, tool: str, target: str, operation: str, level: int) -> bool:
    """Whether a token's ``approval`` claim names a grant the human approved that covers the request
    (``level``: its sensitivity rank). Both verifiers ask the policy again "as approved" only then."""
    grants = approval.get("grants") if isinstance(approval, dict) else None
    if not isinstance(grants, list):
        return False  # a token minted before approvals named their grants: asked of a human again
    for raw in grants:
        try:
            if compile_grant(raw).covers(tool, target, operation, level):
                return True
        except errors.TokenClaimsInvalid:
            continue
    return False


def _time(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name)
    # bool is an int subclass; a time is never true or false.
    if type(value) is not int or not 0 <= value < _TIME_MAX:
        raise errors.TokenClaimsInvalid(f"{name} must be an integer NumericDate")
    return value


def _text(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    # sub, jti and task reach the upstream as header values: no control or format characters, no
    # spaces (RFC 9110 §5.5: CR, LF and NUL in a field value are invalid and dangerous).
    if not isinstance(value, str) or not value or not value.isprintable() or " " in value:
        raise errors.TokenClaimsInvalid(f"{name} must be a non-empty string of printable characters")
    return value


def _slot(holder: Any, what: str) -> int:
    value = holder.get("idx") if isinstance(holder, dict) else None
    if type(value) is not int or value < 0:
        raise errors.TokenClaimsInvalid(f"{what} must carry a non-negative integer idx")
    return value


class VerifiedToken:
    """A token whose signature and claims have been checked once; cached by its exact text."""

    __slots__ = ("claims", "kid", "jti", "sub", "task", "task_key", "iat", "nbf", "exp", "grants",
                 "slots", "subjects", "rev_state", "memo_state", "attachment", "constrained")

    def __init__(self, claims: dict[str, Any], kid: str, grants: tuple[Grant, ...],
                 slots: tuple[int, ...], subjects: tuple[str, ...]) -> None:
        self.claims = claims
        self.kid = kid
        self.jti: str = claims["jti"]
        self.sub: str = claims["sub"]
        self.task: str = claims["task"]
        self.task_key = task_key(subjects[-1], self.task)
        self.iat: int = claims["iat"]
        self.nbf: int = claims["nbf"]
        self.exp: int = claims["exp"]
        self.grants = grants
        self.slots = slots  # own status slot first, then each delegating ancestor's
        self.subjects = subjects  # sub, then each actor up the delegation chain
        # Decision state. Each is one tuple swapped whole, so a thread switch
        # can never pair a generation with another generation's answer.
        self.rev_state: tuple[int, str | None] = (-1, None)  # (revocation generation, reason)
        self.memo_state: tuple[int, dict[tuple[Any, ...], str]] = (-1, {})  # (policy generation, memo)
        self.attachment: Any = None  # free for the transport, e.g. a pre-built response
        # Whether Check must look past the hot path's allow (argument constraints, budgets).
        self.constrained = any(g.extras is not None for g in grants)

    def __repr__(self) -> str:
        return f"VerifiedToken(jti={self.jti!r}, sub={self.sub!r}, task={self.task!r}, exp={self.exp})"



def check_header(header: dict[str, Any], token_type: str) -> str:
    """The ``kid`` of a JOSE header this daemon accepts (EdDSA, its ``typ``, no key material); else raises."""
    names = header.keys()
    if names & _HEADER_KEY_MATERIAL:
        raise errors.TokenHeaderRejected("header may not carry key material or key URLs")
    if "crit" in header:
        raise errors.TokenHeaderRejected("no critical header extension is understood")
    if header.get("alg") != ALGORITHM:
        raise errors.TokenAlgorithmRejected("only EdDSA is accepted")
    if not names <= _HEADER_ALLOWED:
        raise errors.TokenHeaderRejected("header has parameters other than alg, typ, kid")
    if header.get("typ") != token_type:
        raise errors.TokenTypeMismatch("typ is not this daemon's token type")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise errors.TokenMalformed("kid must be a non-empty string")
    return kid



def check_claims(claims: dict[str, Any], kid: str, now: float, issuer: str, audiences: frozenset[str],
                 max_lifetime: int, leeway: int) -> VerifiedToken:
    """The ``VerifiedToken`` of signed ``claims``, checked in the order both twins keep; else raises."""
    if claims.get("iss") != issuer:
        raise errors.TokenIssuerMismatch("iss is not this daemon")
    aud = claims.get("aud")
    if not isinstance(aud, str) or aud not in audiences:
        raise errors.TokenAudienceMismatch("aud is not an accepted audience")
    iat, nbf, exp = _time(claims, "iat"), _time(claims, "nbf"), _time(claims, "exp")
    if not iat <= nbf < exp:
        raise errors.TokenClaimsInvalid("times must satisfy iat <= nbf < exp")
    if exp - iat > max_lifetime:
        raise errors.TokenLifetimeExceeded("token lifetime exceeds the cap")
    if iat > now + leeway:
        raise errors.TokenNotYetValid("token was issued in the future")
    sub, _, _ = _text(claims, "sub"), _text(claims, "jti"), _text(claims, "task")
    if not is_agent(sub):  # one spelling per agent: policy and revocation compare it as text
        raise errors.TokenClaimsInvalid("sub must be a SPIFFE ID")
    intent = claims.get("intent", "")
    if not isinstance(intent, str) or len(intent) > MAX_INTENT_CHARS:
        raise errors.TokenClaimsInvalid("intent must be a short string")
    raw_grants = claims.get("grants")
    if not isinstance(raw_grants, list) or not raw_grants or len(raw_grants) > MAX_GRANTS:
        raise errors.TokenClaimsInvalid("grants must be a non-empty list")
    grants = tuple(compile_grant(g) for g in raw_grants)
    status = claims.get("status")
    slots = [_slot(status.get("status_list") if isinstance(status, dict) else None, "status.status_list")]
    subjects = [sub]
    act = claims.get("act")
    while act is not None:
        if len(subjects) > MAX_DELEGATION_DEPTH:
            raise errors.TokenClaimsInvalid("delegation chain is too deep")
        if not isinstance(act, dict) or not is_agent(act.get("sub")):
            raise errors.TokenClaimsInvalid("act must be an object with a sub")
        subjects.append(act["sub"])
        slots.append(_slot(act, "act"))
        act = act.get("act")
    cnf = claims.get("cnf")
    if cnf is not None and not isinstance(cnf, dict):
        raise errors.TokenClaimsInvalid("cnf must be an object")
    entry = VerifiedToken(claims, kid, grants, tuple(slots), tuple(subjects))
    check_time(entry, now, leeway)
    return entry


def check_time(entry: VerifiedToken, now: float, leeway: int) -> None:
    """Whether a verified token is live at ``now``: raises TokenExpired or TokenNotYetValid."""
    # exp has no leeway: the daemon that wrote it checks it on the same clock, and a token must
    # not outlive its approval or its parent by the leeway. nbf and iat keep it for clock skew:
    # there a skew only lets a token start a little early, never last longer.
    if now >= entry.exp:
        raise errors.TokenExpired("token has expired")
    if now < entry.nbf - leeway:
        raise errors.TokenNotYetValid("token is not valid yet")
