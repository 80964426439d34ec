"""The rendering stage alone: source in, keypoint vectors in, frames out."""

from __future__ import annotations

from pathlib import Path

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


def test_shipped_models_share_one_keypoint_detector() -> None:
    """A sender with any shipped model can drive a receiver of any size."""
    from models.fomm.io import SHIPPED_SIZES, detector_id, load_motion_model, weights_for_size

    ids = {detector_id(load_motion_model(weights_for_size(s))[0]) for s in SHIPPED_SIZES
           if weights_for_size(s).exists()}
    assert len(ids) == 1


def test_choose_model_by_size_and_auto() -> None:
    from models.fomm.io import SHIPPED_SIZES, weights_for_size
    from receiver.render import choose_model

    shipped = [s for s in SHIPPED_SIZES if weights_for_size(s).exists()]
    model, _, path = choose_model("64", "cpu")
    assert model.config.size == 64 and path == weights_for_size(64)
    # nothing is fast enough: the smallest; anything is fast enough: the largest
    assert choose_model("auto", "cpu", min_fps=1e9)[0].config.size == min(shipped)
    assert choose_model("auto", "cpu", min_fps=0.0)[0].config.size == max(shipped)
    with pytest.raises(ValueError):
        choose_model("96", "cpu")


@pytest.mark.parametrize("size", [64, 256])
def test_fast_renderer_matches_eager(size: int) -> None:
    """ONNX Runtime renders what eager PyTorch renders (float rounding only)."""
    torch.manual_seed(0)
    m = MotionModel(FommConfig.tiny(size)).eval()
    if m.refiner is not None:
        with torch.no_grad():
            for p in m.refiner.net[-1].parameters():
                p.normal_(0, 0.1)
    src = (np.random.default_rng(1).random((size, size, 3)) * 255).astype(np.uint8)
    eager, fast = Renderer(m), Renderer(m, fast=True)
    eager.set_source(src)
    fast.set_source(src)
    assert fast._fast is not None and eager._fast is None
    assert "_kpcast_onnx" not in dict(m.named_modules())  # the session is not part of the model's weights
    assert all(not k.startswith("_kpcast") for k in m.state_dict())
    x = torch.from_numpy(src).permute(2, 0, 1)[None].float() / 255
    base = m.keypoints(x)[0].numpy()
    for shift in (0.0, 0.05, -0.1):
        v = base.copy()
        v[:20] += shift
        a, b = eager.render(v), fast.render(v)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    # a second call with another source reuses the trace and still renders its own source
    other = Renderer(m, fast=True)
    other.set_source(255 - src)
    assert other._fast is fast._fast
    assert np.abs(other.render(base).astype(int) - fast.render(base).astype(int)).mean() > 10


def test_shipped_256_model_returns_the_source_when_nothing_moves(demo_clip: Path) -> None:
    """Identity motion through the real 256x256 weights: the static-source image is the floor."""
    from models.data import center_square, read_clip
    from models.fomm.io import load_motion_model, weights_for_size

    model, _ = load_motion_model(weights_for_size(256))
    r = Renderer(model, fast=True)
    frames = read_clip(demo_clip, max_frames=40)
    r.set_source(frames[0])
    x = torch.from_numpy(r.source).permute(2, 0, 1)[None].float() / 255
    still = r.render(model.keypoints(x)[0].numpy())
    assert still.shape == (256, 256, 3)
    assert np.abs(still.astype(int) - r.source.astype(int)).max() <= 1
    # and a later frame's keypoints do move pixels (so the check above is not vacuous)
    y = torch.from_numpy(center_square(frames[-1], 256)).permute(2, 0, 1)[None].float() / 255
    moved = r.render(model.keypoints(y)[0].numpy())
    assert np.abs(moved.astype(int) - r.source.astype(int)).mean() > 1.0


def test_without_onnx_runtime_rendering_stays_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    torch.manual_seed(0)
    m = MotionModel(FommConfig.tiny(64)).eval()
    r = Renderer(m, fast=True)
    r.set_source((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
    assert r._fast is None
    v = np.concatenate([np.zeros(20), np.tile([1.0, 0.0, 0.0, 1.0], 10)]).astype(np.float32)
    assert r.render(v).shape == (64, 64, 3)
