"""The report's text: report.md's tables and sections, and the summary printed at the end."""

from __future__ import annotations

import math
import statistics
from typing import Any


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
    if results.get("cluster"):
        out += ["", "## Cluster mode (three nodes on one Redis)", "", *cluster_section(results)]
    if results.get("http_check"):
        out += ["", "## HTTP Check (granian) beside its floor, its bound, the gRPC Check and Cerbos", "",
                *http_check_section(results)]
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


def cluster_section(results: dict[str, Any]) -> list[str]:
    """benchmarks/load/cluster.py's figures: its own table, and the revoke round-trip histogram."""
    from benchmarks.load.cluster import markdown as cluster_table
    return [*cluster_table(results["cluster"]).splitlines(), "",
            "![revocation propagation](cluster-propagation.png)"]


def http_check_section(results: dict[str, Any]) -> list[str]:
    """benchmarks/load/http_check.py's figures and tables, and its chart."""
    from benchmarks.load.http_figures import markdown as http_check_tables
    bound = ("The granian bound rows (benchmarks/load/rsgi_bound.py) serve, on this transport, the work "
             "the gRPC bound does (servers.py `bound_handler`): every header read, the bearer taken, "
             "(cold: one bare PyNaCl verify and a claims read), one hash-chained record appended with "
             "write(2), the allow's headers with a decision id of its own, in plain Python: nothing is "
             "decided, so a Check passes it only by doing that work natively (the cold Check's parse is). "
             "A bound under its target puts the target out of reach, unless the Check already passes the "
             "bound; on a shared machine its by-CPU twin is the steadier reading. The daemon runs "
             "granian's I/O threads SCHED_BATCH (serve/http_check.py), and so do the bounds and one floor;"
             " the targeted floor is stock granian, as issue 21 measured it.")
    return [bound, "", *http_check_tables(results["http_check"]).splitlines(), "",
            "![HTTP Check](http-check.png)"]


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
