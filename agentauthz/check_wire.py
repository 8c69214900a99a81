"""The ext_authz CheckRequest the client sends and the CheckResponse it reads, in protobuf wire format.

Written by hand so the client needs no Envoy protos (xds-protos): an agent runtime importing
``agentauthz.client`` pulls in grpcio, protobuf, cryptography and PyNaCl, nothing of the daemon's.
tests/test_check_wire.py holds both directions to the protobuf runtime on Envoy's own messages.
The fields, from envoy/service/auth/v3 (CheckRequest, CheckResponse, AttributeContext), envoy/config/
core/v3 (HeaderValueOption), envoy/type/v3 (HttpStatus), google/rpc (Status), google/protobuf (Struct).
"""

from __future__ import annotations

import json
from typing import Any, Iterator, NamedTuple

from .errors import AgentAuthzError

VARINT, I64, LEN, I32 = 0, 1, 2, 5


class CheckResponseMalformed(AgentAuthzError, ValueError):
    """The Check listener's answer is not a CheckResponse this client can read: no decision is assumed."""

    reason = "check_response_malformed"


class Answer(NamedTuple):
    """The fields of a CheckResponse a client decision reads."""

    allowed: bool
    status: int
    reason: str
    headers: dict[str, str]
    decision_id: str


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _len(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | LEN) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    """A proto3 string field: absent when empty, as protobuf writes it."""
    return _len(number, text.encode()) if text else b""


def _map(number: int, entries: dict[str, str]) -> bytes:
    """A map<string, string> field in protobuf's deterministic order (by key); entries write key and value."""
    return b"".join(_len(number, _len(1, key.encode()) + _len(2, value.encode()))
                    for key, value in sorted(entries.items()))


def encode_check_request(method: str, path: str, headers: dict[str, str],
                         extensions: dict[str, str]) -> bytes:
    """CheckRequest{attributes{request{http{method, headers, path}}, context_extensions}}."""
    http = _string(2, method) + _map(3, headers) + _string(4, path)  # HttpRequest fields
    attributes = _len(4, _len(2, http)) + _map(10, extensions)  # AttributeContext: request 4 {http 2}, 10
    return _len(1, attributes)  # CheckRequest.attributes


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """(number, wire type, value) of each field: an int for a varint, the bytes otherwise."""
    i, end = 0, len(data)

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while i < end and shift < 70:
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7
        raise CheckResponseMalformed("a varint is truncated or too long")

    while i < end:
        key = varint()
        number, wire = key >> 3, key & 7
        if number == 0 or number > 536870911:
            raise CheckResponseMalformed(f"field number {number} is out of range")
        if wire == VARINT:
            yield number, wire, varint()
            continue
        size = {I64: 8, I32: 4}.get(wire)
        if size is None:
            if wire != LEN:
                raise CheckResponseMalformed(f"wire type {wire} is not used by a CheckResponse")
            size = varint()
        if size > end - i:
            raise CheckResponseMalformed(f"field {number} is truncated")
        yield number, wire, data[i:i + size]
        i += size


class _Message:
    """One message's fields in wire order; a field of the wrong wire type is unknown to it, as to protobuf."""

    def __init__(self, data: bytes) -> None:
        self.items = list(_fields(data))

    def _values(self, number: int, wire: int) -> list[Any]:
        return [value for n, w, value in self.items if n == number and w == wire]

    def has(self, number: int) -> bool:
        return bool(self._values(number, LEN))

    def message(self, number: int) -> _Message:
        """A singular message field: its occurrences merge, which is parsing them concatenated."""
        return _Message(b"".join(self._values(number, LEN)))

    def messages(self, number: int) -> list[_Message]:
        return [_Message(value) for value in self._values(number, LEN)]

    def string(self, number: int) -> str:
        values = self._values(number, LEN)
        try:
            return values[-1].decode() if values else ""
        except UnicodeDecodeError:
            raise CheckResponseMalformed(f"string field {number} is not UTF-8") from None

    def int32(self, number: int) -> int:
        values = self._values(number, VARINT)
        value = values[-1] & 0xFFFFFFFF if values else 0
        return value - (1 << 32) if value >> 31 else value

    def oneof(self, members: dict[int, int]) -> tuple[int, list[Any]]:
        """The member of a oneof (number -> wire type) that is set, 0 if none, and its values.

        The member written last is set; a message member merges only the occurrences since the oneof
        last switched to it (protobuf clears a oneof when another member arrives).
        """
        number = 0
        values: list[Any] = []
        for n, w, value in self.items:
            if members.get(n) == w:
                if n != number:
                    number, values = n, []
                values.append(value)
        return number, values


def _headers(options: list[_Message]) -> dict[str, str]:
    """HeaderValueOption (header 1: HeaderValue key 1, value 2) list as a dict; a later key wins."""
    headers: dict[str, str] = {}
    for option in options:
        header = option.message(1)
        headers[header.string(1)] = header.string(2)
    return headers


# google.protobuf.Value.kind: null 1, number 2, string 3, bool 4, struct 5, list 6.
_VALUE_KIND = {1: VARINT, 2: I64, 3: LEN, 4: VARINT, 5: LEN, 6: LEN}


def _decision_id(metadata: _Message) -> str:
    """Struct.fields["decision_id"].string_value: the last map entry for the key, if its Value is a string."""
    value = None
    for entry in metadata.messages(1):
        if entry.string(1) == "decision_id":
            value = entry.message(2)
    if value is None:
        return ""
    kind, strings = value.oneof(_VALUE_KIND)
    try:
        return strings[-1].decode() if kind == 3 else ""
    except UnicodeDecodeError:
        raise CheckResponseMalformed("the decision id is not UTF-8") from None


def decode_check_response(raw: bytes) -> Answer:
    """The decision in a serialized CheckResponse: status 1, denied_response 2, ok_response 3, metadata 4."""
    response = _Message(raw)
    status = response.message(1)  # google.rpc.Status: code 1, message 2
    decision_id = _decision_id(response.message(4))
    # http_response is a oneof: denied_response 2 (DeniedHttpResponse) or ok_response 3 (OkHttpResponse).
    kind, values = response.oneof({2: LEN, 3: LEN})
    chosen = _Message(b"".join(values))
    if kind == 3 or (response.has(1) and status.int32(1) == 0):
        return Answer(True, 200, "allow", _headers(chosen.messages(2)) if kind == 3 else {}, decision_id)
    denied = chosen if kind == 2 else _Message(b"")  # status 1 (HttpStatus: code 1), headers 2, body 3
    body = denied.string(3)
    reason: Any = status.string(2)
    if body:
        try:
            reason = json.loads(body)["error"]
            if isinstance(reason, dict):  # an MCP route's JSON-RPC error: the reason is in its data
                reason = reason["data"]["reason"]
        except (ValueError, TypeError, KeyError):
            reason = None
        if not isinstance(reason, str):
            raise CheckResponseMalformed('a denial\'s body is not {"error": reason}, nor a JSON-RPC error '
                                         'whose data names the reason')
    return Answer(False, denied.message(1).int32(1), reason, _headers(denied.messages(2)), decision_id)
