// zmqfed dashboard: polls /status.json and /rounds.json once a second and
// redraws in place. Read-only; no external resources (federations run offline).
"use strict";

const POLL_MS = 1000;
const MAX_RECORDS = 500;
const SVG_NS = "http://www.w3.org/2000/svg";
const view = { after: 0, records: [], started: null, topology: false };

function byId(id) {
  return document.getElementById(id);
}

function setText(id, value) {
  byId(id).textContent = value;
}

function seconds(s) {
  if (s === null || s === undefined || !isFinite(s)) return "–";
  if (s < 60) return s.toFixed(1) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.round(s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.round((s % 3600) / 60) + " min";
}

function bytes(n) {
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) {
    n /= 1000;
    i += 1;
  }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(url + ": HTTP " + response.status);
  return response.json();
}

async function loadTopology() {
  const response = await fetch("/topology.svg", { cache: "no-store" });
  if (!response.ok) return;
  byId("topology").innerHTML = await response.text();
  view.topology = true;
}

function colourTopology(status) {
  const online = new Set(status.online_peers || []);
  const offline = new Set(status.offline_peers || []);
  for (const node of document.querySelectorAll("#topology .node")) {
    const name = node.dataset.node;
    let state = "unknown";
    if (name === status.node) state = "self";
    else if (online.has(name)) state = "online";
    else if (offline.has(name)) state = "offline";
    if (node.getAttribute("data-state") !== state) node.setAttribute("data-state", state);
  }
}

function renderStatus(st) {
  setText("node", st.node);
  setText("roles", (st.roles || []).join(" + "));
  const badge = byId("state");
  badge.textContent = st.health ? st.health.status : st.state;
  badge.dataset.state = st.state;
  setText("round", st.round + " / " + st.rounds);
  const rounds = byId("rounds-progress");
  rounds.max = Math.max(1, st.rounds);
  rounds.value = Math.min(st.round, st.rounds);
  setText("eta", st.state === "finished" ? "done" : "ETA " + seconds(st.eta_seconds));
  const progress = st.progress || {};
  const expected = progress.expected || 0;
  const current = byId("round-progress");
  if (expected > 0) {
    setText("uploads", progress.uploads + " / " + expected + " uploads");
    current.max = expected;
    current.value = Math.min(progress.uploads, expected);
  } else {
    setText("uploads", st.phase || "–");
    current.removeAttribute("value");
  }
  let phase = st.phase || "";
  if (progress.round_started) {
    phase += " for " + seconds(Date.now() / 1000 - progress.round_started);
  }
  setText("phase", phase);
  const online = (st.online_peers || []).length;
  const total = online + (st.offline_peers || []).length;
  setText("peers", online + " / " + total + " online");
  setText(
    "offline",
    st.offline_peers && st.offline_peers.length ? "offline: " + st.offline_peers.join(", ") : "",
  );
  const last = st.last_record;
  setText(
    "last-round",
    last ? "last round: " + last.participants + " participant(s), " + seconds(last.seconds) : "",
  );
  renderErrors(st.errors || [], st.failure);
  setText("updated", new Date(st.updated * 1000).toLocaleTimeString());
  if (view.topology) colourTopology(st);
}

function renderErrors(errors, failure) {
  const list = byId("errors");
  list.replaceChildren();
  const items = errors.slice().reverse();
  if (failure) items.unshift({ time: null, level: "ERROR", logger: "node", message: failure });
  if (!items.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "none";
    list.appendChild(li);
    return;
  }
  for (const e of items) {
    const li = document.createElement("li");
    li.dataset.level = e.level;
    const when = e.time ? new Date(e.time * 1000).toLocaleTimeString() + " " : "";
    li.textContent = when + e.level + " " + e.logger + ": " + e.message;
    list.appendChild(li);
  }
}

function svg(tag, attrs, parent) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

function scale(domain, range) {
  const [d0, d1] = domain;
  const [r0, r1] = range;
  const span = d1 - d0 || 1;
  return (v) => r0 + ((v - d0) / span) * (r1 - r0);
}

function axes(root, x, y, xs, ys, w, h, m, label) {
  for (const t of ys) {
    svg("line", { class: "grid", x1: m.l, x2: w - m.r, y1: y(t), y2: y(t) }, root);
    svg("text", { x: m.l - 4, y: y(t) + 4, "text-anchor": "end" }, root).textContent = label(t);
  }
  svg("line", { class: "axis", x1: m.l, x2: w - m.r, y1: h - m.b, y2: h - m.b }, root);
  for (const t of xs) {
    svg("text", { x: x(t), y: h - m.b + 14, "text-anchor": "middle" }, root).textContent = t;
  }
}

function ticks(lo, hi, n) {
  if (hi === lo) return [lo];
  const out = [];
  for (let i = 0; i <= n; i += 1) out.push(lo + ((hi - lo) * i) / n);
  return out;
}

function roundTicks(rounds) {
  const lo = Math.min(...rounds);
  const hi = Math.max(...rounds);
  const step = Math.max(1, Math.ceil((hi - lo) / 8));
  const out = [];
  for (let r = lo; r <= hi; r += step) out.push(r);
  return out;
}

// One metric per chart: a line through one point per round (data-round, data-value).
function lineChart(name, points) {
  const w = 380;
  const h = 200;
  const m = { l: 56, r: 12, t: 22, b: 26 };
  const root = svg("svg", { class: "chart", width: w, height: h, "data-metric": name });
  svg("text", { class: "title", x: m.l, y: 14 }, root).textContent = name;
  const rounds = points.map((p) => p.round);
  const values = points.map((p) => p.value);
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (lo === hi) {
    lo -= Math.abs(lo) * 0.1 || 1;
    hi += Math.abs(hi) * 0.1 || 1;
  }
  const x = scale([Math.min(...rounds), Math.max(...rounds)], [m.l + 6, w - m.r - 6]);
  const y = scale([lo, hi], [h - m.b - 4, m.t + 4]);
  root.dataset.ymin = lo;
  root.dataset.ymax = hi;
  axes(root, x, y, roundTicks(rounds), ticks(lo, hi, 4), w, h, m, (t) => t.toPrecision(3));
  svg("polyline", {
    class: "line",
    points: points.map((p) => x(p.round).toFixed(1) + "," + y(p.value).toFixed(1)).join(" "),
  }, root);
  for (const p of points) {
    const dot = svg("circle", {
      class: "point",
      cx: x(p.round).toFixed(1),
      cy: y(p.value).toFixed(1),
      r: 3,
      "data-round": p.round,
      "data-value": p.value,
    }, root);
    svg("title", {}, dot).textContent = "round " + p.round + ": " + p.value;
  }
  return root;
}

function bytesChart(records) {
  const w = 780;
  const h = 200;
  const m = { l: 64, r: 12, t: 22, b: 26 };
  const root = svg("svg", { class: "chart", width: w, height: h, "data-metric": "bytes" });
  svg("text", { class: "title", x: m.l, y: 14 }, root).textContent =
    "bytes per round: received (blue) + sent (orange)";
  const rounds = records.map((r) => r.round);
  const hi = Math.max(1, ...records.map((r) => r.bytes_in + r.bytes_out));
  const x = scale([Math.min(...rounds) - 0.5, Math.max(...rounds) + 0.5], [m.l, w - m.r]);
  const y = scale([0, hi], [h - m.b, m.t]);
  axes(root, x, y, roundTicks(rounds), ticks(0, hi, 4), w, h, m, bytes);
  const bw = Math.max(2, Math.min(30, (x(1) - x(0)) * 0.7));
  for (const r of records) {
    const x0 = x(r.round) - bw / 2;
    svg("rect", {
      class: "bar-in", x: x0, width: bw, y: y(r.bytes_in), height: y(0) - y(r.bytes_in),
      "data-round": r.round, "data-bytes-in": r.bytes_in,
    }, root);
    svg("rect", {
      class: "bar-out", x: x0, width: bw, y: y(r.bytes_in + r.bytes_out),
      height: y(r.bytes_in) - y(r.bytes_in + r.bytes_out),
      "data-round": r.round, "data-bytes-out": r.bytes_out,
    }, root);
  }
  return root;
}

function renderCharts() {
  const series = new Map();
  for (const r of view.records) {
    for (const [key, value] of Object.entries(r.metrics || {})) {
      if (typeof value !== "number" || !isFinite(value)) continue;
      const name = r.mode === "test" ? "test " + key : key;
      if (!series.has(name)) series.set(name, []);
      series.get(name).push({ round: r.round, value: value });
    }
  }
  const charts = byId("charts");
  charts.replaceChildren();
  for (const name of [...series.keys()].sort()) charts.appendChild(lineChart(name, series.get(name)));
  if (!series.size) charts.innerHTML = '<p class="muted">no metrics yet</p>';
  const train = view.records.filter((r) => r.mode !== "test");
  const holder = byId("bytes-chart");
  holder.replaceChildren();
  if (train.length) holder.appendChild(bytesChart(train));
}

async function poll() {
  try {
    const st = await getJSON("/status.json");
    if (view.started !== st.started) {
      view.started = st.started; // a restarted node numbers its records anew
      view.after = 0;
      view.records = [];
    }
    if (!view.topology) await loadTopology();
    renderStatus(st);
    const fresh = (await getJSON("/rounds.json?after=" + view.after)).records;
    if (fresh.length) {
      view.records = view.records.concat(fresh).slice(-MAX_RECORDS);
      view.after = fresh[fresh.length - 1].seq;
      renderCharts();
    }
    byId("connection").dataset.connected = "true";
    setText("connection", "live");
  } catch (err) {
    byId("connection").dataset.connected = "false";
    setText("connection", "node unreachable");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
