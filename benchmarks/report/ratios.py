"""Every ratio the performance issue asks for, from figures of the same run, next to its target."""

from __future__ import annotations

import math
import statistics
from typing import Any, Callable

# Micro benchmark names (benchmarks/bench_hotpath.py, bench_policy.py, bench_audit.py).
# Judged on benchmarks/paired.py's interleaved ratios; pytest-benchmark's sequential medians are
# listed beside them for reference (a noisy minute skews a ratio of two separately taken medians).
PAIRED_RATIOS = [
    # paired.json key, title, target text, predicate on the ratio
    ("warm_decide_pure_over_native", "warm decide: pure / native, paired (native is N× faster)",
     "≥ 5", lambda r: r >= 5),
    ("cold_verify_native_over_pynacl", "cold verify: native / bare PyNaCl verify, paired", "≤ 1.15",
     lambda r: r <= 1.15),
    ("cold_verify_pure_over_pynacl", "cold verify: pure / bare PyNaCl verify, paired", "(info)", None),
    ("decide_10m_revoked_over_0", "native decide: 10,000,000 revoked / 0 revoked, paired", "≤ 1.2",
     lambda r: r <= 1.2),
    ("policy_warm_100k_over_10", "policy lookup (warm): 100,000 / 10 rules, paired", "≤ 1.2",
     lambda r: r <= 1.2),
    ("policy_cold_100k_over_10", "policy lookup (cold cache): 100,000 / 10 rules, paired", "≤ 1.2",
     lambda r: r <= 1.2),
]
MICRO_RATIOS = [
    # key, title, numerator, denominator, target text, predicate on the ratio
    ("micro_warm_decide_pure_over_native", "warm decide: pure / native (sequential medians)",
     "test_warm_decide[pure]", "test_warm_decide[native]", "(info)", None),
    ("micro_cold_verify_native_over_pynacl", "cold verify: native / bare PyNaCl verify (sequential medians)",
     "test_cold_verify[native]", "test_cold_verify_bare_pynacl", "(info)", None),
    ("micro_pyjwt_over_native_cold_verify", "cold verify: PyJWT decode / native",
     "test_cold_verify_pyjwt", "test_cold_verify[native]", "(info)", None),
    ("micro_decide_10m_revoked_over_0", "native decide: 10,000,000 revoked / 0 revoked (sequential medians)",
     "test_warm_decide_with_revocations[native-10000000]", "test_warm_decide_with_revocations[native-0]",
     "(info)", None),
    ("micro_policy_warm_100k_over_10", "policy lookup (warm): 100,000 / 10 rules (sequential medians)",
     "test_permits_warm[100000]", "test_permits_warm[10]", "(info)", None),
    ("micro_policy_cold_100k_over_10", "policy lookup (cold cache): 100,000 / 10 rules (sequential medians)",
     "test_permits_cold[100000]", "test_permits_cold[10]", "(info)", None),
]


def _row(load: dict[str, Any], table: str, row: str) -> dict[str, Any] | None:
    r = load.get("tables", {}).get(table, {}).get("rows", {}).get(row)
    return r["summary"] if r else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _paired(load: dict[str, Any], table: str, a: str, b: str,
            figure: Callable[[dict[str, Any], dict[str, Any]], float | None]) -> float | None:
    """The median over rounds of ``figure(a's run, b's run)`` in the same round.

    Rows of a table run interleaved, so a round's two runs are seconds apart: noise slower than
    that (another tenant, a host's turbo) falls on both. A ratio of two medians taken over the
    whole table does not cancel it. Rounds where either run was invalid are left out.
    """
    rows = load.get("tables", {}).get(table, {}).get("rows", {})
    if a not in rows or b not in rows:
        return None
    pairs = zip(rows[a]["rounds"], rows[b]["rounds"], strict=True)
    values = [v for v in (figure(x, y) for x, y in pairs if x["valid"] and y["valid"])
              if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def ratios(load: dict[str, Any], micro: dict[str, dict[str, float]],
           paired: dict[str, dict[str, float]] | None = None,
           handlers: dict[str, Any] | None = None,
           instructions: dict[str, Any] | None = None,
           cluster: dict[str, Any] | None = None,
           http_check: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every ratio with its target and verdict (``met`` is None where there is no target)."""
    out: list[dict[str, Any]] = []

    def add(key: str, title: str, value: float | None, target: str, ok: Any, unit: str = "×",
            source: str = "") -> None:
        met = None if ok is None or value is None else bool(ok(value))
        out.append({"key": key, "title": title, "value": value, "unit": unit, "target": target,
                    "met": met, "source": source})

    def rps(table: str, row: str) -> float | None:
        """``row``'s throughput over ``table``'s rounds, or the paired ratio when a denominator row
        is named as ``row/denominator``: see ``_paired``."""
        if "/" in row:
            over, _, under = row.partition("/")
            return _paired(load, table, over, under, lambda a, b: _ratio(a["rps"], b["rps"]))
        s = _row(load, table, row)
        return s["rps"] if s else None

    direct = (("direct_h2load", "h2load"), ("direct_h2load_pinned", "h2load, 1 core"),
              ("direct_python", "Python client"))
    for table, gen in direct:
        add(f"warm_over_floor_{table}", f"warm Check throughput / floor ({gen})",
            rps(table, "warm/floor"), "≥ 0.90", lambda r: r >= 0.90, source=table)
    for table, gen in direct[:2]:
        add(f"parse_over_floor_{table}", f"floor + request parse / floor ({gen}): any authorizer's bound",
            rps(table, "parse/floor"), "(bound)", None, source=table)
        add(f"record_over_floor_{table}", f"floor + parse + one chained audit write / floor ({gen}): "
            "an audited allow's bound", rps(table, "record/floor"), "(bound)", None,
            source=table)
        add(f"warm_over_parse_{table}", f"warm Check throughput / floor + request parse ({gen})",
            rps(table, "warm/parse"), "(info)", None, source=table)
        add(f"warm_over_record_{table}", f"warm Check throughput / its bound, parse + audit write ({gen})",
            rps(table, "warm/record"), "(info)", None, source=table)
    add("record_over_floor_direct_python", "floor + parse + one chained audit write / floor "
        "(Python client): an audited allow's bound", rps("direct_python", "record/floor"), "(bound)", None,
        source="direct_python")
    add("cold_over_floor", "cold Check throughput / floor (Python client)",
        rps("direct_python", "cold/floor"), "≥ 0.60", lambda r: r >= 0.60,
        source="direct_python")
    add("verify_over_floor", "floor + parse + audit write + bare PyNaCl verify + claims read / floor "
        "(Python client): a cold allow's bound", rps("direct_python", "verify/floor"),
        "(bound)", None, source="direct_python")
    add("cold_over_verify", "cold Check throughput / its bound (Python client)",
        rps("direct_python", "cold/verify"), "(info)", None,
        source="direct_python")
    for table, gen in direct:
        add(f"warm_over_naive_{table}", f"agentauthz warm / naive PyJWT peer ({gen})",
            rps(table, "warm/naive"), "≥ 2", lambda r: r >= 2, source=table)
    add("cold_over_naive", "agentauthz cold / naive PyJWT peer (Python client)",
        rps("direct_python", "cold/naive"), "≥ 2", lambda r: r >= 2,
        source="direct_python")
    add("verify_over_naive", "floor + parse + audit write + bare PyNaCl verify + claims read / naive "
        "PyJWT peer (Python client): a cold allow's bound", rps("direct_python", "verify/naive"), "(bound)",
        None, source="direct_python")

    def per_cpu(a: dict[str, Any], b: dict[str, Any]) -> float | None:
        return _ratio(b["cpu_us_per_request"]["server"], a["cpu_us_per_request"]["server"])

    # A pinned server is busy for all of its core's time the host leaves it, so its requests/s are
    # that time over its CPU per request. The CPU a request costs is not charged for steal: its
    # ratio is the throughput ratio the two would have on an equally undisturbed core.
    for table, gen, rows in (("direct_h2load_pinned", "h2load, 1 core", ("warm", "record")),
                             ("direct_python", "Python client", ("warm", "record", "cold", "verify"))):
        for row in rows:
            add(f"{row}_over_floor_by_cpu_{table}", f"{row} / floor by server CPU per request "
                f"({gen}): the throughput ratio without steal", _paired(load, table, row, "floor", per_cpu),
                "(info)", None, source=table)

    def cpu_added(a: dict[str, Any], b: dict[str, Any]) -> float:
        return float(a["cpu_us_per_request"]["server"] - b["cpu_us_per_request"]["server"])

    for table in ("direct_h2load_pinned", "direct_h2load"):
        add(f"added_cpu_{table}", f"server CPU a warm Check adds over the floor ({table})",
            _paired(load, table, "warm", "floor", cpu_added), "(info)", None, unit="µs", source=table)

    def p50_added(a: dict[str, Any], b: dict[str, Any]) -> float:
        return float(a["p50"] - b["p50"])

    e = {m: _row(load, "envoy_1", m) for m in ("floor", "jwt_authn", "ext_authz", "ext_authz_floor")}
    if e["floor"] and e["ext_authz"]:
        added = _paired(load, "envoy_1", "ext_authz", "floor", p50_added)
        add("envoy_added_p50_ms", "Envoy ext_authz → agentauthz: median added latency over the proxy floor "
            "(1 connection)", added, "≤ 1 ms", lambda v: v <= 1.0, unit="ms", source="envoy_1")
        if e["jwt_authn"]:
            jwt_added = _paired(load, "envoy_1", "jwt_authn", "floor", p50_added)
            add("envoy_jwt_added_p50_ms", "Envoy jwt_authn: median added latency over the proxy floor",
                jwt_added, "(info)", None, unit="ms", source="envoy_1")
            add("envoy_added_over_jwt", "added latency: ext_authz→agentauthz / jwt_authn",
                _ratio(added, jwt_added), "(report honestly)", None, source="envoy_1")
        if e["ext_authz_floor"]:
            add("envoy_hop_added_p50_ms", "Envoy ext_authz → constant-OK floor server: added latency "
                "(the gRPC hop alone)", _paired(load, "envoy_1", "ext_authz_floor", "floor", p50_added),
                "(bound)", None, unit="ms", source="envoy_1")
        add("envoy_answer_added_p50_ms", "Envoy ext_authz → floor server answering agentauthz's allow: "
            "added latency (the hop with the answer the design asks for)",
            _paired(load, "envoy_1", "ext_authz_answer", "floor", p50_added), "(bound)", None, unit="ms",
            source="envoy_1")
        add("envoy_record_added_p50_ms", "Envoy ext_authz → parse + audit write server: added latency "
            "(an audited allow's bound)", _paired(load, "envoy_1", "ext_authz_record", "floor", p50_added),
            "(bound)", None, unit="ms", source="envoy_1")
    add("envoy_ext_over_jwt_rps", "through Envoy, N connections: ext_authz / jwt_authn throughput",
        rps("envoy_n", "ext_authz/jwt_authn"), "(report honestly)", None,
        source="envoy_n")
    add("envoy_ext_over_floor_rps", "through Envoy, N connections: ext_authz / no-authz throughput",
        rps("envoy_n", "ext_authz/floor"), "(info)", None, source="envoy_n")
    add("uds_over_tcp", "Check over Unix socket / TCP loopback throughput",
        rps("transport", "uds/tcp"), "(info)", None, source="transport")
    add("mint_per_s", "Mint over mTLS", rps("mint", "mint"), "(info)", None, unit="mints/s", source="mint")
    add("workers2_over_1", "serve --workers 2 / --workers 1 throughput",
        rps("workers", "workers2/workers1"), "(info: 2 cores shared with h2load)",
        None, source="workers")
    prop = load.get("workers", {}).get("propagation") or []
    if prop:
        times = [p["all_denied_after_ms"] for p in prop]
        add("revocation_all_workers_ms", "Revoke acknowledged → every worker denying (max over trials)",
            None if None in times else max(times), "(info)", None, unit="ms", source="workers")
        add("revocation_stale_allows", "Checks allowed after a Revoke was acknowledged",
            sum(p["stale_allows"] for p in prop), "0", lambda v: v == 0, unit="", source="workers")

    memory = load.get("revocation_memory")
    if memory:
        # The bits' memory over the window's slots, times the slots a minted token took: bits per
        # token, the constant header spread over the window. A header up to 64 bytes counts as constant.
        window, header = memory["window_slots"], memory["bits_bytes"] - memory["window_slots"] / 8
        add("revocation_bits_per_token", f"revocation bitset: bits per token in the live window "
            f"({header:.0f} bytes of it constant)", 8 * memory["bits_bytes"] / window
            * memory["slots"] / memory["tokens"], "≤ 1 bit + constant", lambda v: v <= 1 + 8 * 64 / window,
            unit="bits", source=f"/metrics of the cold daemon around minting {memory['tokens']} tokens")

    rounds = (handlers or {}).get("rounds", [])
    for name, label in (("check", "warm Check"), ("bound", "the bound's parse + audit write"),
                        ("parse", "parsing the CheckRequest"),
                        ("record", "an allow's record as the audit log writes it (native chain)"),
                        ("decide", "reading the bearer and deciding on the cached token")):
        if rounds and name not in rounds[0]:
            continue  # a handlers.json from before this step was measured
        per_call = [r[name] for r in rounds]
        add(f"handler_{name}_us", f"{label}: handler thread CPU per call, all handlers under one shared "
            "load", statistics.median(per_call) if per_call else None, "(info)", None, unit="µs",
            source="benchmarks/load/handlers.py")
    beyond = [r["check"] - r["record"] for r in rounds if "record" in r]
    add("handler_check_beyond_record_us", "warm Check handler minus its record's (native chain): what "
        "deciding and answering add, thread CPU per call under one shared load (median of per-round "
        "differences)", statistics.median(beyond) if beyond else None, "(info)", None, unit="µs",
        source="benchmarks/load/handlers.py")
    per_round = [r["check"] / r["bound"] for r in rounds if r.get("bound")]
    add("handler_check_over_bound", "warm Check handler / the bound's handler, thread CPU per call under "
        "one shared load (median of per-round ratios)", statistics.median(per_round) if per_round else None,
        "(info)", None, source="benchmarks/load/handlers.py")

    counts = (instructions or {}).get("instructions_per_check", {})
    if counts.get("floor"):
        for name, label, target in (
                ("warm", "warm Check", "(info)"),
                ("record", "parse + one chained audit write: a warm allow's bound", "(bound)"),
                ("cold", "cold Check", "(info)"),
                ("verify", "parse + audit write + bare PyNaCl verify + claims read: a cold allow's bound",
                 "(bound)")):
            add(f"instructions_floor_over_{name}", f"floor / {label}, by instructions per Check (callgrind: "
                "user-space work, no noise, no kernel time)",
                counts["floor"] / counts[name] if counts.get(name) else None, target, None,
                source="benchmarks/load/instructions.py")
        if counts.get("naive"):
            for name, label, target in (("cold", "cold Check", "(info)"),
                                        ("verify", "a cold allow's bound", "(bound)")):
                add(f"instructions_naive_over_{name}", f"naive PyJWT peer / {label}, by instructions per "
                    "Check (callgrind)", counts["naive"] / counts[name] if counts.get(name) else None,
                    target, None, source="benchmarks/load/instructions.py")
        for check, bound in (("warm", "record"), ("cold", "verify")):
            add(f"instructions_{check}_beyond_{bound}", f"instructions a {check} Check adds to its bound's "
                "(callgrind)", counts[check] - counts[bound] if counts.get(check) and counts.get(bound)
                else None, "(info)", None, unit="instructions", source="benchmarks/load/instructions.py")

    if cluster:
        c, p, m, b = cluster["check"], cluster["propagation"], cluster["mint"], cluster["budget"]
        src = "benchmarks/load/cluster.py"
        add("cluster_check_over_standalone", "cluster node / standalone daemon: Check throughput (h2load, "
            "pinned, per-round median)", c["ratio"], "≥ 0.95", lambda v: v >= 0.95, source=src)
        add("cluster_revoke_p99_ms", "revoke applied by every node, then acknowledged: p99 of the revoke "
            f"call ({p['revokes']} revokes, 3 nodes; OPA's bundle polling default: 60-120 s)", p["p99"],
            "≤ 20 ms", lambda v: v <= 20, unit="ms", source=src)
        add("cluster_revoke_max_ms", "the same, max", p["max"], "≤ 100 ms", lambda v: v <= 100, unit="ms",
            source=src)
        add("cluster_allows_after_ack", "Checks allowed on any node after a revoke was acknowledged",
            p["allows_after_ack"], "0", lambda v: v == 0, unit="", source=src)
        add("cluster_mint_over_standalone", "cluster node / standalone daemon: Mint throughput", m["ratio"],
            "(info)", None, source=src)
        add("cluster_budgeted_over_unbudgeted", "cluster node: budgeted / unbudgeted Check throughput "
            "(one Redis round trip)", b["ratio"], "(info)", None, source=src)

    # benchmarks/load/http_check.py pairs its own rounds (http_figures.figures), in this same shape.
    out += (http_check or {}).get("figures", [])

    def median_ns(name: str) -> float | None:
        b = micro.get(name)
        return b["median_ns"] if b else None

    for key, title, target, ok in PAIRED_RATIOS:
        r = (paired or {}).get(key)
        add("paired_" + key, title, r["ratio"] if r else None, target, ok,
            source=f"benchmarks/paired.py: {r['rounds']} rounds, IQR {r['ratio_q1']:.2f}–{r['ratio_q3']:.2f}"
            if r else "benchmarks/paired.py (not run)")
    for key, title, num, den, target, ok in MICRO_RATIOS:
        add(key, title, _ratio(median_ns(num), median_ns(den)), target, ok, source=f"micro: {num} / {den}")
    native = median_ns("test_warm_decide[native]")
    add("micro_warm_decide_native_us", "native warm decide, median", native / 1000 if native else None,
        "≤ 2 µs", lambda v: v <= 2.0, unit="µs", source="micro: test_warm_decide[native]")
    return out
