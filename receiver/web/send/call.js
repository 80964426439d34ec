// The browser sender's call: camera -> face square -> keypoint detector -> predictive stream ->
// WebRTC data channels, as `python -m sender` does it (sender/__main__.py).
//
// One SenderCall per page (app.js creates it and wires it to the page): it holds the detector, the
// framing found on the current camera, and, during a call, the peer and its channels, the capture
// loop, the stream's state and the counters. start() and stop() may run again for another call on
// the same camera; each call starts a new stream (sequence numbers, source image ids, counters).
// The page is told what to show through `ui` (see the constructor).

import * as P from "./protocol.js";
import { DEFAULT_STREAM, PredictiveEncoder, predParams } from "./kpcodec.js";
import { areaResize, toInput } from "./detector.js";
import { FramingDecision, faceBox, faceScore, faceSquare, scanSquares } from "./framing.js";
import { CallError, SenderPeer } from "./peer.js";

export const HEARTBEAT_MS = 500; // sender/__main__.HEARTBEAT_S
export const WIRE_OVERHEAD = 95; // bytes of IPv4 + UDP + DTLS + SCTP per data-channel message (shared.kpvector.TRANSPORT_OVERHEAD_B)

const nowUs = () => Math.round((performance.timeOrigin + performance.now()) * 1000);

export function percentile(xs, p) {
  if (!xs.length) return null;
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor(p / 100 * s.length))];
}

/** The counters window.kpcast.stats shows (tests/test_browser_sender.py and bench/browser.py read them). */
function newCounters() {
  return {
    frames_captured: 0, frames_missed: 0, frames_sent: 0, frames_skipped: 0, keyframes_sent: 0, messages_sent: 0,
    keypoint_message_bytes: 0, keypoint_payload_bytes: 0, kp_dropped: 0, heartbeats_sent: 0, source_images_sent: 0,
    source_image_bytes: 0, source_sha256: null, framing_reframes: 0, framing_no_face: 0, framing_scans: 0, busy_offers: 0,
    keyframe_requests: 0, source_requests: 0, detect_ms: [], frame_ms: [], hello: null, end_reason: null,
  };
}

export class SenderCall {
  /**
   * opts: the page's options (receiver, codec, frames, samples, framing, size, detectEvery, sourceQuality);
   * video: the camera's <video> element (its srcObject is the camera stream);
   * ui: what the page shows: {say(kind, detail, level), setState(state), fatal(kind, detail), clearWarning(),
   *     showCrop(rgb, size), live(isLive) (the call's controls), state and warning (the page's current ones)}.
   * The detector (detector.js's loadDetector) is set on `detector` once loaded.
   */
  constructor({ opts, video, ui }) {
    this.opts = opts;
    this.video = video;
    this.ui = ui;
    this.detector = null;
    this.onPeer = null; // called with each call's SenderPeer before its offer goes out
    this.decision = null; // the framing on the current camera (sender/framing.FramingDecision)
    this.square = null; // the square [x0, y0, side] sent
    this.samples = []; // the last opts.samples detector inputs, for tests/test_browser_sender.py
    this.counters = newCounters();
    // the call
    this.peer = null;
    this.encoder = null;
    this.running = false;
    this.busy = false;
    this.seq = 0;
    this.imageId = -1;
    this.tsBase = 0;
    this.lastKpSent = 0;
    this.sourceWanted = true;
    this.lostStreak = 0;
    this.last = null; // the newest frame's {seq, capture, vec}, for the last frame of a stream
    this.recent = []; // [time ms, wire bytes] of keypoint messages in the last seconds
    // pixels
    this.grab = document.createElement("canvas");
    this.grabCtx = this.grab.getContext("2d", { willReadFrequently: true });
    // stats()
    this.lastFrames = 0;
    this.lastTick = performance.now();
    this.lastTransport = null;
  }

  get stream() { return this.video.srcObject; }

  /** The camera changed: the face is searched again before the next call. */
  resetFraming() { this.decision = null; }

  // ----------------------------------------------------------------------- pixels and keypoints

  /** The square [x0, y0, side] of the current video frame as size x size RGB (area filter). */
  cropRGB(square, size) {
    const [x0, y0, s] = square, grab = this.grab, grabCtx = this.grabCtx;
    if (s >= size) {
      if (grab.width !== s) { grab.width = s; grab.height = s; }
      grabCtx.drawImage(this.video, x0, y0, s, s, 0, 0, s, s);
      return areaResize(grabCtx.getImageData(0, 0, s, s).data, s, s, size, size, 4);
    }
    // a camera smaller than the square: enlarge bilinearly (crop_square uses INTER_LINEAR then)
    if (grab.width !== size) { grab.width = size; grab.height = size; }
    grabCtx.imageSmoothingQuality = "medium";
    grabCtx.drawImage(this.video, x0, y0, s, s, 0, 0, size, size);
    return areaResize(grabCtx.getImageData(0, 0, size, size).data, size, size, size, size, 4);
  }

  /** A coarse crop for searching: the canvas scales to twice the detector's size, the area filter halves it. */
  quickCrop(square) {
    const [x0, y0, s] = square, n = 2 * this.detector.size, grab = this.grab, grabCtx = this.grabCtx;
    if (grab.width !== n) { grab.width = n; grab.height = n; }
    grabCtx.imageSmoothingQuality = "high";
    grabCtx.drawImage(this.video, x0, y0, s, s, 0, 0, n, n);
    return areaResize(grabCtx.getImageData(0, 0, n, n).data, n, n, this.detector.size, this.detector.size, 4);
  }

  async detect(rgb, side) {
    const size = this.detector.size;
    const small = side === size ? rgb : areaResize(rgb, side, side, size, size, 3);
    const t0 = performance.now();
    const vec = await this.detector.run(toInput(small, size));
    return { vec, small, ms: performance.now() - t0 };
  }

  async jpeg(rgb, size) {
    const c = new OffscreenCanvas(size, size);
    const ctx = c.getContext("2d");
    const img = ctx.createImageData(size, size);
    for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
      img.data[j] = rgb[i]; img.data[j + 1] = rgb[i + 1]; img.data[j + 2] = rgb[i + 2]; img.data[j + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    const blob = await c.convertToBlob({ type: "image/jpeg", quality: this.opts.sourceQuality });
    return new Uint8Array(await blob.arrayBuffer());
  }

  // ----------------------------------------------------------------------- framing

  /** Search the whole frame for the most face-like square; the face box found, or null. */
  async scan() {
    this.counters.framing_scans += 1;
    const w = this.video.videoWidth, h = this.video.videoHeight, size = this.detector.size;
    let best = null;
    for (const sq of scanSquares(w, h)) {
      const { vec } = await this.detect(this.quickCrop(sq), size);
      const score = faceScore(vec);
      if (Number.isFinite(score) && (!best || score < best.score)) best = { score, sq, vec };
    }
    if (!best) return null;
    // two refinements: the detector places keypoints best on a square framed like its training clips
    let box = faceBox(best.vec, best.sq);
    for (let i = 0; i < 2; i++) {
      const sq = faceSquare(box, w, h);
      const { vec } = await this.detect(this.cropRGB(sq, size), size);
      if (!Number.isFinite(faceScore(vec))) break;
      box = faceBox(vec, sq);
    }
    return box;
  }

  async findFace() {
    this.decision = new FramingDecision(this.video.videoWidth, this.video.videoHeight);
    if (this.opts.framing === "centre") { this.square = this.decision.square; return; }
    for (;;) {
      const box = await this.scan();
      if (box) {
        this.decision.update(box);
        this.square = this.decision.square;
        this.ui.clearWarning();
        return;
      }
      this.counters.framing_no_face += 1;
      this.ui.say("noface", "", "warn");
      this.ui.setState("looking for a face");
      await new Promise((r) => setTimeout(r, 500));
    }
  }

  // ----------------------------------------------------------------------- the stream

  onMessage(msg) {
    const st = this.counters;
    if (msg.type === "SourceRequest") { st.source_requests += 1; this.sourceWanted = true; }
    else if (msg.type === "KeyframeRequest") {
      // each request comes on both channels: a copy naming the same frame within 100 ms is not a new one
      const now = performance.now();
      const last = this.lastKeyframeRequest;
      if (last && last.seq === msg.last_seq && now - last.at < 100) return;
      this.lastKeyframeRequest = { seq: msg.last_seq, at: now };
      st.keyframe_requests += 1;
      if (this.encoder) this.encoder.requestKeyframe();
    }
    else if (msg.type === "Bye") {
      st.end_reason = `bye: ${msg.reason}`;
      this.running = false;
      if (msg.reason.startsWith("keypoint detector")) this.ui.fatal("mismatch", msg.reason);
      else if (this.ui.state !== "ended") { this.ui.say("ended", `the receiver hung up (${msg.reason})`, "warn"); this.ui.setState("ended"); }
      this.peer.close();
    }
  }

  async sendSource(rgb) {
    const st = this.counters;
    this.imageId += 1;
    const image = await this.jpeg(rgb, this.opts.size);
    await this.peer.sendSource(image, this.imageId);
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", image));
    st.source_sha256 = Array.from(digest, (b) => b.toString(16).padStart(2, "0")).join("");
    st.source_images_sent += 1;
    st.source_image_bytes += image.length;
    this.sourceWanted = false;
    if (this.encoder) this.encoder.requestKeyframe(); // a new picture starts a new predictive chain
  }

  sendKeypoints(frameSeq, capture, vec) {
    const st = this.counters;
    let msg = null, coded = null;
    if (this.opts.codec === P.Codec.PRED) {
      coded = this.encoder.encode(frameSeq, vec);
      if (!coded) { st.frames_skipped += 1; return 0; }
      msg = { type: "CodedKeypoints", seq: coded.seq, prev_seq: coded.prev_seq, key: coded.key,
        ts_us: Math.max(0, capture - this.tsBase), payload: coded.payload, image_id: this.imageId };
    } else {
      msg = P.keypointBatch(frameSeq, capture, [vec], P.Codec.Q8);
      msg.image_id = this.imageId;
    }
    const n = this.peer.sendKeypoints(msg);
    if (!n) {
      st.kp_dropped += 1;
      if (this.encoder) this.encoder.requestKeyframe(); // the receiver's chain breaks here anyway
      return 0;
    }
    st.frames_sent += 1;
    st.messages_sent += 1;
    st.keyframes_sent += coded && coded.key ? 1 : 0;
    st.keypoint_payload_bytes += msg.payload.length;
    st.keypoint_message_bytes += n;
    this.lastKpSent = performance.now();
    this.recent.push([this.lastKpSent, n + WIRE_OVERHEAD]);
    return n;
  }

  async processFrame(captureMs) {
    const opts = this.opts, st = this.counters;
    const t0 = performance.now();
    const capture = captureMs ? Math.round((performance.timeOrigin + captureMs) * 1000) : nowUs();
    const square = this.decision.square;
    const rgb = this.cropRGB(square, opts.size);
    const { vec, small, ms } = await this.detect(rgb, opts.size);
    st.detect_ms.push(ms);
    if (st.detect_ms.length > 300) st.detect_ms.shift();
    if (!this.running) return;
    st.frames_captured += 1;
    this.ui.showCrop(rgb, opts.size);
    if (opts.samples) {
      this.samples.push({ seq: this.seq, square: [...square], input: Array.from(small), vec: Array.from(vec) });
      if (this.samples.length > opts.samples) this.samples.shift();
    }
    if (this.sourceWanted) await this.sendSource(rgb);
    if (!this.running) return; // the call ended while the picture went out (e.g. the receiver's Bye)
    this.sendKeypoints(this.seq, capture, vec);
    this.last = { seq: this.seq, capture, vec };
    // framing: this frame's own keypoints say where the face is (no second detector run)
    if (opts.framing === "face" && this.seq % opts.detectEvery === 0) {
      const box = Number.isFinite(faceScore(vec)) ? faceBox(vec, square) : null;
      if (box === null) { st.framing_no_face += 1; this.lostStreak += 1; } else { this.lostStreak = 0; }
      let next = this.decision.update(box);
      if (box === null && this.lostStreak % 6 === 0) next = this.decision.update(await this.scan()); // about once a second: search
      if (this.decision.faceLost) this.ui.say("noface", "", "warn"); else if (this.ui.warning === "noface") this.ui.clearWarning();
      if (next) { st.framing_reframes += 1; this.square = next; this.sourceWanted = true; } // the next frame carries a new picture
    }
    if (performance.now() - this.lastKpSent > HEARTBEAT_MS) {
      this.peer.sendControl({ type: "Heartbeat", ts_us: nowUs() });
      st.heartbeats_sent += 1;
      this.lastKpSent = performance.now();
    }
    this.seq += 1;
    st.frame_ms.push(performance.now() - t0);
    if (st.frame_ms.length > 300) st.frame_ms.shift();
    if (opts.frames && this.seq >= opts.frames) await this.stop("done");
  }

  frameLoop() {
    // one callback per camera frame where the browser has it; a timer at the camera's rate elsewhere
    const video = this.video;
    const rvfc = "requestVideoFrameCallback" in HTMLVideoElement.prototype;
    const fps = this.stream.getVideoTracks()[0].getSettings().frameRate || 30;
    const schedule = () => { if (this.running) { if (rvfc) video.requestVideoFrameCallback(tick); else setTimeout(tick, 1000 / fps); } };
    let presented = null;
    const tick = async (_now, meta) => {
      schedule();
      // camera frames the page never saw: the browser skips callbacks too when it is behind
      if (meta && meta.presentedFrames !== undefined) {
        if (presented !== null) this.counters.frames_missed += Math.max(0, meta.presentedFrames - presented - 1);
        presented = meta.presentedFrames;
      }
      if (this.busy) { this.counters.frames_missed += 1; return; }
      this.busy = true;
      try {
        await this.processFrame(meta && meta.captureTime);
      } catch (e) {
        // a call that already ended (a Bye, a closed connection) said why: a send on its closed channel is no news
        const live = this.running;
        this.running = false;
        if (live) this.ui.fatal("ended", `the sender failed: ${e.message}`);
        console.error(e);
        if (this.peer) this.peer.close();
      } finally {
        this.busy = false;
      }
    };
    schedule();
  }

  // ----------------------------------------------------------------------- the call

  /** Find the face if not yet found, connect, send the Hello and start the capture loop; false if it failed. */
  async start(token) {
    const opts = this.opts, ui = this.ui;
    try {
      if (!this.decision) await this.findFace();
      ui.setState("connecting");
      ui.say("", `calling ${opts.receiver} ...`, "ok");
      this.peer = new SenderPeer({ onMessage: (msg) => this.onMessage(msg), onClosed: (why) => {
        if (this.running) { this.running = false; this.counters.end_reason = why; ui.say("ended", why, "warn"); ui.setState("ended"); }
      } });
      // the call page (/call) takes the other side's channels from this connection, before any can open
      if (this.onPeer) this.onPeer(this.peer);
      await this.peer.connect(opts.receiver, token, { onBusy: (n, waitS) =>
        ui.say("", `the receiver is busy (offer ${n}): offering again in ${waitS.toFixed(1)} s`, "warn") });
    } catch (e) {
      if (this.peer) this.peer.close();
      ui.live(false);
      if (e instanceof CallError) ui.fatal(e.kind, e.kind === "unreachable" || e.kind === "connect" || e.kind === "refused" ? e.message : "");
      else ui.fatal("connect", e.message);
      return false;
    }
    // a new call: a new stream (sequence numbers, source image ids, counters) on the framing found so far
    const st = this.counters;
    this.encoder = opts.codec === P.Codec.PRED ? new PredictiveEncoder(DEFAULT_STREAM) : null;
    this.seq = 0; this.imageId = -1; this.sourceWanted = true; this.last = null; this.lostStreak = 0; this.recent.length = 0;
    for (const k of Object.keys(st)) {
      if (typeof st[k] === "number") st[k] = 0; else if (Array.isArray(st[k])) st[k] = [];
    }
    st.end_reason = null;
    st.busy_offers = this.peer.busyOffers || 0; // offers a busy receiver (503) refused before this one got in
    this.samples = [];
    this.tsBase = nowUs();
    const fps = this.stream.getVideoTracks()[0].getSettings().frameRate || 30;
    const hello = P.hello({ model: this.detector.info.id, size: opts.size, fps, codec: opts.codec, kp_every: 1, ts_base_us: this.tsBase,
      pred: this.encoder ? predParams(DEFAULT_STREAM) : null });
    this.peer.sendControl(hello);
    st.hello = { model: hello.model, size: hello.size, fps: hello.fps, codec: hello.codec };
    st.started_ms = performance.now();
    this.running = true;
    this.lastKpSent = performance.now();
    ui.live(true); // the square and the source image belong to this camera until hang-up
    ui.setState("live");
    ui.say("", "live", "ok");
    this.frameLoop();
    return true;
  }

  /** Hang up: the stream's last frame, the transport's figures, a Bye. */
  async stop(reason = "done") {
    if (!this.running) return;
    this.running = false;
    const st = this.counters, encoder = this.encoder, last = this.last;
    // the stream ends on the true last frame: if it was skipped, send it after all (kpsend.finish)
    if (encoder && last && encoder.lastCoded !== last.seq) {
      encoder.requestKeyframe();
      const coded = encoder.encode(last.seq, last.vec);
      st.frames_skipped -= 1;
      const msg = { type: "CodedKeypoints", seq: coded.seq, prev_seq: coded.prev_seq, key: true,
        ts_us: Math.max(0, last.capture - this.tsBase), payload: coded.payload, image_id: this.imageId };
      const n = this.peer.sendKeypoints(msg);
      if (n) { st.frames_sent += 1; st.messages_sent += 1; st.keyframes_sent += 1; st.keypoint_message_bytes += n; st.keypoint_payload_bytes += msg.payload.length; }
    }
    st.duration_s = (performance.now() - st.started_ms) / 1000;
    st.transport = await this.peer.transportStats();
    st.end_reason = st.end_reason || `bye: ${reason}`;
    await this.peer.close(reason);
    this.ui.setState("ended");
    this.ui.say("ended", reason, "ok");
    this.ui.live(false);
  }

  /**
   * The page's once-a-second figures: capture fps since the last stats() and keypoint kbps / messages per
   * second on the wire over the last 2 s; `counters` are the call's own (window.kpcast.stats).
   */
  stats(now = performance.now()) {
    const st = this.counters;
    const dt = (now - this.lastTick) / 1000;
    const fps = (st.frames_captured - this.lastFrames) / dt;
    this.lastFrames = st.frames_captured; this.lastTick = now;
    while (this.recent.length && this.recent[0][0] < now - 2000) this.recent.shift();
    const windowS = Math.min(2, Math.max(0.5, st.started_ms ? (now - st.started_ms) / 1000 : 2));
    return { live: this.running, dt, fps, kbps: this.recent.reduce((s, r) => s + r[1], 0) * 8 / windowS / 1000,
      messagesPerS: this.recent.length / windowS, counters: st };
  }

  /** kbps through the DTLS transport since the last call (over `dt` s), from the browser's stats; null if unknown. */
  async transportKbps(dt) {
    if (!(this.peer && this.running)) return null;
    const t = await this.peer.transportStats();
    const kbps = this.lastTransport ? (t.bytesSent - this.lastTransport.bytesSent) * 8 / 1000 / dt : null;
    this.lastTransport = t;
    return kbps;
  }

  /**
   * The page's detector's throughput (its backend and WASM threads are the page's ?backend= and ?threads=:
   * onnxruntime-web fixes its thread count when it starts), fed the camera's current face square `runs`
   * times after a warm-up. Returns {backend, threads, runs, ms_p50, fps}. (bench/browser.py)
   */
  async benchDetector({ runs = 60, warmup = 10 } = {}) {
    const det = this.detector, size = det.size, opts = this.opts;
    if (!this.decision) await this.findFace();
    const input = toInput(areaResize(this.cropRGB(this.decision.square, opts.size), opts.size, opts.size, size, size, 3), size);
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
  }
}
