"""Which models a receiver renders with: ``--weights``, or ``--size`` with tiers that adapt, plus the region stage.

``python -m receiver`` and ``kpcast call``'s receiving half choose the same way, here: an explicit checkpoint
renders at its size; ``--size auto`` on a CPU (or ``--adapt``) loads every shipped tier, times them and starts at
the largest that holds the frame rate; otherwise ``choose_model`` picks one size. The region stage (eyes and
mouth redrawn, ``--refine-regions``) takes its anchored keypoints from the display size's checkpoint. Every
graph is built (and timed) here, before any call.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import read_checkpoint
from models.fomm.io import load_motion_model, weights_for_size
from models.fomm.model import MotionModel
from receiver.regions import AUTO, DEFAULT_REFINER, OFF, RegionStage, auto_regions, load_region_weights, region_stage
from receiver.render import Renderer, choose_model, measure_render_fps, synthetic_source
from receiver.tiers import TierSet, load_tiers, start_tier

log = logging.getLogger(__name__)


@dataclass
class RenderModels:
    """What the calls render with: one model, or the tiers (``model`` is then the tier calls start at)."""

    model: MotionModel
    tiers: TierSet | None
    fast: bool
    int8: bool
    fps: float  # renders per second of ``model`` at batch 1, measured here
    weights: str | Path  # ``model``'s checkpoint
    regions: RegionStage | None = None  # --refine-regions

    def renderer(self) -> Renderer:
        return self.tiers.renderer(self.fast, self.int8, self.regions) if self.tiers is not None else Renderer(
            self.model, self.fast, self.int8, self.regions)


def load_render_models(weights: str | None, size: str | int, adapt: bool | None, device: str, fast: bool,
                       int8: bool, refine_regions: str | None = None, reserved_ms: float = 0.0) -> RenderModels:
    """The models as the options ask (CheckpointError for a bad file, the region weights' checked first).

    ``refine_regions``: a refiner checkpoint (required to work), ``auto`` (the shipped one where it applies:
    ``receiver.regions.auto_regions``) or ``off`` / None. ``reserved_ms``: other work a frame on these cores
    (``load_tiers``: the first tier leaves room for it, and for the region stage at the display size)."""
    auto = refine_regions == AUTO
    if refine_regions in (OFF, None):
        refine_regions = None
    named = refine_regions if refine_regions and not auto else None
    regions = load_region_weights(named) if named else None  # fail before the models load
    adapt = adapt if adapt is not None else (size == "auto" and device == "cpu")
    tiers = None
    if weights:
        model, meta = load_motion_model(weights, device)
        path: str | Path = weights
    elif adapt:
        tiers = load_tiers(device, fast=fast, start=None if size == "auto" else int(size), int8=int8,
                           reserved_ms=reserved_ms)
        model, path = tiers.models[tiers.start], weights_for_size(tiers.start)
        display = weights_for_size(max(tiers.models))  # its meta names the region stage's anchored keypoints
        meta = read_checkpoint(display)["meta"] if regions or auto else {}
        log.info("render tiers %s, calls start at %dx%d and adapt", {s: round(f) for s, f in tiers.fps.items()},
                 tiers.start, tiers.start)
    else:
        model, meta, path = choose_model(size, device, fast=fast, int8=int8)
    # the tiers were timed (and their graphs built) already; otherwise build the graph now, not at the first call
    fps = tiers.fps[tiers.start] if tiers else measure_render_fps(model, frames=10, fast=fast, int8=int8)
    if auto:
        # tiers leave every frame at their largest size; a fixed model shows its own
        shown = max(tiers.models) if tiers else model.config.size
        if auto_regions(shown, meta):
            regions, refine_regions = load_region_weights(DEFAULT_REFINER), str(DEFAULT_REFINER)
        else:
            log.info("region stage off: it needs 256x256 frames and a motion model naming its eye and mouth "
                     "keypoints (shown %d, anchored keypoints %s)", shown, meta.get("anchor_kp"))
    stage = region_stage(regions, meta, display if tiers else path)
    if stage is not None:
        how = "int8" if stage.onnx is not None and stage.onnx.int8 else "float32" if stage.onnx else "eager PyTorch"
        log.info("region stage %s (%s): eyes and mouth redrawn on every frame (--refine-regions off turns it off)",
                 refine_regions, how)
        if tiers is not None and size == "auto":
            # the start-up fps are of the renders alone; the stage adds its time to every display-size frame
            top = max(tiers.models)
            ms = measure_stage_ms(stage, tiers.models[top])
            start = start_tier(tiers.fps, reserved_ms=reserved_ms, extra_ms={top: ms})
            if start != tiers.start:
                log.info("the region stage takes %.1f ms a frame here: calls start at %dx%d", ms, start, start)
                tiers = dataclasses.replace(tiers, start=start)
    if tiers is not None:
        model, path, fps = tiers.models[tiers.start], weights_for_size(tiers.start), tiers.fps[tiers.start]
    # Everything loaded so far lives as long as the process: out of the collector's sight, so that a full
    # collection during a call does not walk it (~50 ms over ~200,000 objects of models, torch and aiortc,
    # holding the GIL: every thread of the process, renders included, waits; 0 ms frozen).
    gc.collect()
    gc.freeze()
    return RenderModels(model, tiers, fast, int8, fps, path, stage)


def measure_stage_ms(stage: RegionStage, model: MotionModel, rounds: int = 7) -> float:
    """Median ms of the region stage on one display-size frame here (a synthetic source: the time does not
    depend on the picture); 0 when it cannot place its regions on it (then it would pass the frames)."""
    image = synthetic_source(model.config.size)
    with torch.no_grad():
        kp = model.keypoints(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0)[0].numpy()
    source = stage.prepare(image, kp)
    if source is None:
        return 0.0
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        stage.apply(image, kp, source)
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.median(times[1:]))
