"""The ``agentauthz`` command line: JSON with ``--json``, non-zero exit and a one-line reason on refusal."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import AgentAuthzError


class Refusal(Exception):
    """A command that ran but said no: exit 1 with the reason on stderr."""

    def __init__(self, message: str, result: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.result = result


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True))
    else:
        print(text)


def cmd_version(args: argparse.Namespace) -> None:
    import nacl

    from . import _accel
    result = {
        "version": __version__,
        "native": _accel.NATIVE,
        "implementation": _accel.ACTIVE.name,
        "fallback_reason": _accel.FALLBACK_REASON,
        "python": platform.python_version(),
        "pynacl": nacl.__version__,
    }
    _emit(args, result, f"agentauthz {__version__} ({_accel.ACTIVE.name} hot path)")


def cmd_policy_check(args: argparse.Namespace) -> None:
    from .policy import check_file
    result = check_file(args.file)
    _emit(args, result, f"{args.file}: ok, {result['rules']} rules, sha256 {result['digest']}")


def cmd_audit_verify(args: argparse.Namespace) -> None:
    from .audit import main_verify
    code, result = main_verify(Path(args.dir), Path(args.checkpoints) if args.checkpoints else None,
                               Path(args.key) if args.key else None)
    if code:
        raise Refusal(f"audit log is not intact: {result['first_bad']}", result)
    _emit(args, result, f"{args.dir}: {result['message']}")


def cmd_keys_list(args: argparse.Namespace) -> None:
    # Read the metadata only: opening a Keyring could tidy files under a running daemon.
    from .keys import METADATA
    state = _config(args).state_dir
    try:
        keys = json.loads((state / "keys" / METADATA).read_text())["keys"]
    except (OSError, ValueError, KeyError) as exc:
        raise Refusal(f"cannot read the keyring in {state}: {exc}") from None
    _emit(args, {"keys": keys}, "\n".join(f"{k['kid']}  {k['state']}" for k in keys))


def _config(args: argparse.Namespace) -> Any:
    from .config import Config
    config = Config.load(args.config) if getattr(args, "config", None) else Config()
    changes = {name: getattr(args, name) for name in ("check_listen", "api_listen", "http_listen", "workers")
               if getattr(args, name, None)}
    if getattr(args, "state_dir", None):
        changes["state_dir"] = Path(args.state_dir)
    return config.replace(**changes) if changes else config


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from .server import run
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _config(args)
    if config.development:
        logging.getLogger("agentauthz").warning(
            "development mode: trust domain %s, state in %s — not for production",
            config.trust_domain, config.state_dir)
    raise SystemExit(run(config))


def cmd_dev_identity(args: argparse.Namespace) -> None:
    from .devca import ensure_dev_pki, is_development, issue_svid
    config = _config(args)
    if not config.development:
        raise Refusal(f"trust domain {config.trust_domain} is not the development one")
    state = config.state_dir
    if state.exists() and any(state.iterdir()) and not is_development(state):
        raise Refusal(f"{state} is not a development state directory")
    pki = ensure_dev_pki(config.state_dir, trust_domain=config.trust_domain)
    issue_svid(pki, args.spiffe_id, Path(args.out))
    _emit(args, {"spiffe_id": args.spiffe_id, "out": args.out},
          f"wrote svid.pem, svid.key, bundle.pem for {args.spiffe_id} to {args.out}")


def _client(args: argparse.Namespace) -> Any:
    from .client import Client, Identity
    identity = Identity.from_dir(args.identity) if getattr(args, "identity", None) else None
    return Client(args.server, identity, check_server=args.server)


def _rpc(call: Callable[[], Any]) -> Any:
    """Run a client call; a gRPC refusal becomes a one-line Refusal."""
    import grpc
    try:
        return call()
    except grpc.RpcError as exc:
        raise Refusal(f"{exc.code().name.lower()}: {exc.details()}") from None


def cmd_mint(args: argparse.Namespace) -> None:
    from .client import parse_grant
    try:
        grants = [parse_grant(g) for g in args.grant]
    except ValueError as exc:
        raise Refusal(str(exc)) from None
    m = _rpc(lambda: _client(args).mint(args.task, grants, intent=args.intent or "", ttl=args.ttl or 0,
                                       audience=args.audience or ""))

    def g(grant: Any) -> dict[str, Any]:
        return {"tool": grant.tool, "target": grant.target, "ops": list(grant.operations),
                "sensitivity": grant.sensitivity}
    result = {"token": m.token, "token_id": m.token_id, "expires_at": m.expires_at, "task": m.task,
              "agent": m.agent, "key_id": m.key_id, "grants": [g(x) for x in m.grants],
              "denied": [g(x) for x in m.denied], "needs_approval": [g(x) for x in m.needs_approval]}
    _emit(args, result, m.token)


def cmd_revoke(args: argparse.Namespace) -> None:
    client = _client(args)
    at = _rpc(lambda: client.revoke(token_id=args.token_id or "", task=args.task or "",
                                    agent=args.agent or "", key_id=args.key_id or ""))
    _emit(args, {"revoked_at": at}, f"revoked at {at}")


def cmd_check(args: argparse.Namespace) -> None:
    d = _rpc(lambda: _client(args).check(args.token, args.tool, args.target, args.operation,
                                         args.sensitivity))
    result = {"allowed": d.allowed, "status": d.status, "reason": d.reason, "headers": d.headers,
              "decision_id": d.decision_id}
    if not d.allowed:
        raise Refusal(f"denied: {d.reason} (HTTP {d.status})", result)
    _emit(args, result, f"allowed ({d.decision_id})")


def cmd_keys_rotate(args: argparse.Namespace) -> None:
    from .v1 import agentauthz_pb2 as pb
    client = _client(args)
    kid = _rpc(lambda: client._stub().RotateKeys(pb.RotateKeysRequest(), timeout=5).current_key_id)
    _emit(args, {"current_key_id": kid}, kid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentauthz", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, handler: Callable[[argparse.Namespace], None], helptext: str,
                parent: Any = sub) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=helptext)
        p.add_argument("--json", action="store_true", help="print the result as JSON")
        p.set_defaults(handler=handler)
        return p

    command("version", cmd_version, "show the version and which hot path is active")

    p = command("serve", cmd_serve, "run the daemon (development defaults without --config)")
    p.add_argument("--config")
    p.add_argument("--state-dir")
    p.add_argument("--check-listen", help="HOST:PORT or unix:PATH (default 127.0.0.1:9191)")
    p.add_argument("--api-listen", help="HOST:PORT (default 127.0.0.1:9190, always mTLS)")
    p.add_argument("--http-listen", help="HOST:PORT (default 127.0.0.1:9192)")
    p.add_argument("--workers", type=int, help="Check worker processes sharing the listener (default 1)")
    p.add_argument("-v", "--verbose", action="store_true")

    p = command("dev-identity", cmd_dev_identity, "issue a development X.509-SVID")
    p.add_argument("spiffe_id")
    p.add_argument("--out", required=True)
    p.add_argument("--state-dir")
    p.add_argument("--config")

    p = command("mint", cmd_mint, "mint a task token")
    p.add_argument("--server", default="127.0.0.1:9190")
    p.add_argument("--identity", required=True, help="directory with svid.pem, svid.key, bundle.pem")
    p.add_argument("--task", required=True)
    p.add_argument("--grant", action="append", required=True, help="TOOL:TARGET:OPS[:SENSITIVITY]")
    p.add_argument("--ttl", type=int)
    p.add_argument("--audience")
    p.add_argument("--intent")

    p = command("revoke", cmd_revoke, "revoke a token, task, agent or signing key")
    p.add_argument("--server", default="127.0.0.1:9190")
    p.add_argument("--identity", required=True)
    which = p.add_mutually_exclusive_group(required=True)
    for flag in ("--token-id", "--task", "--agent", "--key-id"):
        which.add_argument(flag)

    p = command("check", cmd_check, "ask for a decision as Envoy would; exit 0 allow, 1 deny")
    p.add_argument("--server", default="127.0.0.1:9191")
    p.add_argument("--token")
    p.add_argument("--tool", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--operation", required=True)
    p.add_argument("--sensitivity", default="public")

    policy = sub.add_parser("policy", help="policy files").add_subparsers(
        dest="policy_command", required=True)
    command("check", cmd_policy_check, "validate a policy file", policy).add_argument("file")

    audit = sub.add_parser("audit", help="audit log").add_subparsers(dest="audit_command", required=True)
    p = command("verify", cmd_audit_verify, "verify the hash chain and signed checkpoints", audit)
    p.add_argument("dir")
    p.add_argument("--checkpoints", help="an exported checkpoints.jsonl to verify against")
    p.add_argument("--key", help="the audit public key (PEM) to pin, instead of the one in DIR")

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    p = command("list", cmd_keys_list, "list the keyring in a state directory", keys)
    p.add_argument("--config")
    p.add_argument("--state-dir")
    p = command("rotate", cmd_keys_rotate, "force a key rotation (admin identity)", keys)
    p.add_argument("--server", default="127.0.0.1:9190")
    p.add_argument("--identity", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except Refusal as exc:
        if args.json and exc.result is not None:
            print(json.dumps(exc.result, sort_keys=True))
        print(f"agentauthz: {exc}", file=sys.stderr)
        return 1
    except AgentAuthzError as exc:
        print(f"agentauthz: {exc.reason}: {exc}", file=sys.stderr)
        return 1
    return 0
