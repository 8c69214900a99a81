"""Cerbos, the anchor of the HTTP Check table: its binary from the npm registry, one CEL rule, CheckResources.

    python -m benchmarks.load.cerbos --install     # what ``make bench`` runs when the binary is missing

The binary is ``@cerbos/cerbos-linux-x64`` (``npm pack``, unpacked under ~/.cache). The policy mirrors the
grant the agentauthz rows are loaded with (demo:*:read:internal): resource kind ``demo``, action ``read``,
role ``agent``, and one CEL condition on the resource's sensitivity. The request is CheckResources over gRPC,
Cerbos's fastest API, hand-encoded here (field numbers from cerbos/request/v1 and engine/v1 protos) so no
Cerbos SDK is needed; every answer is checked for EFFECT_ALLOW on ``read`` before a table loads it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

from .procs import Process, free_port, http_get, wait_for

VERSION = "0.55.0"
PACKAGE = f"@cerbos/cerbos-linux-x64@{VERSION}"
CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE = CACHE_HOME / "agentauthz-bench" / f"cerbos-{VERSION}"
METHOD = "/cerbos.svc.v1.CerbosService/CheckResources"
# ResultEntry.actions map entry {key: "read", value: EFFECT_ALLOW (1)}: present only in an allow.
ALLOWED_READ = b"\x0a\x04read\x10\x01"
POLICY = """apiVersion: api.cerbos.dev/v1
resourcePolicy:
  version: default
  resource: demo
  rules:
    - actions: ["read"]
      effect: EFFECT_ALLOW
      roles: ["agent"]
      condition:
        match:
          expr: request.resource.attr.sensitivity in ["public", "internal"]
"""


def binary() -> Path:
    return CACHE / "package" / "cerbos-linux-x64"


def install() -> Path:
    """``npm pack`` the pinned version into the cache and unpack it; a no-op when it is there."""
    if binary().exists():
        return binary()
    if not shutil.which("npm"):
        raise SystemExit("npm not found: apt-get install -y npm")
    CACHE.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["npm", "pack", PACKAGE], cwd=CACHE, capture_output=True, text=True, timeout=300,
                         check=True).stdout.strip().splitlines()[-1]
    with tarfile.open(CACHE / out) as tar:
        tar.extractall(CACHE, filter="data")
    (CACHE / out).unlink()
    binary().chmod(0o755)
    return binary()


def version() -> str:
    if not binary().exists():
        return "missing"
    return subprocess.run([str(binary()), "--version"], capture_output=True, text=True,
                          timeout=30).stdout.split("\n")[0].strip()


# -- the request: protobuf wire format by hand -----------------------------------------------------

def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | str) -> bytes:
    """A length-delimited field (string, bytes, message)."""
    data = payload.encode() if isinstance(payload, str) else payload
    return _varint(number << 3 | 2) + _varint(len(data)) + data


def _attrs(number: int, attrs: dict[str, str]) -> bytes:
    """map<string, google.protobuf.Value> with string values (Value.string_value is field 3)."""
    return b"".join(_field(number, _field(1, k) + _field(2, _field(3, v))) for k, v in attrs.items())


def check_resources(principal: str, kind: str, resource_id: str, action: str, attrs: dict[str, str]) -> bytes:
    """A CheckResourcesRequest: principal (id 1, roles 3), one ResourceEntry (actions 1, resource 2)."""
    who = _field(1, principal) + _field(3, "agent")
    what = _field(1, kind) + _field(3, resource_id) + _attrs(4, attrs)
    return _field(3, who) + _field(4, _field(1, action) + _field(2, what))


def request() -> bytes:
    """The one request every Cerbos run sends: the agentauthz rows' agent, tool, target and operation."""
    return check_resources("spiffe://dev.local/agent/bench", "demo", "reports", "read",
                           {"sensitivity": "internal"})


def allows(address: str, message: bytes) -> bool:
    import grpc
    with grpc.insecure_channel(address) as channel:
        return ALLOWED_READ in channel.unary_unary(METHOD)(message, timeout=10)


class Cerbos:
    """``cerbos server`` on free loopback ports, policies from disk, audit and telemetry off."""

    def __init__(self, work: Path, cpus: set[int] | None = None) -> None:
        policies = work / "cerbos-policies"
        policies.mkdir(exist_ok=True)
        (policies / "demo.yaml").write_text(POLICY)
        self.http_port, grpc_port = free_port(), free_port()
        self.address = f"127.0.0.1:{grpc_port}"
        config = work / "cerbos.yaml"
        config.write_text(f"""server:
  httpListenAddr: "127.0.0.1:{self.http_port}"
  grpcListenAddr: "{self.address}"
storage:
  driver: disk
  disk: {{directory: "{policies}", watchForChanges: false}}
audit: {{enabled: false}}
telemetry: {{disabled: true}}
""")
        self.argv = [str(install()), "server", f"--config={config}", "--log-level=warn"]
        # Started on the server core: Go sizes GOMAXPROCS from the affinity it starts with.
        self.process = Process("cerbos", self.argv, work, cpus=cpus,
                               env={**os.environ, "CERBOS_NO_TELEMETRY": "1"})
        try:
            wait_for(lambda: self.process.alive()
                     and http_get(f"http://127.0.0.1:{self.http_port}/_cerbos/health")[0] == 200, 60,
                     "cerbos /_cerbos/health")
        except TimeoutError:
            self.process.stop()
            raise RuntimeError(f"cerbos did not become healthy:\n{self.process.log()[-4000:]}") from None

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        self.process.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--install", action="store_true", help="fetch the binary when missing")
    args = parser.parse_args(argv)
    if args.install:
        install()
    print(f"{binary()}: {version()}")


if __name__ == "__main__":
    main()
