from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Grant(_message.Message):
    __slots__ = ("tool", "target", "operations", "sensitivity", "arguments", "budget", "other_budgets")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    OTHER_BUDGETS_FIELD_NUMBER: _ClassVar[int]
    tool: str
    target: str
    operations: _containers.RepeatedScalarFieldContainer[str]
    sensitivity: str
    arguments: _containers.RepeatedCompositeFieldContainer[ArgumentConstraint]
    budget: Budget
    other_budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    def __init__(self, tool: _Optional[str] = ..., target: _Optional[str] = ..., operations: _Optional[_Iterable[str]] = ..., sensitivity: _Optional[str] = ..., arguments: _Optional[_Iterable[_Union[ArgumentConstraint, _Mapping]]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., other_budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ...) -> None: ...

class ArgumentConstraint(_message.Message):
    __slots__ = ("name", "prefix", "one_of", "max", "required")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    ONE_OF_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    name: str
    prefix: str
    one_of: _containers.RepeatedScalarFieldContainer[str]
    max: float
    required: bool
    def __init__(self, name: _Optional[str] = ..., prefix: _Optional[str] = ..., one_of: _Optional[_Iterable[str]] = ..., max: _Optional[float] = ..., required: _Optional[bool] = ...) -> None: ...

class Budget(_message.Message):
    __slots__ = ("max_calls", "rate_per_second", "burst", "window")
    MAX_CALLS_FIELD_NUMBER: _ClassVar[int]
    RATE_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    BURST_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    max_calls: int
    rate_per_second: float
    burst: int
    window: int
    def __init__(self, max_calls: _Optional[int] = ..., rate_per_second: _Optional[float] = ..., burst: _Optional[int] = ..., window: _Optional[int] = ...) -> None: ...

class ApprovalRequest(_message.Message):
    __slots__ = ("id", "agent", "task", "intent", "grants", "expires_at", "state", "approver", "decided_at", "comment")
    ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    agent: str
    task: str
    intent: str
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    expires_at: int
    state: str
    approver: str
    decided_at: int
    comment: str
    def __init__(self, id: _Optional[str] = ..., agent: _Optional[str] = ..., task: _Optional[str] = ..., intent: _Optional[str] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., expires_at: _Optional[int] = ..., state: _Optional[str] = ..., approver: _Optional[str] = ..., decided_at: _Optional[int] = ..., comment: _Optional[str] = ...) -> None: ...

class MintRequest(_message.Message):
    __slots__ = ("task", "intent", "grants", "ttl_seconds", "audience", "approval_id")
    TASK_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    task: str
    intent: str
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    ttl_seconds: int
    audience: str
    approval_id: str
    def __init__(self, task: _Optional[str] = ..., intent: _Optional[str] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., ttl_seconds: _Optional[int] = ..., audience: _Optional[str] = ..., approval_id: _Optional[str] = ...) -> None: ...

class MintResponse(_message.Message):
    __slots__ = ("token", "token_id", "expires_at", "grants", "task", "agent", "key_id", "denied", "needs_approval", "pending", "approver")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    NEEDS_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    PENDING_FIELD_NUMBER: _ClassVar[int]
    APPROVER_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    expires_at: int
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    task: str
    agent: str
    key_id: str
    denied: _containers.RepeatedCompositeFieldContainer[Grant]
    needs_approval: _containers.RepeatedCompositeFieldContainer[Grant]
    pending: ApprovalRequest
    approver: str
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., task: _Optional[str] = ..., agent: _Optional[str] = ..., key_id: _Optional[str] = ..., denied: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., needs_approval: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., pending: _Optional[_Union[ApprovalRequest, _Mapping]] = ..., approver: _Optional[str] = ...) -> None: ...

class DelegateRequest(_message.Message):
    __slots__ = ("parent_token", "to", "grants", "ttl_seconds", "intent")
    PARENT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TO_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    parent_token: str
    to: str
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    ttl_seconds: int
    intent: str
    def __init__(self, parent_token: _Optional[str] = ..., to: _Optional[str] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., ttl_seconds: _Optional[int] = ..., intent: _Optional[str] = ...) -> None: ...

class GetApprovalRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListApprovalsRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals",)
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[ApprovalRequest]
    def __init__(self, approvals: _Optional[_Iterable[_Union[ApprovalRequest, _Mapping]]] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("id", "approve", "comment")
    ID_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    id: str
    approve: bool
    comment: str
    def __init__(self, id: _Optional[str] = ..., approve: _Optional[bool] = ..., comment: _Optional[str] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("token_id", "task", "agent", "key_id")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    token_id: str
    task: str
    agent: str
    key_id: str
    def __init__(self, token_id: _Optional[str] = ..., task: _Optional[str] = ..., agent: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revoked_at",)
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    revoked_at: int
    def __init__(self, revoked_at: _Optional[int] = ...) -> None: ...

class UnbanRequest(_message.Message):
    __slots__ = ("agent",)
    AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: str
    def __init__(self, agent: _Optional[str] = ...) -> None: ...

class UnbanResponse(_message.Message):
    __slots__ = ("unbanned_at",)
    UNBANNED_AT_FIELD_NUMBER: _ClassVar[int]
    unbanned_at: int
    def __init__(self, unbanned_at: _Optional[int] = ...) -> None: ...

class EndTaskRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class GetKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetKeysResponse(_message.Message):
    __slots__ = ("jwks_json", "audit_key_jwk")
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    AUDIT_KEY_JWK_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    audit_key_jwk: str
    def __init__(self, jwks_json: _Optional[str] = ..., audit_key_jwk: _Optional[str] = ...) -> None: ...

class RotateKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKeysResponse(_message.Message):
    __slots__ = ("current_key_id",)
    CURRENT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    current_key_id: str
    def __init__(self, current_key_id: _Optional[str] = ...) -> None: ...
