"""A source frame with closed eyes, driven by open eyes: does the call show them open?

Usage:
  python -m bench.closed_eyes --data ../shared/data [--split val] [--render int8]
      [--refine-regions models/weights/region_refiner.pt] [--json OUT] [--png SHEET]

Warping cannot open an eye that is closed in the source (the pixels of an open eye are not in
it), which is why the receiver has a region stage (``receiver.regions``). Per held-out clip
(split by person) with a blink or a squint: the source is the frame with the smallest dlib eye
opening (``cache/landmarks_face256.npz``, as the training's labels); the driving frames are those
whose eyes are open (opening above the clip's 60th percentile and at least ``--min-gap`` above
the source's). Each is rendered at 256 from the source with the driving frame's keypoints (the
shipped detector and ``--render``), then refined; dlib reads the eye opening of the driving,
rendered and refined frames in the driving frame's face box.

Reported per row (rendered / refined), over every driving frame of every clip:
- ``eye_opening``: mean eye opening (lid distance / inter-ocular distance, ``bench.expression``);
- ``gap_closed``: (shown - source) / (driving - source) opening, mean per clip: 0 = the source's
  closed eye kept, 1 = as open as the driving frame;
- ``opened``: the fraction of frames whose shown opening is past the midpoint between the
  source's and the driving frame's.
A sheet (``--png``) shows, for a few clips, source | driving | rendered | refined, with the eyes
enlarged below each.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import common
from bench.common import format_table, write_json
from bench.expression import eye_opening
from models.landmarks import LANDMARK_SIZE, FaceLandmarks, LandmarkCache

log = logging.getLogger(__name__)


def _openings(lm: np.ndarray, valid: np.ndarray) -> np.ndarray:
    return np.array([eye_opening(p) if v else np.nan for p, v in zip(lm, valid, strict=True)])


def run(data: str, split: str, landmarks: str, weights: str | None, refiner: str | None, render: str,
        min_gap: float, max_driving: int, max_clips: int | None) -> tuple[dict[str, Any], list[np.ndarray]]:
    from models.fomm.model import kp_to_vector
    from receiver.regions import RegionStage, anchor_kp_of, load_region_weights

    fl = FaceLandmarks()
    cache = LandmarkCache(landmarks)
    model, meta, wpath = common.load_model(weights)
    if model.config.size != LANDMARK_SIZE:
        raise ValueError(f"needs the {LANDMARK_SIZE} model, got {model.config.size}")
    stage = RegionStage.of(load_region_weights(refiner or "models/weights/region_refiner.pt"),
                            anchor_kp_of(meta, wpath))
    per_clip, sheets = [], []
    for info in common.select_clips(data, ["face"], split)[:max_clips]:
        got = cache.get(info.path, data)
        if got is None:
            continue
        lm, valid = got
        op = _openings(lm, valid)
        if np.isfinite(op).sum() < 20:
            continue
        src_i = int(np.nanargmin(op))
        thresh = max(np.nanpercentile(op, 60), op[src_i] + min_gap)
        drv = np.flatnonzero(np.nan_to_num(op, nan=-1) >= thresh)
        if len(drv) < 3:
            continue  # no blink or squint in this clip worth the name
        drv = drv[np.linspace(0, len(drv) - 1, min(max_driving, len(drv))).astype(int)]
        frames = common.load_selected([info], LANDMARK_SIZE, None)
        if not frames:
            continue
        clip = frames[0][1]
        if len(lm) != len(clip):
            continue
        src = clip[src_i]
        kp = common.detect_keypoints(model, clip[drv])
        sc = common.prepare(model, src)
        rendered = (np.clip(common.render_vectors(model, sc, kp, render=render), 0, 1) * 255 + 0.5).astype(np.uint8)
        rs = stage.prepare(src, kp_to_vector(sc.kp)[0].numpy())
        refined = np.stack([stage.apply(f, k, rs) for f, k in zip(rendered, kp, strict=True)])
        rows: dict[str, list[float]] = {"driving": [], "rendered": [], "refined": []}
        src_open = None
        for j, d in enumerate(clip[drv]):
            box = fl.detect(d)
            if box is None:
                continue
            if src_open is None:
                sbox = fl.detect(src) or box
                src_open = eye_opening(fl.shape(src, sbox))
            rows["driving"].append(eye_opening(fl.shape(d, box)))
            rows["rendered"].append(eye_opening(fl.shape(rendered[j], box)))
            rows["refined"].append(eye_opening(fl.shape(refined[j], box)))
        if src_open is None or not rows["driving"]:
            continue
        res: dict[str, Any] = {"clip": common.clip_name(info), "person": info.group, "source_frame": src_i,
                               "driving_frames": len(rows["driving"]), "source_eye": src_open}
        dv = np.array(rows["driving"])
        for name in ("driving", "rendered", "refined"):
            v = np.array(rows[name])
            span = dv - src_open
            ok = span > 1e-3
            res[f"{name}_eye"] = float(v.mean())
            res[f"{name}_gap_closed"] = float(((v - src_open)[ok] / span[ok]).mean()) if ok.any() else None
            res[f"{name}_opened"] = float((v[ok] > src_open + 0.5 * span[ok]).mean()) if ok.any() else None
        per_clip.append(res)
        if len(sheets) < 4:
            j = int(np.argmax(dv - src_open))  # the widest-open driving frame of this clip
            sheets.append(_sheet_row(src, clip[drv][j], rendered[j], refined[j], lm[src_i], lm[drv[j]]))
        log.info("%s: source eye %.3f, driving %.3f, rendered %.3f, refined %.3f", res["clip"], src_open,
                 res["driving_eye"], res["rendered_eye"], res["refined_eye"])
    summary = {}
    for name in ("driving", "rendered", "refined"):
        summary[name] = {k: float(np.mean([c[f"{name}_{k}"] for c in per_clip if c[f"{name}_{k}"] is not None]))
                         if per_clip else None for k in ("eye", "gap_closed", "opened")}
    summary["source"] = {"eye": float(np.mean([c["source_eye"] for c in per_clip])) if per_clip else None}
    return {"data": data, "split": split, "weights": str(wpath), "render": render,
            "refiner": refiner or "models/weights/region_refiner.pt", "clips": len(per_clip),
            "persons": len({c["person"] for c in per_clip}), "frames": sum(c["driving_frames"] for c in per_clip),
            "summary": summary, "per_clip": per_clip}, sheets


def _sheet_row(src: np.ndarray, drv: np.ndarray, rendered: np.ndarray, refined: np.ndarray,
               lm_src: np.ndarray, lm_drv: np.ndarray) -> np.ndarray:
    """source | driving | rendered | refined (256 each), the eye band enlarged 2x below."""
    ys = np.concatenate([lm_src[36:48, 1], lm_drv[36:48, 1]])
    xs = np.concatenate([lm_src[36:48, 0], lm_drv[36:48, 0]])
    cy, cx = int(ys.mean()), int(xs.mean())
    y0, x0 = int(np.clip(cy - 24, 0, 256 - 48)), int(np.clip(cx - 64, 0, 256 - 128))
    top, bottom = [], []
    for im in (src, drv, rendered, refined):
        top.append(im)
        band = im[y0:y0 + 48, x0:x0 + 128]
        bottom.append(cv2.resize(band, (256, 96), interpolation=cv2.INTER_CUBIC))
    return np.concatenate([np.concatenate(top, 1), np.concatenate(bottom, 1)], 0)


COLS = [("row", "row"), ("eye opening", "eye"), ("gap closed", "gap_closed"), ("opened", "opened")]


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.closed_eyes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--landmarks", default="cache/landmarks_face256.npz",
                   help="dlib landmark cache (python -m models.landmarks)")
    p.add_argument("--weights", default="models/weights/fomm_face256.pt")
    p.add_argument("--refine-regions", default=None, metavar="PATH", help="region refiner (default: shipped)")
    p.add_argument("--render", default="int8", choices=["eager", "fast", "int8"])
    p.add_argument("--min-gap", type=float, default=0.03, help="driving opening at least this above the source's")
    p.add_argument("--max-driving", type=int, default=12, help="driving frames per clip")
    p.add_argument("--max-clips", type=int)
    p.add_argument("--json")
    p.add_argument("--png", help="contact sheet: source | driving | rendered | refined")
    a = p.parse_args(argv)
    if not Path(a.landmarks).exists():
        print(f"bench.closed_eyes: no landmark cache at {a.landmarks}: run python -m models.landmarks", file=sys.stderr)
        return 2
    t0 = time.time()
    res, sheets = run(a.data, a.split, a.landmarks, a.weights, a.refine_regions, a.render, a.min_gap,
                      a.max_driving, a.max_clips)
    res["seconds"] = time.time() - t0
    s = res["summary"]
    print(f"\nclosed-eye sources driven by open eyes: {res['clips']} clips of {res['persons']} persons "
          f"({res['split']}), {res['frames']} driving frames, render {res['render']}")
    rows = [{"row": "source (closed)", **s["source"]}]
    rows += [{"row": n, **s[n]} for n in ("driving", "rendered", "refined")]
    print(format_table([c[0] for c in COLS], [[r.get(k) for _, k in COLS] for r in rows]))
    if a.json:
        write_json(a.json, res)
    if a.png and sheets:
        Path(a.png).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(a.png, cv2.cvtColor(np.concatenate(sheets, 0), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return 0 if res["clips"] else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    sys.exit(main())
