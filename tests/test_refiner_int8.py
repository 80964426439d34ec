"""models.expression.refiner_int8: the region refiner's int8 graph from shipped calibration ranges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.expression.refiner_int8 import (
    FLOAT_CONVS,
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


def test_the_shipped_refiner_quantises_and_keeps_its_float_convolutions() -> None:
    import onnx

    net, _ = load_refiner(DEFAULT_WEIGHTS)
    graph = export_refiner(net)
    q8 = quantise(graph, calibrate(net, _feeds(8)))
    convs = {n.name: n for n in onnx.load_from_string(q8).graph.node if n.op_type == "Conv"}
    assert set(FLOAT_CONVS) <= set(convs)
    producers = {o: n for n in onnx.load_from_string(q8).graph.node for o in n.output}
    # a quantised convolution reads a DequantizeLinear'd input; the float ones read float tensors
    dq = [c for c, n in convs.items() if producers.get(n.input[0]) is not None
          and producers[n.input[0]].op_type == "DequantizeLinear"]
    assert dq and not set(dq) & set(FLOAT_CONVS)
    a = onnx_session(graph).run(None, _feeds(1, seed=3)[0])
    b = onnx_session(q8).run(None, _feeds(1, seed=3)[0])
    assert all(np.abs(x - y).max() * 255 < 12 for x, y in zip(a, b, strict=True))
