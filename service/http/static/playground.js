// textgen playground: one page, no build step, no other origin. It calls the public API only:
// /openapi.json (limits), /v1/models, /v1/completions, /v1/chat/completions, /v1/inspect.
// The API key lives in this script's memory only (never in storage). docs/playground.md.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  key: null,          // the API key, in memory only
  model: null,        // the served model's name
  mode: "completion", // "completion" | "chat"
  messages: [],       // chat history: {role, content}
  controller: null,   // AbortController of the running request
  maxLogprobs: 5,     // the completion route's logprobs limit (from the schema)
  inspect: null,      // GET /v1/inspect's answer, or null when the model has no inspection graph
  view: null,         // the inspect answer on screen, with the selected layer/head/query/position
  drafts: { completion: null, chat: "" },  // each mode keeps its own prompt text
};

// ---- HTTP ----------------------------------------------------------------------------------------
function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

async function api(path, body, signal) {
  return fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
    cache: "no-store",
  });
}

async function errorMessage(resp) {
  const text = await resp.text();
  try {
    const e = JSON.parse(text).error;
    if (e && e.message) return `${resp.status}: ${e.message}`;
  } catch (_) { /* not JSON */ }
  return `${resp.status}: ${text.slice(0, 300) || resp.statusText}`;
}

function showStatus(message) {
  const el = $("status");
  el.textContent = message || "";
  el.hidden = !message;
}

// ---- start-up: limits, key, model, inspect ------------------------------------------------------
async function loadLimits() {
  const resp = await fetch("/openapi.json", { cache: "no-store" });
  if (!resp.ok) return;
  const schemas = ((await resp.json()).components || {}).schemas || {};
  const props = (schemas.CompletionRequest || {}).properties || {};
  for (const input of document.querySelectorAll("[data-field]")) {
    let s = props[input.dataset.field];
    if (!s) continue;
    s = (s.anyOf || [s]).find((b) => b.type === "integer" || b.type === "number") || s;
    const min = s.minimum ?? s.exclusiveMinimum, max = s.maximum ?? s.exclusiveMaximum;
    if (min !== undefined) input.min = String(min);
    if (max !== undefined && max < 1e15) input.max = String(max);
  }
  const lp = props.logprobs && (props.logprobs.anyOf || [props.logprobs]).find((b) => b.type === "integer");
  if (lp && lp.maximum !== undefined) state.maxLogprobs = lp.maximum;
}

async function probe() {
  const resp = await api("/v1/models");
  if (resp.status === 401) {
    $("key-box").hidden = false;
    showStatus(state.key ? await errorMessage(resp) : "This server needs an API key: enter it above.");
    setInspectAvailable(null);
    return false;
  }
  if (!resp.ok) { showStatus(await errorMessage(resp)); return false; }
  showStatus("");
  const models = await resp.json();
  state.model = models.data[0].id;
  $("model-name").textContent = state.model;
  const info = await api("/v1/inspect");
  setInspectAvailable(info.ok ? await info.json() : null);
  return true;
}

function setInspectAvailable(info) {
  state.inspect = info;
  $("tab-inspect").hidden = !info;
  if (info) {
    $("inspect-limit").textContent = String(info.max_prompt_tokens);
    $("inspect-info").textContent = `${info.n_layer} layers × ${info.n_head} heads`;
  } else if ($("tab-inspect").getAttribute("aria-selected") === "true") {
    selectTab($("tab-complete"));
  }
}

// ---- tabs and theme ------------------------------------------------------------------------------
function selectTab(tab) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const t of tabs) {
    const on = t === tab;
    t.setAttribute("aria-selected", String(on));
    t.tabIndex = on ? 0 : -1;
  }
  const inspect = tab.id === "tab-inspect";
  $("panel-inspect").hidden = !inspect;
  $("panel-generate").hidden = inspect;
  if (!inspect) {
    if (tab.dataset.mode !== state.mode) {
      state.drafts[state.mode] = $("prompt").value;
      $("prompt").value = state.drafts[tab.dataset.mode] ?? "";
    }
    state.mode = tab.dataset.mode;
    $("panel-generate").setAttribute("aria-labelledby", tab.id);
    const chat = state.mode === "chat";
    $("chat-log").hidden = !chat;
    $("system").hidden = $("system-label").hidden = !chat;
    $("output").hidden = chat;
    $("prompt-label").textContent = chat ? "Your message" : "Prompt";
    $("send").textContent = chat ? "Send" : "Generate";
  }
}

function tabKeys(ev) {
  const tabs = [...document.querySelectorAll('[role="tab"]')].filter((t) => !t.hidden);
  const i = tabs.indexOf(ev.target);
  let j = null;
  if (ev.key === "ArrowRight") j = (i + 1) % tabs.length;
  else if (ev.key === "ArrowLeft") j = (i - 1 + tabs.length) % tabs.length;
  else if (ev.key === "Home") j = 0;
  else if (ev.key === "End") j = tabs.length - 1;
  if (j === null) return;
  ev.preventDefault();
  tabs[j].focus();
  selectTab(tabs[j]);
}

function toggleTheme() {
  const root = document.documentElement;
  const dark = root.dataset.theme === "dark" ||
    (root.dataset.theme === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
  root.dataset.theme = dark ? "light" : "dark";
  syncThemeButton();
  if (state.view) drawInspect();
}

function syncThemeButton() {
  const root = document.documentElement;
  const dark = root.dataset.theme === "dark" ||
    (root.dataset.theme === "auto" && matchMedia("(prefers-color-scheme: dark)").matches);
  $("theme").textContent = dark ? "Light theme" : "Dark theme";
  $("theme").setAttribute("aria-pressed", String(dark));
}

// ---- generation ----------------------------------------------------------------------------------
function samplingFields() {
  const out = {};
  for (const input of document.querySelectorAll("[data-field]")) {
    if (input.value.trim() === "") continue;
    const v = Number(input.value);
    if (!Number.isFinite(v)) throw new Error(`${input.dataset.field}: not a number`);
    out[input.dataset.field] = v;
  }
  const stops = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  if (stops.length) out.stop = stops;
  return out;
}

function tokenSpan(text, logprob, alternatives) {
  const span = document.createElement("span");
  span.className = "tok";
  span.textContent = text;
  if (logprob !== null && logprob !== undefined) {
    const p = Math.exp(logprob);
    span.dataset.prob = p.toFixed(4);
    span.style.setProperty("--p", String(p));
    span.setAttribute("aria-label", `${JSON.stringify(text)}, probability ${(100 * p).toFixed(1)}%`);
  }
  span._alternatives = alternatives || [];
  return span;
}

function applyTokenView() {
  const on = $("token-view").checked;
  $("panel-generate").classList.toggle("show-tokens", on);
  for (const span of document.querySelectorAll("#panel-generate .tok")) {
    if (on) span.tabIndex = 0; else span.removeAttribute("tabindex");
    if (on && span.dataset.prob !== undefined) {
      // log scale: p = 1 unshaded, 0.1 light, 0.01 medium, 0.001 and below strongest
      const p = Math.max(Number(span.dataset.prob), 1e-6);
      span.style.backgroundColor = `rgba(var(--mark), ${Math.min(0.85, -Math.log10(p) / 3 * 0.85).toFixed(3)})`;
    } else {
      span.style.backgroundColor = "";
    }
  }
  if (!on) $("tooltip").hidden = true;
}

function showTooltip(span) {
  if (!$("token-view").checked || span.dataset.prob === undefined) return;
  const tip = $("tooltip");
  tip.replaceChildren();
  const head = document.createElement("div");
  head.textContent = `${JSON.stringify(span.textContent)}: ${(100 * Number(span.dataset.prob)).toFixed(1)}%`;
  const table = document.createElement("table");
  for (const [text, p] of span._alternatives) {
    const row = table.insertRow();
    row.insertCell().textContent = JSON.stringify(text);
    const c = row.insertCell();
    c.className = "p";
    c.textContent = `${(100 * p).toFixed(1)}%`;
  }
  tip.append(head, table);
  const r = span.getBoundingClientRect();
  tip.style.left = `${window.scrollX + r.left}px`;
  tip.style.top = `${window.scrollY + r.bottom + 4}px`;
  tip.hidden = false;
  if (r.bottom + 4 + tip.offsetHeight > window.innerHeight) {  // no room below: above the token
    tip.style.top = `${window.scrollY + r.top - tip.offsetHeight - 4}px`;
  }
  span.setAttribute("aria-describedby", "tooltip");
}

function hideTooltip(span) {
  $("tooltip").hidden = true;
  span.removeAttribute("aria-describedby");
}

// One choice's chunk -> [text, logprob, [[alt text, prob], ...]] per token. When the tokens' texts do
// not add up to the chunk's text (byte tokens of one character), the text is shown as one piece
// with the joint probability of its tokens and the first one's alternatives.
function chunkTokens(choice) {
  const lp = choice.logprobs;
  let text, tokens = [];
  if (state.mode === "chat") {
    text = (choice.delta || {}).content || "";
    if (lp && lp.content) {
      tokens = lp.content.map((t) => [t.token, t.logprob,
        (t.top_logprobs || []).map((a) => [a.token, Math.exp(a.logprob)])]);
    }
  } else {
    text = choice.text || "";
    if (lp && lp.tokens) {
      tokens = lp.tokens.map((t, i) => [t, lp.token_logprobs[i],
        Object.entries((lp.top_logprobs || [])[i] || {}).map(([k, v]) => [k, Math.exp(v)])
          .sort((a, b) => b[1] - a[1])]);
    }
  }
  if (!tokens.length) return text ? [[text, null, []]] : [];
  if (tokens.map((t) => t[0]).join("") === text) return tokens;
  return [[text, tokens.reduce((s, t) => s + t[1], 0), tokens[0][2]]];
}

function setRunning(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("panel-generate").setAttribute("aria-busy", String(on));
}

async function generate() {
  if (state.controller) return;
  showStatus("");
  let body;
  try {
    body = { model: state.model || undefined, stream: true, stream_options: { include_usage: true }, ...samplingFields() };
  } catch (e) { showStatus(e.message); return; }
  const text = $("prompt").value;
  let target, route;
  if (state.mode === "chat") {
    if (!text.trim()) { showStatus("Write a message first."); return; }
    const system = $("system").value.trim();
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...state.messages,
      { role: "user", content: text }];
    Object.assign(body, { messages, logprobs: true, top_logprobs: 5 });
    route = "/v1/chat/completions";
    state.messages.push({ role: "user", content: text });
    addMessage("user", text);
    target = addMessage("assistant", "");
    $("prompt").value = "";
  } else {
    Object.assign(body, { prompt: text, logprobs: state.maxLogprobs });
    route = "/v1/completions";
    target = $("output");
    target.replaceChildren();
    const echo = document.createElement("span");
    echo.className = "prompt-echo";
    echo.textContent = text;
    target.append(echo);
  }
  const controller = new AbortController();
  state.controller = controller;
  setRunning(true);
  $("stats").textContent = "waiting for the first token…";
  const t0 = performance.now();
  let tFirst = null, tLast = null, n = 0, answer = "", finish = null, usage = null;
  try {
    const resp = await api(route, body, controller.signal);
    if (!resp.ok) { showStatus(await errorMessage(resp)); $("stats").textContent = ""; return; }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        let name = "message", data = "";
        for (const line of event.split("\n")) {
          if (line.startsWith("event:")) name = line.slice(6).trim();
          else if (line.startsWith("data:")) data += line.slice(5).trimStart();
        }
        if (!data || data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (name === "error" || chunk.error) { showStatus((chunk.error || {}).message || data); continue; }
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          for (const [t, lp, alts] of chunkTokens(choice)) {
            const now = performance.now();
            if (tFirst === null) tFirst = now;
            tLast = now;
            n += 1;
            answer += t;
            target.append(tokenSpan(t, lp, alts));
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        applyTokenView();
        showStats(t0, tFirst, tLast, n, finish, usage, false);
      }
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else showStatus(`request failed: ${e.message}`);
  } finally {
    state.controller = null;
    setRunning(false);
    if (state.mode === "chat" && answer) state.messages.push({ role: "assistant", content: answer });
    if (tFirst !== null || finish) showStats(t0, tFirst, tLast, n, finish, usage, true);
  }
}

function showStats(t0, tFirst, tLast, n, finish, usage, done) {
  const parts = [];
  if (tFirst !== null) parts.push(`time to first token ${Math.round(tFirst - t0)} ms`);
  const count = usage ? usage.completion_tokens : n;
  parts.push(`${count} tokens`);
  if (n > 1 && tLast > tFirst) parts.push(`${((n - 1) / ((tLast - tFirst) / 1000)).toFixed(1)} tokens/s`);
  if (done && finish) parts.push(`finish: ${finish}`);
  $("stats").textContent = parts.join(" · ");
  $("stats").dataset.done = String(done);
}

function stop() {
  if (state.controller) state.controller.abort();
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : state.model || "Model";
  div.append(who);
  if (text) div.append(document.createTextNode(text));
  $("chat-log").append(div);
  return div;
}

function clearAll() {
  stop();
  state.messages = [];
  $("chat-log").replaceChildren();
  $("output").replaceChildren();
  $("stats").textContent = "";
}

// ---- inside the model ----------------------------------------------------------------------------
async function runInspect() {
  showStatus("");
  $("inspect-run").disabled = true;
  try {
    const resp = await api("/v1/inspect", { prompt: $("inspect-prompt").value });
    if (!resp.ok) { showStatus(await errorMessage(resp)); return; }
    const data = await resp.json();
    const T = data.tokens.length;
    state.view = { data, layer: 0, head: 0, query: T - 1, position: T - 1 };
    buildInspect();
  } catch (e) {
    showStatus(`request failed: ${e.message}`);
  } finally {
    $("inspect-run").disabled = false;
  }
}

function heatColor(w) {
  const rgb = getComputedStyle(document.documentElement).getPropertyValue("--heat").trim();
  return `rgba(${rgb}, ${Math.min(1, w).toFixed(3)})`;
}

function drawSmall(canvas, matrix) {
  const T = matrix.length;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, T, T);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k <= q; k++) {
      ctx.fillStyle = heatColor(matrix[q][k]);
      ctx.fillRect(k, q, 1, 1);
    }
  }
}

function buildInspect() {
  const { data } = state.view;
  const T = data.tokens.length;
  $("inspect-result").hidden = false;
  const strip = $("tokens");
  strip.replaceChildren();
  data.tokens.forEach((t, i) => {
    const cell = document.createElement("span");
    cell.className = "tok-cell";
    cell.setAttribute("role", "listitem");
    cell.tabIndex = 0;
    cell.dataset.index = String(i);
    cell.textContent = t.text;
    cell.setAttribute("aria-label", `token ${i + 1} of ${T}: ${JSON.stringify(t.text)}`);
    cell.addEventListener("mouseenter", () => setQuery(i));
    cell.addEventListener("focus", () => setQuery(i));
    cell.addEventListener("click", () => setPosition(i));
    cell.addEventListener("keydown", (ev) => { if (ev.key === "Enter" || ev.key === " ") { ev.preventDefault(); setPosition(i); } });
    strip.append(cell);
  });
  const grid = $("grid");
  grid.replaceChildren();
  grid.style.gridTemplateColumns = `auto repeat(${data.n_head}, auto)`;
  grid.append(document.createElement("span"));
  for (let h = 0; h < data.n_head; h++) {
    const label = document.createElement("span");
    label.className = "head-label";
    label.textContent = `head ${h + 1}`;
    grid.append(label);
  }
  for (let l = 0; l < data.n_layer; l++) {
    const label = document.createElement("span");
    label.className = "head-label";
    label.textContent = `layer ${l + 1}`;
    grid.append(label);
    for (let h = 0; h < data.n_head; h++) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = "cell";
      b.dataset.layer = String(l);
      b.dataset.head = String(h);
      b.setAttribute("aria-label", `layer ${l + 1}, head ${h + 1}`);
      const c = document.createElement("canvas");
      c.width = T;
      c.height = T;
      b.append(c);
      b.addEventListener("click", () => { state.view.layer = l; state.view.head = h; drawInspect(); });
      grid.append(b);
    }
  }
  drawInspect();
  setPosition(state.view.position);
}

function drawInspect() {
  const v = state.view;
  for (const b of document.querySelectorAll("#grid .cell")) {
    const l = Number(b.dataset.layer), h = Number(b.dataset.head);
    drawSmall(b.querySelector("canvas"), v.data.attentions[l][h]);
    b.setAttribute("aria-pressed", String(l === v.layer && h === v.head));
  }
  $("big-title").textContent = `Layer ${v.layer + 1}, head ${v.head + 1}`;
  drawBig();
  setQuery(v.query);
}

function drawBig() {
  const v = state.view;
  const m = v.data.attentions[v.layer][v.head];
  const tokens = v.data.tokens;
  const T = tokens.length;
  const canvas = $("big");
  const ctx = canvas.getContext("2d");
  const W = canvas.width, margin = BIG_MARGIN;
  const cell = (W - margin) / T;
  const styles = getComputedStyle(document.documentElement);
  ctx.clearRect(0, 0, W, W);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k <= q; k++) {
      ctx.fillStyle = heatColor(m[q][k]);
      ctx.fillRect(margin + k * cell, q * cell, Math.ceil(cell), Math.ceil(cell));
    }
  }
  ctx.strokeStyle = styles.getPropertyValue("--focus").trim();
  ctx.lineWidth = 2;
  ctx.strokeRect(margin, v.query * cell, (v.query + 1) * cell, cell);  // the highlighted query's row
  const every = Math.max(1, Math.ceil(10 / cell));  // labels at least ~10 px apart
  const size = Math.max(7, Math.min(13, cell * 0.8));
  ctx.fillStyle = styles.getPropertyValue("--fg").trim();
  ctx.font = `${size}px ui-monospace, monospace`;
  ctx.textBaseline = "middle";
  const label = (t) => (t.length > 10 ? t.slice(0, 9) + "…" : t).replace(/\n/g, "⏎");
  for (let i = 0; i < T; i += every) {
    ctx.textAlign = "right";
    ctx.fillText(label(tokens[i].text), margin - 4, i * cell + cell / 2);  // queries, down the side
    ctx.save();
    ctx.translate(margin + i * cell + cell / 2, W - margin + 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "right";
    ctx.fillText(label(tokens[i].text), 0, 0);  // keys, along the bottom
    ctx.restore();
  }
  canvas.setAttribute("aria-label",
    `Attention of layer ${v.layer + 1}, head ${v.head + 1}: rows are the tokens that look, columns the tokens they look at`);
}

const BIG_MARGIN = 90;  // px of the large heatmap kept for the token labels (left and bottom)

function bigCell(ev) {
  const v = state.view;
  const canvas = $("big");
  const r = canvas.getBoundingClientRect();
  const scale = canvas.width / r.width;
  const T = v.data.tokens.length, cell = (canvas.width - BIG_MARGIN) / T;
  const k = Math.floor(((ev.clientX - r.left) * scale - BIG_MARGIN) / cell);
  const q = Math.floor(((ev.clientY - r.top) * scale) / cell);
  return q >= 0 && q < T && k >= 0 && k <= q ? [q, k] : null;
}

function hoverBig(ev) {
  if (!state.view) return;
  const at = bigCell(ev);
  if (!at) return;
  const [q, k] = at;
  const v = state.view, tokens = v.data.tokens;
  const w = v.data.attentions[v.layer][v.head][q][k];
  $("big-caption").textContent =
    `${JSON.stringify(tokens[q].text)} (position ${q + 1}) attends to ${JSON.stringify(tokens[k].text)} (position ${k + 1}): ${(100 * w).toFixed(1)}%`;
  if (q !== v.query) setQuery(q);
}

function setQuery(i) {
  const v = state.view;
  if (!v) return;
  v.query = i;
  const row = v.data.attentions[v.layer][v.head][i];
  const max = Math.max(...row.slice(0, i + 1));
  for (const cell of document.querySelectorAll("#tokens .tok-cell")) {
    const j = Number(cell.dataset.index);
    const w = j <= i ? row[j] : 0;
    cell.dataset.weight = w.toFixed(4);
    cell.classList.toggle("query", j === i);
    const shade = j < i && max > 0 ? w / max : 0;
    cell.style.backgroundColor = j < i ? heatColor(shade) : "";
    cell.style.color = shade > 0.55 ? "#ffffff" : "";  // readable on the darkest shades
    cell.title = j <= i ? `attention from ${JSON.stringify(v.data.tokens[i].text)}: ${(100 * w).toFixed(1)}%` : "";
  }
  drawBig();
}

function setPosition(i) {
  const v = state.view;
  v.position = i;
  for (const cell of document.querySelectorAll("#tokens .tok-cell")) {
    cell.classList.toggle("chosen", Number(cell.dataset.index) === i);
  }
  $("bars-title").textContent = `Next token after ${JSON.stringify(v.data.tokens[i].text)} (position ${i + 1})`;
  const bars = $("bars");
  bars.replaceChildren();
  for (const t of v.data.next_tokens[i]) {
    const row = document.createElement("div");
    row.className = "bar";
    row.setAttribute("role", "listitem");
    row.setAttribute("aria-label", `${JSON.stringify(t.text)}: ${(100 * t.prob).toFixed(1)}%`);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = JSON.stringify(t.text);
    const track = document.createElement("span");
    track.className = "track";
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.display = "block";
    fill.style.width = `${(100 * t.prob).toFixed(2)}%`;
    track.append(fill);
    const p = document.createElement("span");
    p.className = "p";
    p.textContent = `${(100 * t.prob).toFixed(1)}%`;
    row.append(label, track, p);
    bars.append(row);
  }
}

// ---- wiring --------------------------------------------------------------------------------------
function wire() {
  for (const tab of document.querySelectorAll('[role="tab"]')) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", tabKeys);
  }
  $("theme").addEventListener("click", toggleTheme);
  $("send").addEventListener("click", generate);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clearAll);
  $("token-view").addEventListener("change", applyTokenView);
  $("inspect-run").addEventListener("click", runInspect);
  $("big").addEventListener("mousemove", hoverBig);
  const applyKey = () => { state.key = $("api-key").value.trim() || null; probe(); };
  $("key-apply").addEventListener("click", applyKey);
  $("api-key").addEventListener("keydown", (ev) => { if (ev.key === "Enter") applyKey(); });
  document.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") stop();
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) {
      if (ev.target === $("inspect-prompt")) runInspect();
      else if (!$("panel-generate").hidden) generate();
    }
  });
  const over = (ev, fn) => { const t = ev.target.closest && ev.target.closest(".tok"); if (t) fn(t); };
  for (const ev of ["mouseover", "focusin"]) $("panel-generate").addEventListener(ev, (e) => over(e, showTooltip));
  for (const ev of ["mouseout", "focusout"]) $("panel-generate").addEventListener(ev, (e) => over(e, hideTooltip));
  syncThemeButton();
}

document.addEventListener("DOMContentLoaded", async () => {
  wire();
  try {
    await loadLimits();
    await probe();
  } catch (e) {
    showStatus(`cannot reach the server: ${e.message}`);
  }
  document.body.dataset.ready = "true";
});
