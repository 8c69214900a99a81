"""No secret ever leaves its key file: a real daemon through a broad session, then every byte it wrote.

The session: mints (two boundaries, tokens in intents, a human-gated mint approved by a development
human), checks allowed and denied (malformed tokens; tokens in paths, targets, headers, request ids,
MCP arguments), delegation (allowed and refused), revocation by token id, task, agent and key, a key
rotation, a policy reload with a bad file, and SIGTERM. Then every file under the state directory
(audit log, checkpoints, journal, approvals, budgets, keyring metadata: all but the private key files
themselves), the daemon's stdout/stderr, /metrics, /healthz, /status-list, the JWKS (HTTP and API), and
every error message a client received are searched for: every token minted or presented, and its
signature segment; every private key's bytes (seed or scalar, DER, PEM body lines) in raw, base64,
base64url, hex; the token-id HMAC key; the human's bearer credential. Any hit fails, naming where.
"""

from __future__ import annotations

import base64
import json
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from processes import Daemon, http_get, wait_for

from agentauthz.authority.approvers import issue_dev_credential
from agentauthz.client import CHECK_METHOD, ApprovalsClient, Client, Identity, decision_from
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.v1 import agentauthz_pb2 as pb

ALPHA, BETA, ADMIN = (f"spiffe://dev.local/agent/{n}" for n in ("alpha", "beta", "admin"))
EXTRA_RULES = """
  - id: leak-mcp-read-file
    agents: ["spiffe://dev.local/agent/*"]
    tool: read_file
    targets: [files]
    operations: [call]
    max_sensitivity: internal
    arguments:
      - {name: path, prefix: /srv/reports, required: true}
boundaries:
  data: {max_ttl: 60}
"""


def encodings(data: bytes) -> dict[str, bytes]:
    """``data`` as it could be written: raw, base64 (padded or not), base64url (padded or not), hex."""
    std, url = base64.b64encode(data), base64.urlsafe_b64encode(data)
    return {"raw": data, "base64": std, "base64 unpadded": std.rstrip(b"="), "base64url": url,
            "base64url unpadded": url.rstrip(b"="), "hex": data.hex().encode(),
            "HEX": data.hex().upper().encode()}


def private_key_material(pem: bytes) -> dict[str, bytes]:
    """Every spelling of one PEM private key worth searching for: the PEM body and its lines, the DER
    inside, and the key's own secret number (Ed25519 seed, EC scalar, RSA d) in every encoding."""
    lines = pem.decode("ascii").strip().splitlines()
    body_lines = [line for line in lines if not line.startswith("-----")]
    out = {"PEM body": "".join(body_lines).encode()}
    out.update({f"PEM body line {i}": line.encode() for i, line in enumerate(body_lines) if len(line) >= 16})
    der = base64.b64decode("".join(body_lines))
    out.update({f"DER {name}": value for name, value in encodings(der).items()})
    key = serialization.load_pem_private_key(pem, None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        secret = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                   serialization.NoEncryption())
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        secret = key.private_numbers().private_value.to_bytes((key.curve.key_size + 7) // 8, "big")
    elif isinstance(key, rsa.RSAPrivateKey):
        d = key.private_numbers().d
        secret = d.to_bytes((d.bit_length() + 7) // 8, "big")
    else:
        raise AssertionError(f"unexpected private key type {type(key).__name__}")
    out.update({f"secret {name}": value for name, value in encodings(secret).items()})
    return out


@dataclass
class Session:
    """What the session handed out and heard back: the secrets to look for and where else to look."""

    daemon: Daemon
    work: Path
    policy: Path
    secrets: dict[str, bytes] = field(default_factory=dict)  # "what (encoding)" -> bytes
    key_files: set[Path] = field(default_factory=set)  # private key files: the only place keys may be
    heard: list[tuple[str, bytes]] = field(default_factory=list)  # (where, what a client received)

    def token(self, what: str, token: str) -> str:
        assert token.count(".") == 2, what
        self.secrets[f"{what} (token)"] = token.encode()
        self.secrets[f"{what} (signature segment)"] = token.rsplit(".", 1)[1].encode()
        return token

    def snapshot_keys(self) -> None:
        """Read every private key file now: retired keys are deleted from disk later in the session."""
        state = self.daemon.state_dir
        for path in [*state.rglob("*"), *self.work.glob("id-*/*")]:
            if path.is_file() and b"PRIVATE KEY-----" in path.read_bytes()[:100]:
                self.key_files.add(path)
                for name, value in private_key_material(path.read_bytes()).items():
                    self.secrets[f"{path.relative_to(self.work)}: {name}"] = value
        token_id_key = (state / "token-id.key").read_bytes()
        self.key_files.add(state / "token-id.key")
        for name, value in encodings(token_id_key).items():
            self.secrets[f"token-id HMAC key ({name})"] = value

    def refused(self, where: str, call: Callable[[], Any]) -> grpc.StatusCode:
        """Run a call that must be refused; keep what the client was told."""
        with pytest.raises(grpc.RpcError) as err:
            call()
        self.heard.append((f"error message of {where}", (err.value.details() or "").encode()))
        return err.value.code()


def identity(session: Session, agent: str) -> Identity:
    out = session.work / f"id-{agent.rsplit('/', 1)[1]}"
    if not (out / "svid.pem").exists():
        issue_svid(ensure_dev_pki(session.daemon.state_dir), agent, out)
    return Identity.from_dir(out)


def check_request(token_header: str | None, *, path: str = "/demo/reports", method: str = "GET",
                  extensions: dict[str, str] | None = None, request_id: str = "",
                  headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    h = dict(headers or {})
    if token_header is not None:
        h["authorization"] = token_header
    if body:
        h.update({"content-type": "application/json", "content-length": str(len(body))})
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
            id=request_id, method=method, path=path, headers=h, raw_body=body)),
        context_extensions=extensions or {})).SerializeToString()


def run_session(session: Session) -> None:
    d = session.daemon
    alpha = Client(d.api_address, identity(session, ALPHA), check_server=d.check_address)
    beta = Client(d.api_address, identity(session, BETA), check_server=d.check_address)
    admin = Client(d.api_address, identity(session, ADMIN), check_server=d.check_address)
    session.snapshot_keys()
    channel = grpc.insecure_channel(d.check_address)
    raw_check = channel.unary_unary(CHECK_METHOD)

    def check(where: str, request: bytes) -> str:
        decision = decision_from(raw_check(request, timeout=10))
        session.heard.append((f"check answer ({where})", json.dumps(decision.__dict__).encode()))
        return decision.reason

    # Mints: plain, on the data boundary, with a token in the intent, gated and approved by a human.
    plain = session.token("alpha plain", alpha.mint("report", ["demo:*:read,write:internal"],
                                                    intent="summarise the weekly reports").token)
    session.token("alpha data", alpha.mint("report-data", ["demo:*:read"], audience="data").token)
    echo = session.token("alpha token-in-intent", alpha.mint(
        "echo", ["demo:*:read"], intent=f"use Bearer {plain} please").token)
    pending = alpha.mint("cleanup", ["demo:*:read", "demo:reports:delete"], intent=f"delete; token {plain}")
    assert pending.pending.id and not pending.token
    credential = issue_dev_credential(d.state_dir, "alice")
    session.token("human bearer credential", credential)
    humans = ApprovalsClient(d.approval_address, credential, (d.state_dir / "pki" / "ca.pem").read_bytes())
    humans.approve(pending.pending.id, f"fine, but not {plain}")
    gated = session.token("alpha approved", alpha.mint("cleanup", ["demo:*:read", "demo:reports:delete"],
                                                       approval_id=pending.pending.id).token)
    read_file = pb.Grant(tool="read_file", target="files", operations=["call"], sensitivity="internal")
    mcp = session.token("alpha mcp", alpha.mint("mcp", [read_file]).token)
    session.refused("mint with a token as task", lambda: alpha.mint(plain, ["demo:*:read"]))
    session.token("alpha token-as-target", alpha.mint("t", [f"demo:{plain}:read"]).token)
    session.refused("mint with a huge intent", lambda: alpha.mint("t", ["demo:*:read"], intent=plain * 3))

    # Checks, allowed and denied; tokens in every place a request can carry text.
    route = {"tool": "demo", "target": "reports", "operation": "read", "sensitivity": "internal"}
    assert check("allowed", check_request(f"Bearer {plain}", extensions=route)) == "allow"
    assert check("allowed by path", check_request(f"Bearer {plain}", path="/demo/reports?x=1")) == "allow"
    delete = {**route, "operation": "delete", "sensitivity": "public"}
    assert check("approved delete", check_request(f"Bearer {gated}", extensions=delete)) == "allow"
    hostile_tokens = [plain[:-1], plain + "x", plain.swapcase(), plain.replace(".", ". ", 1),
                      plain + "." + plain.rsplit(".", 1)[1], f"{plain} {plain}", plain[: len(plain) // 2]]
    for i, bad in enumerate(hostile_tokens):
        if bad.count(".") == 2:
            session.token(f"malformed variant {i}", bad)
        assert check(f"malformed {i}", check_request(f"Bearer {bad}", extensions=route)) != "allow"
    for where, request in {
        "token in path": check_request(None, path=f"/demo/{plain}"),
        "token glued into path": check_request(None, path=f"/demo/report-{plain}"),
        "token in query": check_request(f"Bearer {plain}", path=f"/demo/reports?access_token={plain}"),
        "token as target": check_request(f"Bearer {plain}", extensions={**route, "target": plain}),
        "token after a prefix in target": check_request(f"Bearer {plain}", extensions={**route,
                                                                                     "target": f"x_{plain}"}),
        "bearer as target": check_request(f"Bearer {plain}", extensions={**route,
                                                                         "target": f"Bearer {plain}"}),
        "token as tool": check_request(f"Bearer {plain}", extensions={**route, "tool": plain}),
        "token as operation": check_request(f"Bearer {plain}", extensions={**route, "operation": plain}),
        "token as sensitivity": check_request(f"Bearer {plain}", extensions={**route, "sensitivity": plain}),
        "token as boundary": check_request(f"Bearer {plain}", extensions={**route, "boundary": plain}),
        "token in request id": check_request(f"Bearer {plain}", extensions=route, request_id=plain),
        "token glued into request id": check_request(None, request_id=f"rid-{plain}"),
        "token in other headers": check_request(None, headers={"x-token": plain, "cookie": f"t={plain}",
                                                               "proxy-authorization": f"Bearer {plain}"}),
        "token in MCP arguments": check_request(f"Bearer {mcp}", method="POST", path="/mcp", extensions={
            "mcp": "true", "target": "files", "sensitivity": "internal"}, body=json.dumps({
                "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                    "name": "read_file", "arguments": {"path": f"/srv/reports/{plain}"}}}).encode()),
        "token as MCP tool name": check_request(f"Bearer {mcp}", method="POST", path="/mcp", extensions={
            "mcp": "true", "target": "files"}, body=json.dumps({
                "jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": plain}}).encode()),
    }.items():
        check(where, request)

    # Delegation, allowed and refused.
    child = session.token("beta delegated", alpha.delegate(plain, BETA, ["demo:reports/*:read"], ttl=120,
                                                           intent=f"for beta, not {plain}").token)
    assert beta.check(child, "demo", "reports/q3", "read").allowed
    session.refused("delegate by a non-holder", lambda: beta.delegate(plain, BETA, ["demo:*:read"]))
    session.refused("delegate a malformed parent", lambda: alpha.delegate(plain + "x", BETA, ["demo:*:read"]))
    session.refused("delegate wider", lambda: alpha.delegate(plain, BETA, ["demo:*:delete"]))
    session.refused("delegate to a token", lambda: alpha.delegate(plain, plain, ["demo:*:read"]))

    # Revocations: by id, by task, by agent, by key; a rotation in between.
    revoked = alpha.mint("revoke-me", ["demo:*:read"])
    session.token("alpha revoked by id", revoked.token)
    alpha.revoke(token_id=revoked.token_id)
    session.refused("revoke a made-up id", lambda: alpha.revoke(token_id=plain))
    alpha.end_task("echo")
    assert alpha.check(echo, "demo", "reports", "read").reason == "task_ended"
    session.refused("rotate as an agent", lambda: alpha._stub().RotateKeys(pb.RotateKeysRequest(), timeout=5))
    admin._stub().RotateKeys(pb.RotateKeysRequest(), timeout=5)
    session.snapshot_keys()
    after_rotation = session.token("alpha after rotation", alpha.mint("rotated", ["demo:*:read"]).token)
    victim = session.token("beta before agent revocation", beta.mint("b", ["demo:*:read"]).token)
    admin.revoke(agent=BETA)
    assert beta.check(victim, "demo", "x", "read").reason == "agent_revoked"
    session.snapshot_keys()  # before the key's private half is deleted
    admin.revoke(key_id=json.loads(base64.urlsafe_b64decode(after_rotation.split(".")[0] + "=="))["kid"])
    assert alpha.check(after_rotation, "demo", "x", "read").reason in ("key_revoked", "token_key_unknown")
    session.token("alpha after key revocation", alpha.mint("last", ["demo:*:read"]).token)
    session.snapshot_keys()

    # A policy reload with a bad file (the previous policy stays), then with a good one.
    policy = session.policy
    good = policy.read_text()
    policy.write_text(good + "\n  - {id: broken, tool: [\n")
    assert d.proc is not None
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "policy reload refused" in d.log(), 10, "the bad policy to be refused")
    assert alpha.check(plain, "demo", "reports", "read", "internal").allowed
    policy.write_text(good)
    d.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "policy reloaded" in d.log(), 10, "the good policy to be loaded")

    # Everything the daemon publishes over HTTP and the API.
    base = f"http://127.0.0.1:{d.http_port}"
    for path in ("/healthz", "/metrics", "/.well-known/jwks.json", "/status-list", "/nope"):
        session.heard.append((f"GET {path}", http_get(base + path)[1]))
    session.heard.append(("GetKeys", json.dumps(alpha.jwks()).encode()))
    channel.close()


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    work = tmp_path_factory.mktemp("leak")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + EXTRA_RULES)
    daemon = Daemon(work / "state", {"audiences": ["tools", "data"], "admins": [ADMIN],
                                     "policy_file": str(policy)})
    s = Session(daemon.start(), work, policy)
    try:
        run_session(s)
        s.snapshot_keys()
    finally:
        code = daemon.stop(signal.SIGTERM)
    assert code == 0, daemon.log()
    yield s


def places(s: Session) -> Iterator[tuple[str, bytes]]:
    """Every file the daemon wrote (but the key files), its log, and everything clients heard."""
    for path in sorted(s.daemon.state_dir.rglob("*")):
        if path.is_file() and path not in s.key_files:
            yield str(path.relative_to(s.work)), path.read_bytes()
    yield "daemon stdout/stderr", s.daemon.log_path.read_bytes()
    yield from s.heard


def find(secrets: dict[str, bytes], where: Iterable[tuple[str, bytes]]) -> list[str]:
    return [f"{what} found in {place}" for place, content in where for what, secret in secrets.items()
            if secret in content]


def test_no_secret_appears_anywhere(session: Session) -> None:
    assert len([k for k in session.secrets if k.endswith("(token)")]) >= 10
    assert len(session.key_files) >= 8  # signing keys of both boundaries, audit, CA, server, human issuer...
    where = list(places(session))
    assert len(where) > 20
    hits = find(session.secrets, where)
    assert not hits, "\n".join(hits)


def test_the_session_left_a_verifiable_audit_log(session: Session) -> None:
    from agentauthz.audit.verify import verify_dir
    state = session.daemon.state_dir
    report = verify_dir(state / "audit", (state / "audit-key" / "public.pem").read_bytes())
    assert report.ok and report.records > 40, report
    audit = b"".join(p.read_bytes() for p in (session.daemon.state_dir / "audit").glob("audit-*.jsonl"))
    assert b"[redacted: token]" in audit  # the tokens in paths and intents were there, and redacted


def test_the_search_would_find_a_leak(session: Session) -> None:
    """The search is not vacuous: the key material is what the key files hold, and a secret of each
    kind planted in a copy of the audit log is found there."""
    for path in session.key_files - {session.daemon.state_dir / "token-id.key"}:
        material = private_key_material(path.read_bytes()) if path.exists() else None
        if material is not None:  # a retired key's file is gone; its material was read before
            assert material["secret raw"] in material["DER raw"] or path.suffix == ".key", path
    audit = next((session.daemon.state_dir / "audit").glob("audit-*.jsonl")).read_bytes()
    for kind in ("(token)", "(signature segment)", "secret hex", "PEM body line", "token-id HMAC key (raw)"):
        name, secret = next((k, v) for k, v in session.secrets.items() if kind in k)
        planted = [("a copy of the audit log", audit[:100] + secret + audit[100:])]
        assert find(session.secrets, planted), name
