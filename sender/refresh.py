"""Source refresh at the sender: send a new source image when the receiver's picture has drifted.

The receiver animates one source image for the whole call. When the scene moves away from it
(the light changes, the head turns, the camera is bumped), the motion model has to invent what
the source does not show, and the picture gets worse while the keypoints are still right. The
sender has the real frame, so it can estimate how wrong the receiver's picture is and replace
the source image (one JPEG, the same path as a re-frame: a new ``image_id`` and a keyframe).

Two estimators (:class:`RefreshConfig` ``mode``):

- ``render`` (default): every ``check_every_s`` (0.5 s) the receiver's picture is rebuilt at 64x64 with
  the shipped 64 model (the source image the receiver holds, animated by this frame's
  keypoints) and compared with the real frame by SSIM. It sees what keypoints cannot (light,
  occlusion, background). It renders as a receiver does (``models.fomm.fastgraph``, int8, one
  thread: a few ms; eager PyTorch took 35-45 ms of a busy core, 9 % of a two-way call's CPU
  samples), in a worker thread.
- ``keypoints``: the mean distance of this frame's keypoints from the source frame's (no
  rendering): cheap, but blind to anything that is not motion.

Both take the median of the last ``window`` checks and compare it with a reference taken over the
call's first ``reference_s`` (what "good" looks like for this face and camera): refresh when the
estimate is ``drop`` worse than it (render) or the keypoints are further than ``kp_threshold``
(keypoints), never twice within ``min_interval_s`` (``urgent_interval_s`` when the render
estimate is ``urgent_drop`` below the reference: the camera moved, and waiting would show a
wrong picture). Nothing here waits: :meth:`RefreshMonitor.observe` submits a check when one is
due and none is running, and reads the result on a later frame, so a check never delays a
frame. The receiver can still ask for a new image (``SourceRequest``).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sender.priority import worker_pool

log = logging.getLogger(__name__)

REFRESH_MODES = ("render", "keypoints", "off")
ESTIMATE_SIZE = 64  # the render estimate's resolution: the smallest shipped model's
N_COORD = 20  # keypoint x/y values at the start of a vector


@dataclass
class RefreshConfig:
    """When to send a fresh source image (times in seconds of the sender's monotonic clock).

    mode: ``render`` (SSIM of the rebuilt 64x64 picture), ``keypoints`` (keypoint distance from
        the source frame's) or ``off``.
    check_every_s: how often an estimate is taken.
    min_interval_s: at least this long between two refreshes (each costs one JPEG, ~10-20 KB).
    window: the decision takes the median of the last this many estimates (one odd frame, e.g. a
        blink or an open mouth, is not a drift; a single frame's SSIM varies by ~0.05 while talking).
    reference_s: the call's first seconds set the reference quality (render mode); no refresh before.
    drop: render mode: refresh when the smoothed SSIM is more than this below the reference. The
        estimate of a picture close to its source is inflated, so the reference is optimistic: at
        0.015-0.03 the sender refreshed at nearly every chance (one JPEG per ``min_interval_s``) for
        no better quality than 0.045 gives with half the refreshes (bench.refresh, two videos).
    urgent_drop: render mode: this far below the reference the picture is plainly wrong (the camera
        moved): refresh after only ``urgent_interval_s``, not waiting the whole ``min_interval_s``
        (a refresh just before the scene changed must not lock the next one out).
    urgent_interval_s: the shorter interval for such drops.
    kp_threshold: keypoints mode: refresh when the mean keypoint distance from the source frame's
        exceeds this ([-1, 1] units; talking without moving the head stays around 0.02-0.05).
    weights: the model the render estimate uses (the shipped 64 model by default).
    threaded: False: run each check inline (tests, offline benches).
    nice: the worker thread runs this many nice steps below its caller (``sender.priority``).
    """

    mode: str = "render"
    check_every_s: float = 0.5
    min_interval_s: float = 5.0
    window: int = 4
    reference_s: float = 10.0
    drop: float = 0.045
    urgent_drop: float = 0.06
    urgent_interval_s: float = 1.5
    kp_threshold: float = 0.12
    weights: str | None = None
    threaded: bool = True
    nice: int = 0


def keypoint_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Euclidean distance between the 10 keypoints of two vectors."""
    d = (np.asarray(a, np.float64).reshape(-1)[:N_COORD] - np.asarray(b, np.float64).reshape(-1)[:N_COORD])
    return float(np.sqrt((d.reshape(-1, 2) ** 2).sum(axis=1)).mean())


def _small(image: np.ndarray) -> np.ndarray:
    if image.shape[0] == ESTIMATE_SIZE and image.shape[1] == ESTIMATE_SIZE:
        return np.ascontiguousarray(image)
    return cv2.resize(image, (ESTIMATE_SIZE, ESTIMATE_SIZE), interpolation=cv2.INTER_AREA)


class RenderEstimate:
    """The receiver's picture rebuilt at 64x64, and its SSIM against the real frame."""

    def __init__(self, model=None, weights: str | Path | None = None) -> None:  # model: a MotionModel
        import torch  # noqa: F401 - loaded only where the render estimate is used

        if model is None or model.config.size != ESTIMATE_SIZE:
            from models.fomm.io import load_motion_model, weights_for_size

            model, _ = load_motion_model(weights or weights_for_size(ESTIMATE_SIZE))
        self.model = model
        self._cache = None
        self._graph = self._fast_graph(model)
        self._warm()

    @staticmethod
    def _fast_graph(model):  # -> models.fomm.fastgraph.SplitGraph | None
        """The receiver's CPU render graph of ``model`` on one thread (int8 with its shipped ranges), or
        None when it cannot be built (the estimate then renders with eager PyTorch)."""
        import torch

        from models.fomm import fastgraph
        from models.fomm.model import cache_tensors

        try:
            with torch.no_grad():
                cache = model.prepare_source(torch.zeros(1, 3, ESTIMATE_SIZE, ESTIMATE_SIZE))
                example = (model.keypoints(cache.image), *cache_tensors(cache))
            return fastgraph.cached_graph(model, example, 1, fastgraph.find_ranges(model), fastgraph.CACHE_DIR)
        except Exception as e:  # any exporter/runtime failure leaves the eager estimate working
            log.warning("refresh estimate renders with eager PyTorch (%s)", e)
            return None

    def _warm(self) -> None:
        """Pay the first check's one-off costs now, before any call: importing scikit-image's SSIM (~0.2 s
        holding the GIL, which stalled the other threads, renders included, in a two-way call's first second)
        and torch's first render at this size."""
        import torch
        from skimage.metrics import structural_similarity  # noqa: F401

        image = np.full((ESTIMATE_SIZE, ESTIMATE_SIZE, 3), 128, np.uint8)
        with torch.no_grad():
            vec = self.model.keypoints(self._tensor(image))[0].numpy()
        self.set_source(image)
        self(image, vec)
        self._cache = None

    @staticmethod
    def _tensor(image: np.ndarray):
        import torch

        return torch.from_numpy(_small(image)).permute(2, 0, 1)[None].float() / 255.0

    def set_source(self, image: np.ndarray) -> None:
        import torch

        from models.fomm.model import cache_tensors

        with torch.no_grad():
            self._cache = self.model.prepare_source(self._tensor(image))
            if self._graph is not None:
                self._cache = self._graph.bind({f"in{i + 1}": a.numpy()
                                                for i, a in enumerate(cache_tensors(self._cache))})

    def __call__(self, frame: np.ndarray, vec: np.ndarray) -> float:
        import torch
        from skimage.metrics import structural_similarity

        v = np.ascontiguousarray(vec, np.float32).reshape(1, -1)
        if self._graph is not None:
            out = np.clip(self._graph.run(self._cache, v)[0], 0, 1).transpose(1, 2, 0)
        else:
            with torch.no_grad():
                out = self.model.render(self._cache, torch.from_numpy(v))[0].clamp(0, 1).permute(1, 2, 0).numpy()
        real = _small(frame).astype(np.float32) / 255.0
        return float(structural_similarity(out, real, channel_axis=-1, data_range=1.0))


class RefreshMonitor:
    """Decides when the sender sends a new source image; call from one thread (the sender's loop).

    :meth:`source_sent` after every source image that went out (start, re-frame, request,
    refresh); :meth:`observe` once per captured frame, True when a refresh is due now.
    """

    def __init__(self, config: RefreshConfig, model=None) -> None:  # model: a MotionModel or None
        if config.mode not in REFRESH_MODES:
            raise ValueError(f"--refresh must be one of {REFRESH_MODES}, not {config.mode!r}")
        self.config = config
        self._render = RenderEstimate(model, config.weights) if config.mode == "render" else None
        self._pool = worker_pool("refresh", config.nice) if (
            config.threaded and config.mode != "off") else None
        self._pending: Future | None = None
        self._recent: deque[float] = deque(maxlen=max(1, config.window))
        self._results: deque[tuple[float, float]] = deque()  # estimates not yet collected (from the worker)
        self._reference: list[float] = []
        self._source_vec: np.ndarray | None = None
        self._generation = 0  # bumps at every source image: a check begun on the old one is discarded
        self._started: float | None = None
        self._last_check = float("-inf")
        self._last_source = float("-inf")
        self.refreshes = 0
        self.checks = 0
        self.estimates: list[tuple[float, float]] = []  # (time, estimate) of every check, for stats/benches

    @property
    def enabled(self) -> bool:
        return self.config.mode != "off"

    def source_sent(self, image: np.ndarray, vec: np.ndarray | None, now_s: float) -> None:
        """The receiver now holds ``image`` (keypoints ``vec`` when known, else the next frame's)."""
        if not self.enabled:
            return
        if self._started is None:
            self._started = now_s
        self._generation += 1
        self._last_source = now_s
        # the first check a full period later: a picture rebuilt from its own source frame says
        # nothing (SSIM ~1) and would only inflate the reference
        self._last_check = now_s
        self._recent.clear()
        self._source_vec = None if vec is None else np.asarray(vec, np.float32).copy()
        self._pending = None  # a result for the previous image says nothing about this one
        if self._render is not None:
            self._submit(self._render.set_source, image.copy())

    def observe(self, frame: np.ndarray, vec: np.ndarray, now_s: float) -> bool:
        """One captured frame and its keypoints; True when a new source image should go out now."""
        if not self.enabled or self._started is None:
            return False
        if self._source_vec is None:  # the source image's own keypoints: the first frame after it
            self._source_vec = np.asarray(vec, np.float32).copy()
        self._collect()
        cfg = self.config
        due = now_s - self._last_check >= cfg.check_every_s
        if due and (self._pending is None or self._pending.done()):
            self._last_check = now_s
            self.checks += 1
            if self._render is not None:
                self._pending = self._submit(self._check_render, frame.copy(), np.array(vec, np.float32), now_s,
                                             self._generation)
            else:
                self._add(now_s, keypoint_distance(vec, self._source_vec), self._generation)
            self._collect()
        return self._decide(now_s)

    # ------------------------------------------------------------------ internals
    def _submit(self, fn, *args) -> Future | None:
        if self._pool is None:
            fn(*args)
            return None
        return self._pool.submit(fn, *args)

    def _check_render(self, frame: np.ndarray, vec: np.ndarray, now_s: float, generation: int) -> None:
        self._add(now_s, self._render(frame, vec), generation)

    def _add(self, now_s: float, value: float, generation: int) -> None:
        # runs in the worker thread for render checks: only appends (deque/list appends are atomic)
        if generation != self._generation:
            return
        self._results.append((now_s, value))

    def _collect(self) -> None:
        p = self._pending
        if p is not None and p.done():
            self._pending = None
            try:
                p.result()
            except Exception:  # an estimate that fails must not end the call: no refresh from it
                log.exception("source refresh estimate failed")
        while self._results:
            t, value = self._results.popleft()
            self.estimates.append((t, value))
            self._recent.append(value)
            if self._started is not None and t - self._started <= self.config.reference_s:
                self._reference.append(value)

    @property
    def reference(self) -> float | None:
        """Render mode: the call's reference SSIM (median of the first ``reference_s``)."""
        return statistics.median(self._reference) if self._reference else None

    def _decide(self, now_s: float) -> bool:
        cfg = self.config
        age = now_s - self._last_source
        if len(self._recent) < self._recent.maxlen or age < min(cfg.min_interval_s, cfg.urgent_interval_s):
            return False
        if cfg.mode == "keypoints":
            smooth = statistics.median(self._recent)
            due = smooth > cfg.kp_threshold and age >= cfg.min_interval_s
        else:
            smooth = statistics.median(self._recent)
            ref = self.reference
            # no decision before the reference is measured: a call's first seconds say what "good" is here
            trusted = ref is not None and len(self._reference) >= 3 and now_s - self._started >= cfg.reference_s
            due = trusted and ((smooth < ref - cfg.drop and age >= cfg.min_interval_s)
                               or smooth < ref - cfg.urgent_drop)
        if due:
            self.refreshes += 1
            if cfg.mode == "render":
                log.info("source refresh: SSIM estimate %.3f, reference %.3f", smooth, self.reference)
            else:
                log.info("source refresh: keypoints %.3f from the source frame's", smooth)
        return due

    def stats(self) -> dict:
        """What the sender reports about refreshes (their bytes are counted where they are sent)."""
        vals = [v for _, v in self.estimates]
        out: dict = {"refresh_mode": self.config.mode, "refresh_checks": self.checks, "refreshes": self.refreshes}
        if vals:
            out["refresh_estimate_last"] = vals[-1]
            out["refresh_estimate_min"] = min(vals) if self.config.mode == "render" else max(vals)
        if self.reference is not None and self.config.mode == "render":
            out["refresh_reference"] = self.reference
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
