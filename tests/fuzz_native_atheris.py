"""Coverage-guided fuzzing of the native verifier with atheris (libFuzzer), the pure twin as the oracle.

    .venv/bin/pip install atheris           # optional: not a test dependency
    make fuzz-native                        # or: .venv/bin/python tests/fuzz_native_atheris.py -runs=200000

Hypothesis (tests/test_fuzz_*.py) cannot survive a crash in C: a segfault in ``_verify_c`` kills
pytest and every report with it. libFuzzer runs the native twin in-process, keeps crashing inputs as
``crash-*`` files, and is guided by coverage of the pure twin (instrumented here): an input that takes
a new branch of the reference implementation is kept and mutated further, and every input must get
the same answer from both twins. Seeds: tests/corpus/tokens/ (pass it as a corpus directory).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import atheris

# Imported first here, so that the pure twin is instrumented wherever it is used later.
with atheris.instrument_imports(include=["agentauthz.decision._strict_py", "agentauthz.decision._token_py",
                                         "agentauthz.decision._verify_py",
                                         "agentauthz.decision.constraints"]):
    from agentauthz.decision import _strict_py, _token_py, _verify_py  # noqa: F401  (used through _accel.pure())

from nacl.signing import SigningKey

from agentauthz import errors
from agentauthz.decision import _accel, tokens

ISSUER, AUDIENCE, KID = "https://agentauthz.test", "tools", "fuzz-key"
KEY = SigningKey(b"\x01" * 32)  # fixed: a crash file must reproduce
NOW = 1_800_000_000
REQUESTS = [("demo", "reports/q3", "read", "public"), ("demo", "x", "write", "internal"), ("", "", "", "")]


def verifiers() -> list[Any]:
    out = []
    for hot in (_accel.native(), _accel.pure()):
        v = hot.Verifier(issuer=ISSUER, audiences={AUDIENCE}, token_type=tokens.TOKEN_TYPE,
                         revocations=hot.RevocationIndex(hot.Bitset(1 << 12)))
        v.set_keys({KID: bytes(KEY.verify_key)})
        v.set_policy(None)
        out.append(v)
    return out


def outcome(v: Any, token: Any) -> tuple[Any, ...]:
    try:
        entry = v.verify(token, NOW)
    except errors.TokenError as exc:
        return ("refused", type(exc), str(exc))
    return ("verified", entry.claims, entry.slots, entry.subjects)


def json_outcome(function: Any, raw: bytes) -> tuple[Any, ...]:
    try:
        return ("parsed", repr(function(raw, "claims")))
    except errors.TokenError as exc:
        return ("refused", type(exc), str(exc))


def sign(header: bytes, payload: bytes) -> str:
    h, p = tokens.b64url(header), tokens.b64url(payload)
    return f"{h}.{p}.{tokens.b64url(KEY.sign(f'{h}.{p}'.encode()).signature)}"


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:  # a token as Envoy would pass it: any text
        token: Any = fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes())
    elif mode == 1:  # raw bytes: verify() takes them too
        token = fdp.ConsumeBytes(fdp.remaining_bytes())
    elif mode == 2:  # a correctly signed token around fuzzed claims: strictness, not the signature
        header = json.dumps({"alg": "EdDSA", "typ": tokens.TOKEN_TYPE, "kid": KID}).encode()
        token = sign(header, fdp.ConsumeBytes(fdp.remaining_bytes()))
    else:  # the strict JSON parsers alone
        from agentauthz.decision import _strict_c  # type: ignore[attr-defined]
        raw = fdp.ConsumeBytes(fdp.remaining_bytes())
        native, pure = json_outcome(_strict_c.json_object, raw), json_outcome(_strict_py.json_object, raw)
        if native != pure:
            raise AssertionError(f"json_object disagrees on {raw!r}: {native} != {pure}")
        return
    native, pure = (outcome(v, token) for v in verifiers())
    if native != pure:
        raise AssertionError(f"verify disagrees on {token!r}: {native} != {pure}")
    for request in REQUESTS:
        decided = [v.decide(token, *request, NOW)[0] for v in verifiers()]
        if decided[0] != decided[1]:
            raise AssertionError(f"decide disagrees on {token!r} {request}: {decided}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
