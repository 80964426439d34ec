"""Keypoint series for forecasting: extraction (cached), splits and windows.

Each clip is run through the motion model's keypoint detector once; the (T, 60)
series is cached as ``<cache_dir>/<weights sha1[:12]>/<clip>.npz``, so a new detector
checkpoint gets a fresh cache automatically and an old one is never silently reused.

Windows are ``n_obs`` observed + ``n_fut`` future frames cut from one clip. Nothing
here normalises with a clip's own statistics: the forecasters normalise with the
last observed frame and fixed training-split constants (see ``base.py``).
Clips are used at their native frame rate (25–30 fps in the shared data).
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.data import ClipInfo, load_clips, load_frames, split_by_group
from models.forecast.augment import AugmentConfig, augment_window, resample_speed

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path("runs/kp_cache")


@dataclass
class Series:
    name: str  # clip path relative to the data root (unique)
    group: str
    kp: np.ndarray  # (T, 60) float32
    fps: float | None = None
    clip: ClipInfo | None = None


def file_hash(path: str | Path, n: int = 12) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


def _cache_name(clip: ClipInfo, root: Path) -> str:
    try:
        rel = str(clip.path.relative_to(root))
    except ValueError:
        rel = str(clip.path)
    return re.sub(r"[^A-Za-z0-9_.-]+", "__", rel)


def extract_series(weights: str | Path, clips: list[ClipInfo], root: str | Path,
                   cache_dir: str | Path = DEFAULT_CACHE, batch: int = 64) -> list[Series]:
    """Keypoint series of every readable clip (cached per detector checkpoint)."""
    from models.fomm.io import load_motion_model  # heavy import only when extraction is needed

    root = Path(root)
    cdir = Path(cache_dir) / file_hash(weights)
    model = None
    out: list[Series] = []
    for clip in clips:
        name = _cache_name(clip, root)
        f = cdir / f"{name}.npz"
        if f.exists():
            kp = np.load(f)["kp"].astype(np.float32)
        else:
            if model is None:
                model, _ = load_motion_model(weights)
                cdir.mkdir(parents=True, exist_ok=True)
                log.info("extracting keypoints with %s into %s", weights, cdir)
            frames = load_frames([clip], model.config.size)
            if not frames:
                log.warning("skipping unreadable clip %s", clip.path)
                continue
            kp = keypoints_of_frames(model, frames[0], batch)
            tmp = f.with_suffix(".tmp.npz")
            np.savez(tmp, kp=kp)
            tmp.replace(f)
        out.append(Series(name, clip.group, kp, clip.fps, clip))
    return out


def keypoints_of_frames(model: torch.nn.Module, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    """(T, H, W, 3) uint8 at model size -> (T, 60) float32."""
    kps = []
    with torch.no_grad():
        for i in range(0, len(frames), batch):
            x = torch.from_numpy(frames[i:i + batch]).permute(0, 3, 1, 2).float() / 255.0
            kps.append(model.keypoints(x).float().numpy())
    return np.concatenate(kps).astype(np.float32)


def split_clips(data: str | Path, kinds: list[str] | None, split: str = "both",
                val_fraction: float = 0.15) -> tuple[list[ClipInfo], list[ClipInfo]]:
    """(train, val) clips of the project's group split; split='all' puts everything in val."""
    clips = load_clips(data, kinds)
    if not clips:
        raise FileNotFoundError(f"no clips of kinds {kinds} under {data}")
    if split == "all":
        return [], clips
    return split_by_group(clips, val_fraction)


def make_windows(series: list[Series] | list[np.ndarray], n_obs: int, n_fut: int,
                 stride: int | None = None) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Every window of n_obs + n_fut frames (start every ``stride`` frames, default n_fut).
    Returns (W, n_obs + n_fut, 60) and the (series index, start frame) of each."""
    stride = stride or n_fut
    length = n_obs + n_fut
    wins, idx = [], []
    for i, s in enumerate(series):
        kp = s.kp if isinstance(s, Series) else s
        for start in range(0, len(kp) - length + 1, stride):
            wins.append(kp[start:start + length])
            idx.append((i, start))
    if not wins:
        return np.zeros((0, length, kp_dim(series)), np.float32), []
    return np.stack(wins).astype(np.float32), idx


def kp_dim(series: list) -> int:
    for s in series:
        return (s.kp if isinstance(s, Series) else s).shape[-1]
    return 60


class WindowSampler:
    """Random training windows; clips drawn in proportion to how many windows they hold.
    With ``augment`` each window is (at random) resampled in time, flipped, reversed and
    translated (see ``augment.py``); input noise is the trainer's, as it depends on n_obs."""

    def __init__(self, series: list[np.ndarray], length: int, seed: int = 0,
                 augment: AugmentConfig | None = None) -> None:
        self.series = [s for s in series if len(s) >= length]
        if not self.series:
            raise ValueError(f"no series with at least {length} frames")
        self.length = length
        self.augment = augment
        counts = np.array([len(s) - length + 1 for s in self.series], dtype=np.float64)
        self.p = counts / counts.sum()
        self.rng = np.random.default_rng(seed)

    def sample(self, batch: int) -> np.ndarray:
        out = np.empty((batch, self.length, self.series[0].shape[-1]), np.float32)
        aug = self.augment
        for j, ci in enumerate(self.rng.choice(len(self.series), size=batch, p=self.p)):
            s = self.series[ci]
            if aug is not None and self.length > 1 and self.rng.random() < aug.speed_p:
                # never ask for more frames than the clip has (short clips get a lower top speed)
                top = min(aug.speed_max, (len(s) - 1) / (self.length - 1))
                speed = self.rng.uniform(min(aug.speed_min, top), top)
                st = self.rng.uniform(0.0, len(s) - 1 - speed * (self.length - 1))
                out[j] = resample_speed(s, st, speed, self.length)
            else:
                st = self.rng.integers(0, len(s) - self.length + 1)
                out[j] = s[st:st + self.length]
            if aug is not None:
                out[j] = augment_window(out[j], aug, self.rng)
        return out
