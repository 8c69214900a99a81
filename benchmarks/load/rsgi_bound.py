"""The HTTP Check's bound: what any audited RSGI Check must do at least, nothing decided (issue 21).

    AGENTAUTHZ_BOUND_JWKS=FILE AGENTAUTHZ_BOUND_DIR=DIR \\
        granian --interface rsgi --workers 1 --runtime-threads 1 benchmarks.load.rsgi_bound:app

Per request: read every header and count the names (the HTTP Check must, to refuse forged route headers and
one whose value granian left out), take the bearer,
(cold, when ``AGENTAUTHZ_BOUND_JWKS`` names the daemon's JWKS: one bare PyNaCl verify of its signature and
a read of its claims), append one hash-chained record with write(2) (``bound.ChainedLog``, the gRPC bound's
own writer, in ``AGENTAUTHZ_BOUND_DIR``), and answer 200 with the headers the HTTP Check's allow sends
(constant values of the same lengths, but a decision id of its own each time). A bad signature raises:
granian answers 500, the run is invalid.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

from .bound import DIR_ENV, JWKS_ENV, ChainedLog, verify_keys, verify_token

DECISION_ID_PREFIX = "8b1d0172ccc32c10"  # a daemon's random half; the other half counts (extauthz.py)


def allow_headers() -> list[tuple[str, str]]:
    """agentauthz/serve/http_check.py's allow for a benchmark token but its decision id: three headers
    for the tool and the bearer removed."""
    from agentauthz.decision.tokens import new_token_id

    from .daemon import AGENT
    return [("x-agentauthz-agent", AGENT), ("x-agentauthz-task", "bench-warm"),
            ("x-agentauthz-token-id", new_token_id()), ("x-envoy-auth-headers-to-remove", "authorization")]


def bound_app(keys: dict[str, Any], log: ChainedLog) -> Any:
    """The RSGI app over ``keys`` (kid -> VerifyKey; empty: warm, no verify) and ``log``."""
    headers = allow_headers()
    count = itertools.count(1)

    async def app(scope: Any, proto: Any) -> None:
        bearer = ""
        seen = set()
        for name, value in scope.headers.items():
            seen.add(name)
            if name == "authorization":
                bearer = value
        if len(seen) != len(scope.headers):  # a value granian left out: refused (request_invalid)
            raise ValueError("a header value that is not visible ASCII")
        token = bearer[7:] if bearer[:7].lower() == "bearer " else ""
        if keys:
            verify_token(keys, token)
        log.append()
        # Every allow names a decision of its own (32 hex characters), as the Check's does: a new
        # header value each time, which HPACK cannot index away.
        proto.response_bytes(200, [*headers, ("x-agentauthz-decision-id", f"{DECISION_ID_PREFIX}"
                                                                           f"{next(count):016x}")], b"")

    return app


def _from_env() -> Any:
    keys: dict[str, Any] = {}
    if os.environ.get(JWKS_ENV):
        with open(os.environ[JWKS_ENV]) as f:
            keys = verify_keys(json.load(f))
    return bound_app(keys, ChainedLog(os.environ.get(DIR_ENV) or None))


app = _from_env()
