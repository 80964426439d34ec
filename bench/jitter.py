"""Motion or jitter: what makes the predictive stream send a frame (issue #30).

Usage:
  python -m bench.jitter --data runs/vox2_val [--split all] [--json OUT] [--png OUT]
  python -m bench.jitter --data ../shared/data --split val --max-clips 24

Two measurements on the shipped detector's keypoints of held-out clips:

1. **Still-face jitter.** Each of ``--still-frames`` frames per clip is shown to the detector again
   after what a camera and a codec do to a frame that did not move, at the 256x256 capture size before
   the sender shrinks it to the detector's 64x64: JPEG at quality 40-90 (block noise), sensor noise
   (sigma 2 grey levels), both; and shifted by under a pixel (the keypoints should move by exactly the
   shift: the rest is aliasing in the 64x64 detector) (``--perturbations`` variants each). The spread of
   the keypoints across the variants is jitter by definition; it is compared with the frame-to-frame
   change of the same clip (median absolute value, coordinates and Jacobian entries).
2. **The stream without jitter.** The default predictive stream (``shared.kpcodec.DEFAULT_STREAM``,
   repeat-last) and its constant-velocity variant, run on the raw keypoint tracks and on the same tracks
   smoothed over time (zero-phase Gaussian, sigma in frames; non-causal, so no detector or filter could
   do better): the share of frames sent, the mean coordinate change the smoothing made, and the jitter
   ratio |second difference| / |first difference| (white noise 1.41, smooth motion << 1). What the
   smoothest row still sends is motion: no detector that ignored jitter would send less.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from scipy.ndimage import gaussian_filter1d

from bench.common import format_table, new_figure, write_json
from models.data import center_square, load_clips, load_frames, split_by_group
from models.forecast.dataset import extract_series
from shared.kpcodec import DEFAULT_STREAM, NC, PredictiveEncoder

log = logging.getLogger(__name__)
SIGMAS = (0.0, 1.0, 2.0, 3.0)  # temporal smoothing of the tracks, frames (0: raw)
CAPTURE = 256  # the sender's frame side: perturbations happen there


def sent_fraction(kp: np.ndarray, predictor: str = "last") -> float:
    """Share of frames the default stream (with ``predictor``) codes, keyframes included."""
    enc = PredictiveEncoder(dataclasses.replace(DEFAULT_STREAM, predictor=predictor))
    return float(np.mean([enc.encode(t, v) is not None for t, v in enumerate(kp)]))


def jitter_ratio(kp: np.ndarray) -> float:
    """median |second difference| / median |first difference| of the coordinates."""
    d1 = np.abs(np.diff(kp[:, :NC], axis=0))
    d2 = np.abs(np.diff(kp[:, :NC], 2, axis=0))
    return float(np.median(d2) / max(float(np.median(d1)), 1e-12))


def perturb(frame: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A frame that did not move, as a camera / codec might deliver it again."""
    f = frame
    if kind in ("noise", "both"):
        f = np.clip(f.astype(np.float32) + rng.normal(0, 2.0, f.shape), 0, 255).astype(np.uint8)
    if kind in ("jpeg", "both"):
        ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 91))])
        f = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else f
    return f


def still_jitter(model: Any, frames: np.ndarray, n_frames: int, n_var: int,
                 rng: np.random.Generator) -> dict[str, float]:
    """Median per-value spread (std over perturbed copies) of still frames, coordinates and Jacobians.
    ``frames`` at the capture size (256): perturbed there, then shrunk to the detector's size as the
    sender does (the shrinking averages much of the noise away)."""
    import torch

    size = model.config.motion_size
    idx = np.linspace(0, len(frames) - 1, n_frames).astype(int)
    spread_c, spread_j, shift_c, shift_j = [], [], [], []
    for i in idx:
        batch = np.stack([center_square(perturb(frames[i], ("jpeg", "noise", "both")[k % 3], rng), size)
                          for k in range(n_var)])
        with torch.no_grad():
            kp = model.keypoints(torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255.0).numpy()
        spread_c.append(kp[:, :NC].std(0))
        spread_j.append(kp[:, NC:].std(0))
        # sub-pixel shifts: the keypoints should move by exactly the shift; what they do besides is aliasing
        shifts = rng.uniform(-1.0, 1.0, (n_var, 2))
        h, w = frames[i].shape[:2]
        moved = np.stack([center_square(cv2.warpAffine(frames[i], np.float32([[1, 0, dx], [0, 1, dy]]), (w, h),
                                                       flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT), size)
                          for dx, dy in shifts])
        with torch.no_grad():
            kp = model.keypoints(torch.from_numpy(moved).permute(0, 3, 1, 2).float() / 255.0).numpy()
        ideal = np.tile(shifts * (2.0 / w), (1, NC // 2))  # coordinates in [-1, 1] units, x then y per keypoint
        shift_c.append((kp[:, :NC] - ideal).std(0))
        shift_j.append(kp[:, NC:].std(0))
    return {"coord": float(np.median(spread_c)), "jac": float(np.median(spread_j)),
            "shift_coord": float(np.median(shift_c)), "shift_jac": float(np.median(shift_j))}


def run(data: str, split: str, weights: str, max_clips: int | None, still_frames: int, perturbations: int,
        seed: int = 0) -> dict[str, Any]:
    from models.fomm.io import load_motion_model

    clips = load_clips(data, ["face"])
    if split == "val":
        clips = split_by_group(clips, 0.15)[1]
    if max_clips and len(clips) > max_clips:
        clips = [clips[int(i)] for i in np.linspace(0, len(clips) - 1, max_clips)]
    series = extract_series(weights, clips, data)
    model, _ = load_motion_model(weights)
    rng = np.random.default_rng(seed)
    per_clip = []
    for s in series:
        kp = s.kp
        if len(kp) < 10:
            continue
        row: dict[str, Any] = {"clip": s.name, "frames": len(kp),
                               "change_coord": float(np.median(np.abs(np.diff(kp[:, :NC], axis=0)))),
                               "change_jac": float(np.median(np.abs(np.diff(kp[:, NC:], axis=0))))}
        if still_frames:
            loaded = load_frames([s.clip], CAPTURE) if s.clip is not None else []
            if loaded:
                frames = loaded[0]
                st = still_jitter(model, frames, still_frames, perturbations, rng)
                row["still_coord"], row["still_jac"] = st["coord"], st["jac"]
                row["shift_coord"], row["shift_jac"] = st["shift_coord"], st["shift_jac"]
        for sigma in SIGMAS:
            sm = kp if sigma == 0 else gaussian_filter1d(kp, sigma, axis=0, mode="nearest").astype(np.float32)
            row[f"s{sigma:g}"] = {"sent_last": sent_fraction(sm, "last"), "sent_linear": sent_fraction(sm, "linear"),
                                  "moved": float(np.abs(sm - kp)[:, :NC].mean()), "jitter_ratio": jitter_ratio(sm)}
        per_clip.append(row)
    summary: dict[str, Any] = {k: float(np.mean([r[k] for r in per_clip])) for k in ("change_coord", "change_jac")}
    if per_clip and "still_coord" in per_clip[0]:
        for k in ("still_coord", "still_jac", "shift_coord", "shift_jac"):
            summary[k] = float(np.mean([r[k] for r in per_clip if k in r]))
    summary["smoothing"] = {f"{sigma:g}": {k: float(np.mean([r[f"s{sigma:g}"][k] for r in per_clip]))
                                           for k in ("sent_last", "sent_linear", "moved", "jitter_ratio")}
                            for sigma in SIGMAS}
    return {"data": data, "split": split, "weights": weights, "clips": len(per_clip),
            "frames": int(sum(r["frames"] for r in per_clip)), "stream": dataclasses.asdict(DEFAULT_STREAM),
            "still_frames": still_frames, "perturbations": perturbations, "summary": summary, "per_clip": per_clip}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def tables(res: dict[str, Any]) -> str:
    s = res["summary"]
    out = []
    if "still_coord" in s:
        out.append(format_table(["", "coordinates", "Jacobian entries"], [
            ["frame-to-frame change, median |d|", s["change_coord"], s["change_jac"]],
            ["still face, JPEG / noise: median std", s["still_coord"], s["still_jac"]],
            ["  / change", _ratio(s["still_coord"], s["change_coord"]), _ratio(s["still_jac"], s["change_jac"])],
            ["still face shifted < 1 px: std beyond the shift", s["shift_coord"], s["shift_jac"]],
            ["  / change", _ratio(s["shift_coord"], s["change_coord"]), _ratio(s["shift_jac"], s["change_jac"])]]))
    rows = [[("raw" if k == "0" else f"Gaussian sigma {k} frames"), v["sent_last"], v["sent_linear"], v["moved"],
             v["jitter_ratio"]] for k, v in s["smoothing"].items()]
    out.append(format_table(["tracks", "sent (repeat-last)", "sent (constant velocity)", "mean coord moved",
                             "|d2| / |d1|"], rows))
    return "\n\n".join(out)


def plot(res: dict[str, Any], path: str) -> None:
    fig, ax = new_figure(7, 4)
    sm = res["summary"]["smoothing"]
    x = np.arange(len(sm))
    ax.bar(x - 0.2, [v["sent_last"] for v in sm.values()], 0.4, label="repeat-last (the default stream)")
    ax.bar(x + 0.2, [v["sent_linear"] for v in sm.values()], 0.4, label="constant velocity")
    ax.set_xticks(x, ["raw" if k == "0" else f"smoothed, sigma {k}" for k in sm])
    ax.set_ylabel("share of frames sent")
    ax.set_ylim(0, 1)
    ax.set_title(f"what the stream sends without jitter: {res['clips']} clips, {res['data']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.jitter", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="runs/vox2_val")
    p.add_argument("--split", choices=["val", "all"], default="all")
    p.add_argument("--weights", default="models/weights/fomm_face64.pt", help="the detector (any shipped size)")
    p.add_argument("--max-clips", type=int)
    p.add_argument("--still-frames", type=int, default=8, help="still frames per clip (0: skip the jitter part)")
    p.add_argument("--perturbations", type=int, default=9, help="perturbed copies of each still frame")
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args(argv)
    if not Path(a.data).is_dir():
        print(f"bench.jitter: no data folder {a.data}", file=sys.stderr)
        return 2
    res = run(a.data, a.split, a.weights, a.max_clips, a.still_frames, a.perturbations)
    print(f"\n{res['clips']} clips ({res['frames']} frames) of {a.data} ({a.split}), detector {a.weights}")
    print(tables(res))
    if a.json:
        write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
