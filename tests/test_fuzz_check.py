"""Structure-aware fuzzing of the Check path: ``CheckService.check`` in-process, on a real Authority.

The Authority runs in a temporary state directory (keys, revocation journal, budgets, audit writer),
two trust boundaries, the dev policy plus MCP rules and a deny rule; its tokens are minted, delegated,
revoked and ended through its own methods, a few are forged with its real signing key. CheckRequests
come from strategies: methods, paths (tokens in them too), headers with hostile ``authorization``
values, ``x-request-id``, context extensions including ``boundary`` and ``mcp``, JSON-RPC bodies,
peer principals and certificates; half of them are shaped to be allowed and then disturbed; the seeds
in tests/corpus/check_requests/ run first. Serialized requests are also mutated byte by byte and fed
through ``parse_check_request``.

Every answer must be a parseable CheckResponse with an explicit status, exactly one of ok/denied,
a known reason with its HTTP status, and never an exception. An allow must name a live token minted
here, presented as ``Bearer <token>``, at its own boundary, by its own subject and certificate (when
the peer is reported), for a request one of its grants covers and the current policy permits.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import random
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.auth.v3 import attribute_context_pb2 as attrs
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from hypothesis import event, given, settings
from hypothesis import strategies as st
from nacl.signing import SigningKey
from support import damaged

from agentauthz import reasons
from agentauthz.authority.core import Authority
from agentauthz.config import Config
from agentauthz.decision import _check_py, tokens
from agentauthz.decision.constraints import Constrained
from agentauthz.decision.mcp import Call, read_call
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.serve import extauthz
from agentauthz.serve.mcp_denials import DENIED_CODE

ALPHA, BETA = "spiffe://dev.local/agent/alpha", "spiffe://dev.local/agent/beta"
SEEDS = Path(__file__).resolve().parent / "corpus" / "check_requests"
REASONS = frozenset(v for k, v in vars(reasons).items() if k.isupper() and isinstance(v, str))
FUZZ_POLICY = """
  - id: fuzz-deny-secrets
    effect: deny
    agents: ["spiffe://dev.local/agent/*"]
    tool: demo
    targets: ["secrets/*"]
    operations: ["*"]
  - id: fuzz-mcp-session
    agents: ["spiffe://dev.local/agent/*"]
    tool: mcp
    targets: [files]
    operations: ["*"]
  - id: fuzz-read-file
    agents: ["spiffe://dev.local/agent/*"]
    tool: read_file
    targets: [files]
    operations: [call]
    max_sensitivity: internal
    arguments:
      - {name: path, prefix: /srv/reports, required: true}
      - {name: max_bytes, max: 65536}
    budget: {max_calls: 1000000}
  - id: fuzz-echo
    agents: ["spiffe://dev.local/agent/*"]
    tool: echo
    targets: [files]
    operations: [call]
boundaries:
  data: {max_ttl: 120, require_certificate_binding: true}
"""
DEFAULT_OPERATIONS = {"GET": "read", "HEAD": "read", "POST": "write", "PUT": "write", "PATCH": "write",
                      "DELETE": "delete"}


def b64url_json(segment: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))


def thumbprint_of(certificate: str) -> str | None:
    """x5t#S256 of the URL-encoded PEM Envoy forwards, read with another parser than the daemon's."""
    try:
        cert = x509.load_pem_x509_certificate(urllib.parse.unquote(certificate).encode())
    except (ValueError, UnicodeEncodeError):
        return None
    digest = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


@dataclass
class World:
    """The Authority, its Check service, an event loop, and every token handed out, live or not."""

    authority: Authority
    service: extauthz.CheckService
    loop: asyncio.AbstractEventLoop
    live: dict[str, str] = field(default_factory=dict)  # name -> token that may be allowed
    dead: dict[str, str] = field(default_factory=dict)  # name -> token that must never be allowed
    certificates: dict[str, str] = field(default_factory=dict)  # agent -> URL-encoded PEM, as Envoy sends

    @property
    def tokens(self) -> dict[str, str]:
        return {**self.live, **self.dead}

    def check(self, request: Any) -> bytes:
        """Answer a CheckRequest (or bytes) as the gRPC handler would: deserialized by the scan."""
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        return self.loop.run_until_complete(self.service.check(extauthz.parse_check_request(raw), None))


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    work = tmp_path_factory.mktemp("fuzz-check")
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + FUZZ_POLICY)  # dev.yaml ends in its rules list
    state = work / "state"
    config = Config(state_dir=state, policy_file=policy, audiences=("tools", "data"),
                    revocation_capacity=1 << 16, budget_capacity=1 << 10, admins=(ALPHA,))
    a = Authority(config)
    a.start()
    loop = asyncio.new_event_loop()
    service = extauthz.CheckService(a.verifiers, a.audit, lambda: a.policy, a.clock, budgets=a.budgets)
    w = World(a, service, loop)
    pki = ensure_dev_pki(state)
    for agent in (ALPHA, BETA):
        out = issue_svid(pki, agent, work / agent.rsplit("/", 1)[1])
        w.certificates[agent] = urllib.parse.quote((out / "svid.pem").read_text())
    bound = {"x5t#S256": thumbprint_of(w.certificates[ALPHA])}

    def grant(tool: str, target: str, ops: list[str], level: str = "internal") -> dict[str, Any]:
        return tokens.grant(tool, target, ops, level)

    plain = a.mint(ALPHA, "t-plain", [grant("demo", "*", ["read", "write"])], intent="fuzz").token
    w.live["plain"] = plain
    w.live["bound"] = a.mint(ALPHA, "t-bound", [grant("demo", "reports/*", ["read"])], cnf=bound).token
    w.live["data"] = a.mint(ALPHA, "t-data", [grant("demo", "*", ["read"])], audience="data", cnf=bound).token
    w.live["data-unbound"] = a.mint(ALPHA, "t-data2", [grant("demo", "*", ["read"])], audience="data").token
    w.live["mcp"] = a.mint(ALPHA, "t-mcp", [
        grant("read_file", "files", ["call"]), grant("echo", "files", ["call"]),
        grant("mcp", "files", ["session", "tools/list"])]).token
    w.live["delegated"] = a.delegate(ALPHA, plain, BETA, [grant("demo", "reports/*", ["read"])]).token
    revoked = a.mint(ALPHA, "t-revoked", [grant("demo", "*", ["read"])])
    a.revoke_token(ALPHA, revoked.token_id)
    w.dead["revoked"] = revoked.token
    w.dead["ended"] = a.mint(ALPHA, "t-ended", [grant("demo", "*", ["read"])]).token
    a.end_task(ALPHA, "t-ended")
    # Forged with the daemon's own key: only the claims are wrong.
    now = int(time.time())
    base = b64url_json(plain.split(".")[1])
    w.dead["expired"] = a.keyring.sign({**base, "iat": now - 4000, "nbf": now - 4000, "exp": now - 3000})
    w.dead["other-issuer"] = a.keyring.sign({**base, "iss": "https://attacker.example"})
    w.dead["wrong-audience"] = a.keyring.sign({**base, "aud": "billing"})
    w.dead["future"] = a.keyring.sign({**base, "iat": now + 600, "nbf": now + 600, "exp": now + 900})
    header, payload, _ = plain.split(".")
    stranger = SigningKey.generate()
    signature = tokens.b64url(stranger.sign(f"{header}.{payload}".encode()).signature)
    w.dead["forged"] = f"{header}.{payload}.{signature}"
    other_sub = tokens.b64url(json.dumps({**base, "sub": BETA}).encode())
    w.dead["tampered"] = f"{header}.{other_sub}.{plain.split('.')[2]}"
    try:
        yield w
    finally:
        loop.close()
        a.stop()


# -- what every answer must be ----------------------------------------------------------------------


def expected_fields(request: Any) -> tuple[str, str, str, str]:
    """(tool, target, operation, sensitivity) by the README's rules, read without extauthz's helpers."""
    http = request.attributes.request.http
    ext = dict(request.attributes.context_extensions)
    tool, target = ext.get("tool"), ext.get("target")
    operation = ext.get("operation") or DEFAULT_OPERATIONS.get(http.method, "")
    if tool is None or target is None:
        path_tool, _, path_target = http.path.split("?", 1)[0].lstrip("/").partition("/")
        tool = path_tool if tool is None else tool
        target = path_target if target is None else target
    body = http.raw_body or http.body.encode()
    if "mcp" in ext and body:  # an MCP route with a body: the JSON-RPC message names tool and operation
        message = json.loads(body)
        if "method" not in message or message["method"] in MCP_SESSION_METHODS:  # a response, or transport
            tool, operation = "mcp", "session"
        elif message["method"] == "tools/call":
            tool, operation = message["params"]["name"], "call"
        else:
            tool, operation = "mcp", message["method"]
    elif "mcp" in ext and http.method in ("GET", "DELETE"):  # the event stream, the session's end
        tool, operation = "mcp", "session"
    return tool, target, operation, ext.get("sensitivity") or "public"


MCP_SESSION_METHODS = {"initialize", "notifications/initialized", "notifications/cancelled", "ping",
                       "server/discover"}  # README "MCP tool calls": the session grant's methods


def covered(claims: dict[str, Any], tool: str, target: str, operation: str, sensitivity: str) -> bool:
    rank = tokens.SENSITIVITY_RANK
    for g in claims["grants"]:
        pattern = g["target"]
        if (g["tool"] == tool and operation in g["ops"] and rank[sensitivity] <= rank[g["sensitivity"]]
                and (target.startswith(pattern[:-1]) if pattern.endswith("*") else target == pattern)):
            return True
    return False


def answer_is_sound(world: World, request: Any, raw: bytes) -> str:
    """Assert everything an answer must be; returns its reason."""
    response = ext_authz.CheckResponse.FromString(raw)
    assert response.HasField("status"), "a CheckResponse without an explicit status"
    assert response.dynamic_metadata.fields["decision_id"].string_value
    if response.status.code != 0:
        assert response.HasField("denied_response") and not response.HasField("ok_response")
        reason = response.status.message
        denied = response.denied_response
        body = json.loads(denied.body)
        if "jsonrpc" in body:  # a denied request on an MCP route: a JSON-RPC error answering its id
            http = request.attributes.request.http
            message = json.loads(http.raw_body or http.body.encode())
            assert "mcp" in request.attributes.context_extensions and message.get("id") is not None
            assert body["id"] == message["id"] and body["error"]["code"] == DENIED_CODE
            data = body["error"]["data"]
            assert data["reason"] == reason and data["status"] == extauthz.http_status_for(reason)
            assert reason in REASONS and reason != reasons.ALLOW, reason
            headers = {h.header.key: h.header.value for h in denied.headers}
            assert denied.status.code == 200 and headers == {"content-type": "application/json"}
            return reason
        assert body == {"error": reason}
        assert reason in REASONS and reason != reasons.ALLOW, reason
        status = denied.status.code
        assert status == extauthz.http_status_for(reason) and status in (400, 401, 403, 429, 503)
        assert (status == 401) == (reason in reasons.UNAUTHENTICATED)
        headers = {h.header.key: h.header.value for h in denied.headers}
        assert ("www-authenticate" in headers) == (status in (401, 403))
        return reason
    # An allow: everything below must hold, checked without the service's own helpers.
    assert response.HasField("ok_response") and not response.HasField("denied_response")
    assert request is not None, "an allow for bytes that are no CheckRequest"
    attributes = request.attributes
    http = attributes.request.http
    scheme, _, token = http.headers["authorization"].partition(" ")
    assert scheme.lower() == "bearer" and token in world.live.values(), "an allow without a live token"
    claims = b64url_json(token.split(".")[1])
    ok = response.ok_response
    headers = {h.header.key: h.header.value for h in ok.headers}
    assert headers == {_check_py.HEADER_AGENT: claims["sub"], _check_py.HEADER_TASK: claims["task"],
                       _check_py.HEADER_TOKEN_ID: claims["jti"]}
    assert "authorization" in ok.headers_to_remove  # the tool never sees the credential
    boundary = attributes.context_extensions.get("boundary") or "tools"
    assert claims["aud"] == boundary, "a token allowed at another boundary"
    source = attributes.source
    assert source.principal in ("", claims["sub"]), "a token allowed for another sender"
    bound = claims.get("cnf", {}).get("x5t#S256")
    if bound is not None:
        if source.certificate:
            assert thumbprint_of(source.certificate) == bound, "a bound token allowed with another cert"
        else:
            assert not world.authority.policy.boundary(boundary).require_certificate_binding
    elif world.authority.policy.boundary(boundary).require_certificate_binding:
        assert source.principal == claims["sub"], "an unbound token allowed without its sender's mTLS"
    tool, target, operation, sensitivity = expected_fields(request)
    assert covered(claims, tool, target, operation, sensitivity), "an allow no grant covers"
    level = tokens.SENSITIVITY_RANK[sensitivity]
    answer = world.authority.policy.permits(claims["sub"], tool, target, operation, level)
    assert answer is None or rule_holds(answer, request), f"an allow the current policy refuses: {answer!r}"
    return reasons.ALLOW


def rule_holds(answer: Any, request: Any) -> bool:
    """Whether the policy's constraints (a ``Constrained`` answer) hold for the request's MCP call: some
    matching rule's argument constraints all hold (budgets are counted, not judged, here)."""
    if not isinstance(answer, Constrained):
        return False
    call = read_call(request.attributes.request.http)
    arguments = call.arguments if isinstance(call, Call) else None
    return any(not extras.arguments or (arguments is not None
                                        and not any(c.problem(arguments) for c in extras.arguments))
               for extras in answer.alternatives)


# -- strategies -------------------------------------------------------------------------------------

TOOLS = st.sampled_from(["demo", "read_file", "echo", "mcp", "files", "", "DEMO", "demo ", "*", "dem"])
TARGETS = st.sampled_from(["reports", "reports/q3", "secrets/key", "secrets", "files", "", "*", "../secrets",
                           "reports/../secrets/x", "reports/%2e%2e/secrets", "a" * 300, "é", "reports/\x00"])
OPERATIONS = st.sampled_from(["read", "write", "delete", "call", "*", "", "READ", "initialize", "tools/list"])
SENSITIVITIES = st.sampled_from(["public", "internal", "confidential", "restricted", "", "secret", "PUBLIC"])
BOUNDARIES = st.sampled_from(["tools", "data", "", "nope", "TOOLS", "data "])
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "CONNECT", "get", "",
                           "BREW"])
TEXT = st.text(max_size=20)
PRINCIPALS = st.sampled_from(["", ALPHA, BETA, ALPHA + "/", "spiffe://other.example/agent/alpha", "alpha"])


def mutate(text: str, rng: random.Random) -> str:
    """One small corruption of ``text``: the shapes a token takes when something mangles it."""
    if not text:
        return text
    i = rng.randrange(len(text))
    return rng.choice([
        text[:i], text[i:], text + rng.choice(["=", ".", "A", " ", "\n", "\x00", "é"]),
        text[:i] + text[i + 1:],
        text[:i] + rng.choice("AQgw-_.+/= ") + text[i + 1:], text.swapcase(), text.replace(".", ". "),
        text + "." + text.rsplit(".", 1)[-1], text.replace("-", "+").replace("_", "/"),
    ])


@st.composite
def authorization(draw: st.DrawFn, world: World) -> str:
    token = draw(st.sampled_from(sorted(world.tokens.values())))
    if draw(st.integers(0, 3)) == 0:
        token = mutate(token, draw(st.randoms(use_true_random=False)))
    form = draw(st.sampled_from([
        "Bearer {}", "Bearer {}", "Bearer {}", "bearer {}", "BEARER {}", "Bearer  {}", "Bearer {} ",
        "Bearer {} {}", "Basic {}", "{}", "Bearer\t{}", "Bearer {},x", "Bearer", "Bearer ", "", "DPoP {}",
        "Bearer {}\r\n", " Bearer {}"]))
    return form.format(token, token) if form.count("{}") == 2 else form.format(token)


def rpc_bodies() -> st.SearchStrategy[bytes]:
    arguments = st.dictionaries(st.sampled_from(["path", "max_bytes", "encoding", "x"]),
                                st.sampled_from(["/srv/reports/q1", "/etc/passwd", "/srv/reports/../../etc",
                                                 4096, 1 << 20, -1, None, "utf-8", [], {}]), max_size=3)
    params = st.fixed_dictionaries({"name": TOOLS}, optional={"arguments": arguments})
    message = st.fixed_dictionaries(
        {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0", 2.0]),
         "method": st.sampled_from(["tools/call", "tools/call", "initialize", "tools/list", "ping",
                                    "notifications/initialized", "x y", ""])},
        optional={"id": st.integers(-3, 1 << 60) | TEXT | st.none(), "params": params | st.just([])})
    valid = message.map(lambda m: json.dumps(m).encode())
    return st.one_of(valid, valid, valid.map(lambda b: b[:-1]), valid.map(lambda b: b"[" + b + b"]"),
                     st.binary(max_size=64), st.just(b""),
                     valid.map(lambda b: b.replace(b'"method"', b'"method":"ping","method"', 1)))


@st.composite
def check_requests(draw: st.DrawFn, world: World) -> Any:
    """A CheckRequest: half shaped to be allowed (a live token at its own route), then disturbed."""
    extensions: dict[str, str] = {}
    headers: dict[str, str] = {}
    principal = certificate = ""
    if draw(st.booleans()):
        name = draw(st.sampled_from(sorted(world.live)))
        token = world.live[name]
        claims = b64url_json(token.split(".")[1])
        g = claims["grants"][0]
        target = g["target"][:-1] + draw(st.sampled_from(["q3", "", "x/y"])) if g["target"].endswith("*") \
            else g["target"]
        extensions.update(tool=g["tool"], target=target, operation=g["ops"][0], sensitivity="public",
                          boundary=claims["aud"])
        headers["authorization"] = f"Bearer {token}"
        if draw(st.booleans()):
            principal = claims["sub"]
        if "cnf" in claims and draw(st.integers(0, 3)):
            certificate = world.certificates[ALPHA]
        method, path = draw(METHODS), f"/{g['tool']}/{target}"
    else:
        method = draw(METHODS)
        path = draw(st.one_of(st.builds(lambda t, x: f"/{t}/{x}", TOOLS, TARGETS), TEXT,
                              st.sampled_from(sorted(world.tokens.values())).map(lambda t: f"/demo/{t}")))
        if draw(st.booleans()):
            headers["authorization"] = draw(authorization(world))
        for key, values in (("tool", TOOLS), ("target", TARGETS), ("operation", OPERATIONS),
                            ("sensitivity", SENSITIVITIES), ("boundary", BOUNDARIES)):
            if draw(st.booleans()):
                extensions[key] = draw(values)
        principal = draw(PRINCIPALS)
        junk = urllib.parse.quote("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        certificate = draw(st.sampled_from(["", "", world.certificates[ALPHA], world.certificates[BETA],
                                            "garbage", junk]))
    # Disturbances, each rare enough that shaped requests still reach an allow.
    body = b""
    if draw(st.integers(0, 3)) == 0:
        extensions["mcp"] = draw(st.sampled_from(["true", "false", ""]))
        body = draw(rpc_bodies())
        headers["content-type"] = draw(st.sampled_from(["application/json", "application/json; charset=utf-8",
                                                        "text/plain", ""]))
        if draw(st.booleans()):
            headers["content-length"] = draw(st.sampled_from([str(len(body)), "0", "-1", "x"]))
        if draw(st.integers(0, 5)) == 0:
            headers["x-envoy-auth-partial-body"] = "true"
    for key in draw(st.lists(st.sampled_from(["tool", "target", "operation", "sensitivity", "boundary"]),
                             max_size=2)):
        if draw(st.integers(0, 2)) == 0:
            extensions[key] = draw(st.one_of(TOOLS, TARGETS, OPERATIONS, SENSITIVITIES, BOUNDARIES))
    if draw(st.integers(0, 4)) == 0:
        headers["authorization"] = draw(authorization(world))
    if draw(st.integers(0, 4)) == 0:
        principal = draw(PRINCIPALS)
    names = st.sampled_from(["x-request-id", "Authorization", "cookie", "x-forwarded-for",
                             "proxy-authorization", "x-agentauthz-agent"]) | TEXT
    values = TEXT | st.sampled_from(sorted(world.tokens.values()))
    headers.update(draw(st.dictionaries(names, values, max_size=3)))
    http = attrs.AttributeContext.HttpRequest(
        id=draw(TEXT | st.sampled_from(sorted(world.tokens.values()))), method=method, path=path,
        headers=headers, host=draw(st.sampled_from(["tools.local", ""])))
    if body:
        if draw(st.booleans()):
            http.raw_body = body
        else:
            try:
                http.body = body.decode()
            except UnicodeDecodeError:
                http.raw_body = body
    if draw(st.integers(0, 9)) == 0:  # Envoy's header_map (encode_raw_headers): no headers map then
        http.header_map.headers.add(key="authorization", raw_value=headers.get("authorization", "").encode())
        http.ClearField("headers")
    return ext_authz.CheckRequest(attributes=attrs.AttributeContext(
        source=attrs.AttributeContext.Peer(principal=principal, certificate=certificate),
        request=attrs.AttributeContext.Request(http=http), context_extensions=extensions))


# -- seeds ------------------------------------------------------------------------------------------


def seed_request(world: World, seed: dict[str, Any]) -> Any:
    """A seed file's request with ``{token:NAME}`` and ``{certificate:AGENT}`` filled in."""
    text = json.dumps(seed["request"])
    for name, token in world.tokens.items():
        text = text.replace("{token:" + name + "}", token)
    for agent, certificate in world.certificates.items():
        text = text.replace("{certificate:" + agent.rsplit("/", 1)[1] + "}", certificate)
    return json_format.Parse(text, ext_authz.CheckRequest())


@pytest.mark.parametrize("path", sorted(SEEDS.glob("*.json")), ids=lambda p: p.stem)
def test_fuzz_check_seed_requests(world: World, path: Path) -> None:
    """Each seed in tests/corpus/check_requests/: a sound answer with the reason the seed names."""
    seed = json.loads(path.read_text())
    request = seed_request(world, seed)
    assert answer_is_sound(world, request, world.check(request)) == seed["expect"]


# -- generated requests ---------------------------------------------------------------------------------


@settings()
@given(st.data())
def test_fuzz_check_requests(world: World, data: st.DataObject) -> None:
    request = data.draw(check_requests(world), label="request")
    reason = answer_is_sound(world, request, world.check(request))
    event(reason)


@settings()
@given(st.data())
def test_fuzz_check_serialized_requests(world: World, data: st.DataObject) -> None:
    """A serialized request with bytes flipped, cut or spliced (invalid UTF-8 in a header, say):
    ``parse_check_request`` and ``check`` answer it, as the gRPC handler would."""
    raw = damaged(data.draw(check_requests(world), label="request").SerializeToString(), data)
    try:
        request = ext_authz.CheckRequest.FromString(raw)
    except DecodeError:
        request = None
    reason = answer_is_sound(world, request, world.check(raw))
    event(reason)
    if request is None:
        assert reason == reasons.REQUEST_INVALID


def test_fuzz_check_every_live_token_is_allowed_where_it_belongs(world: World) -> None:
    """The generators' allows are reachable: each live token at its own route (a guard on the fuzzer)."""
    for name, token in world.live.items():
        claims = b64url_json(token.split(".")[1])
        g = claims["grants"][0]
        target = g["target"][:-1] + "q3" if g["target"].endswith("*") else g["target"]
        extensions = {"tool": g["tool"], "target": target, "operation": g["ops"][0],
                      "boundary": claims["aud"]}
        body = b""
        if g["tool"] == "read_file":
            extensions["mcp"] = "true"
            body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
                "name": "read_file", "arguments": {"path": "/srv/reports/q1"}}}).encode()
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        # An unbound token where binding is required needs its subject's mTLS (Envoy's principal).
        unbound_needs_peer = "cnf" not in claims and \
            world.authority.policy.boundary(claims["aud"]).require_certificate_binding
        request = ext_authz.CheckRequest(attributes=attrs.AttributeContext(
            source=attrs.AttributeContext.Peer(
                certificate=world.certificates[ALPHA] if "cnf" in claims else "",
                principal=claims["sub"] if unbound_needs_peer else ""),
            request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
                method="POST", path="/", headers=headers, raw_body=body)),
            context_extensions=extensions))
        assert answer_is_sound(world, request, world.check(request)) == reasons.ALLOW, name
    for name, token in world.dead.items():
        request = ext_authz.CheckRequest(attributes=attrs.AttributeContext(
            request=attrs.AttributeContext.Request(http=attrs.AttributeContext.HttpRequest(
                method="GET", path="/demo/reports", headers={"authorization": f"Bearer {token}"}))))
        assert answer_is_sound(world, request, world.check(request)) in reasons.UNAUTHENTICATED, name
