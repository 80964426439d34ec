"""Choosing the sender's inputs: which cameras open (``--list-cameras``), a chosen source image
(``--source-image``)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from sender.capture import CaptureError
from shared import protocol as P
from shared import source_image as S

log = logging.getLogger(__name__)


@dataclass
class CameraInfo:
    index: int
    width: int
    height: int
    fps: float
    backend: str


def list_cameras(max_index: int = 10) -> list[CameraInfo]:
    """Probe camera indices ``0..max_index-1``; the ones that open and deliver a frame."""
    try:  # OpenCV warns on stderr for every index that does not open; that is the expected case here
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:
        pass
    found = []
    for i in range(max_index):
        cap = cv2.VideoCapture(i)
        try:
            if not cap.isOpened():
                continue
            ok, frame = cap.read()
            if not ok or frame is None:
                continue
            fps = cap.get(cv2.CAP_PROP_FPS)
            found.append(CameraInfo(i, frame.shape[1], frame.shape[0], float(fps) if fps > 0 else 0.0,
                                    cap.getBackendName()))
        finally:
            cap.release()
    return found


def format_cameras(cams: list[CameraInfo], max_index: int = 10) -> str:
    if not cams:
        return f"no cameras found (probed indices 0-{max_index - 1}); use --video PATH to stream a file"
    lines = [f"camera {c.index}: {c.width}x{c.height}" + (f" @ {c.fps:.0f} fps" if c.fps else "") + f" ({c.backend})"
             for c in cams]
    return "\n".join(lines) + "\nuse --camera N"


def read_source_image(path: str | Path) -> bytes:
    """The file's bytes, sent as they are: a JPEG, PNG or WebP of at most
    ``shared.protocol.MAX_SOURCE_PIXELS`` (what receivers accept).

    Checked here so a wrong file fails before the call, not as a rejection on the receiver.
    """
    p = Path(path)
    if not p.is_file():
        raise CaptureError(f"source image not found: {p}")
    blob = p.read_bytes()
    if not blob:
        raise CaptureError(f"source image {p} is empty")
    if len(blob) > P.MAX_SOURCE_BYTES:
        raise CaptureError(f"source image {p} is {len(blob)} B; the limit is {P.MAX_SOURCE_BYTES} B "
                           "(re-save it smaller, e.g. as a JPEG)")
    try:
        S.source_image_size(blob)
    except P.ProtocolError as e:  # a receiver would refuse it
        raise CaptureError(f"source image {p} is not a picture OpenCV can decode and a receiver accepts "
                           f"({e.detail}; re-save it as a JPEG of at most {S.MAX_SOURCE_PIXELS} pixels)") from None
    img = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
    if img is None or img.ndim != 3:
        raise CaptureError(f"source image {p} is not a picture OpenCV can decode")
    return blob
