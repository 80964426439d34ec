"""Pictures for people: validation grids with keypoints drawn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

COLORS = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
          (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190)]


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB."""
    return (img.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)


def draw_keypoints(img: np.ndarray, kp: np.ndarray) -> np.ndarray:
    """Draw (K, 2) keypoints in [-1, 1] on an RGB uint8 image."""
    out = img.copy()
    h, w = img.shape[:2]
    r = max(1, w // 64)
    for i, (x, y) in enumerate(kp):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        cx, cy = int(round((x + 1) / 2 * (w - 1))), int(round((y + 1) / 2 * (h - 1)))
        cv2.circle(out, (cx, cy), r, COLORS[i % len(COLORS)], -1)
    return out


def save_grid(path: str | Path, source: torch.Tensor, driving: torch.Tensor, pred: torch.Tensor,
              kp_driving: torch.Tensor) -> None:
    """Rows of source | driving | rendered | driving with keypoints, saved as PNG."""
    rows = []
    for s, d, p, k in zip(source, driving, pred, kp_driving, strict=False):
        dd = to_uint8(d)
        rows.append(np.concatenate([to_uint8(s), dd, to_uint8(p), draw_keypoints(dd, k.cpu().numpy())], axis=1))
    grid = np.concatenate(rows, axis=0)
    cv2.imwrite(str(path), grid[..., ::-1])
