"""The demo: a loopback call on the bundled clip with the bundled weights.

Usage:
  python -m bench.demo [--clip assets/demo_face.mp4] [--size auto|64|128|256] [--out out/demo]

The receiver renders at ``--size`` (default auto: the largest shipped model that runs in
real time on this machine, see ``python -m receiver --help``); the sender captures and
sends its source image at 256x256 and detects keypoints at 64x64 whatever that size is.

Starts a receiver and a sender as two processes on 127.0.0.1, streams the clip, and writes
``received.mp4`` (what the receiver rendered), ``side_by_side.mp4`` (input | rendered, each with its eyes
and mouth enlarged below it: ``bench.zoom``; ``--no-zoom`` for the frames alone) and ``report.json``, then
prints a summary table.

How ``wire_kbps`` is estimated: the sender's DTLS transport counts every UDP payload byte it
sends (handshake, source image, keypoints, heartbeats, SCTP control); 28 B of IPv4 + UDP header
are added per packet; divided by the call's duration. ``keypoint_wire_kbps`` counts only the
keypoint messages: their bytes plus 95 B of DTLS/SCTP/UDP/IP overhead per message.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from bench.calls import free_port, start_receiver, stop
from bench.zoom import ZoomTracker, side_by_side_zoomed
from models.data import center_square, read_clip
from models.fomm.io import SHIPPED_SIZES
from receiver.session import DEFAULT_FORECASTER

ROOT = Path(__file__).resolve().parents[1]
IP_UDP_HEADER = 28


def write_mp4(path: Path, frames: list[np.ndarray], fps: float) -> None:
    from fractions import Fraction
    with av.open(str(path), "w") as c:
        st = c.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        h, w = frames[0].shape[:2]
        st.height, st.width = h + h % 2, w + w % 2  # yuv420p needs even sides
        st.pix_fmt = "yuv420p"
        st.options = {"crf": "18"}
        for f in frames:
            f = np.pad(f, ((0, h % 2), (0, w % 2), (0, 0)))
            for p in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)


def _enlarge(img: np.ndarray, target: int = 256) -> np.ndarray:
    """Upscale small frames so a person can see them (bicubic; for viewing only)."""
    s = img.shape[0] * max(1, target // img.shape[0])
    return cv2.resize(img, (s, s), interpolation=cv2.INTER_CUBIC)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", default=str(ROOT / "assets" / "demo_face.mp4"))
    p.add_argument("--size", default="auto", choices=["auto", *map(str, SHIPPED_SIZES)],
                   help="receiver output size (default auto)")
    p.add_argument("--weights", default=None, help="one checkpoint for both ends instead of the shipped models")
    p.add_argument("--out", default="out/demo")
    p.add_argument("--playout", default="clock", choices=["clock", "immediate"])
    p.add_argument("--forecaster", default=DEFAULT_FORECASTER)
    p.add_argument("--max-frames", type=int, default=None)
    p.add_argument("--zoom", action=argparse.BooleanOptionalAction, default=True,
                   help="side_by_side.mp4 with the eyes and the mouth enlarged under each frame (dlib landmarks)")
    p.add_argument("--early-render", action=argparse.BooleanOptionalAction, default=None,
                   help="the receiver's --early-render / --no-early-render (default: the receiver's)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*"):
        if old.is_file():
            old.unlink()
    port = free_port()
    py = [sys.executable, "-m"]
    t0 = time.monotonic()
    try:
        model_args = ["--weights", a.weights] if a.weights else ["--size", a.size]
        recv = start_receiver(["--port", str(port), *model_args, "--playout", a.playout,
                               "--forecaster", a.forecaster, "--sink", f"file:{out / 'received.mp4'}",
                               *([] if a.early_render is None else
                                 ["--early-render" if a.early_render else "--no-early-render"]),
                               "--stats-dir", str(out), "--stop-after-calls", "1"], log_path=out / "receiver.log")
    except (RuntimeError, TimeoutError) as e:
        print(f"{e}\n" + (out / "receiver.log").read_text()[-3000:], file=sys.stderr)
        return 1
    try:
        send = subprocess.run(py + ["sender", "--receiver", f"http://127.0.0.1:{port}", "--video", a.clip,
                                    "--stats-json", str(out / "sender.json")]
                              + (["--weights", a.weights] if a.weights else [])
                              + (["--max-frames", str(a.max_frames)] if a.max_frames else []),
                              cwd=ROOT, stderr=open(out / "sender.log", "w"), timeout=300)  # noqa: SIM115
        if send.returncode != 0:
            print((out / "sender.log").read_text()[-3000:], file=sys.stderr)
            return 1
    finally:
        stop(recv, 60)
    sender = json.loads((out / "sender.json").read_text())
    call = json.loads((out / "call_1.json").read_text())

    # side by side: the sender's input frame | what the receiver rendered for that frame
    seqs = json.loads((out / "received.mp4.seq.json").read_text())
    with av.open(str(out / "received.mp4")) as c:
        rendered = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    size = rendered[0].shape[0]
    inputs = [center_square(f, size) for f in read_clip(a.clip)]
    source = inputs[0]
    pairs, ssim_m, ssim_s, psnr_m, psnr_s = [], [], [], [], []
    tracker = ZoomTracker() if a.zoom else None
    for seq, img in zip(seqs, rendered, strict=False):
        if seq >= len(inputs):
            continue
        ref = inputs[seq]
        ssim_m.append(structural_similarity(ref, img, channel_axis=-1, data_range=255))
        ssim_s.append(structural_similarity(ref, source, channel_axis=-1, data_range=255))
        psnr_m.append(peak_signal_noise_ratio(ref, img, data_range=255))
        psnr_s.append(peak_signal_noise_ratio(ref, source, data_range=255) if not np.array_equal(ref, source) else 99.0)
        ref_v, img_v = _enlarge(ref), _enlarge(img)
        pairs.append(side_by_side_zoomed(ref_v, img_v, tracker.boxes(ref_v)) if tracker is not None
                     else np.concatenate([ref_v, img_v], axis=1))
    write_mp4(out / "side_by_side.mp4", pairs, call["hello"].get("fps", 30.0))

    duration = max(1e-6, sender["duration_s"])
    wire = sender.get("udp_bytes_sent", 0) + IP_UDP_HEADER * sender.get("udp_packets_sent", 0)
    report = {
        "clip": a.clip, "weights": a.weights or f"shipped, --size {a.size}", "size": size, "fps": sender["fps"],
        "playout": a.playout,
        "frames_sent": sender["frames_sent"], "frames_received": call["frames_received"],
        "frames_rendered": call["frames_rendered"], "frames_concealed": call["frames_concealed"],
        "keypoint_payload_bytes": sender["keypoint_payload_bytes"],
        "keypoint_message_bytes": sender["keypoint_message_bytes"],
        "source_image_bytes": sender["source_image_bytes"],
        "wire_kbps": wire * 8 / 1000 / duration,
        "wire_kbps_method": "sender DTLS transport UDP payload bytes + 28 B IPv4/UDP header per packet, "
                            "all traffic sender->receiver (handshake, source image, keypoints, heartbeats)",
        "keypoint_wire_kbps": call["keypoint_wire_kbps"],
        "wire_kbps_reverse": (sender.get("udp_bytes_received", 0)
                              + IP_UDP_HEADER * sender.get("udp_packets_received", 0)) * 8 / 1000 / duration,
        "render_fps": call["render_fps"], "rendered_fps": call["rendered_fps"],
        "latency_ms_p50": call["latency_ms_p50"], "latency_ms_p95": call["latency_ms_p95"],
        "extract_ms_p50": sender["extract_ms_p50"],
        "ssim": float(np.mean(ssim_m)), "psnr": float(np.mean(psnr_m)),
        "ssim_static_source": float(np.mean(ssim_s)), "psnr_static_source": float(np.mean(psnr_s)),
        "duration_s": duration, "wall_s": time.monotonic() - t0,
        # the tier the receiver rendered at (frames leave at the display size whatever it is)
        "render_size_start": (call["tier_changes"][0]["from"] if call.get("tier_changes") else call.get("render_size")),
        "render_size_end": call.get("render_size"), "tier_changes": call.get("tier_changes", []),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    rows = [("frames sent / received / rendered", f"{report['frames_sent']} / {report['frames_received']} / "
             f"{report['frames_rendered']}"),
            ("keypoint payload", f"{report['keypoint_payload_bytes']} B"),
            ("source image", f"{report['source_image_bytes']} B"),
            ("wire (all, sender->receiver)", f"{report['wire_kbps']:.1f} kbps"),
            ("wire (keypoint messages)", f"{report['keypoint_wire_kbps']:.1f} kbps"),
            ("render fps (renderer throughput)", f"{report['render_fps']:.1f}"),
            ("render tier start / end (changes)", f"{report['render_size_start']} / {report['render_size_end']} "
             f"({len(report['tier_changes'])})"),
            ("latency p50 / p95", f"{report['latency_ms_p50']:.1f} / {report['latency_ms_p95']:.1f} ms"),
            ("SSIM model / static source", f"{report['ssim']:.3f} / {report['ssim_static_source']:.3f}"),
            ("PSNR model / static source", f"{report['psnr']:.2f} / {report['psnr_static_source']:.2f} dB")]
    w = max(len(r[0]) for r in rows)
    print(f"\nkpcast demo ({size}x{size}, {report['fps']:.0f} fps, {a.playout} playout) -> {out}/")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
