"""Keypoint extraction on the sender: one frame in, one 60-value vector out."""

from __future__ import annotations

import cv2
import numpy as np
import torch

from models.fomm.model import MotionModel


class KeypointExtractor:
    def __init__(self, model: MotionModel, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.size = model.config.motion_size  # the detector's input size

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 RGB square of any size -> (60,) float32.

        The frame is shrunk to the detector's size here (area filter, as the training
        frames were), so a 256x256 capture costs the detector no more than a 64x64 one.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
            raise ValueError(f"expected a square RGB frame, got {image.shape}")
        if image.shape[0] != self.size:
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        return self.model.keypoints(x)[0].cpu().numpy().astype(np.float32)
