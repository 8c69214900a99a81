"""`--pki-dir`: several development daemons, each with its own state dir, share one development CA."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

import pytest
from processes import ROOT, Daemon

from agentauthz.config import Config
from agentauthz.errors import ConfigError

AGENT = "spiffe://dev.local/agent/alpha"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentauthz", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal's single stderr line: the command failed and printed no traceback."""
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    return done.stderr.strip()


def mint(daemon: Daemon, identity: Path, task: str) -> subprocess.CompletedProcess[str]:
    return cli("mint", "--server", daemon.api_address, "--identity", str(identity), "--task", task,
               "--grant", "demo:*:read", "--json")


def dev_identity(out: Path, *where: str) -> subprocess.CompletedProcess[str]:
    return cli("dev-identity", AGENT, "--out", str(out), "--force", *where)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon, Path]]:
    """Two daemons, one naming the shared pki dir in its config and one with --pki-dir, started at once."""
    work = tmp_path_factory.mktemp("pki-dir")
    pki = work / "shared" / "pki"
    first, second = Daemon(work / "first", {"pki_dir": str(pki)}), Daemon(work / "second")
    failures: list[BaseException] = []

    def start(d: Daemon, *extra: str) -> None:
        try:
            d.start(60.0, *extra)
        except BaseException as exc:  # reported below, on the test's thread
            failures.append(exc)
    # At once: both find no PKI, and the lock beside it lets exactly one of them create it.
    threads = [threading.Thread(target=start, args=(first,)),
               threading.Thread(target=start, args=(second, "--pki-dir", str(pki)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not failures, failures
        yield first, second, pki
    finally:
        first.kill()
        second.kill()


def test_an_identity_from_one_state_dir_mints_on_the_other_daemon(shared: tuple[Daemon, Daemon, Path],
                                                                   tmp_path: Path) -> None:
    first, second, pki = shared
    assert (pki / "DEVELOPMENT").is_file() and (pki.parent / "pki.lock").is_file()
    for d in (first, second):
        assert not (d.state_dir / "pki").exists()  # one CA, in the shared directory only
        assert (d.state_dir / "pki-dir").read_text() == f"{pki.resolve()}\n"
    made = dev_identity(tmp_path / "alpha", "--state-dir", str(first.state_dir))  # no --pki-dir
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "alpha" / "bundle.pem").read_bytes() == (pki / "ca.pem").read_bytes()
    for d, task in ((second, "on-second"), (first, "on-first")):
        minted = mint(d, tmp_path / "alpha", task)
        assert minted.returncode == 0, minted.stderr
        assert json.loads(minted.stdout)["agent"] == AGENT


def test_approvals_find_the_ca_a_state_dir_names(shared: tuple[Daemon, Daemon, Path], tmp_path: Path) -> None:
    first, _, pki = shared
    human = tmp_path / "alice.jwt"
    made = cli("dev-human", "alice", "--state-dir", str(first.state_dir), "--out", str(human))
    assert made.returncode == 0, made.stderr
    asked = ("approvals", "--server", first.approval_address, "--credential", str(human), "--json")
    for where in (("--state-dir", str(first.state_dir)), ("--pki-dir", str(pki))):
        listed = cli(*asked, *where)
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout) == {"approvals": []}


def test_a_state_dir_refuses_identities_from_a_ca_its_daemon_does_not_use(
        shared: tuple[Daemon, Daemon, Path], tmp_path: Path) -> None:
    first, _, pki = shared
    line = one_line(dev_identity(tmp_path / "alpha", "--state-dir", str(first.state_dir),
                                 "--pki-dir", str(tmp_path / "other")))
    assert line == (f"agentauthz: {first.state_dir} uses the development CA in {pki.resolve()}, not "
                    f"--pki-dir {tmp_path / 'other'}: its daemon would not trust what that one signs (name "
                    "the same --pki-dir, or none)")
    assert not (tmp_path / "other").exists() and not (tmp_path / "alpha").exists()
    same = dev_identity(tmp_path / "alpha", "--state-dir", str(first.state_dir), "--pki-dir", str(pki))
    assert same.returncode == 0, same.stderr


def test_without_pki_dir_the_ca_is_the_state_dirs_own(shared: tuple[Daemon, Daemon, Path],
                                                       tmp_path: Path) -> None:
    _, second, pki = shared
    alone = Daemon(tmp_path / "alone").start(60.0)
    try:
        assert (alone.state_dir / "pki" / "DEVELOPMENT").is_file()
        assert not (alone.state_dir / "pki-dir").exists()
        assert (alone.state_dir / "pki" / "ca.pem").read_bytes() != (pki / "ca.pem").read_bytes()
        made = dev_identity(tmp_path / "own", "--state-dir", str(alone.state_dir))
        assert made.returncode == 0, made.stderr
        assert mint(alone, tmp_path / "own", "own").returncode == 0
        # Its CA is its own: the shared daemons do not know it, nor it theirs.
        assert mint(second, tmp_path / "own", "stranger").returncode == 1
    finally:
        alone.stop()


def test_a_pki_dir_that_is_no_development_pki_is_one_line(tmp_path: Path) -> None:
    empty_file = tmp_path / "empty"
    empty_file.write_bytes(b"")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "ca.pem").write_text("not a certificate\n")
    broken = tmp_path / "broken"  # marked, but its key is not one
    broken.mkdir()
    (broken / "DEVELOPMENT").write_text('{"trust_domain": "dev.local"}\n')
    (broken / "ca.key").write_text("not a key\n")
    (broken / "ca.key").chmod(0o600)
    for pki, problem in ((empty_file, "not a development PKI (no readable DEVELOPMENT marker)"),
                         (garbage, "not a development PKI (no readable DEVELOPMENT marker)"),
                         (broken, "unreadable ca key")):
        state = tmp_path / f"state-{pki.name}"
        line = one_line(dev_identity(tmp_path / "id", "--state-dir", str(state), "--pki-dir", str(pki)))
        assert line.startswith("agentauthz: state_invalid: ") and problem in line, line
        daemon = Daemon(tmp_path / f"serve-{pki.name}")
        with pytest.raises(RuntimeError, match="daemon exited with 1") as failed:
            daemon.start(30.0, "--pki-dir", str(pki))
        assert "Traceback" not in str(failed.value) and problem in str(failed.value), failed.value
    assert empty_file.read_bytes() == b"" and sorted(p.name for p in garbage.iterdir()) == ["ca.pem"]


def test_a_corrupt_pointer_in_the_state_dir_is_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "pki-dir").write_text("relative/pki\n")
    line = one_line(dev_identity(tmp_path / "id", "--state-dir", str(state)))
    assert line == (f"agentauthz: state_invalid: {state / 'pki-dir'}: does not hold the absolute path of a "
                    "development PKI directory; start the daemon with --pki-dir to write it again")


def test_an_empty_directory_is_made_into_the_pki(tmp_path: Path) -> None:
    pki = tmp_path / "made-by-mktemp"
    pki.mkdir()
    made = dev_identity(tmp_path / "id", "--state-dir", str(tmp_path / "state"), "--pki-dir", str(pki))
    assert made.returncode == 0, made.stderr
    assert (pki / "DEVELOPMENT").is_file() and pki.stat().st_mode & 0o777 == 0o700


def test_config_pki_dir_is_a_path_and_not_beside_configured_tls(tmp_path: Path) -> None:
    assert Config.from_mapping({"pki_dir": "shared/pki"}).pki_dir == Path("shared/pki")
    for bad, message in (({"pki_dir": 5}, "pki_dir must be a path"),
                         ({"pki_dir": ""}, "pki_dir must be a path"),
                         ({"pki_dir": "p", "tls_cert": "c", "tls_key": "k", "trust_bundle": "b"},
                          "unused with tls_cert, tls_key and trust_bundle")):
        with pytest.raises(ConfigError, match=message):
            Config.from_mapping(bad, "f.yaml")
    assert Config(state_dir=tmp_path).dev_pki_dir == tmp_path / "pki"
