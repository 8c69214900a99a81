"""Turn the benchmark outputs into ``benchmarks/results/``: results.json, report.md, PNG charts.

    python -m benchmarks.report [--results benchmarks/results]

Reads ``load.json`` (``python -m benchmarks.load``) and ``micro.json``
(``pytest benchmarks --benchmark-only --benchmark-json ...``), either may be
missing. Every ratio the performance issue asks for is computed here from
figures of the same run, put next to its target, and printed as a summary.
Nothing here asserts: a missed target is reported, not hidden or failed. The inputs are read
here; ``ratios``, ``markdown`` and ``charts`` make the rest.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from benchmarks.report.charts import charts
from benchmarks.report.markdown import render, summary_lines
from benchmarks.report.ratios import ratios

RESULTS = Path(__file__).resolve().parents[1] / "results"


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
    cluster_path = out_dir / "cluster.json"
    cluster = json.loads(cluster_path.read_text()) if cluster_path.exists() else {}
    http_check_path = out_dir / "http_check.json"
    http_check = json.loads(http_check_path.read_text()) if http_check_path.exists() else {}
    if http_check.get("tables"):  # paired again from the rounds: the wording follows http_figures.py
        from benchmarks.load.http_figures import figures
        http_check["figures"] = figures(http_check["tables"])
    commands = ["make bench",
                "pytest benchmarks -q --benchmark-only --benchmark-json benchmarks/results/micro.json",
                "python -m benchmarks.paired --out benchmarks/results/paired.json",
                "python -m benchmarks.load --out benchmarks/results/load.json",
                "python -m benchmarks.load.handlers --out benchmarks/results/handlers.json",
                "python -m benchmarks.load.instructions --out benchmarks/results/instructions.json",
                "python -m benchmarks.load.cluster --out benchmarks/results",
                "python -m benchmarks.load.http_check --out benchmarks/results",
                "python -m benchmarks.report"]
    for table in load.get("tables", {}).values():
        for row in table["rows"].values():
            if row["rounds"]:
                commands.append(row["rounds"][0]["command"])
    results = {"machine": machine(), "versions": load.get("versions", {}),
               "ratios": ratios(load, micro, paired, handlers, instructions, cluster, http_check),
               "paired": paired, "http_check": {k: v for k, v in http_check.items() if k != "configs"},
               "cluster": {k: v for k, v in cluster.items() if k not in ("tables", "propagation_detail")},
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
