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


def patch_affine(centre: np.ndarray, axis: np.ndarray, width: float, height: float, out_w: int, out_h: int,
            mirror: bool) -> np.ndarray:
    """2x3 matrix taking frame pixels to patch pixels: ``axis`` (unit vector along the eye line) maps to
    the patch's x axis, a ``width`` x ``height`` box around ``centre`` fills the patch."""
    ux, uy = axis
    sx, sy = out_w / width, out_h / height
    # patch = S R (p - c) + patch centre, R rotating the eye line onto x
    rot = np.array([[ux, uy], [-uy, ux]], np.float64)
    m = np.diag([sx, sy]) @ rot
    if mirror:
        m = np.diag([-1.0, 1.0]) @ m
    t = np.array([out_w / 2.0 - 0.5, out_h / 2.0 - 0.5]) - m @ np.asarray(centre, np.float64)
    return np.concatenate([m, t[:, None]], 1)


def cut_patches(frame: np.ndarray, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame (H, W, 3) uint8 + centres (3, 2) px -> eye patches (2, EYE_PATCH, EYE_PATCH, 3) (the image-right
    one mirrored) and the mouth patch (MOUTH_PATCH[1], MOUTH_PATCH[0], 3)."""
    left, right, mouth = (np.asarray(c, np.float64) for c in centres)
    v = right - left
    d = max(float(np.linalg.norm(v)), 1.0)
    axis = v / d
    eyes = []
    for c, mirror in ((left, False), (right, True)):
        m = patch_affine(c, axis, EYE_SIDE * d, EYE_SIDE * d, EYE_PATCH, EYE_PATCH, mirror)
        eyes.append(cv2.warpAffine(frame, m, (EYE_PATCH, EYE_PATCH), flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REPLICATE))
    down = np.array([-axis[1], axis[0]])  # the face's vertical axis (image y when upright)
    mw, mh = MOUTH_PATCH
    m = patch_affine(mouth + MOUTH_BELOW * d * down, axis, MOUTH_W * d, MOUTH_H * d, mw, mh, False)
    mouth_patch = cv2.warpAffine(frame, m, (mw, mh), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    return np.stack(eyes), mouth_patch
