// The browser call page (GET /call): this browser's face out, exactly as the sender page sends it (one
// SenderCall, /send/js/call.js), and the other side's face in, rendered here from its keypoints
// (RemoteStream, remote.js, on the same peer connection), with a small mirrored self-view.
//
// Query options: the sender page's (?token, ?autostart=1, ?backend=auto|wasm|webgpu, ?threads=N, ?codec,
// ?frames=N (hang up after N own frames), ?framing=centre, ?camera=N) plus ?render_only=1 (load the renderer
// and stop: bench/browser.py --render-only). window.kpcast: {state, error, errorKind, warning, stats (own
// half's counters), remote (the other side's counters), remoteFps, renderer, detector, benchRender}.

import * as P from "/send/js/protocol.js";
import { loadDetector } from "/send/js/detector.js";
import { CallError } from "/send/js/peer.js";
import { SenderCall, percentile } from "/send/js/call.js";
import { loadRenderer, benchRender } from "./render.js";
import { RemoteStream } from "./remote.js";

const q = new URLSearchParams(location.search);
const opts = {
  token: q.get("token") || "",
  receiver: location.origin, // the other side serves this page and answers its offer
  autostart: q.get("autostart") === "1",
  camera: q.get("camera"),
  backend: q.get("backend") || "auto",
  threads: Number(q.get("threads") || 2),
  codec: q.get("codec") === "q8" ? P.Codec.Q8 : P.Codec.PRED,
  frames: q.get("frames") ? Number(q.get("frames")) : null,
  samples: 0,
  framing: q.get("framing") === "centre" ? "centre" : "face",
  size: 256,
  detectEvery: 5,
  sourceQuality: 0.9,
  renderOnly: q.get("render_only") === "1",
};
const TEXT = {
  insecure: "The camera needs a secure page: open this page as https://, or on localhost.",
  nocamera: "No camera found. Connect one, or let this browser use it, and reload.",
  refused: "Camera access was refused. Allow the camera for this page (address bar) and reload.",
  camerabusy: "The camera is in use by another program. Close it and reload.",
  noface: "No face in view: face the camera, close enough to fill a good part of the picture, in light.",
  unreachable: "Cannot reach the other side",
  token: "The other side refused the call: wrong or missing token (type it above, or add ?token=SECRET to the address).",
  mismatch: "Detector mismatch: this page's keypoint detector is not the other side's. Reload this page from the side you call.",
  busy: "The other side is busy: it is already in a call. Try again later.",
  connect: "The connection did not come up",
  detector: "The keypoint detector could not be loaded",
  renderer: "The renderer could not be loaded",
  ended: "Call ended",
};

const $ = (id) => document.getElementById(id);
const video = $("self");
const kp = { state: "loading", error: null, errorKind: null, warning: null, renderer: null };
window.kpcast = kp;

function say(kind, detail = "", level = "error") {
  const text = TEXT[kind] ? TEXT[kind] + (detail ? `: ${detail}` : "") : detail;
  $("message").textContent = text;
  $("message").className = level;
  if (level === "error") { kp.error = text; kp.errorKind = kind; } else if (level === "warn") { kp.warning = kind; }
}
function clearWarning() {
  if (kp.warning) { kp.warning = null; $("message").textContent = ""; $("message").className = ""; }
}
function setState(s) { kp.state = s; $("state").textContent = s; }
function fatal(kind, detail) { say(kind, detail); setState("error"); }
function live(on) {
  $("camera").disabled = on;
  $("stop").disabled = !on;
  if (!on) $("start").disabled = false;
}

const call = new SenderCall({ opts, video, ui: {
  say, setState, fatal, clearWarning, showCrop: () => {}, live,
  get state() { return kp.state; },
  get warning() { return kp.warning; },
} });
let remote = null;

Object.defineProperties(kp, {
  detector: { get: () => call.detector && { backend: call.detector.backend, threads: call.detector.threads, info: call.detector.info }, enumerable: true },
  square: { get: () => call.square, enumerable: true },
  stats: { get: () => call.counters, enumerable: true },
  remote: { get: () => remote && remote.counters, enumerable: true },
});

async function startCall() {
  $("start").disabled = true;
  kp.error = kp.errorKind = null;
  $("waiting").textContent = "waiting for the other side's face ...";
  await call.start($("token").value);
}

async function openCamera(deviceId) {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) throw new CallError("insecure", "");
  if (video.srcObject) video.srcObject.getTracks().forEach((t) => t.stop());
  const v = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } };
  if (deviceId) v.deviceId = { exact: deviceId };
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: v, audio: false });
  } catch (e) {
    if (e.name === "NotAllowedError" || e.name === "SecurityError") throw new CallError("refused", "");
    if (e.name === "NotFoundError" || e.name === "OverconstrainedError") throw new CallError("nocamera", "");
    if (e.name === "NotReadableError") throw new CallError("camerabusy", "");
    throw new CallError("nocamera", `${e.name}: ${e.message}`);
  }
  video.srcObject = stream;
  await video.play();
  while (!video.videoWidth) await new Promise((r) => setTimeout(r, 20));
}

async function listCameras() {
  const sel = $("camera");
  const cams = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  sel.innerHTML = "";
  cams.forEach((c, i) => {
    const o = document.createElement("option");
    o.value = c.deviceId;
    o.textContent = c.label || `camera ${i + 1}`;
    sel.appendChild(o);
  });
  return cams;
}

const show = (id, x, digits = 0) => { $(id).textContent = x === null || x === undefined ? "-" : typeof x === "number" ? x.toFixed(digits) : String(x); };

setInterval(() => {
  const s = call.stats(), st = s.counters, det = call.detector;
  kp.fps = s.fps;
  show("backend", det ? `${det.backend}${det.threads ? ` x${det.threads}` : ""}` : null);
  show("detect_ms", percentile(st.detect_ms, 50), 1);
  show("frames", st.frames_captured);
  show("fps", s.live ? s.fps : null, 1);
  show("kbps", s.live ? s.kbps : null, 1);
  if (remote) {
    const r = remote.rates(), rc = remote.counters;
    kp.remoteFps = r.fps;
    show("render_ms", percentile(rc.render_ms, 50), 1);
    show("rendered", rc.frames_rendered);
    show("remote_fps", r.fps, 1);
    show("remote_kbps", r.kbps, 1);
  }
}, 1000);

// Both halves share one thread (onnxruntime-web computes on the page's thread) and, on a small machine, the
// CPU: a render (~100-200 ms of WASM at 64 x 64) between every two frames of our own, never several in a
// row while our camera has a frame waiting. Our own stream goes first: the other side hangs up on a
// sender that falls silent, while a late picture of theirs only freezes a moment.
let ownFramesAtRender = -1;
async function ownFrameFirst() {
  const fps = (video.srcObject && video.srcObject.getVideoTracks()[0].getSettings().frameRate) || 30;
  const deadline = performance.now() + 1500 / fps;
  const st = call.counters;
  while (call.running && (call.busy || st.frames_captured === ownFramesAtRender) && performance.now() < deadline) {
    await new Promise((r) => setTimeout(r, 5));
  }
  while (call.busy) await new Promise((r) => setTimeout(r, 5)); // never in the middle of one of ours
  ownFramesAtRender = st.frames_captured;
}

async function main() {
  $("token").value = opts.token;
  $("start").addEventListener("click", startCall);
  $("stop").addEventListener("click", () => call.stop("hung up"));
  setState("loading");
  say("", "loading the renderer and the keypoint detector ...", "ok");
  let renderer, renderInfo;
  try {
    const resp = await fetch("/call/render.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    renderInfo = await resp.json();
    renderer = await loadRenderer(renderInfo, { backend: opts.backend, threads: opts.threads });
  } catch (e) {
    return fatal("renderer", e.message);
  }
  kp.renderer = { backend: renderer.backend, threads: renderer.threads, size: renderer.size };
  kp.benchRender = (o) => benchRender(renderer, o);
  show("render_backend", `${renderer.backend}${renderer.threads ? ` x${renderer.threads}` : ""}`);
  if (opts.renderOnly) { setState("ready"); say("", "renderer loaded", "ok"); return; }
  remote = new RemoteStream({ renderer, detectorId: renderInfo.detector_id, canvas: $("remote"), ui: {
    say: (kind, detail) => say(kind, detail, "warn"),
    onFrame: () => { $("waiting").style.display = "none"; },
    beforeRender: ownFrameFirst,
    // the other side hung up: this side's half ends too, as python -m kpcast call does
    onEnded: (reason) => { if (kp.state === "live") call.stop(`the other side ended the call: ${reason}`); },
  } });
  call.onPeer = (peer) => remote.attach(peer.pc);
  try {
    const resp = await fetch("/send/detector.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    call.detector = await loadDetector(await resp.json(), { backend: opts.backend, threads: opts.threads });
  } catch (e) {
    return fatal("detector", e.message);
  }
  try {
    await openCamera(null);
    const cams = await listCameras();
    if (opts.camera !== null && cams[Number(opts.camera)]) await openCamera(cams[Number(opts.camera)].deviceId);
  } catch (e) {
    return fatal(e.kind || "nocamera", e.kind ? "" : e.message);
  }
  $("camera").addEventListener("change", async (ev) => {
    try { await openCamera(ev.target.value); call.resetFraming(); } catch (e) { fatal(e.kind || "nocamera", ""); }
  });
  setState("ready");
  say("", "ready: press Start call", "ok");
  $("start").disabled = false;
  if (opts.autostart) await startCall();
}

main();
