"""Keypoint extraction on the sender: one frame in, one 60-value vector out."""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch

from models.fomm.export import cached_detector_onnx, detector_onnx, onnx_session
from models.fomm.model import MotionModel

log = logging.getLogger(__name__)

# Where the receiver's browser sender page keeps the detector's ONNX file (receiver.sendpage): the
# same graph this extractor runs, named by the detector's fingerprint, so both share one file.
DETECTOR_CACHE_DIR = Path(__file__).resolve().parents[1] / "cache" / "web"


def _detector_onnx(model: MotionModel, cache_dir: Path | None) -> bytes:
    """The detector's ONNX graph: from ``cache_dir`` when given (exporting costs ~1 s per start,
    most of it importing ``onnx``), exported in memory when there is none or it cannot be written."""
    if cache_dir is not None:
        try:
            return cached_detector_onnx(model, cache_dir).read_bytes()
        except OSError as e:  # a read-only install: export every time, as without a cache
            log.info("no ONNX cache in %s (%s): exporting the detector", cache_dir, e)
    return detector_onnx(model)


class KeypointExtractor:
    """``fast`` (CPU): run the detector through ONNX Runtime (the same graph a browser sender
    runs), falling back to eager PyTorch if it cannot be built. ``threads``: ONNX Runtime's
    intra-op threads (the sender shares the machine with aiortc and the capture). ``cache_dir``: keep
    the exported graph there (``models.fomm.export.cached_detector_onnx``) for the next start."""

    def __init__(self, model: MotionModel, device: str = "cpu", fast: bool = True, threads: int = 1,
                 cache_dir: Path | None = None) -> None:
        self.model = model.to(device).eval()
        self.device = device
        self.size = model.config.motion_size  # the detector's input size
        self.session = None
        if fast and device == "cpu":
            try:
                self.session = self._session(cache_dir, threads)
            except Exception as e:  # any exporter/runtime failure must leave eager extraction working
                log.warning("ONNX Runtime keypoint extraction unavailable (%s); using eager PyTorch", e)
                self.session = None

    def _session(self, cache_dir: Path | None, threads: int):  # returns an onnxruntime.InferenceSession
        frame = {"frame": np.zeros((1, 3, self.size, self.size), np.float32)}
        try:
            session = onnx_session(_detector_onnx(self.model, cache_dir), threads)
            session.run(None, frame)
            return session
        except Exception as e:  # a damaged cached file: export afresh before giving up on ONNX
            if cache_dir is None:
                raise
            log.warning("cached detector graph unusable (%s): exporting it again", e)
        session = onnx_session(detector_onnx(self.model), threads)
        session.run(None, frame)
        return session

    @property
    def backend(self) -> str:
        return "onnxruntime" if self.session is not None else "torch"

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 RGB square of any size -> (60,) float32.

        The frame is shrunk to the detector's size here (area filter, as the training
        frames were), so a 256x256 capture costs the detector no more than a 64x64 one.
        """
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] != image.shape[1]:
            raise ValueError(f"expected a square RGB frame, got {image.shape}")
        if image.shape[0] != self.size:
            image = cv2.resize(image, (self.size, self.size), interpolation=cv2.INTER_AREA)
        if self.session is not None:
            x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
            return self.session.run(None, {"frame": x})[0][0].astype(np.float32)
        x = torch.from_numpy(image).to(self.device).permute(2, 0, 1)[None].float() / 255.0
        return self.model.keypoints(x)[0].cpu().numpy().astype(np.float32)
