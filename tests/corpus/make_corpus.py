"""Regenerate tests/corpus/tokens/: real tokens from a development daemon, hostile ones signed with its key.

    .venv/bin/python tests/corpus/make_corpus.py

Starts ``agentauthz serve`` on development defaults (two trust boundaries, the dev policy plus an MCP
rule), mints, delegates and approves through the real API, then signs hostile variants of a minted
token with the daemon's own current key, so the fuzz tests exercise strictness, not the signature.
Only public keys are kept (``jwks.json``); the state directory and its private keys are deleted.
The expected outcome of each token is computed by the pure verifier and written to ``manifest.json``:
review the diff by eye before committing it. ``policies/`` and ``check_requests/`` are written by hand.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "examples")]

from cryptography.hazmat.primitives import serialization  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402
from processes import Daemon  # noqa: E402

from agentauthz import errors  # noqa: E402
from agentauthz.authority.approvers import issue_dev_credential  # noqa: E402
from agentauthz.client import ApprovalsClient, Client, Identity  # noqa: E402
from agentauthz.decision import _accel, tokens  # noqa: E402
from agentauthz.decision.policy import DEV_POLICY  # noqa: E402
from agentauthz.identity.devca import ensure_dev_pki, issue_svid  # noqa: E402
from agentauthz.v1 import agentauthz_pb2 as pb  # noqa: E402

ISSUER = "https://agentauthz.dev.local"
ALPHA, BETA, GAMMA = (f"spiffe://dev.local/agent/{n}" for n in ("alpha", "beta", "gamma"))
EXTRA_POLICY = """
  - id: corpus-mcp-read-file
    agents: ["spiffe://dev.local/agent/*"]
    tool: read_file
    targets: [files]
    operations: [call]
    max_sensitivity: internal
    arguments:
      - {name: path, prefix: /srv/reports, required: true}
      - {name: max_bytes, max: 65536}
    budget: {max_calls: 20}
boundaries:
  data: {max_ttl: 60}
"""


def b64(data: bytes) -> str:
    return tokens.b64url(data)


def unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def mint_real(work: Path) -> tuple[dict[str, str], dict[str, Any], SigningKey, str]:
    """Tokens minted by a real daemon, its JWKS, and its current signing key (for hostile variants)."""
    policy = work / "policy.yaml"
    policy.write_text(DEV_POLICY.read_text() + EXTRA_POLICY)
    daemon = Daemon(work / "state", {"audiences": ["tools", "data"], "policy_file": str(policy)}).start()
    try:
        pki = ensure_dev_pki(daemon.state_dir)
        clients = {}
        for agent in (ALPHA, BETA, GAMMA):
            out = issue_svid(pki, agent, work / agent.rsplit("/", 1)[1])
            clients[agent] = Client(daemon.api_address, Identity.from_dir(out))
        alpha, beta = clients[ALPHA], clients[BETA]
        out: dict[str, str] = {}
        out["valid-mint"] = alpha.mint("weekly-report", ["demo:*:read,write:internal"],
                                       intent="summarise the weekly reports").token
        out["valid-unicode-intent"] = alpha.mint("résumé-✓", ["demo:reports/*:read"],
                                                 intent="résumé ✓ 日本語 \"quoted\" \\ \u2028").token
        out["valid-data-boundary"] = alpha.mint("t-data", ["demo:*:read"], audience="data").token
        parent = alpha.mint("triage", ["demo:*:read,write:internal"], intent="triage the reports").token
        out["valid-parent"] = parent
        child = alpha.delegate(parent, BETA, ["demo:reports/*:read"], ttl=120,
                               intent="summarise the reports").token
        out["valid-delegated"] = child
        out["valid-delegated-twice"] = beta.delegate(child, GAMMA, ["demo:reports/q3:read"]).token
        constrained = pb.Grant(tool="read_file", target="files", operations=["call"], sensitivity="internal")
        out["valid-mcp-constrained"] = alpha.mint("mcp-1", [constrained]).token
        pending = alpha.mint("cleanup", ["demo:*:read", "demo:reports:delete"], intent="delete old reports")
        humans = ApprovalsClient(daemon.approval_address, issue_dev_credential(daemon.state_dir, "alice"),
                                 (daemon.state_dir / "pki" / "ca.pem").read_bytes())
        humans.approve(pending.pending.id, "ok for this task")
        out["valid-approved"] = alpha.mint("cleanup", ["demo:*:read", "demo:reports:delete"],
                                           intent="delete old reports", approval_id=pending.pending.id).token
        jwks = alpha.jwks()
        keys_dir = daemon.state_dir / "keys"
        ring = json.loads((keys_dir / "keyring.json").read_text())
        kid = next(k["kid"] for k in ring["keys"] if k["state"] == "current")
        private = serialization.load_pem_private_key((keys_dir / f"{kid}.pem").read_bytes(), None)
        raw = private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                    serialization.NoEncryption())
        return out, jwks, SigningKey(raw), kid
    finally:
        daemon.stop()


def hostile(base: str, key: SigningKey, kid: str) -> dict[str, str]:
    """Variants of ``base`` a strict verifier must refuse, most of them correctly signed."""
    h64, p64, s64 = base.split(".")
    header, claims = json.loads(unb64(h64)), json.loads(unb64(p64))

    def signed(header_raw: bytes, payload_raw: bytes) -> str:
        h, p = b64(header_raw), b64(payload_raw)
        return f"{h}.{p}.{b64(key.sign(f'{h}.{p}'.encode()).signature)}"

    def with_header(**changes: Any) -> str:
        return signed(json.dumps({**header, **changes}).encode(), unb64(p64))

    def with_claims(**changes: Any) -> str:
        return signed(unb64(h64), json.dumps({**claims, **changes}).encode())

    def chain(depth: int) -> dict[str, Any]:
        act: dict[str, Any] = {"sub": f"spiffe://dev.local/agent/a{depth}", "idx": 100 + depth}
        for level in range(depth - 1, 0, -1):
            act = {"sub": f"spiffe://dev.local/agent/a{level}", "idx": 100 + level, "act": act}
        return act

    pub = bytes(key.verify_key)
    hs_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': header['typ'], 'kid': kid}).encode())}.{p64}"
    plain_json = json.dumps(claims).encode()
    without = {k: v for k, v in claims.items() if k != "sub"}
    cases: dict[str, Callable[[], str]] = {
        "alg-none": lambda: f"{b64(json.dumps({'alg': 'none', 'typ': header['typ']}).encode())}.{p64}.",
        "alg-none-signed": lambda: with_header(alg="none"),
        "alg-hs256-public-key-as-secret": lambda: hs_input + "." + b64(
            hmac.new(pub, hs_input.encode(), hashlib.sha256).digest()),
        "alg-eddsa-lowercase": lambda: with_header(alg="eddsa"),
        "header-jwk": lambda: with_header(jwk={"kty": "OKP", "crv": "Ed25519", "x": b64(pub)}),
        "header-jku": lambda: with_header(jku="https://attacker.example/jwks.json"),
        "header-x5u": lambda: with_header(x5u="https://attacker.example/cert.pem"),
        "header-x5c": lambda: with_header(x5c=["MIIB"]),
        "header-crit": lambda: with_header(crit=["exp"]),
        "header-extra-param": lambda: with_header(cty="JWT"),
        "header-typ-jwt": lambda: with_header(typ="JWT"),
        "header-typ-uppercase": lambda: with_header(typ="AGENTAUTHZ+JWT"),
        "header-kid-unknown": lambda: with_header(kid="A" * 43),
        "header-kid-path-traversal": lambda: with_header(kid="../../keys/" + kid),
        "header-kid-number": lambda: with_header(kid=7),
        "header-duplicate-alg": lambda: signed(
            b'{"alg":"EdDSA","alg":"none","typ":"agentauthz+jwt","kid":"' + kid.encode() + b'"}', unb64(p64)),
        "header-escaped-duplicate-alg": lambda: signed(
            b'{"alg":"EdDSA","\\u0061lg":"none","typ":"agentauthz+jwt","kid":"' + kid.encode() + b'"}',
            unb64(p64)),
        "header-not-object": lambda: signed(b'["EdDSA"]', unb64(p64)),
        "header-bom": lambda: signed(b"\xef\xbb\xbf" + unb64(h64), unb64(p64)),
        "payload-duplicate-sub": lambda: signed(unb64(h64), plain_json[:-1] + b',"sub":"spiffe://dev.local/'
                                                b'agent/admin"}'),
        "payload-nan": lambda: signed(unb64(h64), plain_json[:-1] + b',"x":NaN}'),
        "payload-huge-float": lambda: signed(unb64(h64), plain_json[:-1] + b',"x":1e999}'),
        "payload-deep-nesting": lambda: signed(unb64(h64), plain_json[:-1] + b',"x":' + b"[" * 1500
                                               + b"]" * 1500 + b"}"),
        "payload-latin1": lambda: signed(unb64(h64), plain_json[:-1] + b',"x":"\xe9"}'),
        "payload-trailing-garbage": lambda: signed(unb64(h64), plain_json + b"x"),
        "payload-two-objects": lambda: signed(unb64(h64), plain_json + plain_json),
        "claims-iss-other": lambda: with_claims(iss="https://attacker.example"),
        "claims-aud-list": lambda: with_claims(aud=[claims["aud"]]),
        "claims-aud-other": lambda: with_claims(aud="billing"),
        "claims-sub-not-spiffe": lambda: with_claims(sub="alice@example.com"),
        "claims-sub-missing": lambda: signed(unb64(h64), json.dumps(without).encode()),
        "claims-exp-float": lambda: with_claims(exp=float(claims["exp"])),
        "claims-exp-string": lambda: with_claims(exp=str(claims["exp"])),
        "claims-iat-bool": lambda: with_claims(iat=True),
        "claims-exp-huge": lambda: with_claims(exp=10 ** 400),
        "claims-lifetime-too-long": lambda: with_claims(exp=claims["iat"] + 86400),
        "claims-expired": lambda: with_claims(iat=claims["iat"] - 4000, nbf=claims["iat"] - 4000,
                                              exp=claims["iat"] - 3000),
        "claims-not-yet-valid": lambda: with_claims(nbf=claims["iat"] + 200),
        "claims-issued-in-future": lambda: with_claims(iat=claims["iat"] + 900, nbf=claims["iat"] + 900,
                                                       exp=claims["iat"] + 1200),
        "claims-grants-empty": lambda: with_claims(grants=[]),
        "claims-grants-object": lambda: with_claims(grants={"tool": "demo"}),
        "claims-grant-unknown-sensitivity": lambda: with_claims(grants=[{**claims["grants"][0],
                                                                         "sensitivity": "secret"}]),
        "claims-grant-star-in-middle": lambda: with_claims(grants=[{**claims["grants"][0], "target": "a*b"}]),
        "claims-too-many-grants": lambda: with_claims(
            grants=[tokens.grant("d", "*", ["r"])] * (tokens.MAX_GRANTS + 1)),
        "claims-intent-too-long": lambda: with_claims(intent="x" * (tokens.MAX_INTENT_CHARS + 1)),
        "claims-status-idx-negative": lambda: with_claims(status={"status_list": {"idx": -1, "uri": "x"}}),
        "claims-status-idx-huge": lambda: with_claims(status={"status_list": {"idx": 2 ** 64, "uri": "x"}}),
        "claims-status-missing": lambda: signed(unb64(h64), json.dumps(
            {k: v for k, v in claims.items() if k != "status"}).encode()),
        "claims-act-too-deep": lambda: with_claims(act=chain(tokens.MAX_DELEGATION_DEPTH + 1)),
        "claims-act-not-object": lambda: with_claims(act="spiffe://dev.local/agent/root"),
        "claims-cnf-string": lambda: with_claims(cnf="x5t"),
        "encoding-padded": lambda: f"{h64}.{p64}.{s64}==",
        "encoding-standard-alphabet": lambda: base.replace("-", "+").replace("_", "/")
        if ("-" in base or "_" in base) else base + "+",
        "encoding-non-canonical-bits": lambda: f"{h64}.{p64}.{s64[:-1]}{chr(ord(s64[-1]) ^ 1)}",
        "encoding-whitespace": lambda: f"{h64}.{p64}.{s64[:20]} {s64[20:]}",
        "encoding-four-segments": lambda: f"{base}.{s64}",
        "encoding-json-serialization": lambda: json.dumps({"protected": h64, "payload": p64,
                                                           "signature": s64}),
        "signature-of-other-token": lambda: f"{h64}.{b64(plain_json.replace(b'read', b'dele'))}.{s64}",
        "signature-truncated": lambda: f"{h64}.{p64}.{s64[:-4]}",
        "too-large": lambda: with_claims(pad="x" * tokens.MAX_TOKEN_BYTES),
    }
    return {f"hostile-{name}": make() for name, make in cases.items()}


def expected(token: str, keys: dict[str, bytes], audience: str, now: int) -> str:
    """``verified`` or the refusing reason, by the pure twin."""
    hot = _accel.pure()
    verifier = hot.Verifier(issuer=ISSUER, audiences={audience}, token_type=tokens.TOKEN_TYPE,
                            revocations=hot.RevocationIndex(hot.Bitset(1 << 16)))
    verifier.set_keys(keys)
    try:
        verifier.verify(token, now)
    except errors.TokenError as exc:
        return exc.reason
    return "verified"


def main() -> None:
    out_dir = HERE / "tokens"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        real, jwks, key, kid = mint_real(Path(tmp))
    for old in out_dir.glob("*.jwt"):
        old.unlink()
    made = {**real, **hostile(real["valid-mint"], key, kid)}
    keys = {k["kid"]: unb64(k["x"]) for k in jwks["keys"]}
    now = max(json.loads(unb64(t.split(".")[1]))["iat"] for t in real.values()) + 1
    manifest: dict[str, Any] = {"issuer": ISSUER, "token_type": tokens.TOKEN_TYPE, "now": now, "tokens": {}}
    for name, token in sorted(made.items()):
        try:
            audience = json.loads(unb64(token.split(".")[1]))["aud"]
        except Exception:  # noqa: BLE001 - a hostile payload: the default boundary
            audience = "tools"
        audience = audience if audience in ("tools", "data") else "tools"
        (out_dir / f"{name}.jwt").write_text(token + "\n")
        manifest["tokens"][f"{name}.jwt"] = {"audience": audience,
                                             "expect": expected(token, keys, audience, now)}
    (out_dir / "jwks.json").write_text(json.dumps(jwks, indent=1, sort_keys=True) + "\n")
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    print(f"wrote {len(made)} tokens to {out_dir}")


if __name__ == "__main__":
    main()
