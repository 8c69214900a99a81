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

# Delegation (DESIGN §4): why a child token was not issued. A parent token that is not live
# refuses with its own token_*/revocation reason.
DELEGATION_NOT_HOLDER = "delegation_not_holder"          # the caller is not the parent token's sub
DELEGATION_EXCEEDS_PARENT = "delegation_exceeds_parent"  # a child grant fits inside no parent grant
DELEGATION_DEPTH = "delegation_depth_exceeded"           # the chain would be longer than policy allows
DELEGATION_POLICY_DENIED = "delegation_policy_denied"    # policy would not give the child agent a grant
# An agent revoked by an admin (or by itself) is banned: it mints nothing, delegates nothing and is
# delegated nothing until an admin lifts the ban (``agentauthz unban``).
AGENT_BANNED = "agent_banned"
AGENT_NOT_BANNED = "agent_not_banned"  # unban of an agent that is not banned

# 503: the decision could be made but not recorded, so it is not made (fail closed).
AUDIT_UNAVAILABLE = "audit_unavailable"
# 503: a fault inside the daemon (an exception on the Check path): denied, recorded, logged server-side.
INTERNAL_ERROR = "internal_error"
# 503, cluster mode: this node has not heard from the shared revocation stream for max_staleness, so a
# revocation acknowledged elsewhere might not have reached it; it denies until it has caught up.
REVOCATION_STALE = "revocation_stale"
# Check over mTLS from a client certificate that is not one of ``check_clients``: answered, never decided.
CHECK_CLIENT_REFUSED = "check_client_refused"

UNAUTHENTICATED = frozenset({
    TOKEN_MISSING, TOKEN_MALFORMED, TOKEN_TOO_LARGE, TOKEN_ALGORITHM, TOKEN_HEADER,
    TOKEN_TYPE, TOKEN_KEY_UNKNOWN, TOKEN_SIGNATURE, TOKEN_CLAIMS, TOKEN_ISSUER,
    TOKEN_AUDIENCE, TOKEN_EXPIRED, TOKEN_NOT_YET_VALID, TOKEN_LIFETIME, TOKEN_REVOKED,
    DELEGATION_REVOKED, TASK_ENDED, AGENT_REVOKED, KEY_REVOKED,
    TOKEN_BOUNDARY, TOKEN_SENDER, TOKEN_BINDING, TOKEN_CERTIFICATE_REQUIRED,
})
FORBIDDEN = frozenset({SCOPE_DENIED, SENSITIVITY_EXCEEDED, POLICY_DENIED, BOUNDARY_UNKNOWN})
# The token itself did not verify (or was never looked at): a denial for any other reason knows
# whose token it was, and its audit record says so.
UNVERIFIED = frozenset({
    TOKEN_MISSING, TOKEN_MALFORMED, TOKEN_TOO_LARGE, TOKEN_ALGORITHM, TOKEN_HEADER, TOKEN_TYPE,
    TOKEN_KEY_UNKNOWN, TOKEN_SIGNATURE, TOKEN_CLAIMS, TOKEN_ISSUER, TOKEN_AUDIENCE, TOKEN_EXPIRED,
    TOKEN_NOT_YET_VALID, TOKEN_LIFETIME, TOKEN_BOUNDARY, BOUNDARY_UNKNOWN,
})

# Offline verification (agentauthz.offline): the Token Status List itself was refused, so no
# token's status can be known from it.
STATUS_LIST_INVALID = "status_list_invalid"  # unsigned by a known key, mistyped, malformed, undecodable
STATUS_LIST_EXPIRED = "status_list_expired"  # past its exp or its ttl: fetch a fresh one
STATUS_LIST_MISMATCH = "status_list_mismatch"  # its sub is not the uri the token names
STATUS_LIST_TOO_LARGE = "status_list_too_large"  # inflates past the cap (a zlib bomb is never inflated)
STATUS_LIST_TOO_SHORT = "status_list_too_short"  # the token's idx lies beyond the list
JWKS_INVALID = "jwks_invalid"

# MCP tool calls (mcp.py): 400, the body names nothing we can decide on; never guessed at.
MCP_BODY_INVALID = "mcp_body_invalid"  # not strict JSON, not one JSON-RPC 2.0 request we understand
MCP_BATCH_REFUSED = "mcp_batch_refused"  # a JSON-RPC batch: one call, one decision
MCP_BODY_TOO_LARGE = "mcp_body_too_large"
MCP_BODY_TRUNCATED = "mcp_body_truncated"  # Envoy sent part of the body (x-envoy-auth-partial-body)
MCP_REFUSED = frozenset({MCP_BODY_INVALID, MCP_BATCH_REFUSED, MCP_BODY_TOO_LARGE, MCP_BODY_TRUNCATED})
# Argument constraints (constraints.py): 403, no grant covering the call has all its constraints hold.
ARGUMENTS_UNAVAILABLE = "arguments_unavailable"  # the grant constrains arguments; this request has none
ARGUMENT_MISSING = "argument_missing"
ARGUMENT_TYPE = "argument_type_invalid"
ARGUMENT_PATH_UNSAFE = "argument_path_unsafe"  # '..', NUL, '%', '\\' or lookalikes: refused, not normalised
ARGUMENT_OUTSIDE_PREFIX = "argument_outside_prefix"
ARGUMENT_NOT_ALLOWED = "argument_not_allowed"
ARGUMENT_ABOVE_MAX = "argument_above_max"
# Task budgets (authority/budgets.py).
BUDGET_EXHAUSTED = "budget_exhausted"  # 403: the task has made all the calls the grant allows
RATE_LIMITED = "rate_limited"  # 429 with Retry-After
BUDGET_TABLE_FULL = "budget_table_full"  # 503: no room to count this task's calls, so none is made
# 403: this agent holds as many live budget counters (tools x windows) as one agent may; the others' stay
BUDGET_AGENT_LIMIT = "budget_agent_limit"
BUDGET_UNAVAILABLE = "budget_unavailable"  # 503: this process has no budget table
CONSTRAINT_DENIED = frozenset({
    ARGUMENTS_UNAVAILABLE, ARGUMENT_MISSING, ARGUMENT_TYPE, ARGUMENT_PATH_UNSAFE, ARGUMENT_OUTSIDE_PREFIX,
    ARGUMENT_NOT_ALLOWED, ARGUMENT_ABOVE_MAX, BUDGET_EXHAUSTED,
})
# Denials that name one argument: its record says which, and its value redacted (audit/records.py).
ARGUMENT_REFUSED = frozenset({
    ARGUMENT_MISSING, ARGUMENT_TYPE, ARGUMENT_PATH_UNSAFE, ARGUMENT_OUTSIDE_PREFIX, ARGUMENT_NOT_ALLOWED,
    ARGUMENT_ABOVE_MAX,
})
