"""The technician's status page and login form: HTML rendered on the server, complete without scripts.

``/static/gatewayd.js`` then brings it to life (live updates, charts, forms sent without leaving the page); with
scripts off the page refreshes itself and its forms post to ``/ui/command``. Nothing is loaded from anywhere else,
so the page works on a laptop with no internet. Every value is escaped.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

from gatewayd.commands.model import State
from gatewayd.store.space import size_text
from gatewayd.web.identity import CSRF_FIELD, Principal

FAULT_SCENARIOS = (
    "provider_timeout",
    "provider_429",
    "provider_down",
    "broker_down",
    "serial_unplug",
    "serial_garbage",
    "slow_disk",
)

_STATE_CLASS = {"succeeded": "ok", "failed": "bad", "rejected": "bad", "expired": "bad", "cancelled": "muted"}


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.0f} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _head(title: str, csrf: str, principal: Principal, auth_enabled: bool, refresh: bool) -> str:
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="gw-csrf" content="{_e(csrf)}">
<meta name="gw-role" content="{_e(principal.role)}">
<meta name="gw-auth" content="{"on" if auth_enabled else "off"}">
<title>{_e(title)}</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/static/gatewayd.css">
{'<noscript><meta http-equiv="refresh" content="10"></noscript>' if refresh else ""}
<script src="/static/gatewayd.js" defer></script>
</head>"""


def _who(principal: Principal, csrf: str, auth_enabled: bool) -> str:
    if not auth_enabled:
        return '<span class="who muted">access control off (loopback only)</span>'
    if not principal.authenticated:
        return '<span class="who">viewing as anonymous · <a id="login-link" href="/login">log in</a></span>'
    return (
        f'<span class="who">{_e(principal.name)} <span class="muted">({_e(principal.role)})</span></span>'
        f'<form class="inline" method="post" action="/logout"><input type="hidden" name="{CSRF_FIELD}" '
        f'value="{_e(csrf)}"><button type="submit" id="logout">log out</button></form>'
    )


def _outbox_tile(outbox: dict[str, Any]) -> tuple[str, str]:
    """The outbox's depth, and whether telemetry goes out live or a backlog is being carried (and since when)."""
    rows = outbox.get("rows", "—")
    backlog = (outbox.get("telemetry") or {}).get("backlog")
    if backlog:
        return f"{rows} records · backlog for {duration(backlog.get('age_s'))}", "bad"
    return f"{rows} records · live", ""


def _overview(status: dict[str, Any], error_rate: dict[str, Any]) -> str:
    queue = status.get("queue") or {}
    outbox = status.get("outbox") or {}
    uplink = status.get("uplink") or {}
    clock = status.get("clock") or {}
    if not uplink:
        link, link_cls = "—", "muted"
    elif not uplink.get("enabled", True):
        link, link_cls = "disabled", "muted"
    elif uplink.get("connected"):
        link, link_cls = f"connected ({uplink.get('broker')})", "ok"
    else:
        link, link_cls = f"offline ({uplink.get('last_error') or 'connecting'})", "bad"
    synced = clock.get("synchronised")
    if synced is None:
        clock_text, clock_cls = "unknown", "muted"
    else:
        clock_text, clock_cls = ("synchronised", "ok") if synced else ("not synchronised", "bad")
    storage = status.get("storage") or {}
    if not storage:
        storage_text, storage_cls = "—", "muted"
    elif storage.get("full"):
        storage_text, storage_cls = "FULL: new commands refused", "bad"
    else:
        storage_text, storage_cls = f"{size_text(storage.get('free_bytes'))} free", "ok"
    rate = error_rate.get("rate")
    rate_text = "no commands" if rate is None else f"{rate * 100:.1f} % of {error_rate['finished']}"
    healthy = status.get("healthy")
    tiles = [
        (
            "health",
            "Health",
            f"{'healthy' if healthy else 'UNHEALTHY'} · {status.get('phase')}",
            "ok" if healthy else "bad",
        ),
        ("uptime", "Uptime", duration(status.get("uptime_s")), ""),
        ("uplink", "Uplink", link, link_cls),
        ("clock", "Clock", clock_text, clock_cls),
        ("queue", "Queue", f"{queue.get('queued', 0)} queued · {queue.get('in_flight', 0)} executing", ""),
        ("outbox", "Outbox", *_outbox_tile(outbox)),
        ("oldest", "Oldest unsent", duration(outbox.get("oldest_age_s")), ""),
        ("storage", "Storage", storage_text, storage_cls),
        ("errors", "Error rate (5 min)", rate_text, "bad" if rate else ""),
    ]
    cells = "".join(
        f'<div class="tile" data-k="{k}"><dt>{label}</dt><dd class="{cls}">{_e(value)}</dd></div>'
        for k, label, value, cls in tiles
    )
    return f'<section id="overview"><h2>Overview</h2><dl class="tiles">{cells}</dl></section>'


_CHARTS = (
    ("throughput", "Throughput", "commands/min"),
    ("latency", "Latency p50", "ms"),
    ("queue", "Queue depth", "commands"),
    ("outbox", "Outbox depth", "records"),
)


def _charts() -> str:
    figs = "".join(
        f'<figure class="chart"><figcaption>{title} <span class="muted">({unit})</span></figcaption>'
        f'<svg id="chart-{key}" viewBox="0 0 320 90" role="img" aria-label="{title}"></svg></figure>'
        for key, title, unit in _CHARTS
    )
    return (
        f'<section id="charts"><h2>Last hour</h2><div class="charts">{figs}</div>'
        '<noscript><p class="muted">The charts are drawn by the page\'s script; the figures are at '
        '<a href="/api/v1/history">/api/v1/history</a>.</p></noscript></section>'
    )


def _input(name: str, schema: dict[str, Any], required: bool) -> str:
    kind = schema.get("type")
    attrs = [f'name="p.{_e(name)}"']
    if kind in ("integer", "number"):
        attrs.append('type="number"')
        attrs.append('step="1"' if kind == "integer" else 'step="any"')
        for key, attr in (("minimum", "min"), ("maximum", "max")):
            if key in schema:
                attrs.append(f'{attr}="{_e(schema[key])}"')
    if "default" in schema:
        attrs.append(f'placeholder="{_e(schema["default"])}"')
    if required:
        attrs.append("required")
    unit = f' <span class="muted">{_e(schema["x-unit"])}</span>' if schema.get("x-unit") else ""
    title = f' title="{_e(schema["description"])}"' if schema.get("description") else ""
    if kind == "boolean":
        return f'<label{title}><input type="checkbox" name="p.{_e(name)}"> {_e(name)}</label>'
    if "enum" in schema:
        options = "".join(f"<option>{_e(v)}</option>" for v in schema["enum"])
        return f'<label{title}>{_e(name)} <select name="p.{_e(name)}">{options}</select></label>'
    return f"<label{title}>{_e(name)} <input {' '.join(attrs)}>{unit}</label>"


def _action_form(device: str, action: str, spec: dict[str, Any], csrf: str) -> str:
    schema = spec.get("params") or {}
    required = set(schema.get("required") or ())
    inputs = "".join(_input(n, s, n in required) for n, s in (schema.get("properties") or {}).items())
    title = f' title="{_e(spec["description"])}"' if spec.get("description") else ""
    return (
        f'<form class="action" method="post" action="/ui/command" data-device="{_e(device)}" '
        f'data-action="{_e(action)}"><input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}">'
        f'<input type="hidden" name="device" value="{_e(device)}">'
        f'<input type="hidden" name="action" value="{_e(action)}">'
        f'<button type="submit"{title}>{_e(action)}</button>{inputs}</form>'
    )


def queue_text(q: dict[str, Any] | None) -> str:
    if not q:
        return "—"
    text = f"{q.get('queued', 0)} queued"
    return text + (f", executing {q['executing']}" if q.get("executing") else "")


def scheduled_text(rows: list[dict[str, Any]] | None) -> str:
    """What the gateway will send to the device by itself, soonest first: "off in 59m 10s (max on-time)"."""
    if not rows:
        return "—"
    why = {"max_on": "max on-time", "on_period": "end of the on-period"}
    parts = []
    for r in sorted(rows, key=lambda r: (r.get("due_in_s") is None, r.get("due_in_s") or 0)):
        when = "after the command runs" if r.get("due_in_s") is None else f"in {duration(r['due_in_s'])}"
        parts.append(f"{r['action']} {when} ({why.get(r['kind'], r['kind'])})")
    return "; ".join(parts)


def _device(d: dict[str, Any], csrf: str, queue: dict[str, Any] | None = None) -> str:
    name = d["name"]
    badge = (
        '<span class="badge ok">available</span>' if d["available"] else '<span class="badge bad">unavailable</span>'
    )
    breaker = d.get("breaker") or {}
    if breaker.get("state") == "open":
        circuit = f'<span class="bad">open</span>, probe in {_e(breaker.get("retry_after_s"))} s'
    elif breaker.get("state") == "half_open":
        circuit = '<span class="muted">half-open: probing</span>'
    else:
        circuit = "closed" if breaker else "—"
    where = f"GPIO {_e(d.get('pin'))}" if d.get("kind") == "gpio" else f"{_e(d.get('bus'))} @ {_e(d.get('address'))}"
    seen = d.get("last_seen")
    ago = d.get("last_seen_ago_s")
    seen_text = "never" if seen is None else f"{_e(seen)} ({duration(ago)} ago)"
    forms = "".join(_action_form(name, a, spec, csrf) for a, spec in (d.get("actions") or {}).items())
    return f"""<article class="device" data-device="{_e(name)}">
<h3>{_e(name)} <span class="avail">{badge}</span></h3>
<p class="muted">{_e(d.get("description"))} · {_e(d.get("profile"))} · {where}</p>
<dl class="facts"><dt>Last seen</dt><dd class="last-seen">{seen_text}</dd>
<dt>Last error</dt><dd class="last-error">{_e(d.get("last_error") or "—")}</dd>
<dt>Circuit</dt><dd class="breaker">{circuit}</dd>
<dt>Queue</dt><dd class="dqueue">{_e(queue_text(queue))}</dd>
<dt>Scheduled</dt><dd class="scheduled">{_e(scheduled_text(d.get("scheduled")))}</dd>
<dt>State</dt><dd><code class="state">{_e(json.dumps(d.get("state") or {}, default=str))}</code></dd></dl>
<div class="sparks" data-device="{_e(name)}"></div>
<div class="actions">{forms}</div>
</article>"""


def _command_rows(commands: list[dict[str, Any]], sent: str | None) -> str:
    rows = []
    for c in commands:
        err = c.get("error") or {}
        cls = _STATE_CLASS.get(c["state"], "")
        outcome = err.get("message") or (json.dumps(c["result"], default=str) if c.get("result") else "")
        mark = ' class="sent"' if sent and c["id"] == sent else ""
        who = c.get("source") or ""
        if c.get("user"):
            who += f" · {c['user']}"
        rows.append(
            f'<tr data-command-id="{_e(c["id"])}"{mark}><td><a class="cmd-link" href="/api/v1/commands/{_e(c["id"])}">'
            f"<code>{_e(c['id'][:16])}</code></a></td><td>{_e(c['created_at'])}</td><td>{_e(c['device'])}</td>"
            f"<td>{_e(c['action'])} <code>{_e(json.dumps(c['params']) if c['params'] else '')}</code></td>"
            f'<td>{_e(c["priority"])}</td><td>{_e(who)}</td><td class="cstate {cls}">{_e(c["state"])}</td>'
            f'<td class="outcome">{_e(outcome)}</td></tr>'
        )
    return "".join(rows) or '<tr class="empty"><td colspan="8" class="muted">no commands yet</td></tr>'


def _commands(
    commands: list[dict[str, Any]], devices: list[dict[str, Any]], filters: dict[str, str], sent: str | None
) -> str:
    def options(values: list[str], chosen: str) -> str:
        return '<option value="">all</option>' + "".join(
            f"<option{' selected' if v == chosen else ''}>{_e(v)}</option>" for v in values
        )

    states = options([s.value for s in State], filters.get("state", ""))
    names = options([d["name"] for d in devices], filters.get("device", ""))
    return f"""<section id="commands"><h2>Commands</h2>
<form id="filters" method="get" action="/"><label>state <select name="state">{states}</select></label>
<label>device <select name="device">{names}</select></label> <button type="submit">filter</button></form>
<table id="command-table"><thead><tr><th>Id</th><th>Received (UTC)</th><th>Device</th><th>Action</th>
<th>Priority</th><th>Source</th><th>State</th><th>Result or error</th></tr></thead>
<tbody>{_command_rows(commands, sent)}</tbody></table>
<p class="muted">Select an id to see its transitions and how it was interpreted.</p></section>"""


_OUTCOMES = ("allowed", "limited", "bypassed", "keys")


def _limiters(limiters: dict[str, dict[str, float]]) -> str:
    if not limiters:
        return '<p class="muted">no rate limiter has decided anything yet</p>'
    head = "".join(f"<th>{o}</th>" for o in _OUTCOMES)
    rows = "".join(
        f"<tr><td>{_e(name)}</td>"
        + "".join(f"<td>{_e(int(v[o])) if o in v else '—'}</td>" for o in _OUTCOMES)
        + "</tr>"
        for name, v in limiters.items()
    )
    return f'<table id="limiter-table"><thead><tr><th>limiter</th>{head}</tr></thead><tbody>{rows}</tbody></table>'


def _faults(csrf: str) -> str:
    buttons = "".join(
        f'<form class="fault inline" method="post" action="/api/v1/admin/test/{s}" data-scenario="{s}">'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}"><button type="submit">{s}</button></form>'
        for s in FAULT_SCENARIOS
    )
    return (
        '<section id="faults"><h2>Fault scenarios <span class="muted">(admin)</span></h2>'
        f'<div class="buttons">{buttons}</div><pre id="fault-result" class="result" role="status"></pre></section>'
    )


def render(
    status: dict[str, Any],
    devices: list[dict[str, Any]],
    commands: list[dict[str, Any]],
    *,
    principal: Principal,
    csrf: str = "",
    auth_enabled: bool = False,
    filters: dict[str, str] | None = None,
    error_rate: dict[str, Any] | None = None,
    limiters: dict[str, dict[str, float]] | None = None,
    flash: str | None = None,
    sent: str | None = None,
) -> str:
    gateway = status.get("gateway_id", "")
    may_act = principal.can("operator")
    hint = (
        ""
        if may_act
        else '<p class="hint muted">You are viewing: commands you send are refused until you log in as an operator.</p>'
    )
    note = flash or (f"command {sent} sent" if sent else "")
    per_device = (status.get("queue") or {}).get("per_device") or {}
    cards = "".join(_device(d, csrf, per_device.get(d["name"])) for d in devices)
    return f"""{_head(f"gatewayd {gateway}", csrf, principal, auth_enabled, refresh=True)}
<body data-live="off">
<header><h1>gatewayd <span class="muted">{_e(gateway)}</span></h1>
<span id="live-state" class="badge muted">static</span>
<span class="muted">v{_e(status.get("version"))} · {_e(status.get("mode"))} mode</span>
<span class="spacer"></span>{_who(principal, csrf, auth_enabled)}</header>
<p id="flash" class="{"flash" if note else "flash empty"}" role="status">{_e(note)}</p>
<main>
{_overview(status, error_rate or {})}
{_charts()}
<section id="devices"><h2>Devices</h2>{hint}
<div class="cards">{cards or '<p class="muted">no devices configured</p>'}</div>
<pre id="result" class="result" role="status" aria-live="polite"></pre></section>
<section id="say"><h2>Say it</h2>
<form id="nl-form" method="post" action="/ui/command"><input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}">
<input name="text" maxlength="500" placeholder="e.g. set the pump to 40 percent" required>
<button type="submit">send</button></form>
<pre id="nl-result" class="result" role="status"></pre></section>
{_commands(commands, devices, filters or {}, sent)}
<section id="providers"><h2>Providers and rate limits</h2>
<div id="providers-body" class="muted">Shown by the page's script from
<a href="/api/v1/providers">/api/v1/providers</a>.</div>
<h3>Rate limiters</h3><div id="limiters-body">{_limiters(limiters or {})}</div>
</section>
{_faults(csrf) if principal.can("admin") else ""}
</main>
<footer class="muted">JSON: <a href="/api/v1/overview">overview</a> · <a href="/api/v1/devices">devices</a> ·
<a href="/api/v1/commands">commands</a> · <a href="/api/v1/history">history</a> · <a href="/api/v1/stats">stats</a>
· <a href="/healthz">healthz</a> · <a href="/metrics">metrics</a></footer>
</body></html>
"""


def render_login(*, csrf: str, next_path: str, error: str | None, enabled: bool) -> str:
    body = (
        '<p class="muted">Access control is off: this gateway listens on loopback only and needs no login.</p>'
        '<p><a href="/">to the status page</a></p>'
        if not enabled
        else f"""<form id="login-form" method="post" action="/login">
<input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}"><input type="hidden" name="next" value="{_e(next_path)}">
<label>name <input name="name" autocomplete="username" required autofocus></label>
<label>token <input name="token" type="password" autocomplete="current-password" required></label>
<button type="submit">log in</button></form>
<p class="muted"><a href="/">back to the status page</a></p>"""
    )
    err = f'<p id="login-error" class="flash bad" role="alert">{_e(error)}</p>' if error else ""
    anon = Principal("anonymous", "viewer", "anonymous")
    return f"""{_head("gatewayd: log in", "", anon, enabled, refresh=False)}
<body class="login"><main><h1>gatewayd</h1>{err}{body}</main></body></html>
"""
