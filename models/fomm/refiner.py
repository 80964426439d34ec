"""Full-resolution stage: motion at low resolution, pixels at full resolution.

The keypoints, the dense motion and the U-Net generator all run at ``gen_size``
(64x64); only this stage runs at the output size (256x256), and it is cheap:

1. upsample the flow and warp the **full-resolution source pixels** with it, so
   detail comes from the source image, not from a decoder;
2. add the generator's *change*: its low-resolution prediction minus its own
   static rendering (the source re-rendered with the source's keypoints, cached
   per call) warped by the same flow. Whatever the low-resolution model paints
   beyond a warp (an opening mouth, a disocclusion) is carried up; a generator
   that only warps adds nothing, so it cannot blur the sharp warped pixels;
3. a small convolutional net at half resolution (pixel-unshuffled input, pixel
   shuffle back) predicts a residual that corrects warp seams and inpaints, and a
   **motion gate** lets it act only where something moved.

With identity motion (driving keypoints = source keypoints) the flow is the
identity, the generator's change is zero and the gate is zero, so the output is
the source image to float precision: the static-source baseline is the floor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.fomm.blocks import make_coordinate_grid, resize, resize_flow, warp


class Refiner(nn.Module):
    def __init__(self, num_channels: int, channels: int, num_layers: int, size: int) -> None:
        super().__init__()
        if num_layers < 2 or channels < 1:
            raise ValueError("the refiner needs >= 2 layers and >= 1 channel")
        self.size = size
        cin = 4 * num_channels + num_channels + 2  # unshuffled warped source, change, occlusion, gate
        layers: list[nn.Module] = [nn.Conv2d(cin, channels, 3, padding=1), nn.ReLU()]
        for _ in range(num_layers - 2):
            layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
        last = nn.Conv2d(channels, 4 * num_channels, 3, padding=1)
        # Zero-initialised output: an untrained refiner adds nothing, so training
        # starts from the warp + change image instead of from noise.
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.net = nn.Sequential(*layers)
        # Gate = 1 - exp(-(a * flow displacement in output pixels + b * |change|)).
        # Starting values: a 1-pixel displacement or a 0.1 change opens the gate to ~0.6.
        self.log_gain = nn.Parameter(torch.tensor([0.0, math.log(10.0)]))
        self.register_buffer("grid", make_coordinate_grid(size, size), persistent=False)

    def forward(self, source: torch.Tensor, deformation: torch.Tensor, occlusion: torch.Tensor,
                low: torch.Tensor, low_static: torch.Tensor) -> dict[str, torch.Tensor]:
        """source (B,3,S,S); deformation (B,h,w,2); occlusion (B,1,h,w); low, low_static (B,3,g,g)."""
        flow = resize_flow(deformation, self.size)
        warped = F.grid_sample(source, flow, mode="bilinear", padding_mode="border", align_corners=True)
        change_low = low - warp(low_static, deformation)
        change = resize(change_low, self.size)
        base = warped + change
        # abs, not a Euclidean norm: its gradient at zero displacement is finite.
        displacement = (flow - self.grid).abs().sum(-1, keepdim=True).permute(0, 3, 1, 2) * (self.size / 2)
        gain = self.log_gain.exp()
        gate = 1.0 - torch.exp(-(gain[0] * displacement + gain[1] * change.abs().sum(1, keepdim=True)))
        half = self.size // 2
        x = torch.cat([F.pixel_unshuffle(warped, 2), resize(change_low, half), resize(occlusion, half),
                       resize(gate, half)], dim=1)
        residual = F.pixel_shuffle(self.net(x), 2)
        return {"prediction": base + gate * residual, "base": base, "gate": gate, "warped_source": warped}
