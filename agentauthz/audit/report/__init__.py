"""``agentauthz audit report``: what each agent did and tried, for a security reviewer, from the audit logs.

``summary`` folds the records of the primary's log and every worker's into per-agent, per-task
findings and flags; ``charts`` draws calls over time (matplotlib, the ``report`` extra); ``page``
renders one self-contained HTML file. The integrity line is ``audit verify``'s own verdict.
"""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..verify import main_verify
from . import charts, page
from .summary import summarize

CHART_AGENTS = 40  # agents drawn a chart of their own (flagged first): the page stays readable
_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, now: float | None = None) -> float:
    """Seconds since the epoch from an epoch number, an ISO 8601 time (UTC unless it says), or an age
    ago such as 90m, 24h or 7d; ValueError otherwise."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    ago = _AGO.fullmatch(text)
    if ago:
        return (time.time() if now is None else now) - float(ago.group(1)) * _UNIT[ago.group(2)]
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        raise ValueError(f"{text!r} is not a time: give epoch seconds, ISO 8601 (2026-01-31T12:00:00Z) "
                         "or an age such as 90m, 24h, 7d") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)).timestamp()


def build(directory: Path, since: float | None = None, until: float | None = None, key: str | None = None,
          state_dir: Path | None = None) -> dict[str, Any]:
    """The report's data: window, integrity (``audit verify`` of every log) and the summary."""
    _, verified = main_verify(Path(directory), key=key, state_dir=state_dir)
    return {"directory": str(directory), "window": {"since": since, "until": until},
            "integrity": {"ok": verified["ok"], "message": verified["message"]},
            "summary": summarize(Path(directory), since, until)}


def draw(report: dict[str, Any]) -> dict[str, str]:
    """Charts by agent ("" for all agents together), as data URIs."""
    s = report["summary"]
    if not s["checks"]:
        return {}
    every = sorted(e for a in s["agents"] for e in a["events"])
    # The window asked for, else the span of the calls (not of the daemon's start and stop records).
    start = report["window"]["since"] or every[0][0]
    end = report["window"]["until"] or every[-1][0]
    palette: dict[str, Any] = {}
    drawn = {"": charts.timeline(every, start, end, "all agents: calls allowed and denied by reason",
                                 palette, (11, 3.2))}
    for a in s["agents"][:CHART_AGENTS]:
        if a["events"]:
            drawn[a["agent"]] = charts.timeline(a["events"], start, end, "calls over time", palette)
    return drawn


def without_events(report: dict[str, Any]) -> dict[str, Any]:
    """The report as --json prints it: the timelines' raw points left out (the counts stay)."""
    agents = [{k: v for k, v in a.items() if k != "events"} for a in report["summary"]["agents"]]
    return {**report, "summary": {**report["summary"], "agents": agents}}


def write_html(report: dict[str, Any], path: Path) -> None:
    charts.require()
    Path(path).write_text(page.render(report, draw(report)), encoding="utf-8")
