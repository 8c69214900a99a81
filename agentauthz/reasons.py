"""Decision reasons: the string constants shared by decision, response and audit."""

ALLOW = "allow"

# 401: the credential itself is missing or unusable.
TOKEN_MISSING = "token_missing"
TOKEN_MALFORMED = "token_malformed"
TOKEN_TOO_LARGE = "token_too_large"
TOKEN_ALGORITHM = "token_algorithm_rejected"
TOKEN_HEADER = "token_header_rejected"
TOKEN_TYPE = "token_type_mismatch"
TOKEN_KEY_UNKNOWN = "token_key_unknown"
TOKEN_SIGNATURE = "token_signature_invalid"
TOKEN_CLAIMS = "token_claims_invalid"
TOKEN_ISSUER = "token_issuer_mismatch"
TOKEN_AUDIENCE = "token_audience_mismatch"
TOKEN_EXPIRED = "token_expired"
TOKEN_NOT_YET_VALID = "token_not_yet_valid"
TOKEN_LIFETIME = "token_lifetime_exceeded"
TOKEN_REVOKED = "token_revoked"
DELEGATION_REVOKED = "delegation_revoked"
TASK_ENDED = "task_ended"
AGENT_REVOKED = "agent_revoked"
KEY_REVOKED = "key_revoked"
# Valid, but not for this route's trust boundary or not from this sender (RFC 8705 binding).
TOKEN_BOUNDARY = "token_boundary_mismatch"
TOKEN_SENDER = "token_sender_mismatch"
TOKEN_BINDING = "token_binding_mismatch"
TOKEN_CERTIFICATE_REQUIRED = "token_certificate_required"

# The API caller's workload identity (X.509-SVID) was refused.
IDENTITY_INVALID = "identity_invalid"

# 403: a valid credential that does not cover this request.
SCOPE_DENIED = "scope_denied"
SENSITIVITY_EXCEEDED = "sensitivity_exceeded"
POLICY_DENIED = "policy_denied"
BOUNDARY_UNKNOWN = "boundary_unknown"  # the route names a boundary this daemon does not serve

# 400: the request names nothing we can decide on.
REQUEST_INVALID = "request_invalid"

# Human approval (DESIGN §4): why a gated mint or a human's decision did not go through.
APPROVAL_REQUIRED = "approval_required"        # a human must approve first (the mint answers "pending")
APPROVAL_UNKNOWN = "approval_unknown"          # no such request, or not the caller's (never says which)
APPROVAL_PENDING = "approval_pending"          # no human has decided yet
APPROVAL_REJECTED = "approval_rejected"
APPROVAL_EXPIRED = "approval_expired"
APPROVAL_DECIDED = "approval_already_decided"
APPROVAL_MISMATCH = "approval_mismatch"        # another task, or grants the human did not approve
APPROVAL_LIMIT = "approval_limit"              # too many open requests for one agent
APPROVER_INVALID = "approver_invalid"          # the human's credential was refused

# 503: the decision could be made but not recorded, so it is not made (fail closed).
AUDIT_UNAVAILABLE = "audit_unavailable"

UNAUTHENTICATED = frozenset({
    TOKEN_MISSING, TOKEN_MALFORMED, TOKEN_TOO_LARGE, TOKEN_ALGORITHM, TOKEN_HEADER,
    TOKEN_TYPE, TOKEN_KEY_UNKNOWN, TOKEN_SIGNATURE, TOKEN_CLAIMS, TOKEN_ISSUER,
    TOKEN_AUDIENCE, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, TOKEN_LIFETIME, TOKEN_REVOKED,
    DELEGATION_REVOKED, TASK_ENDED, AGENT_REVOKED, KEY_REVOKED,
    TOKEN_BOUNDARY, TOKEN_SENDER, TOKEN_BINDING, TOKEN_CERTIFICATE_REQUIRED,
})
FORBIDDEN = frozenset({SCOPE_DENIED, SENSITIVITY_EXCEEDED, POLICY_DENIED, BOUNDARY_UNKNOWN})
