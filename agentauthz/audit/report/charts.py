"""The report's charts: calls allowed and denied by reason over time, drawn by matplotlib as PNG.

Each chart is a ``data:image/png;base64`` URI, so the page stays one self-contained file. matplotlib
is the optional extra ``agentauthz[report]``: without it the report cannot be drawn, and says so.
"""

from __future__ import annotations

import base64
import io
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Sequence

from ...errors import AgentAuthzError

MISSING = "the audit report draws its charts with matplotlib: pip install agentauthz[report]"
BINS = 24
ALLOW_COLOUR = "#4c9a2a"
# Denial reasons get the tab20 colours in order of first appearance, the same in every chart.
MAX_REASONS = 9  # the rest are drawn together as "other denials"


class ReportUnavailable(AgentAuthzError):
    """A dependency of the report is missing."""

    reason = "report_unavailable"


def _matplotlib() -> tuple[Any, Any]:
    """pyplot and matplotlib.dates. matplotlib is an optional dependency (the ``report`` extra in
    pyproject.toml, not a runtime one): imported here, guarded, its absence ReportUnavailable."""
    try:  # optional import, guarded: matplotlib is the ``report`` extra, not in the runtime dependencies
        import matplotlib  # optional (report extra), guarded by this try/except ImportError
        matplotlib.use("Agg")  # no display: files only
        import matplotlib.dates as mdates  # optional, guarded: see above
        import matplotlib.pyplot as plt  # optional, guarded: see above
    except ImportError:
        raise ReportUnavailable(MISSING) from None
    return plt, mdates


def reasons_of(events: Sequence[tuple[float, str]]) -> list[str]:
    """The denial reasons a chart names, most frequent first; the rest fold into "other denials"."""
    counts = Counter(r for _, r in events if r != "allow")
    named = [r for r, _ in counts.most_common(MAX_REASONS)]
    return named + (["other denials"] if len(counts) > MAX_REASONS else [])


def timeline(events: Sequence[tuple[float, str]], start: float, end: float, title: str,
             palette: dict[str, Any], size: tuple[float, float] = (9, 2.6)) -> str:
    """A stacked bar chart of ``events`` ((ts, "allow" or a denial reason)) in BINS bins over
    [start, end], as a data URI. ``palette`` maps reasons to colours, filled as reasons appear."""
    plt, mdates = _matplotlib()
    width = max(end - start, 1e-3) / BINS
    named = reasons_of(events)
    series = {"allow": [0] * BINS, **{r: [0] * BINS for r in named}}
    for ts, reason in events:
        at = min(BINS - 1, max(0, int((ts - start) / width)))
        key = reason if reason in series else "other denials"
        series.setdefault(key, [0] * BINS)[at] += 1
    cmap = plt.get_cmap("tab20")
    for reason in series:
        if reason != "allow" and reason not in palette:
            palette[reason] = cmap((len(palette) * 2 + 6) % 20)  # skip tab20's greens (allow's)
    xs = [datetime.fromtimestamp(start + (i + 0.5) * width, tz=timezone.utc) for i in range(BINS)]
    fig, ax = plt.subplots(figsize=size, dpi=96)
    bottom = [0] * BINS
    for reason, counts in series.items():
        if not any(counts):
            continue
        colour = ALLOW_COLOUR if reason == "allow" else palette[reason]
        label = "allowed" if reason == "allow" else f"denied: {reason}"
        ax.bar(xs, counts, width=width / 86400 * 0.9, bottom=bottom, color=colour, label=label)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel("calls")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.tick_params(labelsize=8)
    locator = mdates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    ax.set_xlabel("UTC", fontsize=8)
    if any(bottom):
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()


def require() -> None:
    """Raise ReportUnavailable now, before any work, when matplotlib is missing."""
    _matplotlib()
