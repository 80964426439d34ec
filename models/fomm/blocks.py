"""Small convolutional building blocks shared by the FOMM networks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def make_coordinate_grid(h: int, w: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1], shape (h, w, 2), last axis (x, y) like grid_sample."""
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([gx, gy], dim=-1)


def inverse_2x2(m: torch.Tensor) -> torch.Tensor:
    """Closed-form inverse of (..., 2, 2) matrices.

    torch.inverse blocks ONNX export and is slow for tiny matrices; the determinant
    is clamped away from zero so a degenerate Jacobian from a peer cannot produce inf.
    """
    a, b = m[..., 0, 0], m[..., 0, 1]
    c, d = m[..., 1, 0], m[..., 1, 1]
    det = a * d - b * c
    det = torch.where(det.abs() < 1e-6, torch.full_like(det, 1e-6) * torch.sign(det + 1e-12), det)
    inv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2)
    return inv / det[..., None, None]


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize an image batch to size x size (area filter when shrinking, so no aliasing)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    if x.shape[-1] > size:
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True)


def resize_flow(flow: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a (B, h, w, 2) sampling grid to (B, size, size, 2)."""
    if flow.shape[1] == size:
        return flow
    f = flow.permute(0, 3, 1, 2)
    f = F.interpolate(f, size=(size, size), mode="bilinear", align_corners=True)
    return f.permute(0, 2, 3, 1)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Backward warp: output(z) = x(grid(z)); the grid is resized to x's resolution."""
    grid = resize_flow(grid, x.shape[-1])
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


class ConvBlock(nn.Module):
    """conv -> batch norm -> ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2)
        self.norm = nn.BatchNorm2d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(x)))


class DownBlock(nn.Module):
    """ConvBlock then 2x average pooling."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = ConvBlock(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.block(x), 2)


class UpBlock(nn.Module):
    """2x nearest upsampling then ConvBlock."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.block = ConvBlock(cin, cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ResBlock(nn.Module):
    """Pre-activation residual block."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.norm1(x)))
        out = self.conv2(F.relu(self.norm2(out)))
        return x + out


class Hourglass(nn.Module):
    """U-Net encoder/decoder; output has ``in_features + block_expansion`` channels."""

    def __init__(self, block_expansion: int, in_features: int, num_blocks: int, max_features: int) -> None:
        super().__init__()
        def ch(i: int) -> int:
            return min(max_features, block_expansion * 2 ** (i + 1))
        self.down = nn.ModuleList(
            DownBlock(in_features if i == 0 else ch(i - 1), ch(i)) for i in range(num_blocks)
        )
        ups = []
        for i in reversed(range(num_blocks)):
            cin = ch(i) if i == num_blocks - 1 else 2 * ch(i)
            cout = block_expansion if i == 0 else ch(i - 1)
            ups.append(UpBlock(cin, cout))
        self.up = nn.ModuleList(ups)
        self.out_filters = block_expansion + in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]
        for block in self.down:
            skips.append(block(skips[-1]))
        out = skips.pop()
        for block in self.up:
            out = torch.cat([block(out), skips.pop()], dim=1)
        return out
