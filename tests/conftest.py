"""Shared fixtures: every hot-path test runs against the native and the pure twin."""

from __future__ import annotations

import pytest

from agentauthz import _accel


def _native_or_fail() -> _accel.HotPath:
    try:
        return _accel.native()
    except ImportError as exc:
        if _accel.extensions_disabled():
            pytest.skip("AGENTAUTHZ_NO_EXTENSIONS set: native twin not built")
        # A normal build must have the native module: never let it silently fall back.
        pytest.fail(f"native module did not load: {exc}")


@pytest.fixture(params=["native", "pure"])
def hot(request: pytest.FixtureRequest) -> _accel.HotPath:
    """The hot-path implementation under test (native Cython or pure Python)."""
    return _native_or_fail() if request.param == "native" else _accel.pure()
