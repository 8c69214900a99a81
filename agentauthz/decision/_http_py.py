"""Pure twin of ``native/_http_c.pyx``: Envoy's HTTP ext_authz request as the fields a decision reads, and
the decision's CheckResponse bytes as the HTTP answer (serve/http_check.py uses both, README "The HTTP
Check" says what Envoy must set).

Every warm HTTP Check runs both: in Python, reading the headers and turning the answer back cost as much
as the decision, so the native twin does the same work in C calls. The rare parts stay Python callables
handed in: reading an ``x-forwarded-client-cert`` (``peer_of``) and converting a response seen first.
"""

from __future__ import annotations

from typing import Any, Callable

from .mcp import EXTENSION as MCP  # the route key of an MCP route: its body is read

PATH_HEADER = "x-agentauthz-path"
ROUTE_PREFIX = "x-agentauthz-route-"
ROUTE_KEYS = ("tool", "target", "operation", "sensitivity", "boundary", MCP)
XFCC = "x-forwarded-client-cert"
DECISION_HEADER = "x-agentauthz-decision-id"  # Envoy: dynamic_metadata_from_headers, for access logs
_ROUTE_HEADERS = {ROUTE_PREFIX + key: key for key in ROUTE_KEYS}
_SINGLE = frozenset({PATH_HEADER, XFCC})  # Envoy sets each once; two are a client's copy let through

Answer = tuple[int, list[tuple[str, str]], bytes]


def scan_http(method: str, path: str, header_items: list[tuple[str, str]], header_count: int,
              peer_of: Callable[[str], tuple[str, str] | None]) -> tuple[Any, ...] | None:
    """The fields ``CheckService.check`` decides (``_request_py.Fields``) of one HTTP ext_authz request,
    but for the last: on an MCP route the headers (the caller makes the request its body is read
    from), else None. None when it is not a request Envoy set up as README "The HTTP Check" says: no
    or a repeated ``x-agentauthz-path``, one not naming ``path``, an unknown or repeated route key,
    a repeated ``x-forwarded-client-cert`` or one that is not ``peer_of`` one element; and when the
    request has more header names than ``header_items`` names (``header_count``: granian's
    ``len(headers)``, each name once), one of them with no value there.

    granian hands over only values of visible ASCII and leaves out any other (UTF-8 too) without a
    word, while still naming the header: read as absent, a route's target would fall back to the
    path's and an MCP body's Content-Encoding to identity. Envoy joins a repeated header into one
    value, so a name without a value is a value the decision cannot read: refused, as the gRPC Check
    refuses a header value that is not UTF-8."""
    headers: dict[str, str] = {}
    extensions: dict[str, str] = {}
    for name, value in header_items:
        key = _ROUTE_HEADERS.get(name)
        if key is not None:
            if key in extensions:
                return None
            extensions[key] = value
        elif name in headers:
            if name in _SINGLE:
                return None
            headers[name] += "," + value  # as Envoy joins a repeated header in the gRPC CheckRequest
        elif name.startswith(ROUTE_PREFIX):
            return None  # a route key agentauthz does not know: not one Envoy's config sets
        else:
            headers[name] = value
    if len(headers) + len(extensions) != header_count:  # every name in header_items is one of them
        return None
    original = headers.get(PATH_HEADER)
    if original is None:
        return None
    # The decoded path granian hands over must be the one Envoy named; one still encoded is refused
    # by the decision itself (ABNORMAL_PATH), whatever it decodes to.
    bare = original.partition("?")[0]
    if bare != path and "%" not in bare:
        return None
    principal = certificate = ""
    xfcc = headers.get(XFCC)
    if xfcc is not None:
        peer = peer_of(xfcc)
        if peer is None:
            return None
        principal, certificate = peer
    return (headers.get("authorization"), headers.get("x-request-id", ""), method, original, extensions,
            principal, certificate, headers if MCP in extensions else None)


class HttpAnswers:
    """CheckResponse bytes as (status, headers, body), each distinct response converted once by
    ``convert`` (which says whether its answer may be kept). The decision id spliced into each
    response as ``head + id + tail`` is cut out and sent as the ``x-agentauthz-decision-id`` header."""

    def __init__(self, head: bytes, tail: bytes, id_chars: int,
                 convert: Callable[[bytes], tuple[Answer, bool]], limit: int) -> None:
        self._head, self._tail, self._convert, self._limit = head, tail, convert, limit
        self._framed = len(head) + id_chars + len(tail)
        self._known: dict[bytes, Answer] = {}

    def __call__(self, response: bytes) -> Answer:
        cut = len(response) - self._framed
        if cut >= 0 and response.endswith(self._tail) and response.startswith(self._head, cut):
            decision_id = response[cut + len(self._head):len(response) - len(self._tail)].decode("ascii")
            response = response[:cut]
        else:
            decision_id = ""
        known = self._known.get(response)
        if known is None:
            known, keep = self._convert(response)
            if keep:
                if len(self._known) >= self._limit:
                    self._known.clear()  # bounded: what the responses hold varies with tokens and requests
                self._known[response] = known
        status, headers, body = known
        return status, [*headers, (DECISION_HEADER, decision_id)] if decision_id else headers, body
