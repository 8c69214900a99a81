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

# The API caller's workload identity (X.509-SVID) was refused.
IDENTITY_INVALID = "identity_invalid"

# 403: a valid credential that does not cover this request.
SCOPE_DENIED = "scope_denied"
SENSITIVITY_EXCEEDED = "sensitivity_exceeded"
POLICY_DENIED = "policy_denied"

# 400: the request names nothing we can decide on.
REQUEST_INVALID = "request_invalid"

# 503: the decision could be made but not recorded, so it is not made (fail closed).
AUDIT_UNAVAILABLE = "audit_unavailable"

UNAUTHENTICATED = frozenset({
    TOKEN_MISSING, TOKEN_MALFORMED, TOKEN_TOO_LARGE, TOKEN_ALGORITHM, TOKEN_HEADER,
    TOKEN_TYPE, TOKEN_KEY_UNKNOWN, TOKEN_SIGNATURE, TOKEN_CLAIMS, TOKEN_ISSUER,
    TOKEN_AUDIENCE, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, TOKEN_LIFETIME, TOKEN_REVOKED,
    DELEGATION_REVOKED, TASK_ENDED, AGENT_REVOKED, KEY_REVOKED,
})
FORBIDDEN = frozenset({SCOPE_DENIED, SENSITIVITY_EXCEEDED, POLICY_DENIED})
