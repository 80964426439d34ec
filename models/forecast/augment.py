"""Data augmentation of keypoint windows (training only).

With ~50 training source videos the learned forecasters fit the training clips but not
unseen ones; these label-preserving transforms of a (B, T, 60) window make motions the
training split does not contain but a live call plausibly could:

- horizontal flip: x -> -x for every keypoint; each Jacobian J -> F J F with
  F = diag(-1, 1) (the local affine seen in the mirror), i.e. J01 and J10 negate.
  Keypoint order is unchanged: FOMM keypoints are unsupervised, there is no
  "left eye" <-> "right eye" pairing to swap.
- time reversal: a motion played backwards is still a motion.
- global translation: the same small (dx, dy) on every coordinate, clipped to [-1, 1].
- temporal speed: the window resampled at 0.75–1.5× the native rate (linear
  interpolation between frames), see :func:`resample_speed` / ``WindowSampler``.
- Gaussian noise on the observed frames only (the target future stays clean), in
  units of the per-dimension one-frame change scale.

Vector layout: ``[x0, y0, ..., x9, y9, J0_00, J0_01, J0_10, J0_11, ...]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_KP = 10
X_IDX = np.arange(0, 2 * N_KP, 2)  # x coordinates
COORD_IDX = np.arange(2 * N_KP)
# J01 and J10 of every keypoint (row-major 2x2 after the 20 coordinates)
JAC_OFF_IDX = np.concatenate([2 * N_KP + 4 * k + np.array([1, 2]) for k in range(N_KP)])


@dataclass
class AugmentConfig:
    flip_p: float = 0.5
    reverse_p: float = 0.5
    translate_p: float = 0.5
    translate_max: float = 0.1  # |offset| per axis, keypoint units ([-1, 1] is the frame)
    speed_p: float = 0.5
    speed_min: float = 0.75
    speed_max: float = 1.5
    noise_std: float = 0.1  # std of input noise in units of the one-frame change scale (0 = off)


def flip_horizontal(w: np.ndarray) -> np.ndarray:
    """Mirror left-right: x -> -x, J -> F J F (F = diag(-1, 1)). Works on (..., 60)."""
    out = np.array(w, dtype=np.float32, copy=True)
    out[..., X_IDX] *= -1.0
    out[..., JAC_OFF_IDX] *= -1.0
    return out


def reverse_time(w: np.ndarray) -> np.ndarray:
    """(..., T, 60) played backwards."""
    return np.ascontiguousarray(w[..., ::-1, :])


def translate(w: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Add offset (2,) = (dx, dy) to every keypoint of (T, 60), clipped to [-1, 1]."""
    out = np.array(w, dtype=np.float32, copy=True)
    out[..., 0:2 * N_KP:2] = np.clip(out[..., 0:2 * N_KP:2] + offset[0], -1.0, 1.0)
    out[..., 1:2 * N_KP:2] = np.clip(out[..., 1:2 * N_KP:2] + offset[1], -1.0, 1.0)
    return out


def resample_speed(series: np.ndarray, start: float, speed: float, length: int) -> np.ndarray:
    """``length`` frames of (T, 60) ``series`` at times start + speed·i, linearly interpolated.
    The caller keeps start + speed·(length-1) <= T-1."""
    t = start + speed * np.arange(length, dtype=np.float64)
    i0 = np.clip(np.floor(t).astype(np.int64), 0, len(series) - 1)
    i1 = np.minimum(i0 + 1, len(series) - 1)
    a = (t - i0)[:, None].astype(np.float32)
    return (1.0 - a) * series[i0] + a * series[i1]


def augment_window(w: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Flip / reverse / translate one (T, 60) window at random (speed and noise are applied
    elsewhere: speed needs the whole clip, noise only touches the observed frames)."""
    if rng.random() < cfg.flip_p:
        w = flip_horizontal(w)
    if rng.random() < cfg.reverse_p:
        w = reverse_time(w)
    if rng.random() < cfg.translate_p and cfg.translate_max > 0:
        w = translate(w, rng.uniform(-cfg.translate_max, cfg.translate_max, size=2))
    return w


def add_input_noise(win: np.ndarray, n_obs: int, scale: np.ndarray, std: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise (std · per-dim ``scale``) on the first n_obs frames of (B, T, 60)."""
    if std <= 0:
        return win
    out = np.array(win, dtype=np.float32, copy=True)
    out[:, :n_obs] += (rng.standard_normal(out[:, :n_obs].shape) * std * scale).astype(np.float32)
    return out
