"""The report as one self-contained HTML page: inline style, charts as data URIs, no script.

Every string from the log passes ``_e`` (agents name their tasks, intents, tools and targets). The
page's Content-Security-Policy allows no script and no fetch at all, should an escape ever be missed.
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from typing import Any, Iterable

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;border-bottom:1px solid #ccc;padding-top:12px}h3{font-size:15px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}.ok{color:#1a7f37;font-weight:600}.bad{color:#b42318;font-weight:600}
.flag{background:#fff1f0}.num{text-align:right}.muted{color:#777}code{font-size:12px;word-break:break-all}
.task{margin-left:16px;border-left:3px solid #eee;padding-left:12px}img{max-width:100%;display:block}"""


def _e(value: Any) -> str:
    """Escaped text of anything from the log; JSON for what is not text (an argument's value)."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
    return html.escape(text, quote=True)


def when(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return ""
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def table(headers: Iterable[str], rows: Iterable[Iterable[Any]], css: str = "") -> str:
    """A table of escaped cells; a cell given as ("raw", html) is markup this module made."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(
        f"<td>{c[1]}</td>" if isinstance(c, tuple) and c[0] == "raw" else f"<td>{_e(c)}</td>" for c in row)
        + "</tr>" for row in rows)
    return f'<table class="{css}"><tr>{head}</tr>{body}</table>' if body else '<p class="muted">none</p>'


def grant_text(g: dict[str, Any]) -> str:
    ops = g.get("ops") or g.get("operations") or []
    return f"{g.get('tool', '')}:{g.get('target', '')}:{','.join(map(str, ops))}:{g.get('sensitivity', '')}"


def covered(grants: list[dict[str, Any]], tool: str, target: str, operation: str) -> bool:
    """Whether a grant names this tool, target and operation (sensitivity aside): touched vs granted."""
    for g in grants:
        pattern, ops = str(g.get("target", "")), g.get("ops") or []
        matches = pattern in ("*", target) or (pattern.endswith("*") and target.startswith(pattern[:-1]))
        if g.get("tool") == tool and matches and (operation in ops or "*" in ops):
            return True
    return False


YES, NO = ("raw", '<span class="ok">yes</span>'), ("raw", '<span class="bad">no</span>')


def _task(name: str, t: dict[str, Any]) -> str:
    parts = [f'<div class="task"><h3>task <code>{_e(name) or "(none)"}</code></h3>']
    intents = "; ".join(t["intents"])
    parts.append(f"<p><b>intent:</b> {_e(intents) or '<span class=muted>none declared</span>'}<br>"
                 f"<b>calls:</b> {t['allowed']} allowed, {t['denied']} denied "
                 f"{_e(', '.join(f'{r} {n}' for r, n in t['denied_by_reason'].items()))}</p>")
    parts.append("<b>grants</b>" + table(["grant"], [[grant_text(g)] for g in t["grants"]]))
    parts.append("<b>tools and targets touched</b>" + table(
        ["tool", "target", "operation", "allowed", "denied", "granted"],
        [[x["tool"], x["target"], x["operation"], x["allowed"], x["denied"],
          YES if covered(t["grants"], x["tool"], x["target"], x["operation"]) else NO]
         for x in t["touched"]]))
    parts.append("<b>out-of-scope attempts</b>" + table(
        ["time", "tool", "target", "operation", "sensitivity", "reason", "refused argument"],
        [[when(x["time"]), x["tool"], x["target"], x["operation"], x["sensitivity"], x["reason"],
          x["argument"]] for x in t["out_of_scope"]], "flag"))
    if t["delegations_made"] or t["delegations_received"]:
        parts.append("<b>delegations</b>" + table(
            ["time", "direction", "agent", "grants", "token id"],
            [[when(x["time"]), "made to", x["to"], " ".join(map(grant_text, x["grants"])), x["token_id"]]
             for x in t["delegations_made"]]
            + [[when(x["time"]), "received from", x["from"], " ".join(map(grant_text, x["grants"])),
                x["token_id"]] for x in t["delegations_received"]]))
    if t["approvals"]:
        parts.append("<b>approvals</b>" + table(
            ["asked", "request", "grants", "state", "by", "decided", "comment"],
            [[when(x.get("asked")), x.get("id"), " ".join(map(grant_text, x.get("grants", []))),
              x.get("state"), x.get("approver"), when(x.get("decided")), x.get("comment")]
             for x in t["approvals"]]))
    if t["revocations"]:
        parts.append("<b>revocations</b>" + table(
            ["time", "what", "by", "token id"],
            [[when(x["time"]), x["scope"], x["by"], x["token_id"]] for x in t["revocations"]]))
    return "".join(parts) + "</div>"


def _agent(i: int, a: dict[str, Any], chart: str | None) -> str:
    flagged = "".join(f'<li class="bad">{_e(f)}</li>' for f in a["flags"])
    parts = [f'<h2 id="agent-{i}">{_e(a["agent"])}</h2>',
             f'<ul data-flags="{len(a["flags"])}">{flagged}</ul>' if flagged else "",
             f"<p>{a['checks']} calls: {a['allowed']} allowed, {a['denied']} denied "
             f"({a['denial_rate']:.0%}), {a['out_of_scope']} out of scope</p>"]
    if chart:
        parts.append(f'<img alt="calls over time for agent {i}" src="{_e(chart)}">')
    if a["certificates"]:
        parts.append("<b>certificates this identity used</b> (x5t#S256)" + table(
            ["certificate", "first seen", "last seen"],
            [[x["x5t"], when(x["first"]), when(x["last"])] for x in a["certificates"]]))
    if a["peer_refusals"]:
        parts.append("<b>its tokens presented by another certificate or agent</b>" + table(
            ["time", "reason", "peer principal", "peer certificate", "tool", "target"],
            [[when(x["time"]), x["reason"], x["principal"], x["x5t"], x["tool"], x["target"]]
             for x in a["peer_refusals"]], "flag"))
    parts += [_task(name, t) for name, t in a["tasks"].items()]
    return "".join(parts)


def render(report: dict[str, Any], charts: dict[str, str]) -> str:
    """The page for ``report`` (page.render's input: summary plus window and integrity)."""
    s, integrity, window = report["summary"], report["integrity"], report["window"]
    verdict = '<span class="ok">verified</span>' if integrity["ok"] else \
        '<span class="bad">NOT verified</span>'
    agents = s["agents"]
    links = [("raw", f'<a href="#agent-{i}">{_e(a["agent"])}</a>') for i, a in enumerate(agents)]
    rows = [[link, a["checks"], a["allowed"], a["denied"], f"{a['denial_rate']:.0%}", a["out_of_scope"],
             "; ".join(a["flags"])] for link, a in zip(links, agents, strict=True)]
    flagged = [[link, "; ".join(a["flags"])] for link, a in zip(links, agents, strict=True) if a["flags"]]
    head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f"<title>agentauthz audit report</title><style>{STYLE}</style></head><body>")
    body = [f"<h1>agentauthz audit report</h1><p>{_e(report['directory'])}<br>"
            f"<b>window:</b> {_e(when(window['since']) or 'start of log')} to "
            f"{_e(when(window['until']) or 'end of log')}; records from {_e(when(s['first']))} to "
            f"{_e(when(s['last']))}; {s['records']} records in the window, checkpoints aside, from "
            f"{len(s['logs'])} logs<br>"
            f'<b>integrity:</b> <span id="integrity">{verdict}</span> {_e(integrity["message"])}</p>',
            f"<p><b>{s['checks']}</b> calls decided: {s['allowed']} allowed, {s['denied']} denied, by "
            f"<b>{len(agents)}</b> agents; <b id='flagged-count'>{len(s['flagged'])}</b> flagged for "
            "review</p>",
            "<h2>flagged for review</h2>" + table(["agent", "why"], flagged, "flag"),
            f'<img alt="all calls over time" src="{_e(charts.get("", ""))}">' if charts.get("") else "",
            "<h2>agents</h2>" + table(["agent", "calls", "allowed", "denied", "denial rate", "out of scope",
                                       "flags"], rows)]
    body += [_agent(i, a, charts.get(a["agent"])) for i, a in enumerate(agents)]
    return head + "".join(body) + "</body></html>\n"
