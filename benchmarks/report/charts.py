"""The report's PNG charts: throughput per table and latency per target (matplotlib, when installed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


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
