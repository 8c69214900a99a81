"""Paired, interleaved micro ratios: the figures the targets are judged on.

    python -m benchmarks.paired [--rounds 41] [--out benchmarks/results/paired.json]

pytest-benchmark runs one benchmark to the end before the next starts, so on a
shared 2-core VM a burst of noise lands on whichever ran at that moment and
skews a ratio of two medians. Here the two sides of each ratio run in
alternating short blocks (A B, then B A, ...), each block timed on its own,
and the ratio is taken per round from adjacent blocks; the figure is the
median of those per-round ratios. Noise that lasts longer than a block falls
on both sides alike.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

from nacl.signing import VerifyKey

from agentauthz.decision import _accel
from agentauthz.decision.policy import Policy

from .bench_hotpath import KEY, NOW, token, verifier
from .bench_policy import DOMAIN, policy_text

RESULTS = Path(__file__).resolve().parent / "results"


def _block(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def paired(a: Callable[[], Any], b: Callable[[], Any], rounds: int, calls: int) -> dict[str, float]:
    """Median over rounds of time(a)/time(b), adjacent blocks, order alternating each round."""
    _block(a, calls), _block(b, calls)  # warm both
    ratios, a_s, b_s = [], [], []
    for i in range(rounds):
        if i % 2:
            tb, ta = _block(b, calls), _block(a, calls)
        else:
            ta, tb = _block(a, calls), _block(b, calls)
        ratios.append(ta / tb)
        a_s.append(ta)
        b_s.append(tb)
    q = statistics.quantiles(ratios, n=4)
    return {"ratio": statistics.median(ratios), "ratio_q1": q[0], "ratio_q3": q[2],
            "a_us": statistics.median(a_s) * 1e6, "b_us": statistics.median(b_s) * 1e6,
            "rounds": rounds, "calls_per_block": calls}


def cases() -> dict[str, tuple[str, Callable[[], Any], Callable[[], Any], int]]:
    """name -> (what is measured, a, b, calls per block)."""
    native, pure = _accel.native(), _accel.pure()
    t = token()
    signing_input, _, sig = t.rpartition(".")
    message, signature = signing_input.encode(), pure.b64url_decode(sig)
    bare = functools.partial(VerifyKey(bytes(KEY.verify_key)).verify, message, signature)

    def cold(hot: Any) -> Callable[[], Any]:
        v = verifier(hot)

        def run() -> Any:
            v.forget(t)
            return v.verify(t, NOW)
        return run

    def warm(hot: Any, slot: int = 1, revoked: int = 0) -> Callable[[], Any]:
        v = verifier(hot)
        if slot > 1:  # the 10M case: a window wide enough for both sides, slots [0, revoked) set
            from agentauthz.decision._bitset_py import HEADER_BYTES, buffer_size
            capacity = 1 << 24
            buffer = bytearray(buffer_size(capacity))
            buffer[HEADER_BYTES:HEADER_BYTES + revoked // 8] = b"\xff" * (revoked // 8)
            v.revocations = hot.RevocationIndex(hot.Bitset(capacity, buffer))
        tok = token(slot=slot)
        assert v.decide(tok, "demo", "reports", "read", "public", NOW)[0] == "allow"
        # partial, not a lambda: no Python frame of ours around the call being measured
        return functools.partial(v.decide, tok, "demo", "reports", "read", "public", NOW)

    def permits(n: int, cache_size: int | None) -> Callable[[], Any]:
        text = policy_text(n)
        kwargs = {} if cache_size is None else {"cache_size": cache_size}
        policy = Policy.from_text(text, f"bench-{n}", **kwargs)
        agent = f"{DOMAIN}/agent/a{(n // 2) // 3 * 3}"  # an exact rule on tool "demo"
        assert policy.permits(agent, "demo", "repo/x", "read", 1) is None
        return functools.partial(policy.permits, agent, "demo", "repo/x", "read", 1)

    return {
        "policy_warm_100k_over_10": ("policy lookup (warm cache), 100,000 / 10 rules",
                                     permits(100_000, None), permits(10, None), 20000),
        "policy_cold_100k_over_10": ("policy lookup (cold: no per-agent cache), 100,000 / 10 rules",
                                     permits(100_000, 0), permits(10, 0), 2000),
        "cold_verify_native_over_pynacl": ("cold verify, native / bare PyNaCl VerifyKey.verify",
                                           cold(native), bare, 200),
        "cold_verify_pure_over_pynacl": ("cold verify, pure / bare PyNaCl VerifyKey.verify",
                                         cold(pure), bare, 200),
        "warm_decide_pure_over_native": ("warm decide, pure / native", warm(pure), warm(native), 20000),
        "decide_10m_revoked_over_0": ("native warm decide, 10,000,000 revoked / none",
                                      warm(native, (1 << 24) - 1, 10_000_000), warm(native, (1 << 24) - 1),
                                      20000),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--out", type=Path, default=RESULTS / "paired.json")
    args = parser.parse_args(argv)
    out = {}
    for name, (what, a, b, calls) in cases().items():
        out[name] = {"what": what, **paired(a, b, args.rounds, calls)}
        r = out[name]
        print(f"{what:58s} {r['ratio']:6.3f}  (IQR {r['ratio_q1']:.3f}–{r['ratio_q3']:.3f}; "
              f"{r['a_us']:.2f} / {r['b_us']:.2f} µs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
