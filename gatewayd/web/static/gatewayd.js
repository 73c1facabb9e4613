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
    devices: {},             // device -> its latest description (fields and their units, actions, view)
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

  function fmt(n) {
    if (n === null || n === undefined || Number.isNaN(n)) return "—";
    if (Number.isInteger(n)) return String(n);
    const a = Math.abs(n);
    return a >= 100 ? n.toFixed(0) : a >= 10 ? n.toFixed(1) : n.toFixed(2);
  }

  // Values and errors in words, as gatewayd/web/present.py writes them on the server (number, value_text, pairs,
  // plain_error): the page never shows JSON or the C library's errno tags.
  function number(v) {
    if (Number.isInteger(v)) return String(v);
    return Math.abs(v) < 10 ? v.toFixed(2) : v.toFixed(1);
  }

  function valueText(v, meta) {
    const unit = meta && meta.unit;
    if (v === null || v === undefined) return "—";
    if (typeof v === "boolean") return v ? "yes" : "no";
    if (typeof v === "number") return unit ? `${number(v)} ${unit}` : number(v);
    if (Array.isArray(v)) return v.map((x) => valueText(x)).join(", ");
    if (typeof v === "object") return pairs(v);
    return unit ? `${v} ${unit}` : String(v);
  }

  // A field's name as its profile describes it, else its key in words (present.label).
  function label(key, meta) {
    if (meta && meta.description) return meta.description;
    const words = key.replace(/_/g, " ").trim();
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function pairs(obj, meta) {
    if (!obj || typeof obj !== "object") return obj === null || obj === undefined ? "" : String(obj);
    return Object.entries(obj).map(([k, v]) => `${k.replace(/_/g, " ")} ${valueText(v, (meta || {})[k])}`).join(", ");
  }

  function plainError(text) {
    if (!text) return "";
    let m = /could not open port (\S+?):.*No such file or directory/i.exec(text);
    if (m) return `the serial port ${m[1]} is not there (adapter unplugged or renamed?)`;
    m = /could not open port (\S+?):.*Permission denied/i.exec(text);
    if (m) return `no permission to open the serial port ${m[1]} (is the service user in the dialout group?)`;
    m = /cannot connect to (\S+?): .*Connection refused/i.exec(text);
    if (m) return `nothing answers at ${m[1]} (connection refused)`;
    m = /cannot connect to (\S+?): .*(Name or service not known|Temporary failure)/i.exec(text);
    if (m) return `the host name in ${m[1]} is not known (DNS)`;
    return String(text).replace(/\[Errno -?\d+\]\s*/g, "").trim();
  }

  // A nested object as a definition list (a command's result, how it was understood, a drill's report).
  function pairsList(obj) {
    const dl = el("dl", { class: "pairs" });
    const add = (key, v) => {
      if (v !== null && typeof v === "object" && !Array.isArray(v)) {
        for (const [k, x] of Object.entries(v)) add(key ? `${key} ${k}` : k, x);
      } else {
        dl.append(el("dt", { text: key.replace(/_/g, " ") }), el("dd", { text: typeof v === "string" ? plainError(v) : valueText(v) }));
      }
    };
    add("", obj);
    return dl;
  }

  function when(iso) { return (iso || "").replace("T", " ").split(".")[0].replace(/Z$/, ""); }

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
    return e ? `refused (${r.status} ${e.code}): ${plainError(e.message)}` : `HTTP ${r.status}`;
  }

  function setLive(mode, text) {
    document.body.dataset.live = mode;
    const badge = $("#live-state");
    badge.textContent = text;
    badge.className = `badge ${mode === "sse" ? "ok" : mode === "polling" ? "warn" : "muted"}`;
  }

  // --- overview and devices -------------------------------------------------------------------------------------
  // The server says what the state means (gatewayd/web/present.py): the verdict, the tiles and each device's texts
  // come ready in the overview; this places them.

  function applySummary(summary) {
    if (!summary) return;
    const v = summary.verdict, box = $("#verdict");
    box.dataset.level = v.level;
    $(".title", box).textContent = v.title;
    $(".detail", box).textContent = v.detail;
    const list = $("#overview .tiles");
    for (const t of summary.tiles) {
      let tile = $(`.tile[data-k="${CSS.escape(t.key)}"]`, list);
      if (!tile) { tile = el("div", { class: "tile", "data-k": t.key }, el("dt"), el("dd", { class: "text" })); list.append(tile); }
      tile.dataset.level = t.level;
      $("dt", tile).textContent = t.label;
      $(".text", tile).textContent = t.text;
      let why = $(".why", tile);
      if (t.why && t.level !== "ok") {
        if (!why) { why = el("dd", { class: "why" }); tile.append(why); }
        why.textContent = t.why;
      } else if (why) why.remove();
    }
  }

  function applyOverview(ov) {
    applySummary(ov.summary);
    for (const d of ov.devices || []) { state.devices[d.name] = d; applyDevice(d); }
    if (ov.limiters) applyLimiters(ov.limiters);
    if (state.accepted !== null && ov.commands_accepted !== state.accepted) scheduleCommandRefresh();
    state.accepted = ov.commands_accepted;
  }

  function reading(r) {
    return el("div", { class: "reading", "data-key": r.key }, el("dt", { text: r.label }), el("dd", { text: r.text }));
  }

  function applyChannels(card, channels) {
    for (const ch of channels || []) {
      const form = $(`form.channel[data-channel="${ch.channel}"]`, card);
      if (!form) continue;
      form.dataset.state = ch.state;
      form.dataset.action = ch.action;
      form.elements.action.value = ch.action;
      $(".ch-state", form).textContent = ch.state;
      const button = $("button", form);
      button.textContent = ch.button;
      button.setAttribute("aria-label", `${ch.button} channel ${ch.channel}${ch.label ? `, ${ch.label}` : ""}`);
    }
  }

  function applyDevice(d) {
    const card = $(`article.device[data-device="${CSS.escape(d.name)}"]`);
    const v = d.view;
    if (!card || !v) return;
    card.dataset.level = v.level;
    const badge = $(".avail .badge", card);
    badge.dataset.level = v.level;
    badge.textContent = v.badge;
    $(".readings", card).replaceChildren(...v.readings.map(reading));
    $(".as-of", card).textContent = v.as_of;
    $(".last-seen", card).textContent = v.seen;
    const problem = $(".last-error", card);
    problem.textContent = v.problem;
    problem.dataset.level = v.problem_level;
    $(".breaker", card).textContent = v.circuit;
    $(".dqueue", card).textContent = v.queue;
    $(".scheduled", card).textContent = v.scheduled;
    applyChannels(card, v.channels);
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
    const summary = $("#limiters summary");
    if (summary) summary.textContent = `Rate limiters (${names.length})`;
    box.replaceChildren(el("table", { id: "limiter-table", class: "stack" },
      el("thead", {}, el("tr", {}, el("th", { scope: "col", text: "Limiter" }), ...cols.map((c) => el("th", { scope: "col", text: c })))),
      el("tbody", {}, ...names.map((n) => el("tr", {}, el("td", { "data-label": "Limiter", text: n }),
        ...cols.map((c) => el("td", { "data-label": c, text: limiters[n][c] === undefined ? "—" : String(Math.round(limiters[n][c])) })))))));
  }

  // --- charts -----------------------------------------------------------------------------------------------------

  function numeric(v) {
    if (typeof v === "boolean") return v ? 1 : 0;
    return typeof v === "number" && Number.isFinite(v) ? v : null;
  }

  // A small chart per reading the profile declares as a number, captioned with its name and unit; a value the
  // profile does not describe (a frame counter) is not charted.
  function drawSparks(device) {
    const box = $(`.sparks[data-device="${CSS.escape(device)}"]`);
    const ring = state.readings[device] || [];
    const fields = (state.devices[device] || {}).fields;
    if (!box || !ring.length || !fields) return;
    state.lastReading[device] = ring[ring.length - 1].at;
    const keys = Object.keys(fields).filter((k) => ["int", "float"].includes(fields[k].type)
      && ring.some((r) => numeric((r.values || {})[k]) !== null));
    box.replaceChildren(...keys.map((key) => {
      const meta = fields[key];
      const name = label(key, meta);
      const ys = ring.map((r) => numeric((r.values || {})[key]));
      const last = ys.filter((y) => y !== null).pop();
      const s = svg("svg", { viewBox: "0 0 120 28", class: "spark", role: "img", "aria-label": `${name}, recent readings` });
      line(s, ys.map((y, i) => [i, y]), { w: 120, h: 28, pad: 2, xmin: 0, xmax: Math.max(1, ys.length - 1) });
      return el("figure", { class: "spark", "data-key": key }, s, el("figcaption", { text: `${name} ${valueText(last, meta)}` }));
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
    const only = points.filter((p) => p[1] !== null);
    if (only.length === 1) s.append(svg("circle", { cx: sx(only[0][0]).toFixed(1), cy: sy(only[0][1]).toFixed(1), r: 2, class: "dot" }));
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
      line(s, pts, { w, h, pad, top, xmin: now - 3600, xmax: now, ymin: 0 });
      const ys = pts.map((p) => p[1]).filter((y) => y !== null);
      const last = ys.length ? ys[ys.length - 1] : null;
      const label = svg("text", { x: pad, y: 11, class: "label" });
      label.textContent = ys.length ? `now ${fmt(last)} · highest ${fmt(Math.max(...ys))}` : "no samples yet";
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

  function paramUnits(c) {
    const action = ((state.devices[c.device] || {}).actions || {})[c.action] || {};
    const props = (action.params || {}).properties || {};
    return Object.fromEntries(Object.entries(props).map(([k, p]) => [k, { unit: p["x-unit"] }]));
  }

  // A command's result or error in words (as page.py's outcome()).
  function outcome(c) {
    if (c.error) return plainError(c.error.message || c.error.code);
    return pairs(c.result, (state.devices[c.device] || {}).fields);
  }

  function commandRow(c) {
    const link = el("a", { class: "cmd-link", href: `/api/v1/commands/${encodeURIComponent(c.id)}` }, el("code", { text: c.id.slice(0, 16) }));
    const who = `${c.source || ""}${c.user ? ` · ${c.user}` : ""} · ${c.priority}`;
    return el("tr", { "data-command-id": c.id },
      el("td", { "data-label": "Id" }, link), el("td", { "data-label": "Received (UTC)", text: when(c.created_at) }),
      el("td", { "data-label": "Device", text: c.device }),
      el("td", { "data-label": "Action" }, `${c.action} `, el("span", { class: "params", text: pairs(c.params, paramUnits(c)) })),
      el("td", { "data-label": "From", text: who }),
      el("td", { "data-label": "State", class: `cstate ${STATE_CLASS[c.state] || ""}`, text: c.state }),
      el("td", { "data-label": "Result", class: "outcome", text: outcome(c) }));
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
    tbody.replaceChildren(...(rows.length ? rows : [el("tr", { class: "empty" }, el("td", { colspan: "7", class: "muted", text: "no commands" }))]));
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
    const cell = el("td", { colspan: "7" });
    if (!r.ok) cell.textContent = describeError(r);
    else {
      const c = r.data;
      const list = el("ol", { class: "transitions" }, ...(c.transitions || []).map((t) =>
        el("li", {}, el("b", { text: t.state }), ` ${when(t.at)}`, t.detail ? ` — ${plainError(t.detail)}` : "")));
      const how = c.interpretation || c.interpreted || null;
      const what = c.error || c.result;
      cell.append(el("div", {}, el("h4", { text: "Steps (UTC)" }), list),
        el("div", {}, el("h4", { text: "Understood" }),
          how ? pairsList(how)
            : el("p", { class: "muted", text: `a structured command from ${c.source}${c.user ? ` (${c.user})` : ""}: nothing to interpret` })),
        el("div", {}, el("h4", { text: c.error ? "Error" : "Result" }),
          what ? pairsList(what) : el("p", { class: "muted", text: "none yet" })));
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

  // A drill's report in words: how it ended, what was done, what was seen ("detected unplug after 0.02 s").
  function reportText(name, rep) {
    const seconds = (k, v) => (k.endsWith("_s") && typeof v === "number" ? [k.slice(0, -2), `${number(v)} s`] : [k, v]);
    const seen = Object.entries(rep.observed || {}).map(([k, v]) => {
      const [key, val] = seconds(k, v);
      return `  ${key.replace(/_/g, " ")}: ${typeof val === "string" ? plainError(val) : valueText(val)}`;
    });
    return [`${name}: ${rep.recovered ? "recovered" : "NOT recovered"}, ${rep.healthy_after ? "healthy after" : "NOT healthy after"}`
      + ` (took ${number(rep.took_s || 0)} s)`, ...(rep.actions || []).map((a) => `  done: ${a}`), ...seen].join("\n");
  }

  function wireForms() {
    // A relay board's channel is a toggle: its form carries the action pressing it does now (on3 or off3).
    for (const form of $$("form.channel")) {
      form.addEventListener("submit", (ev) => {
        ev.preventDefault();
        const label = $(".ch-label", form).textContent;
        sendCommand({ device: form.dataset.device, action: form.dataset.action, params: {} }, $("#result"),
          `${form.dataset.device} ${form.dataset.action} (channel ${form.dataset.channel}, ${label})`);
      });
    }
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
        else showResult(box, reportText(name, r.data), r.data.recovered === false ? "bad" : "ok", "http");
      });
    }
  }

  // --- providers ----------------------------------------------------------------------------------------------------

  // The interpreter in a technician's terms: who answers sentences now, each provider's state, the cache and spend.
  function providerRow(p) {
    const h = p.health || {}, b = p.breaker || {}, rpm = (p.limits || {}).rpm || {};
    const status = p.active ? `active, priority ${p.priority}` : `off: ${p.inactive_reason || "inactive"}`;
    const health = !p.active ? "—" : h.ok === true ? `ok${h.latency_ms !== null && h.latency_ms !== undefined ? `, ${Math.round(h.latency_ms)} ms` : ""}`
      : h.ok === false ? `failing: ${plainError(h.error) || "no answer"}` : "not checked yet";
    const breaker = b.state === "open" ? `open, retried in ${Math.round(b.retry_after_s || 0)} s` : b.state === "half_open" ? "half-open: probing" : "closed";
    const cells = [
      ["Provider", el("span", {}, el("b", { text: p.name }), el("span", { class: "muted", text: ` ${p.model || ""}` }))],
      ["Status", status], ["Health", health], ["Breaker", breaker],
      ["Requests/min", rpm.limit ? `${rpm.limit - (rpm.available ?? rpm.limit)} of ${rpm.limit} used` : "—"],
      ["Spend today", number(p.spend_today || 0)],
    ];
    return el("tr", { "data-provider": p.name }, ...cells.map(([label, v]) =>
      el("td", { "data-label": label }, v instanceof Node ? v : String(v))));
  }

  function interpreterLines(data, active) {
    const lines = [];
    const cache = data.cache || {}, spend = data.spend || {}, local = data.local || {};
    if (cache.enabled === false) lines.push("Prompt cache: off.");
    else if (!active.length && !cache.entries) lines.push("Prompt cache: empty, and stays so while no provider is active (it keeps providers' answers only).");
    else {
      const asked = (cache.hits || 0) + (cache.misses || 0);
      lines.push(`Prompt cache: ${cache.entries ?? 0} answers kept; ${cache.hits || 0} of ${asked} sentences answered from it.`);
    }
    if (spend.daily_budget !== undefined) {
      lines.push(`Spend today: ${number(spend.today || 0)} of ${number(spend.daily_budget)} (daily budget)${spend.exhausted ? ": spent, only free providers and the local rules until midnight UTC" : ""}.`);
    }
    if (active.some((p) => p.cloud) && data.connectivity && data.connectivity.state === "open") {
      lines.push(`Internet: unreachable, cloud providers skipped for ${Math.round(data.connectivity.retry_after_s || 0)} s.`);
    }
    if (local.ready !== undefined) {
      const can = local.can_do || [];
      lines.push(local.ready ? `Local rules: ready, ${can.length} commands understood${can.length ? ` (e.g. "${can[can.length > 15 ? 15 : 0].example}")` : ""}.` : "Local rules: not ready.");
    }
    return lines.map((t) => el("p", { text: t }));
  }

  async function loadProviders() {
    const box = $("#providers-body");
    const r = await api("GET", "/api/v1/providers");
    if (r.status === 404) { box.className = "muted"; box.textContent = "Natural-language commands are not available on this gateway."; return; }
    if (!r.ok) { box.className = "bad"; box.textContent = describeError(r); return; }
    const data = r.data || {};
    const providers = Array.isArray(data.providers) ? data.providers : [];
    const active = providers.filter((p) => p.active);
    let lead;
    if (data.enabled === false) lead = "Natural-language commands are off ([interpret] enabled = false in the config).";
    else if (!providers.length) lead = "No language provider is configured: the local rules answer every sentence, on this gateway.";
    else if (!active.length) lead = "No language provider is active: the local rules answer every sentence, on this gateway, with no network. To use a provider, set its API key in the daemon's environment and restart it.";
    else lead = `${active.length} of ${providers.length} providers active; the local rules answer when they cannot.`;
    const parts = [el("p", { class: "lead", text: lead })];
    if (providers.length) {
      const cols = ["Provider", "Status", "Health", "Breaker", "Requests/min", "Spend today"];
      parts.push(el("table", { id: "provider-table", class: "stack" },
        el("thead", {}, el("tr", {}, ...cols.map((c) => el("th", { scope: "col", text: c })))),
        el("tbody", {}, ...providers.map(providerRow))));
    }
    if (data.enabled !== false) parts.push(...interpreterLines(data, active));
    box.className = "";
    box.replaceChildren(...parts);
    box.dataset.state = "done";
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

  function start() {
    wireForms();
    drawCharts();
    loadHistory();
    loadTelemetry();
    loadProviders();
    setInterval(loadProviders, 15000);
    connect();
  }

  // After the first paint: the page the server rendered is complete and shows at once; the live parts follow and
  // do not compete with it for the CPU. (A form pressed before then posts as it does without scripts; a tab opened
  // in the background, which paints nothing, starts after half a second.)
  function afterFirstPaint(fn) {
    let done = false;
    const go = () => { if (!done) { done = true; fn(); } };
    setTimeout(go, 500);
    try {
      new PerformanceObserver((list, observer) => { observer.disconnect(); setTimeout(go, 0); })
        .observe({ type: "paint", buffered: true });
    } catch (err) {
      requestAnimationFrame(() => setTimeout(go, 0));
    }
  }
  afterFirstPaint(start);
})();
