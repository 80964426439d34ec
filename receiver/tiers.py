"""A call's renderer that changes tier (64 / 128 / 256) during the call, as ``receiver.adapt`` decides.

:class:`TieredRenderer` holds one :class:`receiver.render.Renderer` per shipped size (the
models share one keypoint detector, so the same keypoints drive every tier) and offers the
session the same interface as a plain ``Renderer``. Frames always come out at the display
size (the largest tier; lower tiers upscaled, as a viewer's window would), so sinks and the
viewer never see the size change. The region stage (``receiver.regions``, ``--refine-regions``)
runs on frames rendered at the display size, with the source image prepared at that size; frames of
a lower tier pass it unrefined (counted as passed).

A change is made in two steps so that it never stalls the picture: ``prepare_tier`` encodes
the source image in use at the new size (on the render worker, between two frames: one
source encoding, a few tens of ms at 256) and ``switch_tier`` swaps it in between two renders.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import cv2
import numpy as np

from models.data import center_square
from models.fomm.io import detector_id
from models.fomm.model import MotionModel
from receiver.adapt import AdaptConfig, TierAdapter, TierChange
from receiver.regions import RegionCounts, RegionSource, RegionStage
from receiver.render import PreparedSource, Renderer, RenderJob, source_vector

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TieredSource:
    """A source image prepared at one tier; ``original`` re-prepares it at another."""

    original: np.ndarray  # (H, W, 3) uint8 RGB as received
    size: int
    prepared: PreparedSource
    regions: RegionSource | None = None  # the region stage's share, at the display size (any tier's keypoints)


class TieredRenderer:
    """Renders one call at the tier its :class:`TierAdapter` chooses.

    ``models``: size -> model (one detector); ``cost``: relative render time per size (1 / the
    start-up fps of each); ``start``: the first tier; ``fast``: ONNX Runtime rendering (CPU);
    ``int8``: its convolutions in int8 where the weights ship calibration ranges; ``regions``: the region
    stage, applied to every display-size frame (counted in ``region_counts``).
    """

    def __init__(self, models: dict[int, MotionModel], cost: dict[int, float], start: int, fast: bool = True,
                 config: AdaptConfig | None = None, int8: bool = True, regions: RegionStage | None = None) -> None:
        ids = {detector_id(m) for m in models.values()}
        if len(ids) != 1:
            raise ValueError(f"tiers must share one keypoint detector, got {sorted(ids)}")
        self.renderers = {s: Renderer(m, fast, int8) for s, m in models.items()}
        self.adapter = TierAdapter({s: cost[s] for s in models}, start, config)
        self.detector_id = ids.pop()
        self.size = max(models)  # the display size: every frame comes out at it
        self.current: TieredSource | None = None
        self.regions = regions
        self.region_counts = RegionCounts() if regions is not None else None

    @property
    def tier(self) -> int:
        """The size frames are rendered at now."""
        return self.adapter.size

    @property
    def ready(self) -> bool:
        return self.current is not None

    @property
    def source(self) -> np.ndarray | None:
        return None if self.current is None else self.current.prepared.image

    def prepare(self, image: np.ndarray) -> TieredSource:
        """Encode a source image at the current tier (``Renderer.prepare``)."""
        size = self.tier
        prepared = self.renderers[size].prepare(image)
        regions = None
        if self.regions is not None:
            # every tier shares one detector: this tier's source keypoints locate the display-size patches
            regions = self.regions.prepare(center_square(image, self.size), source_vector(prepared.cache))
        return TieredSource(image, size, prepared, regions)

    def use(self, source: TieredSource) -> None:
        if source.size != self.tier:
            # prepared before a tier change (a queued next image): re-encode now, a rare one-off cost
            source = self.prepare(source.original)
        self.renderers[source.size].use(source.prepared)
        self.current = source

    def render(self, vector: np.ndarray) -> np.ndarray:
        return self.job(vector).run()

    def job(self, vector: np.ndarray) -> RenderJob:
        """``Renderer.job`` at the current tier, its frame upscaled to the display size."""
        if self.current is None:
            raise RuntimeError("no source image yet")
        job = self.renderers[self.current.size].job(vector)
        if self.current.size != self.size:
            job = job.then(self._upscale)
        if self.regions is not None:
            # only at the display tier: the refiner was trained on renders made at 256, and a lower tier
            # means the cores are short (the stage costs a fifth of a 256 render); frames shown unrefined
            source = self.current.regions if self.current.size == self.size else None
            job = job.then(self.regions.step(vector, source, self.region_counts))
        return job

    def _upscale(self, frame: np.ndarray) -> np.ndarray:
        return cv2.resize(frame, (self.size, self.size), interpolation=cv2.INTER_LINEAR)

    # ------------------------------------------------------------------ adaptation
    def set_fps(self, fps: float) -> None:
        """The call's frame rate (its Hello): one frame of it is the render budget."""
        if fps > 0 and fps != self.adapter.config.fps:
            self.adapter.config = dataclasses.replace(self.adapter.config, fps=float(fps))

    def set_reserved_ms(self, ms: float) -> None:
        """CPU time a frame of this call also costs on these cores outside the renderer (a two-way call's own
        keypoint extraction): the render budget is what is left of the frame."""
        ms = max(0.0, float(ms))
        if ms != self.adapter.config.reserved_ms:
            self.adapter.config = dataclasses.replace(self.adapter.config, reserved_ms=ms)

    def observe(self, now: float, render_ms: float) -> TierChange | None:
        """One render's wall time; a change to make (``prepare_tier`` then ``switch_tier``) or None."""
        return self.adapter.process(now, render_ms)

    def prepare_tier(self, size: int) -> TieredSource | None:
        """The source in use, encoded at ``size`` (run on the render worker)."""
        cur = self.current
        if cur is None:
            return None
        return TieredSource(cur.original, size, self.renderers[size].prepare(cur.original), cur.regions)

    def switch_tier(self, source: TieredSource | None) -> bool:
        """Render at ``source.size`` from now on; False if the source image changed meanwhile
        (the caller prepares again)."""
        if source is None or self.current is None or source.original is not self.current.original:
            return False
        self.renderers[source.size].use(source.prepared)
        self.current = source
        return True


@dataclass(frozen=True)
class TierSet:
    """What a receiver that adapts holds: every tier's model, its start-up speed, the first tier."""

    models: dict[int, MotionModel]
    fps: dict[int, float]  # renders per second at batch 1, measured at start-up
    start: int
    config: AdaptConfig = AdaptConfig()

    def renderer(self, fast: bool, int8: bool = True, regions: RegionStage | None = None) -> TieredRenderer:
        """A fresh renderer for one call (each call has its own tier)."""
        return TieredRenderer(self.models, {s: 1.0 / f for s, f in self.fps.items()}, self.start, fast, self.config,
                              int8, regions)


def start_tier(fps: dict[int, float], min_fps: float = 36.0, reserved_ms: float = 0.0,
               extra_ms: dict[int, float] | None = None) -> int:
    """The largest size whose render (1 / its measured fps, plus ``extra_ms`` of that size: the region stage
    at the display size) and ``reserved_ms`` fit in one ``min_fps`` frame; the smallest when none does."""
    extra = extra_ms or {}
    fitting = [s for s, f in fps.items() if 1000.0 / f + extra.get(s, 0.0) + reserved_ms <= 1000.0 / min_fps]
    return max(fitting) if fitting else min(fps)


def load_tiers(device: str, fast: bool = True, min_fps: float = 36.0, start: int | None = None,
               int8: bool = True, reserved_ms: float = 0.0) -> TierSet:
    """Load every shipped size and measure each here; the first tier is ``start`` or the largest that
    renders at ``min_fps`` (``choose_model``'s rule) beside ``reserved_ms`` of other work a frame on the
    same cores (a two-way call's own keypoint extraction: a render and an extraction must fit in one
    ``min_fps`` frame; the adapter steps up later if there is room). Measuring also builds each tier's
    ONNX Runtime session, so a change during a call never waits for one."""
    from models.fomm.io import SHIPPED_SIZES, load_motion_model, weights_for_size
    from receiver.render import measure_render_fps

    models, fps = {}, {}
    for s in sorted(SHIPPED_SIZES, reverse=True):
        path = weights_for_size(s)
        if not path.exists():
            continue
        models[s], _meta = load_motion_model(path, device)
        fps[s] = measure_render_fps(models[s], fast=fast, int8=int8)
        log.info("tier %dx%d renders at %.0f fps here", s, s, fps[s])
    if not models:
        from models.checkpoint import CheckpointError

        raise CheckpointError("no shipped motion model found in models/weights")
    if start is None:
        start = start_tier(fps, min_fps, reserved_ms)
    elif start not in models:
        raise ValueError(f"no shipped model of size {start}")
    return TierSet(models, fps, start, AdaptConfig(reserved_ms=reserved_ms))
