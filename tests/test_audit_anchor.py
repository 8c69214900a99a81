"""Audit tamper-evidence anchored outside the log: whoever can write the audit directory cannot re-sign it."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from processes import Daemon, http_get, wait_for

from agentauthz.audit.records import _b64, _canon, thumbprint
from agentauthz.audit.verify import verify_dir
from agentauthz.client import Client, Identity
from agentauthz.decision._chain_py import GENESIS
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

AGENT = "spiffe://dev.local/agent/alpha"


def fresh_check(daemon: Daemon, token: str) -> str:
    """One Check on a new connection: lands on whichever worker the kernel picks."""
    return Client(daemon.api_address, check_server=daemon.check_address).check(
        token, "demo", "a", "read").reason


@pytest.fixture(scope="module")
def stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Daemon, dict[str, Any], Path]:
    """A daemon with a Check worker that decided calls, stopped: (daemon, its audit key document, state)."""
    work = tmp_path_factory.mktemp("anchor")
    daemon = Daemon(work / "state", {"workers": 2}).start(30.0)
    try:
        status, body = http_get(f"http://127.0.0.1:{daemon.http_port}/.well-known/agentauthz-audit-key")
        assert status == 200
        doc = json.loads(body)
        issue_svid(ensure_dev_pki(daemon.state_dir), AGENT, work / "id")
        client = Client(daemon.api_address, Identity.from_dir(work / "id"))
        assert client.audit_key() == doc  # the same key over the authenticated API
        token = client.mint("t", ["demo:*:read"]).token
        worker_log = daemon.state_dir / "audit" / "worker-1"
        wait_for(lambda: fresh_check(daemon, token) == "allow" and any(
            b'"kind":"check"' in f.read_bytes() for f in worker_log.glob("audit-*.jsonl")), 30,
            "a Check answered by the worker")
    finally:
        assert daemon.stop() == 0
    return daemon, doc, daemon.state_dir


def pub_of(doc: dict[str, Any]) -> bytes:
    return base64.urlsafe_b64decode(doc["x"] + "=" * (-len(doc["x"]) % 4))


def test_the_key_lives_outside_the_log_and_is_published(stopped: tuple[Daemon, dict[str, Any], Path]) -> None:
    daemon, doc, state = stopped
    pinned = serialization.load_pem_public_key((state / "audit-key" / "public.pem").read_bytes())
    raw = pinned.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert pub_of(doc) == raw and doc["kid"] == thumbprint(pinned)  # type: ignore[arg-type]
    assert (doc["kty"], doc["crv"]) == ("OKP", "Ed25519") and "d" not in doc
    private = state / "audit-key" / "audit-key.pem"
    assert private.stat().st_mode & 0o777 == 0o600 and (state / "audit-key").stat().st_mode & 0o777 == 0o700
    assert not [p for p in (state / "audit").rglob("*") if "key" in p.name]  # no key beside any log
    assert doc["x"] in daemon.log()  # printed at first start, for the operator to pin
    # Every worker signs with the same key: one pinned key checks every log.
    kids = {json.loads(line)["checkpoint"]["kid"] for f in (state / "audit").rglob("audit-*.jsonl")
            for line in f.read_text().splitlines() if '"kind":"checkpoint"' in line}
    assert kids == {doc["kid"]}


def test_verify_on_the_shipped_defaults_uses_the_pinned_copy_and_every_worker_log(
        stopped: tuple[Daemon, dict[str, Any], Path]) -> None:
    daemon, doc, state = stopped
    done = daemon.cli("audit", "verify", str(state / "audit"), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["key"] == str(state / "audit-key" / "public.pem") and result["key_id"] == doc["kid"]
    assert {log["log"] for log in result["logs"]} == {".", "worker-1"}
    assert all(log["ok"] for log in result["logs"])
    assert f"audit key {doc['kid']} from {state / 'audit-key' / 'public.pem'}" in result["message"]


def test_verify_with_the_published_key_and_with_a_wrong_one(stopped: tuple[Daemon, dict[str, Any], Path],
                                                            tmp_path: Path) -> None:
    daemon, doc, state = stopped
    jwk = tmp_path / "audit-key.jwk"
    jwk.write_text(json.dumps(doc))
    for key in (str(jwk), doc["x"]):
        done = daemon.cli("audit", "verify", str(state / "audit"), "--key", key)
        assert done.returncode == 0 and done.stdout.startswith(f"{state / 'audit'}: OK:"), done.stderr
    wrong = ""
    while not wrong.startswith("-"):  # one key in 64: argparse would take it for an option, not a key
        wrong = _b64(Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw))
    done = daemon.cli("audit", "verify", str(state / "audit"), "--key", wrong)
    assert done.returncode == 1 and "no checkpoint signed by the pinned key" in done.stderr, done.stderr


def resign(directory: Path, key: Ed25519PrivateKey) -> None:
    """The attacker: make every check a deny, re-chain, re-sign every checkpoint with ``key``, plant it."""
    kid, prev, last_file, exported = thumbprint(key.public_key()), GENESIS, "", []
    for path in sorted(directory.glob("audit-*.jsonl")):
        out = []
        for line in path.read_bytes().splitlines():
            rec = json.loads(line)
            rec["prev"] = prev
            if rec["kind"] == "check":
                rec["decision"] = False
            if rec["kind"] == "checkpoint":
                cp = {**rec["checkpoint"], "hash": prev, "kid": kid, "file": last_file}
                rec["checkpoint"], rec["sig"] = cp, _b64(key.sign(_canon(cp)))
                exported.append(json.dumps({**cp, "sig": rec["sig"]}, separators=(",", ":")))
            raw = json.dumps(rec, separators=(",", ":")).encode()
            prev, last_file = hashlib.sha256(raw).hexdigest(), path.name
            out.append(raw + b"\n")
        path.write_bytes(b"".join(out))
    (directory / "checkpoints.jsonl").write_text("".join(e + "\n" for e in exported))
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
    (directory / "audit-key.pem").write_bytes(private)
    (directory / "audit-key.pub.pem").write_bytes(public)
    (directory / "audit-key").mkdir(exist_ok=True)
    (directory / "audit-key" / "public.pem").write_bytes(public)


@pytest.mark.parametrize("which", [".", "worker-1"])
def test_an_attacker_who_rewrites_and_resigns_with_a_key_of_their_own_is_caught(
        stopped: tuple[Daemon, dict[str, Any], Path], tmp_path: Path, which: str) -> None:
    daemon, doc, state = stopped
    copy = tmp_path / "state"
    shutil.copytree(state, copy)  # the fixture's log stays intact for the other tests
    audit = copy / "audit"
    resign(audit / which, Ed25519PrivateKey.generate())
    attacker_pub = audit / which / "audit-key.pub.pem"
    # The rewrite is self-consistent: trusting the key beside the log (as verify did) would pass it.
    assert verify_dir(audit / which, attacker_pub.read_bytes()).ok
    for args in ((), ("--key", doc["x"])):
        done = daemon.cli("audit", "verify", str(audit), *args)
        assert done.returncode == 1, done.stdout
        where = "" if which == "." else f"{which}/"
        assert f"audit log is not intact: {where}" in done.stderr
        assert "no checkpoint signed by the pinned key" in done.stderr, done.stderr
    # A key file inside the audit directory is never trusted, not even when named.
    done = daemon.cli("audit", "verify", str(audit), "--key", str(attacker_pub))
    assert done.returncode == 1 and "inside the audit directory" in done.stderr, done.stderr


def test_a_key_an_earlier_version_kept_in_the_audit_directory_moves_out_at_start(
        stopped: tuple[Daemon, dict[str, Any], Path], tmp_path: Path) -> None:
    _, doc, state = stopped
    copy = tmp_path / "state"
    shutil.copytree(state, copy)
    # The earlier layout: the key and its public half beside the log, nothing in audit-key/.
    shutil.move(copy / "audit-key" / "audit-key.pem", copy / "audit" / "audit-key.pem")
    shutil.move(copy / "audit-key" / "public.pem", copy / "audit" / "audit-key.pub.pem")
    (copy / "audit-key").rmdir()
    daemon = Daemon(copy).start(30.0)
    assert daemon.stop() == 0
    assert "moved the checkpoint signing key out of the audit directory" in daemon.log()
    assert not [p for p in (copy / "audit").rglob("*") if "key" in p.name]
    done = daemon.cli("audit", "verify", str(copy / "audit"), "--key", doc["x"], "--json")
    assert done.returncode == 0, done.stderr  # the old checkpoints and the new, under the one key
    assert json.loads(done.stdout)["key_id"] == doc["kid"]
    pinned = (copy / "audit-key" / "public.pem", state / "audit-key" / "public.pem")
    assert pinned[0].read_bytes() == pinned[1].read_bytes()
