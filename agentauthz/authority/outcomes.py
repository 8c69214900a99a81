"""What an Authority operation answers: a ``Minted`` token (or a pending approval), or ``Refused``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import (  # noqa: F401 (the API's refusal reasons, named here for its callers)
    NEEDS_APPROVAL,
    NOT_PERMITTED,
    NOTHING_GRANTED,
    UNKNOWN_TOKEN_ID,
    AgentAuthzError,
)
from .approvals import Approval


class Refused(AgentAuthzError):
    """An API request the caller may not make; ``reason`` is the shared constant."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Minted:
    token: str
    token_id: str
    expires_at: int
    grants: list[dict[str, Any]]
    task: str
    agent: str
    key_id: str
    denied: list[dict[str, Any]] = field(default_factory=list)
    needs_approval: list[dict[str, Any]] = field(default_factory=list)
    pending: Approval | None = None  # set, with no token, when a human must approve first
    approval: Approval | None = None  # the approval the token was minted under
