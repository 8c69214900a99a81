"""The package as users install it: a wheel from `python -m build`, installed alone into a fresh venv.

No Makefile, no Cython, no checkout on the path: every command runs from a directory outside the
repository, so only the installed package is imported. One build serves the whole module (it compiles
the native twins: about a minute on 2 cores); the venvs' pip fetches dependencies from the index.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest
from processes import free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

# What the Python client needs (agentauthz/check_wire.py spares it Envoy's protos); the rest of the
# package's dependencies are the daemon's.
CLIENT_DEPENDENCIES = ("grpcio", "protobuf", "cryptography", "pynacl")


class Built(NamedTuple):
    wheel: Path
    log: str


def _env() -> dict[str, str]:
    """This environment without what would point an installed command at the checkout or the test venv."""
    drop = {"PYTHONPATH", "VIRTUAL_ENV", "AGENTAUTHZ_NO_EXTENSIONS", "PYTHONHOME"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, cwd=cwd, env=_env(),
                          timeout=timeout)


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"{result.args}: {result.returncode}:\n{result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """sdist then wheel from the sdist (`python -m build`), from the files a commit would hold."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    build = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist)], cwd=src, env=_env(),
                           capture_output=True, text=True, timeout=1800)
    log = build.stdout + build.stderr
    assert build.returncode == 0, log[-4000:]
    wheels = list(dist.glob("agentauthz-*.whl"))
    assert len(wheels) == 1, log[-4000:]
    return Built(wheels[0], log)


def fresh_venv(where: Path, *install: str | Path) -> Path:
    """A new venv with only ``install`` pip-installed in it; its bin directory."""
    ok(run(sys.executable, "-m", "venv", where, cwd=where.parent))
    ok(run(where / "bin" / "python", "-m", "pip", "install", "-q", *install, cwd=where.parent, timeout=900))
    return where / "bin"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the installed commands run: outside the checkout, so its agentauthz/ is not importable."""
    return tmp_path_factory.mktemp("outside")


@pytest.fixture(scope="module")
def installed(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fresh_venv(tmp_path_factory.mktemp("venv") / "full", built.wheel)


class Serving(NamedTuple):
    state: Path
    api: str
    check: str


def start_serve(installed: Path, work: Path, state: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    """`agentauthz serve` on four free ports (check, api, http, approval), once /healthz answers."""
    ports = [free_port() for _ in range(4)]
    log_path = work / "daemon.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(installed / "agentauthz"), "serve", "--state-dir", str(state),
             "--check-listen", f"127.0.0.1:{ports[0]}", "--api-listen", f"127.0.0.1:{ports[1]}",
             "--http-listen", f"127.0.0.1:{ports[2]}", "--approval-listen", f"127.0.0.1:{ports[3]}"],
            stdout=log, stderr=subprocess.STDOUT, cwd=work, env=_env())

    def healthy() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"serve exited {proc.returncode}:\n{log_path.read_text()}")
        return http_get(f"http://127.0.0.1:{ports[2]}/healthz")[0] == 200

    try:
        wait_for(healthy, 60, "the installed daemon's /healthz")
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc, ports


@pytest.fixture(scope="module")
def serving(installed: Path, work: Path) -> Iterator[Serving]:
    """The installed daemon with its own state dir."""
    state = work / "state"
    for attempt in range(3):  # free_port() cannot hold a port until the daemon binds it
        try:
            proc, ports = start_serve(installed, work, state)
            break
        except RuntimeError as exc:
            if attempt == 2 or "address already in use" not in str(exc).lower():
                raise
    try:
        yield Serving(state, f"localhost:{ports[1]}", f"127.0.0.1:{ports[0]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_the_native_build_has_no_compiler_warnings(built: Built) -> None:
    assert "Cythonizing native/_request_c.pyx" in built.log  # the compiler's output is in the log
    warnings = re.findall(r"^.*\.c:\d+:\d+: warning: .*$", built.log, re.MULTILINE)
    assert not warnings, "\n".join(warnings)


def test_the_installed_package_is_the_wheels_with_its_native_twins(installed: Path, work: Path) -> None:
    version = json.loads(ok(run(installed / "agentauthz", "version", "--json", cwd=work)))
    assert (version["native"], version["implementation"]) == (True, "native"), version
    where = ok(run(installed / "python", "-c", "import agentauthz; print(agentauthz.__file__)", cwd=work))
    assert Path(where.strip()).is_relative_to(installed.parent), where
    assert run(installed / "python", "-c", "import Cython", cwd=work).returncode != 0  # no build tools


def test_the_installed_commands_serve_mint_check_revoke_and_verify(installed: Path, serving: Serving,
                                                                   work: Path) -> None:
    cli = installed / "agentauthz"
    identity = work / "ids" / "alpha"
    ok(run(cli, "dev-identity", "spiffe://dev.local/agent/alpha", "--out", identity,
           "--state-dir", serving.state, cwd=work))
    minted = json.loads(ok(run(cli, "mint", "--server", serving.api, "--identity", identity,
                               "--task", "cli-task", "--grant", "demo:*:read:internal", "--json", cwd=work)))
    ask = (cli, "check", "--server", serving.check, "--token", minted["token"], "--tool", "demo",
           "--target", "reports", "--operation", "read", "--sensitivity", "internal")
    assert "allowed" in ok(run(*ask, cwd=work))
    ok(run(cli, "revoke", "--server", serving.api, "--identity", identity, "--task", "cli-task", cwd=work))
    denied = run(*ask, cwd=work)
    assert denied.returncode != 0 and "task_ended" in denied.stdout + denied.stderr, denied
    verified = json.loads(ok(run(cli, "audit", "verify", serving.state / "audit", "--json", cwd=work)))
    assert verified["ok"] and verified["records"] >= 4, verified  # mint, allow, revoke, task_ended at least


# Run by the venv under test, against the daemon: the README's client calls, nothing from the checkout.
CLIENT_SCRIPT = """
import json, sys
from agentauthz.client import Client, Identity
api, check, identity, task = sys.argv[1:]
client = Client(api, Identity.from_dir(identity), check_server=check)
minted = client.mint(task, ["demo:*:read:internal"], intent="the wheel test")
allowed = client.check(minted.token, "demo", "reports", "read", "internal")
client.revoke(task=task)
ended = client.check(minted.token, "demo", "reports", "read", "internal")
print(json.dumps([allowed.allowed, allowed.reason, ended.allowed, ended.reason]))
"""


def client_round_trip(python: Path, serving: Serving, work: Path, identity: Path, task: str) -> list[object]:
    result = run(python, "-c", CLIENT_SCRIPT, serving.api, serving.check, identity, task, cwd=work)
    return json.loads(ok(result))


def dev_identity(installed: Path, serving: Serving, work: Path, name: str) -> Path:
    out = work / "ids" / name
    ok(run(installed / "agentauthz", "dev-identity", f"spiffe://dev.local/agent/{name}", "--out", out,
           "--state-dir", serving.state, cwd=work))
    return out


def test_the_installed_client_mints_checks_and_revokes(installed: Path, serving: Serving, work: Path) -> None:
    identity = dev_identity(installed, serving, work, "client-full")
    assert client_round_trip(installed / "python", serving, work, identity, "client-task") == \
        [True, "allow", False, "task_ended"]


def test_the_client_needs_only_the_client_dependencies(built: Built, installed: Path, serving: Serving,
                                                       work: Path, tmp_path: Path) -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()
    declared = re.findall(r'^\s*"([A-Za-z0-9_.-]+[^"]*)"', pyproject, re.MULTILINE)
    wanted = [spec for spec in declared if re.split(r"[<>=!~\[; ]", spec)[0].lower() in CLIENT_DEPENDENCIES]
    assert len(wanted) == len(CLIENT_DEPENDENCIES), wanted
    client_only = fresh_venv(tmp_path / "client", *wanted)
    ok(run(client_only / "python", "-m", "pip", "install", "-q", "--no-deps", built.wheel, cwd=work,
           timeout=300))
    assert run(client_only / "python", "-c", "import envoy", cwd=work).returncode != 0  # no daemon deps
    identity = dev_identity(installed, serving, work, "client-only")
    assert client_round_trip(client_only / "python", serving, work, identity, "client-task") == \
        [True, "allow", False, "task_ended"]
