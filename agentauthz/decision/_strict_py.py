"""Strict token text: the reference twin of ``native/_strict_c.pyx``, same refusals, same messages.

Strict base64url (RFC 7515 §2) and strict JSON (RFC 8259: UTF-8, no duplicate
keys, no NaN or Infinity, nesting bounded; RFC 7493 I-JSON: no lone surrogate), which every new token's three
segments go through before anything is believed. Also what MCP bodies and
offline verification parse with.
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

from .. import errors
from .tokens import MAX_JSON_DEPTH

_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


def b64url_decode(segment: str) -> bytes:
    """Strict base64url (RFC 7515 §2): unpadded, URL alphabet only, canonical trailing bits."""
    if not _SEGMENT.fullmatch(segment) or len(segment) % 4 == 1:
        raise errors.TokenMalformed("segment is not unpadded base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    # Unused low bits of the last character must be zero, or two strings
    # would decode to one token (a free mutation of every token).
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise errors.TokenMalformed("segment has non-canonical base64url padding bits")
    return raw


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise errors.TokenMalformed(f"duplicate JSON key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise errors.TokenMalformed(f"non-finite number {name} in JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise errors.TokenMalformed("non-finite number in JSON")
    return value


def _nesting_exceeds(raw: bytes, limit: int) -> bool:
    """Whether more than ``limit`` arrays and objects are open at once; brackets in strings do not count."""
    if raw.count(b"[") + raw.count(b"{") <= limit:  # every real token: no scan
        return False
    depth, in_string, escaped = 0, False, False
    for c in raw:
        if in_string:
            if escaped:
                escaped = False
            elif c == 0x5C:  # backslash: the next byte cannot end the string
                escaped = True
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c == 0x5B or c == 0x7B:
            depth += 1
            if depth > limit:
                return True
        elif c == 0x5D or c == 0x7D:
            depth -= 1
    return False


_SURROGATE = re.compile("[\ud800-\udfff]")


def holds_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value has a surrogate code point in any string, key or member."""
    if value.__class__ is str:
        return _SURROGATE.search(value) is not None
    if value.__class__ is dict:
        return any(holds_surrogate(k) or holds_surrogate(v) for k, v in value.items())
    if value.__class__ is list:
        return any(holds_surrogate(v) for v in value)
    return False


def lone_surrogate(raw: bytes, value: Any) -> bool:
    """Whether ``value``, parsed from ``raw``, holds an escaped lone surrogate (``"\\ud800"``), which
    RFC 7493 §2.1 (I-JSON) forbids: UTF-8 cannot carry one, and parsers disagree on what it reads as.
    json joins an escaped pair into its one character, so any surrogate left was alone."""
    return b"\\u" in raw and holds_surrogate(value)  # only an escape spells one in valid UTF-8


def json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Strict JSON: UTF-8 only, an object, no duplicate keys, no NaN/Infinity, no lone surrogate, at
    most MAX_JSON_DEPTH deep."""
    try:
        text = raw.decode("utf-8")
        if _nesting_exceeds(raw, MAX_JSON_DEPTH):
            raise errors.TokenMalformed(f"{what} is nested too deeply")
        obj = json.loads(text, object_pairs_hook=_pairs_no_duplicates,
                         parse_constant=_reject_constant, parse_float=_finite_float)
    except errors.TokenMalformed:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise errors.TokenMalformed(f"{what} is not valid JSON") from exc
    if lone_surrogate(raw, obj):
        raise errors.TokenMalformed(f"{what} holds a lone surrogate escape (RFC 7493)")
    if not isinstance(obj, dict):
        raise errors.TokenMalformed(f"{what} is not a JSON object")
    return obj
