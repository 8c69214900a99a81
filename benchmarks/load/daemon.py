"""The real agentauthz daemon under load: started as a user would, tokens minted over its API.

Tokens are only ever minted through the mTLS API with the Python client (never
by calling ``Authority.mint`` in-process), so the benchmark exercises the same
daemon, keys and policy a user gets from ``agentauthz serve``.
"""

from __future__ import annotations

import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from .procs import Process, free_port, http_get, wait_for

AGENT = "spiffe://dev.local/agent/bench"
GRANT = "demo:*:read:internal"  # the example route asks for internal data
ISSUER = "https://agentauthz.dev.local"
AUDIENCE = "tools"
TOKEN_TTL = 600  # the development policy's cap; run.py mints afresh for each phase


class Daemon:
    """``python -m agentauthz serve`` on free loopback ports with a state directory of its own."""

    def __init__(self, name: str, work: Path, root: Path, *, check_listen: str | None = None,
                 config: dict[str, Any] | None = None, cpus: set[int] | None = None,
                 workers: int = 0) -> None:
        self.name = name
        self.state_dir = work / f"{name}-state"
        self.check_port, self.api_port, self.http_port = free_port(), free_port(), free_port()
        self.check_address = check_listen or f"127.0.0.1:{self.check_port}"
        argv = [sys.executable, "-m", "agentauthz", "serve", "--state-dir", str(self.state_dir),
                "--check-listen", self.check_address, "--api-listen", f"127.0.0.1:{self.api_port}",
                "--http-listen", f"127.0.0.1:{self.http_port}",
                "--approval-listen", f"127.0.0.1:{free_port()}"]  # not the shared default 9193
        if workers:
            argv += ["--workers", str(workers)]
        if config:
            config_path = work / f"{name}-config.yaml"
            config_path.write_text(yaml.safe_dump({"state_dir": str(self.state_dir), **config}))
            argv[4:4] = ["--config", str(config_path)]
        self.argv = argv
        self.process = Process(name, argv, work, cwd=root, cpus=cpus)
        self.identity_dir = work / f"{name}-identity"
        try:
            wait_for(lambda: self.process.alive() and self.healthz() == 200, 60, f"{name} /healthz")
        except TimeoutError:
            self.process.stop()
            raise RuntimeError(f"{name} did not become healthy:\n{self.process.log()[-4000:]}") from None
        self._issue_identity()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def api_address(self) -> str:
        return f"localhost:{self.api_port}"  # the dev server certificate names localhost

    def healthz(self) -> int:
        return http_get(f"http://127.0.0.1:{self.http_port}/healthz")[0]

    def _issue_identity(self) -> None:
        from agentauthz.identity.devca import ensure_dev_pki, issue_svid
        issue_svid(ensure_dev_pki(self.state_dir), AGENT, self.identity_dir)

    def client(self) -> Any:
        from agentauthz.client import Client, Identity
        return Client(self.api_address, Identity.from_dir(self.identity_dir), timeout=30)

    def mint(self, task: str = "bench-warm") -> str:
        return str(self.mint_response(task).token)

    def mint_response(self, task: str) -> Any:
        return self.client().mint(task, [GRANT], ttl=TOKEN_TTL, intent="load benchmark")

    def mint_many(self, count: int, threads: int = 4) -> list[str]:
        """``count`` distinct tokens, minted over the API from a few threads (each its own channel)."""
        clients = [self.client() for _ in range(threads)]

        def batch(i: int) -> list[str]:
            return [clients[i].mint(f"bench-cold-{i}", [GRANT], ttl=TOKEN_TTL).token
                    for _ in range(i, count, threads)]

        with ThreadPoolExecutor(threads) as pool:
            return [t for part in pool.map(batch, range(threads)) for t in part]

    def jwks(self) -> dict[str, Any]:
        status, body = http_get(f"http://127.0.0.1:{self.http_port}/.well-known/jwks.json")
        if status != 200:
            raise RuntimeError(f"{self.name}: JWKS answered {status}")
        return dict(json.loads(body))

    def _metrics(self) -> str:
        status, body = http_get(f"http://127.0.0.1:{self.http_port}/metrics")
        return body.decode() if status == 200 else ""

    def decisions(self) -> dict[str, float]:
        """Check decisions by reason, from /metrics: proof that a loaded run was allowed throughout."""
        out = {}
        for m in re.finditer(r'^agentauthz_check_decisions_total\{reason="([^"]+)"\} ([\d.e+]+)$',
                             self._metrics(), re.M):
            out[m.group(1)] = float(m.group(2))
        return out

    def gauges(self, *names: str) -> dict[str, float]:
        """Unlabelled gauges from one read of /metrics."""
        text, out = self._metrics(), {}
        for name in names:
            m = re.search(rf"^{name} ([\d.e+]+)$", text, re.M)
            if m is None:
                raise RuntimeError(f"{self.name}: /metrics has no {name}")
            out[name] = float(m.group(1))
        return out

    def stop(self) -> None:
        self.process.stop(30)
