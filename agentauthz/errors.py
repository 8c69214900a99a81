"""One exception hierarchy for the package; the native modules raise these same classes."""

from __future__ import annotations

from typing import Any

from . import reasons

# Why the API refuses a mint, a delegation or a revocation (``authority.outcomes.Refused``). Not in
# reasons.py: every constant there is a Check reason with its own counter in audit/metrics.py.
NOT_PERMITTED = "not_permitted"
NOTHING_GRANTED = "nothing_granted"
NEEDS_APPROVAL = "approval_required"
UNKNOWN_TOKEN_ID = "unknown_token_id"


class AgentAuthzError(Exception):
    """Base class of every error agentauthz raises on purpose."""

    reason = "error"


class TokenError(AgentAuthzError):
    """A token was refused; ``reason`` says why, in the shared vocabulary."""

    reason = reasons.TOKEN_MALFORMED


class TokenMalformed(TokenError):
    reason = reasons.TOKEN_MALFORMED


class TokenTooLarge(TokenError):
    reason = reasons.TOKEN_TOO_LARGE


class TokenAlgorithmRejected(TokenError):
    reason = reasons.TOKEN_ALGORITHM


class TokenHeaderRejected(TokenError):
    reason = reasons.TOKEN_HEADER


class TokenTypeMismatch(TokenError):
    reason = reasons.TOKEN_TYPE


class TokenKeyUnknown(TokenError):
    reason = reasons.TOKEN_KEY_UNKNOWN


class TokenSignatureInvalid(TokenError):
    reason = reasons.TOKEN_SIGNATURE


class TokenClaimsInvalid(TokenError):
    reason = reasons.TOKEN_CLAIMS


class TokenIssuerMismatch(TokenError):
    reason = reasons.TOKEN_ISSUER


class TokenAudienceMismatch(TokenError):
    reason = reasons.TOKEN_AUDIENCE


class TokenExpired(TokenError):
    reason = reasons.TOKEN_EXPIRED


class TokenNotYetValid(TokenError):
    reason = reasons.TOKEN_NOT_YET_VALID


class TokenLifetimeExceeded(TokenError):
    reason = reasons.TOKEN_LIFETIME


class ConfigError(AgentAuthzError):
    """The configuration is invalid; nothing was started."""

    reason = "config_invalid"


class PolicyError(AgentAuthzError):
    """A policy file was refused; the previous policy (if any) stays in force."""

    reason = "policy_invalid"

    def __init__(self, message: str, *, file: str | None = None, rule: str | None = None):
        self.file = file
        self.rule = rule
        where = ":".join(p for p in (file, f"rule {rule}" if rule else None) if p)
        super().__init__(f"{where}: {message}" if where else message)


class StateError(AgentAuthzError):
    """Persistent state (keys, journal) is unreadable or inconsistent; refuse to start."""

    reason = "state_invalid"


class CapacityExhausted(AgentAuthzError):
    """No revocation slot is free: minting must wait until old tokens expire."""

    reason = "capacity_exhausted"


class AuditUnavailable(AgentAuthzError):
    """The audit log cannot take another record; the caller must fail closed."""

    reason = "audit_unavailable"


class ClusterUnavailable(AgentAuthzError):
    """Cluster mode: the shared engine (Redis) did not take the change, so nothing was acknowledged."""

    reason = "cluster_unavailable"


class TokenRevoked(TokenError):
    """Offline: the token's own bit is set in the status list (revoked, its task ended, its agent revoked)."""

    reason = reasons.TOKEN_REVOKED


class DelegationRevoked(TokenError):
    """Offline: the bit of an ancestor in the token's delegation chain (``act``) is set."""

    reason = reasons.DELEGATION_REVOKED


class KeySetInvalid(AgentAuthzError):
    """A JWKS handed to the offline verifier is malformed or carries private key material."""

    reason = reasons.JWKS_INVALID


class StatusListError(AgentAuthzError):
    """The Token Status List was refused; a token's status cannot be known from it (fail closed)."""

    reason = reasons.STATUS_LIST_INVALID


class StatusListInvalid(StatusListError):
    reason = reasons.STATUS_LIST_INVALID


class StatusListExpired(StatusListError):
    reason = reasons.STATUS_LIST_EXPIRED


class StatusListMismatch(StatusListError):
    reason = reasons.STATUS_LIST_MISMATCH


class StatusListTooLarge(StatusListError):
    reason = reasons.STATUS_LIST_TOO_LARGE


class StatusListTooShort(StatusListError):
    reason = reasons.STATUS_LIST_TOO_SHORT


class DaemonError(AgentAuthzError):
    """A call the daemon refused or could not take: ``reason`` is the daemon's own, ``status`` the gRPC code.

    The client raises it as a ``grpc.RpcError`` too (``code()``, ``details()``; see ``client.daemon_error``),
    so code written against the raw stubs keeps working. This module stays free of gRPC: the decision
    side imports it and never gRPC (DESIGN §1).
    """

    reason = "daemon_error"

    def __init__(self, message: str, *, reason: str | None = None, status: Any = None,
                 details: str = "") -> None:
        super().__init__(message)
        if reason:
            self.reason = reason
        self.status = status  # a grpc.StatusCode, when the client raised it
        self._details = details

    def code(self) -> Any:
        return self.status

    def details(self) -> str:
        return self._details


class RequestInvalid(DaemonError):
    """The daemon found the request malformed (INVALID_ARGUMENT, OUT_OF_RANGE)."""

    reason = reasons.REQUEST_INVALID


class IdentityRefused(DaemonError):
    """The caller's workload identity was refused (UNAUTHENTICATED)."""

    reason = reasons.IDENTITY_INVALID


class PermissionDenied(DaemonError):
    """Policy, or the caller's role, does not allow this (PERMISSION_DENIED)."""

    reason = "not_permitted"


class NotFound(DaemonError):
    """No such approval request, or not the caller's (NOT_FOUND)."""

    reason = reasons.APPROVAL_UNKNOWN


class AlreadyExists(DaemonError):
    reason = "already_exists"


class PreconditionFailed(DaemonError):
    """The request cannot be taken in the state things are in (FAILED_PRECONDITION, ABORTED)."""

    reason = "precondition_failed"


class TaskEnded(PreconditionFailed):
    """The task name was used and ended: task names are single-use per agent, start a new one."""

    reason = reasons.TASK_ENDED


class ResourceExhausted(DaemonError):
    """A limit was reached (RESOURCE_EXHAUSTED): too many open approvals, a message too large."""

    reason = "resource_exhausted"


class DaemonUnavailable(DaemonError):
    """The daemon cannot take the call now (UNAVAILABLE): its audit log or capacity, or the connection."""

    reason = "daemon_unavailable"


class DaemonUnreachable(DaemonUnavailable):
    """Nothing answers at the daemon's address: it is not running, or it listens elsewhere."""

    reason = "daemon_unreachable"


class DaemonTimeout(DaemonError):
    """No answer within the client's timeout (DEADLINE_EXCEEDED)."""

    reason = "daemon_timeout"


class CallCancelled(DaemonError):
    reason = "cancelled"


class Unimplemented(DaemonError):
    """The server lacks this method: not an agentauthz daemon, or the wrong listener (UNIMPLEMENTED)."""

    reason = "unimplemented"


class DaemonInternalError(DaemonError):
    """The daemon failed inside (UNKNOWN, INTERNAL, DATA_LOSS); its log says more."""

    reason = reasons.INTERNAL_ERROR
