// The browser call page (GET /call): this browser's face out, as the sender page sends it, and the other
// side's face in, rendered here from its keypoints.
//
// Query options: those of the sender page (app.js in /send/js/: ?token, ?autostart, ?backend, ?threads,
// ?frames, ?framing, ...) plus ?render_only=1 (load the renderer only: bench/browser.py --render-only).
// window.kpcast holds the page's state, both halves' counters and benchRender for bench/browser.py.

import { loadRenderer, benchRender } from "./render.js";

const q = new URLSearchParams(location.search);
const opts = {
  backend: q.get("backend") || "auto",
  threads: Number(q.get("threads") || 2),
  renderOnly: q.get("render_only") === "1",
};

const $ = (id) => document.getElementById(id);
const kp = { state: "loading", error: null, errorKind: null, warning: null, renderer: null };
window.kpcast = kp;

function setState(s) { kp.state = s; $("state").textContent = s; }
function fatal(kind, detail) {
  kp.error = detail; kp.errorKind = kind;
  $("message").textContent = `${kind}: ${detail}`;
  $("message").className = "error";
  setState("error");
}

async function main() {
  setState("loading");
  let renderer;
  try {
    const resp = await fetch("/call/render.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    renderer = await loadRenderer(await resp.json(), { backend: opts.backend, threads: opts.threads });
  } catch (e) {
    return fatal("renderer", e.message);
  }
  kp.renderer = { backend: renderer.backend, threads: renderer.threads, size: renderer.size };
  kp.benchRender = (o) => benchRender(renderer, o);
  $("render_backend").textContent = `${renderer.backend}${renderer.threads ? ` x${renderer.threads}` : ""}`;
  if (opts.renderOnly) { setState("ready"); return; }
}

main();
