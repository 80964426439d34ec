"""Helpers shared by the benchmarks: clip selection, model loading, rendering, metrics,
tables and JSON.

Frames are numpy ``(T, H, W, 3)``: ``uint8`` straight from the clip readers, ``float32`` in
[0, 1] for anything metric-related. All metrics are per frame first, then averaged.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from models.data import ClipInfo, load_clips, load_frames, split_by_group
from models.fomm.io import DEFAULT_WEIGHTS, load_motion_model
from models.fomm.model import MotionModel, SourceCache, cache_tensors

log = logging.getLogger(__name__)

PSNR_CAP_DB = 100.0  # identical frames have infinite PSNR; cap so means and JSON stay finite
MOVING_THRESHOLD = 0.1  # a pixel "moves" if source and driving differ by more (channel mean)
VAL_FRACTION = 0.15  # must match models.fomm.train so "val" means the same clips


# --------------------------------------------------------------------------- inputs


def set_threads(n: int = 2) -> None:
    torch.set_num_threads(n)


def resolve_weights(path: str | Path | None) -> Path:
    """The given weights, else the shipped default, else the newest training checkpoint."""
    if path is not None:
        return Path(path)
    for p in (DEFAULT_WEIGHTS, Path("runs/face64/best.pt"), Path("runs/face64/last.pt")):
        if p.exists():
            return p
    raise FileNotFoundError(f"no weights given and {DEFAULT_WEIGHTS} does not exist; pass --weights")


def load_model(path: str | Path | None) -> tuple[MotionModel, dict[str, Any], Path]:
    p = resolve_weights(path)
    model, meta = load_motion_model(p)
    return model, meta, p


def select_clips(data: str | Path, kinds: Sequence[str] | None, split: str) -> list[ClipInfo]:
    clips = load_clips(data, list(kinds) if kinds else None)
    if split == "val":
        clips = split_by_group(clips, VAL_FRACTION)[1]
    elif split != "all":
        raise ValueError(f"split must be 'val' or 'all', got {split!r}")
    if not clips:
        raise SystemExit(f"no clips of kinds {kinds} in split {split!r} under {data}")
    return clips


def load_selected(clips: list[ClipInfo], size: int, max_frames: int | None) -> list[tuple[ClipInfo, np.ndarray]]:
    """Decode clips at ``size``; clips that fail or are shorter than 2 frames are skipped."""
    out = []
    for c in clips:
        frames = load_frames([c], size, min_frames=2, max_frames=max_frames)
        if frames:
            out.append((c, frames[0]))
    if not out:
        raise SystemExit("no readable clips")
    return out


def clip_name(c: ClipInfo) -> str:
    return f"{c.group}/{c.name}" if c.group != c.name else c.name


# --------------------------------------------------------------------------- tensors and rendering


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T,H,W,3) uint8 or float [0,1] -> (T,3,H,W) float32 [0,1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    return x.permute(0, 3, 1, 2).contiguous()


def to_float(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """Tensor (T,3,H,W) or uint8 (T,H,W,3) -> float32 (T,H,W,3) in [0, 1]."""
    if isinstance(frames, torch.Tensor):
        return frames.detach().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy().astype(np.float32)
    if frames.dtype == np.uint8:
        return frames.astype(np.float32) / 255.0
    return frames.astype(np.float32)


@torch.no_grad()
def detect_keypoints(model: MotionModel, frames: np.ndarray, batch: int = 32) -> np.ndarray:
    """(T,H,W,3) -> (T,60) float32 keypoint vectors."""
    t = to_tensor(frames)
    return torch.cat([model.keypoints(t[i:i + batch]) for i in range(0, len(t), batch)]).numpy()


RENDERS = ("eager", "fp32", "int8")  # eager PyTorch; the receiver's CPU graph (FastRender) in fp32 / int8


@torch.no_grad()
def render_vectors(model: MotionModel, cache: SourceCache, vectors: np.ndarray, batch: int = 16,
                   render: str = "eager") -> np.ndarray:
    """Render one frame per keypoint vector -> float32 (N,H,W,3) in [0, 1].

    ``render``: ``eager`` (batched PyTorch) or the receiver's CPU renderer, ``fp32`` / ``int8``
    (``receiver.render.FastRender``, batch 1 as in a call), so a bench scores what a call shows.
    """
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    if render == "eager":
        t = torch.from_numpy(v)
        return to_float(torch.cat([model.render(cache, t[i:i + batch]) for i in range(0, len(t), batch)]))
    if render not in RENDERS:
        raise ValueError(f"render must be one of {RENDERS}, got {render!r}")
    from receiver.render import fast_render

    fast = fast_render(model, cache, int8=render == "int8")
    if fast is None or (render == "int8" and not fast.int8):
        raise SystemExit(f"no {render} ONNX Runtime renderer for this model (int8 needs its calibration ranges)")
    bound = fast.bind(cache_tensors(cache))
    out = np.concatenate([fast(bound, v[i:i + 1]) for i in range(len(v))])
    return np.clip(out, 0.0, 1.0).transpose(0, 2, 3, 1)


def prepare(model: MotionModel, source: np.ndarray) -> SourceCache:
    """Source cache for one (H,W,3) frame (uint8 or float)."""
    return model.prepare_source(to_tensor(source[None]))


# --------------------------------------------------------------------------- metrics


def l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float32) - b.astype(np.float32)).mean())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two float [0,1] frames (H,W,3), capped at PSNR_CAP_DB."""
    if np.array_equal(a, b):
        return PSNR_CAP_DB
    return float(min(PSNR_CAP_DB, peak_signal_noise_ratio(b, a, data_range=1.0)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two float [0,1] frames (H,W,3), scikit-image defaults (7x7 window)."""
    return float(structural_similarity(a, b, channel_axis=-1, data_range=1.0))


def moving_mask(source: np.ndarray, driving: np.ndarray, threshold: float = MOVING_THRESHOLD) -> np.ndarray:
    """(H,W) bool: pixels whose channel-mean |source - driving| exceeds the threshold."""
    return np.abs(source.astype(np.float32) - driving.astype(np.float32)).mean(-1) > threshold


def frame_metrics(pred: np.ndarray, ref: np.ndarray, source: np.ndarray) -> dict[str, Any]:
    """Per-clip metrics of predicted frames vs reference frames (both float (N,H,W,3)).

    ``l1``/``psnr``/``ssim`` are means of per-frame values. ``l1_moving`` pools |error| over
    every pixel (all frames) where the reference differs from ``source`` by more than
    MOVING_THRESHOLD: whole-frame metrics hide a model that moves the head but not the
    face; this one does not. NaN when no pixel moves (``moving_pixels`` = 0).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"shape mismatch {pred.shape} vs {ref.shape}")
    err_sum, n_mov = 0.0, 0
    for p, r in zip(pred, ref, strict=True):
        m = moving_mask(source, r)
        if m.any():
            err_sum += float(np.abs(p - r).mean(-1)[m].sum())
            n_mov += int(m.sum())
    return {
        "l1": float(np.mean([l1(p, r) for p, r in zip(pred, ref, strict=True)])),
        "psnr": float(np.mean([psnr(p, r) for p, r in zip(pred, ref, strict=True)])),
        "ssim": float(np.mean([ssim(p, r) for p, r in zip(pred, ref, strict=True)])),
        "l1_moving": err_sum / n_mov if n_mov else float("nan"),
        "moving_pixels": n_mov,
        "frames": len(ref),
    }


def mean_over_clips(rows: list[dict[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Mean of each key over clips, skipping NaN (e.g. l1_moving of a clip where nothing moves)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r[k] is not None and not (isinstance(r[k], float) and math.isnan(r[k]))]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


# --------------------------------------------------------------------------- output


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, Path):
        return str(x)
    return x


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    """Write JSON; NaN/inf become null so the file is strict JSON."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_jsonable(obj), indent=1, allow_nan=False) + "\n")


def fmt(x: Any) -> str:
    """Compact cell text: 4 significant digits for floats, '-' for missing."""
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return "nan" if math.isnan(x) else f"{x:.4g}"
    return str(x)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths, strict=True)))
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def new_figure(width: float = 7.0, height: float = 4.5):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def refiner_labels(paths: str | Path | list[str | Path] | None) -> dict[str, str | Path]:
    """``--refine-regions`` paths -> {label: path}: "" for one refiner, else each file's stem (with its folder
    where stems repeat); ValueError when a path is named twice. The benches name their rows with it."""
    paths = [] if paths is None else [paths] if isinstance(paths, str | Path) else list(paths)
    if len(paths) == 1:
        return {"": paths[0]}
    stems = [Path(p).stem for p in paths]
    labels = [f"{Path(p).parent.name}/{st}" if stems.count(st) > 1 else st for p, st in zip(paths, stems, strict=True)]
    if len(set(labels)) < len(labels):
        raise ValueError(f"--refine-regions names the same refiner twice: {paths}")
    return dict(zip(labels, paths, strict=True))


def refiner_paths(p: argparse.ArgumentParser, given: list[str] | None) -> list[str] | None:
    """``--refine-regions`` as parsed (``nargs="*"``) -> None (not asked), the shipped refiner (no PATH), or the
    paths given; an argument error when a path is named twice."""
    if given is None:
        return None
    paths = given or ["models/weights/region_refiner.pt"]
    try:
        refiner_labels(paths)
    except ValueError as e:
        p.error(str(e))
    return paths
