"""Configuration of the FOMM motion model.

One dataclass; its fields are the constructor arguments of the three networks.
Motion (keypoints, dense motion, occlusion) is always estimated at
``motion_size`` pixels, whatever the output ``size`` is: keypoints cost the same
on the wire whatever the output resolution, so the expensive part that scales
with resolution is only the generator that warps and refines the source pixels.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class FommConfig:
    size: int = 64  # output frame size (square), 64 / 128 / 256
    motion_size: int = 64  # resolution at which keypoints and dense motion are computed
    num_kp: int = 10
    num_channels: int = 3
    temperature: float = 0.1  # soft-argmax temperature of the keypoint heatmaps
    kp_variance: float = 0.01  # Gaussian width of keypoint heatmaps in dense motion
    # keypoint detector hourglass
    kp_block_expansion: int = 32
    kp_max_features: int = 256
    kp_num_blocks: int = 4
    # dense motion hourglass
    dm_block_expansion: int = 32
    dm_max_features: int = 256
    dm_num_blocks: int = 4
    # generator (U-Net that warps encoder features and source pixels)
    gen_block_expansion: int = 32
    gen_max_features: int = 256
    gen_num_down_blocks: int = 2
    gen_num_bottleneck_blocks: int = 3
    # Resolution of the generator; 0 = the output size. Below the output size, the
    # full-resolution Refiner warps the source pixels and adds the generator's change.
    gen_size: int = 0
    refine_channels: int = 24
    refine_layers: int = 4

    def __post_init__(self) -> None:
        if self.size not in (64, 128, 256):
            raise ValueError(f"size must be 64, 128 or 256, got {self.size}")
        if self.motion_size > self.size or self.size % self.motion_size:
            raise ValueError("motion_size must divide size and be <= size")
        if self.gen_size and (self.gen_size > self.size or self.size % self.gen_size
                              or self.gen_size < self.motion_size):
            raise ValueError("gen_size must divide size and lie between motion_size and size")
        if self.num_kp < 1:
            raise ValueError("num_kp must be >= 1")

    @property
    def kp_dim(self) -> int:
        """Length of one keypoint vector on the wire: (x, y) + 2x2 Jacobian per keypoint."""
        return self.num_kp * 6

    @property
    def generator_size(self) -> int:
        """Resolution the U-Net generator runs at."""
        return self.gen_size or self.size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FommConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown FommConfig keys: {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def tiny(cls, size: int = 64) -> FommConfig:
        """A very small model for fast tests."""
        return cls(
            size=size, motion_size=min(size, 64), kp_block_expansion=8, kp_max_features=32,
            kp_num_blocks=3, dm_block_expansion=8, dm_max_features=32, dm_num_blocks=3,
            gen_block_expansion=8, gen_max_features=32, gen_num_bottleneck_blocks=1,
            gen_size=64 if size == 256 else 0, refine_channels=8, refine_layers=2,
        )
