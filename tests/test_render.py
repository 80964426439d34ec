"""The rendering stage alone: source in, keypoint vectors in, frames out."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.fomm import FommConfig, MotionModel
from receiver.render import Renderer


def test_renderer_matches_the_model_and_needs_a_source() -> None:
    torch.manual_seed(0)
    m = MotionModel(FommConfig.tiny(64)).eval()
    r = Renderer(m)
    with pytest.raises(RuntimeError, match="no source"):
        r.render(np.zeros(60, np.float32))
    src = (np.random.default_rng(0).random((100, 120, 3)) * 255).astype(np.uint8)  # any size: cropped, resized
    r.set_source(src)
    assert r.ready and r.source.shape == (64, 64, 3)
    x = torch.from_numpy(r.source).permute(2, 0, 1)[None].float() / 255
    v = m.keypoints(x)[0].numpy()
    out = r.render(v)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    ref = (m.render(m.prepare_source(x), torch.from_numpy(v)[None])[0].permute(1, 2, 0) * 255).round().byte().numpy()
    assert np.abs(out.astype(int) - ref.astype(int)).max() <= 1
