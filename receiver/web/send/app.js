// The browser sender page (GET /send): the page's wiring around one SenderCall (call.js: camera ->
// face square -> keypoint detector -> predictive stream -> WebRTC data channels, as `python -m sender`
// does it, sender/__main__.py): options, the camera and its picker, messages, buttons, the stats table.
//
// Query options: ?token=SECRET, ?receiver=URL (another receiver than this page's; it must allow
// this origin with --cors-origin), ?autostart=1, ?camera=N (index in the picker), ?backend=
// auto|wasm|webgpu, ?threads=N (WASM threads, default 2), ?codec=pred|q8, ?frames=N (hang up
// after N frames), ?samples=N (keep the last N detector inputs for tests/test_browser_sender.py),
// ?framing=centre (the frame's centre square, as python -m sender --framing centre; default face).
// window.kpcast holds the page's state and the call's stats for people debugging and for the tests.

import * as P from "./protocol.js";
import { loadDetector } from "./detector.js";
import { CallError } from "./peer.js";
import { SenderCall, percentile } from "./call.js";

const q = new URLSearchParams(location.search);
const opts = {
  token: q.get("token") || "",
  receiver: q.get("receiver") || location.origin,
  autostart: q.get("autostart") === "1",
  camera: q.get("camera"),
  backend: q.get("backend") || "auto",
  threads: Number(q.get("threads") || 2),
  codec: q.get("codec") === "q8" ? P.Codec.Q8 : P.Codec.PRED,
  frames: q.get("frames") ? Number(q.get("frames")) : null,
  samples: Number(q.get("samples") || 0),
  framing: q.get("framing") === "centre" ? "centre" : "face", // python -m sender --framing face|centre
  size: 256, // the captured square and the source image (python -m sender --size)
  detectEvery: 5, // framing check every N frames (sender/framing.FramingConfig.detect_every)
  sourceQuality: 0.9, // JPEG quality of the source image (python -m sender --source-quality 90)
};
const TEXT = {
  insecure: "The camera needs a secure page: open this page as https://, or on localhost (README, \"join from a browser\").",
  nocamera: "No camera found. Connect one, or let this browser use it, and reload.",
  refused: "Camera access was refused. Allow the camera for this page (address bar) and reload.",
  camerabusy: "The camera is in use by another program. Close it and reload.",
  noface: "No face in view: face the camera, close enough to fill a good part of the picture, in light.",
  unreachable: "Cannot reach the receiver",
  token: "The receiver refused the call: wrong or missing token (type it above, or add ?token=SECRET to the address).",
  mismatch: "Detector mismatch: this page's keypoint detector is not the receiver's. Reload this page from the receiver you call.",
  busy: "The receiver is busy: every call slot is taken. Try again later.",
  connect: "The connection did not come up",
  detector: "The keypoint detector could not be loaded",
  ended: "Call ended",
};

const $ = (id) => document.getElementById(id);
const video = $("preview");
const cropCtx = $("crop").getContext("2d");

function showCrop(rgb, size) {
  const img = cropCtx.createImageData(size, size);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    img.data[j] = rgb[i]; img.data[j + 1] = rgb[i + 1]; img.data[j + 2] = rgb[i + 2]; img.data[j + 3] = 255;
  }
  cropCtx.putImageData(img, 0, 0);
}

// ------------------------------------------------------------------------- the page's state and the call

const kp = { state: "loading", error: null, errorKind: null, warning: null };

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

/** The call's controls: the camera, its square and its source image belong to a call until hang-up. */
function live(on) {
  $("camera").disabled = on;
  $("stop").disabled = !on;
  if (!on) $("start").disabled = false;
}

const call = new SenderCall({ opts, video, ui: {
  say, setState, fatal, clearWarning, showCrop, live,
  get state() { return kp.state; },
  get warning() { return kp.warning; },
} });

// window.kpcast: {state, error, errorKind, warning, detector, square, samples, stats, fps, kbps, benchDetector}
Object.defineProperties(kp, {
  detector: { get: () => call.detector, enumerable: true },
  square: { get: () => call.square, enumerable: true },
  samples: { get: () => call.samples, enumerable: true },
  stats: { get: () => call.counters, enumerable: true },
});
kp.benchDetector = (o) => call.benchDetector(o); // bench/browser.py
window.kpcast = kp;

async function startCall() {
  $("start").disabled = true;
  kp.error = kp.errorKind = null;
  await call.start($("token").value);
}

// ------------------------------------------------------------------------- camera

/** The camera's stream into the preview (video.srcObject, where the call takes its frames from). */
async function openCamera(deviceId) {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) throw new CallError("insecure", "");
  if (video.srcObject) video.srcObject.getTracks().forEach((t) => t.stop());
  const video_ = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } };
  if (deviceId) video_.deviceId = { exact: deviceId };
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: video_, audio: false });
  } catch (e) {
    if (e.name === "NotAllowedError" || e.name === "SecurityError") throw new CallError("refused", "");
    if (e.name === "NotFoundError" || e.name === "OverconstrainedError") throw new CallError("nocamera", "");
    if (e.name === "NotReadableError") throw new CallError("camerabusy", "");
    throw new CallError("nocamera", `${e.name}: ${e.message}`);
  }
  video.srcObject = stream;
  await video.play();
  while (!video.videoWidth) await new Promise((r) => setTimeout(r, 20));
  return stream;
}

async function listCameras() {
  const sel = $("camera");
  const cams = (await navigator.mediaDevices.enumerateDevices()).filter((d) => d.kind === "videoinput");
  const current = video.srcObject && video.srcObject.getVideoTracks()[0].getSettings().deviceId;
  sel.innerHTML = "";
  cams.forEach((c, i) => {
    const o = document.createElement("option");
    o.value = c.deviceId;
    o.textContent = c.label || `camera ${i + 1}`;
    o.selected = c.deviceId === current;
    sel.appendChild(o);
  });
  return cams;
}

// ------------------------------------------------------------------------- stats on the page

const show = (id, x, digits = 0) => { $(id).textContent = x === null || x === undefined ? "-" : typeof x === "number" ? x.toFixed(digits) : String(x); };

/** Outline the face square on the camera preview (object-fit: contain). */
function outline() {
  const box = $("box"), sq = call.square;
  if (!sq || !video.videoWidth) { box.style.display = "none"; return; }
  const ew = video.clientWidth, eh = video.clientHeight;
  const f = Math.min(ew / video.videoWidth, eh / video.videoHeight);
  const ox = (ew - f * video.videoWidth) / 2, oy = (eh - f * video.videoHeight) / 2;
  Object.assign(box.style, { display: "block", left: `${ox + f * sq[0]}px`, top: `${oy + f * sq[1]}px`,
    width: `${f * sq[2]}px`, height: `${f * sq[2]}px` });
}

setInterval(async () => {
  const s = call.stats(), st = s.counters, det = call.detector;
  kp.fps = s.fps;
  kp.kbps = s.kbps;
  show("backend", det ? `${det.backend}${det.threads ? ` x${det.threads}` : ""}` : null);
  show("detect_ms", percentile(st.detect_ms, 50), 1);
  show("frames", st.frames_captured);
  show("fps", s.live ? s.fps : null, 1);
  show("kbps", s.live ? s.kbps : null, 1);
  show("msgs", s.live ? s.messagesPerS : null, 1);
  show("bpf", st.frames_sent ? st.keypoint_message_bytes / st.frames_sent : null, 1);
  show("skipped", st.frames_skipped);
  show("keys", `${st.keyframes_sent} (${st.keyframe_requests} asked)`);
  show("source", st.source_image_bytes || null);
  show("square", call.square ? call.square.join(", ") : null);
  outline();
  const kbps = await call.transportKbps(s.dt);
  if (kbps !== null) show("transport", kbps, 1);
}, 1000);

// ------------------------------------------------------------------------- start-up

async function main() {
  $("token").value = opts.token;
  $("start").addEventListener("click", startCall);
  $("stop").addEventListener("click", () => call.stop("hung up"));
  $("camera").addEventListener("change", async (ev) => {
    try { await openCamera(ev.target.value); call.resetFraming(); } catch (e) { fatal(e.kind || "nocamera", ""); }
  });
  setState("loading");
  say("", "loading the keypoint detector ...", "ok");
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
  setState("ready");
  say("", "ready: press Start call", "ok");
  $("start").disabled = false;
  if (opts.autostart) await startCall();
}

main();
