"""The token format: claims, grants, and the one place tokens are encoded and signed.

A token is a compact JWS (RFC 7515) signed with Ed25519 (``alg: EdDSA``,
RFC 8037), explicitly typed (RFC 8725 §3.11). Verification lives in the hot
path twins (``_token_py`` / ``_token_c``, ``_verify_py`` / ``_verify_c``), not here.
"""

from __future__ import annotations

import base64
import json
import secrets
from typing import Any, Iterable, Mapping, Sequence

from nacl.signing import SigningKey

from ..identity.spiffe import IdentityError, parse_spiffe_id

TOKEN_TYPE = "agentauthz+jwt"
ALGORITHM = "EdDSA"

# Data sensitivity, lowest first; a grant's level is the most it may touch.
SENSITIVITY_LEVELS: tuple[str, ...] = ("public", "internal", "confidential", "restricted")
SENSITIVITY_RANK: dict[str, int] = {name: rank for rank, name in enumerate(SENSITIVITY_LEVELS)}
DEFAULT_SENSITIVITY = "public"

# Bounds enforced by the verifier; kept here so minting never produces a
# token its own verifier would refuse.
MAX_GRANTS = 64
MAX_DELEGATION_DEPTH = 8
MAX_INTENT_CHARS = 1024
MAX_TOKEN_BYTES = 8192
# Arrays and objects open at once in a token's header or claims (and an MCP body, mcp.py): a token
# needs fewer than 16. A fixed bound, checked before parsing, keeps the verdict on deep nesting from
# depending on the interpreter's recursion limit or on how deep the caller's stack already is.
MAX_JSON_DEPTH = 64

_AGENTS: dict[str, bool] = {}  # SPIFFE IDs already found valid: a cold verify parses each agent once
_AGENTS_MAX = 4096


def is_agent(value: Any) -> bool:
    """A workload's SPIFFE ID in its one spelling (SPIFFE-ID §2, ASCII only), as mint writes ``sub``."""
    if type(value) is not str or not value.isascii():
        return False
    if value in _AGENTS:
        return True
    try:
        if not parse_spiffe_id(value).path:
            return False
    except IdentityError:
        return False
    if len(_AGENTS) >= _AGENTS_MAX:
        _AGENTS.clear()
    _AGENTS[value] = True
    return True


def b64url(data: bytes) -> str:
    """Base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _json(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False,
                      ensure_ascii=True).encode("ascii")


def new_token_id() -> str:
    """A fresh, unguessable token id (128 bits)."""
    return secrets.token_urlsafe(16)


def task_key(root_agent: str, task: str) -> str:
    """The revocation key of a task: task names are per agent, so one agent cannot end another's.

    ``root_agent`` is the agent that minted the task's first token; delegated
    tokens keep it as the innermost ``act`` and so die with the task.
    """
    return f"{root_agent} {task}"


def grant(tool: str, target: str, ops: Iterable[str], sensitivity: str = DEFAULT_SENSITIVITY,
          **extra: Any) -> dict[str, Any]:
    """One grant as it appears in a token's ``grants`` claim."""
    return {"tool": tool, "target": target, "ops": sorted(set(ops)),
            "sensitivity": sensitivity, **extra}


APPROVED_FIELDS = ("tool", "target", "ops", "sensitivity")  # a grant in an approval claim's "grants"


def build_claims(*, issuer: str, audience: str, subject: str, task: str, grants: Sequence[Mapping[str, Any]],
                 issued_at: int, ttl: int, slot: int, status_uri: str, intent: str = "",
                 token_id: str | None = None, not_before: int | None = None,
                 act: Mapping[str, Any] | None = None, cnf: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The claims of a new token; times are integer seconds (RFC 7519 NumericDate)."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": subject,
        "iat": int(issued_at),
        "nbf": int(issued_at if not_before is None else not_before),
        "exp": int(issued_at) + int(ttl),
        "jti": token_id or new_token_id(),
        "task": task,
        "grants": [dict(g) for g in grants],
        "intent": intent,
        "status": {"status_list": {"idx": int(slot), "uri": status_uri}},
    }
    if act:
        claims["act"] = dict(act)
    if cnf:
        claims["cnf"] = dict(cnf)
    if extra:
        claims.update(extra)
    return claims


def encode(claims: Mapping[str, Any], signing_key: SigningKey, kid: str,
           typ: str = TOKEN_TYPE) -> str:
    """Sign ``claims`` into a compact JWS with ``kid``; the only token encoder."""
    header = b64url(_json({"alg": ALGORITHM, "typ": typ, "kid": kid}))
    payload = b64url(_json(claims))
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = signing_key.sign(signing_input).signature
    return f"{header}.{payload}.{b64url(signature)}"

