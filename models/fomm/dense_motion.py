"""Dense motion: keypoints + Jacobians -> sparse motions -> softmax masks -> flow and occlusion.

Each keypoint's motion is an affine map of the frame, z -> kp_s + J_s J_d^-1 (z - kp_d), so it
is carried as one 2x3 matrix per keypoint, and the flow, a mask-weighted sum of those maps, is
the mask-weighted sum of the matrices applied once per pixel. That is the same function as
summing K+1 per-pixel motion fields, at a fraction of the elementwise work: in the int8 64x64
render graph the per-pixel subtract / multiply / add of those fields took ~14 % of a frame.
For the same reason the mask and occlusion heads run as one convolution (their 7x7 kernels on
~60 channels were a third of the frame; the 1-channel occlusion conv cost as much as the 11-channel
mask conv); their weights stay two modules, so checkpoints are unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fomm.blocks import Hourglass, inverse_2x2, make_coordinate_grid, resize

# The two heads share one int8 output range in the CPU render graph. The shipped models' calibrated
# ranges: mask logits [-83, 18], occlusion logit [-1, 14]; on its own scale the occlusion would get a
# 6.7x coarser int8 step than on its own range. Scaled by -5 (undone before the sigmoid: exact in
# float) it lies inside the mask's range: 1.3x coarser, and the mask's step is unchanged.
OCCLUSION_SCALE = -5.0


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
        # a buffer, not a tensor made in forward, so the exported graph folds the heads into one constant
        self.register_buffer("head_pad", torch.zeros(-(num_kp + 2) % 16, self.hourglass.out_filters, 7, 7),
                             persistent=False)
        grid = make_coordinate_grid(motion_size, motion_size)
        # homogeneous pixel coordinates (h*w, 3): [x, y, 1]
        self.register_buffer("grid_h", torch.cat([grid, torch.ones_like(grid[..., :1])], -1).reshape(-1, 3),
                             persistent=False)
        self.register_buffer("grid_sq", (grid ** 2).sum(-1).reshape(-1), persistent=False)

    def heatmaps(self, kp: torch.Tensor) -> torch.Tensor:
        """Gaussian blobs at each keypoint, (B, K, h, w)."""
        # |z - kp|^2 = [z; 1] . [-2 kp; |kp|^2] + |z|^2: one matrix product, no (B, K, h, w, 2) field
        b, k = kp.shape[:2]
        coef = torch.cat([-2.0 * kp, (kp ** 2).sum(-1, keepdim=True)], dim=-1)  # B,K,3
        dist = coef @ self.grid_h.T + self.grid_sq  # B,K,h*w
        h = w = self.motion_size
        return torch.exp(-0.5 * dist / self.kp_variance).view(b, k, h, w)

    def affine(self, kp_d: dict[str, torch.Tensor], kp_s: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K+1, 2, 3): each keypoint's motion z -> A z + t as [A | t]; identity first (background)."""
        b = kp_d["value"].shape[0]
        jac = kp_s["jacobian"] @ inverse_2x2(kp_d["jacobian"])  # B,K,2,2
        shift = kp_s["value"] - (jac @ kp_d["value"].unsqueeze(-1)).squeeze(-1)  # B,K,2
        maps = torch.cat([jac, shift.unsqueeze(-1)], dim=-1)
        identity = torch.eye(2, 3, dtype=maps.dtype, device=maps.device).expand(b, 1, 2, 3)
        return torch.cat([identity, maps], dim=1)

    def sparse_motions(self, kp_d: dict[str, torch.Tensor], kp_s: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, K+1, h, w, 2): where each keypoint's motion (identity for the background) samples the source."""
        return self._fields(self.affine(kp_d, kp_s))

    def _fields(self, maps: torch.Tensor) -> torch.Tensor:
        """(B, K+1, 2, 3) affine maps -> (B, K+1, h, w, 2) sampling positions."""
        b, k1 = maps.shape[:2]
        h = w = self.motion_size
        return (self.grid_h @ maps.transpose(-1, -2)).view(b, k1, h, w, 2)

    def _heads(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of the mask and occlusion heads as one conv, zero-padded to a multiple of
        16 output channels: ONNX Runtime's int8 conv is ~2x faster at 16 than at 12 (a one-off timing,
        4x60x64x64 input, 7x7: 13.1 vs 6.0 ms); the padding channels are never read."""
        weight = torch.cat([self.mask.weight, OCCLUSION_SCALE * self.occlusion.weight, self.head_pad])
        bias = torch.cat([self.mask.bias, OCCLUSION_SCALE * self.occlusion.bias, self.head_pad[:, 0, 0, 0]])
        return weight, bias

    def forward(self, source: torch.Tensor, kp_d: dict[str, torch.Tensor],
                kp_s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        src = resize(source, self.motion_size)
        b, c, h, w = src.shape
        k1 = self.num_kp + 1
        heat = self.heatmaps(kp_d["value"]) - self.heatmaps(kp_s["value"])
        heat = torch.cat([torch.zeros_like(heat[:, :1]), heat], dim=1).unsqueeze(2)  # B,K+1,1,h,w
        maps = self.affine(kp_d, kp_s)
        motions = self._fields(maps)
        deformed = F.grid_sample(
            src.unsqueeze(1).expand(b, k1, c, h, w).reshape(b * k1, c, h, w),
            motions.reshape(b * k1, h, w, 2), mode="bilinear", padding_mode="border", align_corners=True,
        ).view(b, k1, c, h, w)
        x = torch.cat([heat, deformed], dim=2).view(b, k1 * (c + 1), h, w)
        feature = self.hourglass(x)
        heads = F.conv2d(feature, *self._heads(), padding=3)
        mask = _softmax_channels(heads[:, :k1])  # B,K+1,h,w
        occlusion = torch.sigmoid(heads[:, k1:k1 + 1] / OCCLUSION_SCALE)
        # sum_k mask_k (A_k z + t_k) = (sum_k mask_k [A_k | t_k]) [z; 1]: one 2x3 matrix per pixel
        per_pixel = (mask.flatten(2).transpose(1, 2) @ maps.flatten(2)).view(b, h * w, 2, 3)
        deformation = (per_pixel * self.grid_h[None, :, None, :]).sum(-1).view(b, h, w, 2)
        return {"deformation": deformation, "occlusion": occlusion, "mask": mask}


def _softmax_channels(x: torch.Tensor) -> torch.Tensor:
    """``F.softmax(x, dim=1)`` written out: ONNX Runtime's Softmax over the channel axis of an
    NCHW tensor took 0.59 ms a 64x64 frame (11 channels), the same exp / sum 0.05 ms (one-off
    timing, 1 thread), 6 % of the 64 render graph."""
    e = torch.exp(x - x.amax(dim=1, keepdim=True))
    return e / e.sum(dim=1, keepdim=True)
