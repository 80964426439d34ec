"""68-point face landmarks from dlib (a detector nobody here trained), cached per clip.

Usage:
  python -m models.landmarks --data ../shared/data --out cache/landmarks_face256.npz   # ~5 min on 2 cores

Two uses: (1) ``bench.expression`` scores rendered faces with it, an external yardstick;
(2) training anchors some of the 10 unsupervised keypoints to eye and mouth landmark
groups (``anchor_targets``), so motion of the eyelids and lips reaches the wire.

The model files ship inside the ``face_recognition_models`` package (nothing is
downloaded); its ``__init__`` needs ``pkg_resources``, so the files are located
through ``importlib`` instead. HOG detection costs ~30 ms on a 256x256 frame, the
shape predictor ~2 ms: the cache detects every ``stride``-th frame and reuses the
nearest earlier box in between (faces in the clips move little in 5 frames).
Coordinates are pixels of the clip's 256x256 centre square, dlib's 0-based indices.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

LANDMARK_SIZE = 256  # frames are scored / labelled at this size

# The 68-point scheme's indices, left/right as seen in the image.
EYE_IMAGE_LEFT = list(range(36, 42))  # the person's right eye
EYE_IMAGE_RIGHT = list(range(42, 48))
MOUTH = list(range(48, 68))
CHIN = list(range(5, 12))
# Anchor groups in a fixed order; training ties one keypoint to each group.
ANCHOR_GROUPS: dict[str, list[int]] = {
    "eye_left": EYE_IMAGE_LEFT, "eye_right": EYE_IMAGE_RIGHT, "mouth": MOUTH, "chin": CHIN}

# Index i of a horizontally flipped face is point MIRROR[i] of the original.
_PAIRS = ([(i, 16 - i) for i in range(8)] + [(17 + i, 26 - i) for i in range(5)] + [(31, 35), (32, 34)]
          + [(36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46)]
          + [(48, 54), (49, 53), (50, 52), (55, 59), (56, 58), (60, 64), (61, 63), (65, 67)])
MIRROR = np.arange(68)
for _a, _b in _PAIRS:
    MIRROR[_a], MIRROR[_b] = _b, _a


def model_file(name: str) -> Path:
    """Path of one of the .dat files shipped in the face_recognition_models package."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("face landmarks need `pip install dlib-bin face_recognition_models` (see requirements.txt)")
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / name
    if not path.exists():
        raise RuntimeError(f"face_recognition_models has no {name}")
    return path


class FaceLandmarks:
    """dlib's HOG face detector, 68-point shape predictor and 128-d face descriptor."""

    def __init__(self, descriptors: bool = False) -> None:
        import dlib  # imported here: only landmark users need it

        self._dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.predictor = dlib.shape_predictor(str(model_file("shape_predictor_68_face_landmarks.dat")))
        self.recognizer = (dlib.face_recognition_model_v1(str(model_file("dlib_face_recognition_resnet_model_v1.dat")))
                           if descriptors else None)

    def detect(self, frame: np.ndarray, upsample: int = 0) -> tuple[int, int, int, int] | None:
        """Largest face box (left, top, right, bottom) in an RGB uint8 frame, or None."""
        rects = self.detector(np.ascontiguousarray(frame), upsample)
        if not rects:
            return None
        r = max(rects, key=lambda r: r.width() * r.height())
        return r.left(), r.top(), r.right(), r.bottom()

    def _shape(self, frame: np.ndarray, box: tuple[int, int, int, int]):  # returns a dlib type
        return self.predictor(np.ascontiguousarray(frame), self._dlib.rectangle(*box))

    def shape(self, frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """(68, 2) float32 pixel coordinates of the face in ``box``."""
        s = self._shape(frame, box)
        return np.array([(p.x, p.y) for p in s.parts()], dtype=np.float32)

    def descriptor(self, frame: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """128-d identity embedding (dlib ResNet) of the face in ``box``."""
        if self.recognizer is None:
            raise RuntimeError("FaceLandmarks(descriptors=True) is needed for descriptors")
        frame = np.ascontiguousarray(frame)
        return np.array(self.recognizer.compute_face_descriptor(frame, self._shape(frame, box)), dtype=np.float32)


def clip_landmarks(frames: np.ndarray, fl: FaceLandmarks, stride: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Landmarks of every frame of a (T, H, W, 3) clip: ((T, 68, 2) float32, (T,) bool valid).

    Detects on every ``stride``-th frame; a frame between detections uses the latest
    box (or, before the first detection, the next one). Frames with no box are invalid.
    """
    t = len(frames)
    boxes: dict[int, tuple[int, int, int, int]] = {}
    for i in range(0, t, stride):
        b = fl.detect(frames[i])
        if b is not None:
            boxes[i] = b
    lm = np.zeros((t, 68, 2), np.float32)
    valid = np.zeros(t, bool)
    if not boxes:
        return lm, valid
    keys = np.array(sorted(boxes))
    for i in range(t):
        earlier = keys[keys <= i]
        k = earlier[-1] if len(earlier) else keys[0]
        if abs(int(k) - i) > stride:
            continue
        lm[i] = fl.shape(frames[i], boxes[int(k)])
        valid[i] = True
    return lm, valid


# --------------------------------------------------------------------------- anchors


def to_unit(points_px: np.ndarray | torch.Tensor, size: int = LANDMARK_SIZE):
    """Pixel coordinates of a size x size frame -> the keypoints' [-1, 1] (pixel centres at the ends)."""
    return points_px * (2.0 / (size - 1)) - 1.0


def mirror(lm_unit: torch.Tensor) -> torch.Tensor:
    """Landmarks (.., 68, 2) in [-1, 1] of the horizontally flipped frame."""
    out = lm_unit[..., torch.as_tensor(MIRROR), :].clone()
    out[..., 0] = -out[..., 0]
    return out


@dataclass
class AnchorTemplates:
    """Mean centred shape of each anchor group in [-1, 1] units (G lists of (n_g, 2))."""

    shapes: list[torch.Tensor]

    @classmethod
    def fit(cls, lm_unit: torch.Tensor) -> AnchorTemplates:
        """From (N, 68, 2) training landmarks."""
        shapes = []
        for idx in ANCHOR_GROUPS.values():
            g = lm_unit[:, idx]
            shapes.append((g - g.mean(1, keepdim=True)).mean(0))
        return cls(shapes)

    def to_list(self) -> list[list[list[float]]]:
        return [s.tolist() for s in self.shapes]

    @classmethod
    def from_list(cls, data: list[list[list[float]]]) -> AnchorTemplates:
        return cls([torch.tensor(s, dtype=torch.float32) for s in data])


def anchor_targets(lm_unit: torch.Tensor, templates: AnchorTemplates) -> tuple[torch.Tensor, torch.Tensor]:
    """Keypoint targets for (B, 68, 2) landmarks: centres (B, G, 2) and Jacobians (B, G, 2, 2).

    The Jacobian is the least-squares affine map from the group's template shape to
    its shape in this frame (both centred), i.e. the local affine FOMM's Jacobians
    stand for: an eye that closes shrinks its vertical scale, an opening mouth grows it.
    """
    centres, jacs = [], []
    for idx, tmpl in zip(ANCHOR_GROUPS.values(), templates.shapes, strict=True):
        g = lm_unit[:, idx]
        c = g.mean(1)
        p = g - c[:, None]  # B, n, 2
        t = tmpl.to(p)  # n, 2
        # A = P^T T (T^T T)^-1, with rows as points: p_i ~ A t_i
        a = p.transpose(1, 2) @ t @ torch.linalg.inv(t.T @ t)
        centres.append(c)
        jacs.append(a)
    return torch.stack(centres, 1), torch.stack(jacs, 1)


def region_mask(lm_unit: torch.Tensor, size: int, scale: float = 1.6) -> torch.Tensor:
    """(B, 1, size, size) soft mask over the eyes and the mouth: a round Gaussian per group
    (1/e at ``scale`` x half the group's width from its centre); where expression lives."""
    from models.fomm.blocks import make_coordinate_grid

    grid = make_coordinate_grid(size, size).to(lm_unit)  # size, size, 2 (x, y)
    mask = lm_unit.new_zeros(lm_unit.shape[0], size, size)
    for idx in (EYE_IMAGE_LEFT, EYE_IMAGE_RIGHT, MOUTH):
        g = lm_unit[:, idx]
        c = g.mean(1)
        # round, as wide as the group: an eye's eyelids sit above and below its 6 points
        radius = (g.amax(1) - g.amin(1)).amax(-1).clamp(min=0.04) * scale / 2  # B
        d = (grid[None] - c[:, None, None]) / radius[:, None, None, None]
        mask = torch.maximum(mask, torch.exp(-(d ** 2).sum(-1)))
    return mask[:, None]


# --------------------------------------------------------------------------- cache


def _one_clip(args: tuple[str, str, str, int]) -> tuple[str, np.ndarray, np.ndarray]:
    from models.data import center_square, read_clip

    key, path, fmt, stride = args
    fl = _worker_fl()
    frames = read_clip(path, "png_stack" if fmt == "png_stack" else "video")
    frames = np.stack([center_square(f, LANDMARK_SIZE) for f in frames])
    lm, valid = clip_landmarks(frames, fl, stride)
    return key, lm, valid


_FL: FaceLandmarks | None = None


def _worker_fl() -> FaceLandmarks:
    global _FL
    if _FL is None:
        _FL = FaceLandmarks()
    return _FL


def cache_key(path: Path, root: Path) -> str:
    return str(Path(path).resolve().relative_to(Path(root).resolve()))


class LandmarkCache:
    """Landmarks per clip, loaded once into memory (an NpzFile re-reads on every access)."""

    def __init__(self, path: str | Path) -> None:
        with np.load(path) as z:
            self.root = str(z["root"])
            keys = [str(k) for k in z["keys"]]
            lm, valid, offsets = z["landmarks"], z["valid"], z["offsets"]
        self.items = {k: (lm[offsets[i]:offsets[i + 1]].astype(np.float32), valid[offsets[i]:offsets[i + 1]])
                      for i, k in enumerate(keys)}

    def get(self, path: Path, root: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
        return self.items.get(cache_key(path, root))


def main(argv: list[str] | None = None) -> None:
    from models.data import load_clips

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--kinds", nargs="+", default=["face"])
    p.add_argument("--out", default="cache/landmarks_face256.npz")
    p.add_argument("--stride", type=int, default=5, help="HOG detection every N frames")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    clips = load_clips(a.data, a.kinds)
    jobs = [(cache_key(c.path, a.data), str(c.path), c.format, a.stride) for c in clips]
    t0 = time.time()
    keys, lms, valids = [], [], []
    # Spawned, not forked, workers: a fork inherits the parent's signal handlers and threads. In a
    # pytest-xdist worker a SIGTERM handler left by an in-process sender main kept the forked pool
    # worker alive through Pool.terminate(), and the suite hung on its join.
    with get_context("spawn").Pool(a.workers) as pool:
        for n, (key, lm, valid) in enumerate(pool.imap(_one_clip, jobs), 1):
            keys.append(key)
            lms.append(lm.astype(np.float16))
            valids.append(valid)
            if n % 20 == 0:
                log.info("%d/%d clips, %.0f s", n, len(jobs), time.time() - t0)
    offsets = np.cumsum([0] + [len(v) for v in valids])
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, root=str(Path(a.data).resolve()), keys=np.array(keys), offsets=offsets,
                        landmarks=np.concatenate(lms), valid=np.concatenate(valids))
    n_valid = int(sum(v.sum() for v in valids))
    log.info("wrote %s: %d clips, %d frames, %d with a face (%.1f %%), %.0f s", out, len(keys), offsets[-1],
             n_valid, 100 * n_valid / max(1, offsets[-1]), time.time() - t0)


if __name__ == "__main__":
    main()
