// Runs the browser sender's protocol and codec (receiver/web/send/*.js) under node for
// tests/test_web_protocol.py: reads a JSON job on stdin, writes the JavaScript side's answers on stdout.
// Bytes travel as hex strings.

import { readFileSync } from "node:fs";
import * as P from "../../receiver/web/send/protocol.js";
import { PredictiveEncoder } from "../../receiver/web/send/kpcodec.js";

const hex = (b) => Buffer.from(b).toString("hex");
const unhex = (s) => new Uint8Array(Buffer.from(s, "hex"));

// JSON message specs carry bytes as {"hex": "..."}; turn them into Uint8Array (and back for output).
function revive(x) {
  if (Array.isArray(x)) return x.map(revive);
  if (x && typeof x === "object") {
    if (typeof x.hex === "string" && Object.keys(x).length === 1) return unhex(x.hex);
    return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, revive(v)]));
  }
  return x;
}
function plain(x) {
  if (x instanceof Uint8Array) return { hex: hex(x) };
  if (x instanceof Float32Array) return Array.from(x);
  if (Array.isArray(x)) return x.map(plain);
  if (x && typeof x === "object") return Object.fromEntries(Object.entries(x).map(([k, v]) => [k, plain(v)]));
  return x;
}

const job = JSON.parse(readFileSync(0, "utf8"));
const out = {};

out.q8 = job.vectors.map((v) => hex(P.encodeQ8(v)));
out.f16 = job.vectors.map((v) => hex(P.encodeF16(v)));
out.q8_decoded = out.q8.map((h) => Array.from(P.decodeVectors(unhex(h), P.Codec.Q8)[0]));

// the predictive stream, with keyframe requests where the job says
const enc = new PredictiveEncoder(job.pred_config);
const requests = new Set(job.keyframe_requests);
out.pred = [];
job.vectors.forEach((v, seq) => {
  if (requests.has(seq)) enc.requestKeyframe();
  const f = enc.encode(seq, v);
  if (f) {
    const msg = { type: "CodedKeypoints", seq: f.seq, prev_seq: f.prev_seq, key: f.key, ts_us: seq * 33333, payload: f.payload };
    out.pred.push({ seq: f.seq, prev_seq: f.prev_seq, key: f.key, payload: hex(f.payload), message: hex(P.encode(msg)) });
  }
});
out.pred_counts = enc.counts;

out.encoded = job.encode.map((spec) => hex(P.encode(revive(spec))));
out.decoded = job.decode.map((h) => {
  try {
    return plain(P.decode(unhex(h)));
  } catch (e) {
    if (!(e instanceof P.ProtocolError)) return { error: `not a ProtocolError: ${e}` };
    return { error: e.reason };
  }
});
const image = unhex(job.source_image);
out.source_chunks = (await P.splitSource(image, 3, job.chunk_bytes)).map((c) => hex(P.encode(c)));

process.stdout.write(JSON.stringify(out));
