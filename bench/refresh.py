"""Does refreshing the source image keep a long call's quality? And what does it cost?

Usage:
  python -m bench.refresh --data ../shared/data --json out/bench/refresh.json --png out/bench/refresh.png
  python -m bench.refresh --data ../shared/data --group dfrf_faces/cnn2_25fps --size 256 --modes off render

A long clip: every chunk of ONE source video (``--group``; default: the held-out video with the
most frames), joined in order. Each chunk of the dataset has its own fixed crop, so the joins
behave like a camera that moved or a person who shifted in their chair: exactly when the first
frame stops being a good source. The call is replayed offline, frame by frame, as the sender and
the receiver would run it:

- the sender's keypoints (the shipped detector) for every frame;
- ``sender.refresh.RefreshMonitor`` (inline, the sender's defaults except ``--reference-s``) decides
  on each frame whether a new source image goes out; it is applied from the next frame on, as the
  sender does, JPEG-encoded at the sender's quality (90) and decoded as the receiver does;
- the receiver's model (``--size``) renders every frame from the source image in use.

Rows (``--modes``): ``off`` (one source image for the whole call: today's behaviour before
refresh), ``render`` and ``keypoints`` (the two estimators), and ``per_chunk`` (a new source at
every join, as if the sender knew: a reference, not something it can do).

Per row: mean SSIM (receiver's size) over the first ``--first-s`` seconds and over the whole call,
the worst ``--window-s`` window and its drop below the first seconds' (the target: at most 0.02),
the same between the first chunk and the worst chunk (chunk means),
mouth-opening correlation with the driving frames (dlib landmarks at 256, per chunk, averaged;
``--no-mouth`` skips it), refreshes, their bytes and their average rate.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from bench import common
from models.data import ClipInfo, load_clips, split_by_group
from models.fomm.io import load_motion_model, weights_for_size
from sender.refresh import RefreshConfig, RefreshMonitor

log = logging.getLogger(__name__)

MODES = ("off", "render", "keypoints", "per_chunk")
SOURCE_QUALITY = 90  # the sender's --source-quality default


def _n_frames(data: Path) -> dict[str, int]:
    manifest = data / "manifest.csv"
    if not manifest.exists():
        return {}
    with manifest.open() as f:
        return {str(data / r["path"]): int(r["n_frames"] or 0) for r in csv.DictReader(f)}


def pick_group(data: str | Path, group: str | None, split: str = "val") -> list[ClipInfo]:
    """The chunks of one source video, in order: ``group``, or the held-out one with the most frames."""
    data = Path(data)
    clips = load_clips(data, ["face"])
    pool = split_by_group(clips, common.VAL_FRACTION)[1] if split == "val" and group is None else clips
    by_group: dict[str, list[ClipInfo]] = {}
    for c in pool:
        by_group.setdefault(c.group, []).append(c)
    if group is None:
        frames = _n_frames(data)
        group = max(by_group, key=lambda g: (len(by_group[g]), sum(frames.get(str(c.path), 0) for c in by_group[g]), g))
    if group not in by_group:
        raise SystemExit(f"no face clips of group {group!r} under {data}")
    return sorted(by_group[group], key=lambda c: c.name)


def jpeg_round_trip(image: np.ndarray, quality: int = SOURCE_QUALITY) -> tuple[np.ndarray, int]:
    """What the receiver decodes from the sender's JPEG of ``image`` (RGB uint8), and its bytes."""
    ok, buf = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)[..., ::-1].copy(), len(buf)


def replay(mode: str, frames: np.ndarray, vectors: np.ndarray, fps: float, chunk_starts: list[int],
           estimate_model: Any, render_model: Any, size: int, reference_s: float,
           min_interval_s: float, drop: float = RefreshConfig.drop,
           window: int = RefreshConfig.window) -> dict[str, Any]:
    """One call: which source image is in use at each frame, and the SSIM of what is shown."""
    monitor = None
    if mode in ("render", "keypoints"):
        monitor = RefreshMonitor(RefreshConfig(mode=mode, threaded=False, reference_s=reference_s,
                                               min_interval_s=min_interval_s, drop=drop, window=window),
                                 estimate_model)
    sources: list[tuple[int, int]] = []  # (frame index, JPEG bytes)
    ssim: list[float] = []
    shown: list[np.ndarray] = []
    cache = None
    due = True
    starts = set(chunk_starts)
    check_ms: list[float] = []
    for i, frame in enumerate(frames):
        t = i / fps
        if due or (mode == "per_chunk" and i in starts):
            img, nbytes = jpeg_round_trip(frame)
            sources.append((i, nbytes))
            cache = common.prepare(render_model, cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
                                   if img.shape[0] != size else img)
            if monitor is not None:
                monitor.source_sent(frame, None, t)
            due = False
        if monitor is not None:
            t0 = time.perf_counter()
            due = monitor.observe(frame, vectors[i], t)
            check_ms.append((time.perf_counter() - t0) * 1000)
        out = common.render_vectors(render_model, cache, vectors[i:i + 1])[0]
        ref = common.to_float(frame if frame.shape[0] == size else
                              cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA))
        ssim.append(common.ssim(out, ref))
        shown.append((np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8))
    res = {"mode": mode, "ssim": ssim, "sources": sources, "shown": np.stack(shown)}
    if monitor is not None:
        res["estimates"] = monitor.estimates
        res["check_ms_max_inline"] = float(np.max(check_ms))  # a frame that ran a check (the sender: a worker)
        res["reference"] = monitor.reference
    return res


def window_means(x: np.ndarray, n: int) -> np.ndarray:
    n = max(1, min(n, len(x)))
    c = np.cumsum(np.concatenate([[0.0], x]))
    return (c[n:] - c[:-n]) / n


def mouth_corr(fl: Any, driving: np.ndarray, shown: np.ndarray, chunk_starts: list[int], stride: int) -> float:
    """Mouth-opening Pearson correlation with the driving frames, per chunk, averaged (bench.expression)."""
    from bench.expression import mouth_opening, pearson, upscale

    bounds = [*chunk_starts, len(driving)]
    corrs = []
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        d_open, s_open = [], []
        idx = list(range(a, b, stride))
        d_up, s_up = upscale(driving[idx]), upscale(shown[idx])
        for d, s in zip(d_up, s_up, strict=True):
            box = fl.detect(d)
            if box is None:
                continue
            d_open.append(mouth_opening(fl.shape(d, box)))
            s_open.append(mouth_opening(fl.shape(s, box)))
        corrs.append(pearson(np.array(d_open), np.array(s_open)))
    return float(np.mean(corrs)) if corrs else 0.0


def run(data: str, group: str | None, size: int, modes: list[str], first_s: float, window_s: float,
        reference_s: float, min_interval_s: float, mouth: bool, mouth_stride: int,
        max_frames: int | None, drop: float = RefreshConfig.drop,
        window: int = RefreshConfig.window) -> dict[str, Any]:
    torch.set_num_threads(2)
    clips = pick_group(data, group)
    fps = float(clips[0].fps or 25.0)
    parts = common.load_selected(clips, 256, max_frames)  # the sender's captured size
    frames = np.concatenate([f for _, f in parts])
    chunk_starts = list(np.cumsum([0] + [len(f) for _, f in parts[:-1]]).astype(int))
    sender_model, _ = load_motion_model(weights_for_size(64))  # the sender's default weights: also the estimate's
    render_model = sender_model if size == 64 else load_motion_model(weights_for_size(size))[0]
    with torch.no_grad():
        vectors = common.detect_keypoints(sender_model, np.stack(
            [cv2.resize(f, (64, 64), interpolation=cv2.INTER_AREA) for f in frames]))
    fl = None
    if mouth:
        from models.landmarks import FaceLandmarks
        fl = FaceLandmarks()
    rows = []
    for mode in modes:
        t0 = time.perf_counter()
        r = replay(mode, frames, vectors, fps, chunk_starts, sender_model, render_model, size, reference_s,
                   min_interval_s, drop, window)
        ssim = np.asarray(r["ssim"])
        first = float(ssim[: max(1, int(round(first_s * fps)))].mean())
        windows = window_means(ssim, int(round(window_s * fps)))
        worst = int(np.argmin(windows))
        refreshes = r["sources"][1:]
        bounds = [*chunk_starts, len(ssim)]
        chunks = [float(ssim[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
        row = {"mode": mode, "frames": len(ssim), "ssim_mean": float(ssim.mean()), "ssim_first": first,
               "ssim_worst_window": float(windows[worst]), "worst_window_start_s": worst / fps,
               "drop_below_first": first - float(windows[worst]), "chunk_ssim": chunks,
               "chunk_drop": chunks[0] - min(chunks), "source_images": len(r["sources"]),
               "refreshes": len(refreshes), "refresh_bytes": int(sum(b for _, b in refreshes)),
               "first_image_bytes": r["sources"][0][1],
               "refresh_kbps": sum(b for _, b in refreshes) * 8 / 1000 / (len(ssim) / fps),
               "refresh_at_s": [i / fps for i, _ in refreshes], "ssim": r["ssim"],
               "estimates": r.get("estimates"), "reference": r.get("reference"),
               "check_ms_max_inline": r.get("check_ms_max_inline"), "seconds": 0.0}
        if fl is not None:
            row["mouth_corr"] = mouth_corr(fl, frames, r["shown"], chunk_starts, mouth_stride)
        row["seconds"] = time.perf_counter() - t0
        log.info("%s: mean SSIM %.3f, %d refreshes (%.1f s)", mode, row["ssim_mean"], row["refreshes"], row["seconds"])
        rows.append(row)
    return {"group": clips[0].group, "clips": [common.clip_name(c) for c in clips], "fps": fps, "size": size,
            "frames": len(frames), "duration_s": len(frames) / fps, "chunk_starts_s": [s / fps for s in chunk_starts],
            "first_s": first_s, "window_s": window_s, "reference_s": reference_s, "min_interval_s": min_interval_s,
            "drop": drop, "window": window,
            "target_drop": 0.02, "rows": rows}


def table(res: dict[str, Any]) -> str:
    headers = ["mode", "SSIM first", "SSIM mean", "worst window", "drop", "worst chunk drop", "mouth corr",
               "refreshes", "refresh B", "refresh kbps"]
    rows = [[r["mode"], r["ssim_first"], r["ssim_mean"], r["ssim_worst_window"], r["drop_below_first"],
             r["chunk_drop"], r.get("mouth_corr"), r["refreshes"], r["refresh_bytes"], r["refresh_kbps"]]
            for r in res["rows"]]
    head = (f"{res['group']}: {len(res['clips'])} chunks joined, {res['frames']} frames, {res['duration_s']:.1f} s at "
            f"{res['fps']:g} fps, rendered at {res['size']}x{res['size']}; first {res['first_s']:g} s vs the worst "
            f"{res['window_s']:g} s window, and first chunk vs worst chunk (target drop <= {res['target_drop']})")
    return head + "\n" + common.format_table(headers, rows)


def plot(res: dict[str, Any], path: str | Path) -> None:
    fig, ax = common.new_figure(8, 4.5)
    fps = res["fps"]
    n = max(1, int(round(fps)))
    for r in res["rows"]:
        s = window_means(np.asarray(r["ssim"]), n)
        (line,) = ax.plot(np.arange(len(s)) / fps, s, label=f"{r['mode']} ({r['refreshes']} refreshes)")
        for t in r["refresh_at_s"]:
            ax.axvline(t, color=line.get_color(), alpha=0.4, ls=":")
    for t in res["chunk_starts_s"][1:]:
        ax.axvline(t, color="grey", alpha=0.6, lw=2)
    ax.set_xlabel("time (s); grey: joins between chunks, dotted: refreshes")
    ax.set_ylabel(f"SSIM at {res['size']} (1 s mean)")
    ax.set_title(f"Source refresh on {res['group']}")
    ax.legend(loc="lower left", fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m bench.refresh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--group", help="the source video (manifest 'group'); default: the held-out one with most frames")
    p.add_argument("--size", type=int, default=64, choices=(64, 128, 256), help="the receiver's model")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--first-s", type=float, default=5.0, help="the reference period the target compares with")
    p.add_argument("--window-s", type=float, default=5.0, help="worst-window length (as --first-s)")
    p.add_argument("--reference-s", type=float, default=5.0, help="RefreshConfig.reference_s for this replay")
    p.add_argument("--min-interval-s", type=float, default=RefreshConfig.min_interval_s)
    p.add_argument("--drop", type=float, default=RefreshConfig.drop, help="RefreshConfig.drop (render mode)")
    p.add_argument("--window", type=int, default=RefreshConfig.window, help="RefreshConfig.window")
    p.add_argument("--no-mouth", action="store_true", help="skip the dlib mouth-opening correlation")
    p.add_argument("--mouth-stride", type=int, default=2)
    p.add_argument("--max-frames", type=int, help="per chunk (quick runs)")
    p.add_argument("--json")
    p.add_argument("--png")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    res = run(a.data, a.group, a.size, a.modes, a.first_s, a.window_s, a.reference_s, a.min_interval_s,
              not a.no_mouth, a.mouth_stride, a.max_frames, a.drop, a.window)
    print(table(res))
    if a.json:
        common.write_json(a.json, res)
    if a.png:
        plot(res, a.png)
    return res


if __name__ == "__main__":
    main()
