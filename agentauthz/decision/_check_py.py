"""The common Check in one call: the pure-Python twin of ``native/_check_c.pyx``.

``WarmAllow`` answers the request most Checks are: a bearer token, a route
naming tool, target, operation and sensitivity, a path in normal form, no peer
to match, no MCP body, an unconstrained token. It decides, writes the allow's audit record and returns
the response bytes; the first allow of a token for a request also builds what
the next ones reuse (``CheckService._first_allow``).
Anything else it hands to ``CheckService``'s full path, with the decision if it
made one, so no request is decided twice. It must never answer what the full
path would answer differently (``tests/test_warm_allow.py`` holds both to that).
"""

from __future__ import annotations

import bisect
import itertools
import re
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from google.rpc import code_pb2, status_pb2

from .. import reasons
from ..errors import AuditUnavailable
from .mcp import EXTENSION

# A process's random 64-bit prefix and a 64-bit counter, 16 hex digits each: a decision id is unique
# across workers, restarts and replicas (the audit log joins on it), and fixed in width (spliced).
PREFIX_CHARS = 16
DECISION_ID_CHARS = 2 * PREFIX_CHARS
HEADER_AGENT = "x-agentauthz-agent"
HEADER_TASK = "x-agentauthz-task"
HEADER_TOKEN_ID = "x-agentauthz-token-id"

# A path (before its query) the upstream could resolve to another tool or target than the route
# names: dot segments, empty segments, percent-encoding, backslashes, path parameters, fragments
# (CVE-2019-9901: Envoy forwards the path as sent unless normalize_path is on). Refused on every
# route; ``.match`` from the start, one scan that stops at the query.
ABNORMAL_PATH = re.compile(r"[^?]*?(?:[%\\;#]|//|/\.\.?(?:[/?]|\Z))")


def header_option(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)


def allow_response(agent: str, task: str, token_id: str) -> bytes:
    """The serialized CheckResponse allowing a token's request: its agent, task and id in headers for
    the tool, and the bearer stripped, since the tool never sees the credential (DESIGN §3). Built
    once per token (``CheckService._first_allow``); the native twin writes these bytes by hand."""
    return ext_authz.CheckResponse(
        status=status_pb2.Status(code=code_pb2.OK),
        ok_response=ext_authz.OkHttpResponse(
            headers=[header_option(HEADER_AGENT, agent), header_option(HEADER_TASK, task),
                     header_option(HEADER_TOKEN_ID, token_id)],
            headers_to_remove=["authorization"]),
    ).SerializeToString()


class DecisionIds:
    """Fixed-width decision ids, unique per ``prefix``, spliced into pre-built metadata bytes.

    ``head`` and ``tail`` are a serialized CheckResponse ``dynamic_metadata`` field around the id
    (``extauthz.DecisionIds``); protobuf merges concatenated fields into one message.
    """

    def __init__(self, prefix: str, head: bytes, tail: bytes) -> None:
        if len(prefix) != PREFIX_CHARS or not all(c in "0123456789abcdef" for c in prefix):
            raise ValueError(f"a decision id prefix is {PREFIX_CHARS} lowercase hex digits: {prefix!r}")
        self._prefix, self._head, self._tail = prefix, head, tail
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter) & 0xFFFFFFFFFFFFFFFF:016x}"

    def metadata(self, decision_id: str) -> bytes:
        """``dynamic_metadata`` naming ``decision_id``, as serialized CheckResponse bytes."""
        return self._head + decision_id.encode("ascii") + self._tail


class SteadyClock:
    """``state.clock``'s clock, the wall clock that never runs backwards: its common case, read on
    every Check (the wall clock at or past its last reading), in one call; the rest is ``stepped``'s
    (``state.clock.stepped``), with this clock's ``lock``, ``last``, ``last_mono`` and ``behind``."""

    __slots__ = ("_wall", "_monotonic", "_stepped", "lock", "last", "last_mono", "behind")

    def __init__(self, wall: Callable[[], float], monotonic: Callable[[], float],
                 stepped: Callable[[Any, float, float], float]) -> None:
        self._wall, self._monotonic, self._stepped = wall, monotonic, stepped
        self.lock = threading.Lock()  # readers on every thread: the request loop, writer, rotation
        self.last, self.last_mono = wall(), monotonic()
        self.behind = False  # for logging once per step back

    def __call__(self) -> float:
        wall, mono = self._wall(), self._monotonic()
        if wall >= self.last and not self.behind:
            # No lock: racing readers may store each other's (wall, mono) pair a few microseconds
            # apart; a step back is still measured from there.
            self.last, self.last_mono = wall, mono
            return wall
        return self._stepped(self, wall, mono)


class Latency:
    """A Check latency histogram counted into ``counts`` (unsigned 64-bit: one counter per bucket of
    ``bounds_ns``, then +Inf, then the sum in ns), with one clock read at each end of a Check."""

    def __init__(self, counts: memoryview, bounds_ns: tuple[int, ...]) -> None:
        if len(counts) != len(bounds_ns) + 2 or list(bounds_ns) != sorted(bounds_ns):
            raise ValueError("Latency takes ascending bounds and a counter per bucket, +Inf and the sum")
        self._counts, self._bounds, self._sum = counts, bounds_ns, len(bounds_ns) + 1
        self.now = time.perf_counter  # the start of a Check, for observe

    def observe(self, started: float) -> None:
        """Count one Check that started at ``now()``: in the first bucket whose bound it is within."""
        elapsed = max(0, int((time.perf_counter() - started) * 1e9))
        self._counts[bisect.bisect_left(self._bounds, elapsed)] += 1
        self._counts[self._sum] += elapsed


class WarmAllow:
    """See the module docstring. ``__call__`` returns the response bytes, or ``(reason, entry)``
    when it decided but the full path must answer, or None when it did not decide."""

    def __init__(self, verifiers: Mapping[str, Any], policy: Callable[[], Any], audit: Any,
                 ids: DecisionIds, prepared: Mapping[tuple[Any, ...], str], clock: Callable[[], float],
                 unrecorded: bytes, decisions: Any, first_allow: Callable[..., str],
                 allowed: memoryview | None = None, latency: Latency | None = None) -> None:
        self._verifiers = dict(verifiers)
        self._default, self._default_verifier = next(iter(self._verifiers.items()))
        self._policy = policy
        self._policy_seen: Any = None
        self._binding: frozenset[str] = frozenset()  # boundaries of _policy_seen that require binding
        self._write_allow, self._ids, self._prepared, self._clock = audit.write_allow, ids, prepared, clock
        self._unrecorded = unrecorded  # the audit_unavailable denial, without its decision id
        self._decisions = decisions  # reason -> count (a Counter), for the rare outcomes
        # The allows answered here, in one unsigned 64-bit counter (a row of metrics.MeterTable: shared
        # with the primary, which reads it for /metrics); the full path counts its own.
        self._allowed = allowed if allowed is not None else memoryview(bytearray(8)).cast("Q")
        self._latency = latency  # times the Checks answered here; None: untimed
        # When the last call began (Latency.now's clock): the full path times from there what it answers.
        self.started = 0.0
        # (entry, tool, target, operation, sensitivity) -> the record's shared members, after building
        # them and entry.attachment, the response: the first allow of a token for a request
        self._first_allow = first_allow

    def __call__(self, fields: tuple[Any, ...]) -> bytes | tuple[str, Any] | None:
        self.started = time.perf_counter()
        authorization, request_id, _, path, extensions, principal, certificate, _ = fields
        # A peer to match against the token, or an MCP body to read: only the full path does that.
        if principal or certificate or EXTENSION in extensions:
            return None
        if ABNORMAL_PATH.match(path):
            return None  # the full path refuses it (extauthz.request_fields)
        if authorization is None or authorization[:7] not in ("Bearer ", "bearer "):
            return None
        token = authorization[7:]
        if not token or " " in token:
            return None
        tool = extensions.get("tool")
        target = extensions.get("target")
        operation = extensions.get("operation")
        sensitivity = extensions.get("sensitivity")
        if tool is None or target is None or not operation or not sensitivity:
            return None  # the policy's request defaults fill in the rest: the full path
        boundary = extensions.get("boundary")
        if boundary:
            verifier = self._verifiers.get(boundary)
            if verifier is None:
                return None
        else:
            boundary, verifier = self._default, self._default_verifier
        policy = self._policy()
        if policy is not self._policy_seen:
            self._binding = frozenset(name for name, b in policy.boundaries.items()
                                      if b.require_certificate_binding)
            self._policy_seen = policy
        if boundary in self._binding:
            return None  # a token bound to no certificate needs a peer here: the full path says so
        now = self._clock()
        reason, entry = verifier.decide(token, tool, target, operation, sensitivity, now)
        # Constraints (the token's, or the policy's: then the decision is not ALLOW) are the full path's.
        if entry is None or entry.constrained or reason is not reasons.ALLOW:
            return reason, entry
        prepared = self._prepared.get((reason, entry.jti, tool, target, operation, sensitivity))
        body = entry.attachment
        if prepared is None or body is None:
            prepared = self._first_allow(entry, tool, target, operation, sensitivity)
            body = entry.attachment
        if body.__class__ is not bytes:
            return reason, entry
        decision_id = self._ids.next()
        try:
            # Declined when the log is not healthy too: the full path then answers audit_unavailable.
            if not self._write_allow(decision_id, request_id, prepared, now):
                return reason, entry  # the full path waits for the writer (record_check_durable)
        except AuditUnavailable:  # written nowhere, and withdrawn in the log under this decision id
            self._decisions[reasons.AUDIT_UNAVAILABLE] += 1
            response = self._unrecorded + self._ids.metadata(decision_id)
        else:
            self._allowed[0] += 1
            response = body + self._ids.metadata(decision_id)
        if self._latency is not None:
            self._latency.observe(self.started)
        return response

    @property
    def allowed(self) -> int:
        return self._allowed[0]  # type: ignore[no-any-return]

