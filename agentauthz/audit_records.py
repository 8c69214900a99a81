"""What an audit record holds, as bytes: canonical JSON, token redaction, ``prepare``d Check fields.

Shared by the writer (``audit``) and the offline verifier (``audit_verify``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

REDACTED = "[redacted: token]"
# A compact JWS anywhere in a value (also "Bearer eyJ...", "report-eyJ...", "x_eyJ..."): three base64url
# segments; "eyJ" is '{"' encoded. Whatever comes before it does not matter (tests/test_no_secrets_leak.py).
_JWS = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _canon(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# Built once: json.dumps(**kwargs) would build an encoder per record (~20% of the writer's cost).
# default=str: one odd field type must not kill the writer thread.
_ENCODE = json.JSONEncoder(separators=(",", ":"), default=str).encode


def _dumps(obj: dict[str, Any]) -> bytes:
    return _ENCODE(obj).encode()


def thumbprint(public: Ed25519PublicKey) -> str:
    """RFC 7638 JWK thumbprint of an Ed25519 (OKP, RFC 8037) public key."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _b64(hashlib.sha256(_canon({"crv": "Ed25519", "kty": "OKP", "x": _b64(raw)})).digest())


def _redacted(value: Any, depth: int = 0) -> Any:
    """``value`` with anything shaped like a compact JWS replaced: tokens never reach the log.

    Runs on the writer thread or once per ``prepare``d fragment, and redacts rather than refuses:
    a request path or header an attacker chose must not be able to make a Check fail.
    """
    if isinstance(value, str):
        if "eyJ" in value:
            return _JWS.sub(lambda m: REDACTED if len(m.group()) > 40 else m.group(), value)
        return value
    if isinstance(value, (list, tuple, dict)):
        if depth > 8:  # also stops a circular structure
            return "[nested too deep]"
        if isinstance(value, dict):
            return {k: _redacted(v, depth + 1) for k, v in value.items()}
        return [_redacted(v, depth + 1) for v in value]
    return value


def redact_tokens(text: str) -> str:
    """``text`` with every compact JWS in it replaced, for free text kept outside the log too."""
    return _redacted(text)  # type: ignore[no-any-return]


def _redacted_fields(fields: dict[str, Any]) -> dict[str, Any]:
    # Most records hold only plain strings, None and empty lists: skip the copying walk for them.
    for v in fields.values():
        if not (v is None or (v.__class__ is str and "eyJ" not in v) or v.__class__ in (bool, int)
                or (v.__class__ is list and not v)):
            return _redacted(fields)  # type: ignore[no-any-return]
    return fields


def prepare(**fields: Any) -> str:
    """``fields`` as JSON object members (``"k":v,...``), redacted: encoded once, written in many records.

    The Check path prepares what a token and a request have in common once and
    hands only the per-call decision and request ids to ``record_check``; a
    whole-dict JSON encode per Check cost more than the decision itself.
    """
    fields = _redacted_fields(fields)
    members = []
    for key, value in fields.items():  # what a Check's record holds, without the encoder's machinery
        cls = value.__class__
        if cls is str:
            members.append(f"{_json_str(key)}:{_json_str(value)}")
        elif value is None or cls is bool:
            members.append(f"{_json_str(key)}:{_JSON_CONSTANTS[value]}")
        elif cls is list and all(item.__class__ is str for item in value):
            members.append(f"{_json_str(key)}:[{','.join(map(_json_str, value))}]")
        else:  # anything else, as json encodes it (the same bytes: tests/test_audit.py)
            return _dumps(fields).decode()[1:-1]
    return ",".join(members)


_json_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]
_JSON_CONSTANTS = {None: "null", True: "true", False: "false"}
