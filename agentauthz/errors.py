"""One exception hierarchy for the package; the native modules raise these same classes."""

from __future__ import annotations

from . import reasons


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
