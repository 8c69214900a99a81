"""Turn the benchmark outputs into ``benchmarks/results/``: results.json, report.md, PNG charts.

    python benchmarks/report.py [--results benchmarks/results]

Reads ``load.json`` (``python -m benchmarks.load``) and ``micro.json``
(``pytest benchmarks --benchmark-only --benchmark-json ...``), either may be
missing. Every ratio the performance issue asks for is computed here from
figures of the same run, put next to its target, and printed as a summary.
Nothing here asserts: a missed target is reported, not hidden or failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"

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


# --- inputs ---------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True, timeout=10).stdout)
    except (OSError, ValueError):
        nproc = os.cpu_count() or 0
    mem = next((int(line.split()[1]) // 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")), 0)
    return {"nproc": nproc, "cpu_model": model, "memory_mib": mem, "kernel": platform.release(),
            "loadavg_at_report": os.getloadavg(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def micro_medians(micro: dict[str, Any]) -> dict[str, dict[str, float]]:
    """name -> median/min/mean in ns and rounds, from pytest-benchmark's JSON."""
    out = {}
    for b in micro.get("benchmarks", []):
        st = b["stats"]
        out[b["name"]] = {"median_ns": st["median"] * 1e9, "min_ns": st["min"] * 1e9,
                          "mean_ns": st["mean"] * 1e9, "rounds": st["rounds"], "group": b.get("group")}
    return out


# --- ratios ---------------------------------------------------------------------------------

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
           instructions: dict[str, Any] | None = None) -> list[dict[str, Any]]:
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


# --- rendering ------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "MISSED", None: ""}[met]


def ratio_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| figure | value | target | verdict |", "|---|---:|---|---|"]
    for r in rows:
        unit = r["unit"]
        value = "n/a" if r["value"] is None else f"{_f(r['value'])}{'' if unit in ('×', '') else ' '}{unit}"
        lines.append(f"| {r['title']} | {value} | {r['target']} | {_verdict(r['met'])} |")
    return lines


def load_table(table: dict[str, Any]) -> list[str]:
    roles = sorted({role for row in table["rows"].values() for role in row["summary"]["cpu_us_per_request"]},
                   key=lambda r: ("server", "daemon", "envoy", "upstream").index(r)
                   if r in ("server", "daemon", "envoy", "upstream") else 9)
    head = ["target", "req/s (median)", "min–max", "p50 ms", "p90 ms", "p99 ms",
            *[f"CPU µs/req ({r})" for r in roles], "steal", "valid rounds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table["rows"].values():
        s = row["summary"]
        cells = [row["label"], _f(s["rps"], 0), f"{_f(s['rps_min'], 0)}–{_f(s['rps_max'], 0)}",
                 _f(s["p50"], 3), _f(s["p90"], 3), _f(s["p99"], 3),
                 *[_f(s["cpu_us_per_request"].get(r), 0) for r in roles],
                 "n/a" if math.isnan(s.get("steal", math.nan)) else f"{100 * s['steal']:.0f}%",
                 f"{s['valid_rounds']}/{s['rounds']}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


HANDLER_LABELS = {
    "parse": "parse_check_request, the deserializer of every handler but the floor",
    "floor": "the constant OK",
    "bound": "the bound's handler: read the bearer, one chained record in Python (hashlib, write(2))",
    "record": "read the bearer, one chained record as the audit log writes an allow's (native)",
    "decide": "read the bearer, decide on the cached token (native)",
    "check": "the whole warm Check",
}


def handlers_section(results: dict[str, Any]) -> list[str]:
    handlers = results.get("handlers") or {}
    if not handlers.get("rounds"):
        return ["_Not measured: run `python -m benchmarks.load.handlers --out "
                "benchmarks/results/handlers.json`._"]
    names = list(handlers["median_us"])
    out = ["One process serves the real Check (on a real Authority), the comparison handlers and the "
           "Check's own steps on one gRPC server configured like the daemon's; one h2load run spreads its "
           "calls over all of them round robin, so each runs under the same load at the same moments. "
           "Thread CPU per call, summed around each handler's body (the framework is outside it); a Check "
           "that waited for the audit writer is counted apart. Steadier than requests/s between separate "
           "servers.", "",
           "| handler | what it does | µs per call (median) | per round |", "|---|---|---:|---|"]
    out += [f"| {n} | {HANDLER_LABELS.get(n, '')} | {_f(handlers['median_us'][n], 1)} | "
            f"{', '.join(_f(r[n], 1) for r in handlers['rounds'])} |" for n in names]
    waited = handlers.get("check_waited", [])
    if waited:
        out += ["", "Check calls that waited for the audit writer (not timed), per round: "
                + ", ".join(f"{w:.1%}" for w in waited)]
    return out


def instructions_section(results: dict[str, Any]) -> list[str]:
    counts = (results.get("instructions") or {}).get("instructions_per_check", {})
    if not counts:
        return ["_Not measured: run `python -m benchmarks.load.instructions --out "
                "benchmarks/results/instructions.json` (valgrind)._"]
    i = results["instructions"]
    out = [f"Each server under `valgrind --tool=callgrind` ({i['valgrind']}), {i['requests']:,} Checks from "
           "our Python client (64 in flight) after a warm-up, every one allowed; user-space instructions of "
           "every thread, per Check. Work, not time: the kernel's share and cache misses are not in it, "
           "and it does not drift with the machine. Cold: every Check a token the daemon has not seen.", "",
           "| server | instructions per Check | floor / server |", "|---|---:|---:|"]
    out += [f"| {name} | {count:,.0f} | {_f(counts['floor'] / count)} |" for name, count in counts.items()]
    return out


def profile_section(prof: dict[str, Any]) -> list[str]:
    if not prof or "skipped" in prof:
        return [f"_Skipped: {prof.get('skipped', 'no profile') if prof else 'no profile'}._"]
    lines = []
    for key, title in (
            ("warm_gil", "Warm daemon under h2load, samples holding the GIL (`--gil --native`)"),
            ("cold", "Cold daemon under the Python client, main thread, busy samples (`--native`)")):
        p = prof.get(key)
        if not p:
            continue
        s = p["summary"]
        lines += [f"**{title}** — {s['samples']} samples, file `{p['file']}`", ""]
        if s.get("gil_holder_pct"):
            lines.append("GIL held by: " + ", ".join(f"{k} {v}%" for k, v in s["gil_holder_pct"].items()))
            lines.append("")
        lines += ["| where (main thread) | share |", "|---|---:|"]
        lines += [f"| {k} | {v}% |" for k, v in s["buckets_pct"].items()]
        lines += ["", "Top leaf frames: " + "; ".join(f"`{k}` {v}%" for k, v in s["top_leaf_pct"][:8]), "",
                  "agentauthz frames (inclusive): "
                  + "; ".join(f"`{k}` {v}%" for k, v in s["agentauthz_frames_pct"][:8]), ""]
    if prof.get("warm_svg"):
        lines.append(f"Flame graph of the warm daemon (all threads): `{prof['warm_svg']}`.")
    lines.append("")
    lines += ["Commands:", "", *[f"    {c}" for c in prof.get("commands", [])]]
    return lines


def _steal_text(load: dict[str, Any]) -> str:
    steals = [r["steal"] for t in load.get("tables", {}).values() for row in t["rows"].values()
              for r in row["rounds"] if "steal" in r]
    return f"{100 * statistics.median(steals):.0f}% (max {100 * max(steals):.0f}%)" if steals else "n/a"


def render(results: dict[str, Any]) -> str:
    load, micro, m, v = results["load"], results["micro"], results["machine"], results.get("versions", {})
    out = ["# agentauthz benchmark report", "",
           f"{m['date']} · {m['nproc']} × {m['cpu_model']} · {m['memory_mib']:,} MiB · Linux {m['kernel']}",
           "", "Every ratio below compares figures measured in this same run. Load runs are interleaved "
           "(A B C D, then D C B A, …); each table figure is the median over rounds, and each ratio (or "
           "added latency) the median of per-round ratios, each from two runs seconds apart. The machine "
           "is shared and noisy: read ratios and CPU per request rather than absolute requests/s. "
           "*Steal* is the share of the CPUs' time (the server's CPU in pinned tables) the hypervisor "
           "gave other guests during a run: where it is high, requests/s say more about the host than "
           "about the code, and the ratios by server CPU per request are the steadier figure.", "",
           "## Targets and ratios", "", *ratio_table(results["ratios"]), ""]
    out += ["## Machine and versions", "", "| | |", "|---|---|"]
    facts = [("nproc", m["nproc"]), ("CPU", m["cpu_model"]),
             ("load average at report", m["loadavg_at_report"]), *v.items()]
    out += [f"| {k} | {val} |" for k, val in facts]
    s, cpus = load.get("settings", {}), load.get("cpus", {})
    if s:
        out += ["", f"Load settings: {s.get('rounds')} rounds × {s.get('duration')} s per target, "
                f"{s.get('warmup')} s warm-up per target per table; pinned tables put servers on CPU "
                f"{cpus.get('server')} and load generators on CPU {cpus.get('client')}. "
                f"Load phase took {load.get('elapsed_s', 0):.0f} s. Median steal over its runs: "
                f"{_steal_text(load)}."]
    for table in load.get("tables", {}).values():
        out += ["", f"## {table['title']}", "",
                f"Generator: **{table['generator']}**{' · pinned' if table['pinned'] else ''} · "
                + ", ".join(f"{k} {val}" for k, val in table["settings"].items()), ""]
        if table.get("note"):
            out += [table["note"], ""]
        out += load_table(table)
        notes = [n for row in table["rows"].values() for n in row.get("notes", [])]
        out += [""] + [f"- {n}" for n in notes] if notes else []
        bad = [(name, r["problems"]) for name, row in table["rows"].items() for r in row["rounds"]
               if not r["valid"]]
        if bad:
            out += ["", "**Invalid runs (excluded from medians):** "
                    + "; ".join(f"{n}: {', '.join(p)}" for n, p in bad)]
    out += ["", "## Worker scaling", ""]
    workers = load.get("workers", {})
    if not workers or "skipped" in workers:
        out += ["> **SKIPPED** — `agentauthz serve --workers N` is not available in this build; no numbers "
                "are given rather than invented ones."]
    else:
        out += ["Throughput is in the *Worker scaling* table above. Revocation reaching every worker "
                "(`--workers 2`, probes on 16 connections spread by SO_REUSEPORT):", "",
                "| revoke by | Revoke call ms | every worker denying, ms after ack | workers seen | "
                "stale allows after ack |", "|---|---:|---:|---:|---:|"]
        out += [f"| {p['kind']} | {_f(p['revoke_call_ms'])} | {_f(p['all_denied_after_ms'])} | "
                f"{p['workers_seen']}/{p['workers_configured']} | {p['stale_allows']} |"
                for p in workers.get("propagation", [])]
        out += ["", "The 'every worker denying' time is bounded below by the probe sweep itself "
                "(sequential Checks over 16 connections); the first sweep after the ack already denies."]
    out += ["", "## Each handler's own CPU, under one shared load", "", *handlers_section(results)]
    out += ["", "## Instructions per Check (callgrind)", "", *instructions_section(results)]
    out += ["", "## Where the time goes (py-spy)", "", *profile_section(load.get("profile", {}))]
    out += ["", "## Micro benchmarks (pytest-benchmark, medians)", ""]
    if micro:
        out += ["| benchmark | group | median | min | rounds |", "|---|---|---:|---:|---:|"]
        out += [f"| {name} | {b['group'] or ''} | {_ns(b['median_ns'])} | {_ns(b['min_ns'])} | "
                f"{b['rounds']} |" for name, b in micro.items()]
    else:
        out.append("_No micro.json: run `pytest benchmarks --benchmark-only --benchmark-json ...`._")
    out += ["", "## Charts", "", "![throughput](throughput.png)", "", "![latency](latency.png)", "",
            "## Commands", "", "    " + "\n    ".join(results.get("commands", []))]
    if load.get("processes"):
        out += ["", "Processes under test:", ""]
        out += [f"    {name}: {' '.join(argv)}" for name, argv in load["processes"].items()]
    return "\n".join(out) + "\n"


def _ns(ns: float) -> str:
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.2f} µs"
    return f"{ns:.0f} ns"


def charts(load: dict[str, Any], out_dir: Path) -> list[str]:
    """throughput.png (bars per table), latency.png (p50/p90/p99 per target); none without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    tables = load.get("tables", {})
    written = []
    shown = [k for k in ("direct_h2load", "direct_h2load_pinned", "direct_python", "envoy_n", "workers",
                         "transport") if k in tables]
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.4 * len(shown)), squeeze=False)
        for ax, key in zip(axes[:, 0], shown, strict=True):
            rows = tables[key]["rows"]
            names = [r["label"] for r in rows.values()]
            values = [r["summary"]["rps"] for r in rows.values()]
            errs = [[v - r["summary"]["rps_min"] for v, r in zip(values, rows.values(), strict=True)],
                    [r["summary"]["rps_max"] - v for v, r in zip(values, rows.values(), strict=True)]]
            ax.barh(names, values, xerr=errs, color="#4c72b0", capsize=3)
            ax.invert_yaxis()
            ax.set_title(f"{tables[key]['title']} [{tables[key]['generator']}]", fontsize=9)
            ax.set_xlabel("requests/s (median, min–max over rounds)", fontsize=8)
            ax.tick_params(labelsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "throughput.png", dpi=110)
        plt.close(fig)
        written.append("throughput.png")
    shown = [k for k in ("direct_h2load_1", "envoy_1", "direct_h2load") if k in tables]
    if shown:
        fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.8 * len(shown)), squeeze=False)
        for ax, key in zip(axes[:, 0], shown, strict=True):
            rows = list(tables[key]["rows"].values())
            width = 0.27
            for i, p in enumerate(("p50", "p90", "p99")):
                ax.barh([j + i * width for j in range(len(rows))], [r["summary"][p] for r in rows],
                        height=width, label=p)
            ax.set_yticks([j + width for j in range(len(rows))], [r["label"] for r in rows])
            ax.invert_yaxis()
            ax.set_title(f"{tables[key]['title']} [{tables[key]['generator']}]", fontsize=9)
            ax.set_xlabel("latency, ms (median over rounds)", fontsize=8)
            ax.tick_params(labelsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out_dir / "latency.png", dpi=110)
        plt.close(fig)
        written.append("latency.png")
    return written


def summary_lines(results: dict[str, Any]) -> list[str]:
    """The printed summary: headline rows of the main tables, then every ratio."""
    lines = []
    for key in ("direct_h2load", "direct_h2load_pinned", "direct_h2load_1", "direct_python", "envoy_1",
                "envoy_n", "transport", "mint", "workers"):
        table = results["load"].get("tables", {}).get(key)
        if not table:
            continue
        lines.append(f"{table['title']} [{table['generator']}{', pinned' if table['pinned'] else ''}]")
        for row in table["rows"].values():
            s = row["summary"]
            cpu = " ".join(f"{k} {_f(val, 0)}" for k, val in s["cpu_us_per_request"].items())
            lines.append(f"  {row['label']:<46} {s['rps']:>8.0f} req/s  p50 {s['p50']:7.3f}  "
                         f"p90 {s['p90']:7.3f}  p99 {s['p99']:7.3f} ms  CPU µs/req {cpu}")
    lines.append("")
    width = max((len(r["title"]) for r in results["ratios"]), default=0)
    for r in results["ratios"]:
        value = "n/a" if r["value"] is None else f"{_f(r['value'])} {r['unit']}".rstrip()
        lines.append(f"  {r['title']:<{width}}  {value:>12}  target {r['target']:<8} {_verdict(r['met'])}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    out_dir: Path = args.results
    out_dir.mkdir(parents=True, exist_ok=True)
    load = json.loads((out_dir / "load.json").read_text()) if (out_dir / "load.json").exists() else {}
    micro_raw = json.loads((out_dir / "micro.json").read_text()) if (out_dir / "micro.json").exists() else {}
    micro = micro_medians(micro_raw)
    paired_path = out_dir / "paired.json"
    paired = json.loads(paired_path.read_text()) if paired_path.exists() else {}
    handlers_path = out_dir / "handlers.json"
    handlers = json.loads(handlers_path.read_text()) if handlers_path.exists() else {}
    instructions_path = out_dir / "instructions.json"
    instructions = json.loads(instructions_path.read_text()) if instructions_path.exists() else {}
    commands = ["make bench",
                "pytest benchmarks -q --benchmark-only --benchmark-json benchmarks/results/micro.json",
                "python -m benchmarks.paired --out benchmarks/results/paired.json",
                "python -m benchmarks.load --out benchmarks/results/load.json",
                "python -m benchmarks.load.handlers --out benchmarks/results/handlers.json",
                "python -m benchmarks.load.instructions --out benchmarks/results/instructions.json",
                "python benchmarks/report.py"]
    for table in load.get("tables", {}).values():
        for row in table["rows"].values():
            if row["rounds"]:
                commands.append(row["rounds"][0]["command"])
    results = {"machine": machine(), "versions": load.get("versions", {}),
               "ratios": ratios(load, micro, paired, handlers, instructions), "paired": paired,
               "handlers": handlers, "instructions": instructions,
               "micro": micro, "load": load, "commands": commands,
               "micro_machine_info": micro_raw.get("machine_info", {})}
    results["charts"] = charts(load, out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "report.md").write_text(render(results))
    print("\n".join(summary_lines(results)))
    print(f"\nreport: {out_dir / 'report.md'}  data: {out_dir / 'results.json'}  charts: {results['charts']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
