"""What an audit record holds, as bytes: canonical JSON, token redaction, ``prepare``d Check fields.

Shared by the writer (``writer``) and the offline verifier (``verify``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any, Sequence

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..decision.redact import _JWS, REDACTED, _json_str, _redacted  # noqa: F401 (the records' names too)
from ..reasons import ALLOW


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


_JSON_CONSTANTS = {None: "null", True: "true", False: "false"}
_NO_TOKEN = '"agent":null,"task":null,"token_id":null,"chain":null,"intent":null'


def check_members(reason: str, tool: str, target: str, operation: str, sensitivity: str,
                  token: tuple[str, str, str, Sequence[str] | None, str | None] | None = None) -> str:
    """``prepare`` of a Check's fields, byte for byte, with ``token`` the (agent, task, token_id,
    chain, intent) of the token decided on, if any: one format instead of a loop over keyword
    arguments, a fifth of the cost, paid by every new token's first Check. Text that needs redacting,
    or is not text, takes ``prepare`` itself."""
    agent, task, token_id, chain, intent = token or (None, None, None, None, None)
    texts: tuple[str | None, ...] = (reason, tool, target, operation, sensitivity)
    if token is not None:
        texts += (agent, task, token_id, "" if intent is None else intent, *(() if chain is None else chain))
    if not _plain(texts):
        return prepare(decision=reason == ALLOW, reason=reason, tool=tool, target=target, operation=operation,
                       sensitivity=sensitivity, agent=agent, task=task, token_id=token_id,
                       chain=None if chain is None else list(chain), intent=intent)
    members = (f'"decision":{"true" if reason == ALLOW else "false"},"reason":{_json_str(reason)},'
               f'"tool":{_json_str(tool)},"target":{_json_str(target)},"operation":{_json_str(operation)},'
               f'"sensitivity":{_json_str(sensitivity)}')
    if token is None:
        return f"{members},{_NO_TOKEN}"
    assert agent is not None and task is not None and token_id is not None  # _plain: all are text
    return (f'{members},"agent":{_json_str(agent)},"task":{_json_str(task)},"token_id":{_json_str(token_id)},'
            f'"chain":{"null" if chain is None else "[" + ",".join(map(_json_str, chain)) + "]"},'
            f'"intent":{"null" if intent is None else _json_str(intent)}')


REDACTED_CREDENTIAL = "[redacted: credential]"
ARGUMENT_TEXT_MAX = 200
# What a secret looks like in an argument value besides a JWS: a PEM block, an HTTP credential scheme,
# a well-known API key prefix, or a long unbroken run of base64/hex (a key, a password hash, a
# session id). Conservative: a value that merely looks like one is withheld too.
_CREDENTIAL = re.compile(
    r"-----BEGIN|\b(?:bearer|basic|token|apikey|api-key)\b\s*[:=]?\s*\S{8,}|\b(?:sk|pk|rk|ghp|gho|ghs|ghu|glpat"
    r"|xox[abpsr]|AKIA|ASIA|AIza)[-_]?[A-Za-z0-9_-]{8,}|[A-Za-z0-9+/_=-]{32,}", re.IGNORECASE)


def argument_value(value: Any) -> Any:
    """A refused argument's value as its denial records it: numbers, booleans and null as they are,
    short text with nothing credential-shaped in it as it is, anything else withheld or only named."""
    if value is None or value.__class__ in (bool, int, float):
        return value
    if value.__class__ is not str:
        return f"[{'object' if isinstance(value, dict) else 'array' if isinstance(value, list) else 'value'}]"
    text = redact_tokens(value)
    if _CREDENTIAL.search(text):
        return REDACTED_CREDENTIAL
    return text if len(text) <= ARGUMENT_TEXT_MAX else text[:ARGUMENT_TEXT_MAX] + "[truncated]"


def argument_member(name: str | None, value: Any) -> str:
    """The ``"argument":{name, value}`` member a Check record adds for a refused argument."""
    return prepare(argument={"name": name, "value": argument_value(value)})


def _plain(texts: tuple[Any, ...]) -> bool:
    """Whether every one of ``texts`` is text with nothing token-shaped in it (``"eyJ"`` split across
    two of them counts too: prepare then redacts what it finds, which may be nothing)."""
    try:
        return "eyJ" not in "".join(texts)
    except TypeError:
        return False
