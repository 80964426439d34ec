"""Keypoint extraction on the sender: one frame in, one 60-value vector out."""

from __future__ import annotations

import numpy as np
import torch

from models.fomm.model import MotionModel


class KeypointExtractor:
    def __init__(self, model: MotionModel, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.size = model.config.size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the model size -> (60,) float32."""
        if image.shape != (self.size, self.size, 3):
            raise ValueError(f"expected a {self.size}x{self.size} RGB frame, got {image.shape}")
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        return self.model.keypoints(x)[0].cpu().numpy().astype(np.float32)
