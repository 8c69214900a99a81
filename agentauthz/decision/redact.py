"""Token redaction and JSON string quoting, shared by the audit records and the chain twins.

They sit on the decision layer because an allow's record is formatted and chained on the Check
path (``_chain_py.append_check``) before the allow is answered.
"""

from __future__ import annotations

import json
import re
from typing import Any

REDACTED = "[redacted: token]"
# A compact JWS anywhere in a value (also "Bearer eyJ...", "report-eyJ...", "x_eyJ..."): three base64url
# segments; "eyJ" is '{"' encoded. Whatever comes before it does not matter (tests/test_no_secrets_leak.py).
_JWS = re.compile(r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

_json_str = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def _redacted(value: Any, depth: int = 0) -> Any:
    """``value`` with anything shaped like a compact JWS replaced: tokens never reach the log.

    Runs on the writer thread or once per ``prepare``d fragment, and redacts rather than refuses:
    a request path or header an attacker chose must not be able to make a Check fail.
    """
    if isinstance(value, str):
        if "eyJ" in value:
            return _JWS.sub(lambda m: REDACTED if len(m.group()) > 40 else m.group(), value)
        return value
    if isinstance(value, (list, tuple, dict)):
        if depth > 8:  # also stops a circular structure
            return "[nested too deep]"
        if isinstance(value, dict):
            return {k: _redacted(v, depth + 1) for k, v in value.items()}
        return [_redacted(v, depth + 1) for v in value]
    return value
