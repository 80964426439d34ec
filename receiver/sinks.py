"""Where rendered frames go: an mp4 file, a window, a virtual camera, or nowhere (for benchmarks)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)


class SinkError(RuntimeError):
    """A sink cannot be opened (bad spec, no display, unwritable path)."""


class Sink:
    def write(self, image: np.ndarray, seq: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class NullSink(Sink):
    def __init__(self) -> None:
        self.frames = 0

    def write(self, image: np.ndarray, seq: int) -> None:
        self.frames += 1


class FileSink(Sink):
    """H.264 mp4 (CRF 18, near-lossless) plus ``<path>.seq.json`` with the seq of each frame."""

    def __init__(self, path: str | Path, fps: float, size: int) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.container = av.open(str(self.path), mode="w")
        except (OSError, av.FFmpegError) as e:
            raise SinkError(f"cannot write {self.path}: {e}") from e
        rate = Fraction(fps).limit_denominator(1001)
        self.stream = self.container.add_stream("libx264", rate=rate)
        self.stream.width = self.stream.height = size
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "18", "preset": "veryfast"}
        self.seqs: list[int] = []

    def write(self, image: np.ndarray, seq: int) -> None:
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        for packet in self.stream.encode(frame):
            self.container.mux(packet)
        self.seqs.append(seq)

    def close(self) -> None:
        if self.container is None:
            return
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()
        self.container = None
        Path(str(self.path) + ".seq.json").write_text(json.dumps(self.seqs))


class WindowSink(Sink):
    def __init__(self, title: str = "kpcast") -> None:
        if sys.platform.startswith("linux") and not os.environ.get("DISPLAY") and not os.environ.get("WAYLAND_DISPLAY"):
            raise SinkError("no display for --sink window (DISPLAY is not set); use --sink file:out.mp4")
        import cv2
        self.cv2 = cv2
        self.title = title

    def write(self, image: np.ndarray, seq: int) -> None:
        self.cv2.imshow(self.title, self.cv2.resize(image[..., ::-1], (512, 512),
                                                    interpolation=self.cv2.INTER_NEAREST))
        self.cv2.waitKey(1)

    def close(self) -> None:
        self.cv2.destroyWindow(self.title)


VCAM_SIZE = 512  # video apps expect webcam-like sizes; the model renders 64-256 px


class VirtualCamSink(Sink):
    """A virtual webcam (pyvirtualcam: v4l2loopback on Linux, OBS's camera on Windows/macOS), so any
    video-call app can show the rendered call. pyvirtualcam is optional, imported only for this sink."""

    def __init__(self, fps: float, device: str | None = None, size: int = VCAM_SIZE) -> None:
        try:
            import pyvirtualcam
        except ImportError as e:
            raise SinkError(_VCAM_MISSING) from e
        try:
            self.cam = pyvirtualcam.Camera(width=size, height=size, fps=fps, device=device)
        except Exception as e:  # pyvirtualcam raises RuntimeError when there is no virtual camera device
            raise SinkError(f"cannot open a virtual camera: {e} (on Linux: modprobe v4l2loopback)") from e
        import cv2
        self.cv2 = cv2
        self.size = size
        log.info("virtual camera %s (%dx%d)", getattr(self.cam, "device", "?"), size, size)

    def write(self, image: np.ndarray, seq: int) -> None:
        if image.shape[:2] != (self.size, self.size):
            image = self.cv2.resize(image, (self.size, self.size), interpolation=self.cv2.INTER_LINEAR)
        self.cam.send(np.ascontiguousarray(image))

    def close(self) -> None:
        self.cam.close()


_VCAM_MISSING = ("--sink vcam needs the optional package pyvirtualcam (pip install pyvirtualcam) and, on Linux, "
                 "the v4l2loopback kernel module")


def make_sink(spec: str, fps: float, size: int, call_index: int = 0) -> Sink:
    """``null``, ``window``, ``vcam[:DEVICE]`` or ``file:PATH`` (later calls get ``_2``, ``_3``... before
    the suffix)."""
    if spec == "null":
        return NullSink()
    if spec == "window":
        return WindowSink()
    if spec == "vcam" or spec.startswith("vcam:"):
        return VirtualCamSink(fps, spec[5:] or None)
    if spec.startswith("file:") and len(spec) > 5:
        path = Path(spec[5:])
        if call_index > 0:
            path = path.with_name(f"{path.stem}_{call_index + 1}{path.suffix}")
        return FileSink(path, fps, size)
    raise SinkError(f"unknown sink '{spec}': use null, window, vcam[:DEVICE] or file:PATH")


def check_sink_spec(spec: str) -> None:
    """Fail at start-up, not at the first call, on a malformed spec."""
    if spec in ("null", "window") or (spec.startswith("file:") and len(spec) > 5):
        return
    if spec == "vcam" or spec.startswith("vcam:"):
        if importlib.util.find_spec("pyvirtualcam") is None:
            raise SinkError(_VCAM_MISSING)
        return
    raise SinkError(f"unknown sink '{spec}': use null, window, vcam[:DEVICE] or file:PATH")
