"""H.264 at a rate: libx264 and aiortc's own encoder through PyAV, decoded and scored on the same frames.

- ``h264_encode``: a clip encoded by libx264 (veryfast, zerolatency, yuv420p, ``FPS``, no periodic
  IDR) at a CRF, with per-frame bitstreams and the decoded frames;
- ``h264_curve``: a CRF sweep over clips, pooled: steady-state kbps (every frame after the first,
  the IDR), the IDR amortised over a call, and ``kbps_rtp`` with aiortc's RTP packetiser's
  per-packet RTP/SRTP/UDP/IPv4 headers (``RTP_OVERHEAD_BYTES_PER_PACKET``); SSIM/PSNR/L1;
- ``aiortc_h264``: aiortc's ``H264Encoder`` at a target bitrate (what a stock WebRTC call sends);
- ``monotone_curve`` / ``rate_at_ssim``: the rate-SSIM frontier, and the H.264 rate needed for a
  given SSIM on it (linear in kbps; floor/ceiling flagged).
"""

from __future__ import annotations

import fractions
import logging
from typing import Any

import av
import numpy as np

from bench import common
from bench.wire_sim import FPS

log = logging.getLogger(__name__)

RTP_OVERHEAD_BYTES_PER_PACKET = 12 + 16 + 8 + 20  # RTP + SRTP AEAD-GCM tag + UDP + IPv4


def _encoder(w: int, h: int, options: dict[str, str], gop: int) -> av.video.codeccontext.VideoCodecContext:
    ctx = av.CodecContext.create("libx264", "w")
    ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
    ctx.framerate = fractions.Fraction(int(FPS), 1)
    ctx.time_base = fractions.Fraction(1, int(FPS))
    ctx.gop_size = gop  # keyframes only on request in a call: no periodic IDR within the clip
    ctx.options = options
    return ctx


def _video_frame(f: np.ndarray, i: int) -> av.VideoFrame:
    vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24").reformat(format="yuv420p")
    vf.pts = i
    vf.time_base = fractions.Fraction(1, int(FPS))
    return vf


def rtp_packets(frame_bytes: bytes) -> list[bytes]:
    """RTP payloads aiortc would send for one Annex-B access unit (its own packetiser)."""
    from aiortc.codecs.h264 import H264Encoder

    return H264Encoder._packetize(H264Encoder._split_bitstream(frame_bytes))


def h264_encode(frames: np.ndarray, crf: int) -> tuple[list[bytes], np.ndarray, int]:
    """Encode a clip (uint8 (T,H,W,3)); returns per-frame bitstreams, decoded frames, IDR count."""
    t, h, w = frames.shape[:3]
    enc = _encoder(w, h, {"preset": "veryfast", "tune": "zerolatency", "crf": str(crf)}, gop=t + 1)
    dec = av.CodecContext.create("h264", "r")
    per_frame: dict[int, bytes] = {}
    decoded = []
    keyframes = 0
    packets = []
    for i, f in enumerate(frames):
        packets += enc.encode(_video_frame(f, i))
    packets += enc.encode(None)
    for p in packets:
        per_frame[int(p.pts)] = bytes(p)
        keyframes += int(p.is_keyframe)
        decoded += [d.to_ndarray(format="rgb24") for d in dec.decode(p)]
    decoded += [d.to_ndarray(format="rgb24") for d in dec.decode(None)]
    if len(per_frame) != t or len(decoded) != t:
        raise RuntimeError(f"libx264 gave {len(per_frame)} packets / {len(decoded)} frames for {t} frames")
    return [per_frame[i] for i in range(t)], np.stack(decoded), keyframes


def h264_curve(clips: list[tuple[Any, np.ndarray]], crfs: list[int], call_seconds: float) -> list[dict[str, Any]]:
    curve = []
    for crf in crfs:
        rows, idr_bytes, steady_bytes, rtp_bytes, steady_frames, keyframes = [], [], 0, 0, 0, 0
        for _info, frames in clips:
            streams, decoded, kf = h264_encode(frames, crf)
            ref = common.to_float(frames)
            rows.append(common.frame_metrics(common.to_float(decoded[1:]), ref[1:], ref[0]))
            idr_bytes.append(len(streams[0]))
            steady_bytes += sum(len(s) for s in streams[1:])
            rtp_bytes += sum(len(p) + RTP_OVERHEAD_BYTES_PER_PACKET for s in streams[1:] for p in rtp_packets(s))
            steady_frames += len(frames) - 1
            keyframes += kf
        seconds = steady_frames / FPS
        kbps = steady_bytes * 8 / seconds / 1000
        idr_kbps = float(np.mean(idr_bytes)) * 8 / call_seconds / 1000
        q = common.mean_over_clips(rows, ("ssim", "psnr", "l1"))
        curve.append({"crf": crf, "kbps": kbps, "kbps_amortised_idr": kbps + idr_kbps,
                      "kbps_rtp": rtp_bytes * 8 / seconds / 1000, "steady_bytes_total": steady_bytes,
                      "steady_frames_total": steady_frames, "idr_bytes_mean": float(np.mean(idr_bytes)),
                      "keyframes": keyframes, **q})
        log.info("CRF %d: %.1f kbps SSIM %.3f", crf, kbps, q["ssim"])
    return curve


def aiortc_h264(clips: list[tuple[Any, np.ndarray]], target_bps: int) -> dict[str, Any]:
    """Encode the clips with aiortc's own H264Encoder at a target bitrate; measure RTP payload bytes
    (steady state, after the first frame) and decode them back for SSIM/PSNR."""
    from aiortc.codecs.h264 import H264Encoder, h264_depayload

    total, frames_n, rows = 0, 0, []
    for _info, frames in clips:
        enc = H264Encoder()
        enc.target_bitrate = target_bps
        dec = av.CodecContext.create("h264", "r")
        decoded = []
        for i, f in enumerate(frames):
            payloads, _ts = enc.encode(_video_frame(f, i))
            if i > 0:
                total += sum(len(p) for p in payloads)
            au = b"".join(h264_depayload(p) for p in payloads)
            for pkt in dec.parse(au):
                decoded += [d.to_ndarray(format="rgb24") for d in dec.decode(pkt)]
        for pkt in dec.parse(b""):
            decoded += [d.to_ndarray(format="rgb24") for d in dec.decode(pkt)]
        decoded += [d.to_ndarray(format="rgb24") for d in dec.decode(None)]
        frames_n += len(frames) - 1
        ref = common.to_float(frames)
        if len(decoded) == len(frames):
            rows.append(common.frame_metrics(common.to_float(np.stack(decoded)[1:]), ref[1:], ref[0]))
    q = common.mean_over_clips(rows, ("ssim", "psnr")) if rows else {"ssim": None, "psnr": None}
    return {"target_kbps": enc.target_bitrate / 1000, "kbps": total * 8 / (frames_n / FPS) / 1000,
            "clips_decoded": len(rows), **q}


def monotone_curve(curve: list[dict[str, Any]], rate_key: str = "kbps") -> tuple[np.ndarray, np.ndarray]:
    """The rate-SSIM frontier: points sorted by rate, keeping only those whose SSIM beats every
    cheaper point (a dearer point with less SSIM is never the rate "needed" for a quality)."""
    pts = sorted((c[rate_key], c["ssim"]) for c in curve)
    keep = [pts[0]]
    for r, s in pts[1:]:
        if s > keep[-1][1]:
            keep.append((r, s))
    return np.array([p[0] for p in keep]), np.array([p[1] for p in keep])


def rate_at_ssim(curve: list[dict[str, Any]], target: float, rate_key: str = "kbps") -> dict[str, Any]:
    """H.264 rate needed for SSIM ``target``, linear in kbps between frontier points."""
    rates, ssims = monotone_curve(curve, rate_key)
    if target <= ssims[0]:
        return {"kbps": float(rates[0]), "h264_floor_used": True, "h264_ceiling_used": False}
    if target > ssims[-1]:  # beyond the best CRF tried: the highest rate is only a lower bound
        return {"kbps": float(rates[-1]), "h264_floor_used": False, "h264_ceiling_used": True}
    i = int(np.argmax(ssims >= target))
    f = (target - ssims[i - 1]) / (ssims[i] - ssims[i - 1])
    return {"kbps": float(rates[i - 1] + f * (rates[i] - rates[i - 1])), "h264_floor_used": False,
            "h264_ceiling_used": False}
