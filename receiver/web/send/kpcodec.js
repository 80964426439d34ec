// Closed-loop predictive keypoint coding (shared/kpcodec.py's encoder), bit-exact with Python.
//
// The receiver (Python) decodes this stream with shared.kpcodec.PredictiveDecoder, so the
// encoder's integer history must equal the decoder's exactly: every quantisation reproduces
// numpy's arithmetic (round half to even, float32 steps where numpy computes in float32), and a
// keyframe's history is what the receiver computes from its bytes, not what this end started from.
// tests/test_web_protocol.py feeds the same vectors to both encoders and compares every byte.

import {
  Codec, KP_DIM, NC, decodeVectors, encodeQ8, jacToQ8, q8ToJac, registerResidualDecoder, roundHalfEven,
} from "./protocol.js";

const f32 = Math.fround;
const MAX_EG = 24;

/** shared.kpcodec.DEFAULT_STREAM: what `python -m sender` sends by default. */
export const DEFAULT_STREAM = Object.freeze({
  coord_step: 1 / 512, predictor: "last", tolerance: 0.004, jac_factor: 10, max_gap: 8,
  keyframe_interval: 90, skip_rule: "mean", mean_cap: 3,
});

export function coordLevels(cfg) { return Math.round(1 / cfg.coord_step); }

/** What the Hello announces (protocol.PredParams). */
export function predParams(cfg) {
  return { predictor: cfg.predictor, tolerance: cfg.tolerance, coord_step: cfg.coord_step, max_gap: cfg.max_gap,
    keyframe_interval: cfg.keyframe_interval };
}

/** 60 floats -> 60 ints (kpcodec.quantise). */
export function quantise(vec, cfg) {
  const lv = coordLevels(cfg);
  const q = new Int32Array(KP_DIM);
  for (let i = 0; i < NC; i++) q[i] = Math.min(Math.max(roundHalfEven(vec[i] / cfg.coord_step), -lv), lv);
  for (let i = NC; i < KP_DIM; i++) q[i] = jacToQ8(vec[i]);
  return q;
}

/** 60 ints -> 60 float32 (kpcodec.dequantise). */
export function dequantise(q, cfg) {
  const v = new Float32Array(KP_DIM);
  for (let i = 0; i < NC; i++) v[i] = Math.min(Math.max(f32(q[i] * cfg.coord_step), -1), 1);
  for (let i = NC; i < KP_DIM; i++) v[i] = q8ToJac(q[i]);
  return v;
}

/** The next integer vector from the decoded history, newest last (kpcodec.predict). */
export function predict(history, cfg) {
  const h1 = history[history.length - 1];
  if (cfg.predictor === "last" || history.length < 2) return Int32Array.from(h1);
  const h0 = history[history.length - 2], lv = coordLevels(cfg);
  const p = new Int32Array(KP_DIM);
  for (let i = 0; i < KP_DIM; i++) {
    const lim = i < NC ? lv : 127;
    p[i] = Math.min(Math.max(2 * h1[i] - h0[i], -lim), lim);
  }
  return p;
}

// ------------------------------------------------------------------------- entropy coding

class BitWriter {
  constructor() { this.bits = []; }
  put(value, n) { for (let i = n - 1; i >= 0; i--) this.bits.push(Math.floor(value / 2 ** i) % 2); }
  expGolomb(v, k) {
    const x = v + 2 ** k, len = bitLength(x);
    this.put(0, len - 1 - k);
    this.put(x, len);
  }
  bytes() {
    const out = new Uint8Array(Math.ceil(this.bits.length / 8));
    this.bits.forEach((b, i) => { if (b) out[i >> 3] |= 0x80 >> (i & 7); });
    return out;
  }
}

function bitLength(x) { return x === 0 ? 0 : x.toString(2).length; } // int.bit_length() for 0 <= x < 2**53
function zigzag(r) { return r >= 0 ? 2 * r : -2 * r - 1; }
function unzigzag(u) { return u % 2 === 0 ? u / 2 : -(u + 1) / 2; }
function egBits(u, k) { return 2 * bitLength(u + 2 ** k) - 1 - k; }
const GROUPS = [[0, NC], [NC, KP_DIM]];

/** 60 int residuals -> bytes: per group a 3-bit Exp-Golomb order (the cheapest), then the codes. */
export function encodeResidual(r) {
  const w = new BitWriter();
  for (const [a, b] of GROUPS) {
    const u = Array.from(r.slice(a, b), zigzag);
    let best = 0, bestBits = Infinity;
    for (let k = 0; k < 8; k++) { // the first minimum, as Python's min()
      const bits = u.reduce((s, x) => s + egBits(x, k), 0);
      if (bits < bestBits) { best = k; bestBits = bits; }
    }
    w.put(best, 3);
    for (const x of u) w.expGolomb(x, best);
  }
  return w.bytes();
}

/** Inverse of encodeResidual; throws Error on a bitstream that is not one (kpcodec.decode_residual). */
export function decodeResidual(data) {
  if (!data.length || data.length > 4 * KP_DIM) throw new Error("residual payload size");
  const total = 8 * data.length;
  let pos = 0;
  const get = (n) => {
    if (pos + n > total) throw new Error("residual bitstream ends early");
    let v = 0;
    for (let i = 0; i < n; i++, pos++) v = v * 2 + ((data[pos >> 3] >> (7 - (pos & 7))) & 1);
    return v;
  };
  const out = new Int32Array(KP_DIM);
  let o = 0;
  for (const [a, b] of GROUPS) {
    const k = get(3);
    for (let i = a; i < b; i++) {
      let zeros = 0;
      while (get(1) === 0) { if (++zeros > MAX_EG) throw new Error("residual code too long"); }
      const rest = get(zeros + k);
      out[o++] = unzigzag(2 ** (zeros + k) + rest - 2 ** k);
    }
  }
  if (total - pos >= 8) throw new Error("trailing bytes after the residual");
  return out;
}
registerResidualDecoder(decodeResidual);

// ------------------------------------------------------------------------- encoder

/** Sender side (kpcodec.PredictiveEncoder). encode() returns {seq, prev_seq, key, payload} or null (skipped). */
export class PredictiveEncoder {
  constructor(cfg = DEFAULT_STREAM) {
    this.cfg = cfg;
    this.tolerance = cfg.tolerance;
    this.history = [];
    this.lastCoded = -1;
    this.lastKey = -1e9;
    this.gap = 0;
    this.wantKey = true;
    this.counts = { key: 0, residual: 0, skipped: 0 };
  }

  requestKeyframe() { this.wantKey = true; }

  encode(seq, vec, force = false) {
    const cfg = this.cfg;
    const q = quantise(vec, cfg);
    if (this.wantKey || !this.history.length || seq - this.lastKey >= cfg.keyframe_interval) return this.emit(seq, q, true);
    const p = predict(this.history, cfg);
    if (!force && this.gap < cfg.max_gap && this.close(p, vec)) {
      this.push(p);
      this.gap += 1;
      this.counts.skipped += 1;
      return null;
    }
    return this.emit(seq, q, false, q.map((x, i) => x - p[i]));
  }

  close(p, vec) {
    const cfg = this.cfg, d = dequantise(p, cfg), tol = this.tolerance;
    let cMax = 0, cSum = 0, jMax = 0, jSum = 0;
    for (let i = 0; i < KP_DIM; i++) {
      const e = Math.abs(f32(d[i] - f32(vec[i])));
      if (i < NC) { cMax = Math.max(cMax, e); cSum += e; } else { const ej = e / cfg.jac_factor; jMax = Math.max(jMax, ej); jSum += ej; }
    }
    if (cfg.skip_rule === "max") return cMax <= tol && jMax <= tol;
    const cap = cfg.mean_cap * tol;
    return cSum / NC <= tol && jSum / (KP_DIM - NC) <= tol && cMax <= cap && jMax <= cap;
  }

  emit(seq, q, key, residual = null) {
    let payload;
    if (key) {
      payload = encodeQ8(dequantise(q, this.cfg));
      q = quantise(decodeVectors(payload, Codec.Q8)[0], this.cfg); // exactly what the receiver will hold
      this.history = [];
      this.lastKey = seq;
      this.wantKey = false;
      this.counts.key += 1;
    } else {
      payload = encodeResidual(residual);
      this.counts.residual += 1;
    }
    const frame = { seq, prev_seq: this.lastCoded, key, payload };
    this.push(q);
    this.lastCoded = seq;
    this.gap = 0;
    return frame;
  }

  push(q) { this.history = [...this.history, q].slice(-2); }
}

// ------------------------------------------------------------------------- decoder

const MAX_HELD = 16; // out-of-order frames held waiting for their predecessor (kpcodec.MAX_HELD)

/**
 * Receiver side (kpcodec.PredictiveDecoder): push() frames {seq, prev_seq, key, payload} in any order, get
 * decoded frames [{seq, vector: Float32Array(60), kind: "key"|"residual"|"skipped"}] in order.
 * `needsKeyframe` turns true when a frame's predecessor is missing and `maxPending` frames wait behind it:
 * ask the sender for a keyframe. Throws Error on a corrupt frame, as Python raises ValueError.
 */
export class PredictiveDecoder {
  constructor(cfg = DEFAULT_STREAM, maxPending = 3) {
    this.cfg = cfg;
    this.history = [];
    this.lastSeq = -1; // newest decoded seq (coded or skipped)
    this.lastCoded = -1;
    this.pending = new Map(); // keyed by prev_seq
    this.maxPending = maxPending;
    this.needsKeyframe = false;
    this.counts = { key: 0, residual: 0, skipped: 0, dropped: 0 };
  }

  push(frame) {
    const cfg = this.cfg;
    if (frame.seq <= this.lastSeq || frame.prev_seq >= frame.seq) { this.counts.dropped += 1; return []; }
    const span = cfg.max_gap + 1; // an honest encoder never leaves more frames between two coded ones
    if (!frame.key && (frame.prev_seq < 0 || frame.seq - frame.prev_seq > span)) {
      throw new Error(`residual frame ${frame.seq} is more than max_gap frames after ${frame.prev_seq}`);
    }
    let out = [];
    if (frame.key) {
      const q = quantise(decodeVectors(frame.payload, Codec.Q8)[0], cfg);
      if (frame.prev_seq === this.lastCoded && this.history.length && frame.seq - this.lastSeq <= span) out = out.concat(this.fill(frame.seq));
      this.history = [];
      for (const [k, f] of this.pending) if (f.seq <= frame.seq) this.pending.delete(k);
      out.push(this.take(frame.seq, q, "key"));
      this.needsKeyframe = false;
    } else if (this.history.length && frame.prev_seq === this.lastCoded) {
      const r = decodeResidual(frame.payload);
      const p = predict(this.filledHistory(frame.seq), cfg), lv = coordLevels(cfg);
      const q = new Int32Array(KP_DIM);
      for (let i = 0; i < KP_DIM; i++) {
        q[i] = p[i] + r[i];
        if (Math.abs(q[i]) > (i < NC ? lv : 127)) throw new Error("residual decodes outside the quantiser's range");
      }
      out = out.concat(this.fill(frame.seq));
      out.push(this.take(frame.seq, q, "residual"));
    } else {
      if (frame.prev_seq > this.lastCoded) { // its predecessor may still arrive (unordered channel)
        this.pending.set(frame.prev_seq, frame);
        while (this.pending.size > MAX_HELD) { // a peer's made-up predecessors cannot grow memory
          this.pending.delete(Math.min(...this.pending.keys()));
          this.counts.dropped += 1;
        }
      } else {
        this.counts.dropped += 1;
      }
      if (this.pending.size >= this.maxPending || !this.history.length) this.needsKeyframe = true;
      return out;
    }
    const next = this.pending.get(this.lastCoded);
    if (next !== undefined) {
      this.pending.delete(this.lastCoded);
      try { out = out.concat(this.push(next)); } catch { this.counts.dropped += 1; } // keep what this one decoded
    }
    return out;
  }

  filledHistory(seq) {
    let h = [...this.history];
    for (let s = this.lastSeq + 1; s < seq; s++) h = [...h, predict(h, this.cfg)].slice(-2);
    return h;
  }

  fill(seq) {
    const out = [];
    for (let s = this.lastSeq + 1; s < seq; s++) {
      const q = predict(this.history, this.cfg);
      this.history = [...this.history, q].slice(-2);
      this.lastSeq = s;
      this.counts.skipped += 1;
      out.push({ seq: s, vector: dequantise(q, this.cfg), kind: "skipped" });
    }
    return out;
  }

  take(seq, q, kind) {
    this.history = [...this.history, q].slice(-2);
    this.lastSeq = this.lastCoded = seq;
    this.counts[kind] += 1;
    return { seq, vector: dequantise(q, this.cfg), kind };
  }
}

/** The decoder's config from a Hello's pred params (kpcodec.PredictiveConfig.from_params). */
export function configFromParams(p) {
  return { ...DEFAULT_STREAM, predictor: p.predictor, tolerance: p.tolerance, coord_step: p.coord_step,
    max_gap: p.max_gap, keyframe_interval: p.keyframe_interval };
}
