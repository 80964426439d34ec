// Runs the call page's predictive keypoint decoder (receiver/web/send/kpcodec.js) under node for
// tests/test_web_decoder.py: reads {config, streams: [[frame, ...], ...]} (frames {seq, prev_seq, key,
// payload: hex}, in arrival order) on stdin; writes per stream, per pushed frame, what the decoder gave.

import { readFileSync } from "node:fs";
import { PredictiveDecoder } from "../../receiver/web/send/kpcodec.js";

const job = JSON.parse(readFileSync(0, "utf8"));
const out = job.streams.map((frames) => {
  const dec = new PredictiveDecoder(job.config);
  const steps = frames.map((f) => {
    let decoded, error = null;
    try {
      decoded = dec.push({ ...f, payload: new Uint8Array(Buffer.from(f.payload, "hex")) });
    } catch (e) {
      decoded = [];
      error = String(e.message);
    }
    return { decoded: decoded.map((d) => ({ seq: d.seq, kind: d.kind, vector: Array.from(d.vector) })), error,
      needs_keyframe: dec.needsKeyframe };
  });
  return { steps, counts: dec.counts };
});
process.stdout.write(JSON.stringify(out));
