"""The region refiner: redraws the eyes and the mouth of a rendered frame at full resolution.

Warping the source image cannot open an eye that is closed in the source, nor show teeth it does
not have; the motion model's renders keep the source's eye state and open the mouth a third as wide
(issue #29). The refiner works on the three patches ``openings.cut_patches`` cuts around the
landmark-anchored keypoints of the frame being shown:

- input, per patch: the rendered patch (3 channels), the source image's patch of the same region (3:
  the person's own eye / teeth to copy from), and constant planes holding the **target** opening (the
  driving frame's, sent beside the keypoints) and the source's opening, standardised (eyes: 2 planes,
  the eye's own opening; mouth: 4 planes, mouth_open and mouth_width of target and source);
- a small U-Net per region kind (two stride-2 downsamplings, ``width``-2x-4x channels; one for both
  eyes, since the image-right eye arrives mirrored, one for the mouth) -> an RGB residual and a mask
  logit; output = rendered + sigmoid(mask) * residual, clamped to [0, 1]. The output convolution is
  zero-initialised, so an untrained refiner returns the rendered patch exactly.

``paste_patches`` warps the refined patches back into the frame (the inverse of ``cut_patches``'
affines, the image-right eye un-mirrored) with a feathered window, and ``refine_frame`` does cut ->
refine -> paste for one frame. Training: ``models.expression.train_refiner``; samples:
``models.expression.region_data``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.checkpoint import load_model, save_checkpoint
from models.expression.openings import (
    CHANNELS,
    cut_patches,
    patch_affines,
)

KIND = "region-refiner"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "region_refiner.pt"
FEATHER = 0.25  # paste window: fraction of each patch side over which the weight ramps from 0 to 1


@dataclass
class RefinerConfig:
    width: int = 16  # channels at full patch resolution; 2x and 4x after the two downsamplings
    # 3: two downsamplings (32 -> 16 -> 8 px); 2: one (the 8 px level and its decoder convolution dropped:
    # ~40 % of the multiply-adds, which is what the stage's time is on these patch sizes, issue #29)
    levels: int = 3
    # opening statistics for the constant planes (set by training): planes hold (opening - mean) / std
    open_mean: list[float] = field(default_factory=lambda: [0.0] * len(CHANNELS))
    open_std: list[float] = field(default_factory=lambda: [1.0] * len(CHANNELS))

    def to_dict(self) -> dict:
        return asdict(self)


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.ReLU(inplace=True))


class _UNet(nn.Module):
    """(B, cin, H, W) -> residual (B, 3, H, W) and mask logit (B, 1, H, W); H, W divisible by 4."""

    def __init__(self, cin: int, width: int, levels: int = 3) -> None:
        super().__init__()
        if levels not in (2, 3):
            raise ValueError(f"levels must be 2 or 3, not {levels!r}")
        w = width
        self.levels = levels
        self.enc0 = nn.Sequential(_conv(cin, w), _conv(w, w))
        self.enc1 = nn.Sequential(_conv(w, 2 * w, 2), _conv(2 * w, 2 * w))
        if levels == 3:
            self.enc2 = nn.Sequential(_conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w))
            self.dec1 = _conv(4 * w + 2 * w, 2 * w)
        # the same input width either way (2w coarse + w skip), so a 2-level net can start from a 3-level one
        self.dec0 = _conv(2 * w + w, w)
        self.out = nn.Conv2d(w, 4, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e0 = self.enc0(x)
        d1 = e1 = self.enc1(e0)
        if self.levels == 3:
            e2 = self.enc2(e1)
            d1 = self.dec1(torch.cat([F.interpolate(e2, size=e1.shape[-2:], mode="bilinear", align_corners=False),
                                      e1], 1))
        d0 = self.dec0(torch.cat([F.interpolate(d1, size=e0.shape[-2:], mode="bilinear", align_corners=False), e0], 1))
        o = self.out(d0)
        return o[:, :3], o[:, 3:]


def _planes(values: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, k) -> (B, k, h, w) constant planes."""
    return values[:, :, None, None].expand(-1, -1, h, w)


def blend(net: _UNet, x: torch.Tensor, rendered: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One U-Net on its input planes ``x`` -> (the refined patches: rendered + sigmoid(mask) x residual in [0, 1],
    the mask)."""
    residual, logit = net(x)
    mask = torch.sigmoid(logit)
    return (rendered + mask * residual).clamp(0.0, 1.0), mask


class RegionRefiner(nn.Module):
    def __init__(self, config: RefinerConfig | None = None) -> None:
        super().__init__()
        self.config = config or RefinerConfig()
        self.eye = _UNet(3 + 3 + 2, self.config.width, self.config.levels)
        self.mouth = _UNet(3 + 3 + 4, self.config.width, self.config.levels)
        self.register_buffer("open_mean", torch.tensor(self.config.open_mean, dtype=torch.float32))
        self.register_buffer("open_std", torch.tensor(self.config.open_std, dtype=torch.float32))

    def set_open_stats(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        self.open_mean.copy_(mean)
        self.open_std.copy_(std)
        self.config.open_mean, self.config.open_std = mean.tolist(), std.tolist()

    @staticmethod
    def _apply(net: _UNet, rendered: torch.Tensor, source: torch.Tensor,
               planes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = rendered.shape[-2:]
        x = torch.cat([rendered * 2 - 1, source * 2 - 1, _planes(planes, h, w)], 1)
        return blend(net, x, rendered)

    def forward(self, rendered_eyes: torch.Tensor, source_eyes: torch.Tensor, rendered_mouth: torch.Tensor,
                source_mouth: torch.Tensor, target: torch.Tensor, source_open: torch.Tensor) -> dict[str, torch.Tensor]:
        """eyes (B, 2, 3, 32, 32), mouth (B, 3, 32, 48), floats in [0, 1]; ``target`` / ``source_open`` (B, 4)
        openings in label units (``CHANNELS`` order) -> {"eyes", "mouth", "eye_mask" (B, 2, 1, 32, 32),
        "mouth_mask" (B, 1, 32, 48)}."""
        b = rendered_eyes.shape[0]
        t = (target - self.open_mean) / self.open_std
        s = (source_open - self.open_mean) / self.open_std
        eye_planes = torch.stack([t[:, :2], s[:, :2]], -1).flatten(0, 1)  # (B*2, 2): this eye's target, source
        eyes, eye_mask = self._apply(self.eye, rendered_eyes.flatten(0, 1), source_eyes.flatten(0, 1), eye_planes)
        mouth, mouth_mask = self._apply(self.mouth, rendered_mouth, source_mouth, torch.cat([t[:, 2:], s[:, 2:]], 1))
        return {"eyes": eyes.view_as(rendered_eyes), "mouth": mouth,
                "eye_mask": eye_mask.view(b, 2, 1, *eyes.shape[-2:]), "mouth_mask": mouth_mask}


def save_refiner(path: str | Path, net: RegionRefiner, meta: dict | None = None) -> int:
    return save_checkpoint(path, net, KIND, net.config.to_dict(), meta)


def load_refiner(path: str | Path = DEFAULT_WEIGHTS) -> tuple[RegionRefiner, dict]:
    """The refiner in eval mode and its checkpoint's meta; raises CheckpointError."""
    return load_model(path, KIND, lambda config: RegionRefiner(RefinerConfig(**config)))  # type: ignore[return-value]


# --------------------------------------------------------------------------- frame <-> patches


@functools.lru_cache(maxsize=8)
def window(w: int, h: int, feather: float) -> np.ndarray:
    """(h, w) float32 weights: 1 in the middle, a smooth ramp to 0 at the patch's border (cached: the
    same few shapes on every frame; read-only)."""
    def ramp(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float64) + 0.5
        edge = np.minimum(x, n - x) / max(feather * n, 1e-6)  # 0 at the border, 1 at feather * n inside
        e = np.clip(edge, 0.0, 1.0)
        return e * e * (3 - 2 * e)  # smoothstep

    win = (ramp(h)[:, None] * ramp(w)[None, :]).astype(np.float32)
    win.flags.writeable = False
    return win


def _frame_box(m: np.ndarray, pw: int, ph: int, w: int, h: int) -> tuple[int, int, int, int, np.ndarray] | None:
    """The frame box (x0, y0, x1, y1) a ``pw`` x ``ph`` patch of the frame->patch affine ``m`` covers, clipped to
    the ``w`` x ``h`` frame, and ``m`` shifted to map box pixels (u, v) = frame pixels (u + x0, v + y0); None when
    the patch is off the frame. Pasting touches only that box."""
    # the patch's corners in the frame, by the inverse of m = [A | t] (A^-1 (q - t)), in Python floats: numpy's
    # per-call overhead on these 2x3 matrices was a third of the paste's time
    (a, b, tx), (c, d, ty) = m.tolist()
    det = a * d - b * c
    xs, ys = [], []
    for qx, qy in ((-0.5, -0.5), (pw - 0.5, -0.5), (-0.5, ph - 0.5), (pw - 0.5, ph - 0.5)):
        ux, uy = qx - tx, qy - ty
        xs.append((d * ux - b * uy) / det)
        ys.append((a * uy - c * ux) / det)
    x0, y0 = max(math.floor(min(xs)), 0), max(math.floor(min(ys)), 0)
    x1, y1 = min(math.ceil(max(xs)) + 1, w), min(math.ceil(max(ys)) + 1, h)
    if x1 <= x0 or y1 <= y0:
        return None
    shifted = np.array([[a, b, tx + a * x0 + b * y0], [c, d, ty + c * x0 + d * y0]], np.float64)
    return x0, y0, x1, y1, shifted


def paste_patches(frame: np.ndarray, centres: np.ndarray, eyes: np.ndarray, mouth: np.ndarray,
                  feather: float = FEATHER) -> np.ndarray:
    """Frame (H, W, 3) uint8 + (3, 2) px centres + eye patches (2, 32, 32, 3) (the image-right one mirrored, as
    ``cut_patches`` gives them) + mouth patch (32, 48, 3), uint8 -> a new frame with the patches warped back in,
    each blended with a feathered window (weight 1 inside, ramping to 0 over ``feather`` of the patch's side)."""
    h, w = frame.shape[:2]
    out = frame.copy()
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP  # m maps frame -> patch: sample the patch at m(frame px)
    for m, patch in zip(patch_affines(centres), (eyes[0], eyes[1], mouth), strict=True):
        ph, pw = patch.shape[:2]
        box = _frame_box(m, pw, ph, w, h)
        if box is None:
            continue
        x0, y0, x1, y1, shifted = box
        size = (x1 - x0, y1 - y0)
        back = cv2.warpAffine(patch.astype(np.float32), shifted, size, flags=flags, borderMode=cv2.BORDER_REPLICATE)
        alpha = cv2.warpAffine(window(pw, ph, feather), shifted, size, flags=flags, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0.0)[..., None]
        roi = out[y0:y1, x0:x1].astype(np.float32)
        out[y0:y1, x0:x1] = np.clip(np.rint(roi * (1 - alpha) + back * alpha), 0, 255).astype(np.uint8)
    return out


def paste_changes(frame: np.ndarray, centres: np.ndarray, eye_change: np.ndarray, mouth_change: np.ndarray,
                  feather: float | None = FEATHER, affines: list[np.ndarray] | None = None) -> np.ndarray:
    """``paste_patches``, but only what the refiner changed: frame + window x the warped-back change of each
    patch (float grey levels, (2, 32, 32, 3) eyes, the image-right one mirrored, and (32, 48, 3) mouth;
    ``feather`` None: the changes come with the window applied, as the stage's graph outputs them; ``affines``:
    ``patch_affines(centres)`` when the caller has them).
    Where a patch is unchanged, the frame keeps its own full-resolution pixels (``paste_patches`` resamples the
    whole window through the 32-pixel patch: up to ~13 grey levels off at edges with an identity refiner)."""
    h, w = frame.shape[:2]
    out = frame.copy()
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for m, change in zip(patch_affines(centres) if affines is None else affines,
                         (eye_change[0], eye_change[1], mouth_change), strict=True):
        ph, pw = change.shape[:2]
        if not np.any(change):
            continue
        box = _frame_box(m, pw, ph, w, h)
        if box is None:
            continue
        x0, y0, x1, y1, shifted = box
        size = (x1 - x0, y1 - y0)
        weighted = change.astype(np.float32, copy=False)
        if feather is not None:
            weighted = weighted * window(pw, ph, feather)[..., None]
        back = cv2.warpAffine(weighted, shifted, size, flags=flags, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        roi = out[y0:y1, x0:x1]
        cv2.add(roi, back, dst=roi, dtype=cv2.CV_8U)  # rounded and saturated, as np.clip(np.rint(roi + back))
    return out


def _to_tensor(patches: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(patches)).movedim(-1, -3).float() / 255.0


def _to_uint8(t: torch.Tensor) -> np.ndarray:
    return (t.movedim(-3, -1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


@torch.no_grad()
def refine_frame(net: RegionRefiner, frame: np.ndarray, centres: np.ndarray, source_eyes: np.ndarray,
                 source_mouth: np.ndarray, target: np.ndarray, source_open: np.ndarray) -> np.ndarray:
    """One rendered 256x256 uint8 frame -> the same frame with its eyes and mouth refined.

    ``centres``: the driving keypoints' region centres (``centres_from_keypoints``); ``source_eyes`` /
    ``source_mouth``: ``cut_patches`` of the source image at its own centres (once per call); ``target`` /
    ``source_open``: (4,) openings of the driving frame and of the source."""
    eyes, mouth = cut_patches(frame, centres)
    out = net(_to_tensor(eyes)[None], _to_tensor(source_eyes)[None], _to_tensor(mouth)[None],
              _to_tensor(source_mouth)[None], torch.as_tensor(target, dtype=torch.float32)[None],
              torch.as_tensor(source_open, dtype=torch.float32)[None])
    return paste_patches(frame, centres, _to_uint8(out["eyes"][0]), _to_uint8(out["mouth"][0]))
