"""What any audited Check must do at least, shared by the gRPC bound (servers.py ``bound_handler``) and the
HTTP one (rsgi_bound.py): (cold) one bare PyNaCl verify of the token's signature and a plain ``json.loads``
of its claims, then one hash-chained record appended with write(2). Nothing here decides anything."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tempfile
import time
from typing import Any

# rsgi_bound.py's inputs, set by whoever starts granian on it: the daemon's JWKS (cold), the log's folder.
JWKS_ENV, DIR_ENV = "AGENTAUTHZ_BOUND_JWKS", "AGENTAUTHZ_BOUND_DIR"

# An allow record's members after its ids: what the daemon's audit_records.check_members makes for a token.
ALLOW_MEMBERS = ('"decision":true,"reason":"allow","tool":"demo","target":"reports","operation":"read",'
                 '"sensitivity":"internal","agent":"spiffe://dev.local/agent/bench","task":"bench",'
                 '"token_id":"0123456789abcdef0123456789abcdef"')


def b64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_keys(jwks: dict[str, Any]) -> dict[str, Any]:
    """kid -> PyNaCl VerifyKey, from the daemon's published JWKS."""
    from nacl.signing import VerifyKey
    return {k["kid"]: VerifyKey(b64url(k["x"])) for k in jwks["keys"]}


def verify_token(keys: dict[str, Any], token: str) -> None:
    """One bare verify of a compact JWS's signature and a read of its claims (an allow must read its
    grants); raises on a bad signature or an unknown kid."""
    head, _, rest = token.partition(".")
    payload, _, sig = rest.partition(".")
    kid = json.loads(b64url(head))["kid"]
    keys[kid].verify(f"{head}.{payload}".encode(), b64url(sig))
    json.loads(b64url(payload))


class ChainedLog:
    """One hash-chained record of ~400 bytes per ``append``, written with write(2) to a file of its own
    (in ``directory``, else a fresh temporary one): what an allow audited before it is answered costs."""

    def __init__(self, directory: str | None = None) -> None:
        directory = directory or tempfile.mkdtemp(prefix="bound-")
        self.path = os.path.join(directory, f"bound-{os.getpid()}.jsonl")
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._seq, self._prev = 0, "0" * 64
        self._members = f'"kind":"check",{ALLOW_MEMBERS}'

    def append(self) -> None:
        seq = self._seq + 1
        line = f'{{"seq":{seq},"prev":"{self._prev}","ts":{time.time()!r},{self._members}}}'.encode()
        self._seq, self._prev = seq, hashlib.sha256(line).hexdigest()
        os.write(self._fd, line + b"\n")
