"""Python client for agentauthz, sync (``Client``) and asyncio (``AsyncClient``).

    client = Client("127.0.0.1:9190", Identity.from_dir("id/"), check_server="127.0.0.1:9191")
    with client.task("summarise-inbox", ["demo:*:read"], intent="summarise") as t:
        call_tool(headers={"authorization": f"Bearer {t.token}"})
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator, Sequence

import grpc

from . import errors
from .check_wire import decode_check_response, encode_check_request
from .decision.tokens import DEFAULT_SENSITIVITY, SENSITIVITY_LEVELS
from .offline import verify_offline  # noqa: F401 (re-exported: verification without the daemon)
from .v1 import agentauthz_pb2 as pb
from .v1 import agentauthz_pb2_grpc as pb_grpc

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
RENEW_AT = 0.8  # renew a task's token when 80% of its lifetime has passed


# Each gRPC status the client can meet, as the agentauthz.errors class it raises.
_ERROR_BY_STATUS: dict[grpc.StatusCode, type[errors.DaemonError]] = {
    grpc.StatusCode.CANCELLED: errors.CallCancelled,
    grpc.StatusCode.UNKNOWN: errors.DaemonInternalError,
    grpc.StatusCode.INVALID_ARGUMENT: errors.RequestInvalid,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DaemonTimeout,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: errors.PreconditionFailed,
    grpc.StatusCode.ABORTED: errors.PreconditionFailed,
    grpc.StatusCode.OUT_OF_RANGE: errors.RequestInvalid,
    grpc.StatusCode.UNIMPLEMENTED: errors.Unimplemented,
    grpc.StatusCode.INTERNAL: errors.DaemonInternalError,
    grpc.StatusCode.UNAVAILABLE: errors.DaemonUnavailable,
    grpc.StatusCode.DATA_LOSS: errors.DaemonInternalError,
    grpc.StatusCode.UNAUTHENTICATED: errors.IdentityRefused,
}
_ERROR_BY_REASON: dict[str, type[errors.DaemonError]] = {"task_ended": errors.TaskEnded}
_REASON = re.compile(r"[a-z][a-z_]*")


def daemon_error(exc: grpc.RpcError, address: str) -> errors.DaemonError:
    """The agentauthz.errors exception for a failed call to ``address``; the daemon's "reason: message"."""
    code = exc.code() if callable(getattr(exc, "code", None)) else grpc.StatusCode.UNKNOWN
    details = (exc.details() if callable(getattr(exc, "details", None)) else None) or str(code.name)
    reason, sep, message = details.partition(": ")
    if not (sep and _REASON.fullmatch(reason)):  # not the daemon's words: gRPC's own (no connection, limits)
        reason, message = "", details
    if code == grpc.StatusCode.UNAVAILABLE and not reason and ("failed to connect" in details.lower()
                                                               or "connection refused" in details.lower()):
        return _rpc_error(errors.DaemonUnreachable)(
            f"nothing answers at {address}: is the daemon running there? (start it with `agentauthz serve`)",
            status=code, details=details)
    cls = _ERROR_BY_REASON.get(reason) or _ERROR_BY_STATUS.get(code, errors.DaemonError)
    return _rpc_error(cls)(message, reason=reason or None, status=code, details=details)


_RPC_ERRORS: dict[type[errors.DaemonError], type[errors.DaemonError]] = {}


def _rpc_error(cls: type[errors.DaemonError]) -> type[errors.DaemonError]:
    """``cls`` that is also a ``grpc.RpcError``: ``except errors.TaskEnded`` and ``except grpc.RpcError``
    both catch what the client raises, while agentauthz.errors itself never imports gRPC."""
    twin = _RPC_ERRORS.get(cls)
    if twin is None:
        twin = _RPC_ERRORS[cls] = type(cls.__name__, (cls, grpc.RpcError),
                                       {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    return twin


class _Calls:
    """A stub, or one method, whose failed calls raise agentauthz.errors instead of grpc.RpcError."""

    def __init__(self, target: Any, address: str) -> None:
        self._target, self._address = target, address

    def __getattr__(self, name: str) -> _Calls:
        return _Calls(getattr(self._target, name), self._address)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._target(*args, **kwargs)
        except grpc.RpcError as exc:
            raise daemon_error(exc, self._address) from exc


class _AsyncCalls(_Calls):
    def __getattr__(self, name: str) -> _AsyncCalls:
        return _AsyncCalls(getattr(self._target, name), self._address)

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._target(*args, **kwargs)
        except grpc.RpcError as exc:
            raise daemon_error(exc, self._address) from exc


@dataclass(frozen=True)
class Identity:
    """An X.509-SVID (leaf, key) and the trust bundle to verify the daemon with."""

    certificate: bytes
    key: bytes
    bundle: bytes

    @classmethod
    def from_dir(cls, directory: str | Path) -> Identity:
        d = Path(directory)
        return cls((d / "svid.pem").read_bytes(), (d / "svid.key").read_bytes(),
                   (d / "bundle.pem").read_bytes())

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.bundle, private_key=self.key,
                                            certificate_chain=self.certificate)


def parse_grant(text: str) -> pb.Grant:
    """``TOOL:TARGET:OPS[:SENSITIVITY]`` with comma-separated OPS, e.g. ``demo:*:read,write``."""
    parts = text.split(":")
    if len(parts) not in (3, 4) or not all(parts):
        raise ValueError(f"grant {text!r} is not TOOL:TARGET:OPS[:SENSITIVITY]")
    ops = [op for op in parts[2].split(",") if op]
    sensitivity = parts[3] if len(parts) == 4 else DEFAULT_SENSITIVITY
    # The daemon would deny an unknown level as "nothing granted": say what it is instead.
    if sensitivity not in SENSITIVITY_LEVELS:
        raise ValueError(f"grant {text!r}: sensitivity {sensitivity!r} is not one of "
                         f"{', '.join(SENSITIVITY_LEVELS)}")
    if not ops:
        raise ValueError(f"grant {text!r} names no operation (OPS is comma-separated, e.g. read,write)")
    if "*" in ops:  # the daemon refuses it too (request_invalid)
        raise ValueError(f"grant {text!r}: '*' is no operation: a token names the operations it carries "
                         "(an MCP session: session,tools/list); '*' belongs in policy rules")
    return pb.Grant(tool=parts[0], target=parts[1], operations=ops, sensitivity=sensitivity)


def _grants(grants: Sequence[str | pb.Grant]) -> list[pb.Grant]:
    return [parse_grant(g) if isinstance(g, str) else g for g in grants]


@dataclass(frozen=True)
class Decision:
    """What Check answered: allowed, the HTTP status Envoy would send, the reason, headers."""

    allowed: bool
    status: int
    reason: str
    headers: dict[str, str]
    decision_id: str


def check_request(token: str | None, tool: str, target: str, operation: str,
                  sensitivity: str = DEFAULT_SENSITIVITY, method: str = "POST", path: str = "/",
                  boundary: str = "") -> bytes:
    """The CheckRequest Envoy would send for this call, serialized; ``boundary`` as a route names it."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    extensions = {"tool": tool, "target": target, "operation": operation, "sensitivity": sensitivity}
    if boundary:
        extensions["boundary"] = boundary
    return encode_check_request(method, path, headers, extensions)


def decision_from(raw: bytes) -> Decision:
    """The Decision in a serialized CheckResponse; check_wire.CheckResponseMalformed if it is not one."""
    return Decision(*decode_check_response(raw))


class TaskToken:
    """The live token of a task; ``token`` always returns the newest one."""

    def __init__(self, minted: pb.MintResponse) -> None:
        self.minted = minted

    @property
    def token(self) -> str:
        return self.minted.token

    @property
    def token_id(self) -> str:
        return self.minted.token_id


class Client:
    """Synchronous client: mint, revoke, end task, JWKS over mTLS; Check over the Check listener."""

    def __init__(self, server: str, identity: Identity | None = None, *, check_server: str | None = None,
                 timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._api: Any = _Calls(pb_grpc.AgentAuthzStub(grpc.secure_channel(server, identity.credentials())),
                                server) if identity else None
        self._check: Any = _Calls(grpc.insecure_channel(check_server).unary_unary(CHECK_METHOD),
                                  check_server) if check_server else None

    def _stub(self) -> Any:
        """The API stub; its calls raise agentauthz.errors."""
        if self._api is None:
            raise ValueError("this client has no identity: the API needs an X.509-SVID")
        return self._api

    def mint(self, task: str, grants: Sequence[str | pb.Grant], *, intent: str = "", ttl: int = 0,
             audience: str = "", approval_id: str = "") -> pb.MintResponse:
        """A token; or, for grants a human must approve first, no token and ``pending`` set."""
        return self._stub().Mint(pb.MintRequest(task=task, intent=intent, grants=_grants(grants),
                                                ttl_seconds=ttl, audience=audience, approval_id=approval_id),
                                 timeout=self._timeout)

    def get_approval(self, approval_id: str) -> pb.ApprovalRequest:
        """The state of one of this agent's own approval requests (poll it until a human decides)."""
        return self._stub().GetApproval(pb.GetApprovalRequest(id=approval_id), timeout=self._timeout)

    def delegate(self, parent_token: str, to: str, grants: Sequence[str | pb.Grant], *, ttl: int = 0,
                 intent: str = "") -> pb.MintResponse:
        """A child token for agent ``to``, inside this agent's own ``parent_token``; same task."""
        request = pb.DelegateRequest(parent_token=parent_token, to=to, grants=_grants(grants),
                                     ttl_seconds=ttl, intent=intent)
        return self._stub().Delegate(request, timeout=self._timeout)

    def revoke(self, *, token_id: str = "", task: str = "", agent: str = "", key_id: str = "") -> int:
        request = pb.RevokeRequest(token_id=token_id or None, task=task or None, agent=agent or None,
                                   key_id=key_id or None)
        return self._stub().Revoke(request, timeout=self._timeout).revoked_at

    def end_task(self, task: str) -> int:
        return self._stub().EndTask(pb.EndTaskRequest(task=task), timeout=self._timeout).revoked_at

    def unban(self, agent: str) -> int:
        """Lift the ban ``revoke(agent=...)`` put on ``agent`` (an admin identity)."""
        return self._stub().Unban(pb.UnbanRequest(agent=agent), timeout=self._timeout).unbanned_at

    def jwks(self) -> dict[str, Any]:
        return json.loads(self._stub().GetKeys(pb.GetKeysRequest(), timeout=self._timeout).jwks_json)

    def audit_key(self) -> dict[str, Any]:
        """The audit checkpoint key as a public JWK, over the authenticated API: the one to pin."""
        return json.loads(self._stub().GetKeys(pb.GetKeysRequest(), timeout=self._timeout).audit_key_jwk)

    def check(self, token: str | None, tool: str, target: str, operation: str,
              sensitivity: str = DEFAULT_SENSITIVITY, boundary: str = "") -> Decision:
        if self._check is None:
            raise ValueError("this client has no check_server")
        raw = self._check(check_request(token, tool, target, operation, sensitivity, boundary=boundary),
                          timeout=self._timeout)
        return decision_from(raw)

    @contextlib.contextmanager
    def task(self, task: str, grants: Sequence[str | pb.Grant], *, intent: str = "", ttl: int = 0,
             audience: str = "") -> Iterator[TaskToken]:
        """Mint on entry, renew before expiry, end the task on exit, exceptions included."""
        live = TaskToken(self.mint(task, grants, intent=intent, ttl=ttl, audience=audience))
        done = threading.Event()

        def renew() -> None:
            while True:
                lifetime = live.minted.expires_at - time.time()
                if done.wait(max(lifetime * (1 - RENEW_AT), 0.05)):
                    return
                live.minted = self.mint(task, grants, intent=intent, ttl=ttl, audience=audience)

        renewer = threading.Thread(target=renew, name=f"agentauthz-renew-{task}", daemon=True)
        renewer.start()
        try:
            yield live
        finally:
            done.set()
            renewer.join()
            self.end_task(task)


class AsyncClient:
    """asyncio twin of ``Client`` on grpc.aio."""

    def __init__(self, server: str, identity: Identity | None = None, *, check_server: str | None = None,
                 timeout: float = 5.0) -> None:
        self._timeout = timeout
        self._api: Any = _AsyncCalls(pb_grpc.AgentAuthzStub(grpc.aio.secure_channel(
            server, identity.credentials())), server) if identity else None
        self._check: Any = _AsyncCalls(grpc.aio.insecure_channel(check_server).unary_unary(CHECK_METHOD),
                                       check_server) if check_server else None

    def _stub(self) -> Any:
        if self._api is None:
            raise ValueError("this client has no identity: the API needs an X.509-SVID")
        return self._api

    async def mint(self, task: str, grants: Sequence[str | pb.Grant], *, intent: str = "", ttl: int = 0,
                   audience: str = "", approval_id: str = "") -> pb.MintResponse:
        return await self._stub().Mint(pb.MintRequest(
            task=task, intent=intent, grants=_grants(grants), ttl_seconds=ttl, audience=audience,
            approval_id=approval_id), timeout=self._timeout)

    async def get_approval(self, approval_id: str) -> pb.ApprovalRequest:
        return await self._stub().GetApproval(pb.GetApprovalRequest(id=approval_id), timeout=self._timeout)

    async def end_task(self, task: str) -> int:
        return (await self._stub().EndTask(pb.EndTaskRequest(task=task), timeout=self._timeout)).revoked_at

    async def delegate(self, parent_token: str, to: str, grants: Sequence[str | pb.Grant], *, ttl: int = 0,
                       intent: str = "") -> pb.MintResponse:
        return await self._stub().Delegate(pb.DelegateRequest(
            parent_token=parent_token, to=to, grants=_grants(grants), ttl_seconds=ttl, intent=intent),
            timeout=self._timeout)

    async def revoke(self, *, token_id: str = "", task: str = "", agent: str = "", key_id: str = "") -> int:
        request = pb.RevokeRequest(token_id=token_id or None, task=task or None, agent=agent or None,
                                   key_id=key_id or None)
        return (await self._stub().Revoke(request, timeout=self._timeout)).revoked_at

    async def jwks(self) -> dict[str, Any]:
        response = await self._stub().GetKeys(pb.GetKeysRequest(), timeout=self._timeout)
        return json.loads(response.jwks_json)

    async def unban(self, agent: str) -> int:
        return (await self._stub().Unban(pb.UnbanRequest(agent=agent), timeout=self._timeout)).unbanned_at

    async def check(self, token: str | None, tool: str, target: str, operation: str,
                    sensitivity: str = DEFAULT_SENSITIVITY, boundary: str = "") -> Decision:
        if self._check is None:
            raise ValueError("this client has no check_server")
        raw = await self._check(check_request(token, tool, target, operation, sensitivity, boundary=boundary),
                                timeout=self._timeout)
        return decision_from(raw)

    @contextlib.asynccontextmanager
    async def task(self, task: str, grants: Sequence[str | pb.Grant], *, intent: str = "", ttl: int = 0,
                   audience: str = "") -> AsyncIterator[TaskToken]:
        """Mint on entry, renew before expiry, end the task on exit, exceptions included."""
        import asyncio
        live = TaskToken(await self.mint(task, grants, intent=intent, ttl=ttl, audience=audience))

        async def renew() -> None:
            while True:
                await asyncio.sleep(max((live.minted.expires_at - time.time()) * (1 - RENEW_AT), 0.05))
                live.minted = await self.mint(task, grants, intent=intent, ttl=ttl, audience=audience)

        renewer = asyncio.create_task(renew())
        try:
            yield live
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer
            await self.end_task(task)


class ApprovalsClient:
    """A human's client for the Approvals listener: server TLS checked against ``ca``, the JWT as bearer.

    It holds no workload identity: approvals never travel over an agent's credentials.
    """

    def __init__(self, server: str, credential: str, ca: bytes, *, timeout: float = 5.0) -> None:
        credentials = grpc.composite_channel_credentials(grpc.ssl_channel_credentials(root_certificates=ca),
                                                         grpc.access_token_call_credentials(credential))
        self._stub: Any = _Calls(pb_grpc.ApprovalsStub(grpc.secure_channel(server, credentials)), server)
        self._timeout = timeout

    def list(self, state: str = "pending") -> list[pb.ApprovalRequest]:
        """Requests in ``state``: pending (default), approved, rejected or expired."""
        response = self._stub.ListApprovals(pb.ListApprovalsRequest(state=state), timeout=self._timeout)
        return list(response.approvals)

    def approve(self, approval_id: str, comment: str = "") -> pb.ApprovalRequest:
        return self._decide(approval_id, True, comment)

    def reject(self, approval_id: str, comment: str = "") -> pb.ApprovalRequest:
        return self._decide(approval_id, False, comment)

    def _decide(self, approval_id: str, approve: bool, comment: str) -> pb.ApprovalRequest:
        request = pb.ApproveRequest(id=approval_id, approve=approve, comment=comment)
        return self._stub.Approve(request, timeout=self._timeout)
