"""Damaged state files: the daemon refuses to start, in one line naming the file, rather than start
permissive (revocations forgotten, budgets reset, keys or audit evidence replaced).

Every case runs the real ``agentauthz serve`` on a copy of one state directory that a real daemon
wrote (keys, a revocation, an audit log), with one file damaged.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faults_support import AGENT
from processes import ROOT, Daemon

from agentauthz.client import Client, Identity
from agentauthz.decision.policy import DEV_POLICY
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

START_TIMEOUT = 20.0  # a daemon still running after this started on damaged state: the test fails


def _pem(key: Ed25519PrivateKey | rsa.RSAPrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password \
        else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory as a daemon leaves it: keys, a journal with a revocation, an audit log."""
    work = tmp_path_factory.mktemp("pristine")
    daemon = Daemon(work / "state").start()
    try:
        issue_svid(ensure_dev_pki(daemon.state_dir), AGENT, work / "id")
        client = Client(daemon.api_address, Identity.from_dir(work / "id"))
        client.revoke(token_id=client.mint("t", ["demo:*:read"]).token_id)
    finally:
        assert daemon.stop() == 0
    return work / "state"


def serve(work: Path, state: Path, policy: Path | None = None) -> subprocess.CompletedProcess[str]:
    config = work / "config.yaml"
    config.write_text(json.dumps({"state_dir": str(state),
                                  **({"policy_file": str(policy)} if policy else {})}))
    listen = "127.0.0.1:0"
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentauthz", "serve", "--config", str(config), "--check-listen", listen,
         "--api-listen", listen, "--http-listen", listen, "--approval-listen", listen],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"started on damaged state {state}:\n{err[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


Damage = Callable[[Path], Path]  # damages one file of a state directory, returns the file named


def write(relative: str, data: bytes) -> Damage:
    def damage(state: Path) -> Path:
        path = state / relative
        path.write_bytes(data)
        return path
    return damage


def a_signing_key(data: bytes) -> Damage:
    def damage(state: Path) -> Path:
        path = sorted((state / "keys").glob("*.pem"))[0]
        path.write_bytes(data)
        return path
    return damage


def journal(edit: Callable[[bytes], bytes]) -> Damage:
    def damage(state: Path) -> Path:
        path = state / "revocations" / "journal.jsonl"
        path.write_bytes(edit(path.read_bytes()))
        return path
    return damage


OTHER_ED25519 = _pem(Ed25519PrivateKey.generate())
RSA = _pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))
ENCRYPTED = _pem(Ed25519PrivateKey.generate(), b"secret")

DAMAGE: dict[str, Damage] = {
    "keyring-garbage": write("keys/keyring.json", b"\x00garbage"),
    "keyring-empty": write("keys/keyring.json", b""),
    "keyring-no-signer": write("keys/keyring.json", b'{"format": 1, "keys": []}'),
    "signing-key-garbage": a_signing_key(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
    "signing-key-empty": a_signing_key(b""),
    "signing-key-another-key": a_signing_key(OTHER_ED25519),
    "signing-key-encrypted": a_signing_key(ENCRYPTED),
    "journal-garbage-mid-file": journal(lambda d: d.replace(b"\n", b"\n\x00\xffgarbage\n", 1)),
    "journal-truncated-to-nothing": journal(lambda d: b""),
    "journal-no-complete-record": journal(lambda d: d[:10]),
    "token-id-key-empty": write("token-id.key", b""),
    "token-id-key-short": write("token-id.key", b"0123456789"),
    "audit-key-garbage": write("audit-key/audit-key.pem", b"garbage"),
    "audit-key-empty": write("audit-key/audit-key.pem", b""),
    "audit-key-rsa": write("audit-key/audit-key.pem", RSA),
    "audit-key-encrypted": write("audit-key/audit-key.pem", ENCRYPTED),
    "audit-key-another-key": write("audit-key/audit-key.pem", OTHER_ED25519),
    "audit-public-key-garbage": write("audit-key/public.pem", b"garbage"),
    "budgets-garbage": write("budgets", b"not a budget table" * 10),
    "approvals-garbage": write("approvals.json", b"{not json"),
    "dev-ca-certificate-garbage": write("pki/ca.pem", b"garbage"),
    "dev-server-key-encrypted": write("pki/server.key", ENCRYPTED),
}
POLICIES = {
    "policy-yaml-error": b"version: 1\nrules: [{id: x\n",
    "policy-not-utf8": b"version: 1\n\xff\xfe\n",
    "policy-unknown-key": DEV_POLICY.read_bytes() + b"surprise: true\n",
    "policy-empty": b"",
}


def assert_refused(done: subprocess.CompletedProcess[str], named: Path) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("agentauthz: ")]
    assert len(errors) == 1, done.stderr
    assert str(named) in errors[0], errors[0]


def _refusals(tmp_path: Path, pristine: Path, cases: dict[str, Callable[[Path], tuple[Path, Path | None]]],
              ) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    def one(name: str) -> tuple[subprocess.CompletedProcess[str], Path]:
        work = tmp_path / name
        state = work / "state"
        shutil.copytree(pristine, state, symlinks=True)
        named, policy = cases[name](state)
        if named.exists():
            named.chmod(0o600)  # damage, not permissions (those have their own tests)
        return serve(work, state, policy), named
    with ThreadPoolExecutor(4) as pool:  # each is a process start of about a second
        return dict(zip(cases, pool.map(one, cases), strict=True))


def test_damaged_state_files_refuse_the_start(tmp_path: Path, pristine: Path) -> None:
    results = _refusals(tmp_path, pristine, {name: lambda s, d=damage: (d(s), None)
                                             for name, damage in DAMAGE.items()})
    for name, (done, named) in results.items():
        try:
            assert_refused(done, named)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_a_damaged_policy_file_refuses_the_start(tmp_path: Path, pristine: Path) -> None:
    def policy(data: bytes) -> Callable[[Path], tuple[Path, Path | None]]:
        def damage(state: Path) -> tuple[Path, Path | None]:
            path = state.parent / "policy.yaml"
            path.write_bytes(data)
            return path, path
        return damage
    results = _refusals(tmp_path, pristine, {name: policy(data) for name, data in POLICIES.items()})
    for name, (done, named) in results.items():
        try:
            assert_refused(done, named)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from None


def test_the_pristine_state_starts(tmp_path: Path, pristine: Path) -> None:
    """The control: the same copy, undamaged, serves (so the refusals above are the damage's doing)."""
    state = tmp_path / "state"
    shutil.copytree(pristine, state, symlinks=True)
    daemon = Daemon(state).start()
    assert daemon.stop() == 0
