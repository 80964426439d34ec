"""Rendering stage: the source image plus one keypoint vector in, one RGB frame out."""

from __future__ import annotations

import logging

import numpy as np
import torch

from models.data import center_square
from models.fomm.model import MotionModel, SourceCache

log = logging.getLogger(__name__)


def pick_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class Renderer:
    """Holds one call's source encoding (computed once) and renders frames from keypoints."""

    def __init__(self, model: MotionModel) -> None:
        self.model = model
        self.size = model.config.size
        self.device = next(model.parameters()).device
        self.cache: SourceCache | None = None
        self.source: np.ndarray | None = None

    def set_source(self, image: np.ndarray) -> None:
        """(H, W, 3) uint8 RGB of any size; cropped to a square and resized to the model size."""
        img = center_square(image, self.size)
        x = torch.from_numpy(img).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        self.cache = self.model.prepare_source(x)
        self.source = img

    @property
    def ready(self) -> bool:
        return self.cache is not None

    def render(self, vector: np.ndarray) -> np.ndarray:
        """(60,) keypoint vector -> (size, size, 3) uint8 RGB."""
        if self.cache is None:
            raise RuntimeError("no source image yet")
        v = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32)).to(self.device)[None]
        out = self.model.render(self.cache, v)[0]
        return (out.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()
