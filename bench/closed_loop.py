"""Which predictor earns bits in the predictive keypoint stream? Closed loop, held-out faces.

Usage:
  python -m bench.closed_loop --data ../shared/data [--split val] [--predictors last linear gru vrnn grunf]
      [--tolerances 0.004 0.008 0.012] [--max-gap 8] [--history 12] [--max-frames 300]
      [--forecast-dir models/weights] [--weights models/weights/fomm_face64.pt] [--json OUT] [--png OUT]

The sender's predictive stream (``shared.kpcodec``) skips a frame when the receiver's own
prediction of it is within tolerance, and otherwise sends the residual against that
prediction; the better the predictor, the fewer and the shorter the messages. Here every
predictor runs *in the loop*, exactly as both ends would run it: on the decoded (quantised,
partly predicted) history, never on the truth, chained through skipped frames:

- ``last`` and ``linear``: the integer predictors the protocol announces (bit-exact on any
  machine);
- ``gru``, ``vrnn``, ``grunf``: the learned forecasters (``models.forecast``, the receiver's
  concealment models) asked for one step from the last ``--history`` decoded frames (the
  stochastic ones: the mean of ``--samples`` samples with a fixed seed); their float output
  is quantised like a coded frame. A learned predictor is only reproducible on machines that
  compute the same floats; the bench decodes every stream with an independent decoder
  running the same predictor and counts frames where the two disagree.

Per predictor and tolerance (the sender's default rule ``mean``, ``--max-gap``, keyframes
every 90 frames), pooled over clips: frames sent (share), payload bytes per coded frame,
kbps on the wire (each message plus 95 B of DTLS/SCTP/UDP/IP, as bench.bandwidth), the
decoded keypoints' error against the detector's (mean keypoint distance, px at 256), and
``bits_vs_last``: wire kbps / repeat-last's at the same tolerance (< 1: the predictor earns
bits). Predictor cost in ms per call (1 thread) is reported beside, since the receiver pays
it for every frame.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import format_table, new_figure, set_threads, write_json
from bench.wire_sim import FPS
from models.fomm.io import DEFAULT_WEIGHTS
from models.forecast import load_forecaster
from models.forecast.base import Forecaster
from models.forecast.dataset import DEFAULT_CACHE, extract_series, split_clips
from shared import kpvector as V
from shared import protocol as P
from shared.kpcodec import (
    DEFAULT_STREAM,
    CodedFrame,
    PredictiveConfig,
    PredictiveDecoder,
    PredictiveEncoder,
    Predictor,
    dequantise,
    predict,
    quantise,
)

log = logging.getLogger(__name__)

BUILTIN = ("last", "linear")
LEARNED = ("gru", "vrnn", "grunf")


def learned_predictor(f: Forecaster, cfg: PredictiveConfig, samples: int, seed: int = 0) -> Predictor:
    """A forecaster as a closed-loop predictor: integer history -> next integer vector."""

    def predict(history: list[np.ndarray]) -> np.ndarray:
        h = np.stack([dequantise(q, cfg) for q in history])
        torch.manual_seed(seed)  # the same draw on both ends for the stochastic models
        out = f.forecast(h, steps=1, samples=samples if f.stochastic else 1)
        return quantise(out[:, 0].mean(0), cfg)

    return predict


def encode_clip(kp: np.ndarray, cfg: PredictiveConfig, predictor: Predictor | None, history_len: int
                ) -> tuple[list[CodedFrame], np.ndarray, int]:
    """(coded frames, the encoder's decoded keypoints (T,60), message bytes on the wire)."""
    enc = PredictiveEncoder(cfg, predictor, history_len)
    frames: list[CodedFrame] = []
    decoded = np.zeros_like(kp)
    wire = 0
    for i, v in enumerate(kp):
        coded = enc.encode(i, v, force=i == len(kp) - 1)  # the sender always ends on the true frame
        decoded[i] = dequantise(enc.history[-1], cfg)
        if coded is not None:
            frames.append(coded)
            msg = P.CodedKeypoints(coded.seq, coded.prev_seq, coded.key, round(i * 1e6 / FPS), coded.payload)
            wire += len(P.encode(msg)) + V.TRANSPORT_OVERHEAD_B
    return frames, decoded, wire


def decode_clip(frames: list[CodedFrame], n: int, cfg: PredictiveConfig, predictor: Predictor | None,
                history_len: int) -> np.ndarray:
    dec = PredictiveDecoder(cfg, predictor=predictor, history_len=history_len)
    out = np.full((n, V.KP_DIM), np.nan, np.float32)
    for f in frames:
        for d in dec.push(f):
            out[d.seq] = d.vector
    return out


def kp_px(a: np.ndarray, b: np.ndarray, size: int = 256) -> float:
    """Mean keypoint distance in pixels at ``size`` (coordinates span [-1, 1])."""
    d = (a[:, :20] - b[:, :20]).reshape(len(a), -1, 2)
    return float(np.sqrt((d * d).sum(-1)).mean() * size / 2)


def predictor_ms(pred: Predictor, kp: np.ndarray, cfg: PredictiveConfig, history_len: int, reps: int = 50) -> float:
    hist = [quantise(v, cfg) for v in kp[:history_len]]
    pred(hist)
    t = time.perf_counter()
    for _ in range(reps):
        pred(hist)
    return (time.perf_counter() - t) / reps * 1000


def run(data: str, split: str, predictors: list[str], tolerances: list[float], max_gap: int, history_len: int,
        samples: int, max_frames: int, forecast_dir: str | None, weights: str, verify: bool = True,
        cache_dir: str = str(DEFAULT_CACHE)) -> dict[str, Any]:
    _, clips = split_clips(data, ["face"], "both" if split == "val" else "all")
    series = extract_series(weights, clips, data, cache_dir)
    kps = [s.kp[:max_frames] for s in series if len(s.kp) >= history_len + 2]
    log.info("%d clips, %d frames", len(kps), sum(len(k) for k in kps))
    models = {name: load_forecaster(name, forecast_dir) for name in predictors if name in LEARNED}
    rows: list[dict[str, Any]] = []
    for tol in tolerances:
        for name in predictors:
            base = PredictiveConfig(predictor=name if name in BUILTIN else "last", tolerance=tol, max_gap=max_gap,
                                    skip_rule=DEFAULT_STREAM.skip_rule, mean_cap=DEFAULT_STREAM.mean_cap,
                                    keyframe_interval=DEFAULT_STREAM.keyframe_interval)
            pred = learned_predictor(models[name], base, samples) if name in models else None
            hl = history_len if pred is not None else 2
            sent = keys = frames_total = wire = payload = 0
            errs, mismatch = [], 0
            t0 = time.perf_counter()
            for kp in kps:
                coded, decoded, w = encode_clip(kp, base, pred, hl)
                sent += len(coded)
                keys += sum(c.key for c in coded)
                payload += sum(len(c.payload) for c in coded)
                frames_total += len(kp)
                wire += w
                errs.append((kp_px(decoded, kp), len(kp)))
                if verify:
                    got = decode_clip(coded, len(kp), base, pred, hl)
                    mismatch += int((~np.isclose(got, decoded, atol=1e-6).all(1)).sum())
            seconds = frames_total / FPS
            rows.append({
                "predictor": name, "tolerance": tol, "max_gap": max_gap, "frames": frames_total,
                "sent_share": sent / frames_total, "keyframes": keys,
                "payload_bytes_per_coded": payload / max(sent, 1),
                "kbps_wire": wire * 8 / seconds / 1000,
                "kp_err_px": float(sum(e * n for e, n in errs) / frames_total),
                "decoder_mismatch_frames": mismatch if verify else None,
                "wall_s": time.perf_counter() - t0,
            })
            log.info("tol %g %s: %.2f kbps, %.1f %% sent", tol, name, rows[-1]["kbps_wire"],
                     100 * rows[-1]["sent_share"])
    for r in rows:
        ref = next(x for x in rows if x["tolerance"] == r["tolerance"] and x["predictor"] == "last")
        r["bits_vs_last"] = r["kbps_wire"] / ref["kbps_wire"]
    # Equal tolerance is not quite equal error (a predictor that skips more shows more predicted
    # frames): also each predictor's rate where its error matches repeat-last's at the default.
    ref_tol = DEFAULT_STREAM.tolerance if DEFAULT_STREAM.tolerance in tolerances else tolerances[len(tolerances) // 2]
    ref = next(r for r in rows if r["predictor"] == "last" and r["tolerance"] == ref_tol)
    equal_error = {}
    for name in predictors:
        rs = sorted((r for r in rows if r["predictor"] == name), key=lambda r: r["kp_err_px"])
        e = np.array([r["kp_err_px"] for r in rs])
        k = np.array([r["kbps_wire"] for r in rs])
        inside = len(rs) > 1 and e[0] <= ref["kp_err_px"] <= e[-1]
        kb = float(np.exp(np.interp(ref["kp_err_px"], e, np.log(k)))) if inside else None
        equal_error[name] = {"kp_err_px": ref["kp_err_px"], "kbps_wire": kb,
                             "bits_vs_last": kb / ref["kbps_wire"] if kb else None}
    cost = {}
    for name in predictors:
        base = PredictiveConfig(predictor=name if name in BUILTIN else "last")
        pred = (learned_predictor(models[name], base, samples) if name in models
                else lambda h, c=base: predict(h, c))
        cost[name] = predictor_ms(pred, kps[0], base, history_len if name in models else 2)
    winners = {}
    for tol in tolerances:
        at = [r for r in rows if r["tolerance"] == tol]
        winners[str(tol)] = min(at, key=lambda r: r["kbps_wire"])["predictor"]
    return {"data": data, "split": split, "clips": len(kps), "frames": sum(len(k) for k in kps),
            "history": history_len, "samples": samples, "weights": weights, "rows": rows,
            "predictor_ms": cost, "cheapest_at": winners, "equal_error": equal_error,
            "equal_error_reference": {"predictor": "last", "tolerance": ref_tol},
            "default_predictor": DEFAULT_STREAM.predictor,
            "default_tolerance": DEFAULT_STREAM.tolerance}


def table(res: dict[str, Any]) -> str:
    headers = ["tolerance", "predictor", "sent %", "B/coded", "kbps wire", "bits vs last", "kp err px@256",
               "mismatch", "ms/call"]
    rows = [[r["tolerance"], r["predictor"], 100 * r["sent_share"], r["payload_bytes_per_coded"], r["kbps_wire"],
             r["bits_vs_last"], r["kp_err_px"], r["decoder_mismatch_frames"], res["predictor_ms"][r["predictor"]]]
            for r in res["rows"]]
    eq = res["equal_error"]
    ref = res["equal_error_reference"]
    rows2 = [[name, v["kbps_wire"], v["bits_vs_last"]] for name, v in eq.items()]
    first = next(iter(eq.values()))
    return (format_table(headers, rows) + f"\n\nat equal keypoint error ({first['kp_err_px']:.3f} px, repeat-last at "
            f"tolerance {ref['tolerance']:g}; interpolated over the tolerances, '-' when outside them):\n"
            + format_table(["predictor", "kbps wire", "bits vs last"], rows2))


def plot(res: dict[str, Any], path: str | Path) -> None:
    fig, ax = new_figure()
    for name in dict.fromkeys(r["predictor"] for r in res["rows"]):
        rs = [r for r in res["rows"] if r["predictor"] == name]
        ax.plot([r["kbps_wire"] for r in rs], [r["kp_err_px"] for r in rs], "o-", label=name)
    ax.set_xlabel("kbps on the wire (keypoint stream)")
    ax.set_ylabel("decoded keypoint error, px at 256")
    ax.set_title(f"closed-loop predictors, {res['clips']} held-out clips")
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.closed_loop", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--predictors", nargs="+", default=list(BUILTIN + LEARNED), choices=list(BUILTIN + LEARNED))
    p.add_argument("--tolerances", type=float, nargs="+", default=[0.004, DEFAULT_STREAM.tolerance, 0.012])
    p.add_argument("--max-gap", type=int, default=DEFAULT_STREAM.max_gap)
    p.add_argument("--history", type=int, default=12, help="decoded frames a learned predictor sees")
    p.add_argument("--samples", type=int, default=8, help="samples averaged by the stochastic forecasters")
    p.add_argument("--max-frames", type=int, default=300, help="frames per clip")
    p.add_argument("--forecast-dir", default=None)
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="detector whose keypoints are coded")
    p.add_argument("--no-verify", action="store_true", help="skip the independent decode")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_threads(a.threads)
    res = run(a.data, a.split, a.predictors, a.tolerances, a.max_gap, a.history, a.samples, a.max_frames,
              a.forecast_dir, a.weights, verify=not a.no_verify)
    print(table(res))
    print("fewest bits at equal tolerance:", res["cheapest_at"])
    if a.json:
        write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    return res


if __name__ == "__main__":
    main()
