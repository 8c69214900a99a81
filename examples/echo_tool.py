"""A stand-in tool behind Envoy: answers every call with the method, path and headers it received.

    python examples/echo_tool.py 8080
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class EchoHandler(BaseHTTPRequestHandler):
    def _echo(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        headers: dict[str, str] = {}
        for k, v in self.headers.items():  # a repeated header shows all its values, as one field would
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        body = json.dumps({"method": self.command, "path": self.path, "headers": headers}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body + b"\n")

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _echo

    def do_HEAD(self) -> None:
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8080
    print(f"echo tool on 127.0.0.1:{port}")
    ThreadingHTTPServer(("127.0.0.1", port), EchoHandler).serve_forever()
