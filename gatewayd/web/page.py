"""The technician's status page and login form: HTML rendered on the server, complete without scripts.

``/static/gatewayd.js`` then brings it to life (live updates, charts, forms sent without leaving the page); with
scripts off the page refreshes itself and its forms post to ``/ui/command``. Nothing is loaded from anywhere else,
so the page works on a laptop with no internet. Every value is escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

from gatewayd.commands.model import State
from gatewayd.web import present
from gatewayd.web.identity import CSRF_FIELD, Principal

_STATE_CLASS = {"succeeded": "ok", "failed": "bad", "rejected": "bad", "expired": "bad", "cancelled": "muted"}


def _e(value: Any) -> str:
    return escape("" if value is None else str(value))


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


def _tile(t: dict[str, str]) -> str:
    why = f'<dd class="why">{_e(t["why"])}</dd>' if t.get("why") and t.get("level") != "ok" else ""
    return (
        f'<div class="tile" data-k="{_e(t["key"])}" data-level="{_e(t["level"])}"><dt>{_e(t["label"])}</dt>'
        f'<dd class="text">{_e(t["text"])}</dd>{why}</div>'
    )


def _overview(summary: dict[str, Any]) -> str:
    v = summary["verdict"]
    return (
        '<section id="overview" aria-labelledby="overview-h"><h2 id="overview-h">Overview</h2>'
        f'<div id="verdict" data-level="{_e(v["level"])}" role="status"><p class="title">{_e(v["title"])}</p>'
        f'<p class="detail">{_e(v["detail"])}</p></div>'
        f'<dl class="tiles">{"".join(_tile(t) for t in summary["tiles"])}</dl></section>'
    )


_CHARTS = (
    ("throughput", "Throughput", "commands/min"),
    ("latency", "Latency p50", "ms"),
    ("queue", "Queue depth", "commands"),
    ("outbox", "Outbox depth", "records"),
)


def _charts() -> str:
    figs = "".join(
        f'<figure class="chart"><figcaption>{title} <span class="muted">({unit})</span></figcaption>'
        f'<svg id="chart-{key}" viewBox="0 0 320 90" role="img" aria-label="{title}, last hour"></svg></figure>'
        for key, title, unit in _CHARTS
    )
    return (
        f'<section id="charts" aria-labelledby="charts-h"><h2 id="charts-h">Last hour</h2><div class="charts">{figs}'
        '</div><noscript><p class="muted">The charts are drawn by the page\'s script; the figures are at '
        '<a href="/api/v1/history">/api/v1/history</a>.</p></noscript></section>'
    )


def _range(schema: dict[str, Any]) -> str:
    lo, hi, unit = schema.get("minimum"), schema.get("maximum"), schema.get("x-unit") or ""
    if lo is None and hi is None:
        return unit
    if lo is not None and hi is not None:
        return f"{lo:g} to {hi:g} {unit}".strip()
    return (f"≥ {lo:g} {unit}" if lo is not None else f"≤ {hi:g} {unit}").strip()


def _input(device: str, action: str, name: str, schema: dict[str, Any], required: bool) -> str:
    kind = schema.get("type")
    ident = f"in-{device}-{action}-{name}"
    attrs = [f'id="{_e(ident)}"', f'name="p.{_e(name)}"']
    if kind in ("integer", "number"):
        attrs.append('type="number"')
        attrs.append('step="1"' if kind == "integer" else 'step="any"')
        attrs.append('inputmode="numeric"' if kind == "integer" else 'inputmode="decimal"')
        for key, attr in (("minimum", "min"), ("maximum", "max")):
            if key in schema:
                attrs.append(f'{attr}="{_e(schema[key])}"')
    if "default" in schema:
        attrs.append(f'placeholder="{_e(schema["default"])}"')
    if required:
        attrs.append("required")
    title = f' title="{_e(schema["description"])}"' if schema.get("description") else ""
    words = name.replace("_", " ")
    if kind == "boolean":
        return f'<label{title}><input type="checkbox" {" ".join(attrs)}> {_e(words)}</label>'
    if "enum" in schema:
        options = "".join(f"<option>{_e(v)}</option>" for v in schema["enum"])
        return f"<label{title}>{_e(words)} <select {' '.join(attrs)}>{options}</select></label>"
    hint = _range(schema)
    hint_html = f' <span class="muted">{_e(hint)}</span>' if hint else ""
    return f"<label{title}>{_e(words)} <input {' '.join(attrs)}>{hint_html}</label>"


def _hidden(csrf: str, device: str, action: str) -> str:
    return (
        f'<input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}">'
        f'<input type="hidden" name="device" value="{_e(device)}">'
        f'<input type="hidden" name="action" value="{_e(action)}">'
    )


def _action_form(device: str, action: str, spec: dict[str, Any], csrf: str) -> str:
    schema = spec.get("params") or {}
    required = set(schema.get("required") or ())
    props = schema.get("properties") or {}
    inputs = "".join(_input(device, action, n, s, n in required) for n, s in props.items())
    title = f' title="{_e(spec["description"])}"' if spec.get("description") else ""
    cls = "action with-params" if props else "action"
    return (
        f'<form class="{cls}" method="post" action="/ui/command" data-device="{_e(device)}" '
        f'data-action="{_e(action)}">{_hidden(csrf, device, action)}'
        f'<button type="submit"{title}>{_e(action)}</button>{inputs}</form>'
    )


def _channel(device: str, ch: dict[str, Any], csrf: str) -> str:
    name = f"channel {ch['channel']}" + (f", {ch['label']}" if ch["label"] else "")
    return (
        f'<form class="channel" method="post" action="/ui/command" data-device="{_e(device)}" '
        f'data-action="{_e(ch["action"])}" data-channel="{ch["channel"]}" data-state="{_e(ch["state"])}">'
        f"{_hidden(csrf, device, ch['action'])}"
        f'<span class="ch-name"><span class="ch-num">{ch["channel"]}</span> '
        f'<span class="ch-label">{_e(ch["label"] or "unlabelled")}</span></span>'
        f'<span class="ch-state">{_e(ch["state"])}</span>'
        f'<button type="submit" aria-label="{_e(ch["button"])} {_e(name)}">{_e(ch["button"])}</button></form>'
    )


def _reading(r: dict[str, str]) -> str:
    return f'<div class="reading" data-key="{_e(r["key"])}"><dt>{_e(r["label"])}</dt><dd>{_e(r["text"])}</dd></div>'


def _device(d: dict[str, Any], csrf: str) -> str:
    name = d["name"]
    v = d["view"]
    grid = {a for ch in d.get("channels") or () for a in (ch["on"], ch["off"])}
    forms = "".join(_action_form(name, a, spec, csrf) for a, spec in (d.get("actions") or {}).items() if a not in grid)
    channels = "".join(_channel(name, ch, csrf) for ch in v["channels"])
    channel_grid = (
        f'<div class="channels" role="group" aria-label="{_e(name)} channels">{channels}</div>' if channels else ""
    )
    ident, level = _e(f"dev-{name}"), _e(v["level"])
    head = (
        f'<div class="dhead"><h3 id="{ident}">{_e(name)}</h3> <span class="avail"><span class="badge" '
        f'data-level="{level}">{_e(v["badge"])}</span></span></div>'
    )
    desc = f'{_e(d.get("description"))} · <span title="profile">{_e(d.get("profile"))}</span> · {_e(v["where"])}'
    cls = "device board" if channels else "device"  # a board's card spans two columns from a tablet up
    return f"""<article class="{cls}" data-device="{_e(name)}" data-level="{level}" aria-labelledby="{ident}">
{head}
<p class="desc muted">{desc}</p>
<dl class="readings">{"".join(_reading(r) for r in v["readings"])}</dl>
<p class="as-of muted">{_e(v["as_of"])}</p>
<div class="sparks" data-device="{_e(name)}"></div>
{channel_grid}
<dl class="facts"><dt>Last heard</dt><dd class="last-seen">{_e(v["seen"])}</dd>
<dt>Problems</dt><dd class="last-error" data-level="{_e(v["problem_level"])}">{_e(v["problem"])}</dd>
<dt>Circuit</dt><dd class="breaker">{_e(v["circuit"])}</dd>
<dt>Queue</dt><dd class="dqueue">{_e(v["queue"])}</dd>
<dt>Scheduled</dt><dd class="scheduled">{_e(v["scheduled"])}</dd></dl>
<div class="actions">{forms}</div>
</article>"""


def when(iso_text: str | None) -> str:
    """An API timestamp as a person reads it: "2026-12-07 17:20:52" (UTC, the seconds' fraction dropped)."""
    return (iso_text or "").replace("T", " ").split(".")[0].rstrip("Z")


def outcome(c: dict[str, Any], fields: dict[str, Any] | None = None) -> str:
    """A command's result or error in words: "state on", "speed 40 %", "refused: percent must be ..."."""
    err = c.get("error") or {}
    if err:
        return present.plain_error(err.get("message") or err.get("code"))
    return present.pairs(c.get("result"), fields)


def _command_rows(commands: list[dict[str, Any]], sent: str | None, devices: dict[str, dict[str, Any]]) -> str:
    rows = []
    for c in commands:
        cls = _STATE_CLASS.get(c["state"], "")
        mark = ' class="sent"' if sent and c["id"] == sent else ""
        who = f"{c.get('source') or ''}{' · ' + c['user'] if c.get('user') else ''} · {c['priority']}"
        device = devices.get(c["device"]) or {}
        params = ((device.get("actions") or {}).get(c["action"]) or {}).get("params", {}).get("properties", {})
        units = {k: {"unit": v.get("x-unit")} for k, v in params.items()}
        rows.append(
            f'<tr data-command-id="{_e(c["id"])}"{mark}><td data-label="Id"><a class="cmd-link" '
            f'href="/api/v1/commands/{_e(c["id"])}"><code>{_e(c["id"][:16])}</code></a></td>'
            f'<td data-label="Received (UTC)">{_e(when(c["created_at"]))}</td><td data-label="Device">'
            f'{_e(c["device"])}</td><td data-label="Action">{_e(c["action"])} <span class="params">'
            f'{_e(present.pairs(c["params"], units))}</span></td><td data-label="From">{_e(who)}</td>'
            f'<td data-label="State" class="cstate {cls}">{_e(c["state"])}</td>'
            f'<td data-label="Result" class="outcome">{_e(outcome(c, device.get("fields")))}</td></tr>'
        )
    return "".join(rows) or '<tr class="empty"><td colspan="7" class="muted">no commands yet</td></tr>'


def _commands(
    commands: list[dict[str, Any]], devices: list[dict[str, Any]], filters: dict[str, str], sent: str | None
) -> str:
    by_name = {d["name"]: d for d in devices}

    def options(values: list[str], chosen: str) -> str:
        return '<option value="">all</option>' + "".join(
            f"<option{' selected' if v == chosen else ''}>{_e(v)}</option>" for v in values
        )

    states = options([s.value for s in State], filters.get("state", ""))
    names = options([d["name"] for d in devices], filters.get("device", ""))
    return f"""<section id="commands" aria-labelledby="commands-h"><h2 id="commands-h">Commands</h2>
<form id="filters" method="get" action="/"><label>state <select name="state">{states}</select></label>
<label>device <select name="device">{names}</select></label> <button type="submit">filter</button></form>
<table id="command-table" class="stack"><thead><tr><th scope="col">Id</th><th scope="col">Received (UTC)</th>
<th scope="col">Device</th><th scope="col">Action</th><th scope="col">From</th><th scope="col">State</th>
<th scope="col">Result or error</th></tr></thead>
<tbody>{_command_rows(commands, sent, by_name)}</tbody></table>
<p class="muted">Select an id to see its steps and how it was understood.</p></section>"""


_OUTCOMES = ("allowed", "limited", "bypassed", "keys")


def _limiters(limiters: dict[str, dict[str, float]]) -> str:
    if not limiters:
        return '<p class="muted">no rate limiter has decided anything yet</p>'
    head = "".join(f'<th scope="col">{o}</th>' for o in _OUTCOMES)
    rows = "".join(
        f'<tr><td data-label="Limiter">{_e(name)}</td>'
        + "".join(f'<td data-label="{o}">{_e(int(v[o])) if o in v else "—"}</td>' for o in _OUTCOMES)
        + "</tr>"
        for name, v in limiters.items()
    )
    return (
        f'<table id="limiter-table" class="stack"><thead><tr><th scope="col">Limiter</th>{head}</tr></thead>'
        f"<tbody>{rows}</tbody></table>"
    )


def _faults(csrf: str) -> str:
    buttons = "".join(
        f'<form class="fault" method="post" action="/api/v1/admin/test/{s}" data-scenario="{s}">'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}"><button type="submit" '
        f'aria-describedby="fault-{s}">{s}</button> <span id="fault-{s}" class="muted">{_e(what)}</span></form>'
        for s, what in present.SCENARIOS.items()
    )
    return (
        '<section id="faults" aria-labelledby="faults-h"><h2 id="faults-h">Fault drills <span class="muted">'
        "(admin: each runs for 2 s on this gateway, then undoes itself)</span></h2>"
        f'<div class="drills">{buttons}</div><pre id="fault-result" class="result" role="status"></pre></section>'
    )


def render(
    status: dict[str, Any],
    devices: list[dict[str, Any]],
    commands: list[dict[str, Any]],
    *,
    principal: Principal,
    summary: dict[str, Any],
    csrf: str = "",
    auth_enabled: bool = False,
    filters: dict[str, str] | None = None,
    limiters: dict[str, dict[str, float]] | None = None,
    flash: str | None = None,
    sent: str | None = None,
) -> str:
    """The page. ``devices`` carry their ``view`` and ``summary`` is the overview's verdict and tiles, both from
    :mod:`gatewayd.web.present`, as the live updates carry them."""
    gateway = status.get("gateway_id", "")
    may_act = principal.can("operator")
    hint = (
        ""
        if may_act
        else '<p class="hint muted">You are viewing: commands you send are refused until you log in as an operator.</p>'
    )
    note = flash or (f"command {sent} sent" if sent else "")
    cards = "".join(_device(d, csrf) for d in devices)
    return f"""{_head(f"gatewayd {gateway}", csrf, principal, auth_enabled, refresh=True)}
<body data-live="off">
<header class="top"><h1>gatewayd <span class="muted">{_e(gateway)}</span></h1>
<span id="live-state" class="badge muted">static</span>
<span class="muted">v{_e(status.get("version"))} · {_e(status.get("mode"))} mode</span>
<span class="spacer"></span>{_who(principal, csrf, auth_enabled)}</header>
<p id="flash" class="{"flash" if note else "flash empty"}" role="status">{_e(note)}</p>
<main>
{_overview(summary)}
<section id="devices" aria-labelledby="devices-h"><h2 id="devices-h">Devices</h2>{hint}
<div class="cards">{cards or '<p class="muted">no devices configured</p>'}</div>
<pre id="result" class="result" role="status" aria-live="polite"></pre></section>
<section id="say" aria-labelledby="say-h"><h2 id="say-h">Say it</h2>
<form id="nl-form" method="post" action="/ui/command"><input type="hidden" name="{CSRF_FIELD}" value="{_e(csrf)}">
<label for="nl-text" class="visually-hidden">A command or question in plain words</label>
<input id="nl-text" name="text" maxlength="500" placeholder="e.g. set the pump to 40 percent" required>
<button type="submit">send</button></form>
<pre id="nl-result" class="result" role="status"></pre></section>
{_commands(commands, devices, filters or {}, sent)}
{_charts()}
<section id="providers" aria-labelledby="providers-h"><h2 id="providers-h">Language providers</h2>
<div id="providers-body" class="muted">Shown by the page's script from
<a href="/api/v1/providers">/api/v1/providers</a>.</div>
<details id="limiters"><summary>Rate limiters ({len(limiters or {})})</summary>
<div id="limiters-body">{_limiters(limiters or {})}</div></details>
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
