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
    from .audit import verify_dir
    report = verify_dir(Path(args.dir), checkpoints=Path(args.checkpoints) if args.checkpoints else None)
    result = {"ok": report.ok, "records": report.records, "checkpoints": report.checkpoints,
              "first_bad": report.first_bad}
    if not report.ok:
        raise Refusal(f"audit log is not intact: {report.first_bad}", result)
    _emit(args, result, f"{args.dir}: ok, {report.records} records, {report.checkpoints} checkpoints")


def cmd_keys_list(args: argparse.Namespace) -> None:
    from .config import Config
    from .keys import Keyring
    config = Config.load(args.config) if args.config else Config()
    state = Path(args.state_dir) if args.state_dir else config.state_dir
    ring = Keyring.open(state / "keys", rotation_interval=config.rotation_interval,
                        max_token_lifetime=config.max_token_lifetime, leeway=config.leeway)
    keys = ring.list()
    _emit(args, {"keys": keys}, "\n".join(f"{k['kid']}  {k['state']}" for k in keys))


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

    policy = sub.add_parser("policy", help="policy files").add_subparsers(dest="policy_command", required=True)
    command("check", cmd_policy_check, "validate a policy file", policy).add_argument("file")

    audit = sub.add_parser("audit", help="audit log").add_subparsers(dest="audit_command", required=True)
    p = command("verify", cmd_audit_verify, "verify the hash chain and signed checkpoints", audit)
    p.add_argument("dir")
    p.add_argument("--checkpoints", help="an exported checkpoints.jsonl to verify against")

    keys = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_command", required=True)
    p = command("list", cmd_keys_list, "list the keyring in a state directory", keys)
    p.add_argument("--config")
    p.add_argument("--state-dir")
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
