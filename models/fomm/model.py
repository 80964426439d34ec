"""The motion model: keypoint detector + dense motion + generator, and the 60-dim keypoint vector.

Wire layout of one keypoint vector (length 6K, K = 10 -> 60):
``[x0, y0, x1, y1, ..., x9, y9, J0_00, J0_01, J0_10, J0_11, ..., J9_11]``
coordinates in [-1, 1] (x to the right, y down), Jacobians row-major.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.fomm.blocks import resize
from models.fomm.config import FommConfig
from models.fomm.dense_motion import DenseMotionNetwork
from models.fomm.generator import Generator
from models.fomm.keypoint_detector import KeypointDetector
from models.fomm.refiner import Refiner

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
    static: torch.Tensor | None = None  # low-res rendering of the source with its own keypoints (Refiner)


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
        self.refiner = (Refiner(c.num_channels, c.refine_channels, c.refine_layers, c.size)
                        if c.generator_size < c.size else None)

    def forward(self, source: torch.Tensor, driving: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training path: reconstruct ``driving`` from ``source`` and the keypoints of both."""
        kp_s = self.kp_detector(source)
        kp_d = self.kp_detector(driving)
        feats = self.generator.encode(resize(source, self.config.generator_size))
        motion = self.dense_motion(source, kp_d, kp_s)
        out = self.generator.decode(feats, motion["deformation"], motion["occlusion"])
        if self.refiner is not None:
            with torch.no_grad():  # a per-call constant at inference, so no gradient here either
                static = self._static(source, kp_s, feats)
            low = out["prediction"]
            out = self.refiner(source, motion["deformation"], motion["occlusion"], low, static)
            out["low"] = low
        out.update(motion)
        out["kp_source"], out["kp_driving"] = kp_s, kp_d
        return out

    def _static(self, source: torch.Tensor, kp_s: Keypoints, feats: list[torch.Tensor]) -> torch.Tensor:
        """The generator's rendering of the source driven by its own keypoints."""
        motion = self.dense_motion(source, kp_s, kp_s)
        return self.generator.decode(feats, motion["deformation"], motion["occlusion"])["prediction"]

    @torch.no_grad()
    def keypoints(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 6K) keypoint vectors."""
        return kp_to_vector(self.kp_detector(frames))

    @torch.no_grad()
    def prepare_source(self, source: torch.Tensor) -> SourceCache:
        """Encode the source image once per call (its keypoints and generator features)."""
        kp = self.kp_detector(source)
        feats = self.generator.encode(resize(source, self.config.generator_size))
        static = self._static(source, kp, feats) if self.refiner is not None else None
        return SourceCache(source, kp, feats, static)

    @torch.no_grad()
    def render(self, cache: SourceCache, kp_vectors: torch.Tensor) -> torch.Tensor:
        """Render one frame per keypoint vector (B, 6K) -> (B, 3, H, W) in [0, 1]."""
        return self.render_tensors(kp_vectors, *cache_tensors(cache))

    def render_tensors(self, kp_vectors: torch.Tensor, image: torch.Tensor, kp_s_vector: torch.Tensor,
                       static: torch.Tensor, *features: torch.Tensor) -> torch.Tensor:
        """``render`` as a function of tensors only, so it can be exported to ONNX (``receiver.render``)."""
        b = kp_vectors.shape[0]
        kp_d = vector_to_kp(kp_vectors, self.config.num_kp)
        kp_s = vector_to_kp(kp_s_vector.expand(b, -1), self.config.num_kp)
        src = image.expand(b, -1, -1, -1)
        feats = [f.expand(b, -1, -1, -1) for f in features]
        motion = self.dense_motion(src, kp_d, kp_s)
        low = self.generator.decode(feats, motion["deformation"], motion["occlusion"])["prediction"]
        if self.refiner is None:
            return low
        out = self.refiner(src, motion["deformation"], motion["occlusion"], low, static.expand(b, -1, -1, -1))
        return out["prediction"].clamp(0.0, 1.0)  # warp + change can overshoot [0, 1] slightly


def cache_tensors(cache: SourceCache) -> tuple[torch.Tensor, ...]:
    """The arguments of ``render_tensors`` after the keypoints: image, source keypoints, static, features."""
    static = cache.static if cache.static is not None else cache.image.new_zeros(1)
    return (cache.image, kp_to_vector(cache.kp), static, *cache.features)
