"""`agentauthz audit report`: a scripted scenario through the real daemon, the page opened in Chromium.

Agents mint, call, go out of scope, delegate, ask a human, revoke, and one identity is used from two
certificates; the page Chromium renders must name them, count them and flag the right ones, and an
agent's own task name, intent and tool name must show as text, never run as markup.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any, Iterator

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2 as ext_authz
from processes import ROOT, Daemon

from agentauthz.authority.approvers import issue_dev_credential
from agentauthz.client import CHECK_METHOD, ApprovalsClient, Client, Identity, decision_from
from agentauthz.identity.devca import ensure_dev_pki, issue_svid

pytestmark = pytest.mark.slow

ALPHA, BETA = "spiffe://dev.local/agent/alpha", "spiffe://dev.local/agent/beta"
MALLORY, GAMMA = "spiffe://dev.local/agent/mallory", "spiffe://dev.local/agent/gamma"
# What an agent may name its task, intent and tool: the page must show it, not run it.
EVIL_TASK = "<script>document.title='pwned-task'</script>"
EVIL_INTENT = "\"><img src=x onerror=\"document.title='pwned-intent'\">"
EVIL_TOOL = "<svg/onload=alert(3)>"
SCREENSHOT = ROOT / "docs" / "audit-report.png"


def chromium() -> str:
    """Debian's chromium (`make test` installs it); skip only where it cannot be."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def browse(page: Path, work: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Chromium, headless, on ``page``: its own profile, no network, no GPU."""
    profile = work / f"chromium-{len(list(work.glob('chromium-*')))}"
    return subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={profile}", "--no-first-run", *args, page.as_uri()],
                          capture_output=True, text=True, timeout=90, check=True)


def peer_check(d: Daemon, token: str, principal: str, certificate_pem: bytes) -> Any:
    """A Check as Envoy sends it from an mTLS listener: the peer's principal and URL-encoded certificate."""
    request = ext_authz.CheckRequest()
    attrs = request.attributes
    attrs.source.principal = principal
    attrs.source.certificate = urllib.parse.quote(certificate_pem.decode())
    attrs.request.http.method, attrs.request.http.path = "GET", "/demo/reports"
    attrs.request.http.headers["authorization"] = f"Bearer {token}"
    attrs.context_extensions.update(tool="demo", target="reports", operation="read", sensitivity="public")
    with grpc.insecure_channel(d.check_address) as channel:
        return decision_from(channel.unary_unary(CHECK_METHOD)(request.SerializeToString(), timeout=5))


class Scenario:
    def __init__(self, d: Daemon, work: Path) -> None:
        self.d, self.work, self.pki = d, work, ensure_dev_pki(d.state_dir)

    def identity(self, agent: str, name: str) -> Path:
        return issue_svid(self.pki, agent, self.work / name)

    def agent(self, identity: Path) -> Client:
        return Client(self.d.api_address, Identity.from_dir(identity), check_server=self.d.check_address)

    def run(self) -> dict[str, Any]:
        alpha = self.agent(self.identity(ALPHA, "alpha"))
        report = alpha.mint("quarterly-report", ["demo:reports:read"], intent="summarise the Q3 reports")
        for _ in range(5):
            assert alpha.check(report.token, "demo", "reports", "read").allowed
        child = alpha.delegate(report.token, BETA, ["demo:reports:read"], intent="read for alpha")
        beta = self.agent(self.identity(BETA, "beta"))
        for _ in range(2):
            assert beta.check(child.token, "demo", "reports", "read").allowed
        pending = alpha.mint("cleanup", ["demo:reports:delete"], intent="delete last year's reports").pending
        human = ApprovalsClient(self.d.approval_address, issue_dev_credential(self.d.state_dir, "alice"),
                                (self.d.state_dir / "pki" / "ca.pem").read_bytes())
        human.approve(pending.id, "archived first")
        cleanup = alpha.mint("cleanup", ["demo:reports:delete"], approval_id=pending.id)
        assert alpha.check(cleanup.token, "demo", "reports", "delete").allowed
        alpha.revoke(token_id=report.token_id)
        assert alpha.check(report.token, "demo", "reports", "read").reason == "token_revoked"
        middle = time.time()

        mallory = self.agent(self.identity(MALLORY, "mallory"))
        evil = mallory.mint(EVIL_TASK, ["demo:reports:read"], intent=EVIL_INTENT)
        assert mallory.check(evil.token, "demo", "reports", "read").allowed
        for tool, target, op in (("demo", "payroll", "read"), ("demo", "secrets", "write"),
                                 ("demo", "reports", "delete"), (EVIL_TOOL, "reports", "read")):
            assert mallory.check(evil.token, tool, target, op).reason == "scope_denied"

        # gamma's one identity from two certificates (two hosts, say), used in turn.
        first, second = self.identity(GAMMA, "gamma-1"), self.identity(GAMMA, "gamma-2")
        g1, g2 = self.agent(first), self.agent(second)
        one = g1.mint("sync", ["demo:reports:read"], intent="sync reports")
        g2.mint("sync-2", ["demo:reports:read"], intent="sync reports")
        g1.mint("sync-3", ["demo:reports:read"], intent="sync reports")
        bound = peer_check(self.d, one.token, GAMMA, (first / "svid.pem").read_bytes())
        assert bound.allowed
        # The token minted over the first certificate, presented over the second: refused, and recorded.
        assert peer_check(self.d, one.token, GAMMA, (second / "svid.pem").read_bytes()).reason == \
            "token_binding_mismatch"
        return {"middle": middle}


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, dict[str, Any]]]:
    work = tmp_path_factory.mktemp("report")
    d = Daemon(work / "state", {"workers": 2}).start()
    try:
        facts = Scenario(d, work).run()
    finally:
        d.stop()  # every record written (the workers' too), the last checkpoint signing them
    yield d, work, facts


def report(d: Daemon, *args: str, python: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = python or [sys.executable, "-m", "agentauthz"]
    return subprocess.run([*command, "audit", "report", str(d.state_dir / "audit"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_the_page_chromium_renders_names_counts_and_flags_each_agent(logged: Any) -> None:
    d, work, _ = logged
    page = work / "report.html"
    done = report(d, "--html", str(page))
    assert done.returncode == 0, done.stderr
    assert "2 flagged for review" in done.stdout and "integrity: OK" in done.stdout
    dom = browse(page, work, "--dump-dom").stdout
    shot = work / "report.png"
    browse(page, work, f"--screenshot={shot}", "--window-size=1280,2200")
    assert shot.stat().st_size > 20_000
    if os.environ.get("AGENTAUTHZ_UPDATE_SCREENSHOT"):  # the README's picture
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)

    assert "<title>agentauthz audit report</title>" in dom  # nothing the agents wrote ran
    assert re.search(r'id="integrity"><span class="ok">verified</span>', dom)
    assert 'id="flagged-count">2<' in dom
    flagged = dom.split("<h2>flagged for review</h2>", 1)[1].split("</table>", 1)[0]
    assert MALLORY in flagged and GAMMA in flagged and ALPHA not in flagged and BETA not in flagged
    assert "4 out-of-scope attempts" in flagged and "denial rate 80% (4 of 5 calls)" in flagged
    assert "one identity used from 2 certificates at once" in flagged
    assert "its token presented from another certificate or agent (1)" in flagged

    agents = dom.split("<h2>agents</h2>", 1)[1].split("</table>", 1)[0]
    row = {m.group(1): m.group(2) for m in re.finditer(r'>(spiffe://[^<]+)</a></td>(.*?)</tr>', agents)}
    cells = {a: re.findall(r"<td>([^<]*)</td>", r)[:5] for a, r in row.items()}
    assert cells[ALPHA] == ["7", "6", "1", "14%", "0"]  # 5 reads, the approved delete, then revoked
    assert cells[BETA] == ["2", "2", "0", "0%", "0"]
    assert cells[MALLORY] == ["5", "1", "4", "80%", "4"]
    assert cells[GAMMA] == ["2", "1", "1", "50%", "0"]
    alpha = dom.split(f">{ALPHA}</h2>", 1)[1].split("</h2>", 1)[0]
    assert "summarise the Q3 reports" in alpha and "made to" in alpha and BETA in alpha
    assert "approved" in alpha and "archived first" in alpha
    assert "alice (https://approvers.dev.local)" in alpha
    assert "token_revoked" in alpha and ">token<" in alpha  # the revocation, and the call it stopped
    assert "received from" in dom.split(f">{BETA}</h2>", 1)[1].split("</h2>", 1)[0]
    mallory = dom.split(f">{MALLORY}</h2>", 1)[1].split("</h2>", 1)[0]
    for target in ("payroll", "secrets"):
        assert f"<td>{target}</td>" in mallory
    assert dom.count('<img alt="calls over time') == 4 and '<img alt="all calls over time"' in dom


def test_what_agents_wrote_is_shown_as_text(logged: Any) -> None:
    """A malicious task, intent and tool name: escaped in the file, text in Chromium's DOM, nothing ran."""
    d, work, _ = logged
    page = work / "evil.html"
    assert report(d, "--html", str(page)).returncode == 0
    source = page.read_text()
    for evil in (EVIL_TASK, EVIL_INTENT, EVIL_TOOL):
        assert evil not in source
    assert "&lt;script&gt;document.title=&#x27;pwned-task&#x27;&lt;/script&gt;" in source
    assert "Content-Security-Policy\" content=\"default-src 'none'" in source
    dom = browse(page, work, "--dump-dom").stdout
    assert "pwned" not in dom.split("</title>", 1)[0]
    assert "<script" not in dom.lower() and "<svg" not in dom.lower()
    assert not re.search(r"<[^>]*\son\w+=", dom)  # no element with an event handler (text escapes "<")
    assert "&lt;svg/onload=alert(3)&gt;" in dom  # the tool's name, as text
    assert dom.count("<img") == 5  # the charts, and no image an intent smuggled in


def test_json_window_and_integrity(logged: Any, tmp_path: Path) -> None:
    d, _, facts = logged
    whole = json.loads(report(d, "--json").stdout)
    assert whole["integrity"]["ok"] and whole["summary"]["checks"] == 16
    assert set(whole["summary"]["flagged"]) == {MALLORY, GAMMA}
    gamma = next(a for a in whole["summary"]["agents"] if a["agent"] == GAMMA)
    assert len(gamma["certificates"]) == 2 and gamma["peer_refusals"][0]["principal"] == GAMMA
    later = json.loads(report(d, "--json", "--since", str(facts["middle"])).stdout)
    assert later["window"]["since"] == facts["middle"]
    assert {a["agent"] for a in later["summary"]["agents"] if a["checks"]} == {MALLORY, GAMMA}
    assert json.loads(report(d, "--json", "--until", str(facts["middle"])).stdout)["summary"]["flagged"] == []

    copy = tmp_path / "state"  # an edited record: the report says so, and the command fails
    shutil.copytree(d.state_dir, copy, ignore=shutil.ignore_patterns("*.lock"))
    log = sorted((copy / "audit").glob("audit-*.jsonl"))[0]
    log.write_text(log.read_text().replace(f'"agent":"{MALLORY}"', '"agent":"spiffe://dev.local/x"', 1))
    page = tmp_path / "bad.html"
    done = subprocess.run([sys.executable, "-m", "agentauthz", "audit", "report", str(copy / "audit"),
                           "--html", str(page)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 1 and "audit log is not intact (report written anyway)" in done.stderr
    assert '<span class="bad">NOT verified</span>' in page.read_text()


def test_without_matplotlib_one_clear_line(logged: Any, tmp_path: Path) -> None:
    d, _, _ = logged
    blocked = [sys.executable, "-c", "import sys; sys.modules['matplotlib'] = None; "
               "from agentauthz.cli import main; sys.exit(main(sys.argv[1:]))"]
    done = report(d, "--html", str(tmp_path / "x.html"), python=blocked)
    assert done.returncode == 1 and not (tmp_path / "x.html").exists()
    assert done.stderr.strip().splitlines() == [
        "agentauthz: report_unavailable: the audit report draws its charts with matplotlib: "
        "pip install agentauthz[report]"]
    assert report(d, "--json", python=blocked).returncode == 0  # JSON draws nothing
