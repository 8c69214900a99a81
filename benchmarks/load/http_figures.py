"""The HTTP Check tables' figures (issue 21's ratios and added latencies), their markdown and their chart."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any, Callable

Run = dict[str, Any]


def rps_ratio(a: Run, b: Run) -> float | None:
    return a["rps"] / b["rps"] if b["rps"] else None


def cpu_ratio(a: Run, b: Run) -> float | None:
    """b's server CPU per request over a's: their throughput ratio on equally undisturbed cores."""
    mine, theirs = a["cpu_us_per_request"]["server"], b["cpu_us_per_request"]["server"]
    return theirs / mine if mine else None


def added_p50(a: Run, b: Run) -> float:
    return float(a["p50"] - b["p50"])


def paired(table: dict[str, Any] | None, a: str, b: str,
           figure: Callable[[Run, Run], float | None]) -> float | None:
    """Median over rounds of ``figure(a's run, b's run)`` from the same round; invalid rounds left out."""
    rows = (table or {}).get("rows", {})
    if a not in rows or b not in rows:
        return None
    found = [figure(x, y) for x, y in zip(rows[a]["rounds"], rows[b]["rounds"], strict=True)
             if x["valid"] and y["valid"]]
    values = [v for v in found if v is not None and not math.isnan(v)]
    return statistics.median(values) if values else None


def _at_least(bound: float) -> Callable[[float], bool]:
    return lambda v: v >= bound


def _at_most(bound: float) -> Callable[[float], bool]:
    return lambda v: v <= bound


# key, title, table, row, over row, figure, unit, target text, predicate (None: no target)
FIGURES: list[tuple[str, str, str, str, str, Callable[[Run, Run], float | None], str, str, Any]] = [
    ("http_warm_over_cerbos", "HTTP Check warm / Cerbos CheckResources, req/s on one core", "direct",
     "http_warm", "cerbos", rps_ratio, "×", "≥ 3", _at_least(3.0)),
    ("http_warm_over_granian_floor", "HTTP Check warm / granian's constant-answer floor (stock granian, as "
     "issue 21 measured it), req/s", "direct",
     "http_warm", "granian_floor", rps_ratio, "×", "≥ 0.70", _at_least(0.70)),
    ("http_warm_over_granian_floor_batch", "HTTP Check warm / granian's floor on the daemon's scheduling "
     "(SCHED_BATCH I/O threads, which lift the floor more than the Check), req/s", "direct", "http_warm",
     "granian_floor_batch", rps_ratio, "×", "(info)", None),
    ("http_cold_over_cerbos", "HTTP Check cold (our HTTP/1.1 client) / Cerbos (h2load), req/s", "direct",
     "http_cold", "cerbos", rps_ratio, "×", "≥ 1.5", _at_least(1.5)),
    ("http_warm_over_warm_bound", "HTTP Check warm / its bound (granian bound, warm), req/s (both h2load)",
     "direct", "http_warm", "granian_bound_warm", rps_ratio, "×", "(bound)", None),
    ("bound_warm_over_granian_floor", "granian bound warm / granian floor, req/s: the most an audited "
     "Check can reach on this transport", "direct", "granian_bound_warm", "granian_floor", rps_ratio, "×",
     "(bound)", None),
    ("bound_warm_over_granian_floor_by_cpu", "the same by server CPU per request (steadier when other work "
     "shares the core)", "direct", "granian_bound_warm", "granian_floor", cpu_ratio, "×", "(bound)", None),
    ("bound_warm_over_granian_floor_batch", "granian bound warm / granian floor, both on the daemon's "
     "scheduling", "direct", "granian_bound_warm", "granian_floor_batch", rps_ratio, "×", "(info)", None),
    ("http_cold_over_cold_bound", "HTTP Check cold / its bound (granian bound, cold), req/s (both our "
     "HTTP/1.1 client)", "direct", "http_cold", "granian_bound_cold", rps_ratio, "×", "(bound)", None),
    ("bound_cold_over_cerbos", "granian bound cold (our HTTP/1.1 client) / Cerbos (h2load), req/s: a cold "
     "audited allow in stock Python", "direct", "granian_bound_cold", "cerbos", rps_ratio, "×", "(bound)",
     None),
    ("bound_cold_over_cerbos_by_cpu", "the same by server CPU per request (steadier when other work shares "
     "the core)", "direct", "granian_bound_cold", "cerbos", cpu_ratio, "×", "(bound)", None),
    ("http_warm_over_cerbos_by_cpu", "HTTP Check warm / Cerbos, by server CPU per request", "direct",
     "http_warm", "cerbos", cpu_ratio, "×", "(info)", None),
    ("http_cold_over_cerbos_by_cpu", "HTTP Check cold / Cerbos, by server CPU per request", "direct",
     "http_cold", "cerbos", cpu_ratio, "×", "(info)", None),
    ("http_warm_over_grpc_warm", "HTTP Check warm / gRPC Check warm, req/s (both h2load)", "direct",
     "http_warm", "grpc_warm", rps_ratio, "×", "(info)", None),
    ("http_cold_over_client_ceiling", "HTTP Check cold / granian floor, both on our HTTP/1.1 client (≈ 1: "
     "client-bound)", "direct", "http_cold", "granian_floor_h1", rps_ratio, "×",
     "(info)", None),
    ("grpc_warm_over_cerbos", "gRPC Check warm / Cerbos, req/s", "direct", "grpc_warm", "cerbos", rps_ratio,
     "×", "(info)", None),
    ("granian_floor_over_grpc_floor", "granian floor / grpc.aio floor, req/s", "direct", "granian_floor",
     "grpc_floor", rps_ratio, "×", "(info)", None),
    ("envoy_http_added_ms", "Envoy, 1 connection: HTTP ext_authz -> agentauthz, p50 over the proxy floor",
     "envoy_1", "http", "floor", added_p50, "ms", "≤ 0.25 ms", _at_most(0.25)),
    ("envoy_grpc_added_ms", "the same, gRPC ext_authz -> agentauthz", "envoy_1", "grpc", "floor", added_p50,
     "ms", "(info)", None),
    ("envoy_http_unix_added_ms", "the same, HTTP ext_authz over a Unix socket -> agentauthz", "envoy_1",
     "http_unix", "floor", added_p50, "ms", "(info)", None),
    ("envoy_jwt_added_ms", "the same, jwt_authn", "envoy_1", "jwt_authn", "floor", added_p50, "ms", "(info)",
     None),
    ("envoy_http_hop_added_ms", "the same, HTTP ext_authz -> granian floor (the hop alone)", "envoy_1",
     "http_floor", "floor", added_p50, "ms", "(bound)", None),
    ("envoy_http_bound_added_ms", "the same, HTTP ext_authz -> granian bound (an audited allow's hop: the "
     "allow's headers, one chained record)", "envoy_1", "http_bound", "floor", added_p50, "ms", "(bound)",
     None),
    ("envoy_grpc_hop_added_ms", "the same, gRPC ext_authz -> grpc.aio floor (the hop alone)", "envoy_1",
     "grpc_floor", "floor", added_p50, "ms", "(bound)", None),
    ("envoy_n_http_over_jwt", "Envoy, N connections: HTTP mode / jwt_authn, req/s", "envoy_n",
     "http", "jwt_authn", rps_ratio, "×", "≥ 1.0", _at_least(1.0)),
    ("envoy_n_http_unix_over_jwt", "the same, HTTP mode over a Unix socket / jwt_authn", "envoy_n",
     "http_unix", "jwt_authn", rps_ratio, "×", "(info)", None),
    ("envoy_n_http_over_grpc", "the same, HTTP mode / gRPC mode", "envoy_n", "http", "grpc", rps_ratio, "×",
     "(info)", None),
    ("envoy_n_http_floor_over_jwt", "the same, HTTP ext_authz -> granian floor / jwt_authn (the bound)",
     "envoy_n", "http_floor", "jwt_authn", rps_ratio, "×", "(bound)", None),
    ("envoy_n_http_bound_over_jwt", "the same, HTTP ext_authz -> granian bound / jwt_authn (an audited "
     "allow's bound)", "envoy_n", "http_bound", "jwt_authn", rps_ratio, "×", "(bound)", None),
    ("envoy_n_http_over_bound", "the same, HTTP mode / HTTP ext_authz -> granian bound: how much of an "
     "audited allow's bound the Check reaches", "envoy_n", "http", "http_bound", rps_ratio, "×", "(bound)",
     None),
]


# A bound figure -> the figure whose target it bounds: a bound that misses the target puts it out of reach.
BOUNDS = {"bound_warm_over_granian_floor": "http_warm_over_granian_floor",
          "bound_warm_over_granian_floor_by_cpu": "http_warm_over_granian_floor",
          "bound_cold_over_cerbos": "http_cold_over_cerbos",
          "bound_cold_over_cerbos_by_cpu": "http_cold_over_cerbos",
          "envoy_http_hop_added_ms": "envoy_http_added_ms",
          "envoy_http_bound_added_ms": "envoy_http_added_ms",
          "envoy_n_http_floor_over_jwt": "envoy_n_http_over_jwt",
          "envoy_n_http_bound_over_jwt": "envoy_n_http_over_jwt"}
# ... and the Check over that bound: the bound is the least work in stock Python, and where the Check's
# native path beats it (≥ 1) it bounds nothing and a miss says nothing about reach.
CHECK_OVER_BOUND = {"bound_warm_over_granian_floor": "http_warm_over_warm_bound",
                    "bound_warm_over_granian_floor_by_cpu": "http_warm_over_warm_bound",
                    "bound_cold_over_cerbos": "http_cold_over_cold_bound",
                    "bound_cold_over_cerbos_by_cpu": "http_cold_over_cold_bound",
                    "envoy_n_http_bound_over_jwt": "envoy_n_http_over_bound"}


def figures(tables: dict[str, Any]) -> list[dict[str, Any]]:
    """Every figure with its target and verdict, shaped like the report's ratios (``met`` None: no target)."""
    targets = {f[0]: (f[7], f[8]) for f in FIGURES}
    values = {f[0]: paired(tables.get(f[2]), f[3], f[4], f[5]) for f in FIGURES}
    out = []
    for key, title, table, row, over, _, unit, target, ok in FIGURES:
        value = values[key]
        if key in BOUNDS and value is not None:
            text, reaches = targets[BOUNDS[key]]
            beaten = values.get(CHECK_OVER_BOUND.get(key, ""))
            if reaches(value):
                title += f"; the {text} target is within reach"
            elif beaten is not None and beaten >= 1.0:
                title += (f"; misses {text}, but the Check does better than this stock-Python bound "
                          f"({beaten:.2f}×): it bounds nothing, and the {text} target is not shown out of "
                          "reach")
            else:
                title += f"; misses {text} itself, so the {text} target is out of reach by construction"
        out.append({"key": key, "title": title, "value": value, "unit": unit, "target": target,
                    "met": None if ok is None or value is None else bool(ok(value)),
                    "source": f"benchmarks/load/http_check.py: {table}, {row} / {over}, paired per round"})
    return out


def _f(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def markdown(results: dict[str, Any]) -> str:
    """The figures with their targets, then each table's rows."""
    verdict = {True: "met", False: "MISSED", None: ""}
    out = ["| figure | value | target | verdict |", "|---|---:|---|---|"]
    out += [f"| {f['title']} | {_f(f['value'])}{'' if f['unit'] == '×' else ' ' + f['unit']} | "
            f"{f['target']} | {verdict[f['met']]} |" for f in results["figures"]]
    if not results.get("http_transport"):
        out += ["", "_This build has no HTTP Check (`http_check_listen`): its rows are not measured._"]
    for table in results.get("tables", {}).values():
        rows = table["rows"].values()
        roles = list(dict.fromkeys(r for row in rows for r in row["summary"]["cpu_us_per_request"]))
        out += ["", f"**{table['title']}** ({table['generator']}{', pinned' if table['pinned'] else ''})", "",
                "| row | req/s (median) | p50 ms | p99 ms | " + " | ".join(f"CPU µs/req ({r})" for r in roles)
                + " | valid rounds |", "|---|---:|---:|---:|" + "---:|" * len(roles) + "---|"]
        for row in table["rows"].values():
            s = row["summary"]
            out.append(f"| {row['label']} | {_f(s['rps'], '.0f')} | {_f(s['p50'], '.3f')} | "
                       f"{_f(s['p99'], '.3f')} | "
                       + " | ".join(_f(s["cpu_us_per_request"].get(r), '.0f') for r in roles)
                       + f" | {s['valid_rounds']}/{s['rounds']} |")
        out += thread_table(table)
    return "\n".join(out) + "\n"


def thread_table(table: dict[str, Any]) -> list[str]:
    """Each row's server CPU µs/req by thread (rsgi_servers.per_thread; median of valid rounds), for the
    rows that measured it."""
    measured = {}
    for row in table["rows"].values():
        runs = [r["threads_us_per_request"] for r in row["rounds"]
                if r["valid"] and "threads_us_per_request" in r]
        if runs:
            measured[row["label"]] = runs
    if not measured:
        return []
    roles = list(dict.fromkeys(role for runs in measured.values() for role in runs[0]))
    out = ["", f"**Where the server's CPU goes, by thread** ({table['title']}; CPU µs/req, median of rounds)",
           "", "| row | " + " | ".join(roles) + " |", "|---|" + "---:|" * len(roles)]
    for label, runs in measured.items():
        cells = [_f(statistics.median(r.get(role, math.nan) for r in runs), ".0f") for role in roles]
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return out


SHORT = {"granian_floor": "granian floor (stock)", "granian_floor_batch": "granian floor (SCHED_BATCH)",
         "granian_floor_h1": "granian floor (h1 client)",
         "http_warm": "HTTP Check warm", "http_warm_h1": "HTTP Check warm (h1 client)",
         "http_cold": "HTTP Check cold (h1 client)", "granian_bound_warm": "granian bound warm",
         "granian_bound_cold": "granian bound cold (h1 client)", "grpc_floor": "grpc.aio floor",
         "grpc_warm": "gRPC Check warm", "cerbos": "Cerbos CheckResources", "floor": "no authorization",
         "jwt_authn": "jwt_authn", "grpc": "gRPC ext_authz -> agentauthz",
         "http": "HTTP ext_authz -> agentauthz", "http_unix": "HTTP ext_authz (Unix socket) -> agentauthz",
         "grpc_floor_envoy": "gRPC ext_authz -> grpc.aio floor",
         "http_floor": "HTTP ext_authz -> granian floor",
         "http_bound": "HTTP ext_authz -> granian bound"}


def _short(key: str, table: str) -> str:
    return SHORT.get(f"{key}_envoy" if table != "direct" and f"{key}_envoy" in SHORT else key, key)


def chart(results: dict[str, Any], path: Path) -> None:
    """One PNG: one-core req/s per server, Envoy's added p50 per mode at 1 connection, req/s at N."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tables = results["tables"]
    fig, axes = plt.subplots(4, 1, figsize=(9, 14))
    rows = tables["direct"]["rows"]
    names = [_short(k, "direct") for k in rows]
    values = [r["summary"]["rps"] for r in rows.values()]
    colors = ["#cc6677" if n.startswith("http_") else "#228833" if n.startswith("granian_bound")
              else "#4477aa" for n in rows]
    axes[0].barh(names, values, color=colors)
    if "cerbos" in rows:
        for times, style in ((3, "--"), (1.5, ":")):
            axes[0].axvline(times * rows["cerbos"]["summary"]["rps"], color="k", linestyle=style,
                            label=f"{times:g} × Cerbos")
    if "granian_floor" in rows:
        axes[0].axvline(0.7 * rows["granian_floor"]["summary"]["rps"], color="#228833", linestyle="-.",
                        label="0.70 × granian floor")
    axes[0].legend(fontsize=7)
    axes[0].set_title("Direct, server on one core: requests/s (median of rounds; red: the HTTP Check, green: "
                      "its bounds)", fontsize=9)
    _bounds_panel(axes[3], results["figures"])
    modes = [m for m in tables["envoy_1"]["rows"] if m != "floor"]
    added = [paired(tables["envoy_1"], m, "floor", added_p50) or 0.0 for m in modes]
    axes[1].barh([_short(m, "envoy_1") for m in modes], added,
                 color=["#cc6677" if m.startswith("http") else "#4477aa" for m in modes])
    axes[1].axvline(0.25, color="k", linestyle="--", label="HTTP mode target 0.25 ms")
    axes[1].legend(fontsize=7)
    axes[1].set_title("Through Envoy, 1 connection: p50 added over the proxy floor, ms", fontsize=9)
    n = tables["envoy_n"]
    axes[2].barh([_short(m, "envoy_n") for m in n["rows"]], [r["summary"]["rps"] for r in n["rows"].values()],
                 color=["#cc6677" if m.startswith("http") else "#4477aa" for m in n["rows"]])
    axes[2].set_title(f"{n['title']}: requests/s", fontsize=9)
    for ax in axes[1:3]:
        ax.set_xlabel("red: HTTP mode", fontsize=7)
    for ax in axes:
        ax.invert_yaxis()
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# The chart's last panel: each targeted ratio beside its bound's, and how much of its bound the Check reaches.
BOUND_BARS = (("http_warm_over_granian_floor", "HTTP Check warm / granian floor", 0.70),
              ("bound_warm_over_granian_floor", "bound warm / granian floor (bound)", 0.70),
              ("http_warm_over_warm_bound", "HTTP Check warm / bound warm", None),
              ("http_cold_over_cerbos", "HTTP Check cold / Cerbos", 1.5),
              ("bound_cold_over_cerbos", "bound cold / Cerbos (bound)", 1.5),
              ("http_cold_over_cold_bound", "HTTP Check cold / bound cold", None),
              ("envoy_n_http_over_jwt", "Envoy, N connections: HTTP mode / jwt_authn", 1.0),
              ("envoy_n_http_bound_over_jwt", "Envoy, N connections: bound / jwt_authn (bound)", 1.0),
              ("envoy_n_http_over_bound", "Envoy, N connections: HTTP mode / bound", None))


def _bounds_panel(ax: Any, found: list[dict[str, Any]]) -> None:
    values = {f["key"]: f["value"] or 0.0 for f in found}
    ax.barh([label for _, label, _ in BOUND_BARS], [values.get(key, 0.0) for key, _, _ in BOUND_BARS],
            color=["#228833" if label.endswith("(bound)") else "#cc6677" for _, label, _ in BOUND_BARS])
    for y, (_, _, target) in enumerate(BOUND_BARS):
        if target is not None:  # the target, as a tick across its own bar
            ax.plot([target, target], [y - 0.45, y + 0.45], color="k", linestyle="--")
    ax.set_title("Targets beside their bounds (dashed: the target; green: the bound's own ratio)", fontsize=9)
    ax.set_xlabel("ratio (red: the HTTP Check)", fontsize=7)
