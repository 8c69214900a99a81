"""Errors a person can act on: the real CLI (and daemon) answer one line naming the problem and its fix."""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import grpc
import pytest
from processes import ROOT, Daemon, free_port

from agentauthz import errors
from agentauthz.cli import _values_attached, build_parser
from agentauthz.client import _ERROR_BY_STATUS, AsyncClient, Client, Identity
from agentauthz.config import Config
from agentauthz.identity.devca import ensure_dev_pki, issue_svid
from agentauthz.serve import listeners
from agentauthz.serve.server import Daemon as InProcessDaemon

ALPHA = "spiffe://dev.local/agent/alpha"
ADMIN = "spiffe://dev.local/admin/ops"
LEVELS = "public, internal, confidential, restricted"
FLAGS = {name: f"--{name}-listen" for name in ("check", "api", "http", "approval")}


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentauthz", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal's single stderr line; the command failed and printed no traceback."""
    assert done.returncode != 0, done.stdout
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("agentauthz: ")]
    assert len(lines) == 1 and lines[0] == done.stderr.strip().splitlines()[-1], done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("cli-errors")
    d = Daemon(work / "state", {"admins": [ADMIN]}).start(30.0)
    pki = ensure_dev_pki(d.state_dir)
    issue_svid(pki, ALPHA, work / "alpha")
    issue_svid(pki, ADMIN, work / "admin")
    try:
        yield d
    finally:
        d.stop()


def identity(daemon: Daemon, name: str = "alpha") -> str:
    return str(daemon.state_dir.parent / name)


def test_mint_with_an_identity_that_is_missing_or_a_file_names_it_and_dev_identity(tmp_path: Path) -> None:
    a_file = tmp_path / "svid.pem"
    a_file.write_text("not a directory")
    for where, problem in ((tmp_path / "missing", "does not exist"), (a_file, "is not a directory")):
        line = one_line(cli("mint", "--identity", str(where), "--task", "t", "--grant", "demo:*:read"))
        assert line.startswith(f"agentauthz: --identity {where} {problem}: "), line
        assert "svid.pem, svid.key, bundle.pem" in line and "agentauthz dev-identity" in line, line


@pytest.mark.parametrize("listener", sorted(FLAGS))
@pytest.mark.parametrize("holder", ["another daemon", "another program"])
def test_a_listen_address_in_use_is_named_with_its_option_and_nothing_is_created(
        daemon: Daemon, tmp_path: Path, listener: str, holder: str) -> None:
    ports = {name: free_port() for name in FLAGS}
    with socket.socket() as squatter:
        if holder == "another daemon":  # gRPC's SO_REUSEPORT once shared its Check port without a word
            ports[listener] = getattr(daemon, f"{listener}_port")
        else:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            ports[listener] = squatter.getsockname()[1]
        state = tmp_path / "state"
        addresses = (arg for name, flag in FLAGS.items() for arg in (flag, f"127.0.0.1:{ports[name]}"))
        done = cli("serve", "--state-dir", str(state), *addresses, timeout=30)
    address = f"127.0.0.1:{ports[listener]}"
    assert one_line(done) == (
        f"agentauthz: config_invalid: cannot listen on {address} ({FLAGS[listener]}, or {listener}_listen "
        f"in the config): address already in use; stop what listens there or choose another address with "
        f"{FLAGS[listener]}")
    assert not state.exists()  # no half-made state directory to trip over on the next start


@pytest.mark.parametrize("listener", ["check", "http_check"])
def test_a_daemon_starting_on_the_check_address_of_one_still_starting_refuses_it(
        tmp_path: Path, listener: str) -> None:
    """Both bind it with SO_REUSEPORT, which would let them share it without a word; the first holds it
    from its first moment (``listeners.reserve``, what ``serve`` does before anything else) in a way
    the second's own first step cannot bind beside."""
    flags = {**FLAGS, "http_check": "--http-check-listen"}
    first = Config().replace(**{f"{name}_listen": f"127.0.0.1:{free_port()}" for name in flags})
    held = listeners.reserve(first)
    try:
        address = getattr(first, f"{listener}_listen")
        ports = {name: address if name == listener else f"127.0.0.1:{free_port()}" for name in flags}
        state = tmp_path / "state"
        done = cli("serve", "--state-dir", str(state),
                   *(arg for name, flag in flags.items() for arg in (flag, ports[name])), timeout=30)
    finally:
        held.release()
    assert one_line(done) == (
        f"agentauthz: config_invalid: cannot listen on {address} ({flags[listener]}, or {listener}_listen "
        f"in the config): address already in use; stop what listens there or choose another address with "
        f"{flags[listener]}")
    assert not state.exists()


@pytest.mark.parametrize(("flag", "address", "expected"), [
    ("--http-listen", "127.0.0.1:abc",
     "http_listen must be HOST:PORT (a port of 0-65535), got '127.0.0.1:abc'"),
    ("--http-listen", "unix:/tmp/agentauthz-http.sock",
     "http_listen must be HOST:PORT (a port of 0-65535), got 'unix:/tmp/agentauthz-http.sock'"),
    ("--check-listen", "127.0.0.1:65536",
     "check_listen must be HOST:PORT (a port of 0-65535) or unix:PATH, got '127.0.0.1:65536'"),
    ("--api-listen", "9190", "api_listen must be HOST:PORT (a port of 0-65535) or unix:PATH, got '9190'"),
    ("--http-check-listen", "127.0.0.1:-1",
     "http_check_listen must be HOST:PORT (a port of 0-65535) or unix:PATH, got '127.0.0.1:-1'"),
])
def test_a_malformed_listen_address_is_named_before_anything_is_created(
        tmp_path: Path, flag: str, address: str, expected: str) -> None:
    state = tmp_path / "state"
    done = cli("serve", "--state-dir", str(state), flag, address, timeout=30)
    assert one_line(done) == f"agentauthz: config_invalid: invalid configuration: {expected}"
    assert not state.exists()


def test_a_printed_value_beginning_with_a_dash_is_read_as_that_value() -> None:
    # One random base64url value in 64 begins with "-": pasted as the daemon printed it, it must not be
    # taken for an option (seen: audit verify --key -…, "expected one argument").
    token_id, key = "-" + "T" * 21, "-" + "K" * 42
    parse = build_parser().parse_args
    assert parse(_values_attached(["revoke", "--identity", "i", "--token-id", token_id])).token_id == token_id
    assert parse(_values_attached(["revoke", "--identity", "i", "--key-id", key])).key_id == key
    assert parse(_values_attached(["audit", "verify", "d", "--key", key, "--json"])).key == key
    # Anything else is left to argparse: an option after --key is still an option, and a value of
    # another shape still needs --key=VALUE.
    assert _values_attached(["audit", "verify", "d", "--key", "--json"]) == ["audit", "verify", "d", "--key",
                                                                             "--json"]
    assert _values_attached(["revoke", "--token-id", "-short"]) == ["revoke", "--token-id", "-short"]


def test_a_listener_that_fails_once_others_are_up_closes_them_all(tmp_path: Path) -> None:
    """Past the up-front check (someone took the port meanwhile): named, and nothing is left listening."""
    ports = {name: free_port() for name in FLAGS}
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        ports["http"] = squatter.getsockname()[1]  # the last configured listener the daemon opens
        config = Config().replace(state_dir=tmp_path / "state", **{
            f"{name}_listen": f"127.0.0.1:{port}" for name, port in ports.items()})
        with pytest.raises(errors.ConfigError, match=f"cannot listen on 127.0.0.1:{ports['http']} "
                                                     r"\(--http-listen"):
            asyncio.run(InProcessDaemon(config).run_until_signalled())
        # The others are free again: reserve raises for one that is not.
        listeners.reserve(config.replace(http_listen=f"127.0.0.1:{free_port()}")).release()


def test_an_unknown_sensitivity_or_operation_says_what_is_valid(daemon: Daemon) -> None:
    mint = ("mint", "--server", daemon.api_address, "--identity", identity(daemon), "--task", "unknown")
    assert one_line(cli(*mint, "--grant", "demo:*:read:secret")) == (
        f"agentauthz: grant 'demo:*:read:secret': sensitivity 'secret' is not one of {LEVELS}")
    assert one_line(cli(*mint, "--grant", "demo:*:fly", "--grant", "mail:inbox:read")) == (
        "agentauthz: nothing_granted: policy allows none of the requested grants (it gives this agent demo: "
        "operations delete, read, write, sensitivity up to internal; nothing for mail)")
    assert one_line(cli("check", "--server", daemon.check_address, "--tool", "demo", "--target", "reports",
                        "--operation", "read", "--sensitivity", "secret")) == (
        f"agentauthz: --sensitivity 'secret' is not one of {LEVELS}")


def test_audit_verify_of_a_directory_that_is_not_there_says_so(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    for where, problem in (
            (tmp_path / "nope", "does not exist"), (tmp_path / "a-file", "is not a directory")):
        line = one_line(cli("audit", "verify", str(where)))
        assert line.startswith(f"agentauthz: {where} {problem}: name an audit directory"), line
        assert "intact" not in line


def test_every_client_command_without_a_daemon_suggests_serve(daemon: Daemon, tmp_path: Path) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    human = tmp_path / "alice.jwt"
    made = cli("dev-human", "alice", "--state-dir", str(daemon.state_dir), "--out", str(human))
    assert made.returncode == 0, made.stderr
    approver = ("--server", nobody, "--credential", str(human), "--state-dir", str(daemon.state_dir))
    agent = ("--server", nobody, "--identity", identity(daemon))
    for command in (
            ("mint", *agent, "--task", "t", "--grant", "demo:*:read"),
            ("delegate", *agent, "--token", "a.b.c", "--to", ADMIN, "--grant", "demo:*:read"),
            ("revoke", *agent, "--task", "t"),
            ("unban", *agent, "--agent", ALPHA),
            ("keys", "rotate", *agent),
            ("check", "--server", nobody, "--tool", "demo", "--target", "x", "--operation", "read"),
            ("approvals", *approver),
            ("approve", *approver, "some-id"),
            ("reject", *approver, "some-id")):
        assert one_line(cli(*command)) == (
            f"agentauthz: daemon_unreachable: nothing answers at {nobody}: is the daemon running there? "
            "(start it with `agentauthz serve`)"), command


def test_the_client_raises_agentauthz_errors_carrying_the_daemons_reason(daemon: Daemon) -> None:
    alpha = Client(daemon.api_address, Identity.from_dir(identity(daemon)), check_server=daemon.check_address)
    with alpha.task("ended-once", ["demo:*:read"]):
        pass
    with pytest.raises(errors.TaskEnded) as ended:
        alpha.mint("ended-once", ["demo:*:read"])
    assert isinstance(ended.value, errors.DaemonError) and isinstance(ended.value, errors.AgentAuthzError)
    assert (ended.value.reason, str(ended.value)) == ("task_ended", "this task has ended; start a new one")
    assert ended.value.code() == grpc.StatusCode.FAILED_PRECONDITION  # still a grpc.RpcError, as before
    with pytest.raises(errors.PermissionDenied) as denied:
        alpha.mint("nothing", ["demo:*:fly"])
    assert denied.value.reason == "nothing_granted"
    with pytest.raises(errors.RequestInvalid) as invalid:
        alpha.mint("bad task name", ["demo:*:read"])
    assert invalid.value.reason == "request_invalid"
    with pytest.raises(errors.PermissionDenied) as not_admin:
        alpha.unban(ALPHA)
    assert not_admin.value.reason == "not_permitted"
    stranger = Client(daemon.api_address, check_server=daemon.api_address)
    with pytest.raises(errors.DaemonError):  # Check asked of the TLS API listener: no answer it can read
        stranger.check("t", "demo", "x", "read")
    nobody = f"127.0.0.1:{free_port()}"
    with pytest.raises(errors.DaemonUnreachable) as unreachable:
        Client(nobody, Identity.from_dir(identity(daemon))).jwks()
    assert unreachable.value.reason == "daemon_unreachable" and nobody in str(unreachable.value)

    async def asynchronous() -> None:
        client = AsyncClient(daemon.api_address, Identity.from_dir(identity(daemon)))
        with pytest.raises(errors.TaskEnded):
            await client.mint("ended-once", ["demo:*:read"])
        with pytest.raises(errors.DaemonUnreachable):
            await AsyncClient(daemon.api_address, check_server=nobody).check("t", "demo", "x", "read")
    asyncio.run(asynchronous())


def test_every_grpc_status_maps_to_its_own_agentauthz_error() -> None:
    failing = set(grpc.StatusCode) - {grpc.StatusCode.OK}
    assert set(_ERROR_BY_STATUS) == failing
    assert all(issubclass(cls, errors.DaemonError) and cls is not errors.DaemonError
               for cls in _ERROR_BY_STATUS.values())


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _commands(child, (*path, name))


def test_every_help_documents_every_option_its_default_and_the_grant_syntax() -> None:
    top = cli("--help")
    assert top.returncode == 0 and "``" not in top.stdout and "agentauthz COMMAND --help" in top.stdout
    walked = 0
    for path, parser in _commands(build_parser()):
        shown = cli(*path, "--help")
        assert shown.returncode == 0, (path, shown.stderr)
        text = " ".join(shown.stdout.split())  # argparse wraps help lines
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = action.option_strings[-1] if action.option_strings else action.dest
            assert action.help, f"{' '.join(path)} {name} has no help"
            if action.option_strings:
                assert action.option_strings[-1] in text, (path, name)
                if action.required:
                    assert "required" in action.help, (path, name)
                elif action.nargs != 0:  # a value-taking option says what it is when not given
                    assert "default" in action.help, (path, name)
        if "--grant" in text:
            assert "repeat --grant" in text and "TOOL:TARGET:OPS[:SENSITIVITY]" in text, path
            assert "public, internal, confidential or restricted" in text and "read,write" in text, path
        walked += 1
    assert walked >= 20
