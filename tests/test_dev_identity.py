"""`agentauthz dev-identity` keeps an identity it finds: replacing its private key takes --force."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cryptography import x509

ROOT = Path(__file__).resolve().parent.parent
AGENT = "spiffe://dev.local/agent/alpha"


def dev_identity(state: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentauthz", "dev-identity", AGENT,
                           "--state-dir", str(state), "--out", str(out), *extra],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def subject(out: Path) -> str:
    cert = x509.load_pem_x509_certificate((out / "svid.pem").read_bytes())
    return str(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
               .get_values_for_type(x509.UniformResourceIdentifier)[0])


def test_an_existing_identity_is_replaced_only_with_force(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "demo" / "alpha"
    assert dev_identity(state, out).returncode == 0
    key = (out / "svid.key").read_bytes()

    again = dev_identity(state, out)
    assert again.returncode == 1
    assert again.stderr == f"agentauthz: {out} already holds an identity; --force replaces it\n"
    assert (out / "svid.key").read_bytes() == key  # untouched

    forced = dev_identity(state, out, "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "svid.key").read_bytes() != key
    assert subject(out) == AGENT


def test_any_one_identity_file_counts_as_an_identity(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "alpha"
    out.mkdir()
    (out / "svid.key").write_bytes(b"a key someone uses\n")
    refused = dev_identity(state, out)
    assert refused.returncode == 1 and "--force" in refused.stderr
    assert (out / "svid.key").read_bytes() == b"a key someone uses\n"


def test_an_empty_or_unrelated_directory_takes_an_identity(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "alpha"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    made = dev_identity(state, out)
    assert made.returncode == 0, made.stderr
    assert subject(out) == AGENT and (out / "notes.txt").read_text() == "mine\n"


def test_out_naming_a_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    state, out = tmp_path / "state", tmp_path / "alpha"
    out.write_text("not a directory\n")
    refused = dev_identity(state, out, "--force")
    assert refused.returncode == 1
    assert refused.stderr == f"agentauthz: --out {out} is not a directory\n"
    under_a_file = dev_identity(state, out / "inner")
    assert under_a_file.returncode == 1
    assert under_a_file.stderr.startswith(f"agentauthz: cannot write the identity to {out / 'inner'}: ")
    assert under_a_file.stderr.count("\n") == 1


def test_help_documents_force() -> None:
    shown = subprocess.run([sys.executable, "-m", "agentauthz", "dev-identity", "--help"],
                           capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert "--force" in shown.stdout and "replace an identity" in shown.stdout
