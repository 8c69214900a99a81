"""An agent on the official MCP SDK (1.x ``ClientSession`` + ``streamable_http_client``, or 2.x
``mcp.Client``, whichever is installed) running one scripted session through Envoy; prints a JSON
transcript, one line per step, of what the agent saw: results, and errors as the SDK raised them.

    python agent.py URL TOKEN [REVOKED_TOKEN]

With REVOKED_TOKEN, a second session makes a call, prints {"step": "ready"}, waits for a line on stdin
(the test revokes that token meanwhile) and calls again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import mcp
from mcp import types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

LINE = "2" if hasattr(mcp, "Client") else "1"
# 2.x: "legacy" is the handshake-era protocol 1.x speaks (initialize, a session, the GET stream, DELETE);
# "auto", 2.x's default, probes server/discover first and then speaks the 2026-07-28 protocol.
MODE = os.environ.get("AGENT_MODE", "legacy")


def say(step: str, **what: Any) -> None:
    print(json.dumps({"step": step, "sdk": LINE, **what}, default=str), flush=True)


async def confirm(context: Any, params: Any) -> types.ElicitResult:
    say("elicited", message=params.message)
    return types.ElicitResult(action="accept", content={"ok": True})


@asynccontextmanager
async def session(url: str, token: str) -> AsyncIterator[Any]:
    """An initialized session whose requests carry the bearer token."""
    async with create_mcp_http_client(headers={"authorization": f"Bearer {token}"}) as http:
        transport = streamable_http_client(url, http_client=http)
        if LINE == "2":
            async with mcp.Client(transport, elicitation_callback=confirm, mode=MODE) as client:
                info = client.session.server_info
                say("initialize", server=info.name if info else None)
                yield client
        else:
            async with transport as (read, write, *_), \
                    mcp.ClientSession(read, write, elicitation_callback=confirm) as client:
                done = await client.initialize()
                say("initialize", server=done.serverInfo.name)
                yield client


async def call(client: Any, step: str, tool: str, arguments: dict[str, Any]) -> None:
    try:
        result = await client.call_tool(tool, arguments)
    except Exception as exc:  # the SDK's McpError (1.x) / MCPError (2.x): the JSON-RPC error it read
        error = getattr(exc, "error", None)
        if error is None:
            raise
        say(step, error={"code": error.code, "message": error.message, "data": error.data})
        return
    failed = getattr(result, "is_error", None) or getattr(result, "isError", None)  # 2.x / 1.x spelling
    say(step, result=[c.text for c in result.content if getattr(c, "text", None)], is_error=bool(failed))


async def main(url: str, token: str, revoked: str | None) -> None:
    async with session(url, token) as client:
        tools = await client.list_tools()
        say("list", tools=sorted(t.name for t in tools.tools))
        await call(client, "allowed", "read_file", {"path": "/srv/reports/q1"})
        await call(client, "argument_denied", "read_file", {"path": "/etc/passwd"})
        await call(client, "scope_denied", "delete_file", {"path": "/srv/reports/q1"})
        await call(client, "after_denials", "read_file", {"path": "/srv/reports/q2"})
        if LINE == "1" or MODE == "legacy":  # 2026-07-28 has no server-initiated requests (no back channel)
            await call(client, "elicitation", "archive", {"path": "/srv/reports/q1"})
    say("closed")
    if revoked:
        async with session(url, revoked) as client:
            await call(client, "before_revoke", "read_file", {"path": "/srv/reports/q1"})
            say("ready")
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            await call(client, "after_revoke", "read_file", {"path": "/srv/reports/q1"})
        say("closed")


if __name__ == "__main__":
    try:
        asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))
    except BaseException as exc:  # a session torn down: the transcript says how
        say("died", exception=repr(exc))
        raise SystemExit(1) from None
