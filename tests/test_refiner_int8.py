"""models.expression.refiner_int8: the region refiner's int8 graph from shipped calibration ranges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import center_square, read_clip
from models.expression import load_regressor
from models.expression.refiner_int8 import (
    INPUTS,
    calibrate,
    export_refiner,
    load_ranges,
    planar,
    quantise,
    ranges_path,
    refiner_id,
)
from models.expression.region_refiner import DEFAULT_WEIGHTS, RefinerConfig, RegionRefiner, load_refiner, save_refiner
from models.fomm.export import onnx_session
from receiver.regions import RegionStage
from tests.harness import DEMO_CLIP

ANCHORS = [9, 4, 5, 0]
GAIN = [0.13, 0.14, 0.31, 0.63]


def _feeds(n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [dict(zip(INPUTS, [planar(rng.integers(0, 256, (1, 2, 32, 32, 3), dtype=np.uint8)),
                              planar(rng.integers(0, 256, (1, 2, 32, 32, 3), dtype=np.uint8)),
                              planar(rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)),
                              planar(rng.integers(0, 256, (1, 32, 48, 3), dtype=np.uint8)),
                              rng.uniform(0, 0.3, (1, 4)).astype(np.float32),
                              rng.uniform(0, 0.3, (1, 4)).astype(np.float32)], strict=True)) for _ in range(n)]


def _perturbed(seed: int = 0) -> RegionRefiner:
    torch.manual_seed(seed)
    net = RegionRefiner(RefinerConfig(width=4)).eval()
    with torch.no_grad():
        for p in (*net.eye.out.parameters(), *net.mouth.out.parameters()):
            p.normal_(0, 0.3)
    return net


def test_calibrated_int8_graph_runs_close_to_float32() -> None:
    net = _perturbed()
    ranges = calibrate(net, _feeds(16))
    assert ranges["refiner_id"] == refiner_id(net) and ranges["samples"] == 16
    f32, q8 = onnx_session(export_refiner(net)), onnx_session(quantise(export_refiner(net), ranges))
    for feed in _feeds(4, seed=1):
        a, b = f32.run(None, feed), q8.run(None, feed)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and np.abs(x - y).max() * 255 < 12  # grey levels


def test_ranges_only_quantise_the_refiner_they_were_measured_on(tmp_path: Path) -> None:
    net, other = _perturbed(0), _perturbed(1)
    weights = tmp_path / "refiner.pt"
    save_refiner(weights, net, {"wire_gain": GAIN, "target": "wire"})
    loaded, _ = load_refiner(weights)
    ranges_path(weights).write_text(json.dumps(calibrate(loaded, _feeds(8))))
    assert load_ranges(loaded, weights) is not None
    assert load_ranges(other, weights) is None  # another refiner's weights: float32
    ranges_path(weights).write_text("{not json")
    assert load_ranges(loaded, weights) is None  # unreadable: float32, with a warning


@pytest.mark.skipif(not ranges_path(DEFAULT_WEIGHTS).exists(), reason="no shipped ranges")
def test_the_shipped_stage_runs_int8_within_a_few_grey_levels() -> None:
    net, _ = load_refiner(DEFAULT_WEIGHTS)
    regressor = load_regressor()[0]
    q8, f32 = RegionStage(net, regressor, GAIN, ANCHORS), RegionStage(net, regressor, GAIN, ANCHORS, int8=False)
    assert q8.int8 and not f32.int8
    frames = np.stack([center_square(f, 256) for f in read_clip(DEMO_CLIP, "video", 8)])
    from models.fomm.io import load_motion_model

    model, _ = load_motion_model("models/weights/fomm_face256.pt")
    with torch.no_grad():
        kps = model.keypoints(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0).numpy()
    src_q8, src_f32 = q8.prepare(frames[0], kps[0]), f32.prepare(frames[0], kps[0])
    for f, kp in zip(frames[1:], kps[1:], strict=True):
        a, b = q8.apply(f, kp, src_q8), f32.apply(f, kp, src_f32)
        diff = np.abs(a.astype(np.int16) - b)
        assert diff.mean() < 0.1 and diff.max() <= 10, (diff.mean(), diff.max())  # seen: 0.02 and 5
