"""Picks the native (Cython) or the pure-Python hot path, once, at import.

``AGENTAUTHZ_NO_EXTENSIONS`` set to 1/true/yes/on forces the pure twins;
0/false/no/off or unset means use the native modules when they were built.
Everything else in the package imports the hot path from here.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable, NamedTuple

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})


def extensions_disabled(environ: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Parse AGENTAUTHZ_NO_EXTENSIONS explicitly; an unknown value is an error, not a guess."""
    value = environ.get("AGENTAUTHZ_NO_EXTENSIONS", "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImportError(f"AGENTAUTHZ_NO_EXTENSIONS={value!r}: use 1/true/yes/on or 0/false/no/off")


class HotPath(NamedTuple):
    """The few names that cross the native/pure boundary."""

    name: str
    Verifier: type
    VerifiedToken: type
    RevocationIndex: type
    Grant: type
    compile_grant: Callable[..., Any]
    b64url_decode: Callable[[str], bytes]
    Bitset: type
    bitset_module: ModuleType
    scan_check_request: Callable[[bytes], Any]
    Chain: type
    InlineAllow: type
    DecisionIds: type
    WarmAllow: type
    allow_response: Callable[[str, str, str], bytes]
    Latency: type
    SteadyClock: type
    scan_http: Callable[..., Any]
    HttpAnswers: type


def pure() -> HotPath:
    from . import _bitset_py, _chain_py, _check_py, _http_py, _request_py, _strict_py, _token_py, _verify_py
    return HotPath("pure", _verify_py.Verifier, _token_py.VerifiedToken, _verify_py.RevocationIndex,
                   _token_py.Grant, _token_py.compile_grant, _strict_py.b64url_decode,
                   _bitset_py.Bitset, _bitset_py, _request_py.scan, _chain_py.Chain, _chain_py.InlineAllow,
                   _check_py.DecisionIds, _check_py.WarmAllow, _check_py.allow_response,
                   _check_py.Latency, _check_py.SteadyClock, _http_py.scan_http, _http_py.HttpAnswers)


def native() -> HotPath:
    """The Cython twins; raises ImportError when they were not built."""
    from . import (  # type: ignore[attr-defined]
        _bitset_c,
        _chain_c,
        _check_c,
        _http_c,
        _request_c,
        _strict_c,
        _token_c,
        _verify_c,
    )
    return HotPath("native", _verify_c.Verifier, _token_c.VerifiedToken, _verify_c.RevocationIndex,
                   _token_c.Grant, _token_c.compile_grant, _strict_c.b64url_decode,
                   _bitset_c.Bitset, _bitset_c, _request_c.scan, _chain_c.Chain, _chain_c.InlineAllow,
                   _check_c.DecisionIds, _check_c.WarmAllow, _check_c.allow_response,
                   _check_c.Latency, _check_c.SteadyClock, _http_c.scan_http, _http_c.HttpAnswers)


def _select() -> tuple[HotPath, str | None]:
    if extensions_disabled():
        return pure(), "disabled by AGENTAUTHZ_NO_EXTENSIONS"
    try:
        return native(), None
    except ImportError as exc:
        return pure(), f"native modules unavailable: {exc}"


ACTIVE, FALLBACK_REASON = _select()
NATIVE = ACTIVE.name == "native"

Verifier = ACTIVE.Verifier
VerifiedToken = ACTIVE.VerifiedToken
RevocationIndex = ACTIVE.RevocationIndex
Grant = ACTIVE.Grant
compile_grant = ACTIVE.compile_grant
Bitset = ACTIVE.Bitset


def bitset_buffer_size(capacity: int) -> int:
    """Bytes a revocation bitset of ``capacity`` bits needs; both twins share one layout."""
    from ._bitset_py import buffer_size
    return buffer_size(capacity)
