"""Shared fixtures: a tiny random motion model on disk, free ports, a real clip."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
DEMO_CLIP = ROOT / "assets" / "demo_face.mp4"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.fomm import FommConfig, MotionModel
    from models.fomm.io import save_motion_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny64.pt"
    save_motion_model(path, MotionModel(FommConfig.tiny(64)), {"model_id": "tiny64"})
    return path


@pytest.fixture
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo_clip() -> Path:
    assert DEMO_CLIP.exists(), "the bundled demo clip is missing"
    return DEMO_CLIP
