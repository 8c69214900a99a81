from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Grant(_message.Message):
    __slots__ = ("tool", "target", "operations", "sensitivity")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    OPERATIONS_FIELD_NUMBER: _ClassVar[int]
    SENSITIVITY_FIELD_NUMBER: _ClassVar[int]
    tool: str
    target: str
    operations: _containers.RepeatedScalarFieldContainer[str]
    sensitivity: str
    def __init__(self, tool: _Optional[str] = ..., target: _Optional[str] = ..., operations: _Optional[_Iterable[str]] = ..., sensitivity: _Optional[str] = ...) -> None: ...

class MintRequest(_message.Message):
    __slots__ = ("task", "intent", "grants", "ttl_seconds", "audience")
    TASK_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    task: str
    intent: str
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    ttl_seconds: int
    audience: str
    def __init__(self, task: _Optional[str] = ..., intent: _Optional[str] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., ttl_seconds: _Optional[int] = ..., audience: _Optional[str] = ...) -> None: ...

class MintResponse(_message.Message):
    __slots__ = ("token", "token_id", "expires_at", "grants", "task", "agent", "key_id", "denied", "needs_approval")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    GRANTS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    NEEDS_APPROVAL_FIELD_NUMBER: _ClassVar[int]
    token: str
    token_id: str
    expires_at: int
    grants: _containers.RepeatedCompositeFieldContainer[Grant]
    task: str
    agent: str
    key_id: str
    denied: _containers.RepeatedCompositeFieldContainer[Grant]
    needs_approval: _containers.RepeatedCompositeFieldContainer[Grant]
    def __init__(self, token: _Optional[str] = ..., token_id: _Optional[str] = ..., expires_at: _Optional[int] = ..., grants: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., task: _Optional[str] = ..., agent: _Optional[str] = ..., key_id: _Optional[str] = ..., denied: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ..., needs_approval: _Optional[_Iterable[_Union[Grant, _Mapping]]] = ...) -> None: ...

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

class EndTaskRequest(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: str
    def __init__(self, task: _Optional[str] = ...) -> None: ...

class GetKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetKeysResponse(_message.Message):
    __slots__ = ("jwks_json",)
    JWKS_JSON_FIELD_NUMBER: _ClassVar[int]
    jwks_json: str
    def __init__(self, jwks_json: _Optional[str] = ...) -> None: ...

class RotateKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RotateKeysResponse(_message.Message):
    __slots__ = ("current_key_id",)
    CURRENT_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    current_key_id: str
    def __init__(self, current_key_id: _Optional[str] = ...) -> None: ...
