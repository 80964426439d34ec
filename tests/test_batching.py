"""Concurrent calls' frames in one run (models.fomm.batchgraph, receiver.batching): every call gets
the frame it would have got alone, batches form while the worker is busy, a failing frame fails
only its own call."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from models.fomm import MotionModel
from models.fomm.batchgraph import BatchGraph
from models.fomm.io import load_motion_model, weights_for_size
from models.fomm.model import cache_tensors
from receiver.batching import RenderBatcher, plan
from receiver.render import Renderer, RenderJob, run_jobs
from receiver.tiers import TieredRenderer
from tests.harness import ROOT
from tests.utils import tiny_motion_model


def _tiny(size: int, seed: int = 0) -> MotionModel:
    return tiny_motion_model(size, seed)


def _image(size: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((size, size, 3)) * 255).astype(np.uint8)


def _vector(r: Renderer, shift: float) -> np.ndarray:
    v = cache_tensors(r.cache)[1][0].numpy().copy()  # the source's own keypoints, moved
    v[: 2 * r.model.config.num_kp] += shift
    return v


def _renderers(model: MotionModel, n: int, fast: bool) -> list[Renderer]:
    out = []
    for i in range(n):
        r = Renderer(model, fast=fast, int8=False)
        r.set_source(_image(model.config.size, 10 + i))
        out.append(r)
    return out


@pytest.mark.parametrize("size", [64, 256])
def test_batch_graph_renders_each_call_as_alone(size: int) -> None:
    m = _tiny(size)
    calls = _renderers(m, 3, fast=True)
    fast = calls[0]._fast
    assert all(r._fast is fast for r in calls)  # one graph per model serves every call
    graph = fast.batch_graph(3, wait=True)
    assert isinstance(graph, BatchGraph) and graph.batch == 3
    assert any(graph.stack.values())  # the sources really are stacked, not one shared
    vecs = [_vector(r, 0.05 * (i + 1)) for i, r in enumerate(calls)]
    alone = np.stack([r.render(v) for r, v in zip(calls, vecs, strict=True)]).astype(np.int16)
    jobs = [r.job(v) for r, v in zip(calls, vecs, strict=True)]
    together = np.stack(run_jobs(jobs, max_batch=4)).astype(np.int16)
    assert together.shape == alone.shape
    assert np.abs(together - alone).max() <= 1  # uint8 rounding of float-equal frames
    assert len({a.tobytes() for a in alone}) == 3  # three different pictures, not one repeated
    with pytest.raises(ValueError, match="batch-3"):
        graph.run([calls[0]._bound] * 2, np.zeros((2, m.config.kp_dim), np.float32))


def test_shipped_int8_ranges_quantise_the_batch_graph() -> None:
    m, _ = load_motion_model(weights_for_size(64), "cpu")
    calls = []
    for i in range(2):
        r = Renderer(m, fast=True, int8=True)
        r.set_source(_image(64, 20 + i))
        calls.append(r)
    assert calls[0]._fast.int8
    graph = calls[0]._fast.batch_graph(2, wait=True)
    assert graph is not None and graph.graph.int8  # batch-1 ranges fit: same nodes, larger shapes
    vecs = [_vector(r, 0.03 * (i + 1)) for i, r in enumerate(calls)]
    alone = np.stack([r.render(v) for r, v in zip(calls, vecs, strict=True)]).astype(np.int16)
    together = np.stack(run_jobs([r.job(v) for r, v in zip(calls, vecs, strict=True)], 4)).astype(np.int16)
    assert np.abs(together - alone).mean() < 0.5 and np.abs(together - alone).max() <= 8


def test_eager_frames_batch_and_other_models_render_apart() -> None:
    a, b = _tiny(64, 0), _tiny(64, 1)
    calls = _renderers(a, 2, fast=False) + _renderers(b, 1, fast=False)
    vecs = [_vector(r, 0.04 * (i + 1)) for i, r in enumerate(calls)]
    jobs = [r.job(v) for r, v in zip(calls, vecs, strict=True)]
    assert jobs[0].key == jobs[1].key != jobs[2].key
    together = run_jobs(jobs, max_batch=4)
    for r, v, f in zip(calls, vecs, together, strict=True):
        assert np.abs(f.astype(np.int16) - r.render(v).astype(np.int16)).max() <= 1


def test_tiered_frames_come_out_at_display_size() -> None:
    models = {64: _tiny(64), 256: _tiny(256)}
    # one detector for both tiers, as the shipped ones have
    models[256].kp_detector.load_state_dict(models[64].kp_detector.state_dict())
    t = TieredRenderer(models, {64: 1.0, 256: 4.0}, start=64, fast=True, int8=False)
    t.use(t.prepare(_image(256, 3)))
    v = cache_tensors(t.renderers[64].cache)[1][0].numpy()
    frame = run_jobs([t.job(v)], 4)[0]
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8
    assert np.array_equal(frame, t.render(v))


class _Failing(RenderJob):
    def run(self, narrow: bool = False) -> np.ndarray:
        raise RuntimeError("this call's frame cannot render")


def test_batcher_batches_what_queues_while_busy_and_isolates_a_failure() -> None:
    m = _tiny(64)
    calls = _renderers(m, 4, fast=True)
    calls[0]._fast.batch_graph(3, wait=True)
    vecs = [_vector(r, 0.02 * (i + 1)) for i, r in enumerate(calls)]
    alone = [r.render(v) for r, v in zip(calls, vecs, strict=True)]
    gate = threading.Event()

    async def main() -> tuple[list, RenderBatcher]:
        with ThreadPoolExecutor(1) as ex:
            batcher = RenderBatcher(ex, max_batch=4)
            # the worker is busy with a first frame while three more calls ask for theirs
            first = asyncio.ensure_future(batcher.render(RenderJob(
                vecs[0][None], lambda f: (gate.wait(10), alone[0])[1], fast=None, model=m, args=calls[0]._args)))
            await asyncio.sleep(0.05)
            rest = [asyncio.ensure_future(batcher.render(r.job(v))) for r, v in zip(calls[1:], vecs[1:], strict=True)]
            bad = asyncio.ensure_future(batcher.render(_Failing(vecs[0][None], model=_tiny(64, 5),
                                                                args=calls[0]._args)))
            await asyncio.sleep(0.05)
            gate.set()
            out = await asyncio.gather(first, *rest, bad, return_exceptions=True)
            return out, batcher

    out, batcher = asyncio.run(main())
    assert isinstance(out[-1], RuntimeError)  # the failing call gets its error ...
    for got, want in zip(out[:4], alone, strict=True):  # ... every other call its own frame
        assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1
    # one run for the first frame, one for the four that queued behind it
    assert dict(batcher.batches) == {1: 1, 4: 1}


def test_batcher_serves_a_call_that_hung_up_nothing() -> None:
    m = _tiny(64)
    (r,) = _renderers(m, 1, fast=True)
    v = _vector(r, 0.01)

    async def main() -> np.ndarray:
        with ThreadPoolExecutor(1) as ex:
            batcher = RenderBatcher(ex, max_batch=4)
            gone = asyncio.ensure_future(batcher.render(r.job(v)))
            await asyncio.sleep(0)
            gone.cancel()  # its call hung up while the frame was rendering
            return await batcher.render(r.job(v))  # the next one is still served

    assert np.array_equal(asyncio.run(main()), r.render(v))


def test_split_and_batch_graph_share_the_calibration_fingerprint() -> None:
    m = _tiny(64)
    r = _renderers(m, 1, fast=True)[0]
    single = r._fast.graph
    graph = r._fast.batch_graph(2, wait=True)
    assert graph is not None and graph.graph is not single
    assert graph.graph.fingerprint == single.fingerprint


def test_plan_keeps_one_graph_together_and_eager_apart() -> None:
    a, b = object(), object()
    kp = np.zeros((1, 60), np.float32)
    jobs = [RenderJob(kp, fast=a), RenderJob(kp, fast=b), RenderJob(kp, fast=a), RenderJob(kp, model=object())]
    assert plan(jobs, 1) == [[0, 1, 2, 3]]
    two = plan(jobs, 2)
    assert two[0] == [3] and sorted(two[1]) == [0, 1, 2]  # eager on one worker, the graphs on the other
    three = plan(jobs, 3)
    assert three[0] == [3] and sorted(map(sorted, three[1:])) == [[0, 2], [1]]  # jobs of a graph stay together
    same = [RenderJob(kp, fast=a) for _ in range(4)]
    assert sorted(map(len, plan(same, 2))) == [2, 2]
    assert plan(same[:1], 4) == [[0]]


def test_two_workers_render_calls_side_by_side_on_single_threaded_graphs() -> None:
    m = _tiny(64, 2)
    calls = _renderers(m, 4, fast=True)
    calls[0]._fast.batch_graph(2, wait=True)
    vecs = [_vector(r, 0.02 * (i + 1)) for i, r in enumerate(calls)]
    alone = [r.render(v) for r, v in zip(calls, vecs, strict=True)]

    async def main() -> tuple[list, RenderBatcher]:
        with ThreadPoolExecutor(2) as ex:
            batcher = RenderBatcher(ex, max_batch=4, workers=2)
            two = await asyncio.gather(*(batcher.render_counted(r.job(v), r)
                                         for r, v in zip(calls[:2], vecs[:2], strict=True)))
            four = await asyncio.gather(*(batcher.render_counted(r.job(v), r)
                                          for r, v in zip(calls, vecs, strict=True)))
            return two + four, batcher

    out, batcher = asyncio.run(main())
    assert dict(batcher.batches) == {2: 1, 4: 1}
    # two frames: one per worker, each on the single-threaded copy of the graph
    assert [n for _, n in out[:2]] == [1, 1] and calls[0]._fast._narrow is not None
    assert [n for _, n in out[2:]] == [2, 2, 2, 2]  # four: a batch of two on each worker
    for (got, _), want in zip(out, alone[:2] + alone, strict=True):
        assert np.abs(got.astype(np.int16) - want.astype(np.int16)).max() <= 1


def test_batch_graphs_built_at_once_all_succeed() -> None:
    """The background builds of several batch sizes overlap (calls join one after another); the
    exporter's process-wide state once broke all but one of them, leaving those sizes unbatched."""
    from receiver.render import FastRender

    model = _tiny(64)
    cache = model.prepare_source(torch.rand(1, 3, 64, 64))
    args = cache_tensors(cache)
    fast = FastRender(model, (model.keypoints(cache.image), *args), 1, int8=False, cache_dir=None)  # export each
    for b in (2, 3, 4):
        fast.batch_graph(b)  # each starts its own build thread
    assert all(fast.batch_graph(b, wait=True) is not None for b in (2, 3, 4))


def test_receiver_process_exits_cleanly_while_a_batch_graph_builds(tmp_path) -> None:
    """A build thread still inside ONNX Runtime at interpreter exit aborted the process (SIGABRT,
    'terminate called without an active exception'): a receiver stopped right after its calls."""
    import subprocess
    import sys

    script = tmp_path / "exit_while_building.py"
    script.write_text(
        "import torch\n"
        "from tests.utils import tiny_motion_model\n"
        "from receiver.render import fast_render\n"
        "m = tiny_motion_model(64)\n"
        "fast = fast_render(m, m.prepare_source(torch.rand(1, 3, 64, 64)))\n"
        "assert fast is not None\n"
        "fast.batch_graph(3)\n"
        "fast.batch_graph(4)\n"  # exits while both build
    )
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "terminate called" not in res.stderr


def test_batch_sizes_for_are_the_ones_plan_asks_for() -> None:
    from receiver.batching import batch_sizes_for

    a = object()
    kp = np.zeros((1, 60), np.float32)
    for calls, workers, max_batch in [(4, 2, 4), (4, 1, 4), (4, 4, 4), (8, 2, 3), (1, 2, 4)]:
        asked = {min(len(g), max_batch) for n in range(1, calls + 1)
                 for g in plan([RenderJob(kp, fast=a) for _ in range(n)], workers)} - {1}
        assert batch_sizes_for(calls, max_batch, workers) == sorted(asked), (calls, workers, max_batch)


def test_prewarm_builds_the_concurrent_call_graphs_before_any_call() -> None:
    from receiver.render import measure_render_fps, prewarm_concurrent

    model = _tiny(64, 3)
    assert prewarm_concurrent(model, [2], int8=False) == 0.0  # no fast renderer yet: nothing to warm
    measure_render_fps(model, frames=1, warmup=1, rounds=1, int8=False)  # what the receiver does at start
    fast = model.__dict__["_kpcast_fast_0"]
    assert fast._narrow is None and not fast._batch
    assert prewarm_concurrent(model, [2, 3], int8=False) > 0
    assert fast._narrow is not None and fast.batch_graph(2) is not None and fast.batch_graph(3) is not None
