"""Frame capture from a camera or a video file, cropped to a square (``sender.framing``) and resized."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sender.framing import Framer, FramingConfig
from sender.pacing import LateFrames

log = logging.getLogger(__name__)


class CaptureError(RuntimeError):
    """The camera or file cannot be opened or read."""


@dataclass
class CaptureConfig:
    camera: int | None = None  # camera index (cv2.VideoCapture(N))
    video: str | None = None  # or a video file, paced at its own frame rate (or fps)
    fps: float | None = None  # None: the file's rate, 30 for a camera
    size: int = 64  # output square size (the model's)
    loop: bool = False  # restart a file at its end
    max_frames: int | None = None  # stop after this many frames
    mirror: bool = False  # flip horizontally (a selfie view)


@dataclass
class CapturedFrame:
    seq: int
    capture_us: int  # wall-clock time of capture, microseconds
    image: np.ndarray  # (size, size, 3) uint8 RGB
    read_ms: float = 0.0  # time to read, crop and resize the frame
    framing: int = 0  # Framer generation of the square this frame was cut from (changes: new source image due)


class FrameSource:
    """Opens the device or file up front so a missing camera fails before any call is made."""

    def __init__(self, config: CaptureConfig, framer: Framer | None = None) -> None:
        self.config = config
        # Default: the centre square, as the sender always did; the sender passes a face Framer.
        self.framer = framer or Framer(FramingConfig(mode="centre", size=config.size))
        if (config.camera is None) == (config.video is None):
            raise CaptureError("give exactly one of a camera index or a video file")
        if config.video is not None:
            if not Path(config.video).is_file():
                raise CaptureError(f"video file not found: {config.video}")
            self.cap = cv2.VideoCapture(config.video)
            what = f"video file {config.video}"
        else:
            self.cap = cv2.VideoCapture(int(config.camera))
            what = f"camera {config.camera}"
        if not self.cap.isOpened():
            raise CaptureError(f"cannot open {what} (is it connected, and not used by another program?)")
        ok, first = self.cap.read()
        if not ok or first is None:
            self.cap.release()
            raise CaptureError(f"{what} opened but gave no frame")
        self._first: np.ndarray | None = first
        self.framer.prime(self._rgb(first))  # before any call: the first source image is already framed
        self._generation = 0
        native = self.cap.get(cv2.CAP_PROP_FPS) if config.video is not None else 0.0
        self.fps = float(config.fps or (native if 1.0 <= native <= 120.0 else 30.0))
        self.asked_fps = self.fps
        self.stride = 1  # keep every stride-th frame (sender.pacing: what this machine can hold)
        self.late = LateFrames(self.fps)
        self.what = what
        self._resync = False

    def set_stride(self, k: int) -> None:
        """Keep only every ``k``-th frame from now on: the frame rate becomes the asked one / ``k``
        (a file still plays in real time; the frames between are read and dropped)."""
        if k < 1:
            raise ValueError("stride must be >= 1")
        self.stride = k
        self.fps = self.asked_fps / k
        self.late = LateFrames(self.fps)

    def _rgb(self, bgr: np.ndarray) -> np.ndarray:
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        return np.ascontiguousarray(rgb[:, ::-1]) if self.config.mirror else rgb

    def _prepare(self, bgr: np.ndarray) -> np.ndarray:
        image, self._generation = self.framer.crop(self._rgb(bgr))
        return image

    def read(self) -> np.ndarray | None:
        """Next frame (RGB, square, model size) or None at the end of a file."""
        if self._first is not None:
            bgr, self._first = self._first, None
            return self._prepare(bgr)
        for _ in range(self.stride - 1):  # dropped frames: grabbed (decoded), never converted or framed
            if not self.cap.grab() and self.config.video is not None and self.config.loop:
                self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
        ok, bgr = self.cap.read()
        if not ok and self.config.video is not None and self.config.loop:
            self.cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self.cap.read()
        if not ok or bgr is None:
            if self.config.camera is not None:
                raise CaptureError(f"{self.what} stopped delivering frames")
            return None
        return self._prepare(bgr)

    def resync(self) -> None:
        """Restart a file's clock at the frame just given: after the caller held the stream (waiting for
        the receiver) the next frame comes a period after now, instead of the file catching up in a burst."""
        self._resync = True

    async def frames(self) -> AsyncIterator[CapturedFrame]:
        """Frames paced at ``self.fps``; a camera paces itself, a file is paced by sleeping."""
        period = 1.0 / self.fps
        start = time.monotonic()
        seq = 0
        while self.config.max_frames is None or seq < self.config.max_frames:
            if self._resync:
                start, self._resync = time.monotonic() - (seq - 1) * period, False
            if self.config.video is not None:
                delay = start + seq * period - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    self.late.observe(-delay, time.monotonic())
            t0 = time.perf_counter()
            image = await asyncio.to_thread(self.read) if self.config.camera is not None else self.read()
            if image is None:
                return
            yield CapturedFrame(seq, time.time_ns() // 1000, image, (time.perf_counter() - t0) * 1000,
                                self._generation)
            seq += 1

    def close(self) -> None:
        self.cap.release()
        self.framer.close()
