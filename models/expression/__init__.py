"""Expression measured from pixels: eye and mouth openings (labels, patches, a regressor and its training)."""

from __future__ import annotations

from pathlib import Path

from models.checkpoint import load_model, save_checkpoint
from models.expression.regressor import OpeningConfig, OpeningNet

KIND = "opening-regressor"
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "openings.pt"


def save_regressor(path: str | Path, net: OpeningNet, meta: dict | None = None) -> int:
    return save_checkpoint(path, net, KIND, net.config.to_dict(), meta)


def load_regressor(path: str | Path = DEFAULT_WEIGHTS) -> tuple[OpeningNet, dict]:
    """The regressor in eval mode and its checkpoint's meta; raises CheckpointError."""
    return load_model(path, KIND, lambda config: OpeningNet(OpeningConfig(**config)))  # type: ignore[return-value]
