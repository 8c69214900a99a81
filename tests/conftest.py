"""Shared fixtures: every hot-path test runs against the native and the pure twin."""

from __future__ import annotations

import pytest
from support import native_or_fail

from agentauthz import _accel


@pytest.fixture(params=["native", "pure"])
def hot(request: pytest.FixtureRequest) -> _accel.HotPath:
    """The hot-path implementation under test (native Cython or pure Python)."""
    return native_or_fail() if request.param == "native" else _accel.pure()
