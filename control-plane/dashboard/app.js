// The Crank Mesh dashboard: polls /api/state every 2 s and draws it.
// Plain DOM, no framework, no build step. Every piece of data goes in
// through textContent or setAttribute, never as markup.
"use strict";

const POLL_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const GRAPH = { nodeW: 230, nodeH: 54, colW: 420, rowH: 96 };

let updates = 0;
let lastOk = null;

// ---------- small DOM helpers ----------

function el(tag, attrs, ...children) {
  return build(document.createElement(tag), attrs, children);
}

function svg(tag, attrs, ...children) {
  return build(document.createElementNS(SVG_NS, tag), attrs, children);
}

function build(node, attrs, children) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    node.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function table(headers, rows, empty) {
  if (rows.length === 0) return el("p", { class: "empty" }, empty);
  return el("table", {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function badge(text, kind) {
  return el("span", { class: "badge " + kind }, text);
}

// ---------- formatting ----------

function duration(seconds) {
  let s = Math.abs(Math.round(seconds));
  const units = [["d", 86400], ["h", 3600], ["m", 60], ["s", 1]];
  const parts = [];
  for (const [name, size] of units) {
    if (s >= size || (name === "s" && parts.length === 0)) {
      parts.push(Math.floor(s / size) + name);
      s %= size;
    }
    if (parts.length === 2) break;
  }
  return parts.join(" ");
}

function expiresIn(secondsLeft) {
  return secondsLeft < 0 ? "expired " + duration(secondsLeft) + " ago" : "in " + duration(secondsLeft);
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function clock(date) {
  return pad(date.getHours()) + ":" + pad(date.getMinutes()) + ":" + pad(date.getSeconds());
}

// A refusal's time (Unix ms, from a sidecar's clock) as its clock time and
// ISO form; "–" and "" when it is no time a Date can hold.
function when(ms) {
  const d = new Date(ms);
  if (typeof ms !== "number" || Number.isNaN(d.getTime())) return { clock: "–", iso: "" };
  return { clock: clock(d), iso: d.toISOString() };
}

function dateTime(unixSeconds) {
  const d = new Date(unixSeconds * 1000);
  return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " + clock(d);
}

function percent(x, digits) {
  return x === null || x === undefined ? "–" : (x * 100).toFixed(digits) + "%";
}

function rate(rps) {
  return rps >= 100 ? rps.toFixed(0) : rps >= 10 ? rps.toFixed(1) : rps.toFixed(2);
}

function health(successRate) {
  if (successRate === null || successRate === undefined) return "idle";
  if (successRate >= 0.99) return "ok";
  if (successRate >= 0.95) return "warn";
  return "bad";
}

function workloadName(w) {
  return w.service && w.tenant ? w.service + "." + w.tenant : w.identity;
}

// ---------- the mesh picture ----------

// Nodes and links: a call goes to the workload that serves its destination
// when there is exactly one; otherwise to a capability node, which links
// (dashed) to each workload that serves it.
function meshModel(state) {
  const nodes = new Map();
  const links = [];
  const byIdentity = new Map(state.workloads.map((w) => [w.identity, w]));
  for (const w of state.workloads) nodes.set(w.identity, { id: w.identity, kind: "workload", w });
  const servers = (dest, routeName) => {
    if (byIdentity.has(dest)) return [dest];
    const found = state.workloads.filter((w) => (w.capabilities || []).includes(dest)).map((w) => w.identity);
    if (found.length > 0) return found;
    const route = state.routes.find((r) => r.name === routeName || r.capability === dest || r.name === dest);
    const ids = route ? route.endpoints.map((e) => e.identity).filter((i) => byIdentity.has(i)) : [];
    return [...new Set(ids)];
  };
  for (const e of state.edges) {
    if (!nodes.has(e.source)) nodes.set(e.source, { id: e.source, kind: "external" });
    const targets = servers(e.destination, e.route);
    let to = targets.length === 1 ? targets[0] : "cap:" + e.destination;
    if (targets.length !== 1 && !nodes.has(to)) {
      nodes.set(to, { id: to, kind: "capability", label: e.destination });
      for (const t of targets) links.push({ from: to, to: t, fanout: true });
    }
    links.push({ from: e.source, to, edge: e });
  }
  return { nodes, links };
}

// Columns by longest call path from the callers; rows in name order.
function layout(nodes, links) {
  const depth = new Map([...nodes.keys()].map((id) => [id, 0]));
  for (let i = 0; i < nodes.size; i++) {
    let moved = false;
    for (const l of links) {
      if (l.from === l.to) continue;
      if (depth.get(l.to) < depth.get(l.from) + 1 && depth.get(l.from) + 1 < nodes.size) {
        depth.set(l.to, depth.get(l.from) + 1);
        moved = true;
      }
    }
    if (!moved) break;
  }
  const columns = [];
  for (const [id, d] of depth) (columns[d] = columns[d] || []).push(id);
  const pos = new Map();
  columns.forEach((col, c) => {
    col.sort().forEach((id, r) => pos.set(id, { x: 24 + c * GRAPH.colW, y: 24 + r * GRAPH.rowH }));
  });
  const rows = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  return { pos, width: 48 + (columns.length - 1) * GRAPH.colW + GRAPH.nodeW, height: 48 + (rows - 1) * GRAPH.rowH + GRAPH.nodeH };
}

function drawNode(n, p) {
  const w = n.w;
  const title = n.kind === "workload"
    ? [w.identity, "capabilities: " + ((w.capabilities || []).join(", ") || "none"),
      "last report: " + (w.last_report ? dateTime(w.last_report) : "never")].join("\n")
    : n.kind === "capability" ? "capability " + n.label : n.id + " (not enrolled here)";
  const line1 = n.kind === "workload" ? workloadName(w) : n.kind === "capability" ? n.label : n.id;
  const line2 = n.kind === "workload"
    ? plural(w.proxies, "proxy", "proxies") + " · " + plural(w.endpoints, "endpoint", "endpoints")
    : n.kind === "capability" ? "capability" : "caller";
  const quiet = n.kind === "workload" && w.proxies === 0 && w.endpoints === 0;
  return svg("g", {
    class: "node " + n.kind + (quiet ? " quiet" : ""),
    "data-identity": n.kind === "capability" ? null : n.id,
    "data-capability": n.kind === "capability" ? n.label : null,
    transform: "translate(" + p.x + "," + p.y + ")",
  },
  svg("title", {}, title),
  svg("rect", { width: GRAPH.nodeW, height: GRAPH.nodeH, rx: 8 }),
  svg("text", { x: 12, y: 22, class: "name" }, clip(line1, 30)),
  svg("text", { x: 12, y: 41, class: "sub" }, clip(line2, 36)));
}

function plural(n, one, many) {
  return n + " " + (n === 1 ? one : many);
}

function clip(s, n) {
  return s.length > n ? s.slice(0, n - 1) + "…" : s;
}

function drawLink(l, a, b) {
  const x1 = a.x + GRAPH.nodeW, y1 = a.y + GRAPH.nodeH / 2;
  const x2 = b.x, y2 = b.y + GRAPH.nodeH / 2;
  const dx = Math.max(40, Math.abs(x2 - x1) / 2);
  const d = "M" + x1 + "," + y1 + " C" + (x1 + dx) + "," + y1 + " " + (x2 - dx) + "," + y2 + " " + x2 + "," + y2;
  if (l.fanout) return svg("path", { class: "link fanout", d, "marker-end": "url(#arrow-idle)" });
  const e = l.edge;
  const h = health(e.success_rate);
  const width = 1.5 + Math.min(4, Math.log10(1 + e.rps) * 1.5);
  const label = e.success_rate === null ? "no requests lately" : rate(e.rps) + " rps · " + percent(e.success_rate, 1) + " ok";
  const tip = [e.source + " → " + e.destination, "route " + e.route, label,
    "p99 " + (e.p99_ms === null ? "–" : e.p99_ms.toFixed(1) + " ms"),
    e.requests + " requests, " + e.errors + " errors since start"].join("\n");
  return svg("g", { class: "call " + h, "data-source": e.source, "data-destination": e.destination, "data-route": e.route },
    svg("title", {}, tip),
    svg("path", { class: "link", d, "stroke-width": width.toFixed(1), "marker-end": "url(#arrow-" + h + ")" }),
    svg("text", { class: "label", x: (x1 + x2) / 2, y: (y1 + y2) / 2 - 8, "text-anchor": "middle" }, label));
}

function arrowDefs() {
  return svg("defs", {}, ["ok", "warn", "bad", "idle"].map((h) =>
    svg("marker", { id: "arrow-" + h, class: "arrow " + h, viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 9, markerHeight: 9, markerUnits: "userSpaceOnUse", orient: "auto" },
      svg("path", { d: "M0,0 L10,5 L0,10 z" }))));
}

function renderMesh(state) {
  const { nodes, links } = meshModel(state);
  if (nodes.size === 0) return el("p", { class: "empty" }, "No workloads yet: enroll a sidecar, or register an endpoint.");
  const { pos, width, height } = layout(nodes, links);
  const picture = svg("svg", { id: "mesh-graph", viewBox: "0 0 " + width + " " + height, width, height, role: "img", "aria-label": "workloads and the calls between them" },
    arrowDefs(),
    links.filter((l) => l.from !== l.to).map((l) => drawLink(l, pos.get(l.from), pos.get(l.to))),
    [...nodes.values()].map((n) => drawNode(n, pos.get(n.id))));
  const legend = el("p", { class: "legend" },
    badge("≥ 99% ok", "ok"), " ", badge("≥ 95%", "warn"), " ", badge("< 95%", "bad"), " ", badge("no requests", "idle"),
    state.edges.length === 0 ? " No calls reported yet." : "");
  return [picture, legend];
}

// ---------- tables ----------

function renderCerts(state) {
  const order = { root: 0, intermediate: 1, leaf: 2 };
  const certs = [...state.certs].sort((a, b) => order[a.kind] - order[b.kind] || a.seconds_left - b.seconds_left);
  const kinds = { valid: "ok", expiring: "warn", expired: "bad", revoked: "bad" };
  const rows = certs.map((c) => el("tr", { class: "cert " + c.status, "data-serial": c.serial, "data-kind": c.kind, "data-status": c.status },
    el("td", {}, c.kind),
    el("td", { class: "subject" }, c.subject),
    el("td", { class: "mono" }, clip(c.serial, 16)),
    el("td", { class: "nowrap" }, dateTime(c.not_after)),
    el("td", { class: "expires-in nowrap", "data-seconds-left": c.seconds_left }, expiresIn(c.seconds_left)),
    el("td", {}, badge(c.status, kinds[c.status] || "idle"))));
  return table(["Kind", "Subject", "Serial", "Expires", "Expires in", "Status"], rows, "No certificates.");
}

function renderRoutes(state) {
  const rows = state.routes.map((r) => el("tr", { "data-route": r.name },
    el("td", {}, r.name),
    el("td", { class: "mono" }, r.capability || "–"),
    el("td", {}, r.endpoints.length === 0 ? el("span", { class: "empty" }, "no endpoints")
      : el("ul", { class: "endpoints" }, r.endpoints.map((e) => el("li", { "data-address": e.address, class: e.live ? "live" : "down" },
        el("span", { class: "dot" }), el("span", { class: "mono" }, e.address), " ", el("span", { class: "muted" }, e.identity)))))));
  return table(["Route", "Capability", "Endpoints"], rows, "No routes published.");
}

function renderSlos(state) {
  const rows = state.slos.map((s) => {
    const left = s.budget_left === null ? null : Math.max(0, Math.min(1, s.budget_left));
    const bar = el("div", { class: "bar " + (left === null ? "idle" : left > 0.5 ? "ok" : left > 0.2 ? "warn" : "bad") }, el("div", { class: "fill" }));
    bar.firstChild.style.width = ((left || 0) * 100).toFixed(1) + "%";
    return el("tr", { "data-capability": s.capability },
      el("td", { class: "mono" }, s.capability),
      el("td", {}, percent(s.availability, 2)),
      el("td", {}, percent(s.sli, 2)),
      el("td", { class: "budget" }, bar, el("span", { class: s.budget_left !== null && s.budget_left < 0 ? "overspent" : null }, budgetText(s))),
      el("td", { class: "num" }, s.requests + " / " + s.errors));
  });
  return table(["Capability", "Target", "SLI", "Error budget", "Requests / errors"], rows, "No SLOs defined.");
}

function budgetText(s) {
  if (s.budget_left === null) return s.availability === null ? "no target" : "no requests";
  return s.budget_left < 0 ? "overspent" : percent(s.budget_left, 0) + " left";
}

// Runs of the same refusal (same reason, request, caller and sidecar)
// become one row with a count; the newest time is shown.
function groupRefusals(refusals) {
  const key = (r) => [r.status, r.reason, r.route, r.method, r.path, r.source, r.proxy].join("\u0000");
  const groups = [];
  for (const r of refusals) {
    const last = groups[groups.length - 1];
    if (last && key(last.r) === key(r)) last.count += 1;
    else groups.push({ r, count: 1 });
  }
  return groups;
}

function renderRefusals(state) {
  const now = Date.now();
  const rows = groupRefusals(state.refusals).map(({ r, count }) => el("tr", { class: "refusal", "data-reason": r.reason, "data-status": r.status, "data-count": count },
    el("td", { class: "when", title: when(r.at_ms).iso }, when(r.at_ms).clock, el("span", { class: "muted" }, " " + duration(Math.max(0, now - r.at_ms) / 1000) + " ago")),
    el("td", {}, badge(String(r.status), r.status >= 500 ? "bad" : "warn"), count > 1 ? el("span", { class: "count" }, " ×" + count) : null),
    el("td", { class: "reason mono" }, r.reason),
    el("td", {}, r.route || "–"),
    el("td", { class: "mono request" }, r.method + " " + r.path),
    el("td", { class: "muted" }, r.source || "unknown"),
    el("td", { class: "muted" }, r.proxy)));
  return table(["Time", "Status", "Reason", "Route", "Request", "Source", "Seen by"], rows, "No refusals: nothing denied, shed or rate-limited lately.");
}

function renderWorkloads(state) {
  const rows = state.workloads.map((w) => el("tr", { "data-identity": w.identity },
    el("td", {}, workloadName(w)),
    el("td", { class: "muted" }, w.identity),
    el("td", { class: "mono" }, (w.capabilities || []).join(", ") || "–"),
    el("td", { class: "num" }, w.proxies),
    el("td", { class: "num" }, w.endpoints),
    el("td", {}, w.last_report ? duration(state.generated_at - w.last_report) + " ago" : "never")));
  return table(["Workload", "Identity", "Serves", "Proxies", "Endpoints", "Last report"], rows, "No workloads yet.");
}

function renderSummary(state) {
  const c = state.config || {};
  const items = [
    ["Trust domain", state.trust_domain],
    ["Config", c.seq === null || c.seq === undefined ? "none published" : "#" + c.seq + (c.hash ? " (" + c.hash.slice(0, 12) + ")" : "")],
    ["Policy", c.policy_revision || "–"],
    ["Workloads", state.workloads.length],
    ["Recent refusals", state.refusals.length],
  ];
  return items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", {}, v)));
}

// ---------- the loop ----------

function normalise(s) {
  for (const k of ["workloads", "edges", "certs", "routes", "slos", "refusals"]) s[k] = Array.isArray(s[k]) ? s[k] : [];
  return s;
}

function render(state) {
  const parts = {
    summary: renderSummary, mesh: renderMesh, certs: renderCerts, routes: renderRoutes,
    slos: renderSlos, refusals: renderRefusals, workloads: renderWorkloads,
  };
  for (const [id, f] of Object.entries(parts)) {
    const out = f(state);
    document.getElementById(id).replaceChildren(...(Array.isArray(out) ? out : [out]));
  }
}

function showError(message) {
  const banner = document.getElementById("error");
  banner.hidden = message === null;
  document.getElementById("last-updated").classList.toggle("stale", message !== null);
  banner.textContent = message === null ? "" : message +
    "; retrying every " + POLL_MS / 1000 + " s." + (lastOk ? " What you see is from " + clock(lastOk) + "." : "");
}

async function poll() {
  try {
    // A request that hangs must not stop the polling.
    const resp = await fetch("api/state", { cache: "no-store", signal: AbortSignal.timeout(3 * POLL_MS) });
    if (!resp.ok) throw new Error("crank-control answered " + resp.status);
    const state = normalise(await resp.json());
    render(state);
    lastOk = new Date();
    updates += 1;
    const stamp = document.getElementById("last-updated");
    stamp.textContent = "last updated " + clock(lastOk);
    stamp.dataset.count = String(updates);
    stamp.dataset.generatedAt = String(state.generated_at);
    showError(null);
  } catch (e) {
    const why = e.name === "TimeoutError" ? "no answer within " + (3 * POLL_MS) / 1000 + " s" : e.message;
    showError("Cannot load the mesh state (" + why + ")");
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
