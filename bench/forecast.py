"""Benchmark keypoint forecasters on real clips: accuracy, diversity, speed, pixels.

Usage:
  python -m bench.forecast --data /work/shared/data --json runs/bench_forecast.json --png runs/bench_forecast.png
  python -m bench.forecast --data DIR --json OUT [--horizons 6-6,12-12] [--samples 100] [--split val|all]
                           [--weights FOMM.pt] [--forecast-dir models/weights] [--render-subset 8]

For each horizon N-M (N observed frames, M forecast) and each forecaster, over every
window of every clip (start every ``--stride`` frames, default M), with free rollouts:
  kp_mae            MAE of the mean prediction over samples vs the true keypoints (raw units,
                    all 60 dims, all M steps). The honest point-forecast number.
  kp_mae_per_sample mean over samples of each sample's MAE (what one drawn sample scores).
  kp_mae_best_of_n  ORACLE: per window, the MAE of the sample closest to the truth (uses the
                    future to choose; not achievable live; reported only because the seed
                    paper's numbers are of this kind). Note it is ≤ kp_mae_per_sample, but not
                    necessarily ≤ kp_mae (the mean of samples can beat every single sample).
  apd               mean pairwise L1 between samples (0 for deterministic forecasters).
  ms_per_step       wall time of one ``forecast(history, M, samples=1)`` call / M, 1 thread.
  pixel_mae         (first --render-subset windows, evenly spaced) L1 in [0,1] between frames
                    rendered from the window's first frame with the point forecast (mean of
                    samples) and the true frames; the same for the true keypoints
                    (``render.<h>.gt_kp``, the renderer's floor) and for the static source.
With a manifest, ``--split val`` (default) uses only the validation groups of
``split_by_group(clips, 0.15)``; a folder without manifest is used whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.checkpoint import CheckpointError
from models.forecast import NAMES, Forecaster, load_forecaster
from models.forecast.dataset import DEFAULT_CACHE, Series, extract_series, file_hash, make_windows, split_clips

log = logging.getLogger(__name__)


def parse_horizons(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        n, m = part.strip().split("-")
        if int(n) < 1 or int(m) < 1:
            raise ValueError(f"bad horizon {part!r}")
        out.append((int(n), int(m)))
    return out


def predict(f: Forecaster, windows: torch.Tensor, n_obs: int, samples: int, chunk_rollouts: int = 4096) -> torch.Tensor:
    """(W, N+M, 60) -> (W, S, M, 60), in chunks so W·S rollouts fit in memory."""
    m = windows.shape[1] - n_obs
    chunk = max(1, chunk_rollouts // samples)
    with torch.no_grad():
        return torch.cat([f.forecast_batch(windows[i:i + chunk, :n_obs], m, samples)
                          for i in range(0, len(windows), chunk)])


def kp_metrics(pred: torch.Tensor, target: torch.Tensor) -> dict[str, Any]:
    """pred (W,S,M,60), target (W,M,60)."""
    w, s = pred.shape[:2]
    err_mean = (pred.mean(1) - target).abs()  # (W,M,60)
    per_sample = (pred - target[:, None]).abs().mean(dim=(2, 3))  # (W,S)
    if s > 1:
        flat = pred.reshape(w, s, -1).double()
        d = torch.cdist(flat, flat, p=1) / flat.shape[-1]  # (W,S,S), mean |.| per value
        apd = float(d.sum(dim=(1, 2)).mean() / (s * (s - 1)))
    else:
        apd = 0.0
    return {
        "kp_mae": float(err_mean.mean()),
        "kp_mae_xy": float(err_mean[..., :20].mean()),
        "kp_mae_jac": float(err_mean[..., 20:].mean()),
        "kp_mae_per_sample": float(per_sample.mean()),
        "kp_mae_best_of_n": float(per_sample.min(1).values.mean()),
        "apd": apd,
        "mae_per_step": [float(v) for v in err_mean.mean(dim=(0, 2))],
        "n_windows": int(w),
        "samples": int(s),
    }


def time_per_step(f: Forecaster, windows: np.ndarray, n_obs: int, m: int, reps: int = 20) -> float:
    times = []
    for i in range(reps + 2):
        hist = windows[i % len(windows), :n_obs]
        t0 = time.perf_counter()
        f.forecast(hist, m, 1)
        if i >= 2:  # first calls warm up allocators
            times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times) / m


def render_subset(model: Any, series: list[Series], idx: list[tuple[int, int]], n_obs: int, m: int,
                  preds: dict[str, torch.Tensor], windows: torch.Tensor, pick: list[int]) -> dict[str, Any]:
    """Pixel L1 of rendered forecasts on the chosen windows (source = window's first frame)."""
    from models.data import load_frames

    frames_cache: dict[int, np.ndarray] = {}
    sums: dict[str, list[float]] = {k: [] for k in [*preds, "gt_kp", "static_source"]}
    for wi in pick:
        si, start = idx[wi]
        if si not in frames_cache:
            frames_cache[si] = load_frames([series[si].clip], model.config.size)[0]
        fr = frames_cache[si]
        to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
        src = to_t(fr[start:start + 1])
        true = to_t(fr[start + n_obs:start + n_obs + m])
        cache = model.prepare_source(src)
        with torch.no_grad():
            sums["gt_kp"].append(float((model.render(cache, windows[wi, n_obs:]) - true).abs().mean()))
            sums["static_source"].append(float((src - true).abs().mean()))
            for name, p in preds.items():
                out = model.render(cache, p[wi].mean(0).clamp(-3, 3))
                sums[name].append(float((out - true).abs().mean()))
    return {k: float(np.mean(v)) for k, v in sums.items()}


def run(data: str, horizons: list[tuple[int, int]], samples: int = 100, split: str = "val",
        weights: str | None = None, forecast_dir: str | None = None, models: list[str] | None = None,
        stride: int | None = None, render_subset_n: int = 8, kinds: list[str] | None = None,
        cache_dir: str = str(DEFAULT_CACHE), time_reps: int = 20) -> dict[str, Any]:
    t_start = time.time()
    weights = weights or _default_weights()
    has_manifest = (Path(data) / "manifest.csv").exists()
    eff_split = split if has_manifest else "all"
    _, clips = split_clips(data, kinds, "both" if eff_split == "val" else "all")
    series = extract_series(weights, clips, data, cache_dir)
    det_sha = file_hash(weights)
    forecasters: dict[str, Forecaster] = {}
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    for name in models or list(NAMES):
        try:
            forecasters[name] = load_forecaster(name, forecast_dir)
        except CheckpointError as e:
            skipped[name] = str(e)
            log.warning("skipping %s: %s", name, e)
            continue
        trained_on = getattr(forecasters[name], "meta", {}).get("detector_sha1")
        if trained_on and trained_on != det_sha:
            warnings.append(f"{name} was trained on detector {trained_on}, benchmark uses {det_sha}")
    for w in warnings:
        log.warning(w)
    motion = None
    if render_subset_n > 0:
        from models.fomm.io import load_motion_model
        motion, _ = load_motion_model(weights)
    result: dict[str, Any] = {"horizons": {}, "render": {}}
    for n_obs, m in horizons:
        key = f"{n_obs}-{m}"
        win_np, idx = make_windows(series, n_obs, m, stride or m)
        if not len(win_np):
            log.warning("no clip is long enough for horizon %s", key)
            result["horizons"][key] = {}
            continue
        win = torch.from_numpy(win_np)
        target = win[:, n_obs:]
        res, preds = {}, {}
        for name, f in forecasters.items():
            s = samples if f.stochastic else 1
            torch.manual_seed(0)
            p = predict(f, win, n_obs, s)
            res[name] = kp_metrics(p, target)
            res[name]["stochastic"] = f.stochastic
            res[name]["ms_per_step"] = time_per_step(f, win_np, n_obs, m, time_reps)
            preds[name] = p
        if motion is not None:
            pick = sorted({int(round(x)) for x in np.linspace(0, len(win) - 1, min(render_subset_n, len(win)))})
            px = render_subset(motion, series, idx, n_obs, m, preds, win, pick)
            for name in res:
                res[name]["pixel_mae"] = px[name]
            result["render"][key] = {"gt_kp": px["gt_kp"], "static_source": px["static_source"],
                                     "n_windows": len(pick), "note": "pixel L1 in [0,1]; point forecast rendered"}
        result["horizons"][key] = res
    result.update({
        "data": str(data), "split": eff_split, "kinds": kinds,
        "clips": [s.name for s in series], "groups": sorted({s.group for s in series}),
        "weights": str(weights), "detector_sha1": det_sha, "samples": samples, "stride": stride or "M",
        "threads": torch.get_num_threads(), "skipped": skipped, "warnings": warnings,
        "forecaster_meta": {k: getattr(f, "meta", {}) for k, f in forecasters.items()},
        "seconds": round(time.time() - t_start, 1),
        "notes": "free rollouts; kp_mae = MAE of the mean of samples; kp_mae_best_of_n is an oracle",
    })
    return result


def _default_weights() -> str:
    for p in ("models/weights/fomm_face64.pt", "runs/face64/best.pt", "runs/face64/last.pt"):
        if Path(p).exists():
            return p
    raise FileNotFoundError("no motion model weights found; pass --weights")


def print_table(result: dict[str, Any]) -> None:
    cols = ["kp_mae", "kp_mae_best_of_n", "apd", "ms_per_step", "pixel_mae"]
    for key, res in result["horizons"].items():
        print(f"\nhorizon {key}  ({next(iter(res.values()))['n_windows'] if res else 0} windows, split "
              f"{result['split']}; best_of_n = ORACLE)")
        print(f"{'forecaster':<10}" + "".join(f"{c:>18}" for c in cols) + f"{'vs last':>10}")
        last = res.get("last", {}).get("kp_mae")
        for name, r in res.items():
            vals = "".join(f"{r[c]:>18.5f}" if c in r else f"{'-':>18}" for c in cols)
            rel = f"{r['kp_mae'] / last:>9.2f}x" if last else ""
            print(f"{name:<10}{vals}{rel}")
        steps = [k for k in (1, 2, 4, 8, 12, 16) if k <= len(next(iter(res.values()))["mae_per_step"])]
        if last and steps:
            print("kp MAE by steps ahead (x repeat-last): "
                  + "; ".join(f"{name} " + " ".join(
                      f"{k}:{r['mae_per_step'][k - 1] / res['last']['mae_per_step'][k - 1]:.3f}" for k in steps)
                      for name, r in res.items()))
        rend = result["render"].get(key)
        if rend:
            print(f"pixel L1 with true keypoints {rend['gt_kp']:.4f}, static source {rend['static_source']:.4f} "
                  f"({rend['n_windows']} windows)")


def plot(result: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hs = [(k, v) for k, v in result["horizons"].items() if v]
    fig, axes = plt.subplots(1, max(1, len(hs)), figsize=(5 * max(1, len(hs)), 4), squeeze=False)
    for ax, (key, res) in zip(axes[0], hs, strict=False):
        for name, r in res.items():
            steps = np.arange(1, len(r["mae_per_step"]) + 1)
            ax.plot(steps, r["mae_per_step"], marker="o", ms=3, label=name)
        ax.set_title(f"{key} ({result['split']})")
        ax.set_xlabel("forecast step")
        ax.set_ylabel("kp MAE of mean prediction")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--png")
    p.add_argument("--horizons", default="6-6,12-12")
    p.add_argument("--samples", type=int, default=100)
    p.add_argument("--split", choices=["val", "all"], default="val")
    p.add_argument("--weights", help="motion model (default models/weights/fomm_face64.pt, else runs/face64/best.pt)")
    p.add_argument("--forecast-dir", help="folder with forecast_<name>.pt (default models/weights)")
    p.add_argument("--models", default=",".join(NAMES))
    p.add_argument("--stride", type=int, help="window start spacing (default M)")
    p.add_argument("--render-subset", type=int, default=8, help="windows rendered for pixel MAE (0 = none)")
    p.add_argument("--kinds", default="face", help="comma list; empty = all kinds")
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--time-reps", type=int, default=20)
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(a.threads)
    models = [m for m in a.models.split(",") if m]
    for m in models:
        if m not in NAMES:
            p.error(f"unknown forecaster {m!r}; known: {', '.join(NAMES)}")
    result = run(a.data, parse_horizons(a.horizons), a.samples, a.split, a.weights, a.forecast_dir, models,
                 a.stride, a.render_subset, [k for k in a.kinds.split(",") if k] or None, a.cache_dir, a.time_reps)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=1))
    print_table(result)
    if a.png:
        plot(result, a.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
