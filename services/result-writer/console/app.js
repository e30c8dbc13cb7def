// The triage console. Plain JavaScript, no dependencies: the read API under /v1, the live
// stream read with fetch (EventSource cannot send an Authorization header) and resumed with
// Last-Event-ID, and the console's own /console/api for dead letters, lag, throughput and
// rate-limit waits, and the key's tenant.
"use strict";

const KEY_STORAGE = "triage-console-key";
const PAGE_SIZE = 50;
const state = {
  key: null, tenant: null, admin: false, settings: null,
  filters: {}, rows: new Map(), cursor: null, selected: null,
  stream: null, lastEventId: null, retryMs: 500, arrivals: [], lagSeries: [], healthTimer: null,
};

const $ = (id) => document.getElementById(id);
const el = (tag, attrs, ...children) => {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "class") node.className = value; else if (name === "text") node.textContent = value; else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
};

class ApiProblem extends Error {
  constructor(status, detail) { super(detail); this.status = status; }
}

async function api(path, options = {}) {
  const headers = Object.assign({ "Authorization": "Bearer " + state.key }, options.headers || {});
  let response;
  try {
    response = await fetch(path, Object.assign({}, options, { headers }));
  } catch (error) {
    throw new ApiProblem(0, "The console's server does not answer. Check your connection and retry.");
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.status + " " + response.statusText;
    throw new ApiProblem(response.status, detail);
  }
  return body;
}

function banner(message) {
  const node = $("banner");
  node.textContent = message || "";
  node.hidden = !message;
}

function handleProblem(error, statusNode) {
  if (error instanceof ApiProblem && error.status === 401) {
    signOut("Your API key is no longer accepted. Sign in again.");
    return;
  }
  const text = error instanceof ApiProblem ? error.message : "Something went wrong: " + error;
  if (statusNode) statusNode.textContent = text; else banner(text);
}

// ---------- sign in ----------

async function signIn(key) {
  state.key = key;
  const who = await api("/console/api/whoami");
  state.tenant = who.tenant;
  state.admin = who.admin;
  state.settings = await api("/console/settings.json");
  sessionStorage.setItem(KEY_STORAGE, key);
  $("tenant-name").textContent = who.tenant + (who.admin ? " (admin)" : "");
  $("login").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  fillSelect($("f-category"), state.settings.categories, true);
  fillSelect($("f-priority"), state.settings.priorities, true);
  fillSelect($("c-category"), state.settings.categories, false);
  fillSelect($("c-priority"), state.settings.priorities, false);
  route();
}

function signOut(message) {
  sessionStorage.removeItem(KEY_STORAGE);
  stopStream();
  state.key = null;
  state.rows.clear();
  $("feed-body").replaceChildren();
  for (const page of document.querySelectorAll(".page")) page.hidden = true;
  $("nav").hidden = true;
  $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("api-key").value = "";
  $("api-key").focus();
}

function fillSelect(select, values, withAny) {
  const keep = withAny ? [select.options[0]] : [];
  select.replaceChildren(...keep, ...values.map((value) => el("option", { value, text: value })));
}

// ---------- pages ----------

function route() {
  if (!state.key) return;
  const page = (location.hash || "#feed").slice(1);
  const known = ["feed", "accuracy", "dead-letters", "health"];
  const current = known.includes(page) ? page : "feed";
  for (const name of known) $("page-" + name).hidden = name !== current;
  for (const link of document.querySelectorAll("#nav a")) {
    if (link.dataset.page === current) link.setAttribute("aria-current", "page"); else link.removeAttribute("aria-current");
  }
  banner("");
  clearInterval(state.healthTimer);
  if (current === "feed" && !state.stream) reloadFeed();
  if (current === "accuracy") loadAccuracy();
  if (current === "dead-letters") loadDeadLetters();
  if (current === "health") { loadHealth(); state.healthTimer = setInterval(loadHealth, 5000); }
}

// ---------- feed ----------

function readFilters() {
  const local = (id) => $(id).value ? new Date($(id).value).toISOString() : null;
  const confidence = $("f-confidence").value;
  const below = confidence === "" ? null : Number(confidence);
  if (below !== null && !(below >= 0 && below <= 1)) throw new Error("Confidence must be a number from 0 to 1.");
  return { category: $("f-category").value || null, priority: $("f-priority").value || null,
    since: local("f-since"), until: local("f-until"), confidence_below: below };
}

function matches(triage) {
  const f = state.filters;
  if (f.category && triage.category !== f.category) return false;
  if (f.priority && triage.priority !== f.priority) return false;
  if (f.since && triage.triaged_at < f.since) return false;
  if (f.until && triage.triaged_at >= f.until) return false;
  if (f.confidence_below !== null && f.confidence_below !== undefined && !(triage.confidence < f.confidence_below)) return false;
  return true;
}

function query(extra) {
  const params = new URLSearchParams();
  for (const [name, value] of Object.entries(Object.assign({}, state.filters, extra))) {
    if (value !== null && value !== undefined && value !== "") params.set(name, value);
  }
  return params.toString();
}

async function reloadFeed() {
  stopStream();
  state.rows.clear();
  state.cursor = null;
  $("feed-body").replaceChildren();
  // Subscribe first, so that nothing committed while the first page loads is missed.
  startStream();
  await loadPage();
}

async function loadPage() {
  const older = $("older");
  older.disabled = true;
  try {
    const page = await api("/v1/triage?" + query({ limit: PAGE_SIZE, cursor: state.cursor }));
    for (const triage of page.items) addRow(triage, false);
    state.cursor = page.next_cursor || null;
    older.hidden = !state.cursor;
  } catch (error) {
    handleProblem(error, $("stream-status"));
  } finally {
    older.disabled = false;
    $("feed-empty").hidden = state.rows.size > 0;
  }
}

const rowKey = (t) => t.ticket_id + "\u0000" + t.prompt_version;

function addRow(triage, live) {
  const key = rowKey(triage);
  const existing = state.rows.get(key);
  const cells = [
    el("td", { text: new Date(triage.triaged_at).toLocaleString() }),
    el("td", { text: triage.ticket_id }),
    el("td", { text: triage.category }),
    el("td", {}, el("span", { class: "pill " + triage.priority, text: triage.priority })),
    el("td", { class: triage.confidence < 0.6 ? "low-conf" : "", text: triage.confidence.toFixed(2) }),
    el("td", { text: triage.prompt_version }),
  ];
  const row = el("tr", { tabindex: "0", "data-ticket": triage.ticket_id, "aria-selected": "false" }, ...cells);
  row.addEventListener("click", () => openTicket(key));
  row.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); openTicket(key); }
    if (event.key === "ArrowDown" && row.nextElementSibling) { event.preventDefault(); row.nextElementSibling.focus(); }
    if (event.key === "ArrowUp" && row.previousElementSibling) { event.preventDefault(); row.previousElementSibling.focus(); }
  });
  state.rows.set(key, { triage, row });
  if (existing) { existing.row.replaceWith(row); }
  else if (live) { row.classList.add("new"); $("feed-body").prepend(row); }
  else { $("feed-body").append(row); }
  $("feed-empty").hidden = true;
  if (state.selected === key) { row.setAttribute("aria-selected", "true"); showTicket(triage); }
}

// ---------- live stream ----------

function stopStream() {
  if (state.stream) state.stream.abort();
  state.stream = null;
}

function startStream() {
  const controller = new AbortController();
  state.stream = controller;
  state.lastEventId = null;
  connect(controller);
}

async function connect(controller) {
  const status = $("stream-status");
  const headers = { "Authorization": "Bearer " + state.key, "Accept": "text/event-stream" };
  if (state.lastEventId) headers["Last-Event-ID"] = state.lastEventId;
  try {
    const response = await fetch("/v1/triage/stream", { headers, signal: controller.signal });
    if (response.status === 401) { signOut("Your API key is no longer accepted. Sign in again."); return; }
    if (response.status === 400 && state.lastEventId) {
      // The resume point is not known any more: start afresh rather than show a stale feed.
      status.textContent = "The live stream could not resume; reloading the feed.";
      if (state.stream === controller) reloadFeed();
      return;
    }
    if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
    status.textContent = "Live: new triages appear as they are committed.";
    state.retryMs = 500;
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        handleEvent(block);
      }
    }
    throw new Error("the stream ended");
  } catch (error) {
    if (controller.signal.aborted || state.stream !== controller) return;
    status.textContent = "Live stream interrupted; reconnecting in " + Math.round(state.retryMs / 1000 * 10) / 10 + " s…";
    setTimeout(() => { if (state.stream === controller) connect(controller); }, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 15000);
  }
}

function handleEvent(block) {
  let event = "message", data = "", id = null;
  for (const line of block.split(/\r?\n/)) {
    if (line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "data") data += (data ? "\n" : "") + value;
    else if (field === "id") id = value;
  }
  if (id) state.lastEventId = id;
  if (event === "triage" && data) {
    const triage = JSON.parse(data);
    state.arrivals.push(Date.now());
    if (matches(triage)) addRow(triage, true);
  } else if (event === "lagged") {
    $("stream-status").textContent = "Some triages arrived faster than this page could show them; use Load older or reload to see all.";
  }
}

// ---------- ticket view and corrections ----------

function openTicket(key) {
  const entry = state.rows.get(key);
  if (!entry) return;
  for (const { row } of state.rows.values()) row.setAttribute("aria-selected", "false");
  entry.row.setAttribute("aria-selected", "true");
  state.selected = key;
  showTicket(entry.triage);
  $("correct-status").textContent = "";
  $("copy-status").textContent = "";
  loadFeedback(entry.triage);
  $("ticket-title").focus({ preventScroll: true });
}

function showTicket(t) {
  $("ticket").hidden = false;
  document.querySelector(".split").classList.add("with-ticket");
  $("ticket-title").textContent = "Ticket " + t.ticket_id;
  $("t-category").textContent = t.category;
  $("t-priority").textContent = t.priority;
  $("t-confidence").textContent = t.confidence.toFixed(2);
  $("t-reply").textContent = t.suggested_reply || "(no suggested reply)";
  $("t-model").textContent = t.model;
  $("t-prompt").textContent = t.prompt_version;
  $("t-tokens").textContent = t.prompt_tokens + " prompt + " + t.completion_tokens + " completion";
  $("t-cost").textContent = "$" + t.cost_usd.toFixed(6);
  const latency = t.accepted_at ? (new Date(t.triaged_at) - new Date(t.accepted_at)) : null;
  $("t-latency").textContent = latency === null ? "unknown" : (latency / 1000).toFixed(2) + " s from acceptance to triage";
  $("t-wait").textContent = describeWait(t.rate_limit_wait_ms);
  $("t-note").textContent = t.provider_note || "—";
  $("t-subject").textContent = t.subject || "(no subject recorded)";
  $("t-excerpt").textContent = t.excerpt || "(no description recorded)";
  showTrace(t.trace_id);
  $("c-category").value = t.category;
  $("c-priority").value = t.priority;
}

// How long the task waited for rate limits (the shared budget, the tenant's quota, provider 429s).
function describeWait(ms) {
  if (ms === undefined || ms === null) return "unknown";
  if (ms === 0) return "none";
  return duration(ms) + " waiting for rate limits (part of the latency)";
}

const duration = (ms) => ms < 1000 ? ms + " ms" : (ms / 1000).toFixed(ms < 10000 ? 2 : 1) + " s";

// The trace id, linked to the configured trace UI when there is one.
function showTrace(traceId) {
  const cell = $("t-trace");
  cell.replaceChildren();
  if (!traceId) { cell.textContent = "—"; return; }
  const template = state.settings.trace_url;
  if (!template) { cell.textContent = traceId; return; }
  const link = document.createElement("a");
  link.href = template.replaceAll("{trace_id}", encodeURIComponent(traceId));
  link.target = "_blank";
  link.rel = "noopener noreferrer";
  link.textContent = traceId;
  link.id = "t-trace-link";
  cell.append(link);
}

async function loadFeedback(t) {
  try {
    const list = await api("/v1/tickets/" + encodeURIComponent(t.ticket_id) + "/feedback");
    const mine = list.find((f) => f.prompt_version === t.prompt_version);
    if (mine) {
      $("c-category").value = mine.category;
      $("c-priority").value = mine.priority;
      for (const radio of document.querySelectorAll("input[name=reply]")) radio.checked = radio.value === mine.reply;
      $("correct-status").textContent = "Corrected " + new Date(mine.corrected_at).toLocaleString() + ".";
    } else {
      for (const radio of document.querySelectorAll("input[name=reply]")) radio.checked = radio.value === "unset";
    }
  } catch (error) { handleProblem(error, $("correct-status")); }
}

async function saveCorrection(accept) {
  const entry = state.rows.get(state.selected);
  if (!entry) return;
  const t = entry.triage;
  const reply = (document.querySelector("input[name=reply]:checked") || { value: "unset" }).value;
  const body = { prompt_version: t.prompt_version,
    category: accept ? t.category : $("c-category").value,
    priority: accept ? t.priority : $("c-priority").value, reply };
  const status = $("correct-status");
  status.textContent = "Saving…";
  try {
    const stored = await api("/v1/tickets/" + encodeURIComponent(t.ticket_id) + "/feedback", {
      method: "PUT", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    status.textContent = (stored.category === stored.predicted_category && stored.priority === stored.predicted_priority)
      ? "Saved: triage accepted." : "Saved: corrected to " + stored.category + " / " + stored.priority + ".";
  } catch (error) { handleProblem(error, status); }
}

async function copyReply() {
  const text = $("t-reply").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-status").textContent = "Copied.";
  } catch (error) {
    // No clipboard permission (e.g. not a secure origin): select the text for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents($("t-reply"));
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
    $("copy-status").textContent = "Selected: press Ctrl+C to copy.";
  }
}

// ---------- accuracy ----------

const percent = (value) => (value * 100).toFixed(1) + " %";

async function loadAccuracy() {
  const status = $("accuracy-status");
  const days = Number($("a-window").value);
  const since = new Date(Date.now() - days * 86400000).toISOString();
  status.textContent = "Loading…";
  try {
    const agreement = await api("/v1/feedback/agreement?" + new URLSearchParams({ since }));
    status.textContent = agreement.corrections === 0
      ? "No corrections in this window yet. Accept or correct triages in the feed to measure them."
      : agreement.corrections + " corrections since " + new Date(agreement.since).toLocaleString() + ".";
    const fill = (table, rows) => table.tBodies[0].replaceChildren(...rows.map((r) => el("tr", {},
      el("th", { scope: "row", text: r.key }), el("td", { text: String(r.corrections) }),
      el("td", { text: percent(r.accuracy) }), el("td", { text: percent(r.priority_accuracy) }))));
    fill($("by-version"), agreement.by_prompt_version);
    fill($("by-category"), agreement.by_category);
    const versions = agreement.by_prompt_version.map((r) => r.key);
    const chosen = versions.includes($("a-version").value) ? $("a-version").value : versions[versions.length - 1];
    $("a-version").replaceChildren(...versions.map((v) => el("option", { value: v, text: v })));
    if (chosen) $("a-version").value = chosen;
    drawConfusion(agreement.confusion.filter((c) => c.prompt_version === chosen));
  } catch (error) { handleProblem(error, status); }
}

function drawConfusion(cells) {
  const labels = [...new Set([...state.settings.categories, ...cells.flatMap((c) => [c.predicted, c.corrected])])];
  const count = (p, c) => (cells.find((x) => x.predicted === p && x.corrected === c) || { count: 0 }).count;
  const table = $("confusion");
  table.tHead.replaceChildren(el("tr", {}, el("th", { scope: "col", text: "predicted \\ corrected" }),
    ...labels.map((l) => el("th", { scope: "col", text: l }))));
  table.tBodies[0].replaceChildren(...labels.map((p) => el("tr", {}, el("th", { scope: "row", text: p }),
    ...labels.map((c) => { const n = count(p, c); return el("td", { class: n ? (p === c ? "hit" : "miss") : "", text: n ? String(n) : "·" }); }))));
}

// ---------- dead letters ----------

async function loadDeadLetters() {
  const status = $("dl-status");
  const body = $("dl-table").tBodies[0];
  if (!state.settings.dead_letters) { status.textContent = "The dead-letter page is not configured on this server."; return; }
  // Two loads may overlap (sign-in and navigation): only the latest one draws the list.
  const load = (state.deadLetterLoad = (state.deadLetterLoad || 0) + 1);
  status.textContent = "Loading…";
  try {
    const list = await api("/console/api/dead-letters?limit=50");
    if (load !== state.deadLetterLoad) return;
    status.textContent = list.items.length === 0 ? "No recent dead letter for this tenant." : list.items.length + " recent dead letters, newest first.";
    body.replaceChildren(...list.items.map((d) => {
      const button = el("button", { type: "button", class: "secondary", "data-id": d.dead_letter_id, text: "Replay" });
      button.setAttribute("aria-label", "Replay dead letter of ticket " + (d.ticket_id || d.dead_letter_id));
      if (!d.replay_command) button.disabled = true;
      button.addEventListener("click", () => replay(d.dead_letter_id, button));
      return el("tr", { "data-id": d.dead_letter_id },
        el("td", { text: d.last_failure_at ? new Date(d.last_failure_at).toLocaleString() : "unknown" }),
        el("td", { text: d.error_class }), el("td", { text: d.ticket_id || "unknown" }),
        el("td", { text: d.error_message }), el("td", { text: d.excerpt }), el("td", {}, button));
    }));
  } catch (error) { handleProblem(error, status); }
}

async function replay(id, button) {
  const status = $("dl-status");
  button.disabled = true;
  try {
    await api("/console/api/dead-letters/" + encodeURIComponent(id) + "/replay", { method: "POST" });
    status.textContent = "Replayed " + id + ": its task is back on the inference topic.";
  } catch (error) {
    button.disabled = false;
    if (error instanceof ApiProblem && error.status === 403) status.textContent = "Refused: replaying needs an API key with the admin role.";
    else handleProblem(error, status);
  }
}

// ---------- health ----------

async function loadHealth() {
  // The lag is cheap and refreshed every 5 s; the throughput is a query over the tenant's rows of
  // the window, so every 30 s is enough.
  if (Date.now() - (state.throughputAt || 0) >= 30000) loadThroughput();
  const status = $("health-status");
  if (!state.settings.health) { status.textContent = "Consumer lag is not configured on this server (console.lag_url)."; return; }
  try {
    const report = await api("/console/api/lag");
    const groups = Object.values(report.groups || {});
    status.textContent = report.taken_at ? "Offsets read " + new Date(report.taken_at).toLocaleTimeString() + "." : "lag-autoscaler has not read the offsets yet.";
    $("health-table").tBodies[0].replaceChildren(...groups.map((g) => el("tr", {},
      el("th", { scope: "row", text: g.group }), el("td", { text: g.topic }), el("td", { text: String(g.lag) }),
      el("td", { text: g.lag_seconds === null || g.lag_seconds === undefined ? "—" : g.lag_seconds.toFixed(1) + " s" }),
      el("td", { text: g.members === null || g.members === undefined ? "—" : String(g.members) }),
      el("td", { text: (g.status && (g.status.state || g.status)) + (g.error ? ": " + g.error : "") }))));
    const minuteAgo = Date.now() - 60000;
    state.arrivals = state.arrivals.filter((t) => t > minuteAgo);
    state.lagSeries.push({ lag: groups.reduce((sum, g) => sum + g.lag, 0), rate: state.arrivals.length });
    if (state.lagSeries.length > 120) state.lagSeries.shift();
    drawChart();
  } catch (error) { handleProblem(error, status); }
}

function drawChart() {
  const svg = $("chart");
  const ns = "http://www.w3.org/2000/svg";
  // One sample draws as a flat line, not as nothing.
  const points = state.lagSeries.length === 1 ? [state.lagSeries[0], state.lagSeries[0]] : state.lagSeries;
  const width = 600, height = 160, pad = 6;
  const label = (text, y, colour) => {
    const node = document.createElementNS(ns, "text");
    node.setAttribute("x", String(width - pad));
    node.setAttribute("y", String(y));
    node.setAttribute("text-anchor", "end");
    node.setAttribute("fill", colour);
    node.textContent = text;
    return node;
  };
  const line = (values, colour) => {
    const max = Math.max(1, ...values);
    const step = values.length > 1 ? (width - 2 * pad) / (values.length - 1) : 0;
    const path = document.createElementNS(ns, "polyline");
    path.setAttribute("points", values.map((v, i) => (pad + i * step) + "," + (height - pad - (v / max) * (height - 2 * pad))).join(" "));
    path.setAttribute("fill", "none");
    path.setAttribute("stroke", colour);
    path.setAttribute("stroke-width", "2");
    return path;
  };
  const lags = points.map((p) => p.lag), rates = points.map((p) => p.rate);
  svg.replaceChildren(line(lags, "#1d4ed8"), line(rates, "#15803d"),
    label("lag now " + lags[lags.length - 1] + " (top " + Math.max(1, ...lags) + ")", 16, "#1d4ed8"),
    label("triages/min now " + rates[rates.length - 1] + " (top " + Math.max(1, ...rates) + ")", 32, "#15803d"));
}

// The tenant's triages a minute and their rate-limit waits, from the result store.
async function loadThroughput() {
  const summary = $("throughput-summary");
  const minutes = $("tp-window").value;
  // A slow answer for an earlier window must not overwrite a newer one.
  const load = (state.throughputLoad = (state.throughputLoad || 0) + 1);
  state.throughputAt = Date.now();
  try {
    const report = await api("/console/api/throughput?" + new URLSearchParams({ minutes }));
    if (load !== state.throughputLoad) return;
    const window = $("tp-window").selectedOptions[0].textContent;
    summary.textContent = report.triaged === 0
      ? "No triage in the " + window + "."
      : report.triaged + " triages in the " + window + " (" + (report.triaged / report.minutes).toFixed(1) + " a minute); "
        + (report.waited === 0 ? "none waited for rate limits."
          : report.waited + " waited for rate limits, " + duration(report.wait_ms_total) + " in all, p95 wait " + duration(report.wait_ms_p95) + ".");
    const rows = report.buckets.filter((b) => b.triaged > 0).reverse();
    $("throughput-table").tBodies[0].replaceChildren(...rows.map((b) => el("tr", {},
      el("th", { scope: "row", text: minuteText(b.minute) }),
      el("td", { text: String(b.triaged) }), el("td", { text: String(b.waited) }),
      el("td", { text: duration(b.wait_ms_total) }), el("td", { text: duration(b.wait_ms_p95) }))));
    drawThroughput(report.buckets);
  } catch (error) { handleProblem(error, summary); }
}

function drawThroughput(buckets) {
  const svg = $("throughput-chart");
  const ns = "http://www.w3.org/2000/svg";
  const width = 600, height = 120, pad = 6, top = 6;
  const max = Math.max(1, ...buckets.map((b) => b.triaged));
  const slot = (width - 2 * pad) / Math.max(1, buckets.length);
  const bar = (index, value, colour) => {
    const h = (value / max) * (height - top - pad);
    const rect = document.createElementNS(ns, "rect");
    rect.setAttribute("x", String(pad + index * slot + slot * 0.1));
    rect.setAttribute("y", String(height - pad - h));
    rect.setAttribute("width", String(Math.max(0.5, slot * 0.8)));
    rect.setAttribute("height", String(h));
    rect.setAttribute("fill", colour);
    return rect;
  };
  svg.replaceChildren(
    ...buckets.map((b, i) => bar(i, b.triaged, "#15803d")),
    ...buckets.map((b, i) => bar(i, b.waited, "#b45309")));
  // The scale in the caption, not in the SVG: the chart stretches to the page's width and would
  // stretch its text with it.
  const first = buckets[0], last = buckets[buckets.length - 1];
  $("throughput-scale").textContent = first
    ? "; the tallest bar is " + max + " triages, from " + minuteText(first.minute) + " to " + minuteText(last.minute)
    : "";
}

const minuteText = (iso) => new Date(iso).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });

// ---------- wiring ----------

function init() {
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    const error = $("login-error");
    if (!key) { error.textContent = "Enter your API key."; return; }
    error.textContent = "Checking…";
    try { await signIn(key); error.textContent = ""; }
    catch (problem) {
      state.key = null;
      error.textContent = problem instanceof ApiProblem && problem.status === 401
        ? "This API key is not valid. Check it and try again."
        : (problem.message || "Cannot sign in now; retry later.");
    }
  });
  $("logout").addEventListener("click", () => signOut(""));
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    try { state.filters = readFilters(); $("stream-status").textContent = ""; reloadFeed(); }
    catch (error) { $("stream-status").textContent = error.message; }
  });
  $("f-clear").addEventListener("click", () => { $("filters").reset(); state.filters = {}; reloadFeed(); });
  $("older").addEventListener("click", loadPage);
  $("copy-reply").addEventListener("click", copyReply);
  $("accept").addEventListener("click", () => saveCorrection(true));
  $("correct").addEventListener("submit", (event) => { event.preventDefault(); saveCorrection(false); });
  $("accuracy-form").addEventListener("submit", (event) => { event.preventDefault(); loadAccuracy(); });
  $("a-version").addEventListener("change", loadAccuracy);
  $("dl-refresh").addEventListener("click", loadDeadLetters);
  $("tp-window").addEventListener("change", loadThroughput);
  $("throughput-form").addEventListener("submit", (event) => { event.preventDefault(); loadThroughput(); });
  window.addEventListener("hashchange", route);
  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved).catch(() => signOut("Your saved API key is no longer accepted. Sign in again."));
  else $("api-key").focus();
}

document.addEventListener("DOMContentLoaded", init);
