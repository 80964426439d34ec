// Drives the browser sender page (GET /send) in headless Chromium with playwright-core, for
// bench/chromium.py: one JSON job as argv[2], one JSON result on stdout.
//
// job: {executable, args: [chromium flags], pages: [page, ...]}, each page opened in turn, in a
//      fresh browser context: {url, waitFor: [states], timeoutMs, grantCamera: origin|null,
//      screenshot: {path, afterFrames}|null, evaluate: "JS expression"|null, collectSamples: bool}
// result: [{state, error, errorKind, warning, stats, square, detector, samples, evaluated, console,
//           timedOut, remote (the call page's counters of the other side's stream)}, ...], one per page

import { chromium } from "playwright-core";

const job = JSON.parse(process.argv[2]);
const browser = await chromium.launch({ executablePath: job.executable, headless: true, args: job.args || [] });
const results = [];
try {
  for (const p of job.pages) results.push(await runPage(p));
} finally {
  await browser.close();
}
process.stdout.write(JSON.stringify(results));

async function runPage(p) {
  const logs = [];
  const out = { console: logs, timedOut: false };
  const context = await browser.newContext({ viewport: { width: 1200, height: 760 } });
  try {
    if (p.grantCamera) await context.grantPermissions(["camera"], { origin: p.grantCamera });
    const page = await context.newPage();
    page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`.slice(0, 500)));
    page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`.slice(0, 500)));
    await page.goto(p.url);
    const deadline = Date.now() + (p.timeoutMs || 60000);
    const left = () => Math.max(1000, deadline - Date.now());
    try {
      if (p.screenshot) {
        await page.waitForFunction((n) => window.kpcast && (window.kpcast.stats.frames_captured >= n || window.kpcast.state === "error"),
          p.screenshot.afterFrames, { timeout: left(), polling: 100 });
        await page.screenshot({ path: p.screenshot.path });
      }
      if (p.evaluate) out.evaluated = await page.evaluate(p.evaluate);
      await page.waitForFunction((states) => window.kpcast && states.includes(window.kpcast.state), p.waitFor,
        { timeout: left(), polling: 100 });
    } catch (e) {
      if (e.name !== "TimeoutError") throw e;
      out.timedOut = true;
    }
    Object.assign(out, await page.evaluate((samples) => {
      const k = window.kpcast || {};
      return { state: k.state, error: k.error, remote: k.remote, errorKind: k.errorKind, warning: k.warning, stats: k.stats, square: k.square,
        detector: k.detector ? { backend: k.detector.backend, threads: k.detector.threads, id: k.detector.info.id } : null,
        samples: samples ? k.samples : undefined, isolated: globalThis.crossOriginIsolated };
    }, !!p.collectSamples));
  } finally {
    await context.close();
  }
  return out;
}
