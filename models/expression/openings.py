"""What a viewer reads from a face, as numbers: eye and mouth openings, and where to look for them.

**Openings** (the labels, from dlib's 68 landmarks; the same definitions as ``bench.expression``):
each is a mean distance between facing points over the inter-ocular distance of the same face, so
it does not change with the face's size in the picture.

- ``eye_left`` / ``eye_right``: eyelid gaps of the image-left / image-right eye (points 37-41,
  38-40 / 43-47, 44-46);
- ``mouth_open``: the inner-lip gaps (61-67, 62-66, 63-65);
- ``mouth_width``: the inner mouth corners' distance (60-64).

**Regions**: three patches cut out of the sender's 256x256 frame, each aligned to the eye line (a
tilted head gives the same patch as an upright one) and scaled by the inter-ocular distance ``d``:
an eye patch is ``EYE_SIDE * d`` square around each eye centre, the mouth patch ``MOUTH_W * d`` by
``MOUTH_H * d`` around the mouth centre. The image-right eye's patch is mirrored so that both eyes
look alike to one network. The centres come from the detector's landmark-anchored keypoints at the
sender (``centres_from_keypoints``) and from the landmarks themselves in training
(``centres_from_landmarks``); the two agree within a few pixels.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

EYE_LEFT = list(range(36, 42))
EYE_RIGHT = list(range(42, 48))
MOUTH = list(range(48, 68))
CHANNELS = ("eye_left", "eye_right", "mouth_open", "mouth_width")
_PAIRS = {
    "eye_left": ((37, 41), (38, 40)),
    "eye_right": ((43, 47), (44, 46)),
    "mouth_open": ((61, 67), (62, 66), (63, 65)),
    "mouth_width": ((60, 64),),
}

EYE_PATCH = 32  # pixels of an eye patch (square)
MOUTH_PATCH = (48, 32)  # (width, height) of the mouth patch
EYE_SIDE = 0.6  # eye patch side, x inter-ocular distance
MOUTH_W, MOUTH_H = 1.1, 0.75  # mouth patch size, x inter-ocular distance
MOUTH_BELOW = 0.0  # mouth patch centre offset along the face's vertical axis, x d


def openings(lm: np.ndarray) -> np.ndarray:
    """(..., 68, 2) landmarks -> (..., 4) openings in ``CHANNELS`` order."""
    lm = np.asarray(lm, np.float64)
    d = np.linalg.norm(lm[..., EYE_LEFT, :].mean(-2) - lm[..., EYE_RIGHT, :].mean(-2), axis=-1)
    d = np.maximum(d, 1e-6)
    out = [np.mean([np.linalg.norm(lm[..., a, :] - lm[..., b, :], axis=-1) for a, b in _PAIRS[c]], axis=0) / d
           for c in CHANNELS]
    return np.stack(out, -1).astype(np.float32)


def centres_from_landmarks(lm: np.ndarray) -> np.ndarray:
    """(..., 68, 2) px -> (..., 3, 2) px: image-left eye, image-right eye, mouth centres."""
    lm = np.asarray(lm, np.float32)
    return np.stack([lm[..., EYE_LEFT, :].mean(-2), lm[..., EYE_RIGHT, :].mean(-2), lm[..., MOUTH, :].mean(-2)], -2)


def centres_from_keypoints(kp: np.ndarray, anchor_kp: list[int], size: int = 256) -> np.ndarray:
    """(..., 60) keypoint vectors ([-1, 1] units) -> (..., 3, 2) px centres in a ``size`` frame, from the
    keypoints anchored to (eye_left, eye_right, mouth, ...) as the checkpoint's ``anchor_kp`` says."""
    xy = np.asarray(kp, np.float32)[..., :20].reshape(*np.shape(kp)[:-1], 10, 2)
    pts = xy[..., anchor_kp[:3], :]
    return (pts + 1.0) * (size / 2.0) - 0.5


def jacobian_scales(kp: np.ndarray, anchor_kp: list[int]) -> np.ndarray:
    """(..., 60) keypoint vectors -> (..., 4): what the wire says of the openings, the anchored keypoints'
    Jacobian scales in ``CHANNELS`` order: J[1,1] of the eye_left, eye_right and mouth keypoints, J[0,0] of the
    mouth keypoint (``models.expression.train._jac_baseline``'s definition, for one vector or many)."""
    jac = np.asarray(kp, np.float32)[..., 20:].reshape(*np.shape(kp)[:-1], 10, 2, 2)
    el, er, mo = anchor_kp[:3]
    return np.stack([jac[..., el, 1, 1], jac[..., er, 1, 1], jac[..., mo, 1, 1], jac[..., mo, 0, 0]], -1)


def patch_affine(centre: np.ndarray | tuple[float, float], axis: np.ndarray | tuple[float, float], width: float,
                 height: float, out_w: int, out_h: int, mirror: bool) -> np.ndarray:
    """2x3 matrix taking frame pixels to patch pixels: ``axis`` (unit vector along the eye line) maps to
    the patch's x axis, a ``width`` x ``height`` box around ``centre`` fills the patch."""
    # patch = S R (p - c) + patch centre, R rotating the eye line onto x (then x negated when mirrored); in
    # Python floats: numpy's per-call overhead on 2x2 matrices was most of the region stage's geometry
    ux, uy = float(axis[0]), float(axis[1])
    cx, cy = float(centre[0]), float(centre[1])
    sx, sy = out_w / width, out_h / height
    if mirror:
        sx = -sx
    a, b, c, d = sx * ux, sx * uy, -sy * uy, sy * ux
    return np.array([[a, b, out_w / 2.0 - 0.5 - (a * cx + b * cy)],
                     [c, d, out_h / 2.0 - 0.5 - (c * cx + d * cy)]], np.float64)


def patch_affines(centres: np.ndarray) -> list[np.ndarray]:
    """The three 2x3 frame -> patch matrices of (3, 2) px centres (image-left eye, image-right eye mirrored,
    mouth): what ``cut_patches`` cuts and ``region_refiner.paste_changes`` pastes back."""
    (lx, ly), (rx, ry), (mx, my) = (tuple(float(v) for v in c) for c in np.asarray(centres)[:3])
    d = max(math.hypot(rx - lx, ry - ly), 1.0)
    ux, uy = (rx - lx) / d, (ry - ly) / d
    # the mouth patch sits MOUTH_BELOW x d down the face's vertical axis (-uy, ux) (image y when upright)
    mouth = (mx - MOUTH_BELOW * d * uy, my + MOUTH_BELOW * d * ux)
    mw, mh = MOUTH_PATCH
    return [patch_affine((lx, ly), (ux, uy), EYE_SIDE * d, EYE_SIDE * d, EYE_PATCH, EYE_PATCH, False),
            patch_affine((rx, ry), (ux, uy), EYE_SIDE * d, EYE_SIDE * d, EYE_PATCH, EYE_PATCH, True),
            patch_affine(mouth, (ux, uy), MOUTH_W * d, MOUTH_H * d, mw, mh, False)]


def cut_patches(frame: np.ndarray, centres: np.ndarray,
                affines: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Frame (H, W, 3) uint8 + centres (3, 2) px -> eye patches (2, EYE_PATCH, EYE_PATCH, 3) (the image-right
    one mirrored) and the mouth patch (MOUTH_PATCH[1], MOUTH_PATCH[0], 3); ``affines``: ``patch_affines(centres)``
    when the caller has them."""
    left, right, mouth = patch_affines(centres) if affines is None else affines
    mw, mh = MOUTH_PATCH
    eyes = np.stack([cv2.warpAffine(frame, m, (EYE_PATCH, EYE_PATCH), flags=cv2.INTER_LINEAR,
                                    borderMode=cv2.BORDER_REPLICATE) for m in (left, right)])
    mouth_patch = cv2.warpAffine(frame, mouth, (mw, mh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return eyes, mouth_patch
