"""The eyes and the mouth enlarged under a side-by-side frame: what a viewer looks at, at a size one can judge.

Whole frames at 256x256 hide what issue #29 is about (an eye a few pixels tall that stays shut, a mouth that
opens a third as wide). ``ZoomTracker`` locates both eyes and the mouth on the *input* frames with dlib's 68
landmarks (the face re-detected every ``redetect`` frames and its box moved with the landmarks between, since
the shape predictor reads landmarks well only in the detector's own kind of box; boxes smoothed over time so
the crops do not shake), and ``zoom_panel`` puts the same crops of the input and of the rendered frame under each:

    input frame    | rendered frame
    eye  | eye     | eye  | eye
    mouth          | mouth

The rendered frame is cropped where the input's landmarks are: a render that puts the eye elsewhere shows
it off-centre, which is the point. For viewing only (bicubic enlargement); no number is read from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

log = logging.getLogger(__name__)

EYE_LEFT = slice(36, 42)  # dlib 68-point indices (image-left eye first)
EYE_RIGHT = slice(42, 48)
MOUTH = slice(48, 68)


@dataclass
class ZoomConfig:
    """Parameters of the crops.

    ``eye_aspect`` / ``mouth_aspect``: width / height of the crop boxes; ``eye_margin`` / ``mouth_margin``:
    crop width as a multiple of the eye's (corner to corner) or the mouth's width; ``smooth``: weight of the
    previous frame's box (exponential smoothing, 0 = none); ``redetect``: frames between face detections (the
    landmarks of the other frames are read in the detector's box, moved as the landmarks moved)."""

    eye_aspect: float = 5 / 3
    mouth_aspect: float = 3 / 2
    eye_margin: float = 1.8
    mouth_margin: float = 1.5
    smooth: float = 0.6
    redetect: int = 15


def region_boxes(landmarks: np.ndarray, config: ZoomConfig | None = None) -> np.ndarray:
    """(68, 2) px landmarks -> (3, 4) float boxes (x0, y0, x1, y1): image-left eye, image-right eye, mouth."""
    c = config or ZoomConfig()
    lm = np.asarray(landmarks, np.float64)
    boxes = []
    for part, margin, aspect in ((EYE_LEFT, c.eye_margin, c.eye_aspect), (EYE_RIGHT, c.eye_margin, c.eye_aspect),
                                 (MOUTH, c.mouth_margin, c.mouth_aspect)):
        pts = lm[part]
        centre = (pts.min(0) + pts.max(0)) / 2
        w = max(float(np.ptp(pts[:, 0])) * margin, 4.0)
        h = w / aspect
        boxes.append([centre[0] - w / 2, centre[1] - h / 2, centre[0] + w / 2, centre[1] + h / 2])
    return np.array(boxes)


def crop(image: np.ndarray, box: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The ``box`` of ``image`` resampled to ``size`` (w, h), bicubic; outside the image is black."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = size
    m = np.array([[w / (x1 - x0), 0, -x0 * w / (x1 - x0)], [0, h / (y1 - y0), -y0 * h / (y1 - y0)]], np.float64)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_CUBIC, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


class ZoomTracker:
    """Eye and mouth boxes of a sequence of input frames (RGB uint8), one ``boxes`` call per frame in order."""

    def __init__(self, config: ZoomConfig | None = None, landmarks=None) -> None:  # landmarks: FaceLandmarks
        from models.landmarks import FaceLandmarks

        self.config = config or ZoomConfig()
        self.fl = landmarks or FaceLandmarks()
        self.face: tuple[int, int, int, int] | None = None  # the detector's last box
        self.anchor: np.ndarray | None = None  # the landmarks' centre in the frame it was detected in
        self.moved = np.zeros(2)
        self.last: np.ndarray | None = None
        self.count = 0

    def boxes(self, frame: np.ndarray) -> np.ndarray | None:
        """(3, 4) boxes for this frame, or None until a face has been found."""
        if self.face is None or self.count % self.config.redetect == 0:
            found = self.fl.detect(frame)
            if found is not None:
                self.face, self.anchor = found, None
        self.count += 1
        if self.face is None:
            return None
        box = self.face
        if self.anchor is not None:  # between detections: the detector's box moved with the landmarks' centre
            dx, dy = (int(round(v)) for v in self.moved)
            box = (box[0] + dx, box[1] + dy, box[2] + dx, box[3] + dy)
        lm = self.fl.shape(frame, box)
        centre = lm.mean(0)
        if self.anchor is None:
            self.anchor = centre
        self.moved = centre - self.anchor
        now = region_boxes(lm, self.config)
        s = self.config.smooth
        self.last = now if self.last is None else s * self.last + (1 - s) * now
        return self.last


def zoom_panel(image: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    """``image`` (S, S, 3) with its eyes and mouth enlarged below it, S wide: two eye crops side by side, then the
    mouth; black where ``boxes`` is None."""
    s = image.shape[1]
    ew, mw = s // 2, s
    eh, mh = int(round(ew * 3 / 5)), int(round(mw * 2 / 3))
    if boxes is None:
        strip = np.zeros((eh + mh, s, 3), np.uint8)
    else:
        eyes = np.concatenate([crop(image, boxes[0], (ew, eh)), crop(image, boxes[1], (s - ew, eh))], axis=1)
        strip = np.concatenate([eyes, crop(image, boxes[2], (mw, mh))], axis=0)
    return np.concatenate([image, strip], axis=0)


def side_by_side_zoomed(reference: np.ndarray, rendered: np.ndarray, boxes: np.ndarray | None) -> np.ndarray:
    """input | rendered, each with its enlarged eyes and mouth below (the input's boxes for both)."""
    if reference.shape != rendered.shape:
        raise ValueError(f"the two frames differ in shape: {reference.shape} vs {rendered.shape}")
    return np.concatenate([zoom_panel(reference, boxes), zoom_panel(rendered, boxes)], axis=1)
