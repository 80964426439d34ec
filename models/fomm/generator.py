"""Generator: warp the source's encoder features and pixels with the dense flow, refine, blend.

Unlike FOMM's generator, which decodes every pixel, this one also warps the source
image itself in pixel space and blends it with the decoded image through a learned
per-pixel mask. With identity motion the warped pixels are the source exactly, so the
static-source image is the floor of quality, not its ceiling; warped encoder features
reach the decoder through U-Net skips so regions the warp cannot explain (an opening
mouth, disocclusions) can still be painted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.fomm.blocks import ConvBlock, DownBlock, ResBlock, UpBlock, warp


class Generator(nn.Module):
    def __init__(self, num_channels: int, block_expansion: int, max_features: int,
                 num_down_blocks: int, num_bottleneck_blocks: int) -> None:
        super().__init__()
        if num_down_blocks < 1:
            raise ValueError("the generator needs at least one down block")
        ch = [min(max_features, block_expansion * 2 ** i) for i in range(num_down_blocks + 1)]
        self.first = ConvBlock(num_channels, ch[0], kernel=7)
        self.down = nn.ModuleList(DownBlock(ch[i], ch[i + 1]) for i in range(num_down_blocks))
        self.bottleneck = nn.Sequential(*[ResBlock(ch[-1]) for _ in range(num_bottleneck_blocks)])
        self.up = nn.ModuleList(
            UpBlock(ch[i + 1] if i == num_down_blocks - 1 else 2 * ch[i + 1], ch[i])
            for i in reversed(range(num_down_blocks))
        )
        self.final = nn.Conv2d(2 * ch[0], num_channels + 1, 3, padding=1)

    def encode(self, source: torch.Tensor) -> list[torch.Tensor]:
        """Source pixels and encoder features at every scale; cache once per call."""
        feats = [source, self.first(source)]
        for block in self.down:
            feats.append(block(feats[-1]))
        return feats

    def decode(self, feats: list[torch.Tensor], deformation: torch.Tensor,
               occlusion: torch.Tensor) -> dict[str, torch.Tensor]:
        source, enc = feats[0], feats[1:]
        warped = [warp(f, deformation) * _fit(occlusion, f.shape[-1]) for f in enc]
        x = self.bottleneck(warped[-1])
        for block, skip in zip(self.up, reversed(warped[:-1]), strict=False):
            x = torch.cat([block(x), skip], dim=1)
        out = self.final(x)
        decoded = torch.sigmoid(out[:, :-1])
        blend = torch.sigmoid(out[:, -1:])
        warped_source = warp(source, deformation)
        prediction = blend * warped_source + (1.0 - blend) * decoded
        return {"prediction": prediction, "blend": blend, "warped_source": warped_source}


def _fit(occlusion: torch.Tensor, size: int) -> torch.Tensor:
    if occlusion.shape[-1] == size:
        return occlusion
    return F.interpolate(occlusion, size=(size, size), mode="bilinear", align_corners=True)
