"""Training samples for the region refiner: rendered, driving and source patches with their openings.

Usage:
  python -m models.expression.region_data --split train --every 5 --out cache/region_train.npz
  python -m models.expression.region_data --split val --every 5 --keep-frames --out cache/region_val.npz
  python -m models.expression.region_data --split train --max-clips 3 --every 5 --out runs/region_smoke/train.npz

Per face clip of the split (``models.data.split_by_group``, the split every model here uses), for each
**source** (the clip's first frame with landmarks, and with ``--sources 2`` a random later frame too, so
that sources with closed and open eyes both occur) and every ``every``-th **driving** frame with landmarks:

- the shipped 256 model (``--weights``) renders the driving frame from the source with the driving
  frame's own keypoints (the wire's: the keypoint series of ``--kp-weights``, cached under
  ``--cache-dir`` as for the forecasters and the opening regressor; ``--kp-weights ''`` runs the render
  model's detector directly);
- the rendered frame and the driving frame are cut (``openings.cut_patches``) at the **driving**
  keypoints' centres (where the receiver would cut), the source frame at the **source** keypoints' centres;
- labels: the driving frame's and the source's openings (dlib, ``--landmarks``).

The .npz (``RegionSamples``; patches uint8 HWC, openings float32) holds one row per driving frame and one
row per source in a separate source table (``source`` indexes it); ``seq`` numbers the (clip, source)
sequences, over which correlations in time are taken. With ``--keep-frames`` (validation samples) it also
holds every rendered 256x256 frame and dlib's HOG face box of its driving frame, so that the refined
patches can be pasted back and scored by dlib as ``bench.expression`` scores a call (an independent
judge; ~200 kB per row). Both ``cache/`` and ``runs/`` are git-ignored.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass, fields
from pathlib import Path

import cv2
import numpy as np
import torch

from models.data import center_square, load_clips, read_clip, split_by_group
from models.expression.openings import centres_from_keypoints, cut_patches, openings

log = logging.getLogger(__name__)

SIZE = 256  # frames are rendered, labelled and cut at this size


@dataclass
class RegionSamples:
    """Rows: driving frames (N); source table: S sources (each row's ``source`` indexes it)."""

    rendered_eyes: np.ndarray  # (N, 2, 32, 32, 3) uint8, cut from the render at the driving centres
    rendered_mouth: np.ndarray  # (N, 32, 48, 3) uint8
    driving_eyes: np.ndarray  # (N, 2, 32, 32, 3) uint8, cut from the driving frame at the same centres
    driving_mouth: np.ndarray  # (N, 32, 48, 3) uint8
    target: np.ndarray  # (N, 4) float32: the driving frame's openings (dlib)
    centres: np.ndarray  # (N, 3, 2) float32: the driving keypoints' centres (px in 256)
    source: np.ndarray  # (N,) int32: row of the source table
    clip: np.ndarray  # (N,) int32: clip number (index into meta["clips"])
    frame: np.ndarray  # (N,) int32: driving frame index in its clip
    seq: np.ndarray  # (N,) int32: (clip, source) sequence: correlations over time are taken per seq
    source_eyes: np.ndarray  # (S, 2, 32, 32, 3) uint8, cut from the source frame at the source centres
    source_mouth: np.ndarray  # (S, 32, 48, 3) uint8
    source_open: np.ndarray  # (S, 4) float32: the source's openings (dlib)
    source_frame: np.ndarray  # (S,) int32: the source's frame index in its clip
    meta: dict
    rendered_frames: np.ndarray | None = None  # (N, 256, 256, 3) uint8 (``keep_frames``)
    boxes: np.ndarray | None = None  # (N, 4) int32: dlib's face box (l, t, r, b) of the driving frame, -1 if none

    def __len__(self) -> int:
        return len(self.target)

    def subset(self, idx: np.ndarray) -> RegionSamples:
        """Rows ``idx`` (the source table is kept whole)."""
        rows = {f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[idx]) for f in fields(self)
                if f.name not in ("meta",) and not f.name.startswith("source_")}
        return RegionSamples(**rows, source_eyes=self.source_eyes, source_mouth=self.source_mouth,
                             source_open=self.source_open, source_frame=self.source_frame, meta=self.meta)


def save_samples(path: str | Path, s: RegionSamples) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {f.name: getattr(s, f.name) for f in fields(s) if f.name != "meta" and getattr(s, f.name) is not None}
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, meta=np.array(json.dumps(s.meta)), **arrays)
    os.replace(tmp, path)
    return path


def load_samples(path: str | Path) -> RegionSamples:
    with np.load(path) as z:
        kw = {f.name: z[f.name] for f in fields(RegionSamples) if f.name != "meta" and f.name in z.files}
        meta = json.loads(str(z["meta"]))
    return RegionSamples(**kw, meta=meta)


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8."""
    return (x.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def detector_keypoints(model, frames: np.ndarray) -> np.ndarray:
    """(T, S, S, 3) uint8 -> (T, 60): the model's detector on frames shrunk to its input size with an area
    filter, as the sender does (``sender.extract``)."""
    size = model.config.motion_size
    small = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) if f.shape[0] != size else f
                      for f in frames])
    x = torch.from_numpy(small).permute(0, 3, 1, 2).float() / 255.0
    return model.keypoints(x).float().numpy().astype(np.float32)


def choose_sources(valid: np.ndarray, n: int, sources: int, rng: np.random.Generator) -> list[int]:
    """The first frame with landmarks, then (``sources`` > 1) random later ones from the clip's last two thirds."""
    ok = np.flatnonzero(valid[:n])
    if len(ok) == 0:
        return []
    out = [int(ok[0])]
    later = [int(t) for t in ok if t >= max(n // 3, out[0] + 1)]
    if sources > 1 and later:
        out += [int(t) for t in rng.choice(later, size=min(sources - 1, len(later)), replace=False)]
    return out


@torch.no_grad()
def build_samples(model, clips: list, root: str | Path, lm_cache, anchor_kp: list[int], every: int = 5,
                  sources: int = 2, series: dict[str, np.ndarray] | None = None, seed: int = 0, batch: int = 1,
                  max_frames: int | None = None, keep_frames: bool = False) -> RegionSamples:
    """Samples of ``clips`` (see the module's doc). ``model``: a 256x256 ``MotionModel``; ``series``: keypoints
    per clip path (None: the model's detector runs on the frames); ``lm_cache``: ``.get(path, root)`` ->
    (landmarks (T, 68, 2), valid (T,)) or None; ``keep_frames``: keep the rendered frames and the driving
    frames' dlib face boxes (needs dlib)."""
    if model.config.size != SIZE:
        raise ValueError(f"the refiner's samples are rendered at {SIZE}, the model renders at {model.config.size}")
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("rendered_eyes", "rendered_mouth", "driving_eyes", "driving_mouth",
                                             "target", "centres", "source", "clip", "frame", "seq")}
    src: dict[str, list] = {k: [] for k in ("source_eyes", "source_mouth", "source_open", "source_frame")}
    names, persons, render_s, renders, seq = [], [], 0.0, 0, 0
    kept: dict[str, list] = {"rendered_frames": [], "boxes": []}
    fl = None
    if keep_frames:
        from models.landmarks import FaceLandmarks

        fl = FaceLandmarks()
    for clip in clips:
        got = lm_cache.get(clip.path, root)
        kp = series.get(str(clip.path)) if series is not None else None
        if got is None or (series is not None and kp is None):
            log.warning("skipping %s: no %s", clip.path, "landmarks" if got is None else "keypoints")
            continue
        lm, valid = got
        frames = read_clip(clip.path, "png_stack" if clip.format == "png_stack" else "video", max_frames)
        n = min(len(frames), len(lm), *([len(kp)] if kp is not None else []))
        picks = choose_sources(valid, n, sources, rng)
        drive = [t for t in range(0, n, every) if valid[t]]
        if not picks or not drive:
            continue
        need = sorted(set(picks) | set(drive))
        sq = {t: center_square(frames[t], SIZE) for t in need}
        if kp is None:
            kp_need = detector_keypoints(model, np.stack([sq[t] for t in need]))
            kp = np.zeros((n, kp_need.shape[1]), np.float32)
            kp[need] = kp_need
        centres = centres_from_keypoints(kp[:n], anchor_kp, SIZE)
        labels = openings(lm[:n])
        boxes = {t: (fl.detect(sq[t]) or (-1, -1, -1, -1)) for t in drive} if fl is not None else {}
        ci = len(names)
        names.append(str(clip.path))
        persons.append(clip.person)
        for s in picks:
            si = len(src["source_open"])
            e, m = cut_patches(sq[s], centres[s])
            src["source_eyes"].append(e)
            src["source_mouth"].append(m)
            src["source_open"].append(labels[s])
            src["source_frame"].append(s)
            image = torch.from_numpy(sq[s]).permute(2, 0, 1)[None].float() / 255.0
            cache = model.prepare_source(image)
            for i in range(0, len(drive), batch):
                ts = drive[i:i + batch]
                t0 = time.perf_counter()
                out = _to_uint8(model.render(cache, torch.from_numpy(kp[ts]).float()))
                render_s += time.perf_counter() - t0
                renders += len(ts)
                for t, r in zip(ts, out, strict=True):
                    r_e, r_m = cut_patches(r, centres[t])
                    de, dm = cut_patches(sq[t], centres[t])
                    for k, v in (("rendered_eyes", r_e), ("rendered_mouth", r_m), ("driving_eyes", de),
                                 ("driving_mouth", dm), ("target", labels[t]), ("centres", centres[t]),
                                 ("source", si), ("clip", ci), ("frame", t), ("seq", seq)):
                        cols[k].append(v)
                    if keep_frames:
                        kept["rendered_frames"].append(r)
                        kept["boxes"].append(boxes[t])
            seq += 1
        log.info("%s: %d sources x %d frames (%.0f ms per rendered frame so far)", clip.path.name, len(picks),
                 len(drive), 1000 * render_s / max(renders, 1))
    if not cols["target"]:
        raise SystemExit("no samples: are the landmarks cached for these clips (python -m models.landmarks)?")
    ints = ("source", "clip", "frame", "seq")
    arrays = {k: np.asarray(v, np.int32 if k in ints else (np.float32 if k in ("target", "centres") else np.uint8))
              for k, v in cols.items()}
    sources_ = {k: np.asarray(v, np.int32 if k == "source_frame" else
                              (np.float32 if k == "source_open" else np.uint8)) for k, v in src.items()}
    meta = {"clips": names, "persons": persons, "every": every, "sources": sources, "seed": seed,
            "renders": renders, "render_ms_per_frame": round(1000 * render_s / max(renders, 1), 2),
            "anchor_kp": list(anchor_kp)}
    extra = ({"rendered_frames": np.stack(kept["rendered_frames"]), "boxes": np.asarray(kept["boxes"], np.int32)}
             if keep_frames else {})
    return RegionSamples(**arrays, **sources_, meta=meta, **extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--landmarks", default="cache/landmarks_face256.npz")
    p.add_argument("--weights", default="models/weights/fomm_face256.pt", help="the 256 model that renders")
    p.add_argument("--kp-weights", default="models/weights/fomm_face64.pt",
                   help="checkpoint whose (shared) detector's cached keypoint series drive the render; '' = "
                        "run the render model's detector directly")
    p.add_argument("--cache-dir", default="runs/kp_cache")
    p.add_argument("--every", type=int, default=5, help="render every N-th frame")
    p.add_argument("--sources", type=int, default=2, help="sources per clip: frame 0 and N-1 random later frames")
    p.add_argument("--max-clips", type=int, default=0, help="0: every clip of the split")
    p.add_argument("--batch", type=int, default=1, help="frames per render call")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-frames", action="store_true",
                   help="keep the rendered frames and dlib face boxes (validation: the dlib judge)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(a.threads)
    from models.fomm.io import load_motion_model
    from models.landmarks import LandmarkCache

    t0 = time.monotonic()
    train_clips, val_clips = split_by_group(load_clips(a.data, ["face"]), 0.15)
    clips = train_clips if a.split == "train" else val_clips
    if a.max_clips:
        clips = clips[:: max(1, len(clips) // a.max_clips)][:a.max_clips]  # spread over the split's persons
    model, wmeta = load_motion_model(a.weights)
    anchor_kp = [int(i) for i in wmeta.get("anchor_kp") or []]
    if not anchor_kp:
        raise SystemExit(f"{a.weights} has no anchored keypoints (meta anchor_kp): the patches cannot be located")
    series = None
    if a.kp_weights:
        from models.expression.train import keypoint_series

        series = keypoint_series(a.kp_weights, clips, a.data, a.cache_dir)
    samples = build_samples(model, clips, a.data, LandmarkCache(a.landmarks), anchor_kp, a.every, a.sources,
                            series, a.seed, a.batch, keep_frames=a.keep_frames)
    samples.meta.update({"split": a.split, "weights": a.weights, "kp_weights": a.kp_weights or a.weights,
                         "landmarks": a.landmarks, "data": a.data, "seconds": round(time.monotonic() - t0, 1)})
    save_samples(a.out, samples)
    print(f"region samples: {len(samples)} rows, {len(samples.source_open)} sources, "
          f"{len(samples.meta['clips'])} clips ({a.split}); {samples.meta['render_ms_per_frame']} ms per rendered "
          f"frame, {samples.meta['seconds']:.0f} s in all; wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
