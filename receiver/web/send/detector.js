// The keypoint detector in the browser: the receiver's own detector as ONNX, on onnxruntime-web,
// and the pixels prepared exactly as sender/extract.py prepares them.
//
// Python crops the camera frame's square, shrinks it to 256 x 256 with OpenCV's area filter
// (sender/framing.crop_square), then to the detector's 64 x 64 with the area filter again
// (sender/extract.KeypointExtractor), and feeds RGB / 255. A canvas's own scaling is bilinear or
// Lanczos, not an area average, so both steps are done here in JavaScript (areaResize) with
// cv2.INTER_AREA's weights; the detector sees the same kind of picture it was trained on.

import { roundHalfEven } from "./protocol.js";

const ORT_DIR = "/send/vendor/ort/";

/** Which onnxruntime-web backend to use: "webgpu" when the browser has an adapter, else "wasm". */
export async function pickBackend(wanted = "auto") {
  if (wanted === "wasm") return "wasm";
  const gpu = globalThis.navigator && navigator.gpu;
  let adapter = null;
  if (gpu) {
    // a browser without a usable GPU may never answer: give it a few seconds
    const timeout = new Promise((resolve) => setTimeout(() => resolve(null), 5000));
    try { adapter = await Promise.race([gpu.requestAdapter(), timeout]); } catch { adapter = null; }
  }
  if (adapter) return "webgpu";
  if (wanted === "webgpu") throw new Error("WebGPU is not available in this browser");
  return "wasm";
}

/** A loaded detector: {backend, threads, size, info, run(Float32Array) -> Promise<Float32Array(60)>}. */
export async function loadDetector(info, { backend = "auto", threads = 2 } = {}) {
  const chosen = await pickBackend(backend);
  // the WebGPU bundle carries the WASM backend too; the plain WASM one is smaller
  const ort = await import(`${ORT_DIR}${chosen === "webgpu" ? "ort.webgpu.min.mjs" : "ort.wasm.min.mjs"}`);
  ort.env.wasm.wasmPaths = new URL(ORT_DIR, globalThis.location ? location.href : "http://localhost/").href;
  // more than one WASM thread needs SharedArrayBuffer, which needs a cross-origin isolated page
  const n = globalThis.crossOriginIsolated ? Math.max(1, Math.min(threads, navigator.hardwareConcurrency || 1)) : 1;
  ort.env.wasm.numThreads = n;
  const resp = await fetch(`/send/${info.onnx}`);
  if (!resp.ok) throw new Error(`the receiver did not serve its detector (HTTP ${resp.status}): reload the page`);
  const model = new Uint8Array(await resp.arrayBuffer());
  const session = await ort.InferenceSession.create(model, { executionProviders: [chosen], graphOptimizationLevel: "all" });
  const size = info.size;
  return {
    backend: chosen, threads: chosen === "wasm" ? n : null, size, info,
    async run(input) {
      const feeds = { [info.input]: new ort.Tensor("float32", input, [1, 3, size, size]) };
      const out = await session.run(feeds);
      return Float32Array.from(out[info.output].data);
    },
  };
}

// ------------------------------------------------------------------------- pixels

const weightCache = new Map();

/** cv2.INTER_AREA's source taps for shrinking n samples to m: per output [start, weights...]. */
function areaTaps(n, m) {
  const key = `${n}:${m}`;
  if (weightCache.has(key)) return weightCache.get(key);
  const scale = n / m, taps = [];
  for (let i = 0; i < m; i++) {
    const a = i * scale, b = Math.min(n, (i + 1) * scale);
    const first = Math.floor(a), w = [];
    for (let j = first; j < Math.ceil(b - 1e-9); j++) w.push((Math.min(b, j + 1) - Math.max(a, j)) / scale);
    taps.push([first, w]);
  }
  weightCache.set(key, taps);
  return taps;
}

/**
 * Shrink an RGBA (or RGB) image to dw x dh RGB with area averaging, rounded to 8 bits like OpenCV.
 * src: Uint8ClampedArray/Uint8Array of sw * sh * channels. Returns Uint8Array(dw * dh * 3).
 */
export function areaResize(src, sw, sh, dw, dh, channels = 4) {
  const tx = areaTaps(sw, dw), ty = areaTaps(sh, dh);
  const rows = new Float64Array(sh * dw * 3); // horizontal pass
  for (let y = 0; y < sh; y++) {
    const row = y * sw * channels;
    for (let x = 0; x < dw; x++) {
      const [first, w] = tx[x];
      let r = 0, g = 0, b = 0;
      for (let k = 0; k < w.length; k++) {
        const o = row + (first + k) * channels;
        r += w[k] * src[o]; g += w[k] * src[o + 1]; b += w[k] * src[o + 2];
      }
      const o = (y * dw + x) * 3;
      rows[o] = r; rows[o + 1] = g; rows[o + 2] = b;
    }
  }
  const out = new Uint8Array(dw * dh * 3);
  for (let y = 0; y < dh; y++) {
    const [first, w] = ty[y];
    for (let x = 0; x < dw; x++) {
      let r = 0, g = 0, b = 0;
      for (let k = 0; k < w.length; k++) {
        const o = ((first + k) * dw + x) * 3;
        r += w[k] * rows[o]; g += w[k] * rows[o + 1]; b += w[k] * rows[o + 2];
      }
      const o = (y * dw + x) * 3;
      out[o] = Math.min(255, roundHalfEven(r)); out[o + 1] = Math.min(255, roundHalfEven(g)); out[o + 2] = Math.min(255, roundHalfEven(b));
    }
  }
  return out;
}

/** HWC uint8 RGB -> the detector's input: NCHW float32 in [0, 1]. */
export function toInput(rgb, size) {
  const plane = size * size, x = new Float32Array(3 * plane);
  for (let i = 0; i < plane; i++) {
    x[i] = rgb[3 * i] / 255; x[plane + i] = rgb[3 * i + 1] / 255; x[2 * plane + i] = rgb[3 * i + 2] / 255;
  }
  return x;
}
