"""Face framing at the sender: which square of the camera frame becomes the call's picture.

The shipped models were trained on clips framed like VoxCeleb (``../shared/data/SOURCES.md``,
"Added 2026-12"): one fixed square per chunk, centred on the dlib-HOG face box moved up by
10 % of its height, 1.9x the face width on a side. A webcam's centre square frames a person
much looser (the face fills ~0.25 of the square's width instead of ~0.53), so the detector and
the renderer see faces of a size they never learned. :class:`Framer` picks the training square.

Why a fixed square and not per-frame tracking: the keypoints describe motion against the
source image the receiver holds. Moving the crop moves the picture under the keypoints, so the
square stays put while the face stays inside a margin (head motion is then motion, as in the
training clips); when the face leaves it (the person moved, the camera was bumped) the square
jumps to the new place once and the sender sends a new source image for it
(:attr:`Framer.generation` changes).

Detection (~10-60 ms per 640x480 frame on one core) runs in a worker thread on every
``detect_every``-th frame, and only when the previous detection has finished: :meth:`Framer.crop`
never waits for it. A decision takes effect on the next frame cropped after it. dlib releases
the GIL while it detects, so the worker does not stall the event loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from sender.priority import worker_pool

log = logging.getLogger(__name__)

FaceBox = tuple[int, int, int, int]  # left, top, right, bottom (pixels, dlib's convention)
Square = tuple[int, int, int]  # x0, y0, side (pixels of the full frame)
Detector = Callable[[np.ndarray], "FaceBox | None"]

FRAMING_MODES = ("face", "centre")


@dataclass
class FramingConfig:
    mode: str = "face"  # "face": training-style square around the face; "centre": the frame's centre square
    size: int = 256  # output side (the captured square sent to the extractor and as the source image)
    scale: float = 1.9  # square side / face-box width (training clips)
    lift: float = 0.10  # square centre = face-box centre moved up by this fraction of the box height
    # Re-frame only when the face centre has moved more than this fraction of the square's side
    # from where it was when the square was chosen (the training data allowed 0.25 within a
    # chunk; talking-head jitter and HOG box noise stay well under 0.15) ...
    max_shift: float = 0.15
    # ... or its width has changed by more than this factor (leaning in or away). dlib's boxes come
    # in image-pyramid steps ~1.2x apart, so a still face can flip between two widths: stay above that.
    max_scale_change: float = 1.3
    # Consecutive out-of-margin detections needed to re-frame: one bad box must not move the picture.
    confirm: int = 2
    # A new square that differs from the current one by at most this fraction of its side is not a
    # re-frame (e.g. both clamped to the whole frame): no new source image for nothing.
    min_change: float = 0.03
    detect_every: int = 5  # submit a detection every N frames (skipped while one is running)
    detect_max_side: int = 640  # larger frames are shrunk to this for detection (HOG's cost grows with area)
    upsample: int = 0  # dlib upsampling: 1 finds faces down to ~40 px instead of ~80 px, at 4x the cost
    threaded: bool = True  # False: detect inline (tests, offline use)
    nice: int = 0  # the worker thread runs this many nice steps below its caller (sender.priority)


def face_square(face: FaceBox, frame_hw: tuple[int, int], scale: float = 1.9, lift: float = 0.10) -> Square:
    """The training clips' square for one face box, clamped to the frame (shrunk if it is too big)."""
    left, top, right, bottom = face
    h, w = frame_hw
    fw, fh = right - left, bottom - top
    cx, cy = (left + right) / 2, (top + bottom) / 2 - lift * fh
    side = int(round(min(scale * fw, h, w)))
    side = max(side, 1)
    x0 = int(round(min(max(cx - side / 2, 0), w - side)))
    y0 = int(round(min(max(cy - side / 2, 0), h - side)))
    return x0, y0, side


def centre_square(frame_hw: tuple[int, int]) -> Square:
    """The largest centred square (what ``models.data.center_square`` crops)."""
    h, w = frame_hw
    s = min(h, w)
    return (w - s) // 2, (h - s) // 2, s


def crop_square(frame: np.ndarray, square: Square, size: int) -> np.ndarray:
    """Cut ``square`` out of ``frame`` and resize it to ``size`` (area filter when shrinking)."""
    x0, y0, s = square
    crop = frame[y0:y0 + s, x0:x0 + s]
    if s == size:
        return np.ascontiguousarray(crop)
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA if s > size else cv2.INTER_LINEAR)


def dlib_detector(upsample: int = 0) -> Detector:
    """dlib's HOG face detector, as a frame -> box function: the box ``models.landmarks.FaceLandmarks.detect``
    gives (the largest face; what the training clips were framed by; tests/test_framing.py checks they agree).

    Only the detector is built: ``FaceLandmarks`` also loads the 68-point shape predictor (~1 s,
    100 MB), which framing never uses, and every sender start would wait for it.
    """
    import dlib  # imported here: only face framing needs it

    detector = dlib.get_frontal_face_detector()

    def detect(frame: np.ndarray) -> FaceBox | None:
        rects = detector(np.ascontiguousarray(frame), upsample)
        if not rects:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        return r.left(), r.top(), r.right(), r.bottom()

    return detect


class FramingDecision:
    """Keeps a square while detections stay inside the margin; no threads, no pixels.

    :meth:`update` takes one detection (or None) and returns the new square when the
    framing changes, else None. :attr:`square` is the square in force.
    """

    def __init__(self, config: FramingConfig, frame_hw: tuple[int, int]) -> None:
        self.config = config
        self.frame_hw = frame_hw
        self.square: Square = centre_square(frame_hw)
        self.anchor: FaceBox | None = None  # the face the square was chosen for
        self.out_of_margin = 0
        self.face_lost = False
        self.detections = 0
        self.no_face = 0
        self.last_face: FaceBox | None = None

    def _inside(self, face: FaceBox) -> bool:
        assert self.anchor is not None
        side = self.square[2]
        (ax, ay), (fx, fy) = _centre(self.anchor), _centre(face)
        aw, fw = self.anchor[2] - self.anchor[0], face[2] - face[0]
        shift = max(abs(fx - ax), abs(fy - ay)) / side
        change = max(fw / max(aw, 1), aw / max(fw, 1))
        return shift <= self.config.max_shift and change <= self.config.max_scale_change

    def update(self, face: FaceBox | None) -> Square | None:
        self.detections += 1
        if face is None:
            self.no_face += 1
            if not self.face_lost:  # once per loss, not per detection: a camera left running would flood the log
                log.warning("no face in view: holding the framing %s", self.square)
                self.face_lost = True
            return None
        if self.face_lost:
            log.info("face back in view")
            self.face_lost = False
        self.last_face = face
        if self.anchor is not None and self._inside(face):
            self.out_of_margin = 0
            return None
        if self.anchor is not None:
            self.out_of_margin += 1
            if self.out_of_margin < self.config.confirm:
                return None
        self.out_of_margin = 0
        first = self.anchor is None
        self.anchor = face
        new = face_square(face, self.frame_hw, self.config.scale, self.config.lift)
        if not first and _moved(self.square, new) <= self.config.min_change:
            return None  # the face moved but the (clamped) square would not: new anchor, same picture
        self.square = new
        log.info("%s %s (face %s)", "framed" if first else "re-framed", new, face)
        return new


class Framer:
    """Crops each captured frame to the current square; decides the square off the hot path.

    ``crop(frame)`` returns the model-size square and the framing generation it belongs to;
    the generation starts at 0 and grows by one at every re-frame (a new source image is due).
    """

    def __init__(self, config: FramingConfig, detector: Detector | None = None) -> None:
        if config.mode not in FRAMING_MODES:
            raise ValueError(f"--framing must be one of {FRAMING_MODES}, not {config.mode!r}")
        self.config = config
        self._detector = detector
        self._decision: FramingDecision | None = None
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self._frames = 0
        self._cropped = False  # a crop has been handed out: from now on a new square needs a new source image
        self.generation = 0
        self.detect_ms: list[float] = []
        if config.mode == "face" and detector is None:
            self._detector = dlib_detector(config.upsample)
        if config.mode == "face" and config.threaded:
            self._pool = worker_pool("framing", config.nice)

    @property
    def square(self) -> Square | None:
        return self._decision.square if self._decision is not None else None

    def _detect(self, frame: np.ndarray) -> FaceBox | None:
        assert self._detector is not None
        t0 = time.perf_counter()
        h, w = frame.shape[:2]
        f = self.config.detect_max_side / max(h, w)
        if f < 1.0:
            small = cv2.resize(frame, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
            box = self._detector(small)
            if box is not None:
                box = tuple(int(round(v / f)) for v in box)  # type: ignore[assignment]
        else:
            box = self._detector(frame)
        self.detect_ms.append((time.perf_counter() - t0) * 1000)
        return box

    def _decide(self, frame: np.ndarray) -> None:
        box = self._detect(frame)
        with self._lock:
            assert self._decision is not None
            if self._decision.frame_hw != frame.shape[:2]:
                return  # the camera changed mode while this frame was being searched
            if self._decision.update(box) is not None and self._cropped:
                self.generation += 1

    def _worker(self, frame: np.ndarray) -> None:
        try:
            self._decide(frame)
        except Exception:  # a detector failure must not end the call: keep the current square
            log.exception("face detection failed")

    def prime(self, frame: np.ndarray) -> None:
        """Detect inline on the first frame (before the call starts), so the first source image is framed."""
        if self._decision is None:
            self._decision = FramingDecision(self.config, frame.shape[:2])
        if self.config.mode == "face":
            self._decide(frame)

    def crop(self, frame: np.ndarray) -> tuple[np.ndarray, int]:
        """(size, size, 3) crop of the RGB frame in the current square, and its framing generation."""
        if self._decision is None or self._decision.frame_hw != frame.shape[:2]:
            with self._lock:  # a new camera mode: start over from the centre square
                self._decision = FramingDecision(self.config, frame.shape[:2])
                self.generation += int(self._cropped)
        if self.config.mode == "face":
            if self._frames % self.config.detect_every == 0:
                if self._pool is None:
                    self._decide(frame)
                elif self._pending is None or self._pending.done():
                    self._pending = self._pool.submit(self._worker, frame.copy())  # the caller may reuse its buffer
            self._frames += 1
        with self._lock:
            square, generation = self._decision.square, self.generation
            self._cropped = True
        return crop_square(frame, square, self.config.size), generation

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Block until the running detection (if any) has been applied (tests, shutdown)."""
        pending = self._pending
        if pending is not None:
            pending.result(timeout_s)

    def stats(self) -> dict:
        """What the sender reports: the mode, the square, detections, frames without a face, re-frames."""
        d = self._decision
        out: dict = {"framing": self.config.mode}
        if d is not None:
            out.update(framing_square=list(d.square), framing_detections=d.detections,
                       framing_no_face=d.no_face, framing_reframes=self.generation,
                       framing_face_lost=d.face_lost)
            if d.last_face is not None:
                out["framing_face_width_ratio"] = (d.last_face[2] - d.last_face[0]) / d.square[2]
        if self.detect_ms:
            out["framing_detect_ms_p50"] = float(np.percentile(self.detect_ms, 50))
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _centre(box: FaceBox) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _moved(a: Square, b: Square) -> float:
    """How far apart two squares are, as a fraction of the larger side."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1]), abs(a[2] - b[2])) / max(a[2], b[2])
