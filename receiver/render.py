"""Rendering stage: the source image plus one keypoint vector in, one RGB frame out.

A frame to render is a :class:`RenderJob`; :func:`run_jobs` renders a list of them (batched where a
batch graph exists). Which jobs run together, and when, is ``receiver.batching``'s plan."""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from models.checkpoint import CheckpointError
from models.data import center_square
from models.fomm import fastgraph
from models.fomm.batchgraph import BatchGraph
from models.fomm.export import onnx_session
from models.fomm.io import SHIPPED_SIZES, detector_id, load_motion_model, weights_for_size
from models.fomm.model import MotionModel, SourceCache, cache_tensors, kp_to_vector
from receiver.regions import RegionCounts, RegionSource, RegionStage

log = logging.getLogger(__name__)

# Built render graphs (models.fomm.fastgraph.cached_graph), so a receiver does not export and
# quantise every tier at every start; named by everything a graph depends on.
RENDER_CACHE_DIR = fastgraph.CACHE_DIR


def pick_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def to_image(frame: np.ndarray) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8 RGB, C-contiguous.

    Contiguous because every consumer needs it so: a transposed view (what ``transpose`` gives) made
    OpenCV copy the whole frame on each call, ~0.7 ms a frame in the region stage's patch cutting alone."""
    x = np.clip(frame, 0.0, 1.0)  # a new array: scaled and rounded in place below
    x *= 255.0
    np.rint(x, out=x)
    planes = x.astype(np.uint8)
    return cv2.merge(list(planes)) if planes.shape[0] == 3 else np.ascontiguousarray(planes.transpose(1, 2, 0))


@dataclass(frozen=True)
class RenderJob:
    """One frame to render: a keypoint vector against one call's prepared source.

    Exactly one of ``fast`` (with ``bound``, the source's share of its graph) and ``model`` (with
    ``args``, ``render_tensors``' source arguments) is set. ``finish`` turns the (3, H, W) float
    frame into what the call shows (uint8, at its display size).
    """

    keypoints: np.ndarray  # (1, 6K) float32
    finish: Callable[[np.ndarray], np.ndarray] = to_image
    fast: FastRender | None = None
    bound: dict[str, np.ndarray] | None = None
    model: MotionModel | None = None
    args: tuple[torch.Tensor, ...] = ()

    def then(self, step: Callable[[np.ndarray], np.ndarray]) -> RenderJob:
        """The same job with ``step`` applied to its finished frame."""
        first = self.finish
        return replace(self, finish=lambda frame: step(first(frame)))

    @property
    def key(self) -> tuple[str, int]:
        """Jobs with the same key can run as one batch."""
        return ("fast", id(self.fast)) if self.fast is not None else ("eager", id(self.model))

    def run(self, narrow: bool = False) -> np.ndarray:
        """This frame alone (batch 1); ``narrow``: on one thread (``FastRender.narrow``)."""
        return self.finish(_run_group([self], None, narrow)[0])


def _run_group(jobs: list[RenderJob], fast_batch: Any, narrow: bool = False) -> list[np.ndarray]:
    """(3, H, W) float frames of jobs sharing one key, in one run when ``len(jobs) > 1`` (``fast_batch``:
    their ``BatchGraph``)."""
    head = jobs[0]
    kps = np.concatenate([j.keypoints for j in jobs])
    if head.fast is not None:
        if len(jobs) == 1:
            return list(head.fast(head.bound, kps, narrow))
        return list(fast_batch.run([j.bound for j in jobs], kps))
    model = head.model
    device = next(model.parameters()).device
    args = [torch.cat([j.args[i] for j in jobs]) if head.args[i].dim() > 1 else head.args[i]
            for i in range(len(head.args))]
    with torch.no_grad():
        out = model.render_tensors(torch.from_numpy(kps).to(device), *args)
    return list(out.cpu().numpy())


def run_jobs(jobs: list[RenderJob], max_batch: int, narrow: bool = False) -> list[np.ndarray | BaseException]:
    """Render ``jobs`` (on a render worker): batched where a batch graph exists, else one by one;
    ``narrow``: on single-threaded graphs (other workers render beside this one). A job that fails
    gets its exception in its place, the others their frames."""
    return [r for r, _ in run_sized(jobs, max_batch, narrow)]


def run_sized(jobs: list[RenderJob], max_batch: int,
              narrow: bool = False) -> list[tuple[np.ndarray | BaseException, int]]:
    """``run_jobs``, each result with the number of frames it was rendered together with (itself included)."""
    results: list[tuple[np.ndarray | BaseException, int] | None] = [None] * len(jobs)
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for i, j in enumerate(jobs):
        groups[j.key].append(i)
    for idx in groups.values():
        for start in range(0, len(idx), max(1, max_batch)):
            chunk = idx[start:start + max(1, max_batch)]
            head = jobs[chunk[0]]
            graph = head.fast.batch_graph(len(chunk)) if head.fast is not None and len(chunk) > 1 else None
            batched = len(chunk) > 1 and (head.fast is None or graph is not None)
            try:
                if batched:
                    frames = _run_group([jobs[i] for i in chunk], graph)
                    for i, f in zip(chunk, frames, strict=True):
                        results[i] = (jobs[i].finish(f), len(chunk))
                    continue
            except Exception as e:  # a batch that fails renders again one by one
                log.warning("batched render of %d frames failed (%s); rendering them one by one", len(chunk), e)
            for i in chunk:
                try:
                    results[i] = (jobs[i].run(narrow), 1)
                except Exception as e:  # handed to the call that asked for it
                    results[i] = (e, 1)
    return results  # type: ignore[return-value]


class OnnxRender:
    """``model.render`` exported to ONNX and run whole by ONNX Runtime (CPU), batch 1.

    The receiver's fast path until ``FastRender`` (kept as the baseline ``bench.render_speed``
    compares against): 256x256 rendered 1.4-1.5x faster than eager PyTorch. One session per
    model serves every call (it is kept on the model). Spinning is off: the sender, aiortc and
    the event loop share the same cores.
    """

    def __init__(self, model: MotionModel, example: tuple[torch.Tensor, ...], threads: int) -> None:
        self.session = onnx_session(fastgraph.export_render(model, example), threads)
        names = [f"in{i}" for i in range(len(example))]
        used = {i.name for i in self.session.get_inputs()}  # unused inputs are pruned from the graph
        self._keep = [i for i, n in enumerate(names) if n in used]
        self._names = [names[i] for i in self._keep]

    def __call__(self, *args: torch.Tensor) -> np.ndarray:
        """The arguments of ``MotionModel.render_tensors``; returns (1, 3, H, W) float32 in [0, 1]."""
        feeds = {n: args[i].detach().cpu().numpy() for n, i in zip(self._names, self._keep, strict=True)}
        return self.session.run(None, feeds)[0]


def onnx_render(model: MotionModel, cache: SourceCache) -> OnnxRender | None:
    """The model's shared whole-graph ONNX Runtime renderer, built on first use; None if it cannot
    be built."""
    if "_kpcast_onnx" in model.__dict__:
        return model.__dict__["_kpcast_onnx"]
    example = (model.keypoints(cache.image), *cache_tensors(cache))
    try:
        fast: OnnxRender | None = OnnxRender(model, example, torch.get_num_threads())
        for _ in range(2):
            fast(*example)
    except Exception as e:  # any exporter/runtime failure must leave eager rendering working
        log.warning("ONNX Runtime renderer unavailable (%s)", e)
        fast = None
    object.__setattr__(model, "_kpcast_onnx", fast)  # not a registered submodule: no state_dict entry
    return fast


class FastRender:
    """The receiver's CPU renderer: ``models.fomm.fastgraph.SplitGraph`` of the model's render graph.

    ONNX Runtime runs everything but the warps (PyTorch's ``grid_sample`` is 5-7x faster than
    ONNX Runtime's), the source's share of the graph runs once per source (``bind``), and with the
    shipped calibration ranges of these exact weights (``models/weights/*.int8.json``, found by
    the weights' fingerprint) the convolutions run in int8. ``bench.render_speed`` measures it
    against ``OnnxRender`` side by side; ``bench.quality`` / ``bench.expression`` its cost.

    A lone frame renders with ``threads`` intra-op threads; frames of several calls render side by
    side on single-threaded copies of the graph (``narrow``, ``receiver.batching``), since these
    small convolutions barely use a second core (in a one-off timing on 2 cores: 2 threads rendered
    64x64 at 1.0x and 256x256 at 1.14x the rate of 1 thread, two 1-thread renders side by side at
    ~1.9x; bench.concurrency measures what it gives a receiver).
    """

    def __init__(self, model: MotionModel, example: tuple[torch.Tensor, ...], threads: int, int8: bool,
                 cache_dir: Path | None = RENDER_CACHE_DIR) -> None:
        ranges = fastgraph.find_ranges(model) if int8 else None
        if int8 and ranges is None:
            log.info("no int8 calibration ranges for these %dx%d weights: float32 render graph",
                     model.config.size, model.config.size)
        self.graph = fastgraph.cached_graph(model, example, threads, ranges, cache_dir)
        self.int8 = self.graph.int8
        self._build_args = (model, example, ranges, cache_dir)
        self._lock = threading.Lock()
        self._narrow: fastgraph.SplitGraph | None = None
        self._batch: dict[int, BatchGraph | None] = {}  # None: tried, cannot be built
        self._building: set[int] = set()

    def bind(self, args: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        """A source's share of the graph (``cache_tensors``), computed once per source image."""
        return self.graph.bind({f"in{i + 1}": a.detach().cpu().numpy() for i, a in enumerate(args)})

    def __call__(self, bound: dict[str, np.ndarray], keypoints: np.ndarray, narrow: bool = False) -> np.ndarray:
        """(1, 6K) float32 keypoints -> (1, 3, H, W) float32; ``narrow``: on one thread."""
        return (self.narrow() if narrow else self.graph).run(bound, keypoints)

    def narrow(self) -> fastgraph.SplitGraph:
        """The graph on one intra-op thread, for renders side by side (made on first use, ~0.1 s)."""
        with self._lock:
            if self._narrow is None:
                self._narrow = self.graph.with_threads(1)
            return self._narrow

    def batch_graph(self, batch: int, wait: bool = False) -> BatchGraph | None:
        """The single-threaded graph rendering ``batch`` calls' frames at once (``receiver.batching``),
        or None while it is being built (in the background, started by the first ask; ``wait``: build
        it now) or when it cannot be built."""
        with self._lock:
            if batch in self._batch:
                return self._batch[batch]
            start = batch not in self._building
            self._building.add(batch)
        if wait:
            return self._build_batch(batch) if start else self._wait_batch(batch)
        if start:
            # Not a daemon: the interpreter waits for a build at exit. A daemon thread still inside
            # ONNX Runtime when the process exits aborts it ("terminate called without an active
            # exception", SIGABRT: a receiver stopped while a batch graph was being built).
            threading.Thread(target=self._build_batch, args=(batch,), name=f"batch-graph-{batch}").start()
        return None

    def _build_batch(self, batch: int) -> BatchGraph | None:
        t0 = time.perf_counter()
        model, example, ranges, cache_dir = self._build_args
        try:
            graph: BatchGraph | None = BatchGraph.build(model, example, self.graph, batch, 1, ranges, cache_dir)
            log.info("%dx%d batch-%d render graph ready in %.1f s", model.config.size, model.config.size, batch,
                     time.perf_counter() - t0)
        except Exception as e:  # without it the frames render one by one, as before
            log.warning("no batch-%d render graph for %dx%d (%s)", batch, model.config.size, model.config.size, e)
            graph = None
        with self._lock:
            self._batch[batch] = graph
            self._building.discard(batch)
        return graph

    def _wait_batch(self, batch: int) -> BatchGraph | None:
        while True:
            with self._lock:
                if batch in self._batch:
                    return self._batch[batch]
            time.sleep(0.01)


def _fast_key(int8: bool) -> str:
    """Where ``fast_render`` keeps a model's shared ``FastRender``."""
    return f"_kpcast_fast_{int(int8)}"


def fast_render(model: MotionModel, cache: SourceCache, int8: bool = True) -> FastRender | None:
    """The model's shared ``FastRender`` (one per model and ``int8``), built on first use; None if it
    cannot be built (then rendering stays eager)."""
    key = _fast_key(int8)
    if key in model.__dict__:
        return model.__dict__[key]
    args = cache_tensors(cache)
    example = (model.keypoints(cache.image), *args)
    try:
        fast: FastRender | None = FastRender(model, example, torch.get_num_threads(), int8)
        bound = fast.bind(args)
        for _ in range(2):
            fast(bound, example[0].numpy())
    except Exception as e:  # any exporter/runtime failure must leave eager rendering working
        log.warning("ONNX Runtime renderer unavailable (%s); rendering with eager PyTorch", e)
        fast = None
    object.__setattr__(model, key, fast)  # not a registered submodule: no state_dict entry
    return fast


def prewarm_concurrent(model: MotionModel, batches: list[int], int8: bool = True) -> float:
    """Build (or load from the cache) the graphs concurrent calls render with: the single-threaded
    ``FastRender.narrow`` and the ``batches`` batch graphs, before any call; returns the seconds it took.

    Built on demand, they came while the calls were starting: bench.concurrency's four calls all
    stalled (100-200 ms gaps) in their first 0.3 s, while the narrow and batch-2 graphs were made
    beside the calls' first renders. Does nothing when the model renders eagerly (no ``FastRender``
    was built: ``measure_render_fps`` builds it)."""
    fast = model.__dict__.get(_fast_key(int8))
    if fast is None or not batches:
        return 0.0
    t0 = time.perf_counter()
    fast.narrow()
    for b in batches:
        fast.batch_graph(b, wait=True)
    return time.perf_counter() - t0


@dataclass(frozen=True)
class PreparedSource:
    """An encoded source image (``Renderer.prepare``), ready to be switched to."""

    image: np.ndarray  # (size, size, 3) uint8 RGB
    cache: SourceCache
    args: tuple[torch.Tensor, ...]
    fast: FastRender | None
    bound: dict[str, np.ndarray] | None  # the source's share of the fast graph (FastRender.bind)
    regions: RegionSource | None = None  # what the region stage needs of it (with --refine-regions)


def source_vector(cache: SourceCache) -> np.ndarray:
    """The (60,) keypoint vector of a prepared source image."""
    return kp_to_vector(cache.kp)[0].detach().cpu().numpy().astype(np.float32)


class Renderer:
    """Holds one call's source encoding (computed once) and renders frames from keypoints.

    ``fast`` (CPU only): render through ONNX Runtime (``FastRender``) instead of eager PyTorch;
    ``int8``: with the shipped int8 calibration ranges when these weights have them; ``regions``: the
    region stage (``receiver.regions``) applied to every frame, its frames counted in ``region_counts``.
    """

    def __init__(self, model: MotionModel, fast: bool = False, int8: bool = True,
                 regions: RegionStage | None = None) -> None:
        self.model = model
        self.size = model.config.size
        self.device = next(model.parameters()).device
        self.fast = fast and self.device.type == "cpu"
        self.cache: SourceCache | None = None
        self.source: np.ndarray | None = None
        self.detector_id = detector_id(model)
        self._args: tuple[torch.Tensor, ...] = ()
        self.int8 = int8
        self._fast: FastRender | None = None
        self._bound: dict[str, np.ndarray] | None = None
        self.regions = regions
        self.region_counts = RegionCounts() if regions is not None else None
        self._region_source: RegionSource | None = None

    def set_source(self, image: np.ndarray) -> None:
        """(H, W, 3) uint8 RGB of any size; cropped to a square and resized to the model size."""
        self.use(self.prepare(image))

    def prepare(self, image: np.ndarray) -> PreparedSource:
        """Encode a source image without using it yet (a call switches to it when its keypoints are due)."""
        img = center_square(image, self.size)
        x = torch.from_numpy(img).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        cache = self.model.prepare_source(x)
        args = cache_tensors(cache)
        fast = fast_render(self.model, cache, self.int8) if self.fast else None
        regions = self.regions.prepare(img, source_vector(cache)) if self.regions is not None else None
        return PreparedSource(img, cache, args, fast, fast.bind(args) if fast is not None else None, regions)

    def use(self, prepared: PreparedSource) -> None:
        """Render from now on with ``prepared`` (between two renders: nothing is computed here)."""
        self._args, self._fast, self._bound = prepared.args, prepared.fast, prepared.bound
        self._region_source = prepared.regions
        self.cache, self.source = prepared.cache, prepared.image

    @property
    def ready(self) -> bool:
        return self.cache is not None

    def render(self, vector: np.ndarray) -> np.ndarray:
        """(60,) keypoint vector -> (size, size, 3) uint8 RGB."""
        return self.job(vector).run()

    def job(self, vector: np.ndarray) -> RenderJob:
        """The render of ``vector`` against the source in use, to run now (``RenderJob.run``) or
        batched with other calls' (``receiver.batching``)."""
        if self.cache is None:
            raise RuntimeError("no source image yet")
        v = np.ascontiguousarray(vector, dtype=np.float32).reshape(1, -1)
        if self._fast is not None:
            job = RenderJob(v, to_image, fast=self._fast, bound=self._bound)
        else:
            job = RenderJob(v, to_image, model=self.model, args=self._args)
        if self.regions is not None:
            job = job.then(self.regions.step(v, self._region_source, self.region_counts))
        return job


def synthetic_source(size: int) -> np.ndarray:
    """A smooth colour ramp: a stand-in source image for timing and warm-up."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1)
    return image.astype(np.uint8)


def measure_render_fps(model: MotionModel, frames: int = 10, warmup: int = 4, fast: bool = True,
                       rounds: int = 3, int8: bool = True) -> float:
    """Frames per second of one render at batch 1 on this machine (a synthetic source, real weights):
    the median of ``rounds`` timed rounds, so one burst of other work (a process starting) does not
    decide the tier.

    Also leaves the ONNX Runtime session on the model (``fast``), so the first call does not wait for it.
    """
    r = Renderer(model, fast=fast, int8=int8)
    r.set_source(synthetic_source(model.config.size))
    vec = model.keypoints(r.cache.image)[0].cpu().numpy()
    for _ in range(warmup):
        r.render(vec)
    rates = []
    for _ in range(max(1, rounds)):
        t0 = time.perf_counter()
        for _ in range(frames):
            r.render(vec)
        rates.append(frames / (time.perf_counter() - t0))
    return float(np.median(rates))


def choose_model(size: str | int, device: str, min_fps: float = 36.0,
                 fast: bool = True, int8: bool = True) -> tuple[MotionModel, dict, Path]:
    """Load the shipped model of ``size``, or with ``"auto"`` the largest that renders at ``min_fps``
    here (a 20 % margin over 30 fps for decoding, playout and the sink). On CUDA that is the largest."""
    if size != "auto":
        path = weights_for_size(int(size))
        model, meta = load_motion_model(path, device)
        return model, meta, path
    sizes = sorted((s for s in SHIPPED_SIZES if weights_for_size(s).exists()), reverse=True)
    if not sizes:
        raise CheckpointError("no shipped motion model found in models/weights")
    for s in sizes:
        path = weights_for_size(s)
        model, meta = load_motion_model(path, device)
        if device != "cpu":
            return model, meta, path
        fps = measure_render_fps(model, fast=fast, int8=int8)
        log.info("auto size: %dx%d renders at %.0f fps here (need %.0f)", s, s, fps, min_fps)
        if fps >= min_fps or s == sizes[-1]:
            return model, meta, path
    raise AssertionError("unreachable")
