"""The package's build and the switch between twins, as a user meets them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agentauthz.decision import _accel

ROOT = Path(__file__).resolve().parent.parent


def version(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-m", "agentauthz", "version", "--json"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=60, check=True)
    return json.loads(out.stdout)


@pytest.mark.skipif(_accel.extensions_disabled(), reason="AGENTAUTHZ_NO_EXTENSIONS asks for pure")
def test_version_reports_native_in_a_normal_build() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENTAUTHZ_NO_EXTENSIONS"}
    result = version(env)
    assert (result["native"], result["implementation"]) == (True, "native")


def test_version_reports_pure_when_extensions_are_disabled() -> None:
    result = version({**os.environ, "AGENTAUTHZ_NO_EXTENSIONS": "1"})
    assert (result["native"], result["implementation"]) == (False, "pure")
    assert "AGENTAUTHZ_NO_EXTENSIONS" in result["fallback_reason"]


# Import the copy just built, not the checkout an editable install points every import at.
PROBE = """
import sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path.insert(0, ".")
from agentauthz.decision import _accel
print(_accel.ACTIVE.name, _accel.__file__)
"""


def _copy_sources(dest: Path) -> None:
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "native", dest / "native", ignore=shutil.ignore_patterns("*.c", "*.html"))
    shutil.copytree(ROOT / "agentauthz", dest / "agentauthz",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))


@pytest.mark.parametrize("env, says", [
    ({"CC": "/bin/false", "LDSHARED": "/bin/false"}, "native extension could not be built"),
    ({"AGENTAUTHZ_NO_EXTENSIONS": "yes"}, "AGENTAUTHZ_NO_EXTENSIONS set"),
], ids=["no-compiler", "switch"])
def test_build_without_native_installs_pure_and_says_so(tmp_path: Path, env: dict[str, str],
                                                        says: str) -> None:
    _copy_sources(tmp_path)
    # Each case sets its own cause: never inherit the switch from the test run's environment.
    base = {k: v for k, v in os.environ.items() if k != "AGENTAUTHZ_NO_EXTENSIONS"}
    build = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tmp_path,
                           capture_output=True, text=True, env={**base, **env}, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    assert says in build.stderr
    assert not list((tmp_path / "agentauthz").rglob("*.so"))
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True,
                           timeout=60, env=base)
    selector = tmp_path / "agentauthz" / "decision" / "_accel.py"
    assert probe.stdout.split() == ["pure", str(selector)], probe.stderr
