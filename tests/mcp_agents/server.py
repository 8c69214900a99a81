"""An MCP server on the official SDK (1.x ``FastMCP`` or 2.x ``MCPServer``, whichever is installed),
Streamable HTTP on the SDK's default ``/mcp``; prints one JSON line per HTTP request it answered.

    python server.py PORT
"""

from __future__ import annotations

import json
import sys

import uvicorn
from pydantic import BaseModel

try:
    from mcp.server.mcpserver import Context  # 2.x
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:
    from mcp.server.fastmcp import Context  # 1.x
    from mcp.server.fastmcp import FastMCP as Server

app = Server("files")


class Confirm(BaseModel):
    ok: bool


@app.tool()
def read_file(path: str) -> str:
    """Read a report."""
    return f"contents of {path}"


@app.tool()
def delete_file(path: str) -> str:
    """Delete a file."""
    return f"deleted {path}"


@app.tool()
async def archive(path: str, ctx: Context) -> str:
    """Archive a report once the user confirms (an elicitation round trip)."""
    answer = await ctx.elicit(f"archive {path}?", Confirm)
    confirmed = answer.action == "accept" and answer.data is not None and answer.data.ok
    return f"archived {path}" if confirmed else f"kept {path}"


def logged(inner):  # the HTTP requests that reached this server, for the test to read
    async def asgi(scope, receive, send):
        if scope["type"] != "http":
            return await inner(scope, receive, send)

        async def sending(message):
            if message["type"] == "http.response.start":
                print(json.dumps({"method": scope["method"], "path": scope["path"],
                                  "status": message["status"]}), flush=True)
            await send(message)
        return await inner(scope, receive, sending)
    return asgi


if __name__ == "__main__":
    uvicorn.run(logged(app.streamable_http_app()), host="127.0.0.1", port=int(sys.argv[1]),
                log_level="warning")
