// The kpcast wire protocol in JavaScript: the same messages as shared/protocol.py, byte for byte.
//
// shared/protocol.py is the spec; this is its second implementation, for the browser sender
// (GET /send). tests/test_web_protocol.py runs both against each other under node: messages
// encoded here decode in Python and Python's decode here, and keypoint messages are identical bytes.
//
// Every message is a msgpack array [version, type, ...fields]. Integral numbers travel as msgpack
// ints (the Python decoder takes an int wherever it takes a float), binary fields as bin.

import { decode as mpDecode, encode as mpEncode } from "@msgpack/msgpack";

export const PROTOCOL_VERSION = 2;
export const NUM_KP = 10;
export const KP_DIM = 6 * NUM_KP;
export const NC = 2 * NUM_KP; // coordinate values at the front of a vector; 40 Jacobian entries follow
export const MAX_MESSAGE_BYTES = 64 * 1024;
export const MAX_SOURCE_BYTES = 2 * 1024 * 1024;
export const MAX_FRAMES_PER_BATCH = 64;
export const COORD_LIMIT = 1.0 + 1e-3;
export const JACOBIAN_LIMIT = 16.0;
export const DIGEST_BYTES = 16;
// the frame rate a Hello may announce (shared.protocol.MIN_FPS / MAX_FPS: the receiver's playout clock runs at it)
export const MIN_FPS = 1;
export const MAX_FPS = 60;
export const MAX_PRED_GAP = 64;
export const MAX_RESIDUAL_BYTES = 4 * KP_DIM;
export const PREDICTORS = ["last", "linear"];
const I64 = 2 ** 62;

export const MsgType = Object.freeze({
  HELLO: 1, SOURCE_CHUNK: 2, KEYPOINTS: 3, HEARTBEAT: 4, SOURCE_REQUEST: 5, BYE: 6,
  CODED_KEYPOINTS: 7, KEYFRAME_REQUEST: 8, SOURCE_READY: 9,
});
export const Codec = Object.freeze({ F16: 0, Q8: 1, PRED: 2 });
const ARITY = { 1: 10, 2: 8, 3: 8, 4: 3, 5: 3, 6: 3, 7: 7, 8: 3, 9: 3 };
// KeypointBatch and CodedKeypoints may end with one optional field: the image_id of the source
// image the keypoints were captured for (shared/protocol.py, "Source image ids").
const OPTIONAL_TRAILING = [MsgType.KEYPOINTS, MsgType.CODED_KEYPOINTS];

export class ProtocolError extends Error {
  constructor(reason, detail = "") {
    super(detail ? `${reason}: ${detail}` : reason);
    this.reason = reason;
    this.detail = detail;
  }
}

// ------------------------------------------------------------------------- numerics
// numpy rounds half to even; Math.round rounds half up. The codecs must agree with Python's
// integers exactly, so every rounding here is numpy's.
export function roundHalfEven(x) {
  const r = Math.round(x);
  return (r - x === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

const f32 = Math.fround;
export const JAC_RANGE = 16.0;
const JAC_KNEE = 0.5;
const JAC_NORM = Math.log1p(JAC_RANGE / JAC_KNEE);

/** One Jacobian entry -> int8 on the Q8 logarithmic scale (protocol._jac_to_q8, float64). */
export function jacToQ8(j) {
  const c = Math.min(Math.max(j, -JAC_RANGE), JAC_RANGE);
  return roundHalfEven(127 * Math.sign(c) * Math.log1p(Math.abs(c) / JAC_KNEE) / JAC_NORM);
}

// protocol._q8_to_jac(0..127): numpy computes it in float32, and its float32 expm1 (libm's expm1f)
// differs from Math.expm1 rounded to float32 in the last bit for 2 of the 127 entries, so the
// values are spelled out (shortest float32 decimals; tests/test_web_protocol.py checks every one).
const Q8_JAC = Float32Array.from([
  0.0, 0.013957026, 0.02830365, 0.043050744, 0.058209494, 0.07379138, 0.089808226, 0.10627215, 0.12319567,
  0.14059159, 0.15847309, 0.17685375, 0.19574748, 0.21516863, 0.23513186, 0.25565237, 0.2767457, 0.2984278,
  0.3207152, 0.34362468, 0.3671736, 0.39137995, 0.41626197, 0.44183856, 0.46812913, 0.49515346, 0.5229323,
  0.5514865, 0.58083767, 0.6110083, 0.642021, 0.6738995, 0.7066678, 0.74035066, 0.77497387, 0.8105636, 0.8471468,
  0.8847511, 0.9234052, 0.9631381, 1.0039802, 1.0459625, 1.0891165, 1.1334751, 1.179072, 1.2259419, 1.2741199,
  1.3236426, 1.374548, 1.426874, 1.4806609, 1.5359492, 1.592781, 1.6511989, 1.7112477, 1.7729725, 1.8364202,
  1.9016393, 1.9686787, 2.0375893, 2.108424, 2.1812358, 2.25608, 2.333013, 2.412094, 2.4933822, 2.5769396,
  2.6628296, 2.751117, 2.8418686, 2.935154, 3.0310428, 3.129609, 3.2309265, 3.335071, 3.4421237, 3.5521646,
  3.6652763, 3.7815464, 3.901062, 4.0239124, 4.1501937, 4.2799997, 4.413428, 4.550582, 4.6915646, 4.8364816,
  4.9854445, 5.138566, 5.2959614, 5.457751, 5.6240544, 5.795002, 5.9707217, 6.151345, 6.337011, 6.52786, 6.724035,
  6.925688, 7.132969, 7.346035, 7.56505, 7.790179, 8.02159, 8.259464, 8.503978, 8.755313, 9.013667, 9.279233,
  9.552209, 9.832808, 10.121239, 10.417719, 10.722478, 11.035743, 11.35775, 11.688749, 12.028987, 12.37872,
  12.738218, 13.107751, 13.487599, 13.878051, 14.279398, 14.691953, 15.116022, 15.551926, 16.0
]);  // 127: clipped to JAC_RANGE, as shared.protocol._q8_to_jac

/** int8 -> Jacobian entry, exactly as shared.protocol decodes it (float32). */
export function q8ToJac(q) {
  return q < 0 ? -Q8_JAC[-q] : Q8_JAC[q];
}

/** uint16 coordinate -> float32, as protocol.decode_vectors computes it. */
export function u16ToCoord(u) {
  return f32(f32(f32(u / 65535) * 2) - 1);
}

// ------------------------------------------------------------------------- vector codecs

/** Bytes of one vector in a KeypointBatch payload. */
export function frameBytes(codec) {
  if (codec === Codec.F16) return 2 * KP_DIM;
  if (codec === Codec.Q8) return 2 * NC + (KP_DIM - NC);
  throw new Error(`codec ${codec} does not code single vectors`);
}

function checkVector(vec) {
  if (!vec || vec.length !== KP_DIM) throw new Error(`keypoint vector must have ${KP_DIM} values`);
  for (const x of vec) if (!Number.isFinite(x)) throw new Error("keypoint vector contains NaN or inf");
}

/** One 60-value vector -> Q8 bytes (protocol.encode_vector with Codec.Q8). */
export function encodeQ8(vec) {
  checkVector(vec);
  const out = new Uint8Array(frameBytes(Codec.Q8));
  const dv = new DataView(out.buffer);
  for (let i = 0; i < NC; i++) {
    const c = Math.min(Math.max(vec[i], -1), 1);
    dv.setUint16(2 * i, roundHalfEven((c + 1) / 2 * 65535), true);
  }
  for (let i = NC; i < KP_DIM; i++) dv.setInt8(2 * NC + i - NC, jacToQ8(vec[i]));
  return out;
}

function f16Bits(x) {
  // round-to-nearest-even float64 -> IEEE half, as numpy's astype("<f2")
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a >= 65520) return sign | 0x7c00;
  if (a < 2 ** -24 / 2) return sign;
  let e = Math.floor(Math.log2(a));
  if (2 ** e > a) e -= 1;
  if (2 ** (e + 1) <= a) e += 1;
  if (e < -14) return sign | roundHalfEven(a / 2 ** -24); // subnormal
  const m = roundHalfEven((a / 2 ** e - 1) * 1024);
  if (m === 1024) { e += 1; if (e > 15) return sign | 0x7c00; return sign | ((e + 15) << 10); }
  return sign | ((e + 15) << 10) | m;
}

function f16Value(h) {
  const s = h & 0x8000 ? -1 : 1, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  if (e === 0) return s * m * 2 ** -24;
  if (e === 31) return m ? NaN : s * Infinity;
  return s * (1 + m / 1024) * 2 ** (e - 15);
}

/** One vector -> F16 bytes (coordinates clipped to [-1, 1], Jacobians to the limit). */
export function encodeF16(vec) {
  checkVector(vec);
  const out = new Uint8Array(frameBytes(Codec.F16));
  const dv = new DataView(out.buffer);
  for (let i = 0; i < KP_DIM; i++) {
    const lim = i < NC ? 1 : JACOBIAN_LIMIT;
    dv.setUint16(2 * i, f16Bits(Math.min(Math.max(vec[i], -lim), lim)), true);
  }
  return out;
}

export function encodeVector(vec, codec = Codec.Q8) {
  if (codec === Codec.Q8) return encodeQ8(vec);
  if (codec === Codec.F16) return encodeF16(vec);
  throw new Error(`unknown codec ${codec}`);
}

/** Payload of n frames -> array of n Float32Array(60); throws ProtocolError (protocol.decode_vectors). */
export function decodeVectors(payload, codec) {
  if (codec !== Codec.F16 && codec !== Codec.Q8) throw new ProtocolError("codec", `codec ${codec} does not code single vectors`);
  const fb = frameBytes(codec);
  if (payload.length === 0 || payload.length % fb) throw new ProtocolError("length", `payload of ${payload.length} B is not a multiple of ${fb} B`);
  const dv = new DataView(payload.buffer, payload.byteOffset, payload.byteLength);
  const out = [];
  for (let f = 0; f < payload.length / fb; f++) {
    const v = new Float32Array(KP_DIM);
    const o = f * fb;
    if (codec === Codec.F16) {
      for (let i = 0; i < KP_DIM; i++) v[i] = f16Value(dv.getUint16(o + 2 * i, true));
    } else {
      for (let i = 0; i < NC; i++) v[i] = u16ToCoord(dv.getUint16(o + 2 * i, true));
      for (let i = NC; i < KP_DIM; i++) v[i] = q8ToJac(dv.getInt8(o + 2 * NC + i - NC));
    }
    for (let i = 0; i < KP_DIM; i++) {
      if (!Number.isFinite(v[i])) throw new ProtocolError("nonfinite", "keypoints contain NaN or inf");
      if (Math.abs(v[i]) > (i < NC ? COORD_LIMIT : JACOBIAN_LIMIT)) throw new ProtocolError("range", "keypoint value out of range");
    }
    out.push(v);
  }
  return out;
}

// ------------------------------------------------------------------------- messages
// Plain objects with a `type` field and the dataclass's field names (snake_case, as in Python).

export function hello({ model, size, fps, codec = Codec.Q8, kp_every = 1, num_kp = NUM_KP, ts_base_us = 0, pred = null }) {
  return { type: "Hello", model, size, fps, codec, kp_every, num_kp, ts_base_us, pred, version: PROTOCOL_VERSION };
}

export function encode(msg) {
  const v = PROTOCOL_VERSION;
  let body;
  switch (msg.type) {
    case "Hello": {
      const p = msg.pred;
      const pred = p == null ? null : [p.predictor, p.tolerance, p.coord_step, p.max_gap, p.keyframe_interval];
      body = [v, MsgType.HELLO, msg.model, msg.size, msg.fps, msg.codec, msg.kp_every ?? 1, msg.num_kp ?? NUM_KP,
        msg.ts_base_us ?? 0, pred];
      break;
    }
    case "SourceChunk":
      body = [v, MsgType.SOURCE_CHUNK, msg.image_id, msg.index, msg.total, msg.total_bytes, msg.digest, msg.data];
      break;
    case "KeypointBatch":
      body = [v, MsgType.KEYPOINTS, msg.seq0, msg.step, msg.ts0_us, msg.interval_us, msg.codec, msg.payload];
      if (msg.image_id != null) body.push(msg.image_id); // optional trailing field: absent means "any source"
      break;
    case "CodedKeypoints": {
      const back = msg.prev_seq < 0 ? 0 : msg.seq - msg.prev_seq;
      body = [v, MsgType.CODED_KEYPOINTS, msg.seq, back, !!msg.key, msg.ts_us, msg.payload];
      if (msg.image_id != null) body.push(msg.image_id);
      if (msg.redundant != null) {
        const r = msg.redundant;
        if (msg.image_id == null || msg.prev_seq < 0) throw new Error("a redundant frame needs image_id and a previous frame");
        body.push([r.prev_seq < 0 ? 0 : msg.prev_seq - r.prev_seq, !!r.key, r.payload]);
      }
      break;
    }
    case "KeyframeRequest": body = [v, MsgType.KEYFRAME_REQUEST, msg.last_seq ?? -1]; break;
    case "SourceReady": body = [v, MsgType.SOURCE_READY, msg.image_id]; break;
    case "Heartbeat": body = [v, MsgType.HEARTBEAT, msg.ts_us]; break;
    case "SourceRequest": body = [v, MsgType.SOURCE_REQUEST, msg.reason ?? ""]; break;
    case "Bye": body = [v, MsgType.BYE, msg.reason ?? ""]; break;
    default: throw new TypeError(`not a protocol message: ${msg && msg.type}`);
  }
  return mpEncode(body);
}

/** KeypointBatch of vectors (protocol.KeypointBatch.build). */
export function keypointBatch(seq0, ts0_us, vectors, codec = Codec.Q8, step = 1, interval_us = 0, image_id = null) {
  const parts = vectors.map((vec) => encodeVector(vec, codec));
  const payload = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let o = 0;
  for (const p of parts) { payload.set(p, o); o += p.length; }
  return { type: "KeypointBatch", seq0, step, ts0_us, interval_us, codec, payload, image_id };
}

function int(x, lo, hi, name) {
  if (typeof x !== "number" || !Number.isInteger(x) || x < lo || x > hi) {
    throw new ProtocolError("field", `${name} must be an int in [${lo}, ${hi}], got ${String(x).slice(0, 40)}`);
  }
  return x;
}
function bin(x, maxLen, name) {
  if (!(x instanceof Uint8Array) || x.length > maxLen) throw new ProtocolError("field", `${name} must be bytes of at most ${maxLen}`);
  return x;
}
function str(x, maxLen, name) {
  if (typeof x !== "string" || x.length > maxLen) throw new ProtocolError("field", `${name} must be a string of at most ${maxLen} chars`);
  return x;
}
function num(x, lo, hi, name) {
  if (typeof x !== "number" || !(x >= lo && x <= hi)) throw new ProtocolError("field", `${name} must be a number in [${lo}, ${hi}]`);
  return x;
}

/** The fields of one coded frame, validated as shared.protocol._coded_keypoints does. */
function codedFrame(f) {
  const seq = int(f[0], 0, I64, "seq");
  const back = int(f[1], 0, seq, "seq - prev_seq");
  if (typeof f[2] !== "boolean") throw new ProtocolError("field", "key must be a bool");
  const key = f[2];
  const ts_us = int(f[3], 0, I64, "ts_us");
  const payload = bin(f[4], MAX_RESIDUAL_BYTES, "payload");
  if (back === 0 && !key) throw new ProtocolError("field", "only a keyframe may have no previous frame");
  if (key) {
    if (payload.length !== frameBytes(Codec.Q8)) throw new ProtocolError("length", "a keyframe carries one Q8 vector");
    decodeVectors(payload, Codec.Q8);
  } else {
    try { decodeResidualBits(payload); } catch (e) { throw new ProtocolError("residual", e.message); }
  }
  return { type: "CodedKeypoints", seq, prev_seq: back ? seq - back : -1, key, ts_us, payload, image_id: null,
    redundant: null };
}

/** Parse and validate one message (protocol.decode); throws ProtocolError, never anything else. */
export function decode(data, maxBytes = MAX_MESSAGE_BYTES) {
  if (typeof data === "string") throw new ProtocolError("malformed", "text message on a binary protocol");
  const bytes = data instanceof ArrayBuffer ? new Uint8Array(data) : data;
  if (!(bytes instanceof Uint8Array)) throw new ProtocolError("malformed", "unexpected message type");
  if (bytes.length > maxBytes) throw new ProtocolError("oversized", `${bytes.length} B > ${maxBytes} B`);
  let obj;
  try {
    obj = mpDecode(bytes, { maxStrLength: 4096, maxBinLength: maxBytes, maxArrayLength: 16, maxMapLength: 16 });
  } catch (e) {
    throw new ProtocolError("malformed", `not msgpack: ${e.name}`);
  }
  if (!Array.isArray(obj) || obj.length < 2) throw new ProtocolError("malformed", "expected an array [version, type, ...]");
  if (obj[0] !== PROTOCOL_VERSION) throw new ProtocolError("version", `unsupported protocol version ${String(obj[0]).slice(0, 20)} (this end speaks ${PROTOCOL_VERSION})`);
  const t = obj[1];
  if (!(t in ARITY) || typeof t !== "number") throw new ProtocolError("type", `unknown message type ${String(t).slice(0, 20)}`);
  const n = ARITY[t];
  // image_id; CodedKeypoints may then carry its predecessor once more (shared.protocol.RedundantFrame)
  const extra = t === MsgType.CODED_KEYPOINTS ? 2 : 1;
  if (obj.length !== n && !(OPTIONAL_TRAILING.includes(t) && obj.length > n && obj.length <= n + extra)) {
    throw new ProtocolError("malformed", `message type ${t} needs ${n} fields, got ${obj.length}`);
  }
  const f = obj.slice(2);
  const image_id = obj.length > n ? int(f[n - 2], 0, I64, "image_id") : null;
  switch (t) {
    case MsgType.HELLO: {
      const model = str(f[0], 128, "model");
      const size = int(f[1], 16, 4096, "size");
      if (typeof f[2] !== "number" || !(f[2] >= MIN_FPS && f[2] <= MAX_FPS)) {
        throw new ProtocolError("field", `fps must be in [${MIN_FPS}, ${MAX_FPS}]`);
      }
      const codec = int(f[3], 0, 255, "codec");
      if (![0, 1, 2].includes(codec)) throw new ProtocolError("codec", `unknown codec ${codec}`);
      const kp_every = int(f[4], 1, 64, "kp_every");
      const num_kp = int(f[5], 1, 64, "num_kp");
      if (num_kp !== NUM_KP) throw new ProtocolError("field", `num_kp ${num_kp} unsupported`);
      const ts_base_us = int(f[6], 0, I64, "ts_base_us");
      let pred = null;
      if (f[7] !== null) {
        const p = f[7];
        if (!Array.isArray(p) || p.length !== 5) throw new ProtocolError("field", "pred must be [predictor, tolerance, coord_step, max_gap, keyframe_interval]");
        const predictor = str(p[0], 16, "predictor");
        if (!PREDICTORS.includes(predictor)) throw new ProtocolError("field", `unknown predictor ${predictor.slice(0, 20)}`);
        pred = { predictor, tolerance: num(p[1], 0, 1, "tolerance"), coord_step: num(p[2], 1e-5, 0.1, "coord_step"),
          max_gap: int(p[3], 0, MAX_PRED_GAP, "max_gap"), keyframe_interval: int(p[4], 1, 100000, "keyframe_interval") };
      }
      if ((codec === Codec.PRED) !== (pred !== null)) throw new ProtocolError("field", "codec parameters come with the predictive codec, and only with it");
      if (codec === Codec.PRED && kp_every !== 1) throw new ProtocolError("field", "the predictive codec decides per frame: kp_every must be 1");
      return { type: "Hello", model, size, fps: f[2], codec, kp_every, num_kp, ts_base_us, pred, version: PROTOCOL_VERSION };
    }
    case MsgType.SOURCE_CHUNK: {
      const image_id = int(f[0], 0, I64, "image_id");
      const total = int(f[2], 1, 4096, "total");
      const index = int(f[1], 0, total - 1, "index");
      const total_bytes = int(f[3], 1, MAX_SOURCE_BYTES, "total_bytes");
      const digest = bin(f[4], DIGEST_BYTES, "digest");
      if (digest.length !== DIGEST_BYTES) throw new ProtocolError("field", "digest must be 16 bytes");
      const chunk = bin(f[5], maxBytes, "data");
      if (!chunk.length) throw new ProtocolError("field", "empty source chunk");
      return { type: "SourceChunk", image_id, index, total, total_bytes, digest, data: chunk };
    }
    case MsgType.KEYPOINTS: {
      const msg = { type: "KeypointBatch", seq0: int(f[0], 0, I64, "seq0"), step: int(f[1], 1, 64, "step"),
        ts0_us: int(f[2], 0, I64, "ts0_us"), interval_us: int(f[3], 0, 10000000, "interval_us"),
        codec: int(f[4], 0, 255, "codec"), payload: bin(f[5], maxBytes, "payload"), image_id };
      if (decodeVectors(msg.payload, msg.codec).length > MAX_FRAMES_PER_BATCH) throw new ProtocolError("length", "too many frames in one message");
      return msg;
    }
    case MsgType.CODED_KEYPOINTS: {
      const msg = codedFrame(f);
      msg.image_id = image_id;
      if (obj.length === n + 2) {
        const r = f[n - 1];
        if (!Array.isArray(r) || r.length !== 3) throw new ProtocolError("field", "the redundant frame must be [back, key, payload]");
        if (msg.prev_seq < 0) throw new ProtocolError("field", "a frame without a previous one carries no redundant frame");
        const prev = codedFrame([msg.prev_seq, r[0], r[1], 0, r[2]]);
        msg.redundant = { prev_seq: prev.prev_seq, key: prev.key, payload: prev.payload };
      }
      return msg;
    }
    case MsgType.KEYFRAME_REQUEST: return { type: "KeyframeRequest", last_seq: int(f[0], -1, I64, "last_seq") };
    case MsgType.SOURCE_READY: return { type: "SourceReady", image_id: int(f[0], 0, I64, "image_id") };
    case MsgType.HEARTBEAT: return { type: "Heartbeat", ts_us: int(f[0], 0, I64, "ts_us") };
    case MsgType.SOURCE_REQUEST: return { type: "SourceRequest", reason: str(f[0], 256, "reason") };
    default: return { type: "Bye", reason: str(f[0], 256, "reason") };
  }
}

// The residual bitstream's syntax check lives with its codec; kpcodec.js registers it here so this
// module has no import cycle (protocol.py imports kpcodec lazily for the same reason).
let decodeResidualBits = () => { throw new Error("no residual decoder loaded (import kpcodec.js)"); };
export function registerResidualDecoder(fn) { decodeResidualBits = fn; }

// ------------------------------------------------------------------------- source image

/** First 16 bytes of SHA-256 (WebCrypto: browsers in a secure context, node >= 19). */
export async function digest16(bytes) {
  const h = new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", bytes));
  return h.slice(0, DIGEST_BYTES);
}

/** An encoded image -> SourceChunk messages that each fit one data-channel message (protocol.split_source). */
export async function splitSource(image, imageId, chunkBytes = 16 * 1024) {
  if (!image.length) throw new Error("empty source image");
  if (image.length > MAX_SOURCE_BYTES) throw new Error(`source image of ${image.length} B exceeds ${MAX_SOURCE_BYTES} B`);
  const digest = await digest16(image);
  const total = Math.ceil(image.length / chunkBytes);
  const out = [];
  for (let i = 0; i < total; i++) {
    out.push({ type: "SourceChunk", image_id: imageId, index: i, total, total_bytes: image.length, digest,
      data: image.subarray(i * chunkBytes, Math.min(image.length, (i + 1) * chunkBytes)) });
  }
  return out;
}
