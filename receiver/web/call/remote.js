// The other side's face in the call page: its stream, taken from the page's own peer connection, decoded
// and rendered here (receiver/session.py's job, cut down to what a page needs).
//
// The other side (python -m kpcast call --listen) opens its own "control" and "kp" channels on the
// connection this page offered (kpcast/call.py); they arrive as "datachannel" events. On them: its Hello
// (detector, codec, stream parameters), its source image in chunks (reassembled, checked against its
// digest, shrunk to the render size with the area filter as receiver/render.prepare does, bound to the
// render graph, then SourceReady), its keypoints (Q8 batches, or the predictive stream decoded by
// kpcodec.js's PredictiveDecoder, with KeyframeRequest on a loss) and its Bye. Playout is immediate: the
// newest decoded vector is rendered whenever the renderer is free, older ones are skipped (the "last"
// predictor's skipped frames repeat the picture anyway).

import * as P from "/send/js/protocol.js";
import { PredictiveDecoder, configFromParams } from "/send/js/kpcodec.js";
import { areaResize, toInput } from "/send/js/detector.js";
import { toRGBA } from "./render.js";

const KEYFRAME_REQUEST_MS = 300; // at most this often (the sender answers each with a keyframe)
// The other side sends something at least every 0.5 s (keypoints or a Heartbeat): silent for this long after
// its Hello, it is gone (receiver/session.py's heartbeat_timeout_s). A vanished peer leaves the connection
// "connected" for seconds (ICE consent checks), so the page cannot wait for the connection state.
const SILENT_MS = 1500;
const WATCH_MS = 250; // how often the watchdog looks; a page blocked longer counts only this much silence per look

function newCounters() {
  return { hello: null, source_images: 0, source_image_bytes: 0, keypoint_messages: 0, keypoint_message_bytes: 0,
    frames_decoded: 0, frames_rendered: 0, frames_skipped_render: 0, keyframe_requests: 0, rejected: 0,
    render_ms: [], picture_means: [], end_reason: null, ended_at_ms: null };
}

export class RemoteStream {
  /**
   * renderer: render.js's loadRenderer; detectorId: the detector the render graph was trained with (the
   * other side's Hello must name it); canvas: where the face goes; ui: {say(kind, detail, level),
   * onEnded(reason) (the page decides what the end of the other side's stream means), onFrame(),
   * beforeRender() (awaited before each render: the page's own half may go first)}.
   */
  constructor({ renderer, detectorId, canvas, ui }) {
    this.renderer = renderer;
    this.detectorId = detectorId;
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d");
    this.ui = ui;
    this.reset();
  }

  reset() {
    this.counters = newCounters();
    this.control = null;
    this.decoder = null;
    this.codec = null;
    this.chunks = null; // {image_id, total, total_bytes, digest, parts: Map}
    this.imageId = null; // the source image bound to the renderer
    this.latest = null; // {seq, vector} newest decoded, not yet rendered
    this.rendering = false;
    this.lastKeyframeRequest = 0;
    this.recent = []; // [time ms, wire bytes] of keypoint messages
    this.rendered = []; // times of rendered frames
    this.ended = false;
    this.heard = false; // a message since the watchdog's last look
    this.silentMs = 0;
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = null;
  }

  /** Ends the stream when the other side has said nothing for SILENT_MS since its Hello. Silence is summed
   * per look, at most 2 x WATCH_MS each: a page whose thread was busy (a WASM render) for a second did not
   * hear the messages queued meanwhile, and must not call that silence. */
  watch() {
    let last = performance.now();
    this.watchdog = setInterval(() => {
      const now = performance.now();
      const step = Math.min(now - last, 2 * WATCH_MS);
      last = now;
      if (this.ended || !this.counters.hello) return;
      if (this.heard) { this.heard = false; this.silentMs = 0; return; }
      this.silentMs += step;
      if (this.silentMs > SILENT_MS) this.end(`the other side went silent (nothing for ${(this.silentMs / 1000).toFixed(1)} s)`);
    }, WATCH_MS);
  }

  /** Take the other side's channels from `pc` (call before the offer goes out). */
  attach(pc) {
    this.reset();
    this.watch();
    pc.addEventListener("datachannel", (ev) => {
      const ch = ev.channel;
      ch.binaryType = "arraybuffer";
      if (ch.label === "control") {
        this.control = ch;
        ch.addEventListener("message", (m) => this.onMessage(m.data, "control"));
      } else if (ch.label === "kp") {
        ch.addEventListener("message", (m) => this.onMessage(m.data, "kp"));
      }
    });
  }

  send(msg) {
    if (this.control && this.control.readyState === "open") this.control.send(P.encode(msg));
  }

  onMessage(data, label) {
    let msg;
    try {
      msg = P.decode(new Uint8Array(data));
    } catch (e) {
      this.counters.rejected += 1;
      return;
    }
    const st = this.counters;
    this.heard = true;
    if (msg.type === "Hello") {
      if (msg.model !== this.detectorId) {
        this.ui.say("mismatch", `the other side's detector ${msg.model} is not this page's ${this.detectorId}`);
        return;
      }
      st.hello = { model: msg.model, size: msg.size, fps: msg.fps, codec: msg.codec };
      this.codec = msg.codec;
      this.decoder = msg.codec === P.Codec.PRED && msg.pred ? new PredictiveDecoder(configFromParams(msg.pred)) : null;
    } else if (msg.type === "SourceChunk") {
      this.onChunk(msg).catch((e) => { st.rejected += 1; console.warn("source image:", e.message); });
    } else if (msg.type === "CodedKeypoints" || msg.type === "KeypointBatch") {
      st.keypoint_messages += 1;
      st.keypoint_message_bytes += data.byteLength;
      this.recent.push([performance.now(), data.byteLength + 95]);
      this.onKeypoints(msg);
    } else if (msg.type === "Bye") {
      this.end(`bye: ${msg.reason}`);
    } // Heartbeat: liveness only; the connection's state tells the page when the other side is gone
  }

  async onChunk(c) {
    if (!this.chunks || this.chunks.image_id !== c.image_id) {
      if (this.imageId !== null && c.image_id <= this.imageId) return; // an old image
      this.chunks = { image_id: c.image_id, total: c.total, total_bytes: c.total_bytes, digest: c.digest, parts: new Map() };
    }
    const a = this.chunks;
    a.parts.set(c.index, c.data);
    if (a.parts.size < a.total) return;
    this.chunks = null;
    const blob = new Uint8Array(a.total_bytes);
    let o = 0;
    for (let i = 0; i < a.total; i++) {
      const part = a.parts.get(i);
      if (!part || o + part.length > blob.length) throw new Error("chunks do not add up");
      blob.set(part, o); o += part.length;
    }
    const d = await P.digest16(blob);
    if (o !== blob.length || d.some((x, i) => x !== a.digest[i])) throw new Error("digest mismatch");
    const bitmap = await createImageBitmap(new Blob([blob]));
    // receiver/render.prepare: the centre square, area-shrunk to the render size
    const s = Math.min(bitmap.width, bitmap.height), size = this.renderer.size;
    const c2 = new OffscreenCanvas(s, s), g = c2.getContext("2d");
    g.drawImage(bitmap, (bitmap.width - s) / 2 | 0, (bitmap.height - s) / 2 | 0, s, s, 0, 0, s, s);
    const rgb = areaResize(g.getImageData(0, 0, s, s).data, s, s, size, size, 4);
    await this.renderer.bind(toInput(rgb, size));
    this.imageId = a.image_id;
    this.counters.source_images += 1;
    this.counters.source_image_bytes += blob.length;
    this.send({ type: "SourceReady", image_id: a.image_id });
    this.pump();
  }

  onKeypoints(msg) {
    const st = this.counters;
    if (msg.image_id != null && this.imageId !== null && msg.image_id < this.imageId) return; // an old image's
    let newest = null;
    if (msg.type === "KeypointBatch") {
      const vecs = P.decodeVectors(msg.payload, msg.codec);
      st.frames_decoded += vecs.length;
      newest = { seq: msg.seq0 + (vecs.length - 1) * msg.step, vector: vecs[vecs.length - 1] };
    } else if (this.decoder) {
      let frames;
      try {
        frames = this.decoder.push({ seq: msg.seq, prev_seq: msg.prev_seq, key: msg.key, payload: msg.payload });
      } catch (e) {
        st.rejected += 1;
        frames = [];
      }
      st.frames_decoded += frames.length;
      if (frames.length) newest = frames[frames.length - 1];
      const now = performance.now();
      if (this.decoder.needsKeyframe && now - this.lastKeyframeRequest > KEYFRAME_REQUEST_MS) {
        this.lastKeyframeRequest = now;
        st.keyframe_requests += 1;
        this.send({ type: "KeyframeRequest", last_seq: this.decoder.lastSeq });
      }
    }
    if (newest) {
      if (this.latest) st.frames_skipped_render += 1;
      this.latest = newest;
      this.pump();
    }
  }

  /** Render the newest vector if the renderer is free and a source is bound; again while newer ones came. */
  async pump() {
    if (this.rendering || !this.renderer.ready || this.imageId === null) return;
    this.rendering = true;
    const size = this.renderer.size;
    const img = this.ctx.createImageData(size, size);
    try {
      while (this.latest && !this.ended) {
        // this page's own face goes first: the other side hangs up on a sender that falls silent
        if (this.ui.beforeRender) await this.ui.beforeRender();
        if (!this.latest || this.ended) break;
        const { vector } = this.latest;
        this.latest = null;
        const t = performance.now();
        const frame = await this.renderer.render(Float32Array.from(vector));
        this.counters.render_ms.push(performance.now() - t);
        if (this.counters.render_ms.length > 300) this.counters.render_ms.shift();
        toRGBA(frame, size, img.data);
        this.ctx.putImageData(img, 0, 0);
        this.counters.frames_rendered += 1;
        this.rendered.push(performance.now());
        // a picture statistic per frame, for tests: a face that moves changes it
        let sum = 0;
        for (let i = 0; i < img.data.length; i += 4) sum += img.data[i] + img.data[i + 1] + img.data[i + 2];
        this.counters.picture_means.push(sum / (3 * size * size));
        if (this.counters.picture_means.length > 1000) this.counters.picture_means.shift();
        this.ui.onFrame && this.ui.onFrame();
      }
    } catch (e) {
      console.error("render failed:", e);
      this.ui.say("renderer", e.message);
    } finally {
      this.rendering = false;
    }
  }

  end(reason) {
    if (this.ended) return;
    this.ended = true;
    this.counters.end_reason = reason;
    this.counters.ended_at_ms = Date.now(); // wall clock, for tests timing how soon a vanished side is noticed
    if (this.watchdog) clearInterval(this.watchdog);
    this.watchdog = null;
    this.ui.onEnded(reason);
  }

  /** Rendered frames per second and keypoint kbps (wire) over the last 2 s. */
  rates(now = performance.now()) {
    while (this.rendered.length && this.rendered[0] < now - 2000) this.rendered.shift();
    while (this.recent.length && this.recent[0][0] < now - 2000) this.recent.shift();
    return { fps: this.rendered.length / 2, kbps: this.recent.reduce((s, r) => s + r[1], 0) * 8 / 2 / 1000 };
  }
}
