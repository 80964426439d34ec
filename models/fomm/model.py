"""The motion model: keypoint detector + dense motion + generator, and the 60-dim keypoint vector.

Wire layout of one keypoint vector (length 6K, K = 10 -> 60):
``[x0, y0, x1, y1, ..., x9, y9, J0_00, J0_01, J0_10, J0_11, ..., J9_11]``
coordinates in [-1, 1] (x to the right, y down), Jacobians row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.fomm.config import FommConfig
from models.fomm.dense_motion import DenseMotionNetwork
from models.fomm.generator import Generator
from models.fomm.keypoint_detector import KeypointDetector

Keypoints = dict[str, torch.Tensor]


def kp_to_vector(kp: Keypoints) -> torch.Tensor:
    """{'value': (B,K,2), 'jacobian': (B,K,2,2)} -> (B, 6K)."""
    b = kp["value"].shape[0]
    return torch.cat([kp["value"].reshape(b, -1), kp["jacobian"].reshape(b, -1)], dim=1)


def vector_to_kp(vec: torch.Tensor, num_kp: int = 10) -> Keypoints:
    """(B, 6K) -> {'value': (B,K,2), 'jacobian': (B,K,2,2)}."""
    if vec.shape[-1] != 6 * num_kp:
        raise ValueError(f"keypoint vector must have {6 * num_kp} values, got {vec.shape[-1]}")
    b = vec.shape[0]
    return {
        "value": vec[:, : 2 * num_kp].reshape(b, num_kp, 2),
        "jacobian": vec[:, 2 * num_kp:].reshape(b, num_kp, 2, 2),
    }


@dataclass
class SourceCache:
    """Everything about the source image that does not change during a call."""

    image: torch.Tensor  # (1, 3, H, W)
    kp: Keypoints
    features: list[torch.Tensor]


class MotionModel(nn.Module):
    def __init__(self, config: FommConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.kp_detector = KeypointDetector(
            c.num_kp, c.num_channels, c.temperature, c.kp_block_expansion, c.kp_max_features,
            c.kp_num_blocks, c.motion_size)
        self.dense_motion = DenseMotionNetwork(
            c.num_kp, c.num_channels, c.kp_variance, c.dm_block_expansion, c.dm_max_features,
            c.dm_num_blocks, c.motion_size)
        self.generator = Generator(
            c.num_channels, c.gen_block_expansion, c.gen_max_features, c.gen_num_down_blocks,
            c.gen_num_bottleneck_blocks)

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training path: reconstruct ``driving`` from ``source`` and the keypoints of both."""
        kp_s = self.kp_detector(source)
        kp_d = self.kp_detector(driving)
        motion = self.dense_motion(source, kp_d, kp_s)
        out = self.generator.decode(self.generator.encode(source), motion["deformation"], motion["occlusion"])
        out.update(motion)
        out["kp_source"], out["kp_driving"] = kp_s, kp_d
        return out

    @torch.no_grad()
    def keypoints(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 6K) keypoint vectors."""
        return kp_to_vector(self.kp_detector(frames))

    @torch.no_grad()
    def prepare_source(self, source: torch.Tensor) -> SourceCache:
        """Encode the source image once per call (its keypoints and generator features)."""
        return SourceCache(source, self.kp_detector(source), self.generator.encode(source))

    @torch.no_grad()
    def render(self, cache: SourceCache, kp_vectors: torch.Tensor) -> torch.Tensor:
        """Render one frame per keypoint vector (B, 6K) -> (B, 3, H, W) in [0, 1]."""
        kp_d = vector_to_kp(kp_vectors, self.config.num_kp)
        b = kp_vectors.shape[0]
        kp_s = {k: v.expand(b, *v.shape[1:]) for k, v in cache.kp.items()}
        src = cache.image.expand(b, -1, -1, -1)
        feats = [f.expand(b, -1, -1, -1) for f in cache.features]
        motion = self.dense_motion(src, kp_d, kp_s)
        return self.generator.decode(feats, motion["deformation"], motion["occlusion"])["prediction"]
