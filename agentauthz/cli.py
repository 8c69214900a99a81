"""The ``agentauthz`` command line: JSON with ``--json``, non-zero exit and a one-line reason on refusal."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import AgentAuthzError, DaemonError

IDENTITY_FILES = ("svid.pem", "svid.key", "bundle.pem")  # what dev-identity writes


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

    from .decision import _accel
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
    from .decision.policy import check_file
    result = check_file(args.file)
    _emit(args, result, f"{args.file}: ok, {result['rules']} rules, sha256 {result['digest']}")


def cmd_audit_verify(args: argparse.Namespace) -> None:
    from .audit.verify import main_verify
    if not Path(args.dir).is_dir():  # nothing to verify is not a log that fails to verify
        problem = "is not a directory" if Path(args.dir).exists() else "does not exist"
        raise Refusal(f"{args.dir} {problem}: name an audit directory (STATE_DIR/audit, by default "
                      ".agentauthz/audit)")
    also = _cluster_anchor(args) if args.cluster else None
    code, result = main_verify(Path(args.dir), Path(args.checkpoints) if args.checkpoints else None,
                               args.key, Path(args.state_dir) if args.state_dir else None, also)
    if code:
        raise Refusal(f"audit log is not intact: {result['message'].removeprefix('FAIL: ')}", result)
    _emit(args, result, f"{args.dir}: {result['message']}")


def cmd_audit_report(args: argparse.Namespace) -> None:
    from .audit import report
    directory = Path(args.dir)
    if not directory.is_dir():
        raise Refusal(f"{args.dir} is not a directory: name an audit directory (STATE_DIR/audit)")
    if (directory / "audit").is_dir() and not any(directory.glob("audit-*.jsonl")):
        directory = directory / "audit"  # the state directory named instead of its audit directory
    html = Path(args.html) if args.html else None if args.json else Path("agentauthz-audit-report.html")
    if html is not None:
        report.charts.require()  # before reading anything: one clear line when matplotlib is missing
    try:
        since, until = (None if t is None else report.parse_time(t) for t in (args.since, args.until))
    except ValueError as exc:
        raise Refusal(str(exc)) from None
    found = report.build(directory, since, until, args.key, Path(args.state_dir) if args.state_dir else None)
    if html is not None:
        report.write_html(found, html)
    s, result = found["summary"], report.without_events(found)
    text = (f"{html}: {s['checks']} calls by {len(s['agents'])} agents, {len(s['flagged'])} flagged for "
            f"review; integrity: {found['integrity']['message']}")
    if not found["integrity"]["ok"]:
        raise Refusal(f"audit log is not intact (report written anyway): {found['integrity']['message']}",
                      result)
    _emit(args, result, text)


def _cluster_anchor(args: argparse.Namespace) -> Any:
    """``audit verify --cluster``: the node's logs against the checkpoints it published to Redis."""
    from .cluster.checkpoints import node_of, verify_against_cluster
    from .cluster.settings import ClusterSettings
    state = Path(args.state_dir) if args.state_dir else Path(args.dir).parent
    node = args.node_id or node_of(state)
    if not node:
        raise Refusal(f"name the node whose log this is (--node-id): {state} records none")
    settings = ClusterSettings(redis=args.cluster, node_id=node)
    return lambda public: verify_against_cluster(Path(args.dir), public, settings, node)


def cmd_keys_list(args: argparse.Namespace) -> None:
    # Read the metadata only: opening a Keyring could tidy files under a running daemon.
    from .state.keys import METADATA
    state = _config(args).state_dir
    try:
        keys = json.loads((state / "keys" / METADATA).read_text())["keys"]
    except (OSError, ValueError, KeyError) as exc:
        raise Refusal(f"cannot read the keyring in {state}: {exc}") from None
    _emit(args, {"keys": keys}, "\n".join(f"{k['kid']}  {k['state']}" for k in keys))


def cmd_cluster_status(args: argparse.Namespace) -> None:
    from .cluster.settings import ClusterSettings
    from .cluster.status import cluster_status, render
    from .config import Config
    settings = Config.load(args.config).cluster if args.config else None
    if args.cluster:
        settings = ClusterSettings(redis=args.cluster, node_id="status", key_prefix=(
            settings.key_prefix if settings else "agentauthz"))
    if settings is None:
        raise Refusal("name the cluster: --cluster redis://HOST:PORT/DB, or --config with a cluster: section")
    status = cluster_status(settings)
    _emit(args, status, render(status))


def _config(args: argparse.Namespace) -> Any:
    from .config import Config
    config = Config.load(args.config) if getattr(args, "config", None) else Config()
    changes = {name: getattr(args, name) for name in ("check_listen", "api_listen", "http_listen", "workers",
                                                      "approval_listen", "http_check_listen")
               if getattr(args, name, None)}
    if getattr(args, "state_dir", None):
        changes["state_dir"] = Path(args.state_dir)
    if getattr(args, "pki_dir", None):
        changes["pki_dir"] = Path(args.pki_dir)
    if getattr(args, "cluster", None) or getattr(args, "node_id", None):
        changes["cluster"] = _cluster_settings(config, args)
    return config.replace(**changes) if changes else config


def _cluster_settings(config: Any, args: argparse.Namespace) -> Any:
    """``--cluster URL --node-id NAME`` over the config file's ``cluster:`` section."""
    import dataclasses

    from .cluster.settings import ClusterSettings
    current = config.cluster
    redis_url = getattr(args, "cluster", None) or (current.redis if current else None)
    node_id = getattr(args, "node_id", None) or (current.node_id if current else None)
    if not redis_url or not node_id:
        raise Refusal("cluster mode needs both --cluster redis://HOST:PORT/DB and --node-id NAME "
                      "(or a cluster: section in the config file)")
    if current is None:
        return ClusterSettings(redis=redis_url, node_id=node_id)
    return dataclasses.replace(current, redis=redis_url, node_id=node_id)


def cmd_serve(args: argparse.Namespace) -> None:
    import logging

    from .serve.server import run
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = _config(args)
    if config.development:
        logging.getLogger("agentauthz").warning(
            "development mode: trust domain %s, state in %s — not for production",
            config.trust_domain, config.state_dir)
    raise SystemExit(run(config))


def _dev_state(config: Any) -> None:
    """Refuse a state dir that is not a development one, or whose daemon trusts a CA other than pki_dir."""
    from .identity.devca import is_development, pki_dir_of
    state = config.state_dir
    if state.exists() and any(state.iterdir()) and not is_development(state):
        raise Refusal(f"{state} is not a development state directory")
    used = pki_dir_of(state)
    if config.pki_dir and is_development(state) and used.resolve() != config.dev_pki_dir.resolve():
        raise Refusal(f"{state} uses the development CA in {used}, not --pki-dir {config.pki_dir}: its "
                      "daemon would not trust what that one signs (name the same --pki-dir, or none)")


def cmd_dev_identity(args: argparse.Namespace) -> None:
    from .identity.devca import ensure_dev_pki, issue_svid
    config = _config(args)
    if not config.development:
        raise Refusal(f"trust domain {config.trust_domain} is not the development one")
    _dev_state(config)
    out = Path(args.out)
    if os.path.lexists(out) and not out.is_dir():
        raise Refusal(f"--out {out} is not a directory")
    # An identity's private key may be in use: replacing it takes a deliberate --force.
    if not args.force and any(os.path.lexists(out / name) for name in IDENTITY_FILES):
        raise Refusal(f"{out} already holds an identity; --force replaces it")
    pki = ensure_dev_pki(config.state_dir, trust_domain=config.trust_domain, pki_dir=config.pki_dir)
    try:
        issue_svid(pki, args.spiffe_id, out)
    except OSError as exc:
        raise Refusal(f"cannot write the identity to {out}: {exc.strerror or exc}") from None
    _emit(args, {"spiffe_id": args.spiffe_id, "out": args.out},
          f"wrote svid.pem, svid.key, bundle.pem for {args.spiffe_id} to {args.out}")


def _client(args: argparse.Namespace) -> Any:
    from .client import Client, Identity
    identity = None
    if getattr(args, "identity", None):
        where = Path(args.identity)
        if not where.is_dir():
            problem = "is not a directory" if where.exists() else "does not exist"
            raise Refusal(f"--identity {where} {problem}: name the directory holding "
                          f"{', '.join(IDENTITY_FILES)} (make one with `agentauthz dev-identity SPIFFE_ID "
                          f"--out {where}`)")
        try:
            identity = Identity.from_dir(where)
        except OSError as exc:
            raise Refusal(f"--identity {where}: cannot read {Path(exc.filename or where).name}: "
                          f"{exc.strerror or exc} (it needs {', '.join(IDENTITY_FILES)})") from None
    return Client(args.server, identity, check_server=args.server)


def _rpc(call: Callable[[], Any]) -> Any:
    """Run a client call; the daemon's refusal, or no daemon at all, becomes a one-line Refusal."""
    try:
        return call()
    except DaemonError as exc:
        raise Refusal(f"{exc.reason}: {exc}") from None


def cmd_mint(args: argparse.Namespace) -> None:
    from .client import parse_grant
    try:
        grants = [parse_grant(g) for g in args.grant]
    except ValueError as exc:
        raise Refusal(str(exc)) from None
    m = _rpc(lambda: _client(args).mint(args.task, grants, intent=args.intent or "", ttl=args.ttl or 0,
                                       audience=args.audience or "", approval_id=args.approval_id or ""))

    def g(grant: Any) -> dict[str, Any]:
        return {"tool": grant.tool, "target": grant.target, "ops": list(grant.operations),
                "sensitivity": grant.sensitivity}
    from .serve.api import grant_to_dict  # granted: with the argument constraints and budget they carry
    result = {"token": m.token, "token_id": m.token_id, "expires_at": m.expires_at, "task": m.task,
              "agent": m.agent, "key_id": m.key_id, "grants": [grant_to_dict(x) for x in m.grants],
              "denied": [g(x) for x in m.denied], "needs_approval": [g(x) for x in m.needs_approval]}
    if m.approver:
        result["approver"] = m.approver
    if m.HasField("pending"):  # no token: a human must decide first
        result["pending"] = _approval(m.pending)
        then = "" if m.pending.state == "approved" else "once a human approves it, "
        raise Refusal(f"approval_required: request {m.pending.id} is {m.pending.state}; {then}"
                      f"mint again with --approval-id {m.pending.id}", result)
    if m.denied and not args.json:  # the token alone would not say what was left out
        print("not granted: " + " ".join(f"{x.tool}:{x.target}:{','.join(x.operations)}:{x.sensitivity}"
                                         for x in m.denied), file=sys.stderr)
    _emit(args, result, m.token)


def _approval(a: Any) -> dict[str, Any]:
    grants = [{"tool": g.tool, "target": g.target, "ops": list(g.operations), "sensitivity": g.sensitivity}
              for g in a.grants]
    return {"id": a.id, "agent": a.agent, "task": a.task, "intent": a.intent, "grants": grants,
            "expires_at": a.expires_at, "state": a.state, "approver": a.approver, "decided_at": a.decided_at,
            "comment": a.comment}


def _approval_line(a: Any) -> str:
    """One request for a human to read: whatever an agent chose is shown escaped where a terminal would
    act on it (the daemon refuses such grants; requests an older daemon took may still carry them)."""
    grants = " ".join(f"{g.tool}:{g.target}:{','.join(g.operations)}:{g.sensitivity}" for g in a.grants)
    who = f" by {a.approver}" if a.approver else ""
    return shown(f"{a.id}  {a.state}{who}  {a.agent}  task={a.task}  {grants}  expires_at={a.expires_at}")


def shown(text: str) -> str:
    """``text`` with every character a terminal would not print as itself escaped (\\uXXXX)."""
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _approvals_client(args: argparse.Namespace) -> Any:
    from .client import ApprovalsClient
    from .identity.devca import pki_dir_of
    pki_dir = Path(args.pki_dir) if args.pki_dir else None
    ca = Path(args.ca) if args.ca else pki_dir_of(Path(args.state_dir or ".agentauthz"), pki_dir) / "ca.pem"
    try:
        credential = Path(args.credential).read_text(encoding="utf-8").strip()
        ca_pem = ca.read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        raise Refusal(f"cannot read the credential or the CA (name it with --ca): {exc}") from None
    if credential.count(".") != 2 or any(c.isspace() for c in credential):  # RFC 7515 §7.1 compact form
        raise Refusal(f"{args.credential} does not hold one JWT (see agentauthz dev-human)")
    return ApprovalsClient(args.server, credential, ca_pem)


def cmd_approvals(args: argparse.Namespace) -> None:
    found = _rpc(lambda: _approvals_client(args).list(args.state))
    _emit(args, {"approvals": [_approval(a) for a in found]},
          "\n".join(_approval_line(a) for a in found) or f"no {args.state} requests")


def cmd_decide(args: argparse.Namespace) -> None:
    client = _approvals_client(args)
    decide = client.approve if args.approve else client.reject
    a = _rpc(lambda: decide(args.request_id, args.comment or ""))
    _emit(args, _approval(a), _approval_line(a))


def cmd_dev_human(args: argparse.Namespace) -> None:
    from . import durable
    from .authority.approvers import issue_dev_credential
    from .identity.devca import ensure_dev_pki
    config = _config(args)
    if not config.development or config.approvers:
        raise Refusal("dev-human is for the development approver issuer; this configuration names its own")
    state = config.state_dir
    _dev_state(config)
    ensure_dev_pki(state, trust_domain=config.trust_domain, pki_dir=config.pki_dir)
    token = issue_dev_credential(state, args.name, args.ttl)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    durable.replace(out, token.encode() + b"\n", 0o600)  # a bearer credential: owner-only
    _emit(args, {"name": args.name, "out": args.out, "ttl": args.ttl},
          f"wrote a {args.ttl} s approver credential for {args.name} to {args.out}")


def cmd_delegate(args: argparse.Namespace) -> None:
    from .client import parse_grant
    try:
        grants = [parse_grant(g) for g in args.grant]
    except ValueError as exc:
        raise Refusal(str(exc)) from None
    m = _rpc(lambda: _client(args).delegate(args.token, args.to, grants, ttl=args.ttl or 0,
                                           intent=args.intent or ""))
    granted = [{"tool": g.tool, "target": g.target, "ops": list(g.operations), "sensitivity": g.sensitivity}
               for g in m.grants]
    result = {"token": m.token, "token_id": m.token_id, "expires_at": m.expires_at, "task": m.task,
              "agent": m.agent, "key_id": m.key_id, "grants": granted, "approver": m.approver}
    _emit(args, result, m.token)


def cmd_revoke(args: argparse.Namespace) -> None:
    client = _client(args)
    at = _rpc(lambda: client.revoke(token_id=args.token_id or "", task=args.task or "",
                                    agent=args.agent or "", key_id=args.key_id or ""))
    _emit(args, {"revoked_at": at}, f"revoked at {at}")


def cmd_unban(args: argparse.Namespace) -> None:
    at = _rpc(lambda: _client(args).unban(args.agent))
    _emit(args, {"unbanned_at": at}, f"unbanned at {at}")


def cmd_check(args: argparse.Namespace) -> None:
    from .decision.tokens import SENSITIVITY_LEVELS
    if args.sensitivity not in SENSITIVITY_LEVELS:  # the daemon would only say request_invalid
        raise Refusal(f"--sensitivity {args.sensitivity!r} is not one of {', '.join(SENSITIVITY_LEVELS)}")
    d = _rpc(lambda: _client(args).check(args.token, args.tool, args.target, args.operation,
                                         args.sensitivity, boundary=args.boundary or ""))
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


DESCRIPTION = """agentauthz: an ext_authz authorization daemon for AI agents, and its client.

Run `agentauthz serve` for the daemon; the other commands talk to it or read its state directory.
Each prints its result (JSON with --json) and exits 0; a refusal prints one line
"agentauthz: REASON: what happened" on stderr and exits 1. `agentauthz COMMAND --help` shows a
command's options."""

GRANT_SYNTAX = """grants: --grant TOOL:TARGET:OPS[:SENSITIVITY], repeated once per grant
  TOOL         a tool the policy names, e.g. demo
  TARGET       one target (reports), a prefix ending in * (reports/*), or * for every target
  OPS          comma-separated operations the policy gives for TOOL, e.g. read,write
               (the development policy: read and write; delete once a human approves)
  SENSITIVITY  public, internal, confidential or restricted (default public): the most
               sensitive data the grant may reach
example: --grant 'demo:*:read' --grant 'demo:reports/*:read,write:internal'"""

API_SERVER = "the daemon's API address, HOST:PORT (default: %(default)s)"
IDENTITY = ("directory holding this agent's svid.pem, svid.key and bundle.pem, as dev-identity writes "
            "them (required)")
STATE_DIR = "the daemon's state directory (default: the config's state_dir, else .agentauthz)"
PKI_DIR = ("the development CA's directory, which several development daemons may share (default: the "
           "config's pki_dir, else the one STATE_DIR already uses, else STATE_DIR/pki)")
CONFIG = "the daemon's YAML configuration file (default: none, the development defaults)"


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions and the grant syntax keep their lines; options wrap as usual."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentauthz", description=DESCRIPTION, formatter_class=_Help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[[argparse.Namespace], None], helptext: str,
                parent: Any = sub, epilog: str | None = None) -> argparse.ArgumentParser:
        p = parent.add_parser(name, help=helptext, description=helptext, epilog=epilog, formatter_class=_Help)
        p.add_argument("--json", action="store_true", help="print the result as JSON (default: text)")
        p.set_defaults(handler=handler)
        return p

    command("version", cmd_version, "show the version and which hot path is active")

    p = command("serve", cmd_serve, "run the daemon (development defaults without --config); Ctrl-C or "
                "SIGTERM drains and stops it, SIGHUP reloads the policy")
    p.add_argument("--config", help=CONFIG)
    p.add_argument("--state-dir", help=STATE_DIR)
    p.add_argument("--pki-dir", help=PKI_DIR)
    p.add_argument("--check-listen", help="where Envoy asks for decisions: HOST:PORT or unix:PATH "
                   "(default: the config's check_listen, else 127.0.0.1:9191)")
    p.add_argument("--http-check-listen", help="Envoy's HTTP ext_authz (http_service) too, served by "
                   "granian and decided as Check is: HOST:PORT or unix:PATH (default: the config's "
                   "http_check_listen, else off; README \"The HTTP Check\")")
    p.add_argument("--api-listen", help="where agents mint, revoke and delegate, always mTLS: HOST:PORT "
                   "(default: the config's api_listen, else 127.0.0.1:9190)")
    p.add_argument("--http-listen", help="/healthz, /metrics, JWKS and status lists: HOST:PORT "
                   "(default: the config's http_listen, else 127.0.0.1:9192)")
    p.add_argument("--workers", type=int, help="Check worker processes sharing the Check listener "
                   "(default: the config's workers, else 1)")
    p.add_argument("--approval-listen", help="the humans' Approvals service, TLS: HOST:PORT "
                   "(default: the config's approval_listen, else 127.0.0.1:9193)")
    p.add_argument("--cluster", metavar="URL", help="join a cluster sharing state through Redis: "
                   "redis://HOST:PORT/DB (default: the config's cluster.redis, else one daemon on its own)")
    p.add_argument("--node-id", help="this daemon's name in the cluster, unique (default: the config's "
                   "cluster.node_id; required with --cluster)")
    p.add_argument("-v", "--verbose", action="store_true", help="log at debug level (default: info)")

    p = command("dev-identity", cmd_dev_identity, "issue a development X.509-SVID (the development trust "
                "domain only)")
    p.add_argument("spiffe_id", help="the workload's SPIFFE ID, e.g. spiffe://dev.local/agent/alpha")
    p.add_argument("--out", required=True, help="directory to write svid.pem, svid.key, bundle.pem to "
                   "(required)")
    p.add_argument("--force", action="store_true", help="replace an identity already in --out "
                   "(default: refuse)")
    p.add_argument("--state-dir", help=STATE_DIR)
    p.add_argument("--pki-dir", help=PKI_DIR)
    p.add_argument("--config", help=CONFIG)

    p = command("mint", cmd_mint, "mint a task token: prints the token", epilog=GRANT_SYNTAX)
    p.add_argument("--server", default="127.0.0.1:9190", help=API_SERVER)
    p.add_argument("--identity", required=True, help=IDENTITY)
    p.add_argument("--task", required=True, help="the task's name, single-use per agent: once the task "
                   "ends, mint under a new name (required)")
    p.add_argument("--grant", action="append", required=True, metavar="GRANT",
                   help="TOOL:TARGET:OPS[:SENSITIVITY]; repeat --grant for each grant (required: at least "
                   "one; syntax below)")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: the policy's max_ttl, capped by "
                   "the daemon's max_token_lifetime)")
    p.add_argument("--audience", help="the trust boundary the token is for (default: the daemon's first "
                   "audience)")
    p.add_argument("--intent", help="why the agent wants it, kept in the token and the audit log "
                   "(default: none)")
    p.add_argument("--approval-id", help="mint under this approved request: same task, the approved grants "
                   "(default: none; a gated grant then opens a request)")

    p = command("dev-human", cmd_dev_human, "write a development approver credential (a short-lived JWT)")
    p.add_argument("name", help="the human's name: the credential's subject")
    p.add_argument("--out", required=True, help="file to write the credential to, owner-only (required)")
    p.add_argument("--ttl", type=int, default=900, help="lifetime in seconds (default: %(default)s)")
    p.add_argument("--state-dir", help=STATE_DIR)
    p.add_argument("--pki-dir", help=PKI_DIR)
    p.add_argument("--config", help=CONFIG)

    def approvals_command(name: str, handler: Callable[[argparse.Namespace], None],
                          helptext: str) -> argparse.ArgumentParser:
        p = command(name, handler, helptext)
        p.add_argument("--server", default="127.0.0.1:9193",
                       help="the daemon's Approvals address, HOST:PORT (default: %(default)s)")
        p.add_argument("--credential", required=True, help="file with the approver's JWT, e.g. from "
                       "dev-human (required)")
        p.add_argument("--ca", help="CA of the daemon's certificate (default: ca.pem of the development "
                       "CA, see --pki-dir)")
        p.add_argument("--state-dir", help="a development state directory, for its CA "
                       "(default: .agentauthz)")
        p.add_argument("--pki-dir", help="the development CA's directory (default: the one STATE_DIR "
                       "uses, else STATE_DIR/pki)")
        return p

    p = approvals_command("approvals", cmd_approvals, "list approval requests (a human's credential)")
    p.add_argument("--state", default="pending", choices=["pending", "approved", "rejected", "expired"],
                   help="which requests: pending, approved, rejected or expired (default: %(default)s)")
    for name, approve in (("approve", True), ("reject", False)):
        p = approvals_command(name, cmd_decide, f"{name} a pending approval request")
        p.add_argument("request_id", help="the request's id, as approvals lists it")
        p.add_argument("--comment", help="why, kept with the decision and in the audit log "
                       "(default: none)")
        p.set_defaults(approve=approve)

    p = command("delegate", cmd_delegate, "a child token for another agent, inside your own token: "
                "prints the token", epilog=GRANT_SYNTAX)
    p.add_argument("--server", default="127.0.0.1:9190", help=API_SERVER)
    p.add_argument("--identity", required=True, help=IDENTITY)
    p.add_argument("--token", required=True, help="your own (parent) token (required)")
    p.add_argument("--to", required=True, help="the child agent's SPIFFE ID (required)")
    p.add_argument("--grant", action="append", required=True, metavar="GRANT",
                   help="TOOL:TARGET:OPS[:SENSITIVITY], inside a grant of the parent; repeat --grant for "
                   "each grant (required: at least one; syntax below)")
    p.add_argument("--ttl", type=int, help="lifetime in seconds (default: as long as policy allows, "
                   "never past the parent's)")
    p.add_argument("--intent", help="why, kept in the token and the audit log (default: none)")

    p = command("revoke", cmd_revoke, "revoke a token, end a task, revoke a signing key, or ban an agent "
                "(until unban); name exactly one")
    p.add_argument("--server", default="127.0.0.1:9190", help=API_SERVER)
    p.add_argument("--identity", required=True, help=IDENTITY)
    which = p.add_mutually_exclusive_group(required=True)
    for flag, what in (("--token-id", "one token, by its token_id"), ("--task", "every token of one of "
                       "your tasks; the task name cannot be used again"),
                       ("--agent", "ban an agent: every token naming it (admin identity, or the agent "
                        "itself)"), ("--key-id", "a signing key and every token it signed (admin identity)")):
        which.add_argument(flag, help=f"{what} (no default: name one of the four)")

    p = command("unban", cmd_unban, "lift the ban revoking an agent put on it (admin identity)")
    p.add_argument("--server", default="127.0.0.1:9190", help=API_SERVER)
    p.add_argument("--identity", required=True, help=IDENTITY)
    p.add_argument("--agent", required=True, help="the banned agent's SPIFFE ID (required)")

    p = command("check", cmd_check, "ask for a decision as Envoy would; exit 0 allow, 1 deny")
    p.add_argument("--server", default="127.0.0.1:9191",
                   help="the daemon's Check address, HOST:PORT (default: %(default)s)")
    p.add_argument("--token", help="the bearer token (default: none, which is denied token_missing)")
    p.add_argument("--tool", required=True, help="the tool called, e.g. demo (required)")
    p.add_argument("--target", required=True, help="the target called, e.g. reports (required)")
    p.add_argument("--operation", required=True, help="the operation, e.g. read, write, delete (required)")
    p.add_argument("--sensitivity", default="public", help="the data's sensitivity: public, internal, "
                   "confidential or restricted (default: %(default)s)")
    p.add_argument("--boundary", help="the trust boundary the route names (its boundary context "
                   "extension; default: the daemon's first audience)")

    policy = sub.add_parser("policy", help="policy files", description="policy files", formatter_class=_Help)
    policy_commands = policy.add_subparsers(dest="policy_command", required=True, metavar="COMMAND")
    command("check", cmd_policy_check, "validate a policy file", policy_commands).add_argument(
        "file", help="the policy YAML file")

    audit = sub.add_parser("audit", help="audit log", description="audit log", formatter_class=_Help)
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    p = command("verify", cmd_audit_verify, "verify the hash chain and signed checkpoints of the log in "
                "DIR and of every worker's log under it", audit_commands)
    p.add_argument("dir", help="the audit directory, STATE_DIR/audit (e.g. .agentauthz/audit)")
    p.add_argument("--checkpoints", help="an exported checkpoints.jsonl to verify against (default: none)")
    p.add_argument("--key", help="the audit public key the operator pinned: a file (PEM, JWK) or its base64 "
                   "(default: STATE_DIR/audit-key/public.pem, never a key inside DIR)")
    p.add_argument("--state-dir", help="where the pinned key is (default: DIR's parent)")
    p.add_argument("--cluster", metavar="URL", help="also verify against the checkpoints this node "
                   "published to the cluster's Redis, which a truncation of the node's files cannot reach "
                   "(default: no)")
    p.add_argument("--node-id", help="with --cluster, the node the log is of (default: the one the state "
                   "directory joined as)")

    p = command("report", cmd_audit_report, "what each agent did and tried, per task: a self-contained HTML "
                "page for a security reviewer (and JSON), from the log in DIR and every worker's under it",
                audit_commands)
    p.add_argument("dir", help="the audit directory, STATE_DIR/audit (e.g. .agentauthz/audit)")
    p.add_argument("--since", help="leave out records before this time: epoch seconds, ISO 8601 "
                   "(2026-01-31T12:00:00Z) or an age (90m, 24h, 7d) (default: the log's start)")
    p.add_argument("--until", help="leave out records after this time, same forms (default: the log's end)")
    p.add_argument("--html", metavar="FILE", help="write the page here (default: "
                   "agentauthz-audit-report.html, or no page with --json)")
    p.add_argument("--key", help="the pinned audit public key, as for audit verify (default: "
                   "STATE_DIR/audit-key/public.pem)")
    p.add_argument("--state-dir", help="where the pinned key is (default: DIR's parent)")

    keys = sub.add_parser("keys", help="signing keys", description="signing keys", formatter_class=_Help)
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    p = command("list", cmd_keys_list, "list the keyring in a state directory", keys_commands)
    p.add_argument("--config", help=CONFIG)
    p.add_argument("--state-dir", help=STATE_DIR)
    p = command("rotate", cmd_keys_rotate, "force a key rotation (admin identity)", keys_commands)
    p.add_argument("--server", default="127.0.0.1:9190", help=API_SERVER)
    p.add_argument("--identity", required=True, help=IDENTITY)

    cluster = sub.add_parser("cluster", help="cluster mode", description="cluster mode",
                             formatter_class=_Help)
    cluster_commands = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    p = command("status", cmd_cluster_status, "every node's last applied stream entry, lag and staleness, "
                "as each last reported it to Redis", cluster_commands)
    p.add_argument("--cluster", metavar="URL", help="the cluster's Redis, redis://HOST:PORT/DB (default: the "
                   "config's cluster.redis)")
    p.add_argument("--config", help=CONFIG)
    return parser


# Options whose values are random base64url of a fixed length: an audit public key, a key id (a JWK
# thumbprint), a token id. One value in 64 begins with "-", which argparse takes for an option.
_BASE64URL_VALUES = {flag: re.compile(f"-[A-Za-z0-9_-]{{{length - 1}}}")
                     for flag, length in (("--key", 43), ("--key-id", 43), ("--token-id", 22))}


def _values_attached(argv: list[str]) -> list[str]:
    """``--token-id -abc…`` as ``--token-id=-abc…``: a value the daemon printed, pasted as shown, is that
    value and not an unknown option."""
    out: list[str] = []
    for arg in argv:
        shape = _BASE64URL_VALUES.get(out[-1]) if out else None
        if shape is not None and shape.fullmatch(arg):
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_values_attached(sys.argv[1:] if argv is None else argv))
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
