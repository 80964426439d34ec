"""Region stage: each shown frame's eyes and mouth redrawn by the region refiner (``--refine-regions``).

The motion model's renders keep the source image's eye state and open the mouth too little; the
region refiner (``models.expression.region_refiner``) redraws the two eye patches and the mouth patch
of a rendered 256x256 frame, given the source image's own patches and a **target** opening. Nothing
new crosses the wire: the target is what the receiver computes from the keypoints it already has, as
the refiner was trained (``models.expression.train_refiner --target wire``):

    target = source openings (the opening regressor's reading of the source image's patches)
             + wire_gain x (the frame's anchored Jacobian scales - the source keypoints')

(``openings.jacobian_scales``; ``wire_gain``, 4 values, from the refiner checkpoint's meta; the
anchored keypoints from the motion model's meta, ``anchor_kp``).

:class:`RegionStage` holds the shared weights (one per receiver): ``prepare`` runs once per source
image (its patches, openings and scales: a :class:`RegionSource`), ``apply`` once per frame on the
render worker, after any upscale (cut the frame's patches at its own keypoints' centres, refine on one
thread — through ONNX Runtime when it is installed, in int8 when the refiner's calibration ranges lie beside
its weights (shipped), several times faster than eager PyTorch on these small convolutions, else eager — add
back what the refiner changed: ``paste_changes``, so the frame keeps its own pixels where the refiner leaves a
patch alone; ``paste="patches"`` pastes the whole patches as the refiner's validation did). A frame it
cannot handle is shown unchanged: keypoints not finite, a centre off the frame, eyes closer than
``MIN_INTEROCULAR_PX`` (no face to speak of), or a source image whose own keypoints are so. ``Renderer`` /
``TieredRenderer`` add it as a ``RenderJob.then`` step and count refined and passed frames per call
(``RegionCounts``, in the call's stats as ``regions``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from models.checkpoint import CheckpointError
from models.expression import DEFAULT_WEIGHTS as REGRESSOR_WEIGHTS
from models.expression import load_regressor
from models.expression.openings import cut_patches, jacobian_scales, patch_affines
from models.expression.refiner_int8 import FeedTemplate, feed_template, frame_feed, load_ranges
from models.expression.region_refiner import DEFAULT_WEIGHTS, RegionRefiner, load_refiner, paste_changes, paste_patches
from models.expression.regressor import OpeningNet

log = logging.getLogger(__name__)

DEFAULT_REFINER = DEFAULT_WEIGHTS  # models/weights/region_refiner.pt
MIN_INTEROCULAR_PX = 4.0  # closer eye centres than this: no face to redraw (a degenerate keypoint set)
NUM_KP = 10  # keypoints in a vector (60 values: 10 points, 10 2x2 Jacobians)


def anchor_kp_of(meta: dict, path: str | Path) -> list[int]:
    """The motion model checkpoint's anchored keypoints (eye_left, eye_right, mouth, ...); CheckpointError
    when it has none (the stage cannot locate the eyes and the mouth)."""
    anchors = meta.get("anchor_kp") or []
    if len(anchors) < 3:
        raise CheckpointError(f"{path} has no anchored keypoints (meta anchor_kp): --refine-regions cannot locate "
                              "the eyes and the mouth with this motion model")
    return [int(i) for i in anchors]


class RegionWeights(NamedTuple):
    """What ``load_region_weights`` reads: the stage's weights, shared by the calls of a receiver."""

    refiner: RegionRefiner
    regressor: OpeningNet
    wire_gain: list[float]
    # int8 calibration ranges measured on exactly this refiner (``refiner_int8``; its convolutions then run in
    # int8), or None: float32
    int8_ranges: dict | None = None


def load_region_weights(path: str | Path = DEFAULT_REFINER,
                        regressor: str | Path = REGRESSOR_WEIGHTS) -> RegionWeights:
    """The refiner of a checkpoint trained with ``--target wire``, the opening regressor, the refiner's
    ``wire_gain`` and its int8 ranges when a file of them lies beside it (``WEIGHTS.int8.json``, measured on
    these weights); CheckpointError when either checkpoint is missing or corrupt, or the refiner has no
    ``wire_gain`` (trained for another target, which a receiver cannot compute)."""
    net, meta = load_refiner(path)
    gain = meta.get("wire_gain")
    try:
        ok = gain is not None and np.asarray(gain, np.float64).shape == (4,) and bool(np.isfinite(gain).all())
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise CheckpointError(f"{path} has no wire_gain in its meta (trained with --target {meta.get('target')!r}, "
                              "not 'wire'): a receiver cannot compute its target openings from the keypoints")
    reg, _ = load_regressor(regressor)
    return RegionWeights(net, reg, [float(g) for g in gain], load_ranges(net, path))


AUTO = "auto"  # --refine-regions' default: the shipped refiner wherever it applies (see ``auto_regions``)
OFF = "off"


def add_refine_regions_argument(p: argparse.ArgumentParser) -> None:
    """``--refine-regions [PATH|auto|off]``: the receiver's and ``kpcast call``'s option."""
    p.add_argument("--refine-regions", nargs="?", const=str(DEFAULT_REFINER), default=AUTO, metavar="PATH",
                   help="redraw the eyes and the mouth of every shown frame with this region refiner "
                        "(receiver.regions; PATH default: models/weights/region_refiner.pt). Default auto: the "
                        "shipped refiner when the frames shown are 256x256 and the motion model names its eye "
                        "and mouth keypoints; off: never")


def auto_regions(display_size: int, meta: dict) -> bool:
    """Whether ``--refine-regions auto`` turns the stage on: the refiner was trained on 256x256 renders
    and locates the regions by the motion model's anchored keypoints."""
    return display_size == 256 and len(meta.get("anchor_kp") or []) >= 3 and Path(DEFAULT_REFINER).exists()


def region_stage(parts: RegionWeights | None, meta: dict, weights: str | os.PathLike) -> RegionStage | None:
    """The stage from ``load_region_weights``' parts (None: off) and the motion model checkpoint's meta."""
    return None if parts is None else RegionStage.of(parts, anchor_kp_of(meta, weights))


@dataclass(frozen=True)
class RegionSource:
    """What the stage needs of one source image (``RegionStage.prepare``)."""

    size: int  # the frames' side (the display size)
    eyes: np.ndarray  # (2, 32, 32, 3) uint8, the image-right eye mirrored
    mouth: np.ndarray  # (32, 48, 3) uint8
    openings: np.ndarray  # (4,) float32: the regressor's reading of these patches
    scales: np.ndarray  # (4,) float32: the source keypoints' anchored Jacobian scales
    # the stage graph's inputs as far as this source fixes them (its patches and openings), once per source
    feed: FeedTemplate | None = None


@dataclass
class RegionCounts:
    """One call's frames through the stage: redrawn, or shown unchanged (``RegionStage.apply``'s rules)."""

    refined: int = 0
    passed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"refined": self.refined, "passed": self.passed}


def _chw(patches: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [0, 1] (as the refiner and the regressor were trained)."""
    return torch.from_numpy(np.ascontiguousarray(patches)).movedim(-1, -3).float() / 255.0


def _u8(t: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8 (``refine_frame``'s rounding; in numpy: torch's
    round on these few thousand values took ~5 ms a call, a slow kernel path on the movedim view)."""
    return np.clip(np.rint(np.moveaxis(t.numpy(), -3, -1) * np.float32(255.0)), 0, 255).astype(np.uint8)


def _change(refined: torch.Tensor, rendered: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) refined patches in [0, 1] and the rendered (..., H, W, 3) uint8 -> the change in grey levels,
    channels last (what the stage graph outputs, but the window)."""
    return np.moveaxis(refined.numpy(), -3, -1) * np.float32(255.0) - rendered


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one intra-op thread in this thread (OpenMP's setting is per thread), restored afterwards:
    the refiner's small convolutions barely use a second core, and other render workers run beside it."""
    before = torch.get_num_threads()
    if before != 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if before != 1:
            torch.set_num_threads(before)


class OnnxRefiner:
    """The stage's graph (``refiner_int8.StageGraph``) as one ONNX Runtime session (one thread, no spinning); in
    int8 when ``int8_ranges`` are given (``refiner_int8.quantise``: the graph ~1.6 -> ~0.9 ms a frame, drawing
    what float32 draws to ~0.4 grey levels; docs/RESULTS.md, the stage in int8)."""

    def __init__(self, refiner: RegionRefiner, int8_ranges: dict | None = None) -> None:
        from models.expression.refiner_int8 import export_refiner, quantise
        from models.fomm.export import onnx_session

        graph = export_refiner(refiner)
        self.int8 = False
        if int8_ranges is not None:
            try:
                graph, self.int8 = quantise(graph, int8_ranges), True
            except Exception:  # ranges of another graph (a tensor missing): float32 costs speed, not the stage
                log.exception("region stage: the int8 ranges do not fit this refiner's graph; it runs in float32")
        self.session = onnx_session(graph, threads=1)  # 2 threads: slower on these small convs

    def __call__(self, feed: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """``frame_feed``'s inputs -> the windowed changes (2, 32, 32, 3) and (1, 32, 48, 3), grey levels."""
        eyes, mouth = self.session.run(None, feed)
        return eyes, mouth


def _onnx_refiner(refiner: RegionRefiner, int8_ranges: dict | None) -> OnnxRefiner | None:
    try:
        return OnnxRefiner(refiner, int8_ranges)
    except ImportError:
        return None
    except Exception:  # an export or runtime failure costs speed, not the stage
        log.exception("region stage: ONNX Runtime graph failed; the refiner runs in eager PyTorch")
        return None


class RegionStage:
    """The region refiner as a receiver stage; one per receiver, shared by its calls (it holds no call state).

    ``wire_gain``: 4 values (``CHANNELS`` order); ``anchor_kp``: the motion model's anchored keypoints
    (eye_left, eye_right, mouth first); ``paste``: ``changes`` (default: only what the refiner changed is
    added to the frame, ``paste_changes``, so an unchanged patch leaves the frame's pixels exactly as they
    were) or ``patches`` (the refined patches replace the frame's under the feathered window,
    ``paste_patches``, as the refiner's validation pasted them; resamples the regions through 32 pixels);
    ``onnx``: run the refiner through ONNX Runtime when it is installed (``refiner_int8.StageGraph``: the same
    numbers to ~1e-4 grey levels in float32; the ``changes`` paste only, ``patches`` runs eager PyTorch);
    ``int8_ranges``: its convolutions, ReLUs, concatenations and upsamplings in int8 there, from these calibration
    ranges (``RegionWeights``; ~0.4 grey levels from float32, ~1 ms a frame less beside the render).
    """

    def __init__(self, refiner: RegionRefiner, regressor: OpeningNet, wire_gain: list[float] | np.ndarray,
                 anchor_kp: list[int], paste: str = "changes", onnx: bool = True,
                 int8_ranges: dict | None = None) -> None:
        if paste not in ("changes", "patches"):
            raise ValueError(f"paste must be 'changes' or 'patches', not {paste!r}")
        self.paste = paste
        gain = np.asarray(wire_gain, np.float32).reshape(-1)
        if gain.shape != (4,) or not np.isfinite(gain).all():
            raise ValueError(f"wire_gain must be 4 finite values, got {wire_gain!r}")
        anchors = [int(i) for i in anchor_kp]
        if len(anchors) < 3 or len(set(anchors[:3])) < 3 or not all(0 <= i < NUM_KP for i in anchors[:3]):
            raise ValueError(f"anchor_kp must name 3 different keypoints (eye_left, eye_right, mouth): {anchor_kp!r}")
        self.refiner = refiner.eval()
        self.regressor = regressor.eval()
        self.gain = gain
        self.anchor_kp = anchors
        self.onnx = _onnx_refiner(self.refiner, int8_ranges) if onnx else None

    @classmethod
    def of(cls, parts: RegionWeights, anchor_kp: list[int], paste: str = "changes") -> RegionStage:
        """The stage of ``load_region_weights``' parts and the motion model's anchored keypoints."""
        return cls(parts.refiner, parts.regressor, parts.wire_gain, anchor_kp, paste, int8_ranges=parts.int8_ranges)

    @classmethod
    def load(cls, path: str | Path, anchor_kp: list[int], regressor: str | Path = REGRESSOR_WEIGHTS,
             paste: str = "changes") -> RegionStage:
        """``load_region_weights`` + the motion model's anchored keypoints."""
        return cls.of(load_region_weights(path, regressor), anchor_kp, paste)

    # ------------------------------------------------------------------ geometry
    def centres(self, kp: np.ndarray, size: int) -> np.ndarray | None:
        """(3, 2) px centres of the eyes and the mouth in a ``size`` frame, or None when the stage cannot use
        these keypoints (not finite, a centre off the frame, eyes closer than ``MIN_INTEROCULAR_PX``)."""
        v = np.asarray(kp, np.float32).reshape(-1)
        if v.shape != (6 * NUM_KP,) or not np.isfinite(v).all():
            return None
        # centres_from_keypoints in Python floats: numpy's per-call overhead on six numbers, once a frame
        xy, half = v[:2 * NUM_KP].tolist(), size / 2.0
        c = [((xy[2 * i] + 1.0) * half - 0.5, (xy[2 * i + 1] + 1.0) * half - 0.5) for i in self.anchor_kp[:3]]
        if not all(0 <= x <= size - 1 and 0 <= y <= size - 1 for x, y in c):
            return None
        if math.hypot(c[1][0] - c[0][0], c[1][1] - c[0][1]) < MIN_INTEROCULAR_PX:
            return None
        return np.array(c, np.float32)

    # ------------------------------------------------------------------ per source, per frame
    @torch.no_grad()
    def prepare(self, source: np.ndarray, source_kp: np.ndarray) -> RegionSource | None:
        """Once per source image: (S, S, 3) uint8 RGB at the display size and its (60,) keypoint vector ->
        its patches, openings and Jacobian scales; None when its keypoints are unusable (its frames then pass
        through)."""
        size = source.shape[0]
        if source.ndim != 3 or source.shape[1] != size:
            raise ValueError(f"the source image must be square RGB, got {source.shape}")
        centres = self.centres(source_kp, size)
        if centres is None:
            log.info("region stage: the source image's keypoints locate no face; its frames are shown unrefined")
            return None
        eyes, mouth = cut_patches(np.ascontiguousarray(source), centres)
        with _one_thread():
            opening = self.regressor(_chw(eyes)[None], _chw(mouth)[None])[0].numpy().astype(np.float32)
        scales = jacobian_scales(np.asarray(source_kp, np.float32).reshape(-1), self.anchor_kp).astype(np.float32)
        return RegionSource(size, eyes, mouth, opening, scales, feed_template(self.refiner, eyes, mouth, opening))

    def target(self, source: RegionSource, kp: np.ndarray) -> np.ndarray:
        """(4,) target openings of the frame with keypoints ``kp``: the source's + gain x the scales' change."""
        jd = jacobian_scales(np.asarray(kp, np.float32).reshape(-1), self.anchor_kp)
        return (source.openings + self.gain * (jd - source.scales)).astype(np.float32)

    def refine(self, frame: np.ndarray, kp: np.ndarray, source: RegionSource | None) -> np.ndarray | None:
        """The frame (S, S, 3) uint8 with its eyes and mouth redrawn, or None when the stage cannot handle it."""
        if source is None or frame.shape != (source.size, source.size, 3) or frame.dtype != np.uint8:
            return None
        centres = self.centres(kp, source.size)
        if centres is None:
            return None
        frame = np.ascontiguousarray(frame)
        affines = patch_affines(centres)
        eyes, mouth = cut_patches(frame, centres, affines)
        target = self.target(source, kp)
        if self.onnx is not None and self.paste == "changes":
            tpl = source.feed or feed_template(self.refiner, source.eyes, source.mouth, source.openings)
            eye_change, mouth_change = self.onnx(frame_feed(tpl, eyes, mouth, target))
            return paste_changes(frame, centres, eye_change, mouth_change[0], feather=None, affines=affines)
        args = (_chw(eyes)[None], _chw(source.eyes)[None], _chw(mouth)[None], _chw(source.mouth)[None],
                torch.from_numpy(target)[None], torch.from_numpy(source.openings)[None])
        with _one_thread(), torch.no_grad():
            out = self.refiner(*args)
        if self.paste == "patches":
            return paste_patches(frame, centres, _u8(out["eyes"][0]), _u8(out["mouth"][0]))
        return paste_changes(frame, centres, _change(out["eyes"][0], eyes), _change(out["mouth"][0], mouth),
                             affines=affines)

    def apply(self, frame: np.ndarray, kp: np.ndarray, source: RegionSource | None) -> np.ndarray:
        """``refine``, or the frame unchanged where the stage cannot handle it."""
        out = self.refine(frame, kp, source)
        return frame if out is None else out

    def step(self, kp: np.ndarray, source: RegionSource | None,
             counts: RegionCounts | None = None) -> Callable[[np.ndarray], np.ndarray]:
        """``apply`` for one frame's keypoints, as a ``RenderJob.then`` step; counts into ``counts``."""
        vector = np.array(kp, np.float32).reshape(-1)  # a copy: the caller may reuse its buffer

        def run(frame: np.ndarray) -> np.ndarray:
            out = self.refine(frame, vector, source)
            if counts is not None:
                if out is None:
                    counts.passed += 1
                else:
                    counts.refined += 1
            return frame if out is None else out

        return run
