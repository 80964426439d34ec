"""Save and load motion models."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from models.checkpoint import CheckpointError, load_state, read_checkpoint, save_checkpoint
from models.fomm.config import FommConfig
from models.fomm.model import MotionModel

KIND = "fomm"
WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "fomm_face64.pt"
SHIPPED_SIZES = (64, 128, 256)  # every shipped model shares one frozen keypoint detector


def weights_for_size(size: int) -> Path:
    """The shipped face model that renders at ``size`` x ``size``."""
    if size not in SHIPPED_SIZES:
        raise ValueError(f"no shipped model for size {size}; shipped: {SHIPPED_SIZES}")
    return WEIGHTS_DIR / f"fomm_face{size}.pt"


def detector_id(model: MotionModel) -> str:
    """Short fingerprint of the keypoint detector's weights.

    Keypoints are only meaningful to a renderer trained with the same detector, so
    sender and receiver compare this, not the output size: a 64x64 sender can drive a
    256x256 receiver when they share the detector.
    """
    h = hashlib.sha256()
    for name, t in sorted(model.kp_detector.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to(torch.float16).cpu().numpy().tobytes())
    return "kp-" + h.hexdigest()[:12]


def save_motion_model(path: str | Path, model: MotionModel, meta: dict[str, Any] | None = None,
                      half: bool = True) -> int:
    return save_checkpoint(path, model, KIND, model.config.to_dict(), meta, half=half)


def load_motion_model(path: str | Path | None = None,
                      device: str | torch.device = "cpu") -> tuple[MotionModel, dict[str, Any]]:
    """Load a motion model in eval mode; returns (model, meta)."""
    path = Path(path) if path is not None else DEFAULT_WEIGHTS
    blob = read_checkpoint(path, KIND)
    try:
        config = FommConfig.from_dict(blob["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from e
    model = MotionModel(config)
    load_state(model, blob["state_dict"], path)
    return model.to(device).eval(), blob["meta"]
