"""The README's walkthrough, typed as written, prints what the README shows; so does the start banner.

The walkthrough block (the ```sh fence after the ``<!-- walkthrough`` comment) runs with bash, twice, in a
directory laid out as a fresh clone (``.venv``, ``examples/``), against ``.venv/bin/agentauthz serve`` on its
built-in defaults, as ``make run`` starts it. Its fixed ports (9190-9193, Envoy's 10000 and 9901, the tool's
8080) are those of a private network namespace where ``unshare`` allows one, so a ``make run`` on the same
machine takes nothing from it; without one, the host's ports, when free. Every line the block prints must be
the next ``# →`` line of the README (``…`` stands for any text), and nothing else.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from processes import free_port, http_get, wait_for

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
MARK = "<!-- walkthrough"
PORTS = (9190, 9191, 9192, 9193, 9901, 10000, 8080)  # the daemon's, Envoy's and the echo tool's defaults
VENV_BIN = Path(sys.executable).parent
EXAMPLES_DIR = "demo"  # where the README's examples put what they create; git ignores it

# Inside the namespace: bring loopback up (root there, nobody outside), then run the command given.
LOOPBACK_UP = """
import fcntl, os, socket, struct, sys
s = socket.socket()
flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]  # SIOCGIFFLAGS
fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))  # SIOCSIFFLAGS |= IFF_UP
os.execvp(sys.argv[1], sys.argv[1:])
"""

# `make run`'s daemon, then the walkthrough twice; `wait` lets Envoy and the tool give back their ports
# before the next run binds them again.
RUNNER = """
.venv/bin/agentauthz serve > ../daemon.log 2>&1 &
daemon=$!
for _ in $(seq 600); do
  curl -sf -o /dev/null http://127.0.0.1:9192/healthz && break
  kill -0 $daemon 2>/dev/null || exit 3
  sleep 0.1
done
for run in 1 2; do bash ../walkthrough.sh > ../run-$run.txt 2>&1; done
kill -TERM $daemon
wait $daemon
"""


def sh_blocks(text: str) -> list[str]:
    """Every ```sh block of the README."""
    return re.findall(r"^```sh\n(.*?)^```$", text, re.M | re.S)


def walkthrough(text: str) -> str:
    """The shell block right after the walkthrough mark."""
    assert text.count(MARK) == 1, "README.md marks exactly one walkthrough block"
    after = text[text.index(MARK):]
    found = re.search(r"\A[^\n]*-->\n```sh\n(.*?)^```$", after, re.M | re.S)
    assert found, "the walkthrough mark is followed by a ```sh block"
    return found.group(1)


def claims(block: str) -> list[str]:
    """The output the block's `# →` comments promise, line by line, in order."""
    return re.findall(r"^\s*# → (.*)$", block, re.M)


def shows(claim: str, line: str) -> bool:
    """Whether ``line`` is what ``claim`` shows, ``…`` standing for any non-empty text."""
    pattern = "".join(".+" if part == "…" else re.escape(part) for part in re.split("(…)", claim))
    return re.fullmatch(pattern, line) is not None


def namespace_prefix() -> list[str] | None:
    """The command prefix for a private network namespace, or None where unshare refuses one."""
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-rn", "true"], capture_output=True, timeout=30)
    return ["unshare", "-rn", sys.executable, "-c", LOOPBACK_UP] if probe.returncode == 0 else None


def host_ports_free() -> bool:
    for port in PORTS:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def fresh_clone(work: Path) -> None:
    """The parts of a clone the walkthrough touches: the venv `make` builds and the examples."""
    work.mkdir()
    (work / ".venv").symlink_to(Path(sys.prefix))
    (work / "examples").symlink_to(ROOT / "examples")


def test_the_readme_promises_output_for_every_step() -> None:
    block = walkthrough(README.read_text())
    promised = claims(block)
    for shown in ("agentauthz: denied: scope_denied (HTTP 403)", "200", "403", '{"error": "task_ended"}',
                  "401", ".agentauthz/audit: OK: …"):
        assert shown in promised
    assert "--force" in block and '--task "$TASK"' in block and "/ready" in block


def test_walkthrough_runs_as_written(tmp_path: Path) -> None:
    if not (VENV_BIN / "agentauthz").exists() or not (VENV_BIN / "envoy").exists():
        pytest.skip("the walkthrough needs the venv `make test` builds (agentauthz and envoy in it)")
    if not shutil.which("curl"):
        pytest.skip("the walkthrough needs curl")
    prefix = namespace_prefix()
    if prefix is None and not host_ports_free():
        pytest.skip(f"no network namespace here and a port of {PORTS} is taken (`make run`?)")
    block = walkthrough(README.read_text())
    work = tmp_path / "clone"
    fresh_clone(work)
    (tmp_path / "walkthrough.sh").write_text(block + "\nwait\n")
    (tmp_path / "runner.sh").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}  # the machine's, not the README's
    env["PYTHONUNBUFFERED"] = "1"  # a terminal shows the echo tool's line at once; a pipe would hold it
    runner = subprocess.Popen([*(prefix or []), "bash", "../runner.sh"], cwd=work, env=env,
                              start_new_session=True)
    try:
        code = runner.wait(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(runner.pid, signal.SIGKILL)
        runner.wait()
        raise
    finally:
        try:
            os.killpg(runner.pid, signal.SIGKILL)  # anything the runner left behind
        except ProcessLookupError:
            pass
    daemon_log = (tmp_path / "daemon.log").read_text(errors="replace")
    assert code == 0, f"runner exited {code}; daemon log:\n{daemon_log}"
    # The banner of `make run`'s daemon names the command it was started with.
    assert ".venv/bin/agentauthz dev-identity spiffe://dev.local/agent/alpha" in daemon_log

    promised = claims(block)
    for run in (1, 2):  # the second run proves the block can be run again as it is
        printed = (tmp_path / f"run-{run}.txt").read_text(errors="replace").splitlines()
        transcript = "\n".join(printed)
        assert len(printed) == len(promised), f"run {run} printed:\n{transcript}\n\ndaemon log:\n{daemon_log}"
        for claim, line in zip(promised, printed, strict=True):
            assert shows(claim, line), f"run {run}: {line!r} is not {claim!r}; it printed:\n{transcript}"
    # What the walkthrough created is under demo/ (and the daemon's state under .agentauthz/), nowhere else.
    assert sorted(os.listdir(work)) == [".agentauthz", ".venv", EXAMPLES_DIR, "examples"]
    assert (work / EXAMPLES_DIR / "alpha" / "svid.key").is_file()


def written_paths(text: str) -> list[str]:
    """Every file or directory the README's examples tell the reader to create."""
    paths = []
    for block in sh_blocks(text):
        paths += re.findall(r"--out (\S+)", block)
        paths += re.findall(r"^(?:cat|echo .*?) > (\S+)", block, re.M)
        paths += re.findall(r"^\s*policy_file: (\S+)", block, re.M)
    paths += re.findall(r'Identity\.from_dir\("([^"]+)"\)', text)
    return paths


def test_example_files_go_under_an_ignored_directory() -> None:
    paths = written_paths(README.read_text())
    assert len(paths) > 10, paths
    elsewhere = [p for p in paths if not p.startswith(f"{EXAMPLES_DIR}/")]
    assert not elsewhere, f"README examples write outside {EXAMPLES_DIR}/: {elsewhere}"
    if not (ROOT / ".git").exists() or not shutil.which("git"):
        pytest.skip("not a git checkout: nothing to ignore files")
    for path in {*paths, f"{EXAMPLES_DIR}/alpha/svid.key"}:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", path], cwd=ROOT, timeout=30)
        assert ignored.returncode == 0, f"{path} is not ignored by .gitignore"


@pytest.mark.parametrize("started_as", ["path", "absolute", "module"])
def test_banner_names_the_command_in_use(tmp_path: Path, started_as: str) -> None:
    """The start banner's commands are spelled as this daemon was started, and run as printed."""
    script = VENV_BIN / "agentauthz"
    if not script.exists():
        pytest.skip("no agentauthz console script beside this Python")
    plain_path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                 if p and Path(p).resolve() != VENV_BIN.resolve())
    env = {**os.environ, "PATH": plain_path}
    command = {"path": ["agentauthz"], "absolute": [str(script)],
               "module": [sys.executable, "-m", "agentauthz"]}[started_as]
    if started_as == "path":
        env["PATH"] = os.pathsep.join([str(VENV_BIN), plain_path])
    expected = {"path": "agentauthz", "absolute": shlex.quote(str(script)),
                "module": f"{shlex.quote(sys.executable)} -m agentauthz"}[started_as]
    work = tmp_path / "elsewhere"  # outside the checkout: the repository's .venv/ is not here
    work.mkdir()
    ports = {name: free_port() for name in ("check", "api", "http", "approval")}
    log_path = tmp_path / "daemon.log"
    with open(log_path, "wb") as log:
        daemon = subprocess.Popen([*command, "serve", "--state-dir", "state",
                                   *(a for name, port in ports.items()
                                     for a in (f"--{name}-listen", f"127.0.0.1:{port}"))],
                                  cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        healthz = f"http://127.0.0.1:{ports['http']}/healthz"
        wait_for(lambda: daemon.poll() is None and http_get(healthz)[0] == 200
                 and "Ctrl-C" in log_path.read_text(), 60, "the daemon's banner")
        lines = [line.strip() for line in log_path.read_text().splitlines() if line.startswith("  ")]
        assert len(lines) == 5 and all(line.startswith(f"{expected} ") for line in lines), lines
        token = ""
        for line in lines:  # each runs as printed, in the daemon's directory (TOKEN: the one minted)
            argv = shlex.split(line.replace("TOKEN", token))
            done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
            if " mint " in line:
                token = json.loads(done.stdout)["token"]
        assert (work / EXAMPLES_DIR / "alpha" / "svid.key").is_file()
        assert (work / EXAMPLES_DIR / "alice.jwt").is_file()
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
