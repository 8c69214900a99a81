"""Shared fixtures: every hot-path test runs against the native and the pure twin."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
from hypothesis import HealthCheck, settings
from support import native_or_fail

from agentauthz.decision import _accel

# Fuzz tests (tests/test_fuzz_*.py) leave max_examples to the profile: "ci", the default, keeps each to
# a few seconds in `make test`, on the same examples every run (derandomized: CI must not flake on a
# new draw); `make fuzz` passes --hypothesis-profile=fuzz to explore. Explicit @settings win.
_FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=_FUZZ_HEALTH,
                          print_blob=True, derandomize=True)
settings.register_profile("fuzz", max_examples=4000, deadline=None, suppress_health_check=_FUZZ_HEALTH,
                          print_blob=True)


def pytest_configure(config: pytest.Config) -> None:
    if not config.getoption("hypothesis_profile", None):  # before test modules build their @settings
        settings.load_profile("ci")


@pytest.fixture(params=["native", "pure"])
def hot(request: pytest.FixtureRequest) -> _accel.HotPath:
    """The hot-path implementation under test (native Cython or pure Python)."""
    return native_or_fail() if request.param == "native" else _accel.pure()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A directory for Unix sockets: its path fits sun_path (108 bytes) and any user may pass through
    it (0711), so a socket's own mode decides who connects; pytest's tmp_path is neither."""
    path = Path(tempfile.mkdtemp(prefix="az-unix-", dir="/tmp"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)
