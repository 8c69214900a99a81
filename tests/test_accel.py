"""The selector: the native twin is what a normal build runs, and only an explicit switch turns it off."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import agentauthz
from agentauthz.decision import _accel

ROOT = Path(agentauthz.__file__).resolve().parent.parent
SHARED_NAMES = ("Verifier", "VerifiedToken", "RevocationIndex", "Grant", "compile_grant", "b64url_decode",
                "Bitset")
TOKEN_ATTRIBUTES = ("claims", "kid", "jti", "sub", "task", "iat", "nbf", "exp", "grants", "slots", "subjects",
                    "attachment")


@pytest.mark.skipif(_accel.extensions_disabled(), reason="AGENTAUTHZ_NO_EXTENSIONS asks for the pure twin")
def test_a_normal_build_runs_native() -> None:
    """The guard: a build that silently fell back to pure Python fails here, not in production."""
    assert _accel.FALLBACK_REASON is None, _accel.FALLBACK_REASON
    assert _accel.NATIVE is True
    assert _accel.ACTIVE.name == "native"
    assert _accel.Verifier.__module__ == "agentauthz.decision._verify_c"
    assert _accel.VerifiedToken.__module__ == "agentauthz.decision._token_c"
    assert _accel.Bitset.__module__ == "agentauthz.decision._bitset_c"
    assert _accel.ACTIVE.scan_check_request.__module__ == "agentauthz.decision._request_c"  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ["1", "true", "TRUE", "yes", "On", " on "])
def test_extensions_disabled_true(value: str) -> None:
    assert _accel.extensions_disabled({"AGENTAUTHZ_NO_EXTENSIONS": value}) is True


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "OFF", "", "  "])
def test_extensions_disabled_false(value: str) -> None:
    assert _accel.extensions_disabled({"AGENTAUTHZ_NO_EXTENSIONS": value}) is False


def test_extensions_disabled_when_unset() -> None:
    assert _accel.extensions_disabled({}) is False


@pytest.mark.parametrize("value", ["2", "maybe", "y", "disable", "1 0", "native"])
def test_extensions_disabled_refuses_junk(value: str) -> None:
    with pytest.raises(ImportError, match="AGENTAUTHZ_NO_EXTENSIONS"):
        _accel.extensions_disabled({"AGENTAUTHZ_NO_EXTENSIONS": value})


def _selected(value: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "AGENTAUTHZ_NO_EXTENSIONS"}
    if value is not None:
        env["AGENTAUTHZ_NO_EXTENSIONS"] = value
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-c",
         "from agentauthz.decision import _accel; print(_accel.ACTIVE.name, _accel.NATIVE)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("value", ["1", "true", "yes", "on"])
def test_switch_selects_pure_in_a_fresh_process(value: str) -> None:
    result = _selected(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["pure", "False"]


@pytest.mark.skipif(_accel.extensions_disabled(), reason="AGENTAUTHZ_NO_EXTENSIONS asks for the pure twin")
@pytest.mark.parametrize("value", [None, "0", "off"])
def test_native_is_selected_in_a_fresh_process(value: str | None) -> None:
    result = _selected(value)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["native", "True"]


def test_junk_switch_fails_the_import() -> None:
    result = _selected("perhaps")
    assert result.returncode != 0
    assert "AGENTAUTHZ_NO_EXTENSIONS='perhaps'" in result.stderr


def test_both_twins_expose_the_same_names(hot: _accel.HotPath) -> None:
    pure = _accel.pure()
    for name in SHARED_NAMES:
        assert getattr(hot, name) is not None
    assert hot.bitset_module.HEADER_BYTES == pure.bitset_module.HEADER_BYTES
    assert hot.bitset_module.buffer_size(1024) == pure.bitset_module.buffer_size(1024)
    for cls in ("Verifier", "RevocationIndex", "Bitset", "Grant"):
        public = {n for n in dir(getattr(pure, cls)) if not n.startswith("_")}
        assert public <= set(dir(getattr(hot, cls))), (cls, public - set(dir(getattr(hot, cls))))
    assert set(TOKEN_ATTRIBUTES) <= set(dir(hot.VerifiedToken))


def test_native_raises_the_shared_exception_classes() -> None:
    """One hierarchy, defined in Python: the native module defines none of its own."""
    from agentauthz import errors
    native = _accel.native() if not _accel.extensions_disabled() else pytest.skip("pure only")
    decode: Any = native.b64url_decode  # HotPath types it as a plain object
    with pytest.raises(errors.TokenMalformed) as caught:
        decode("A")
    assert type(caught.value) is errors.TokenMalformed
    assert str(caught.value) == "segment is not unpadded base64url"
