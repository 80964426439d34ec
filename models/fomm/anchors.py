"""Landmark supervision for training: keypoints that follow the eyes and the mouth.

Left alone, FOMM's unsupervised keypoints at 64x64 settle on head pose: nothing in
the reconstruction loss makes an eyelid or a lip worth a keypoint when it is 3 px
tall. Here ``len(ANCHOR_GROUPS)`` of the K keypoints are tied to dlib landmark groups
(image-left eye, image-right eye, mouth, chin): the keypoint's position is pulled to
the group's centre and its Jacobian to the group's local affine shape (an eye that
closes has a small vertical scale), so the dense-motion network receives the
expression on the wire's 60 values. The other keypoints stay unsupervised. The
reconstruction loss is also weighted up on the eye and mouth regions, where the
whole-frame L1 barely notices a frozen face.

Only training uses this: the detector still sees pixels only, so sender and receiver
are unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from models.landmarks import ANCHOR_GROUPS, LANDMARK_SIZE, AnchorTemplates, anchor_targets, mirror, region_mask, to_unit

log = logging.getLogger(__name__)


@dataclass
class AnchorLosses:
    value: torch.Tensor  # L1 of anchored keypoint positions (in [-1, 1] units)
    jacobian: torch.Tensor  # L1 of anchored Jacobian entries
    region: torch.Tensor  # (B, 1, S, S) eye + mouth mask of the driving frame (zeros where no face)


class LandmarkSupervision:
    """Per-clip landmarks of the training clips, the anchor templates and which keypoint
    follows which group."""

    def __init__(self, landmarks: list[np.ndarray | None], valid: list[np.ndarray | None],
                 anchor_kp: list[int], templates: AnchorTemplates | None = None) -> None:
        if len(anchor_kp) != len(ANCHOR_GROUPS) or len(set(anchor_kp)) != len(anchor_kp):
            raise ValueError(f"anchor_kp needs {len(ANCHOR_GROUPS)} distinct keypoint indices, got {anchor_kp}")
        self.lm = [torch.from_numpy(to_unit(a)) if a is not None else None for a in landmarks]
        self.valid = [torch.from_numpy(v) if v is not None else None for v in valid]
        self.anchor_kp = list(anchor_kp)
        if templates is None:
            pool = torch.cat([a[v] for a, v in zip(self.lm, self.valid, strict=True) if a is not None and v.any()])
            templates = AnchorTemplates.fit(pool)
        self.templates = templates

    def coverage(self) -> float:
        n = sum(len(v) for v in self.valid if v is not None)
        k = sum(int(v.sum()) for v in self.valid if v is not None)
        return k / max(1, n)

    def _gather(self, draws: list[tuple[int, int, int, bool]], which: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Landmarks (B, 68, 2) and validity (B,) of the source (which=1) or driving (2) frames."""
        lms, ok = [], []
        for d in draws:
            ci, fi, flipped = d[0], d[which], d[3]
            a, v = self.lm[ci], self.valid[ci]
            if a is None or fi >= len(a) or not bool(v[fi]):
                lms.append(torch.zeros(68, 2))
                ok.append(False)
                continue
            lm = a[fi]
            lms.append(mirror(lm) if flipped else lm)
            ok.append(True)
        return torch.stack(lms), torch.tensor(ok)

    def losses(self, kp_source: dict[str, torch.Tensor], kp_driving: dict[str, torch.Tensor],
               draws: list[tuple[int, int, int, bool]], mask_size: int) -> AnchorLosses:
        idx = torch.tensor(self.anchor_kp)
        values, jacs = [], []
        for which, kp in ((1, kp_source), (2, kp_driving)):
            lm, ok = self._gather(draws, which)
            if not ok.any():
                continue
            centre, jac = anchor_targets(lm[ok], self.templates)
            values.append((kp["value"][ok][:, idx] - centre).abs().mean())
            jacs.append((kp["jacobian"][ok][:, idx] - jac).abs().mean())
        lm_d, ok_d = self._gather(draws, 2)
        region = region_mask(lm_d, mask_size) * ok_d[:, None, None, None].float()
        zero = kp_driving["value"].new_zeros(())
        return AnchorLosses(torch.stack(values).mean() if values else zero,
                            torch.stack(jacs).mean() if jacs else zero, region)


def assign_anchors(kp_values: torch.Tensor, lm_unit: torch.Tensor, templates: AnchorTemplates) -> list[int]:
    """Which existing keypoint to tie to each group: the assignment (Hungarian) that moves
    keypoints least, measured on frames with landmarks. kp_values (N, K, 2), lm_unit (N, 68, 2)."""
    centre, _ = anchor_targets(lm_unit, templates)  # N, G, 2
    cost = (kp_values[:, :, None] - centre[:, None]).norm(dim=-1).mean(0)  # K, G
    rows, cols = linear_sum_assignment(cost.numpy())
    order = np.argsort(cols)
    chosen = [int(rows[i]) for i in order]
    log.info("anchors %s -> keypoints %s (mean distance %s)", list(ANCHOR_GROUPS), chosen,
             [round(float(cost[r, g]), 3) for g, r in enumerate(chosen)])
    return chosen


def weighted_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean L1 inside a soft mask (resized to the prediction), 0 when the mask is empty."""
    if mask.shape[-1] != pred.shape[-1]:
        mask = torch.nn.functional.interpolate(mask, size=pred.shape[-2:], mode="bilinear", align_corners=False)
    return ((pred - target).abs().mean(1, keepdim=True) * mask).sum() / mask.sum().clamp(min=1.0)


__all__ = ["AnchorLosses", "LandmarkSupervision", "assign_anchors", "weighted_l1", "LANDMARK_SIZE"]
