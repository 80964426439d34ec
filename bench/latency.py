"""Latency per stage of a real loopback call, and offline throughput of the networks.

Usage:
  python -m bench.latency [--json OUT] [--png PLOT] [--frames 300] [--fps 30] [--modes clock,immediate]
                          [--weights PATH] [--device cpu|cuda] [--sink null|file:PATH]

For each playout mode it runs a receiver and a sender as two processes on 127.0.0.1
(batch 1, one call), the sender logging per-frame times (``--truth-out``) and the receiver
logging every shown frame (``--frames-log``). All instants are wall-clock on this one machine,
so differences between the two processes are meaningful. Stages per real frame:

  capture   read + crop + resize of the frame (sender)
  extract   keypoint detector (sender)
  encode    quantise + msgpack (sender)
  network   sent -> arrived: SCTP/DTLS/UDP over loopback + the receiver's event loop
  buffer    arrived -> render started: jitter-buffer wait (clock mode) or queueing (immediate)
  playout   the playout decision for the frame (buffer lookup, forecasting when concealing)
  render    dense motion + generator
  sink      writing the frame to the sink
  glass_to_glass  capture instant -> frame in the sink (excludes the camera's own exposure/readout
                  and the display's refresh, which a file input and a file/null sink don't have)

The offline part times the keypoint detector and the renderer alone at batch 1 (frames/s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench import common
from bench.calls import free_port, start_receiver, stop

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["capture", "extract", "encode", "network", "buffer", "playout", "render", "sink", "glass_to_glass"]


def pct(x: np.ndarray) -> dict[str, float | None]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {"p50": None, "p95": None, "p99": None, "mean": None, "n": 0}
    return {"p50": float(np.percentile(x, 50)), "p95": float(np.percentile(x, 95)),
            "p99": float(np.percentile(x, 99)), "mean": float(x.mean()), "n": int(x.size)}


def stage_times(truth: dict[str, np.ndarray], shown: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Join sender and receiver logs by seq; only real (sent, received, not repeated) frames: a frame the
    predictive codec skipped (sent_us 0) has no network time; nor a reused one (shown as the picture on screen,
    not rendered: no render or buffer time to split)."""
    real = (shown["kind"] == 0) & ~shown["repeated"] & (shown["arrival_us"] > 0)
    if "reused" in shown:
        real &= ~shown["reused"].astype(bool)
    by_seq = {int(s): i for i, s in enumerate(truth["seq"]) if truth["sent_us"][i] > 0}
    rows = [(i, by_seq[int(s)]) for i, s in enumerate(shown["seq"]) if real[i] and int(s) in by_seq]
    r = np.array([a for a, _ in rows], dtype=int)
    t = np.array([b for _, b in rows], dtype=int)
    if len(rows) == 0:
        return {k: np.zeros(0) for k in STAGES}
    ms = lambda us: us.astype(np.float64) / 1000.0  # noqa: E731
    return {
        "capture": truth["read_ms"][t],
        "extract": truth["extract_ms"][t],
        "encode": truth["encode_ms"][t],
        "network": ms(shown["arrival_us"][r] - truth["sent_us"][t]),
        "buffer": ms(shown["render_start_us"][r] - shown["arrival_us"][r]),
        "playout": shown["tick_ms"][r].astype(np.float64),
        "render": shown["render_ms"][r].astype(np.float64),
        "sink": shown["sink_ms"][r].astype(np.float64),
        "glass_to_glass": ms(shown["rendered_us"][r] - truth["capture_us"][t]),
    }


def run_call(mode: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    port = free_port()
    py = [sys.executable, "-m"]
    recv_cmd = ["--port", str(port), "--weights", str(args.weights), "--playout", mode,
                     "--forecaster", args.forecaster, "--sink", args.sink, "--stats-dir", str(work),
                     "--stop-after-calls", "1", "--frames-log", str(work / "frames.npz")]
    if args.device:
        recv_cmd += ["--device", args.device]
    recv = start_receiver(recv_cmd, log_path=work / "receiver.log")
    try:
        res = subprocess.run(py + ["sender", "--receiver", f"http://127.0.0.1:{port}", "--video", str(args.clip),
                                   "--loop", "--max-frames", str(args.frames), "--fps", str(args.fps),
                                   "--weights", str(args.weights), "--stats-json", str(work / "sender.json"),
                                   "--truth-out", str(work / "truth.npz")],
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            raise RuntimeError("sender failed: " + res.stderr[-2000:])
    finally:
        stop(recv, 60)
    sender = json.loads((work / "sender.json").read_text())
    call = json.loads((work / "call_1.json").read_text())
    truth = dict(np.load(work / "truth.npz"))
    shown = dict(np.load(work / "frames.npz"))
    times = stage_times(truth, shown)
    return {
        "mode": mode,
        "stages_ms": {k: pct(v) for k, v in times.items()},
        "sender_fps": sender["frames_captured"] / max(1e-6, sender["duration_s"]),
        "receiver_fps": call["rendered_fps"],
        "frames_captured": sender["frames_captured"], "frames_rendered": call["frames_rendered"],
        # stage times exist for sent frames only (the predictive codec sends what the receiver cannot predict)
        "frames_sent": sender["frames_sent"],
        "frames_real_timed": int(times["render"].size),
        "frames_concealed": call["frames_concealed"], "stalls": call["stalls"],
    }


def offline_throughput(weights: Path, device: str, frames: int = 60) -> dict[str, float]:
    """Frames/s of the detector and of the renderer alone, batch 1, source encoding cached."""
    model, _, _ = common.load_model(weights)
    model = model.to(device)
    size = model.config.size
    x = torch.rand(1, 3, size, size, device=device)
    out: dict[str, float] = {}
    with torch.no_grad():
        cache = model.prepare_source(x)
        v = model.keypoints(x)
        for name, fn in [("keypoints_fps", lambda: model.keypoints(x)), ("render_fps", lambda: model.render(cache, v))]:
            for _ in range(5):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(frames):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out[name] = frames / (time.perf_counter() - t0)
    out["size"] = size
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json")
    p.add_argument("--png")
    p.add_argument("--frames", type=int, default=300)
    p.add_argument("--fps", type=float, default=30.0)
    p.add_argument("--modes", default="clock,immediate")
    p.add_argument("--weights", default=None)
    p.add_argument("--clip", default=str(ROOT / "assets" / "demo_face.mp4"))
    p.add_argument("--forecaster", default="last")
    p.add_argument("--sink", default="null")
    p.add_argument("--device", default=None, help="receiver device (default: cuda when present)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    args.weights = common.resolve_weights(args.weights)
    common.set_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result: dict[str, Any] = {"weights": str(args.weights), "frames": args.frames, "fps": args.fps,
                              "device": device, "device_name": torch.cuda.get_device_name(0) if device == "cuda"
                              else "CPU", "threads": args.threads, "calls": []}
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result["calls"].append(run_call(mode, args, Path(tmp)))
    result["offline"] = {"cpu": offline_throughput(args.weights, "cpu")}
    if torch.cuda.is_available():
        result["offline"]["cuda"] = offline_throughput(args.weights, "cuda")

    headers = ["stage (ms)"] + [f"{c['mode']} {q}" for c in result["calls"] for q in ("p50", "p95", "p99")]
    rows = [[s] + [c["stages_ms"][s][q] for c in result["calls"] for q in ("p50", "p95", "p99")] for s in STAGES]
    rows.append(["sender fps"] + [x for c in result["calls"] for x in (c["sender_fps"], None, None)])
    rows.append(["receiver fps"] + [x for c in result["calls"] for x in (c["receiver_fps"], None, None)])
    if args.json:
        common.write_json(args.json, result)
    if args.png:
        fig, ax = common.new_figure(8, 4.5)
        width = 0.8 / len(result["calls"])
        for i, c in enumerate(result["calls"]):
            xs = np.arange(len(STAGES)) + i * width
            ax.bar(xs, [c["stages_ms"][s]["p50"] or 0 for s in STAGES], width, label=f"{c['mode']} p50")
            ax.scatter(xs, [c["stages_ms"][s]["p95"] or 0 for s in STAGES], marker="_", s=200, color="k",
                       label="p95" if i == 0 else None)
        ax.set_xticks(np.arange(len(STAGES)) + 0.4 - width / 2, STAGES, rotation=30)
        ax.set_ylabel("ms")
        ax.set_title(f"kpcast latency per stage ({result['device_name']}, batch 1)")
        ax.legend()
        fig.tight_layout()
        Path(args.png).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.png, dpi=120)
    off = result["offline"]
    print("offline throughput (batch 1): " + ", ".join(
        f"{dev}: keypoints {o['keypoints_fps']:.1f} fps, render {o['render_fps']:.1f} fps" for dev, o in off.items()))
    print(common.format_table(headers, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
