// The other side's face rendered in this page: the receiver's 64 x 64 render graph as two ONNX files
// (models/fomm/webrender.py) on onnxruntime-web. `bind` runs once per source image (source keypoints,
// encoder features, the graph's keypoint-independent share); `frame` runs once per keypoint vector.
// Both sessions share the onnxruntime-web module (and so its WASM thread count) with the detector.

import { pickBackend } from "/send/js/detector.js";

const ORT_DIR = "/send/vendor/ort/";

async function fetchModel(url) {
  const resp = await fetch(url);
  if (!resp.ok) throw new Error(`the page's server did not serve ${url} (HTTP ${resp.status}): reload the page`);
  return new Uint8Array(await resp.arrayBuffer());
}

/**
 * A loaded renderer: {backend, threads, size, info, bind(Float32Array image NCHW), render(Float32Array(60))
 * -> Promise<Float32Array(3*S*S)>}. `info` is /call/render.json.
 */
export async function loadRenderer(info, { backend = "auto", threads = 2 } = {}) {
  const chosen = await pickBackend(backend);
  const ort = await import(`${ORT_DIR}${chosen === "webgpu" ? "ort.webgpu.min.mjs" : "ort.wasm.min.mjs"}`);
  ort.env.wasm.wasmPaths = new URL(ORT_DIR, location.href).href;
  const n = globalThis.crossOriginIsolated ? Math.max(1, Math.min(threads, navigator.hardwareConcurrency || 1)) : 1;
  ort.env.wasm.numThreads = n; // fixed by the first session the page makes (the detector's, when it came first)
  const opts = { executionProviders: [chosen], graphOptimizationLevel: "all" };
  const [bindModel, frameModel] = await Promise.all([fetchModel(`/call/render/${info.bind_onnx}`),
    fetchModel(`/call/render/${info.frame_onnx}`)]);
  const bindSession = await ort.InferenceSession.create(bindModel, opts);
  const frameSession = await ort.InferenceSession.create(frameModel, opts);
  const size = info.size;
  let bound = null; // the bind graph's outputs for the current source image, fed to every frame
  return {
    backend: chosen, threads: chosen === "wasm" ? n : null, size, info,
    get ready() { return bound !== null; },
    async bind(image) {
      const out = await bindSession.run({ [info.image]: new ort.Tensor("float32", image, [1, 3, size, size]) });
      const next = {};
      for (const name of info.bind_outputs) next[name] = out[name];
      bound = next;
    },
    async render(kp) {
      if (bound === null) throw new Error("no source image bound");
      const out = await frameSession.run({ ...bound, [info.keypoints]: new ort.Tensor("float32", kp, [1, kp.length]) });
      return out[info.frame].data;
    },
  };
}

/** NCHW float32 in [0, 1] -> RGBA ImageData pixels (rounded as receiver/render.to_image rounds). */
export function toRGBA(frame, size, rgba = new Uint8ClampedArray(size * size * 4)) {
  const plane = size * size;
  for (let i = 0; i < plane; i++) {
    rgba[4 * i] = Math.round(frame[i] * 255);
    rgba[4 * i + 1] = Math.round(frame[plane + i] * 255);
    rgba[4 * i + 2] = Math.round(frame[2 * plane + i] * 255);
    rgba[4 * i + 3] = 255;
  }
  return rgba;
}

/** A plausible keypoint vector (a 2 x 5 grid, identity Jacobians) moved a little by `t`, for timing. */
export function testKeypoints(t, numKp = 10) {
  const kp = new Float32Array(6 * numKp);
  for (let k = 0; k < numKp; k++) {
    kp[2 * k] = -0.5 + 0.25 * (k % 5) + 0.02 * Math.sin(t + k);
    kp[2 * k + 1] = (k < 5 ? -0.3 : 0.3) + 0.02 * Math.cos(t + k);
    const j = 2 * numKp + 4 * k;
    kp[j] = 1; kp[j + 3] = 1;
  }
  return kp;
}

/** Frames per second of `render` after `warmup` frames (bench/browser.py --render-only). */
export async function benchRender(renderer, { runs = 60, warmup = 10 } = {}) {
  const size = renderer.size, img = new Float32Array(3 * size * size);
  for (let i = 0; i < img.length; i++) img[i] = 0.3 + 0.4 * ((i * 7919) % 101) / 101;
  let t = performance.now();
  await renderer.bind(img);
  const bindMs = performance.now() - t;
  for (let i = 0; i < warmup; i++) await renderer.render(testKeypoints(i));
  const ms = [];
  const t0 = performance.now();
  for (let i = 0; i < runs; i++) {
    t = performance.now();
    await renderer.render(testKeypoints(warmup + i));
    ms.push(performance.now() - t);
  }
  const total = performance.now() - t0;
  ms.sort((a, b) => a - b);
  return { backend: renderer.backend, threads: renderer.threads, runs, bind_ms: bindMs,
    ms_p50: ms[Math.floor(ms.length / 2)], ms_p90: ms[Math.floor(ms.length * 0.9)], fps: (1000 * runs) / total };
}
