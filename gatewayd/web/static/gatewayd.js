// gatewayd status page: live updates (server-sent events, else polling), charts drawn as inline SVG, and forms
// sent without leaving the page. No framework, nothing loaded from elsewhere; the page works without this file.
"use strict";
(function () {
  const $ = (sel, root) => (root || document).querySelector(sel);
  const $$ = (sel, root) => Array.from((root || document).querySelectorAll(sel));
  const meta = (name) => { const m = $(`meta[name="${name}"]`); return m ? m.content : ""; };
  const SVG = "http://www.w3.org/2000/svg";
  const POLL_MS = 3000;
  const SPARK_POINTS = 120;

  if (!$("#overview")) return; // the login page has nothing live

  const csrf = meta("gw-csrf");
  const state = {
    accepted: null,          // the daemon's accepted-commands counter at the last status event
    finals: new Map(),       // id -> final record seen recently (a result may arrive before the POST answers)
    pending: new Map(),      // id -> {box, label}: commands sent from this page, awaiting their final state
    sent: 0,                 // requests sent from this page's forms: the newest one owns its result box
    readings: {},            // device -> [{at, values}]
    lastReading: {},         // device -> "at" of the newest reading drawn
    source: null,
    pollTimer: null,
    refreshTimer: null,
  };

  // --- small helpers --------------------------------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    return node;
  }

  function size(n) {
    if (n === null || n === undefined) return "unknown";
    for (const [unit, scale] of [["GiB", 1024 ** 3], ["MiB", 1024 ** 2], ["KiB", 1024]]) {
      if (n >= scale) return `${(n / scale).toFixed(1)} ${unit}`;
    }
    return `${n} B`;
  }

  function duration(s) {
    if (s === null || s === undefined) return "—";
    s = Math.floor(s);
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
  }

  function fmt(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "—";
    const a = Math.abs(n);
    return a >= 100 ? n.toFixed(0) : a >= 10 ? n.toFixed(1) : n.toFixed(2);
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
    let resp;
    try { resp = await fetch(path, init); } catch (err) { return { status: 0, ok: false, data: null, error: String(err) }; }
    let data = null;
    try { data = await resp.json(); } catch (err) { data = null; }
    return { status: resp.status, ok: resp.ok, data };
  }

  function describeError(r) {
    const e = r.data && r.data.error;
    if (r.status === 0) return `the gateway did not answer (${r.error || "network error"})`;
    return e ? `refused (${r.status} ${e.code}): ${e.message}` : `HTTP ${r.status}`;
  }

  function setLive(mode, text) {
    document.body.dataset.live = mode;
    const badge = $("#live-state");
    badge.textContent = text;
    badge.className = `badge ${mode === "sse" ? "ok" : mode === "polling" ? "warn" : "muted"}`;
  }

  // --- overview and devices -------------------------------------------------------------------------------------

  function tile(key, text, cls) {
    const dd = $(`.tile[data-k="${key}"] dd`);
    if (!dd) return;
    dd.textContent = text;
    dd.className = cls || "";
  }

  function applyOverview(ov) {
    const st = ov.status || {};
    const q = st.queue || {}, ob = st.outbox || {}, up = st.uplink, clock = st.clock || {};
    tile("health", `${st.healthy ? "healthy" : "UNHEALTHY"} · ${st.phase}`, st.healthy ? "ok" : "bad");
    tile("uptime", duration(st.uptime_s));
    if (!up) tile("uplink", "—", "muted");
    else if (up.enabled === false) tile("uplink", "disabled", "muted");
    else if (up.connected) tile("uplink", `connected (${up.broker})`, "ok");
    else tile("uplink", `offline (${up.last_error || "connecting"})`, "bad");
    const synced = clock.synchronised;
    tile("clock", synced === true ? "synchronised" : synced === false ? "not synchronised" : "unknown",
      synced === true ? "ok" : synced === false ? "bad" : "muted");
    tile("queue", `${q.queued || 0} queued · ${q.in_flight || 0} executing`);
    const backlog = (ob.telemetry || {}).backlog;
    const depth = `${ob.rows === undefined ? "—" : ob.rows} records`;
    if (backlog) tile("outbox", `${depth} · backlog for ${duration(backlog.age_s)}`, "bad");
    else tile("outbox", `${depth} · live`);
    tile("oldest", duration(ob.oldest_age_s));
    const sto = st.storage;
    if (!sto) tile("storage", "—", "muted");
    else if (sto.full) tile("storage", "FULL: new commands refused", "bad");
    else tile("storage", `${size(sto.free_bytes)} free`, "ok");
    const er = ov.error_rate || {};
    tile("errors", er.rate === null || er.rate === undefined ? "no commands" : `${(er.rate * 100).toFixed(1)} % of ${er.finished}`,
      er.rate ? "bad" : "");
    const perDevice = q.per_device || {};
    for (const d of ov.devices || []) applyDevice(d, perDevice[d.name]);
    if (ov.limiters) applyLimiters(ov.limiters);
    if (state.accepted !== null && ov.commands_accepted !== state.accepted) scheduleCommandRefresh();
    state.accepted = ov.commands_accepted;
  }

  // What the gateway will send to the device by itself (as page.py's scheduled_text writes it).
  function scheduledText(rows) {
    if (!rows || !rows.length) return "—";
    const why = { max_on: "max on-time", on_period: "end of the on-period" };
    return rows.slice().sort((a, b) => (a.due_in_s ?? Infinity) - (b.due_in_s ?? Infinity))
      .map((r) => `${r.action} ${r.due_in_s === null || r.due_in_s === undefined ? "after the command runs" : `in ${duration(r.due_in_s)}`} (${why[r.kind] || r.kind})`)
      .join("; ");
  }

  function applyDevice(d, dq) {
    const card = $(`article.device[data-device="${CSS.escape(d.name)}"]`);
    if (!card) return;
    const avail = $(".avail", card);
    avail.replaceChildren(el("span", { class: `badge ${d.available ? "ok" : "bad"}`, text: d.available ? "available" : "unavailable" }));
    $(".last-seen", card).textContent = d.last_seen ? `${d.last_seen} (${duration(d.last_seen_ago_s)} ago)` : "never";
    $(".last-error", card).textContent = d.last_error || "—";
    const b = d.breaker;
    const breaker = $(".breaker", card);
    if (b && b.state === "open") breaker.replaceChildren(el("span", { class: "bad", text: "open" }), `, probe in ${b.retry_after_s} s`);
    else if (b && b.state === "half_open") breaker.textContent = "half-open: probing";
    else breaker.textContent = b ? "closed" : "—";
    $(".state", card).textContent = JSON.stringify(d.state || {});
    $(".dqueue", card).textContent = dq ? `${dq.queued} queued${dq.executing ? `, executing ${dq.executing}` : ""}` : "—";
    const sched = $(".scheduled", card);
    if (sched) sched.textContent = scheduledText(d.scheduled);
    if (d.telemetry && d.telemetry.at !== state.lastReading[d.name]) {
      const ring = state.readings[d.name] || (state.readings[d.name] = []);
      ring.push(d.telemetry);
      while (ring.length > SPARK_POINTS) ring.shift();
      drawSparks(d.name);
    }
  }

  function applyLimiters(limiters) {
    const box = $("#limiters-body");
    const names = Object.keys(limiters);
    if (!box || !names.length) return;
    const cols = ["allowed", "limited", "bypassed", "keys"];
    box.replaceChildren(el("table", { id: "limiter-table" },
      el("thead", {}, el("tr", {}, el("th", { text: "limiter" }), ...cols.map((c) => el("th", { text: c })))),
      el("tbody", {}, ...names.map((n) => el("tr", {}, el("td", { text: n }),
        ...cols.map((c) => el("td", { text: limiters[n][c] === undefined ? "—" : String(Math.round(limiters[n][c])) })))))));
  }

  // --- charts -----------------------------------------------------------------------------------------------------

  function numeric(v) {
    if (typeof v === "boolean") return v ? 1 : 0;
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  function drawSparks(device) {
    const box = $(`.sparks[data-device="${CSS.escape(device)}"]`);
    const ring = state.readings[device] || [];
    if (!box || !ring.length) return;
    state.lastReading[device] = ring[ring.length - 1].at;
    const keys = [];
    for (const r of ring) for (const [k, v] of Object.entries(r.values || {})) if (numeric(v) !== null && !keys.includes(k)) keys.push(k);
    box.replaceChildren(...keys.map((key) => {
      const ys = ring.map((r) => numeric((r.values || {})[key]));
      const last = ys.filter((y) => y !== null).pop();
      const s = svg("svg", { viewBox: "0 0 120 28", class: "spark", role: "img", "aria-label": key });
      line(s, ys.map((y, i) => [i, y]), { w: 120, h: 28, pad: 2, xmin: 0, xmax: Math.max(1, ys.length - 1) });
      return el("figure", { class: "spark", "data-key": key }, s, el("figcaption", { text: `${key} ${fmt(last)}` }));
    }));
  }

  // Draws points [x, y] (y null = gap) scaled into the svg; returns [ymin, ymax].
  function line(s, points, o) {
    const ys = points.map((p) => p[1]).filter((y) => y !== null);
    let ymin = o.ymin !== undefined ? o.ymin : Math.min(...ys), ymax = Math.max(...ys, o.ymin !== undefined ? o.ymin : -Infinity);
    if (!ys.length) { ymin = 0; ymax = 1; }
    if (ymax - ymin < 1e-9) { ymax = ymin + 1; }
    const sx = (x) => o.pad + ((x - o.xmin) / (o.xmax - o.xmin || 1)) * (o.w - 2 * o.pad);
    const sy = (y) => o.h - o.pad - ((y - ymin) / (ymax - ymin)) * (o.h - 2 * o.pad - (o.top || 0));
    let d = "", pen = false;
    for (const [x, y] of points) {
      if (y === null) { pen = false; continue; }
      d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
      pen = true;
    }
    if (d) s.append(svg("path", { d, class: "line" }));
    return [ymin, ymax];
  }

  const CHARTS = {
    throughput: (s) => s.throughput_per_min,
    latency: (s) => s.latency_p50_ms,
    queue: (s) => s.queued + s.in_flight,
    outbox: (s) => s.outbox_rows,
  };

  let samples = [];

  function drawCharts() {
    const now = Date.now() / 1000;
    for (const [key, pick] of Object.entries(CHARTS)) {
      const s = $(`#chart-${key}`);
      if (!s) continue;
      s.replaceChildren();
      const w = 320, h = 90, pad = 4, top = 14;
      s.append(svg("line", { x1: pad, y1: h - pad, x2: w - pad, y2: h - pad, class: "axis" }));
      const pts = samples.map((x) => [x.ts, pick(x) === undefined ? null : pick(x)]);
      const [, ymax] = line(s, pts, { w, h, pad, top, xmin: now - 3600, xmax: now, ymin: 0 });
      const last = pts.length ? pts[pts.length - 1][1] : null;
      const label = svg("text", { x: pad, y: 11, class: "label" });
      label.textContent = samples.length ? `now ${fmt(last)} · max ${fmt(ymax)}` : "no samples yet";
      s.append(label);
      const span = svg("text", { x: w - pad, y: 11, class: "label end" });
      span.textContent = "60 min";
      s.append(span);
    }
  }

  async function loadHistory() {
    const r = await api("GET", "/api/v1/history");
    if (r.ok) { samples = r.data.samples || []; drawCharts(); }
  }

  async function loadTelemetry() {
    for (const card of $$("article.device")) {
      const name = card.dataset.device;
      const r = await api("GET", `/api/v1/devices/${encodeURIComponent(name)}/telemetry`);
      if (r.ok) { state.readings[name] = (r.data.readings || []).slice(-SPARK_POINTS); drawSparks(name); }
    }
  }

  // --- commands ---------------------------------------------------------------------------------------------------

  const STATE_CLASS = { succeeded: "ok", failed: "bad", rejected: "bad", expired: "bad", cancelled: "muted" };
  const FINAL = new Set(["succeeded", "failed", "expired", "rejected", "cancelled"]);

  function outcome(c) {
    if (c.error) return c.error.message || c.error.code;
    return c.result ? JSON.stringify(c.result) : "";
  }

  function commandRow(c) {
    const link = el("a", { class: "cmd-link", href: `/api/v1/commands/${encodeURIComponent(c.id)}` }, el("code", { text: c.id.slice(0, 16) }));
    const params = c.params && Object.keys(c.params).length ? JSON.stringify(c.params) : "";
    return el("tr", { "data-command-id": c.id },
      el("td", {}, link), el("td", { text: c.created_at }), el("td", { text: c.device }),
      el("td", {}, `${c.action} `, el("code", { text: params })), el("td", { text: c.priority }),
      el("td", { text: (c.source || "") + (c.user ? ` · ${c.user}` : "") }),
      el("td", { class: `cstate ${STATE_CLASS[c.state] || ""}`, text: c.state }),
      el("td", { class: "outcome", text: outcome(c) }));
  }

  function filters() {
    const f = $("#filters");
    return { state: f.elements.state.value, device: f.elements.device.value };
  }

  function upsertCommand(c) {
    const f = filters();
    const tbody = $("#command-table tbody");
    const old = $(`tr[data-command-id="${CSS.escape(c.id)}"]`, tbody);
    const matches = (!f.state || f.state === c.state) && (!f.device || f.device === c.device);
    // A final state never goes back: the POST's answer (queued) may arrive after the stream's result.
    if (old && FINAL.has($("td.cstate", old).textContent) && !FINAL.has(c.state)) return;
    if (old) {
      const detail = old.nextElementSibling && old.nextElementSibling.classList.contains("detail") ? old.nextElementSibling : null;
      if (matches) { old.replaceWith(commandRow(c)); if (detail) detail.remove(); } else { old.remove(); if (detail) detail.remove(); }
    } else if (matches) {
      const empty = $("tr.empty", tbody);
      if (empty) empty.remove();
      tbody.prepend(commandRow(c));
    }
  }

  function noteRecord(c, via) {
    if (FINAL.has(c.state)) {
      state.finals.set(c.id, c);
      if (state.finals.size > 500) state.finals.delete(state.finals.keys().next().value);
    }
    const p = state.pending.get(c.id);
    if (p && FINAL.has(c.state)) {
      state.pending.delete(c.id);
      if (p.box.dataset.commandId !== c.id) return;  // the box has moved on to a newer request
      showResult(p.box, `${p.label}: ${c.state}${outcome(c) ? ` — ${outcome(c)}` : ""}  (id ${c.id})`, STATE_CLASS[c.state], via);
    }
  }

  // A result box says what it waits for: data-state="pending" from the moment a request leaves until its answer
  // (or the command's final state) is shown, then "done", with data-source telling where the answer came from
  // (http, sse or poll). Scripts and tests wait on data-state=done, never on text that is already there.
  function showResult(box, text, cls, via) {
    box.textContent = text;
    box.className = `result ${cls || ""}`;
    box.dataset.state = "done";
    box.dataset.source = via;
    box.removeAttribute("aria-busy");
  }

  function showPending(box, text) {
    box.textContent = text;
    box.className = "result muted";
    box.dataset.state = "pending";
    delete box.dataset.source;
    box.setAttribute("aria-busy", "true");
  }

  async function refreshCommands() {
    const f = filters();
    const q = new URLSearchParams({ limit: "50" });
    if (f.state) q.set("state", f.state);
    if (f.device) q.set("device", f.device);
    const r = await api("GET", `/api/v1/commands?${q}`);
    if (!r.ok) return;
    const tbody = $("#command-table tbody");
    const rows = r.data.commands.map(commandRow);
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: "8", class: "muted", text: "no commands" }))]));
    for (const c of r.data.commands) noteRecord(c, "poll");
  }

  function scheduleCommandRefresh() {
    if (state.refreshTimer) return;
    state.refreshTimer = setTimeout(() => { state.refreshTimer = null; refreshCommands(); }, 300);
  }

  async function toggleDetail(row, id) {
    const next = row.nextElementSibling;
    if (next && next.classList.contains("detail")) { next.remove(); return; }
    const r = await api("GET", `/api/v1/commands/${encodeURIComponent(id)}`);
    const cell = el("td", { colspan: "8" });
    if (!r.ok) cell.textContent = describeError(r);
    else {
      const c = r.data;
      const list = el("ol", { class: "transitions" }, ...(c.transitions || []).map((t) =>
        el("li", {}, el("b", { text: t.state }), ` ${t.at}`, t.detail ? ` — ${t.detail}` : "")));
      const how = c.interpretation || c.interpreted || null;
      cell.append(el("div", {}, el("h4", { text: "Transitions" }), list),
        el("div", {}, el("h4", { text: "Interpreted" }),
          how ? el("pre", { text: JSON.stringify(how, null, 2) })
            : el("p", { class: "muted", text: `a structured command from ${c.source}${c.user ? ` (${c.user})` : ""}: nothing to interpret` })),
        el("div", {}, el("h4", { text: c.error ? "Error" : "Result" }),
          el("pre", { text: JSON.stringify(c.error || c.result, null, 2) })));
    }
    row.after(el("tr", { class: "detail" }, cell));
  }

  // --- forms --------------------------------------------------------------------------------------------------------

  async function sendCommand(body, box, label) {
    // The box shows the latest request only: an earlier one's late answer must not mark it done.
    const ticket = String(++state.sent);
    box.dataset.ticket = ticket;
    delete box.dataset.commandId;
    showPending(box, `${label}: sending…`);
    const r = await api("POST", "/api/v1/commands", body);
    if (box.dataset.ticket !== ticket) return;
    if (!r.ok) { showResult(box, `${label}: ${describeError(r)}`, "bad", "http"); return; }
    const c = r.data;
    // A question about state is answered from what the gateway knows: no command, nothing to wait for.
    if (c.answer !== undefined && c.id === undefined) { showResult(box, `${label}: ${c.answer}`, "ok", "http"); return; }
    // How the words were understood (device, action, channel, duration), shown with the command's progress.
    if (c.interpretation && c.interpretation.understood) label = `${label} → ${c.interpretation.understood}`;
    box.dataset.commandId = c.id;
    upsertCommand(c);
    if (FINAL.has(c.state)) { state.pending.set(c.id, { box, label }); noteRecord(c, "http"); return; }
    const early = state.finals.get(c.id);
    state.pending.set(c.id, { box, label });
    if (early) noteRecord(early, "sse");
    else showPending(box, `${label}: ${c.state} (id ${c.id}), waiting for the result…`);
  }

  function actionBody(form) {
    const params = {};
    for (const input of $$("input, select", form)) {
      if (!input.name.startsWith("p.")) continue;
      const name = input.name.slice(2);
      if (input.type === "checkbox") params[name] = input.checked;
      else if (input.value.trim() === "") continue;
      else if (input.type === "number") params[name] = Number(input.value);
      else params[name] = input.value;
    }
    return { device: form.dataset.device, action: form.dataset.action, params };
  }

  function wireForms() {
    for (const form of $$("form.action")) {
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        sendCommand(actionBody(form), $("#result"), `${form.dataset.device} ${form.dataset.action}`);
      });
    }
    const nl = $("#nl-form");
    nl.addEventListener("submit", (ev) => {
      ev.preventDefault();
      const text = nl.elements.text.value.trim();
      if (text) sendCommand({ text }, $("#nl-result"), `"${text}"`);
    });
    $("#filters").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = filters();
      const q = new URLSearchParams();
      if (f.state) q.set("state", f.state);
      if (f.device) q.set("device", f.device);
      history.replaceState(null, "", `/${q.toString() ? `?${q}` : ""}#commands`);
      refreshCommands();
    });
    $("#command-table").addEventListener("click", (ev) => {
      const a = ev.target.closest("a.cmd-link");
      if (!a) return;
      ev.preventDefault();
      const row = a.closest("tr");
      toggleDetail(row, row.dataset.commandId);
    });
    for (const form of $$("form.fault")) {
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const name = form.dataset.scenario;
        const box = $("#fault-result");
        const ticket = String(++state.sent);
        box.dataset.ticket = ticket;
        showPending(box, `${name}: starting…`);
        const r = await api("POST", `/api/v1/admin/test/${encodeURIComponent(name)}?duration_s=2`);
        if (box.dataset.ticket !== ticket) return;
        if (r.status === 404 || r.status === 405) showResult(box, `${name}: unavailable (${r.status}): this daemon has no fault-scenario endpoint`, "muted", "http");
        else if (!r.ok) showResult(box, `${name}: ${describeError(r)}`, "bad", "http");
        else showResult(box, `${name}: ${r.status}\n${JSON.stringify(r.data, null, 2)}`, "ok", "http");
      });
    }
  }

  // --- providers ----------------------------------------------------------------------------------------------------

  function table(rows) {
    const keys = [];
    for (const r of rows) for (const k of Object.keys(r)) if (!keys.includes(k)) keys.push(k);
    const cell = (v) => (v !== null && typeof v === "object" ? JSON.stringify(v) : v === null || v === undefined ? "—" : String(v));
    return el("table", {}, el("thead", {}, el("tr", {}, ...keys.map((k) => el("th", { text: k })))),
      el("tbody", {}, ...rows.map((r) => el("tr", {}, ...keys.map((k) => el("td", { text: cell(r[k]) }))))));
  }

  function asRows(v) {
    if (Array.isArray(v)) return v.map((x) => (x && typeof x === "object" ? x : { value: x }));
    if (v && typeof v === "object") return Object.entries(v).map(([name, x]) => (x && typeof x === "object" ? { name, ...x } : { name, value: x }));
    return [];
  }

  async function loadProviders() {
    const box = $("#providers-body");
    const r = await api("GET", "/api/v1/providers");
    if (r.status === 404) { box.className = "muted"; box.textContent = "no providers configured"; return; }
    if (!r.ok) { box.className = "bad"; box.textContent = describeError(r); return; }
    const data = r.data || {};
    const providers = asRows(data.providers !== undefined ? data.providers : data);
    const parts = [providers.length ? table(providers) : el("p", { class: "muted", text: "no providers configured" })];
    const titles = { connectivity: "Connectivity breaker", cache: "Prompt cache", spend: "Spend", limiters: "Rate limiters", rate_limits: "Rate limiters" };
    for (const [key, title] of Object.entries(titles)) {
      if (data[key] && typeof data[key] === "object") parts.push(el("h3", { text: title }), table(asRows(data[key])));
    }
    box.className = "";
    box.replaceChildren(...parts);
  }

  // --- live: server-sent events, else polling ------------------------------------------------------------------------

  async function pollOnce() {
    const r = await api("GET", "/api/v1/overview");
    if (r.status === 401) { setLive("off", "logged out: log in again"); return; }
    if (r.ok) applyOverview(r.data);
    await refreshCommands();
    await loadHistory();
  }

  function startPolling(reason) {
    setLive("polling", `polling every ${POLL_MS / 1000} s (${reason})`);
    if (state.pollTimer) return;
    state.pollTimer = setInterval(pollOnce, POLL_MS);
    pollOnce();
  }

  function stopPolling() {
    if (state.pollTimer) clearInterval(state.pollTimer);
    state.pollTimer = null;
  }

  function connect() {
    if (!window.EventSource) { startPolling("no EventSource"); return; }
    const es = new EventSource("/api/v1/events/stream");
    state.source = es;
    es.onopen = () => { stopPolling(); setLive("sse", "live"); };
    es.onerror = () => {
      if (es.readyState === EventSource.CLOSED) { state.source = null; startPolling("stream refused"); setTimeout(connect, 15000); }
      else startPolling("reconnecting");
    };
    es.addEventListener("status", (ev) => applyOverview(JSON.parse(ev.data)));
    es.addEventListener("command", (ev) => { const c = JSON.parse(ev.data); upsertCommand(c); noteRecord(c, "sse"); });
    es.addEventListener("history", (ev) => {
      samples.push(JSON.parse(ev.data));
      const cutoff = Date.now() / 1000 - 3600;
      samples = samples.filter((s) => s.ts >= cutoff);
      drawCharts();
    });
    es.addEventListener("resync", () => { refreshCommands(); loadHistory(); });
  }

  wireForms();
  drawCharts();
  loadHistory();
  loadTelemetry();
  loadProviders();
  setInterval(loadProviders, 15000);
  connect();
})();
