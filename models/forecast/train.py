"""Train a keypoint forecaster (gru, vrnn or grunf) on keypoints of real clips.

Usage:
  python -m models.forecast.train --model vrnn --weights models/weights/fomm_face64.pt \\
      --data /work/shared/data --minutes 8 --out models/weights/forecast_vrnn.pt
  python -m models.forecast.train ... --resume      # continue RUN_DIR/state.pt up to --minutes in total
  python -m models.forecast.train --model gru --tiny --steps 20 ...   # smoke run

Keypoints are extracted once per detector checkpoint and cached (``--cache-dir``).
Split: ``models.data.split_by_group(clips, 0.15)``, i.e. validation clips come from
source videos never seen in training. Training windows are n_obs (drawn per batch in
[min_obs, n_obs]) observed + n_fut future frames. Validation (12 -> 12 by default,
every window, stride n_fut) reports the model's kp MAE (mean over ``val_samples``
samples for stochastic models, free rollout, fixed seed) beside repeat-last and
constant-velocity. Validation runs at step 0 too: the untrained network predicts a zero
change (zero-initialised output layer), i.e. it *is* repeat-last, so training can only
ship something else if it beat that on validation (deterministic GRU; for the stochastic
VRNN / GRU-NF step 0 is logged but not a candidate, as it would be a point forecaster).
Model selection: the shipped weights (OUT) are those of the validation check with the
**lowest validation kp MAE** (``--select best``, default); the final step's weights are
kept in RUN_DIR/final.pt. Selection uses the validation split, so the validation
numbers of the shipped model are optimistic; the model card says so.
Training windows are augmented (``augment.py``: flip, time reversal, translation,
0.75–1.5× speed, input noise); ``--no-augment`` turns that off.
Writes: OUT (weights), OUT with .md (model card), RUN_DIR/val.jsonl, RUN_DIR/val.png,
RUN_DIR/final.pt, RUN_DIR/state.pt (resumable: weights + Adam + step + elapsed time + best).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.forecast import build_net, load_forecaster, save_forecaster
from models.forecast.augment import AugmentConfig, add_input_noise
from models.forecast.base import norm_stats
from models.forecast.baselines import LastForecaster, LinearForecaster
from models.forecast.dataset import DEFAULT_CACHE, WindowSampler, extract_series, file_hash, make_windows, split_clips
from models.forecast.gru import GRUConfig
from models.forecast.grunf import GRUNFConfig
from models.forecast.vrnn import VRNNConfig

log = logging.getLogger(__name__)

TINY = {"gru": GRUConfig(hidden=16), "vrnn": VRNNConfig(hidden=16, mlp=16, z_dim=4, kl_anneal_steps=10),
        "grunf": GRUNFConfig(hidden=16, flow_blocks=2, flow_hidden=16)}


# (lr, weight decay) per model. The point forecasters overfit the ~50 training source videos
# (train loss falls while validation on unseen videos rises), so they get strong weight decay
# and a gentler rate; the flow is trained by likelihood and keeps the original settings.
OPT_DEFAULTS: dict[str, tuple[float, float]] = {"gru": (1e-3, 0.05), "vrnn": (1e-3, 0.05), "grunf": (2e-3, 1e-4)}


@dataclass
class TrainConfig:
    model: str = "vrnn"
    weights: str = "models/weights/fomm_face64.pt"  # motion model whose detector gives the keypoints
    data: str = "/work/shared/data"
    kinds: list[str] = field(default_factory=lambda: ["face"])
    out: str = ""  # default models/weights/forecast_<model>.pt
    run_dir: str = ""  # default runs/forecast_<model>
    cache_dir: str = str(DEFAULT_CACHE)
    minutes: float = 8.0  # total training time (a resumed run continues up to this)
    steps: int = 1_000_000  # upper bound; --minutes usually ends the run first
    batch: int = 64
    lr: float | None = None  # None: the model's entry in OPT_DEFAULTS
    weight_decay: float | None = None  # AdamW; None: the model's entry in OPT_DEFAULTS
    grad_clip: float = 5.0
    n_obs: int = 12
    min_obs: int = 6
    n_fut: int = 12
    val_every: int = 50  # validation is cheap (~100 windows) and drives model selection
    val_samples: int = 8
    seed: int = 0
    threads: int = 1
    tiny: bool = False
    half: bool = False  # store weights as float16
    resume: bool = False
    select: str = "best"  # shipped weights: "best" (lowest val kp MAE) or "final" (last step)
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)  # None = no augmentation
    model_config: dict[str, Any] | None = None  # overrides of the model's config dataclass

    def __post_init__(self) -> None:
        lr, wd = OPT_DEFAULTS[self.model]
        self.lr = lr if self.lr is None else self.lr
        self.weight_decay = wd if self.weight_decay is None else self.weight_decay
        self.out = self.out or f"models/weights/forecast_{self.model}.pt"
        self.run_dir = self.run_dir or f"runs/forecast_{self.model}"
        if not 1 <= self.min_obs <= self.n_obs:
            raise ValueError("need 1 <= min_obs <= n_obs")
        if self.select not in ("best", "final"):
            raise ValueError("select must be 'best' or 'final'")


def point_mae(pred: torch.Tensor, target: torch.Tensor) -> float:
    """pred (B,S,M,60): MAE of the mean over samples, raw units."""
    return float((pred.mean(1) - target).abs().mean())


def val_metrics(forecast_batch: Any, windows: torch.Tensor, n_obs: int, samples: int, chunk: int = 256,
                seed: int = 0) -> float:
    """Mean kp MAE of the mean-of-samples forecast. The sampling seed is fixed (and the
    caller's RNG state restored) so checks at different steps are comparable."""
    errs = []
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(seed)
        for i in range(0, len(windows), chunk):
            w = windows[i:i + chunk]
            pred = forecast_batch(w[:, :n_obs], w.shape[1] - n_obs, samples)
            errs.append((pred.mean(1) - w[:, n_obs:]).abs().mean(dim=(1, 2)))
    return float(torch.cat(errs).mean()) if errs else float("nan")


def baseline_maes(windows: torch.Tensor, n_obs: int) -> dict[str, float]:
    return {f.name: val_metrics(f.forecast_batch, windows, n_obs, 1) for f in (LastForecaster(), LinearForecaster())}


def plot_curve(rows: list[dict[str, Any]], path: Path, name: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["val_mae"] for r in rows], label=name)
    for b, style in (("last", "--"), ("linear", ":")):
        ax.axhline(rows[-1][f"{b}_mae"], linestyle=style, color="gray", label=b)
    ax.set_xlabel("training step")
    ax.set_ylabel("val kp MAE (raw units)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(cfg: TrainConfig, train_series: list[np.ndarray], val_series: list[np.ndarray],
          meta: dict[str, Any] | None = None, progress: bool = True) -> dict[str, Any]:
    """Train on lists of (T, 60) series; returns a summary (also written into the model card)."""
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    mcfg: Any = TINY[cfg.model] if cfg.tiny else None
    if cfg.model_config:
        mcfg = {**(asdict(mcfg) if mcfg is not None else {}), **cfg.model_config}
    net = build_net(cfg.model, mcfg)
    net.norm.set_stats(norm_stats(train_series))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    length = cfg.n_obs + cfg.n_fut
    sampler = WindowSampler(train_series, length, cfg.seed, cfg.augment)
    noise_scale = net.norm.dscale.numpy().copy()
    vwin_np, _ = make_windows(val_series, cfg.n_obs, cfg.n_fut, cfg.n_fut)
    vwin = torch.from_numpy(vwin_np)
    base = baseline_maes(vwin, cfg.n_obs) if len(vwin) else {"last": float("nan"), "linear": float("nan")}
    state_path, jsonl = run_dir / "state.pt", run_dir / "val.jsonl"
    step, elapsed, rows = 0, 0.0, []
    best: dict[str, Any] = {"val_mae": float("inf"), "step": -1, "net": None}
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        step, elapsed = int(st["step"]), float(st["elapsed"])
        if "best" in st:
            best = st["best"]
        sampler.rng = np.random.default_rng(cfg.seed + step)  # fresh draws, not a replay of the first run
        if jsonl.exists():
            rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
        log.info("resumed %s at step %d (%.1f min)", state_path, step, elapsed / 60)
    elif jsonl.exists():
        jsonl.unlink()
    budget = cfg.minutes * 60.0
    rng = np.random.default_rng(cfg.seed + 1 + step)
    is_vrnn = hasattr(net, "train_step")

    def validate() -> dict[str, Any]:
        net.eval()
        mae = val_metrics(net.rollout, vwin, cfg.n_obs, cfg.val_samples if is_stochastic(cfg.model) else 1,
                          seed=cfg.seed) if len(vwin) else float("nan")
        net.train()
        row = {"step": step, "minutes": round(elapsed / 60, 3), "train_loss": round(float(np.mean(recent)), 5)
               if recent else None, "val_mae": mae, "last_mae": base["last"], "linear_mae": base["linear"]}
        # a stochastic model's step 0 is not a candidate: its zero decoder ignores the latent, so it
        # would ship as a deterministic repeat-last with no distribution at all (APD 0)
        candidate = step > 0 or not is_stochastic(cfg.model)
        score = mae if math.isfinite(mae) else math.inf  # a NaN/inf check never beats a finite one
        if candidate and (best["net"] is None or score < best["val_mae"]):
            best.update(val_mae=score, step=step, net=copy.deepcopy(net.state_dict()))
        row["best_step"] = best["step"]
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        plot_curve(rows, run_dir / "val.png", cfg.model)
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": elapsed,
                    "best": best}, state_path)
        return row

    net.train()
    recent: list[float] = []
    if step == 0:
        validate()  # the untrained model: exactly repeat-last for the GRU and VRNN
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress, mininterval=2.0, desc=cfg.model)
    t_last = time.monotonic()
    while step < cfg.steps and elapsed < budget:
        frac = max(step / cfg.steps, elapsed / budget)
        for g in opt.param_groups:  # cosine decay over whichever budget ends first
            g["lr"] = cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
        n_obs = int(rng.integers(cfg.min_obs, cfg.n_obs + 1))
        win_np = sampler.sample(cfg.batch)[:, cfg.n_obs - n_obs:]
        if cfg.augment is not None:
            win_np = add_input_noise(win_np, n_obs, noise_scale, cfg.augment.noise_std, rng)
        win = torch.from_numpy(np.ascontiguousarray(win_np))
        if is_vrnn:
            net.train_step.fill_(step)
            net.budget_frac = frac
        loss, logs = net.loss(win, n_obs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        step += 1
        now = time.monotonic()
        elapsed += now - t_last
        t_last = now
        recent = (recent + [loss.item()])[-50:]
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix({k: f"{v:.4g}" for k, v in logs.items()})
        if step % cfg.val_every == 0:
            row = validate()
            log.info("step %d val_mae %.5f (last %.5f, linear %.5f)", step, row["val_mae"], base["last"],
                     base["linear"])
    bar.close()
    if not rows or rows[-1]["step"] != step:
        validate()
    if is_vrnn:
        net.train_step.fill_(step)
    net.eval()
    final_row = rows[-1]
    full_meta = dict(meta or {})
    full_meta.update({"steps": step, "minutes": round(elapsed / 60, 2), "val_last_mae_12_12": base["last"],
                      "val_linear_mae_12_12": base["linear"], "val_mae_final_step": final_row["val_mae"]})
    save_forecaster(run_dir / "final.pt", cfg.model, net, {**full_meta, "selected_step": step}, half=cfg.half)
    if cfg.select == "best" and best["net"] is not None:
        net.load_state_dict(best["net"])
        sel_step = best["step"]
        sel_mae = next(r["val_mae"] for r in reversed(rows) if r["step"] == sel_step)
    else:
        sel_step, sel_mae = step, final_row["val_mae"]
    shipped = {**final_row, "val_mae": sel_mae, "step": sel_step}
    summary = {"model": cfg.model, "steps": step, "minutes": round(elapsed / 60, 2), "final": shipped,
               "final_step": final_row, "selected_step": sel_step, "n_val_windows": len(vwin), "n_checks": len(rows),
               "config": asdict(net.cfg), "train": asdict(cfg)}
    full_meta.update({"selection": cfg.select, "selected_step": sel_step, "val_mae_12_12": sel_mae,
                      "val_mae_optimistic": cfg.select == "best"})
    size = save_forecaster(cfg.out, cfg.model, net, full_meta, half=cfg.half)
    summary["file_bytes"] = size
    load_forecaster(cfg.model, path=cfg.out)  # fail now, not on a call, if the file does not load
    return summary


def selection_note(cfg: TrainConfig, summary: dict[str, Any]) -> str:
    if cfg.select != "best":
        return "- weights of the final step (not selected on validation)."
    note = (f"- **model selection**: shipped weights = the validation check (every {cfg.val_every} steps, "
            f"{summary['n_checks']} checks incl. step 0) with the lowest validation kp MAE: step "
            f"{summary['selected_step']} of {summary['steps']}. The final step's weights are `{cfg.run_dir}/final.pt`.")
    if summary["selected_step"] == 0:
        note += (" Step 0 is the untrained network, i.e. exactly repeat-last: no trained checkpoint beat "
                 "repeat-last on validation.")
    elif is_stochastic(cfg.model):
        note += " (Step 0 is not a candidate for a stochastic model: untrained, it ignores its latent.)"
    return note


def is_stochastic(name: str) -> bool:
    return name in ("vrnn", "grunf")


def write_card(cfg: TrainConfig, summary: dict[str, Any], meta: dict[str, Any], command: str) -> Path:
    f = summary["final"]
    card = Path(cfg.out).with_suffix(".md")
    ratio = f["val_mae"] / f["last_mae"] if f["last_mae"] else float("nan")
    lines = [
        f"# forecast_{cfg.model} — keypoint forecaster ({cfg.model})",
        "",
        "Forecasts the 60-dim FOMM keypoint vector (free rollout, no ground truth after the context).",
        "Interface: `models.forecast.load_forecaster('" + cfg.model + "').forecast(history (N,60), steps, samples)`.",
        "",
        "## Reproduce",
        "```",
        command,
        "```",
        "(`--resume` continues `" + cfg.run_dir + "/state.pt` up to `--minutes` in total.)",
        "",
        "## Data",
        f"- clips: `{cfg.data}`, kinds {cfg.kinds}; keypoints from detector `{cfg.weights}` "
        f"(sha1 {meta.get('detector_sha1')}), native frame rate (25–30 fps).",
        f"- split: `split_by_group(clips, 0.15)`: {meta.get('n_train_clips')} train clips "
        f"({meta.get('n_train_frames')} frames), {meta.get('n_val_clips')} validation clips "
        f"({meta.get('n_val_frames')} frames) from source videos never seen in training: "
        f"{', '.join(meta.get('val_groups', []))}.",
        f"- training windows: {cfg.min_obs}–{cfg.n_obs} observed + {cfg.n_fut} future frames, batch {cfg.batch}.",
        "- augmentation: " + (
            "none." if cfg.augment is None else
            f"horizontal flip (x → −x, J → FJF, F = diag(−1, 1)) p={cfg.augment.flip_p}, time reversal "
            f"p={cfg.augment.reverse_p}, global translation ±{cfg.augment.translate_max} p={cfg.augment.translate_p}, "
            f"speed {cfg.augment.speed_min}–{cfg.augment.speed_max}× p={cfg.augment.speed_p} (linear interpolation), "
            f"Gaussian input noise {cfg.augment.noise_std}× the one-frame change scale on observed frames."),
        "- normalisation: change since the previous frame / per-dim constants from the training split"
        + (", plus position standardised with training-split constants" if summary["config"].get("absolute") else "")
        + "; never statistics of the future or of the clip.",
        "- residual formulation: the network predicts the change from the previous frame, starting from the last "
        "observed frame, with its output layer zero-initialised, so the untrained model is exactly repeat-last "
        "(validated at step 0).",
        "",
        "## Training",
        f"- {summary['steps']} steps in {summary['minutes']} min on CPU ({cfg.threads} thread), AdamW lr {cfg.lr} "
        f"cosine, grad clip {cfg.grad_clip}, seed {cfg.seed}.",
        f"- config: `{json.dumps(summary['config'])}`",
        f"- file: {summary['file_bytes'] / 1e6:.2f} MB ({'fp16' if cfg.half else 'fp32'}).",
        selection_note(cfg, summary),
        f"- curves: `{cfg.run_dir}/val.jsonl`, `{cfg.run_dir}/val.png`.",
        "",
        f"## Validation ({cfg.n_obs} → {cfg.n_fut}, {summary['n_val_windows']} windows, stride {cfg.n_fut})",
        "kp MAE in raw keypoint units over all 60 dims and all future steps; stochastic models: MAE of the mean "
        f"of {cfg.val_samples} samples (fixed seed)."
        + (" **The shipped model was selected on this split, so its number is optimistic** (a best-of-"
           f"{summary['n_checks']} pick on {summary['n_val_windows']} windows); the final step's is not selected."
           if cfg.select == "best" else ""),
        "",
        "| forecaster | kp MAE | vs repeat-last |",
        "|---|---|---|",
        f"| last | {f['last_mae']:.5f} | 1.00× |",
        f"| linear | {f['linear_mae']:.5f} | {f['linear_mae'] / f['last_mae']:.2f}× |",
        f"| **{cfg.model}** (shipped, step {summary['selected_step']}"
        + (", selected on val" if cfg.select == "best" else "") + f") | {f['val_mae']:.5f} | {ratio:.3f}× |",
        f"| {cfg.model} (final step {summary['steps']}, `{cfg.run_dir}/final.pt`) | "
        f"{summary['final_step']['val_mae']:.5f} | {summary['final_step']['val_mae'] / f['last_mae']:.3f}× |",
        "",
        "Full benchmark (APD, best-of-N oracle, pixel error, timing): `python -m bench.forecast --help`.",
        "",
    ]
    card.write_text("\n".join(lines))
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainConfig()
    p.add_argument("--model", choices=["gru", "vrnn", "grunf"], required=True)
    p.add_argument("--weights", default=d.weights, help="motion model checkpoint (its detector)")
    p.add_argument("--data", default=d.data)
    p.add_argument("--kinds", default=",".join(d.kinds))
    p.add_argument("--out", default="")
    p.add_argument("--run-dir", default="")
    p.add_argument("--cache-dir", default=d.cache_dir)
    p.add_argument("--minutes", type=float, default=d.minutes)
    for name in ("lr", "weight_decay"):
        p.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help="default: per model (OPT_DEFAULTS)")
    for name in ("steps", "batch", "n_obs", "min_obs", "n_fut", "val_every", "val_samples", "seed", "threads"):
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(d, name))
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--half", action="store_true")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--select", choices=["best", "final"], default=d.select,
                   help="shipped weights: lowest validation kp MAE (default) or the final step")
    p.add_argument("--no-augment", action="store_true", help="train on raw windows (no flip/reverse/speed/noise)")
    p.add_argument("--model-config", default="", help='JSON overrides of the model config, e.g. \'{"hidden": 64}\'')
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    kinds = [k for k in a.kinds.split(",") if k]
    cfg = TrainConfig(model=a.model, weights=a.weights, data=a.data, kinds=kinds, out=a.out, run_dir=a.run_dir,
                      cache_dir=a.cache_dir, minutes=a.minutes, steps=a.steps, batch=a.batch, lr=a.lr,
                      n_obs=a.n_obs, min_obs=a.min_obs, n_fut=a.n_fut, val_every=a.val_every,
                      val_samples=a.val_samples, seed=a.seed, threads=a.threads, tiny=a.tiny, half=a.half,
                      resume=a.resume, weight_decay=a.weight_decay, select=a.select,
                      augment=None if a.no_augment else AugmentConfig(),
                      model_config=json.loads(a.model_config) if a.model_config else None)
    torch.set_num_threads(cfg.threads)
    t0 = time.monotonic()
    train_clips, val_clips = split_clips(cfg.data, kinds)
    tr = extract_series(cfg.weights, train_clips, cfg.data, cfg.cache_dir)
    va = extract_series(cfg.weights, val_clips, cfg.data, cfg.cache_dir)
    log.info("keypoints: %d train / %d val clips (%d / %d frames) in %.0fs", len(tr), len(va),
             sum(len(s.kp) for s in tr), sum(len(s.kp) for s in va), time.monotonic() - t0)
    meta = {"detector": cfg.weights, "detector_sha1": file_hash(cfg.weights), "data": cfg.data, "kinds": kinds,
            "n_train_clips": len(tr), "n_val_clips": len(va), "n_train_frames": sum(len(s.kp) for s in tr),
            "n_val_frames": sum(len(s.kp) for s in va), "val_groups": sorted({s.group for s in va})}
    summary = train(cfg, [s.kp for s in tr], [s.kp for s in va], meta)
    command = ".venv/bin/python -m models.forecast.train " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    card = write_card(cfg, summary, meta, command)
    f = summary["final"]
    print(f"{cfg.model}: {summary['steps']} steps, {summary['minutes']} min; val kp MAE {f['val_mae']:.5f} "
          f"(last {f['last_mae']:.5f}, linear {f['linear_mae']:.5f}); wrote {cfg.out} and {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
