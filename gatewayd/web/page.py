"""The technician's status page: plain server-rendered HTML, no scripts from anywhere, works offline."""

from __future__ import annotations

from html import escape
from typing import Any

_STYLE = """
body{font:15px/1.4 system-ui,sans-serif;margin:1.5rem;color:#1d2327;background:#f6f7f7}
h1{font-size:1.4rem;margin:0 0 .2rem}h2{font-size:1.1rem;margin:1.5rem 0 .5rem}
table{border-collapse:collapse;background:#fff;width:100%}th,td{text-align:left;padding:.35rem .6rem;
border-bottom:1px solid #dcdcde;vertical-align:top}th{background:#f0f0f1;font-weight:600}
.ok{color:#007017}.bad{color:#b32d2e}.muted{color:#646970}code{font-size:.9em}
.facts span{display:inline-block;margin-right:1.5rem}
"""

_STATE_CLASS = {"succeeded": "ok", "failed": "bad", "rejected": "bad", "expired": "bad"}


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def render(status: dict[str, Any], devices: list[dict[str, Any]], commands: list[dict[str, Any]]) -> str:
    rows = []
    for d in devices:
        avail = (
            '<span class="ok">available</span>'
            if d["available"]
            else (f'<span class="bad">unavailable</span><br><span class="muted">{_e(d["last_error"])}</span>')
        )
        breaker = d.get("breaker") or {}
        if breaker.get("state") == "open":
            probe = _e(breaker.get("retry_after_s"))
            avail += f'<br><span class="bad">circuit open</span> <span class="muted">probe in {probe} s</span>'
        elif breaker.get("state") == "half_open":
            avail += '<br><span class="muted">circuit half-open: probing</span>'
        where = f"GPIO {_e(d.get('pin'))}" if d["kind"] == "gpio" else f"{_e(d.get('bus'))} @ {_e(d.get('address'))}"
        actions = ", ".join(_e(a) for a in d["actions"])
        state = d.get("state") or {}
        rows.append(
            f"<tr><td><b>{_e(d['name'])}</b><br><span class='muted'>{_e(d['description'])}</span></td>"
            f"<td>{_e(d['profile'])}</td><td>{where}</td><td>{avail}</td>"
            f"<td><code>{_e(state)}</code></td><td>{actions}</td></tr>"
        )
    cmd_rows = []
    for c in commands:
        err = c.get("error") or {}
        cls = _STATE_CLASS.get(c["state"], "")
        cmd_rows.append(
            f"<tr><td><code>{_e(c['id'])}</code></td><td>{_e(c['created_at'])}</td><td>{_e(c['device'])}</td>"
            f"<td>{_e(c['action'])} <code>{_e(c['params'] or '')}</code></td><td>{_e(c['priority'])}</td>"
            f"<td class='{cls}'>{_e(c['state'])}</td><td>{_e(err.get('message', ''))}</td></tr>"
        )
    queue = status["queue"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>gatewayd {_e(status["gateway_id"])}</title><style>{_STYLE}</style></head>
<body>
<h1>gatewayd <span class="muted">{_e(status["gateway_id"])}</span></h1>
<p class="facts"><span>phase: <b>{_e(status["phase"])}</b></span><span>uptime: {_e(status["uptime_s"])} s</span>
<span>mode: {_e(status["mode"])}</span><span>queued: {_e(queue["queued"])}</span>
<span>executing: {_e(queue["in_flight"])}</span><span>version: {_e(status["version"])}</span></p>
<h2>Devices</h2>
<table><tr><th>Device</th><th>Profile</th><th>Where</th><th>Availability</th><th>Last state</th><th>Actions</th></tr>
{"".join(rows) or "<tr><td colspan=6 class=muted>no devices configured</td></tr>"}</table>
<h2>Recent commands</h2>
<table><tr><th>Id</th><th>Received (UTC)</th><th>Device</th><th>Action</th><th>Priority</th><th>State</th>
<th>Error</th></tr>
{"".join(cmd_rows) or "<tr><td colspan=7 class=muted>no commands yet</td></tr>"}</table>
<p class="muted">JSON: <a href="/api/v1/devices">/api/v1/devices</a> · <a href="/api/v1/commands">/api/v1/commands</a>
· <a href="/api/v1/stats">/api/v1/stats</a> · <a href="/healthz">/healthz</a> · <a href="/metrics">/metrics</a></p>
</body></html>
"""
