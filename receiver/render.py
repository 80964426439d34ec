"""Rendering stage: the source image plus one keypoint vector in, one RGB frame out."""

from __future__ import annotations

import logging
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from models.checkpoint import CheckpointError
from models.data import center_square
from models.fomm.io import SHIPPED_SIZES, detector_id, load_motion_model, weights_for_size
from models.fomm.model import MotionModel, SourceCache, cache_tensors

log = logging.getLogger(__name__)


def pick_device() -> str:
    """CUDA when present, else CPU."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class _RenderGraph(torch.nn.Module):
    def __init__(self, model: MotionModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model.render_tensors(*args)


def traced_render(model: MotionModel, cache: SourceCache) -> torch.jit.ScriptModule | None:
    """``model.render`` traced for batch 1, frozen and optimised for inference (CPU).

    On 2 CPU cores this saves ~10 % per frame: BatchNorm is folded into the convolutions
    and the Python overhead of a few hundred small ops is gone. Shapes are fixed by the
    model's size, so one trace per model serves every call (it is kept on the model).
    """
    if "_kpcast_traced" in model.__dict__:
        return model.__dict__["_kpcast_traced"]
    args = (model.keypoints(cache.image), *cache_tensors(cache))
    with torch.no_grad(), warnings.catch_warnings():
        # Shape checks become constants in the trace: right, since a model's shapes never change.
        # TorchScript is deprecated upstream but present in the pinned torch; torch.compile was
        # slower than eager on 2 threads here. Without TorchScript, rendering stays eager.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            traced = torch.jit.trace(_RenderGraph(model).eval(), args, check_trace=False)
            traced = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
            for _ in range(3):  # the profiling executor specialises on the first calls
                traced(*args)
        except (AttributeError, RuntimeError) as e:
            log.warning("cannot trace the renderer (%s); rendering with eager PyTorch", e)
            traced = None
    object.__setattr__(model, "_kpcast_traced", traced)  # not a registered submodule: no state_dict entry
    return traced


class Renderer:
    """Holds one call's source encoding (computed once) and renders frames from keypoints.

    ``fast`` (CPU only): render through ``traced_render`` instead of eager PyTorch.
    """

    def __init__(self, model: MotionModel, fast: bool = False) -> None:
        self.model = model
        self.size = model.config.size
        self.device = next(model.parameters()).device
        self.fast = fast and self.device.type == "cpu"
        self.cache: SourceCache | None = None
        self.source: np.ndarray | None = None
        self.detector_id = detector_id(model)
        self._args: tuple[torch.Tensor, ...] = ()
        self._graph: torch.jit.ScriptModule | None = None

    def set_source(self, image: np.ndarray) -> None:
        """(H, W, 3) uint8 RGB of any size; cropped to a square and resized to the model size."""
        img = center_square(image, self.size)
        x = torch.from_numpy(img).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        cache = self.model.prepare_source(x)
        self._args = cache_tensors(cache)
        if self.fast:
            self._graph = traced_render(self.model, cache)
        self.cache = cache
        self.source = img

    @property
    def ready(self) -> bool:
        return self.cache is not None

    def render(self, vector: np.ndarray) -> np.ndarray:
        """(60,) keypoint vector -> (size, size, 3) uint8 RGB."""
        if self.cache is None:
            raise RuntimeError("no source image yet")
        v = torch.from_numpy(np.ascontiguousarray(vector, dtype=np.float32)).to(self.device)[None]
        with torch.no_grad():
            if self._graph is not None:
                out = self._graph(v, *self._args)[0]
            else:
                out = self.model.render_tensors(v, *self._args)[0]
        return (out.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()


def synthetic_source(size: int) -> np.ndarray:
    """A smooth colour ramp: a stand-in source image for timing and warm-up."""
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    image = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1)
    return image.astype(np.uint8)


def measure_render_fps(model: MotionModel, frames: int = 20, warmup: int = 4, fast: bool = True) -> float:
    """Frames per second of one render at batch 1 on this machine (a synthetic source, real weights).

    Also leaves the traced graph on the model (``fast``), so the first call does not wait for it.
    """
    r = Renderer(model, fast=fast)
    r.set_source(synthetic_source(model.config.size))
    vec = model.keypoints(r.cache.image)[0].cpu().numpy()
    for _ in range(warmup):
        r.render(vec)
    t0 = time.perf_counter()
    for _ in range(frames):
        r.render(vec)
    return frames / (time.perf_counter() - t0)


def choose_model(size: str | int, device: str, min_fps: float = 36.0,
                 fast: bool = True) -> tuple[MotionModel, dict, Path]:
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
        fps = measure_render_fps(model, fast=fast)
        log.info("auto size: %dx%d renders at %.0f fps here (need %.0f)", s, s, fps, min_fps)
        if fps >= min_fps or s == sizes[-1]:
            return model, meta, path
    raise AssertionError("unreachable")
