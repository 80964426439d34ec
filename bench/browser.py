"""The browser sender in headless Chromium: detector speed, and a browser call's bytes per frame
against the Python sender's on the same camera picture.

Usage:
  python -m bench.browser [--frames 300] [--runs 100] [--matched-fps 8] [--json OUT] [--png OUT]
      [--screenshot OUT.png] [--detector-only]
  python -m bench.browser --render-only [--runs 100] [--json OUT]

Two network namespaces (root; Chromium does not use loopback ICE candidates): the receiver in
one, the senders in the other. The camera is the bundled face clip placed off centre in a
640 x 480 picture (``bench.chromium``), played by Chromium's fake camera and read from the same
Y4M file by ``python -m sender --video``.

- detector: the page's own onnxruntime-web session (``window.kpcast.benchDetector``) on the face
  square of the fake camera, after a warm-up: WASM with 1 and 2 threads (onnxruntime-web fixes its
  thread count at start-up, so each is its own page), and WebGPU when Chromium has an adapter;
  beside it ONNX Runtime in Python (1 thread), which ``python -m sender`` runs;
- bytes per frame: ``--frames`` frames of a browser call and of a ``python -m sender`` call, both
  with the default predictive stream, counted by the receiver (keypoint message bytes per
  captured frame, and per sent message; the wire adds ~95 B per message), with face framing and
  with the centre square (the same crop for both: only the implementations differ), at the
  camera's 25 fps and at ``--matched-fps``. A browser slower than the camera codes only the frames
  it gets to, farther apart, which costs more bytes each; at the matched rate (the same frames
  delivered slower) both senders code every frame of the clip.

``--render-only``: the call page's renderer instead (``GET /call``, ``receiver.callpage``): the 64 x 64
render graph for browsers (``models.fomm.webrender``, its per-frame half) rendering from keypoints,
frames per second after a warm-up, with onnxruntime-web WASM on 1 and 2 threads and WebGPU when
Chromium has an adapter, beside ONNX Runtime in Python on the same graph (1 and 2 threads). The
pages are served from this process on 127.0.0.1 (no call, so no network namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import chromium, common
from bench.calls import env, start_receiver, stop
from bench.netns import two_hosts
from models.data import read_clip
from models.fomm.io import WEIGHTS_DIR
from shared.kpvector import TRANSPORT_OVERHEAD_B

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
CLIP = ROOT / "assets" / "demo_face.mp4"
FPS = 25  # the clip's rate, and the fake camera's
PORT = 8080

BENCH_JS = """(async () => {
  const timeout = (s) => new Promise((r) => setTimeout(() => r({ error: `no answer within ${s} s` }), s * 1000));
  const bench = async () => {
    while (!["ready", "error"].includes(window.kpcast.state)) await new Promise((r) => setTimeout(r, 100));
    if (window.kpcast.state === "error") return { error: window.kpcast.error };
    return await window.kpcast.benchDetector({ runs: %d, warmup: 10 });
  };
  return await Promise.race([bench(), timeout(50)]);
})()"""


RENDER_JS = """(async () => {
  const timeout = (s) => new Promise((r) => setTimeout(() => r({ error: `no answer within ${s} s` }), s * 1000));
  const bench = async () => {
    while (!["ready", "error"].includes(window.kpcast.state)) await new Promise((r) => setTimeout(r, 100));
    if (window.kpcast.state === "error") return { error: window.kpcast.error };
    return await window.kpcast.benchRender({ runs: %d, warmup: 10 });
  };
  return await Promise.race([bench(), timeout(%d)]);
})()"""


def python_render_fps(frame_onnx: Path, bind_onnx: Path, info: dict[str, Any], runs: int,
                      threads: int) -> dict[str, Any]:
    """ONNX Runtime in Python on the page's own two graphs: bind once, then ``runs`` frames timed."""
    from models.fomm.export import onnx_session
    from models.fomm.webrender import FRAME, IMAGE, KEYPOINTS

    bind, frame = onnx_session(bind_onnx.read_bytes(), threads), onnx_session(frame_onnx.read_bytes(), threads)
    s = info["size"]
    image = np.random.default_rng(0).uniform(0.3, 0.7, (1, 3, s, s)).astype(np.float32)
    t = time.perf_counter()
    bound = dict(zip(info["bind_outputs"], bind.run(info["bind_outputs"], {IMAGE: image}), strict=True))
    bind_ms = (time.perf_counter() - t) * 1000
    kp = np.zeros((1, 60), np.float32)
    kp[0, :20] = np.tile([-0.5, -0.3, -0.25, -0.3, 0.0, -0.3, 0.25, -0.3, 0.5, -0.3], 2)
    kp[0, 20::4] = kp[0, 23::4] = 1.0
    for _ in range(10):
        frame.run([FRAME], {KEYPOINTS: kp, **bound})
    ms = []
    t0 = time.perf_counter()
    for i in range(runs):
        kp[0, :20] += np.float32(0.001 * (-1) ** i)
        t = time.perf_counter()
        frame.run([FRAME], {KEYPOINTS: kp, **bound})
        ms.append((time.perf_counter() - t) * 1000)
    return {"backend": "onnxruntime (Python, CPU)", "threads": threads, "runs": runs, "bind_ms": bind_ms,
            "ms_p50": float(np.median(ms)), "ms_p90": float(np.percentile(ms, 90)),
            "fps": runs / (time.perf_counter() - t0)}


@contextlib.contextmanager
def serve_pages(model: Any) -> Iterator[str]:
    """The ``/send`` and ``/call`` pages of ``model`` served from a thread of this process; yields the origin."""
    from aiohttp import web

    from receiver.callpage import CallPage
    from receiver.sendpage import SendPage

    app = web.Application()
    SendPage(model).install(app)
    CallPage().install(app)
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, name="pages", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.run_until_complete(runner.cleanup())
        loop.close()


def run_render(runs: int) -> dict[str, Any]:
    """The call page's render speed in Chromium and in Python (see ``--render-only``)."""
    from models.fomm.io import load_motion_model
    from models.fomm.webrender import cached_web_render

    model, _ = load_motion_model(WEIGHTS_DIR / "fomm_face64.pt")
    info_path = cached_web_render(model, ROOT / "cache" / "web")  # before the pages ask for it
    info = json.loads(info_path.read_text())
    out: dict[str, Any] = {"graph": info["frame_onnx"], "size": info["size"], "runs": runs, "render": []}
    page_s = 60 + runs  # a slow WASM build renders ~5 fps on a busy machine: generous
    with serve_pages(model) as origin:
        pages = [chromium.Page(f"{origin}/call?render_only=1&threads={t}&backend=wasm", wait_for=("ready", "error"),
                               evaluate=RENDER_JS % (runs, page_s), timeout_s=page_s + 30) for t in (1, 2)]
        pages.append(chromium.Page(f"{origin}/call?render_only=1&backend=webgpu", wait_for=("ready", "error"),
                                   evaluate=RENDER_JS % (runs, page_s), timeout_s=page_s + 30))
        for page, p in zip(pages, chromium.run_pages(pages, chromium.chromium_args(fake_camera=False)), strict=True):
            res = p.evaluated or {"error": p.error or f"page state {p.state}"}
            if "error" in res:
                log.warning("render bench (%s): %s", page.url, res["error"])
                res = {"backend": "webgpu" if "webgpu" in page.url else "wasm", "error": res["error"]}
            out["render"].append(res)
    for t in (1, 2):
        out["render"].append(python_render_fps(info_path.parent / info["frame_onnx"],
                                               info_path.parent / info["bind_onnx"], info, runs, t))
    return out


def render_table(r: dict[str, Any]) -> str:
    return common.format_table(
        ["renderer (64 x 64)", "threads", "bind ms", "ms p50", "ms p90", "fps"],
        [[d["backend"], d.get("threads") or "-", d.get("bind_ms"), d.get("ms_p50"), d.get("ms_p90"),
          d.get("fps") if "fps" in d else d.get("error")] for d in r["render"]])


def python_detector_fps(onnx: Path, runs: int) -> dict[str, Any]:
    from models.fomm.export import onnx_session

    sess = onnx_session(onnx.read_bytes(), 1)
    x = np.full((1, 3, 64, 64), 0.5, np.float32)
    for _ in range(10):
        sess.run(None, {"frame": x})
    ms = []
    t0 = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        sess.run(None, {"frame": x})
        ms.append((time.perf_counter() - t) * 1000)
    return {"backend": "onnxruntime (Python, CPU)", "threads": 1, "runs": runs, "ms_p50": float(np.median(ms)),
            "fps": runs / (time.perf_counter() - t0)}


def _calls(stats_dir: Path, n: int, timeout_s: float = 20.0) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(list(stats_dir.glob("call_*.json"))) < n:
        time.sleep(0.2)
    return [json.loads((stats_dir / f"call_{i + 1}.json").read_text()) for i in range(n)]


def _per_frame(call: dict, frames: int) -> dict[str, Any]:
    msgs, b = call["keypoint_messages"], call["keypoint_message_bytes"]
    return {"frames": frames, "messages": msgs, "message_bytes": b, "bytes_per_frame": b / frames,
            "bytes_per_message": b / msgs if msgs else None,
            "wire_bytes_per_frame": (b + TRANSPORT_OVERHEAD_B * msgs) / frames,
            "frames_skipped": call["frames_skipped"], "keyframes": call["keyframes_received"]}


def run(frames: int, runs: int, screenshot: Path | None, matched_fps: int = 8,
        calls_too: bool = True) -> dict[str, Any]:
    from models.fomm.export import cached_detector_onnx
    from models.fomm.io import detector_id, load_motion_model

    weights = WEIGHTS_DIR / "fomm_face64.pt"
    model, _ = load_motion_model(weights)
    onnx = cached_detector_onnx(model, ROOT / "cache" / "web")
    out: dict[str, Any] = {"detector_id": detector_id(model), "frames": frames, "fps": FPS, "detector": []}
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        pictures = chromium.fake_camera_frames(read_clip(CLIP))
        camera = chromium.write_y4m(tmp / "camera.y4m", pictures, FPS)
        slow = chromium.write_y4m(tmp / "camera_slow.y4m", pictures, matched_fps)  # the same frames, delivered slower
        with two_hosts() as h:
            origin = f"http://{h.addr_a}:{PORT}"
            args = chromium.chromium_args(camera, secure_origin=origin)
            recv = start_receiver(["--host", h.addr_a, "--port", str(PORT), "--weights", str(weights),
                                   "--stats-dir", str(tmp / "stats")], netns=h.a, log_path=tmp / "receiver.log")
            try:
                pages = [chromium.Page(f"{origin}/send?threads={t}&backend=wasm", wait_for=("ready", "error"),
                                       evaluate=BENCH_JS % runs) for t in (1, 2)]
                pages.append(chromium.Page(f"{origin}/send?backend=webgpu", wait_for=("ready", "error"),
                                           evaluate=BENCH_JS % runs))
                for p in chromium.run_pages(pages, args, netns=h.b):
                    res = p.evaluated or {"error": p.error}
                    if "error" in res:
                        log.warning("detector bench: %s", res["error"])
                        res = {"backend": "webgpu", "error": res["error"]}
                    out["detector"].append(res)
                out["detector"].append(python_detector_fps(onnx, runs))
                # calls on the same picture: the browser's and the Python sender's, each with both framings, at the
                # camera's rate and at one slow enough for the browser to code every frame as Python does
                calls = []
                for fps, cam in ((FPS, camera), (matched_fps, slow)) if calls_too else ():
                    for framing in ("face", "centre"):
                        shot = (screenshot, frames // 2) if screenshot and fps == FPS and framing == "face" else None
                        page = chromium.run_page(f"{origin}/send?autostart=1&frames={frames}&framing={framing}",
                                                 chromium.chromium_args(cam, secure_origin=origin), netns=h.b,
                                                 timeout_s=60 + 2 * frames / fps, screenshot=shot)
                        if page.state != "ended":
                            raise RuntimeError(f"the browser call did not end normally: {page.state} {page.error}")
                        calls.append(("browser", fps, framing, page))
                        sender = subprocess.run(
                            ["ip", "netns", "exec", h.b, sys.executable, "-m", "sender", "--receiver", origin,
                             "--video", str(cam), "--fps", str(fps), "--max-frames", str(frames), "--weights",
                             str(weights), "--framing", framing, "--stats-json", str(tmp / "sender.json")],
                            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120 + 2 * frames / fps)
                        if sender.returncode != 0:
                            raise RuntimeError(f"python -m sender failed: {sender.stderr[-2000:]}")
                        calls.append(("python", fps, framing, json.loads((tmp / "sender.json").read_text())))
                received = _calls(tmp / "stats", len(calls)) if calls else []
            finally:
                recv.terminate()
                stop(recv)
        out["calls"] = []
        if not calls_too:
            return out
        for (who, fps, framing, sent), got in zip(calls, received, strict=True):
            if who == "browser":
                st = sent.stats
                row = {**_per_frame(got, st["frames_captured"]), "frames_missed": st["frames_missed"],
                       "detect_ms_p50": float(np.median(st["detect_ms"])),
                       "frame_ms_p50": float(np.median(st["frame_ms"])),
                       "capture_fps": st["frames_captured"] / st["duration_s"], "square": sent.square}
            else:
                row = {**_per_frame(got, sent["frames_captured"]), "frames_missed": 0,
                       "detect_ms_p50": sent["extract_ms_p50"],
                       "capture_fps": sent["frames_captured"] / sent["duration_s"],
                       "square": sent.get("framing_square")}
            out["calls"].append({"sender": who, "camera_fps": fps, "framing": framing, **row})
        by = {(c["sender"], c["camera_fps"], c["framing"]): c for c in out["calls"]}
        out["bytes_per_frame_ratio"] = {f"{fps}fps_{framing}": by[("browser", fps, framing)]["bytes_per_frame"]
                                        / by[("python", fps, framing)]["bytes_per_frame"]
                                        for fps in (FPS, matched_fps) for framing in ("face", "centre")}
    return out


def table(r: dict[str, Any]) -> str:
    det = common.format_table(
        ["detector", "threads", "ms p50", "fps"],
        [[d["backend"], d.get("threads") or "-", d.get("ms_p50"), d.get("fps") if "fps" in d else d.get("error")]
         for d in r["detector"]])
    calls = common.format_table(
        ["sender", "camera fps", "framing", "frames", "coded fps", "missed", "messages", "B/frame", "B/message",
         "wire kbps", "square"],
        [[c["sender"], c["camera_fps"], c["framing"], c["frames"], c["capture_fps"], c["frames_missed"], c["messages"],
          c["bytes_per_frame"], c["bytes_per_message"], c["wire_bytes_per_frame"] * c["capture_fps"] * 8 / 1000,
          c["square"]] for c in r["calls"]])
    if not r["calls"]:
        return det
    ratios = ", ".join(f"{k} {v:.3f}" for k, v in r["bytes_per_frame_ratio"].items())
    return f"{det}\n\n{calls}\nbrowser / python bytes per frame: {ratios}"


def plot(r: dict[str, Any], path: str) -> None:
    fig, _ = common.new_figure(9 if r["calls"] else 5, 3.8)
    fig.clf()
    a, b = fig.subplots(1, 2) if r["calls"] else (fig.subplots(1, 1), None)
    det = [d for d in r["detector"] if "fps" in d]
    names = [f"{d['backend'].split(' ')[0]}{' x' + str(d['threads']) if d.get('threads') else ''}" for d in det]
    a.barh(names, [d["fps"] for d in det], color="#4c72b0")
    a.axvline(30, color="#c44e52", ls="--", lw=1, label="30 fps target")
    a.set_xlabel("keypoint detector, frames/s (64 x 64 input)")
    a.legend(loc="lower right", fontsize=8)
    if b is None:
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        return
    labels = [f"{c['sender'][:7]}\n{c['camera_fps']} fps\n{c['framing']}" for c in r["calls"]]
    b.bar(range(len(labels)), [c["bytes_per_frame"] for c in r["calls"]],
          color=["#55a868" if c["sender"] == "browser" else "#8172b2" for c in r["calls"]])
    b.set_xticks(range(len(labels)), labels, fontsize=7)
    b.set_ylabel("keypoint message bytes per captured frame")
    b.set_title(f"{r['frames']} frames per call, predictive stream", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=300, help="frames of each call (default 300: 12 s at 25 fps)")
    p.add_argument("--runs", type=int, default=100, help="timed detector runs per backend")
    p.add_argument("--matched-fps", type=int, default=8,
                   help="a camera rate the browser keeps up with, so both senders code the same frames (default 8)")
    p.add_argument("--json")
    p.add_argument("--png")
    p.add_argument("--screenshot", help="save the page mid-call here (PNG)")
    p.add_argument("--detector-only", action="store_true", help="only the detector speeds (no calls)")
    p.add_argument("--render-only", action="store_true",
                   help="only the call page's 64 x 64 render speed (WASM 1/2 threads, WebGPU, Python ORT)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    why = chromium.available()
    if why:
        raise SystemExit(f"bench.browser: {why}")
    if a.render_only:
        r = run_render(a.runs)
        print(render_table(r))
        if a.json:
            common.write_json(a.json, r)
        return
    r = run(a.frames, a.runs, Path(a.screenshot) if a.screenshot else None, a.matched_fps, not a.detector_only)
    print(table(r))
    if a.json:
        common.write_json(a.json, r)
    if a.png:
        plot(r, a.png)


if __name__ == "__main__":
    main()
