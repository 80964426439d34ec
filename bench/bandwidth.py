"""Bits on the wire: the keypoint stream against H.264 at equal quality.

Usage:
  python -m bench.bandwidth --data ../shared/data --weights runs/face64/best.pt --split val \\
      --json out/bandwidth.json --png out/bandwidth.png

Everything runs at the motion model's output size, on the same frames, played at 30 fps.

Keypoint streams: the sender's default, the closed-loop predictive stream (``--pred``
RULE:TOLERANCE:MAX_GAP[:PREDICTOR] configurations, ``shared.kpcodec``: a frame goes out only
when the receiver's prediction misses it, as one ``CodedKeypoints`` message at once, so it
adds no delay; frames after the last sent one are sent at the end, as the sender does), and
the vector streams (codec F16/Q8, decimation k = 1, 2, 3, batching B frames per message).
For each the exact ``shared.protocol`` message bytes are counted, plus a stated
95 B per message of transport overhead (DTLS + SCTP + UDP + IPv4, measured for aiortc 1.16
data channels) and, once per call, the Hello message and the JPEG source image (quality 90)
in ``SourceChunk`` messages, amortised over ``--call-seconds``. Quality: the receiver side
is simulated from those bytes — messages are decoded (predictive: by the receiver's own
``receiver.kpstream.PredictiveStream``; a skipped frame is the prediction the playout shows),
missing frames of decimated streams linearly interpolated (frames after the last sent one
hold it), and rendered from the JPEG-decoded source; SSIM and PSNR vs the original frames
(all frames but the first, which is the source). ``added_delay_ms``: how long a receiver
waits beyond the network for a frame: (k-1) frames to interpolate and B*k-k more to fill a
batch; 0 for the predictive stream. The reverse direction is estimated, not measured here:
aiortc acknowledges every SCTP packet it receives with a SACK (~92 B on the wire, the ~22
kbps measured at 30 messages/s in the demo), so ``kbps_reverse_est`` = messages/s x 92 B;
H.264's RTCP is not modelled.

H.264: libx264 through PyAV (veryfast, zerolatency, yuv420p, 30 fps, no periodic IDR) over a
CRF sweep, decoded and scored on the same frames. Steady-state rate = bytes of every frame
after the first (the IDR); the "amortised" rate adds the IDR spread over the call. A
``kbps_rtp`` column adds per-packet RTP/SRTP/UDP/IP headers (aiortc's own packetiser) so
the keypoint stream's transport overhead has a counterpart.

Stock WebRTC H.264: aiortc's ``H264Encoder`` clamps its target to [MIN_BITRATE, MAX_BITRATE]
(500 kbps .. 3 Mbps, default 1 Mbps); the frames are encoded with it at both targets and the
actual bytes reported. A stock aiortc call never asks the encoder for less than MIN_BITRATE.

Ratios: ``ratio_equal_ssim`` = H.264 kbps needed to reach the keypoint stream's SSIM (linear
interpolation on the rate-SSIM curve made monotone; if our SSIM is below the curve's lowest
point, that point is used and ``h264_floor_used`` is true) / our kbps on the wire (H.264 without
its packet headers: favours H.264); ``ratio_equal_ssim_wire`` charges H.264 its RTP/SRTP/UDP/IP
headers as ours are charged theirs (``kbps_rtp``; ``ratio_equal_ssim_rtp`` is the same number,
its old name); ``ratio_equal_ssim_payload`` compares both without any transport bytes.
``ratio_vs_webrtc_h264`` = stock aiortc H.264 kbps at MIN_BITRATE (measured) / our kbps.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench import common
from bench.h264 import RTP_OVERHEAD_BYTES_PER_PACKET, aiortc_h264, h264_curve, rate_at_ssim
from bench.wire_sim import (
    FPS,
    JPEG_QUALITY,
    SACK_BYTES_ON_WIRE,
    jpeg_source,
    one_off_messages,
    pred_stream_messages,
    receive,
    receive_pred,
    stream_messages,
    wire_kbps,
)
from models.fomm.io import weights_for_size
from models.fomm.model import MotionModel
from shared import protocol
from shared.kpcodec import DEFAULT_STREAM, PredictiveConfig
from shared.kpvector import TRANSPORT_OVERHEAD_B, Codec

log = logging.getLogger(__name__)

CRFS = (18, 23, 28, 33, 35, 38, 40, 43, 45, 48, 51)
HEADLINE = "PRED"  # the sender's default stream: the predictive codec with shared.kpcodec.DEFAULT_STREAM
PREVIOUS_DEFAULT = "Q8:1:1"  # what the sender sent by default before the predictive codec


@dataclass(frozen=True)
class PredSpec:
    """One predictive stream configuration (``--pred RULE:TOLERANCE:MAX_GAP[:PREDICTOR[:bundle]]``;
    ``bundle``: two consecutive coded frames per message, as ``sender --bundle``)."""

    cfg: PredictiveConfig
    bundle: bool = False

    @staticmethod
    def parse(text: str) -> PredSpec:
        parts = text.split(":")
        bundle = len(parts) == 5 and parts[4] == "bundle"
        if len(parts) not in (3, 4, 5) or (len(parts) == 5 and not bundle):
            raise ValueError(f"--pred wants RULE:TOLERANCE:MAX_GAP[:PREDICTOR[:bundle]], got {text!r}")
        rule, tol, gap = parts[0], float(parts[1]), int(parts[2])
        predictor = parts[3] if len(parts) >= 4 else DEFAULT_STREAM.predictor
        return PredSpec(PredictiveConfig(predictor=predictor, tolerance=tol, max_gap=gap, skip_rule=rule,
                                         keyframe_interval=DEFAULT_STREAM.keyframe_interval), bundle)

    @property
    def key(self) -> str:
        c = self.cfg
        return f"PRED:{c.skip_rule}:{c.tolerance:g}:{c.max_gap}:{c.predictor}" + (":bundle" if self.bundle else "")

    @property
    def is_default(self) -> bool:
        return self.cfg == DEFAULT_STREAM and not self.bundle


DEFAULT_PRED = PredSpec(DEFAULT_STREAM).key.removeprefix("PRED:")


# --------------------------------------------------------------------------- keypoint stream


def keypoint_configs(model: MotionModel, clips: list[tuple[Any, np.ndarray]], codecs: list[Codec],
                     decimations: list[int], batches: list[int], call_seconds: float,
                     preds: list[PredSpec] = ()) -> tuple[list[dict], dict]:
    """Every stream configuration pooled over clips, plus the static-source baseline."""
    acc: dict[tuple, dict[str, Any]] = {}
    static_rows = []

    def add(key: tuple, q: dict, msgs: list[bytes], n_frames: int, one_off: list[bytes], extra: dict) -> None:
        a = acc.setdefault(key, {"rows": [], "msg_bytes": 0, "payload_bytes": 0, "msgs": 0, "frames": 0,
                                 "one_off_bytes": [], "one_off_msgs": [], "extra": {}})
        a["rows"].append(q)
        a["msg_bytes"] += sum(len(m) for m in msgs)
        a["payload_bytes"] += sum(len(protocol.decode(m).payload) for m in msgs)
        a["msgs"] += len(msgs)
        a["frames"] += n_frames
        a["one_off_bytes"].append(sum(len(m) for m in one_off))
        a["one_off_msgs"].append(len(one_off))
        for k, v in extra.items():
            a["extra"][k] = a["extra"].get(k, 0) + v

    for info, frames in clips:
        ref = common.to_float(frames)
        kp = common.detect_keypoints(model, frames)  # the sender detects on the original frames
        jpeg, src = jpeg_source(frames[0])
        cache = common.prepare(model, src)
        src_f = common.to_float(src[None])[0]
        static_rows.append(common.frame_metrics(np.broadcast_to(src_f, ref[1:].shape), ref[1:], ref[0]))
        for spec in preds:
            msgs, summary = pred_stream_messages(kp, spec.cfg, bundle=spec.bundle)
            received = receive_pred(msgs, len(frames), spec.cfg)
            q = common.frame_metrics(common.render_vectors(model, cache, received[1:]), ref[1:], ref[0])
            extra = {k: summary[k] for k in ("frames_sent", "frames_skipped", "keyframes_sent")}
            add(("PRED", spec), q, msgs, len(frames), one_off_messages(jpeg, frames.shape[1], Codec.PRED, 1, spec.cfg),
                extra)
        for codec in codecs:
            for k in decimations:
                streams = {b: stream_messages(kp, codec, k, b) for b in batches}
                received = receive(streams[batches[0]], len(frames))
                pred = common.render_vectors(model, cache, received[1:])
                q = common.frame_metrics(pred, ref[1:], ref[0])
                one_off = one_off_messages(jpeg, frames.shape[1], codec, k)
                for b, msgs in streams.items():
                    add((codec.name, k, b), q, msgs, len(frames), one_off, {})
        log.info("keypoint stream: %s done", common.clip_name(info))
    configs = []
    for key, a in acc.items():
        seconds = a["frames"] / FPS
        one_off_wire = float(np.mean([by + TRANSPORT_OVERHEAD_B * n
                                      for by, n in zip(a["one_off_bytes"], a["one_off_msgs"], strict=True)]))
        kbps_stream = wire_kbps(a["msg_bytes"], a["msgs"], seconds)
        kbps_source = one_off_wire * 8 / call_seconds / 1000
        q = common.mean_over_clips(a["rows"], ("ssim", "psnr", "l1", "l1_moving"))
        if key[0] == "PRED":
            spec = key[1]
            c = spec.cfg
            desc = {"codec": "PRED", "name": spec.key, "k": 1, "batch": 1, "default": spec.is_default,
                    "predictor": c.predictor, "tolerance": c.tolerance, "max_gap": c.max_gap,
                    "skip_rule": c.skip_rule, "keyframe_interval": c.keyframe_interval,
                    # nothing waits: a coded frame goes out when captured, a skipped one is shown predicted;
                    # bundled, a coded frame may wait one period for the next
                    "bundle": spec.bundle, "added_delay_ms": 1000 / FPS if spec.bundle else 0.0, **a["extra"]}
        else:
            codec_name, k, b = key
            # a receiver waits k-1 frames to interpolate, and B*k-k frames more for a full batch
            desc = {"codec": codec_name, "name": f"{codec_name}:{k}:{b}", "k": k, "batch": b,
                    "default": False, "added_delay_ms": (b * k - 1) / FPS * 1000}
        configs.append({
            **desc,
            "payload_bytes_per_msg": a["msg_bytes"] / a["msgs"],
            "codec_payload_bytes_per_msg": a["payload_bytes"] / a["msgs"],
            "msgs_per_s": a["msgs"] / seconds,
            "msg_bytes_total": a["msg_bytes"], "msgs_total": a["msgs"], "frames_total": a["frames"],
            "stream_seconds": seconds,
            "kbps_payload": a["msg_bytes"] * 8 / seconds / 1000,
            "kbps_stream": kbps_stream,
            "one_off_wire_bytes_per_call": one_off_wire,
            "kbps_source_amortised": kbps_source,
            "kbps_wire": kbps_stream + kbps_source,
            "kbps_reverse_est": a["msgs"] / seconds * SACK_BYTES_ON_WIRE * 8 / 1000,
            "added_latency_ms": desc["added_delay_ms"],  # its old name
            **q,
        })
    static = common.mean_over_clips(static_rows, ("ssim", "psnr", "l1", "l1_moving"))
    return configs, static


# --------------------------------------------------------------------------- output


def plot(res: dict[str, Any], path: str | Path) -> None:
    fig, ax = common.new_figure(7.5, 4.8)
    c = res["h264_curve"]
    ax.plot([p["kbps"] for p in c], [p["ssim"] for p in c], "o-", color="tab:blue", label="libx264 veryfast (steady)")
    for p in c:
        ax.annotate(str(p["crf"]), (p["kbps"], p["ssim"]), fontsize=6, xytext=(3, -8), textcoords="offset points")
    ax.plot([p["kbps_rtp"] for p in c], [p["ssim"] for p in c], ":", color="tab:blue", alpha=0.6,
            label="libx264 + RTP/SRTP/UDP/IP headers")
    markers = {"F16": "s", "Q8": "^"}
    for cfg in res["configs"]:
        if cfg["codec"] == "PRED":
            continue
        ax.scatter(cfg["kbps_wire"], cfg["ssim"], marker=markers.get(cfg["codec"], "o"),
                   color=f"C{1 + cfg['k']}", s=18 + 10 * cfg["batch"], zorder=3,
                   label=f"keypoints {cfg['codec']} k={cfg['k']}" if cfg["batch"] == min(res["batches"]) else None)
    pred = sorted((c for c in res["configs"] if c["codec"] == "PRED"), key=lambda c: c["kbps_wire"])
    groups = sorted({(c["predictor"], c["skip_rule"]) for c in pred})
    for i, (predictor, rule) in enumerate(groups):
        pts = [c for c in pred if (c["predictor"], c["skip_rule"]) == (predictor, rule)]
        ax.plot([c["kbps_wire"] for c in pts], [c["ssim"] for c in pts], "D-", color=f"C{6 + i}", ms=4, zorder=4,
                label=f"keypoints predictive, {predictor}, {rule} rule (no added delay)")
        for c in pts:
            ax.annotate(f"{c['tolerance']:g}", (c["kbps_wire"], c["ssim"]), fontsize=6, xytext=(3, 3 + 6 * i),
                        textcoords="offset points")
    for c in pred:
        if c["default"]:
            ax.scatter(c["kbps_wire"], c["ssim"], marker="*", s=120, color="black", zorder=5,
                       label="sender default (predictive)")
    ax.axhline(res["static_source"]["ssim"], color="gray", ls="--", label="static source")
    w = res["webrtc_h264"]
    ax.axvline(w["min_target"]["kbps"], color="tab:red", ls="-.",
               label=f"stock aiortc H.264 at MIN_BITRATE ({w['min_target']['kbps']:.0f} kbps)")
    ax.set_xscale("log")
    ax.set_xlabel("kbps on the wire (log)")
    ax.set_ylabel("SSIM")
    ax.set_title(f"Rate vs SSIM, {res['clips']} clips at {res['size']}px, 30 fps "
                 f"(marker size = frames per message)", fontsize=9)
    ax.legend(fontsize=6, loc="best")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)


def tables(res: dict[str, Any]) -> str:
    cfg_rows = [[c["name"] + (" (default)" if c["default"] else ""), c["kbps_wire"], c["kbps_payload"],
                 c["payload_bytes_per_msg"], c["msgs_per_s"], c["kbps_reverse_est"], c["added_delay_ms"], c["ssim"],
                 c["psnr"], c["ratio_equal_ssim"], c["ratio_equal_ssim_wire"], c["ratio_equal_ssim_payload"]]
                for c in res["configs"]]
    cfg_rows.append(["static source", res["static_source"]["kbps_wire"], 0, "-", 0, 0, 0,
                     res["static_source"]["ssim"], res["static_source"]["psnr"], "-", "-", "-"])
    t1 = common.format_table(["keypoint stream", "kbps wire", "kbps msgs", "B/msg", "msg/s", "kbps back", "+ms",
                              "SSIM", "PSNR", "x H.264 eq", "x +RTP", "x payload"], cfg_rows)
    h_rows = [[p["crf"], p["kbps"], p["kbps_amortised_idr"], p["kbps_rtp"], p["ssim"], p["psnr"]]
              for p in res["h264_curve"]]
    w = res["webrtc_h264"]
    for name in ("min_target", "default_target"):
        h_rows.append([f"aiortc {w[name]['target_kbps']:.0f}k", w[name]["kbps"], "-", "-",
                       w[name]["ssim"], w[name]["psnr"]])
    t2 = common.format_table(["H.264 CRF", "kbps", "kbps +IDR", "kbps RTP", "SSIM", "PSNR"], h_rows)
    kp, eq = res["keypoints"], res["h264_at_equal_ssim"]
    floor = " (FLOOR: our SSIM is below the lowest CRF point)" if res["h264_floor_used"] else ""
    ceiling = " (CEILING: our SSIM is above the best CRF point; a lower bound)" if eq["h264_ceiling_used"] else ""
    prev = res.get("keypoints_previous_default")
    before = "" if prev is None else (
        f"previous default {prev['name']}: {prev['kbps_wire']:.2f} kbps on the wire, SSIM {prev['ssim']:.4f}, "
        f"ratio_equal_ssim {prev['ratio_equal_ssim']:.2f}x, _wire {prev['ratio_equal_ssim_wire']:.2f}x\n")
    summary = (
        f"headline {kp['config']}: {kp['kbps_wire']:.2f} kbps on the wire (incl. {TRANSPORT_OVERHEAD_B} B/msg "
        f"transport, source amortised over {res['call_seconds']:.0f} s), {kp['msgs_per_s']:.1f} msg/s, "
        f"+{kp['added_delay_ms']:.0f} ms, SSIM {kp['ssim']:.4f}, PSNR {kp['psnr']:.2f} dB\n"
        f"H.264 at equal SSIM: {eq['kbps']:.2f} kbps{floor}{ceiling} -> ratio_equal_ssim "
        f"{res['ratio_equal_ssim']:.2f}x (H.264 with its RTP headers, ratio_equal_ssim_wire: "
        f"{res['ratio_equal_ssim_wire']:.2f}x; both payload only: {res['ratio_equal_ssim_payload']:.2f}x)\n"
        f"{before}"
        f"stock aiortc H.264 never targets below MIN_BITRATE {w['min_bitrate_kbps']:.0f} kbps; measured "
        f"{w['min_target']['kbps']:.1f} kbps there -> ratio_vs_webrtc_h264 {res['ratio_vs_webrtc_h264']:.1f}x\n"
        f"{res['clips']} clips, {res['size']}px, {res['frames']} frames; reverse direction (SCTP SACKs) estimated")
    return f"{t1}\n\n{t2}\n\n{summary}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    p.add_argument("--size", type=int, default=None,
                   help="the shipped model of this output size (64, 128, 256); with --weights it must match them")
    p.add_argument("--weights", default=None)
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--kinds", nargs="+", default=["face"])
    p.add_argument("--call-seconds", type=float, default=60.0)
    p.add_argument("--max-frames", type=int, default=300)
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--decimations", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--codecs", nargs="*", choices=["F16", "Q8"], default=["F16", "Q8"],
                   help="vector streams to run beside the predictive ones (none: only --pred)")
    p.add_argument("--pred", nargs="*", default=[DEFAULT_PRED],
                   help="predictive streams RULE:TOLERANCE:MAX_GAP[:PREDICTOR] (default: the sender's, "
                        f"{DEFAULT_PRED}; it always runs)")
    p.add_argument("--crfs", type=int, nargs="+", default=list(CRFS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--headline", default=HEADLINE,
                   help="the configuration the ratios are reported for: PRED (the sender's default stream), "
                        "PRED:RULE:TOL:GAP:PREDICTOR or CODEC:K:BATCH")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    common.set_threads(a.threads)
    weights = a.weights
    if weights is None and a.size is not None:
        try:
            weights = weights_for_size(a.size)
        except ValueError as e:
            p.error(str(e))
    model, meta, wpath = common.load_model(weights)
    size = model.config.size
    if a.size is not None and a.size != size:
        p.error(f"--size {a.size} but the model renders {size}px; pass weights of that size")
    clips = common.select_clips(a.data, a.kinds, a.split)[: a.max_clips]
    loaded = common.load_selected(clips, size, a.max_frames)
    batches = sorted(set(a.batches))

    try:
        preds = [PredSpec.parse(t) for t in a.pred]
    except ValueError as e:
        p.error(str(e))
    if not any(sp.is_default for sp in preds):
        preds.insert(0, PredSpec(DEFAULT_STREAM))
    preds = list(dict.fromkeys(preds))
    configs, static = keypoint_configs(model, loaded, [Codec[c] for c in a.codecs], a.decimations, batches,
                                       a.call_seconds, preds)
    curve = h264_curve(loaded, sorted(a.crfs), a.call_seconds)
    from aiortc.codecs import h264 as aio

    webrtc = {"min_bitrate_kbps": aio.MIN_BITRATE / 1000, "default_bitrate_kbps": aio.DEFAULT_BITRATE / 1000,
              "max_bitrate_kbps": aio.MAX_BITRATE / 1000,
              "min_target": aiortc_h264(loaded, 0),  # the setter clamps anything lower up to MIN_BITRATE
              "default_target": aiortc_h264(loaded, aio.DEFAULT_BITRATE),
              "note": "aiortc.codecs.h264.H264Encoder.target_bitrate clamps to [MIN_BITRATE, MAX_BITRATE]; "
                      "kbps = measured RTP payload bytes after the first frame"}
    for c in configs:
        c["h264_kbps_at_equal_ssim"] = rate_at_ssim(curve, c["ssim"])["kbps"]
        c["ratio_equal_ssim"] = c["h264_kbps_at_equal_ssim"] / c["kbps_wire"]
        c["h264_rtp_kbps_at_equal_ssim"] = rate_at_ssim(curve, c["ssim"], "kbps_rtp")["kbps"]
        c["ratio_equal_ssim_wire"] = c["ratio_equal_ssim_rtp"] = c["h264_rtp_kbps_at_equal_ssim"] / c["kbps_wire"]
        c["ratio_equal_ssim_payload"] = c["h264_kbps_at_equal_ssim"] / c["kbps_payload"]  # no transport bytes

    def find(name: str) -> dict[str, Any] | None:
        if name == "PRED":
            return next((c for c in configs if c["codec"] == "PRED" and c["default"]), None)
        return next((c for c in configs if c["name"] == name), None)

    head = find(a.headline)
    if head is None:
        p.error(f"--headline {a.headline} is not one of the configurations run")
    eq = rate_at_ssim(curve, head["ssim"])
    eq_rtp = rate_at_ssim(curve, head["ssim"], "kbps_rtp")
    previous = find(PREVIOUS_DEFAULT)
    static_kbps = head["kbps_source_amortised"]  # a static receiver still needs the source image
    res: dict[str, Any] = {
        "clips": len(loaded), "size": size, "frames": int(sum(len(f) for _, f in loaded)), "fps": FPS,
        "weights": str(wpath), "weights_step": meta.get("step"), "split": a.split, "kinds": a.kinds,
        "call_seconds": a.call_seconds, "batches": batches,
        "overhead_bytes_per_msg": TRANSPORT_OVERHEAD_B,
        "overhead_note": "95 B per data-channel message = DTLS + SCTP + UDP + IPv4, measured for aiortc 1.16",
        "keypoints": {"config": head["name"], **head},
        # the sender's default before the predictive codec (every frame, Q8, one per message), when run
        "keypoints_previous_default": previous,
        "ratio_equal_ssim_wire": eq_rtp["kbps"] / head["kbps_wire"],
        "ratio_equal_ssim_payload": head["ratio_equal_ssim_payload"],
        "configs": configs,
        "static_source": {**static, "kbps_wire": static_kbps},
        "h264_curve": curve,
        "h264_at_equal_ssim": {"kbps": eq["kbps"], "ssim": head["ssim"], "h264_ceiling_used": eq["h264_ceiling_used"]},
        "h264_floor_used": eq["h264_floor_used"],
        "ratio_equal_ssim": eq["kbps"] / head["kbps_wire"],
        "h264_rtp_at_equal_ssim": {"kbps": eq_rtp["kbps"], "h264_floor_used": eq_rtp["h264_floor_used"]},
        "ratio_equal_ssim_rtp": eq_rtp["kbps"] / head["kbps_wire"],
        "webrtc_h264": webrtc,
        "ratio_vs_webrtc_h264": webrtc["min_target"]["kbps"] / head["kbps_wire"],
        "ratio_vs_webrtc_h264_min_target": webrtc["min_bitrate_kbps"] / head["kbps_wire"],
        "assumptions": [
            "all clips played at 30 fps whatever their recorded rate; frame 0 is the source and is not scored",
            (f"keypoint stream: exact shared.protocol message bytes + {TRANSPORT_OVERHEAD_B} B/message transport "
            "(DTLS+SCTP+UDP+IPv4, measured for aiortc 1.16); SCTP acknowledgements flowing back "
            "(~22 kbps at 30 msg/s measured) are not counted, nor is RTCP for H.264"),
            (f"Hello + JPEG source (quality {JPEG_QUALITY}, model size) in SourceChunk messages, each + "
            f"{TRANSPORT_OVERHEAD_B} B, sent once and amortised over {a.call_seconds:.0f} s"),
            ("timestamps use a sender clock past 2^32 us (ts fields 9 B in msgpack); seq starts at 0; the "
             "predictive stream's times count from its Hello's base (as the sender sends them)"),
            ("predictive stream: shared.kpcodec through the sender's own PredictiveSender and the receiver's "
             "PredictiveStream, lossless; a skipped frame is shown as the prediction (what the playout shows "
             "at that frame's time); no added delay"),
            (f"reverse direction estimated: one SCTP SACK of {SACK_BYTES_ON_WIRE} B on the wire per keypoint "
             "message (aiortc acknowledges every packet); RTCP for H.264 not modelled"),
            ("decimation k: every k-th frame sent, receiver interpolates linearly, frames after the last sent hold it; "
            "batching does not change quality, only bytes and latency"),
            "keypoint quality is rendered from the decoded wire bytes and the JPEG-decoded source",
            ("H.264: libx264 veryfast zerolatency yuv420p 30 fps, no periodic IDR (keyframes only on request in a "
             "call); 'kbps' = bitstream bytes of frames after the first, 'kbps_amortised_idr' adds the first IDR "
             f"over the call, 'kbps_rtp' adds {RTP_OVERHEAD_BYTES_PER_PACKET} B per aiortc RTP packet "
             "(RTP 12 + SRTP-GCM 16 + UDP 8 + IPv4 20, header extensions not counted)"),
            ("ratio_equal_ssim uses the steady H.264 bitstream rate without packet headers (favours H.264); "
            "ratio_equal_ssim_rtp uses kbps_rtp"),
            ("rate-SSIM curve reduced to its frontier (points beating every cheaper point), "
             "linear interpolation in kbps"),
            ("SSIM: scikit-image structural_similarity(channel_axis=-1, data_range=1) on RGB in [0,1]; "
            f"PSNR capped at {common.PSNR_CAP_DB:.0f} dB; per-frame, mean per clip, mean over clips; "
            "rates pooled (total bytes / total seconds)"),
            ("ratio_vs_webrtc_h264 uses the measured rate of aiortc's H264Encoder asked for MIN_BITRATE, "
            "the least a stock aiortc call sends"),
        ],
    }
    if a.json:
        common.write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    print(tables(res))
    return res


if __name__ == "__main__":
    main()
