"""The CPU render graph cut at its warps (models.fomm.fastgraph): same frames as the whole graph, the
source's share once per source, int8 only from ranges measured on the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.data import center_square, read_clip
from models.fomm import FommConfig, MotionModel, fastgraph
from models.fomm.io import SHIPPED_SIZES, load_motion_model, weights_for_size
from models.fomm.model import cache_tensors
from receiver.render import OnnxRender, Renderer
from tests.harness import DEMO_CLIP
from tests.utils import tiny_motion_model


def _tiny(size: int, seed: int = 0) -> MotionModel:
    return tiny_motion_model(size, seed)


def _source(model: MotionModel, seed: int) -> tuple[torch.Tensor, ...]:
    s = model.config.size
    img = torch.from_numpy(np.random.default_rng(seed).random((1, 3, s, s), dtype=np.float32))
    return cache_tensors(model.prepare_source(img))


def _feeds(args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
    return {f"in{i + 1}": a.numpy() for i, a in enumerate(args)}


def _moved(model: MotionModel, args: tuple[torch.Tensor, ...], shift: float) -> torch.Tensor:
    v = args[1].clone()  # the source's own keypoints, moved
    v[:, : 2 * model.config.num_kp] += shift
    return v


@pytest.mark.parametrize("size", [64, 256])
def test_split_graph_renders_what_the_whole_graph_renders(size: int) -> None:
    m = _tiny(size)
    args = _source(m, 0)
    example = (args[1], *args)
    data = fastgraph.export_render(m, example)
    g = fastgraph.SplitGraph(data, threads=1)
    whole = OnnxRender(m, example, 1)
    assert fastgraph.FRAME_INPUT not in g.source.inputs  # nothing per frame in the source stage
    import onnx

    warps = sum(len(s.grid_samples) for s in g.segments)
    # every warp of a frame runs in PyTorch between segments, none is left inside one
    assert warps == sum(n.op_type == "GridSample" for n in onnx.load_from_string(data).graph.node)
    assert all(n.op_type != "GridSample" for s in g.segments for n in s.model.graph.node)
    assert warps >= (7 if m.refiner is not None else 5) and len(g.segments) >= 2
    bound = g.bind(_feeds(args))
    for shift in (0.0, 0.05, -0.1):
        v = _moved(m, args, shift)
        ref = m.render_tensors(v, *args).detach().numpy()
        out = g.run(bound, v.numpy())
        assert out.shape == ref.shape
        assert np.abs(out - ref).max() < 1e-4
        assert np.abs(out - whole(v, *args)).max() < 1e-4


def test_bind_holds_one_source_and_another_bind_another() -> None:
    m = _tiny(64)
    a, b = _source(m, 1), _source(m, 2)
    g = fastgraph.SplitGraph(fastgraph.export_render(m, (a[1], *a)), threads=1)
    ba, bb = g.bind(_feeds(a)), g.bind(_feeds(b))
    v = _moved(m, a, 0.05)
    out_a, out_b = g.run(ba, v.numpy()), g.run(bb, v.numpy())
    assert np.abs(out_a - m.render_tensors(v, *a).detach().numpy()).max() < 1e-4
    assert np.abs(out_b - m.render_tensors(v, *b).detach().numpy()).max() < 1e-4
    assert np.abs(out_a - out_b).mean() > 0.01  # two sources, two pictures


def test_int8_from_calibration_ranges_and_only_for_their_graph() -> None:
    m = _tiny(256)
    args = _source(m, 3)
    data = fastgraph.export_render(m, (args[1], *args))
    rec = fastgraph.SplitGraph(data, threads=1, record=True)
    bound = rec.bind(_feeds(args))
    for shift in np.linspace(-0.1, 0.1, 8):
        rec.run(bound, _moved(m, args, float(shift)).numpy())
    ranges = fastgraph.calibrate(rec)
    assert ranges["fingerprint"] == rec.fingerprint and ranges["segments"]
    json.loads(json.dumps(ranges))  # what is shipped is plain JSON
    q = fastgraph.SplitGraph(data, threads=1, ranges=ranges)
    assert q.int8 and not rec.int8
    assert all(s.quantised == s.has_conv for s in q.segments)
    qb = q.bind(_feeds(args))
    v = _moved(m, args, 0.03)
    ref = m.render_tensors(v, *args).detach().numpy()
    out = q.run(qb, v.numpy())
    assert np.abs(out - ref).mean() < 0.02  # int8 error, not another picture
    other = MotionModel(FommConfig.tiny(64)).eval()
    oargs = _source(other, 0)
    with pytest.raises(ValueError, match="another graph"):
        fastgraph.SplitGraph(fastgraph.export_render(other, (oargs[1], *oargs)), threads=1, ranges=ranges)
    with pytest.raises(ValueError, match="nothing recorded"):
        fastgraph.calibrate(q)


def test_find_ranges_matches_weights_and_config_and_skips_bad_files(tmp_path: Path) -> None:
    m = _tiny(64)
    wid = fastgraph.weights_id(m)
    assert wid != fastgraph.weights_id(_tiny(128))  # same weights at another size are another model
    (tmp_path / "a.int8.json").write_text("{not json")
    (tmp_path / "b.int8.json").write_text(json.dumps({"weights_id": "0" * 16}))
    assert fastgraph.find_ranges(m, tmp_path) is None
    (tmp_path / "c.int8.json").write_text(json.dumps({"weights_id": wid, "segments": {}}))
    assert fastgraph.find_ranges(m, tmp_path)["weights_id"] == wid
    assert fastgraph.ranges_path("models/weights/fomm_face256.pt") == Path("models/weights/fomm_face256.int8.json")


@pytest.mark.parametrize("size", SHIPPED_SIZES)
def test_shipped_weights_ship_their_int8_ranges(size: int) -> None:
    """Retrained weights without a new ``python -m models.fomm.quantize`` fail here, not silently in a call."""
    model, _meta = load_motion_model(weights_for_size(size))
    ranges = fastgraph.find_ranges(model)
    assert ranges is not None, f"no int8 ranges for {weights_for_size(size)}: run python -m models.fomm.quantize"
    assert fastgraph.ranges_path(weights_for_size(size)).exists()
    frames = np.stack([center_square(f, size) for f in read_clip(DEMO_CLIP, max_frames=40)])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
    cache = model.prepare_source(x[:1])
    kp = model.keypoints(x[::8])
    r8, r32 = Renderer(model, fast=True), Renderer(model, fast=True, int8=False)
    for r in (r8, r32):
        r.set_source(frames[0])
    assert r8._fast is not None and r8._fast.int8 and not r32._fast.int8
    for v in kp.numpy():
        eager = (model.render(cache, torch.from_numpy(v)[None])[0].permute(1, 2, 0).numpy() * 255)
        a, b = r8.render(v).astype(np.float32), r32.render(v).astype(np.float32)
        assert np.abs(b - eager).max() <= 2  # fp32: rounding only
        assert np.abs(a - eager).mean() < 2.0  # int8: under 1 % of the range on average


def test_cached_graph_is_reused_and_a_damaged_one_rebuilt(tmp_path: Path) -> None:
    m = _tiny(256)
    args = _source(m, 4)
    example = (args[1], *args)
    built = fastgraph.cached_graph(m, example, 1, None, tmp_path)
    files = list(tmp_path.glob("render-256-*.npz"))
    assert len(files) == 1
    loaded = fastgraph.cached_graph(m, example, 1, None, tmp_path)  # from the file: no export
    assert loaded.source.model is None and loaded.fingerprint == built.fingerprint
    v = _moved(m, args, 0.05).numpy()
    a, b = built.run(built.bind(_feeds(args)), v), loaded.run(loaded.bind(_feeds(args)), v)
    assert np.array_equal(a, b)
    other = _tiny(256)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)  # other weights: another file, never the first one's graph
    fastgraph.cached_graph(other, example, 1, None, tmp_path)
    assert len(list(tmp_path.glob("render-256-*.npz"))) == 2
    files[0].write_bytes(b"PK\x03\x04 not a graph")
    with pytest.raises(ValueError, match="damaged"):
        fastgraph.SplitGraph.load(files[0])
    again = fastgraph.cached_graph(m, example, 1, None, tmp_path)  # rebuilt, and the file rewritten
    assert again.source.model is not None
    assert fastgraph.SplitGraph.load(files[0]).fingerprint == built.fingerprint
    ro = tmp_path / "ro"
    ro.write_text("a file where the cache folder should be")
    assert fastgraph.cached_graph(m, example, 1, None, ro).fingerprint == built.fingerprint  # built in memory
