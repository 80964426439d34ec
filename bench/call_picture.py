"""The picture a call showed, scored offline: SSIM of every rendered frame against the real one.

A call through an impaired link (``bench.playout``) leaves the receiver's frames log (per
rendered frame: seq, kind, the keypoint vector it rendered) and the sender's truth (per seq,
the detector's vector). Rendering is deterministic, so the picture can be rebuilt afterwards
at any size with the shipped weights (all sizes share one detector): every shown vector is
rendered from the clip's first frame (JPEG-coded as the sender sends it) and compared with
the clip frame of its seq (the sender loops the clip: frame ``seq % len(clip)``; the bench
streams a pre-cropped square clip with ``--framing centre``, so the sender's crop is the
whole frame). Scoring offline keeps the call itself light: the live receiver can run the
small model on a loaded machine while the picture is judged at 256.

Reported: ``ssim`` (shown frames, each seq once; holds are the playout's business),
``ssim_truth_kp`` (the same seqs rendered from the sender's true keypoints: the renderer's
own ceiling, so ``ssim_truth_kp - ssim`` is what the wire and the concealment cost), and
``ssim_by_kind`` (real / predicted / concealed / interpolated). With ``expression`` (256 only), also
``bench.expression``'s yardstick: dlib's mouth- and eye-opening correlation of the shown frames with
the clip's frames (and of the true keypoints' frames beside it), and AKD.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from bench import common
from bench.wire_sim import jpeg_source
from models.fomm.model import MotionModel

log = logging.getLogger(__name__)


def read_clip(path: str | Path, size: int) -> np.ndarray:
    """Every frame of a video as RGB uint8 (T, size, size, 3), centre square resized."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        h, w = rgb.shape[:2]
        s = min(h, w)
        sq = rgb[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
        frames.append(cv2.resize(sq, (size, size), interpolation=cv2.INTER_AREA))
    cap.release()
    if not frames:
        raise ValueError(f"no frames in {path}")
    return np.stack(frames)


def score_call(model: MotionModel, clip: np.ndarray, frames: dict[str, np.ndarray],
               truth: dict[str, np.ndarray], batch: int = 16, expression: bool = False) -> dict[str, Any]:
    """SSIM of the shown frames of one call (frames log + truth as ``bench.playout`` loads them)."""
    kinds = [str(k) for k in frames["kinds"]]
    shown = ~frames["repeated"].astype(bool)
    seq = frames["seq"][shown].astype(np.int64)
    kind = np.array([kinds[int(k)] for k in frames["kind"][shown]], dtype=object)
    vec = frames["vector"][shown].astype(np.float32)
    tmap = {int(s): i for i, s in enumerate(truth["seq"])}
    # each seq once (the first time it was shown), and only seqs the sender captured
    first: dict[int, int] = {}
    for i, s in enumerate(seq):
        if int(s) in tmap and int(s) not in first:
            first[int(s)] = i
    idx = np.array(sorted(first.values()), dtype=np.int64)
    if not len(idx):
        return {"ssim": None, "ssim_truth_kp": None, "ssim_frames": 0, "ssim_by_kind": {}}
    _, src = jpeg_source(clip[0])
    cache = common.prepare(model, src)
    ref = clip[seq[idx] % len(clip)]
    tvec = truth["vectors"][[tmap[int(s)] for s in seq[idx]]].astype(np.float32)
    s_call, s_truth = [], []
    shown: dict[str, list[np.ndarray]] = {"call": [], "truth_kp": []}
    for a in range(0, len(idx), batch):
        b = slice(a, a + batch)
        r = common.to_float(ref[b])
        got = common.render_vectors(model, cache, vec[idx[b]], batch)
        exact = common.render_vectors(model, cache, tvec[b], batch)
        s_call += [common.ssim(p, q) for p, q in zip(got, r, strict=True)]
        s_truth += [common.ssim(p, q) for p, q in zip(exact, r, strict=True)]
        if expression:
            shown["call"].append(_uint8(got))
            shown["truth_kp"].append(_uint8(exact))
    s_call_a, s_truth_a, k = np.array(s_call), np.array(s_truth), kind[idx]
    extra: dict[str, Any] = {}
    if expression:
        extra = _expression(ref, {n: np.concatenate(v) for n, v in shown.items()})
    return {**extra,
        "ssim": float(s_call_a.mean()),
        "ssim_truth_kp": float(s_truth_a.mean()),
        "ssim_frames": int(len(idx)),
        "ssim_size": int(clip.shape[1]),
        "ssim_by_kind": {str(x): float(s_call_a[k == x].mean()) for x in sorted(set(k))},
    }


def _uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def _expression(driving: np.ndarray, shown: dict[str, np.ndarray]) -> dict[str, Any]:
    """dlib's openings of the shown frames against the clip's (``bench.expression.score_clip``)."""
    from bench.expression import score_clip
    from models.landmarks import LANDMARK_SIZE, FaceLandmarks

    if driving.shape[1] != LANDMARK_SIZE:
        raise ValueError(f"expression scoring needs {LANDMARK_SIZE}x{LANDMARK_SIZE} frames")
    res = score_clip(FaceLandmarks(descriptors=True), driving, shown, aed_every=10**9)
    out: dict[str, Any] = {"expression_frames": res["scored"]}
    for name, row in res["rows"].items():
        pre = "" if name == "call" else f"{name}_"
        for key in ("mouth_corr", "eye_corr", "akd"):
            out[f"{pre}{key}"] = None if row is None else row[key]
    return out
