// The dashboard page against a bad /api/state, for tests/tests/dashboard.rs
// (and by hand):
//
//   node tests/browser/resilience.mjs [--timeout S]
//
// It serves control-plane/dashboard/ itself (Playwright answers every
// request of http://crank.test/, nothing goes to the network) and answers
// /api/state with: first a state whose refusal times no Date can hold (a
// sidecar's clock, far ahead), then one request that never gets an answer,
// then good states. A page that survives renders the first (no error), shows
// the error banner once the hung request times out, and polls again after
// it. It prints one JSON line, {"event":"done",...} with what it saw, or
// {"event":"error","message":...} and exits 1.
import { chromium } from "playwright-core";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const ARGS = [
  "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync",
  "--disable-dev-shm-usage",
];
// DASHBOARD_DIR: another copy of the page (to check an older one fails).
const DASHBOARD = process.env.DASHBOARD_DIR || join(dirname(fileURLToPath(import.meta.url)), "../../control-plane/dashboard");
const TYPES = { "": "text/html", "index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css", "favicon.svg": "image/svg+xml" };

function emit(obj) {
  process.stdout.write(JSON.stringify(obj) + "\n");
}

function state(atMs) {
  const refusal = (at, path) => ({ at_ms: at, status: 429, reason: "rate-limited", route: "hello", method: "GET", path, source: null, proxy: "front.acme.crank.local", instance: "i" });
  return {
    generated_at: Math.floor(Date.now() / 1000), trust_domain: "crank.local", config: {},
    workloads: [], edges: [], certs: [], routes: [], slos: [],
    refusals: [refusal(atMs, "/a"), refusal(Number.MAX_SAFE_INTEGER, "/b"), refusal(Date.now(), "/c")],
  };
}

async function run(page, timeoutMs) {
  let asked = 0;
  await page.route("http://crank.test/**", async (route) => {
    const path = new URL(route.request().url()).pathname.slice(1);
    if (path === "api/state") {
      asked += 1;
      if (asked === 1) return route.fulfill({ contentType: "application/json", body: JSON.stringify(state(8.7e15)) });
      if (asked === 2) return; // never answered
      return route.fulfill({ contentType: "application/json", body: JSON.stringify(state(Date.now())) });
    }
    if (!(path in TYPES)) return route.fulfill({ status: 404, body: "" });
    return route.fulfill({ contentType: TYPES[path], body: readFileSync(join(DASHBOARD, path || "index.html")) });
  });
  await page.goto("http://crank.test/", { waitUntil: "load", timeout: timeoutMs });
  const count = () => Number(document.getElementById("last-updated").dataset.count || 0);
  await page.waitForFunction(`(${count})() >= 1`, null, { timeout: timeoutMs, polling: 100 });
  const first = await page.evaluate(() => ({
    rows: document.querySelectorAll("#refusals tr[data-reason]").length,
    times: [...document.querySelectorAll("#refusals td.when")].map((td) => td.firstChild.textContent),
  }));
  await page.waitForFunction(() => !document.getElementById("error").hidden, null, { timeout: timeoutMs, polling: 100 });
  const banner = await page.evaluate(() => document.getElementById("error").textContent);
  await page.waitForFunction(`(${count})() >= 2`, null, { timeout: timeoutMs, polling: 100 });
  const after = await page.evaluate(() => ({ hidden: document.getElementById("error").hidden }));
  return { first, banner, banner_cleared: after.hidden, asked };
}

async function main() {
  const i = process.argv.indexOf("--timeout");
  const timeoutMs = (i > 0 ? Number(process.argv[i + 1]) : 60) * 1000;
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium", headless: true, args: ARGS, timeout: timeoutMs,
  });
  const page = await browser.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push("page error: " + e.message));
  try {
    emit({ event: "done", problems, ...(await run(page, timeoutMs)) });
  } catch (e) {
    emit({ event: "error", message: String(e && e.message ? e.message : e), problems });
    process.exitCode = 1;
  } finally {
    await browser.close();
  }
}

main().catch((e) => {
  emit({ event: "error", message: String(e && e.message ? e.message : e) });
  process.exit(1);
});
