"""Keypoint detector: hourglass -> K soft-argmax keypoints + a 2x2 Jacobian each."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fomm.blocks import Hourglass, make_coordinate_grid, resize


class KeypointDetector(nn.Module):
    def __init__(self, num_kp: int, num_channels: int, temperature: float, block_expansion: int,
                 max_features: int, num_blocks: int, motion_size: int) -> None:
        super().__init__()
        self.num_kp = num_kp
        self.temperature = temperature
        self.motion_size = motion_size
        self.predictor = Hourglass(block_expansion, num_channels, num_blocks, max_features)
        self.heatmap = nn.Conv2d(self.predictor.out_filters, num_kp, 7, padding=3)
        self.jacobian = nn.Conv2d(self.predictor.out_filters, 4 * num_kp, 7, padding=3)
        # Start every local affine as the identity, as FOMM does, so early training
        # behaves like pure translation and the Jacobians learn a correction.
        nn.init.zeros_(self.jacobian.weight)
        with torch.no_grad():
            self.jacobian.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.0]).repeat(num_kp))
        self.register_buffer("grid", make_coordinate_grid(motion_size, motion_size), persistent=False)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """image (B, 3, H, W) in [0, 1] -> value (B, K, 2) in [-1, 1], jacobian (B, K, 2, 2)."""
        x = resize(image, self.motion_size)
        feature = self.predictor(x)
        b = x.shape[0]
        logits = self.heatmap(feature).flatten(2) / self.temperature
        heat = F.softmax(logits, dim=-1).view(b, self.num_kp, self.motion_size, self.motion_size)
        value = (heat.unsqueeze(-1) * self.grid).sum(dim=(2, 3))
        jac = self.jacobian(feature).view(b, self.num_kp, 4, self.motion_size, self.motion_size)
        jac = (heat.unsqueeze(2) * jac).sum(dim=(3, 4)).view(b, self.num_kp, 2, 2)
        return {"value": value, "jacobian": jac}
