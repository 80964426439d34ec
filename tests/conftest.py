"""Shared fixtures: a tiny random motion model on disk, free ports, a real clip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tests import harness

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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
    return harness.free_port()


@pytest.fixture(scope="session")
def demo_clip() -> Path:
    assert harness.DEMO_CLIP.exists(), "the bundled demo clip is missing"
    return harness.DEMO_CLIP
