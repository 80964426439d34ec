"""Dense motion: keypoints + Jacobians -> sparse motions -> softmax masks -> flow and occlusion."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fomm.blocks import Hourglass, inverse_2x2, make_coordinate_grid, resize


class DenseMotionNetwork(nn.Module):
    def __init__(self, num_kp: int, num_channels: int, kp_variance: float, block_expansion: int,
                 max_features: int, num_blocks: int, motion_size: int) -> None:
        super().__init__()
        self.num_kp = num_kp
        self.kp_variance = kp_variance
        self.motion_size = motion_size
        self.hourglass = Hourglass(block_expansion, (num_kp + 1) * (num_channels + 1), num_blocks, max_features)
        self.mask = nn.Conv2d(self.hourglass.out_filters, num_kp + 1, 7, padding=3)
        self.occlusion = nn.Conv2d(self.hourglass.out_filters, 1, 7, padding=3)
        self.register_buffer("grid", make_coordinate_grid(motion_size, motion_size), persistent=False)

    def heatmaps(self, kp: torch.Tensor) -> torch.Tensor:
        """Gaussian blobs at each keypoint, (B, K, h, w)."""
        diff = self.grid[None, None] - kp[:, :, None, None, :]
        return torch.exp(-0.5 * (diff ** 2).sum(-1) / self.kp_variance)

    def sparse_motions(self, kp_d: dict[str, torch.Tensor], kp_s: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K+1, h, w, 2): z -> kp_s + J_s J_d^-1 (z - kp_d) for each keypoint, identity for background."""
        b = kp_d["value"].shape[0]
        z = self.grid[None, None] - kp_d["value"][:, :, None, None, :]  # B,K,h,w,2
        jac = kp_s["jacobian"] @ inverse_2x2(kp_d["jacobian"])  # B,K,2,2
        z = torch.einsum("bkij,bkhwj->bkhwi", jac, z)
        motions = z + kp_s["value"][:, :, None, None, :]
        identity = self.grid[None, None].expand(b, 1, -1, -1, -1)
        return torch.cat([identity, motions], dim=1)

    def forward(self, source: torch.Tensor, kp_d: dict[str, torch.Tensor],
                kp_s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        src = resize(source, self.motion_size)
        b, c, h, w = src.shape
        k1 = self.num_kp + 1
        heat = self.heatmaps(kp_d["value"]) - self.heatmaps(kp_s["value"])
        heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1).unsqueeze(2)  # B,K+1,1,h,w
        motions = self.sparse_motions(kp_d, kp_s)
        deformed = F.grid_sample(
            src.unsqueeze(1).expand(b, k1, c, h, w).reshape(b * k1, c, h, w),
            motions.reshape(b * k1, h, w, 2), mode="bilinear", padding_mode="border", align_corners=True,
        ).view(b, k1, c, h, w)
        x = torch.cat([heat, deformed], dim=2).view(b, k1 * (c + 1), h, w)
        feature = self.hourglass(x)
        mask = F.softmax(self.mask(feature), dim=1)  # B,K+1,h,w
        deformation = (mask.unsqueeze(-1) * motions).sum(dim=1)  # B,h,w,2
        occlusion = torch.sigmoid(self.occlusion(feature))
        return {"deformation": deformation, "occlusion": occlusion, "mask": mask}
