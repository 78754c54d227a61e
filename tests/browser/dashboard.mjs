// Drives Debian's headless Chromium against crank-control's dashboard, for
// tests/tests/dashboard.rs (and by hand):
//
//   node tests/browser/dashboard.mjs URL SCREENSHOT.png [--identity ID]... [--reason R] [--timeout S]
//
// It loads URL, waits until the mesh picture shows every --identity, prints
// {"event":"loaded",...} (one JSON line), then waits, without reloading, for
// a refusal row whose reason is R (the caller provokes it after "loaded")
// and for a later poll, saves a full-page screenshot, and prints
// {"event":"done",...} with what the page shows. Any failure prints
// {"event":"error","message":...} (with a screenshot when it can) and
// exits 1. CHROMIUM overrides the browser (default /usr/bin/chromium).
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { dirname } from "node:path";

// Without the background-networking flags Chromium tries to reach Google
// services, and on a closed network those attempts are refused noisily.
// --no-sandbox: CI runs as root; --disable-dev-shm-usage: containers often
// have a small /dev/shm.
const ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage",
];

function parseArgs(argv) {
  const opts = { identities: [], reason: null, timeoutMs: 60000, positional: [] };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--identity") opts.identities.push(argv[++i]);
    else if (a === "--reason") opts.reason = argv[++i];
    else if (a === "--timeout") opts.timeoutMs = Number(argv[++i]) * 1000;
    else opts.positional.push(a);
  }
  if (opts.positional.length !== 2 || !(opts.timeoutMs > 0)) {
    throw new Error("usage: dashboard.mjs URL SCREENSHOT.png [--identity ID]... [--reason R] [--timeout SECONDS]");
  }
  [opts.url, opts.screenshot] = opts.positional;
  return opts;
}

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

// What the page shows, read back from its DOM.
function readPage() {
  const all = (sel) => [...document.querySelectorAll(sel)];
  const text = (el) => (el ? el.textContent : null);
  const banner = document.getElementById("error");
  const stamp = document.getElementById("last-updated");
  return {
    title: document.title,
    identities: all("#mesh g.node[data-identity]").map((n) => n.dataset.identity),
    calls: all("#mesh g.call").map((g) => ({
      source: g.dataset.source, destination: g.dataset.destination, label: text(g.querySelector("text.label")),
    })),
    certs: all("#certs tr[data-serial]").map((r) => ({
      kind: r.dataset.kind, status: r.dataset.status, subject: text(r.cells[1]),
      expires_in: text(r.querySelector(".expires-in")),
      seconds_left: Number(r.querySelector(".expires-in").dataset.secondsLeft),
    })),
    routes: all("#routes tr[data-route]").map((r) => ({
      name: r.dataset.route, endpoints: [...r.querySelectorAll("li[data-address]")].map((li) => li.dataset.address),
    })),
    refusals: all("#refusals tr[data-reason]").map((r) => ({
      reason: r.dataset.reason, status: Number(r.dataset.status), count: Number(r.dataset.count), route: text(r.cells[3]),
      request: text(r.cells[4]), source: text(r.cells[5]),
    })),
    workloads: all("#workloads tr[data-identity]").map((r) => r.dataset.identity),
    updates: Number(stamp.dataset.count),
    last_updated: stamp.textContent,
    error_banner: banner.hidden ? null : banner.textContent,
    same_document: window.__crankLoaded === true,
  };
}

async function run(opts, page, problems) {
  await page.goto(opts.url, { waitUntil: "load", timeout: opts.timeoutMs });
  await page.waitForFunction((ids) => {
    const stamp = document.getElementById("last-updated");
    if (!stamp || Number(stamp.dataset.count) < 1) return false;
    const shown = new Set([...document.querySelectorAll("#mesh g.node[data-identity]")].map((n) => n.dataset.identity));
    return ids.every((id) => shown.has(id));
  }, opts.identities, { timeout: opts.timeoutMs, polling: 100 });
  // Marks this document: a reload would lose it.
  await page.evaluate(() => { window.__crankLoaded = true; });
  const loaded = await page.evaluate(readPage);
  emit({ event: "loaded", ...loaded });
  if (opts.reason !== null) {
    await page.waitForFunction((r) => document.querySelector("#refusals tr[data-reason='" + CSS.escape(r) + "']") !== null,
      opts.reason, { timeout: opts.timeoutMs, polling: 100 });
  }
  await page.waitForFunction((n) => Number(document.getElementById("last-updated").dataset.count) > n,
    loaded.updates, { timeout: opts.timeoutMs, polling: 100 });
  const done = await page.evaluate(readPage);
  await page.screenshot({ path: opts.screenshot, fullPage: true });
  emit({ event: "done", updates_at_load: loaded.updates, problems, ...done });
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  mkdirSync(dirname(opts.screenshot), { recursive: true });
  // Playwright gives the browser a fresh --user-data-dir of its own and
  // removes it on close.
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: ARGS,
    timeout: opts.timeoutMs,
  });
  const page = await browser.newPage({ viewport: { width: 1440, height: 900 } });
  // Console errors, uncaught exceptions and CSP violations all count.
  const problems = [];
  page.on("console", (m) => { if (m.type() === "error") problems.push("console: " + m.text()); });
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  page.on("requestfailed", (r) => problems.push("request failed: " + r.url() + " " + (r.failure() || {}).errorText));
  try {
    await run(opts, page, problems);
  } catch (e) {
    await page.screenshot({ path: opts.screenshot, fullPage: true }).catch(() => {});
    const seen = await page.evaluate(readPage).catch(() => null);
    emit({ event: "error", message: String(e && e.message ? e.message : e), problems, seen });
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  emit({ event: "error", message: String(e && e.message ? e.message : e) });
  process.exit(1);
});
