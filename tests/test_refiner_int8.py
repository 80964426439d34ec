"""models.expression.refiner_int8: the region refiner's int8 graph from shipped calibration ranges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.expression.refiner_int8 import (
    FLOAT_CONVS,
    calibrate,
    export_refiner,
    graph_feed,
    load_ranges,
    quantise,
    ranges_path,
    refiner_id,
)
from models.expression.region_refiner import DEFAULT_WEIGHTS, RefinerConfig, RegionRefiner, load_refiner, save_refiner
from models.fomm.export import onnx_session

ANCHORS = [9, 4, 5, 0]
GAIN = [0.13, 0.14, 0.31, 0.63]


def _feeds(net: RegionRefiner, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [graph_feed(net, rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8),
                       rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
                       rng.integers(0, 256, (32, 48, 3), dtype=np.uint8),
                       rng.uniform(0, 0.3, 4).astype(np.float32), rng.uniform(0, 0.3, 4).astype(np.float32))
            for _ in range(n)]


def _perturbed(seed: int = 0) -> RegionRefiner:
    torch.manual_seed(seed)
    net = RegionRefiner(RefinerConfig(width=4)).eval()
    with torch.no_grad():
        for p in (*net.eye.out.parameters(), *net.mouth.out.parameters()):
            p.normal_(0, 0.3)
    return net


def test_calibrated_int8_graph_runs_close_to_float32() -> None:
    net = _perturbed()
    ranges = calibrate(net, _feeds(net, 16))
    assert ranges["refiner_id"] == refiner_id(net) and ranges["samples"] == 16
    f32, q8 = onnx_session(export_refiner(net)), onnx_session(quantise(export_refiner(net), ranges))
    for feed in _feeds(net, 4, seed=1):
        a, b = f32.run(None, feed), q8.run(None, feed)
        for x, y in zip(a, b, strict=True):
            assert x.shape == y.shape and np.abs(x - y).max() < 12  # grey levels


def test_ranges_only_quantise_the_refiner_they_were_measured_on(tmp_path: Path) -> None:
    net, other = _perturbed(0), _perturbed(1)
    weights = tmp_path / "refiner.pt"
    save_refiner(weights, net, {"wire_gain": GAIN, "target": "wire"})
    loaded, _ = load_refiner(weights)
    ranges_path(weights).write_text(json.dumps(calibrate(loaded, _feeds(net, 8))))
    assert load_ranges(loaded, weights) is not None
    assert load_ranges(other, weights) is None  # another refiner's weights: float32
    ranges_path(weights).write_text("{not json")
    assert load_ranges(loaded, weights) is None  # unreadable: float32, with a warning


def test_the_shipped_refiner_quantises_and_keeps_its_float_convolutions() -> None:
    import onnx

    net, _ = load_refiner(DEFAULT_WEIGHTS)
    graph = export_refiner(net)
    q8 = quantise(graph, calibrate(net, _feeds(net, 8)))
    convs = {n.name: n for n in onnx.load_from_string(q8).graph.node if n.op_type == "Conv"}
    assert set(FLOAT_CONVS) <= set(convs)
    producers = {o: n for n in onnx.load_from_string(q8).graph.node for o in n.output}
    # a quantised convolution's weights are int8 (DequantizeLinear'd); the float ones' are float32 initialisers
    dq = [c for c, n in convs.items() if producers.get(n.input[1]) is not None
          and producers[n.input[1]].op_type == "DequantizeLinear"]
    assert dq and not set(dq) & set(FLOAT_CONVS)
    a = onnx_session(graph).run(None, _feeds(net, 1, seed=3)[0])
    b = onnx_session(q8).run(None, _feeds(net, 1, seed=3)[0])
    assert all(np.abs(x - y).max() < 12 for x, y in zip(a, b, strict=True))


def test_the_stage_graph_draws_what_the_refiner_draws() -> None:
    """``graph_feed`` + ``StageGraph`` (what the receiver runs) = 255 x window x (``RegionRefiner.forward`` -
    rendered), channels last: the graph's own input planes and output conversion are the refiner's."""
    from models.expression.region_refiner import FEATHER, window

    net = _perturbed(2)
    net.set_open_stats(torch.tensor([0.2, 0.2, 0.3, 0.4]), torch.tensor([0.05, 0.06, 0.1, 0.2]))
    rng = np.random.default_rng(4)
    re, se = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    rm, sm = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8), rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    target, src_open = np.array([0.1, 0.3, 0.5, 0.2], np.float32), np.array([0.25, 0.15, 0.2, 0.6], np.float32)

    def chw(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x).movedim(-1, -3).float()[None] / 255

    with torch.no_grad():
        ref = net(chw(re), chw(se), chw(rm), chw(sm), torch.from_numpy(target)[None], torch.from_numpy(src_open)[None])
    want_eyes = (ref["eyes"][0].movedim(-3, -1).numpy() * 255 - re) * window(32, 32, FEATHER)[..., None]
    want_mouth = (ref["mouth"][0].movedim(-3, -1).numpy() * 255 - rm) * window(48, 32, FEATHER)[..., None]
    feed = graph_feed(net, re, se, rm, sm, target, src_open)
    eyes, mouth = onnx_session(export_refiner(net)).run(None, feed)
    assert np.abs(want_eyes).max() > 5  # the perturbed refiner does change the patches
    assert np.abs(eyes - want_eyes).max() < 1e-3 and np.abs(mouth[0] - want_mouth).max() < 1e-3


def test_quantisation_aware_ranges_make_the_int8_graph_what_training_simulated() -> None:
    """``qat.fake_quantise`` keeps the weights' names; the int8 graph quantised with the ranges it ran with
    (``with_qat_ranges``: every convolution in int8) computes what the simulation computed, closer than the
    float32 graph does."""
    import copy

    from models.expression.qat import fake_quantise, ranges_seen
    from models.expression.refiner_int8 import StageGraph, with_qat_ranges

    net = _perturbed(3)
    sim = copy.deepcopy(net)
    names = fake_quantise(sim)
    assert len(names) == 18 and sim.state_dict().keys() == net.state_dict().keys()
    feeds = _feeds(net, 24)
    sim.train()
    with torch.no_grad():  # the running ranges, as training measures them
        for f in feeds:
            StageGraph(sim)(*(torch.from_numpy(f[k]) for k in f))
    sim.eval()
    qat = ranges_seen(sim)
    assert set(qat) == set(names) and all(lo <= hi for r in qat.values() for lo, hi in (r[:2], r[2:]))
    ranges = with_qat_ranges(net, calibrate(net, feeds[:4]), qat)
    assert ranges["float_convs"] == []
    q8, f32 = onnx_session(quantise(export_refiner(net), ranges)), onnx_session(export_refiner(net))
    to_sim, to_float = [], []
    for f in _feeds(net, 6, seed=9):
        with torch.no_grad():
            s = [t.numpy() for t in StageGraph(sim)(*(torch.from_numpy(f[k]) for k in f))]
        q, fl = q8.run(None, f), f32.run(None, f)
        to_sim += [np.abs(a - b).mean() for a, b in zip(q, s, strict=True)]
        to_float += [np.abs(a - b).mean() for a, b in zip(q, fl, strict=True)]
    assert np.mean(to_sim) < np.mean(to_float)


def test_ranges_that_do_not_fit_the_graph_leave_the_stage_in_float32(tmp_path: Path, caplog) -> None:
    """A ranges file measured on these weights but missing tensors of the graph (another graph version): the
    stage logs it and runs the refiner in float32 instead of failing."""
    from receiver.regions import RegionStage, load_region_weights

    net = _perturbed(4)
    weights = tmp_path / "refiner.pt"
    save_refiner(weights, net, {"wire_gain": GAIN, "target": "wire"})
    loaded, _ = load_refiner(weights)
    ranges = calibrate(loaded, _feeds(loaded, 4))
    data = ranges["ranges"]["data"]
    for name in list(data)[: len(data) // 2]:
        del data[name]
    ranges_path(weights).write_text(json.dumps(ranges))
    parts = load_region_weights(weights)
    assert parts.int8_ranges is not None  # its fingerprint matches: it is read
    stage = RegionStage.of(parts, ANCHORS)
    assert stage.onnx is not None and not stage.onnx.int8
    assert "do not fit" in caplog.text
