// The browser sender page (GET /send): camera -> face square -> keypoint detector -> predictive
// stream -> WebRTC data channels, as `python -m sender` does it (sender/__main__.py).
//
// Query options: ?token=SECRET, ?receiver=URL (another receiver than this page's; it must allow
// this origin with --cors-origin), ?autostart=1, ?camera=N (index in the picker), ?backend=
// auto|wasm|webgpu, ?threads=N (WASM threads, default 2), ?codec=pred|q8, ?frames=N (hang up
// after N frames), ?samples=N (keep the last N detector inputs for tests/test_browser_sender.py),
// ?framing=centre (the frame's centre square, as python -m sender --framing centre; default face).
// window.kpcast holds the page's state and stats for people debugging and for the tests.

import * as P from "./protocol.js";
import { DEFAULT_STREAM, PredictiveEncoder, predParams } from "./kpcodec.js";
import { areaResize, loadDetector, toInput } from "./detector.js";
import { FramingDecision, faceBox, faceScore, faceSquare, scanSquares } from "./framing.js";
import { CallError, SenderPeer } from "./peer.js";

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
const HEARTBEAT_MS = 500; // sender/__main__.HEARTBEAT_S
const WIRE_OVERHEAD = 95; // bytes of IPv4 + UDP + DTLS + SCTP per data-channel message (receiver.stats)

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
const kp = {
  state: "loading", error: null, errorKind: null, warning: null, detector: null, square: null, samples: [],
  stats: {
    frames_captured: 0, frames_missed: 0, frames_sent: 0, frames_skipped: 0, keyframes_sent: 0, messages_sent: 0,
    keypoint_message_bytes: 0, keypoint_payload_bytes: 0, kp_dropped: 0, heartbeats_sent: 0, source_images_sent: 0,
    source_image_bytes: 0, source_sha256: null, framing_reframes: 0, framing_no_face: 0, framing_scans: 0,
    keyframe_requests: 0, source_requests: 0, detect_ms: [], frame_ms: [], hello: null, end_reason: null,
  },
};
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

const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

// ------------------------------------------------------------------------- camera

const video = $("preview");
let stream = null;

async function openCamera(deviceId) {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) throw new CallError("insecure", "");
  if (stream) stream.getTracks().forEach((t) => t.stop());
  const video_ = { width: { ideal: 640 }, height: { ideal: 480 }, frameRate: { ideal: 30 } };
  if (deviceId) video_.deviceId = { exact: deviceId };
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
  const current = stream && stream.getVideoTracks()[0].getSettings().deviceId;
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

// ------------------------------------------------------------------------- pixels and keypoints

const grab = document.createElement("canvas");
const grabCtx = grab.getContext("2d", { willReadFrequently: true });
const cropCtx = $("crop").getContext("2d");

/** The square [x0, y0, side] of the current video frame as size x size RGB (area filter). */
function cropRGB(square, size) {
  const [x0, y0, s] = square;
  if (s >= size) {
    if (grab.width !== s) { grab.width = s; grab.height = s; }
    grabCtx.drawImage(video, x0, y0, s, s, 0, 0, s, s);
    return areaResize(grabCtx.getImageData(0, 0, s, s).data, s, s, size, size, 4);
  }
  // a camera smaller than the square: enlarge bilinearly (crop_square uses INTER_LINEAR then)
  if (grab.width !== size) { grab.width = size; grab.height = size; }
  grabCtx.imageSmoothingQuality = "medium";
  grabCtx.drawImage(video, x0, y0, s, s, 0, 0, size, size);
  return areaResize(grabCtx.getImageData(0, 0, size, size).data, size, size, size, size, 4);
}

/** A coarse crop for searching: the canvas scales to twice the detector's size, the area filter halves it. */
function quickCrop(square) {
  const [x0, y0, s] = square, n = 2 * kp.detector.size;
  if (grab.width !== n) { grab.width = n; grab.height = n; }
  grabCtx.imageSmoothingQuality = "high";
  grabCtx.drawImage(video, x0, y0, s, s, 0, 0, n, n);
  return areaResize(grabCtx.getImageData(0, 0, n, n).data, n, n, kp.detector.size, kp.detector.size, 4);
}

async function detect(rgb, side) {
  const size = kp.detector.size;
  const small = side === size ? rgb : areaResize(rgb, side, side, size, size, 3);
  const t0 = performance.now();
  const vec = await kp.detector.run(toInput(small, size));
  return { vec, small, ms: performance.now() - t0 };
}

function showCrop(rgb, size) {
  const img = cropCtx.createImageData(size, size);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    img.data[j] = rgb[i]; img.data[j + 1] = rgb[i + 1]; img.data[j + 2] = rgb[i + 2]; img.data[j + 3] = 255;
  }
  cropCtx.putImageData(img, 0, 0);
}

async function jpeg(rgb, size) {
  const c = new OffscreenCanvas(size, size);
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(size, size);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    img.data[j] = rgb[i]; img.data[j + 1] = rgb[i + 1]; img.data[j + 2] = rgb[i + 2]; img.data[j + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
  const blob = await c.convertToBlob({ type: "image/jpeg", quality: opts.sourceQuality });
  return new Uint8Array(await blob.arrayBuffer());
}

// ------------------------------------------------------------------------- framing

let decision = null;

/** Search the whole frame for the most face-like square; the face box found, or null. */
async function scan() {
  kp.stats.framing_scans += 1;
  const w = video.videoWidth, h = video.videoHeight;
  let best = null;
  for (const sq of scanSquares(w, h)) {
    const { vec } = await detect(quickCrop(sq), kp.detector.size);
    const score = faceScore(vec);
    if (Number.isFinite(score) && (!best || score < best.score)) best = { score, sq, vec };
  }
  if (!best) return null;
  // two refinements: the detector places keypoints best on a square framed like its training clips
  let box = faceBox(best.vec, best.sq);
  for (let i = 0; i < 2; i++) {
    const sq = faceSquare(box, w, h);
    const { vec } = await detect(cropRGB(sq, kp.detector.size), kp.detector.size);
    if (!Number.isFinite(faceScore(vec))) break;
    box = faceBox(vec, sq);
  }
  return box;
}

async function findFace() {
  decision = new FramingDecision(video.videoWidth, video.videoHeight);
  if (opts.framing === "centre") { kp.square = decision.square; return; }
  for (;;) {
    const box = await scan();
    if (box) {
      decision.update(box);
      kp.square = decision.square;
      clearWarning();
      return;
    }
    kp.stats.framing_no_face += 1;
    say("noface", "", "warn");
    setState("looking for a face");
    await new Promise((r) => setTimeout(r, 500));
  }
}

// ------------------------------------------------------------------------- the call

let peer = null, encoder = null, running = false, busy = false;
let seq = 0, imageId = -1, tsBase = 0, lastKpSent = 0, sourceWanted = true, lostStreak = 0;
let last = null; // the newest frame's {seq, capture, vec}, for the last frame of a stream
const recent = []; // [time ms, wire bytes] of keypoint messages in the last seconds

function onMessage(msg) {
  if (msg.type === "SourceRequest") { kp.stats.source_requests += 1; sourceWanted = true; }
  else if (msg.type === "KeyframeRequest") { kp.stats.keyframe_requests += 1; if (encoder) encoder.requestKeyframe(); }
  else if (msg.type === "Bye") {
    kp.stats.end_reason = `bye: ${msg.reason}`;
    running = false;
    if (msg.reason.startsWith("keypoint detector")) fatal("mismatch", msg.reason);
    else if (kp.state !== "ended") { say("ended", `the receiver hung up (${msg.reason})`, "warn"); setState("ended"); }
    peer.close();
  }
}

async function sendSource(rgb) {
  imageId += 1;
  const image = await jpeg(rgb, opts.size);
  await peer.sendSource(image, imageId);
  const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", image));
  kp.stats.source_sha256 = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
  kp.stats.source_images_sent += 1;
  kp.stats.source_image_bytes += image.length;
  sourceWanted = false;
  if (encoder) encoder.requestKeyframe(); // a new picture starts a new predictive chain
}

function sendKeypoints(frameSeq, capture, vec) {
  const st = kp.stats;
  let msg = null, coded = null;
  if (opts.codec === P.Codec.PRED) {
    coded = encoder.encode(frameSeq, vec);
    if (!coded) { st.frames_skipped += 1; return 0; }
    msg = { type: "CodedKeypoints", seq: coded.seq, prev_seq: coded.prev_seq, key: coded.key,
      ts_us: Math.max(0, capture - tsBase), payload: coded.payload, image_id: imageId };
  } else {
    msg = P.keypointBatch(frameSeq, capture, [vec], P.Codec.Q8);
    msg.image_id = imageId;
  }
  const n = peer.sendKeypoints(msg);
  if (!n) {
    st.kp_dropped += 1;
    if (encoder) encoder.requestKeyframe(); // the receiver's chain breaks here anyway
    return 0;
  }
  st.frames_sent += 1;
  st.messages_sent += 1;
  st.keyframes_sent += coded && coded.key ? 1 : 0;
  st.keypoint_payload_bytes += msg.payload.length;
  st.keypoint_message_bytes += n;
  lastKpSent = performance.now();
  recent.push([lastKpSent, n + WIRE_OVERHEAD]);
  return n;
}

async function processFrame(captureMs) {
  const t0 = performance.now();
  const capture = captureMs ? Math.round((performance.timeOrigin + captureMs) * 1000) : nowUs();
  const st = kp.stats;
  const square = decision.square;
  const rgb = cropRGB(square, opts.size);
  const { vec, small, ms } = await detect(rgb, opts.size);
  st.detect_ms.push(ms);
  if (st.detect_ms.length > 300) st.detect_ms.shift();
  if (!running) return;
  st.frames_captured += 1;
  showCrop(rgb, opts.size);
  if (opts.samples) {
    kp.samples.push({ seq, square: [...square], input: Array.from(small), vec: Array.from(vec) });
    if (kp.samples.length > opts.samples) kp.samples.shift();
  }
  if (sourceWanted) await sendSource(rgb);
  sendKeypoints(seq, capture, vec);
  last = { seq, capture, vec };
  // framing: this frame's own keypoints say where the face is (no second detector run)
  if (opts.framing === "face" && seq % opts.detectEvery === 0) {
    const box = Number.isFinite(faceScore(vec)) ? faceBox(vec, square) : null;
    if (box === null) { st.framing_no_face += 1; lostStreak += 1; } else { lostStreak = 0; }
    let next = decision.update(box);
    if (box === null && lostStreak % 6 === 0) next = decision.update(await scan()); // about once a second: search
    if (decision.faceLost) say("noface", "", "warn"); else if (kp.warning === "noface") clearWarning();
    if (next) { st.framing_reframes += 1; kp.square = next; sourceWanted = true; } // the next frame carries a new picture
  }
  if (performance.now() - lastKpSent > HEARTBEAT_MS) {
    peer.sendControl({ type: "Heartbeat", ts_us: nowUs() });
    st.heartbeats_sent += 1;
    lastKpSent = performance.now();
  }
  seq += 1;
  st.frame_ms.push(performance.now() - t0);
  if (st.frame_ms.length > 300) st.frame_ms.shift();
  if (opts.frames && seq >= opts.frames) await hangUp("done");
}

function frameLoop() {
  // one callback per camera frame where the browser has it; a timer at the camera's rate elsewhere
  const rvfc = "requestVideoFrameCallback" in HTMLVideoElement.prototype;
  const fps = stream.getVideoTracks()[0].getSettings().frameRate || 30;
  const schedule = () => { if (running) { if (rvfc) video.requestVideoFrameCallback(tick); else setTimeout(tick, 1000 / fps); } };
  let presented = null;
  async function tick(_now, meta) {
    schedule();
    // camera frames the page never saw: the browser skips callbacks too when it is behind
    if (meta && meta.presentedFrames !== undefined) {
      if (presented !== null) kp.stats.frames_missed += Math.max(0, meta.presentedFrames - presented - 1);
      presented = meta.presentedFrames;
    }
    if (busy) { kp.stats.frames_missed += 1; return; }
    busy = true;
    try {
      await processFrame(meta && meta.captureTime);
    } catch (e) {
      running = false;
      fatal("ended", `the sender failed: ${e.message}`);
      console.error(e);
      if (peer) peer.close();
    } finally {
      busy = false;
    }
  }
  schedule();
}

async function startCall() {
  $("start").disabled = true;
  kp.error = kp.errorKind = null;
  const token = $("token").value;
  try {
    if (!decision) await findFace();
    setState("connecting");
    say("", `calling ${opts.receiver} ...`, "ok");
    peer = new SenderPeer({ onMessage, onClosed: (why) => {
      if (running) { running = false; kp.stats.end_reason = why; say("ended", why, "warn"); setState("ended"); }
    } });
    await peer.connect(opts.receiver, token);
  } catch (e) {
    if (peer) peer.close();
    $("start").disabled = false;
    if (e instanceof CallError) return fatal(e.kind, e.kind === "unreachable" || e.kind === "connect" || e.kind === "refused" ? e.message : "");
    return fatal("connect", e.message);
  }
  // a new call: a new stream (sequence numbers, source image ids, counters) on the framing found so far
  encoder = opts.codec === P.Codec.PRED ? new PredictiveEncoder(DEFAULT_STREAM) : null;
  seq = 0; imageId = -1; sourceWanted = true; last = null; lostStreak = 0; recent.length = 0;
  for (const k of Object.keys(kp.stats)) {
    if (typeof kp.stats[k] === "number") kp.stats[k] = 0; else if (Array.isArray(kp.stats[k])) kp.stats[k] = [];
  }
  kp.stats.end_reason = null;
  kp.samples = [];
  tsBase = nowUs();
  const fps = stream.getVideoTracks()[0].getSettings().frameRate || 30;
  const hello = P.hello({ model: kp.detector.info.id, size: opts.size, fps, codec: opts.codec, kp_every: 1, ts_base_us: tsBase,
    pred: encoder ? predParams(DEFAULT_STREAM) : null });
  peer.sendControl(hello);
  kp.stats.hello = { model: hello.model, size: hello.size, fps: hello.fps, codec: hello.codec };
  kp.stats.started_ms = performance.now();
  running = true;
  lastKpSent = performance.now();
  $("camera").disabled = true; // the square and the source image belong to this camera until hang-up
  setState("live");
  say("", "live", "ok");
  $("stop").disabled = false;
  frameLoop();
}

async function hangUp(reason = "done") {
  if (!running) return;
  running = false;
  // the stream ends on the true last frame: if it was skipped, send it after all (kpsend.finish)
  if (encoder && last && encoder.lastCoded !== last.seq) {
    encoder.requestKeyframe();
    const coded = encoder.encode(last.seq, last.vec);
    kp.stats.frames_skipped -= 1;
    const msg = { type: "CodedKeypoints", seq: coded.seq, prev_seq: coded.prev_seq, key: true,
      ts_us: Math.max(0, last.capture - tsBase), payload: coded.payload, image_id: imageId };
    const n = peer.sendKeypoints(msg);
    if (n) { kp.stats.frames_sent += 1; kp.stats.messages_sent += 1; kp.stats.keyframes_sent += 1; kp.stats.keypoint_message_bytes += n; kp.stats.keypoint_payload_bytes += msg.payload.length; }
  }
  kp.stats.duration_s = (performance.now() - kp.stats.started_ms) / 1000;
  kp.stats.transport = await peer.transportStats();
  kp.stats.end_reason = kp.stats.end_reason || `bye: ${reason}`;
  await peer.close(reason);
  setState("ended");
  say("ended", reason, "ok");
  $("stop").disabled = true;
  $("start").disabled = false;
  $("camera").disabled = false;
}

// ------------------------------------------------------------------------- stats on the page

function percentile(xs, p) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p / 100 * s.length))];
}
const show = (id, x, digits = 0) => { $(id).textContent = x === null || x === undefined ? "-" : typeof x === "number" ? x.toFixed(digits) : String(x); };
let lastFrames = 0, lastTick = performance.now(), lastTransport = null;

/** Outline the face square on the camera preview (object-fit: contain). */
function outline() {
  const box = $("box"), sq = kp.square;
  if (!sq || !video.videoWidth) { box.style.display = "none"; return; }
  const ew = video.clientWidth, eh = video.clientHeight;
  const f = Math.min(ew / video.videoWidth, eh / video.videoHeight);
  const ox = (ew - f * video.videoWidth) / 2, oy = (eh - f * video.videoHeight) / 2;
  Object.assign(box.style, { display: "block", left: `${ox + f * sq[0]}px`, top: `${oy + f * sq[1]}px`,
    width: `${f * sq[2]}px`, height: `${f * sq[2]}px` });
}

setInterval(async () => {
  const st = kp.stats, now = performance.now();
  const dt = (now - lastTick) / 1000;
  kp.fps = (st.frames_captured - lastFrames) / dt;
  lastFrames = st.frames_captured; lastTick = now;
  while (recent.length && recent[0][0] < now - 2000) recent.shift();
  const windowS = Math.min(2, Math.max(0.5, st.started_ms ? (now - st.started_ms) / 1000 : 2));
  kp.kbps = recent.reduce((s, r) => s + r[1], 0) * 8 / windowS / 1000;
  show("backend", kp.detector ? `${kp.detector.backend}${kp.detector.threads ? ` x${kp.detector.threads}` : ""}` : null);
  show("detect_ms", percentile(st.detect_ms, 50), 1);
  show("frames", st.frames_captured);
  show("fps", running ? kp.fps : null, 1);
  show("kbps", running ? kp.kbps : null, 1);
  show("msgs", running ? recent.length / windowS : null, 1);
  show("bpf", st.frames_sent ? st.keypoint_message_bytes / st.frames_sent : null, 1);
  show("skipped", st.frames_skipped);
  show("keys", `${st.keyframes_sent} (${st.keyframe_requests} asked)`);
  show("source", st.source_image_bytes || null);
  show("square", kp.square ? kp.square.join(", ") : null);
  outline();
  if (peer && running) {
    const t = await peer.transportStats();
    if (lastTransport) show("transport", (t.bytesSent - lastTransport.bytesSent) * 8 / 1000 / dt, 1);
    lastTransport = t;
  }
}, 1000);

// ------------------------------------------------------------------------- bench hook (bench/browser.py)

/**
 * The page's detector's throughput (its backend and WASM threads are the page's ?backend= and ?threads=:
 * onnxruntime-web fixes its thread count when it starts), fed the camera's current face square `runs`
 * times after a warm-up. Returns {backend, threads, runs, ms_p50, fps}.
 */
kp.benchDetector = async ({ runs = 60, warmup = 10 } = {}) => {
  const det = kp.detector, size = det.size;
  if (!decision) await findFace();
  const input = toInput(areaResize(cropRGB(decision.square, opts.size), opts.size, opts.size, size, size, 3), size);
  for (let i = 0; i < warmup; i++) await det.run(input);
  const ms = [];
  const t0 = performance.now();
  for (let i = 0; i < runs; i++) {
    const t = performance.now();
    await det.run(input);
    ms.push(performance.now() - t);
  }
  return { backend: det.backend, threads: det.threads, runs, ms_p50: percentile(ms, 50),
    fps: runs / ((performance.now() - t0) / 1000) };
};

// ------------------------------------------------------------------------- start-up

async function main() {
  $("token").value = opts.token;
  $("start").addEventListener("click", startCall);
  $("stop").addEventListener("click", () => hangUp("hung up"));
  $("camera").addEventListener("change", async (ev) => {
    try { await openCamera(ev.target.value); decision = null; } catch (e) { fatal(e.kind || "nocamera", ""); }
  });
  setState("loading");
  say("", "loading the keypoint detector ...", "ok");
  try {
    const resp = await fetch("/send/detector.json", { cache: "no-store" });
    if (!resp.ok) throw new Error(`HTTP ${resp.status}`);
    kp.detector = await loadDetector(await resp.json(), { backend: opts.backend, threads: opts.threads });
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
