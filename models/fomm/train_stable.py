"""Fine-tune the keypoint detector for temporal stability (issue #30): fewer frames worth sending.

On in-the-wild video the detector's keypoints jitter: frame to frame, every value's second difference is
as large as its first (|d2| / |d1| = 1.2-1.4, white noise gives 1.41, smooth motion << 1), with a median
change near the predictive stream's skip tolerance, so the sender codes nearly every frame. The jitter
is the detector's answer to what differs between two frames that a viewer would not call motion
(compression noise, sensor noise, sub-pixel aliasing); a filter at the sender cannot tell it from motion
without lag (a causal One-Euro filter lost more SSIM than it saved bits), but the detector can learn to
ignore it:

    target_t = zero-phase smoothing over time (Savitzky-Golay) of the shipped detector's keypoints
    loss     = |student(frame_t) - target_t| + |student(noisy(frame_t)) - target_t|

on the training persons' face clips, from the shipped detector's weights. The smoothing keeps motion
(a quadratic fit over ``window`` frames: a blink's 3-5 frames survive), the noise augmentation (JPEG,
Gaussian noise, brightness) teaches invariance to what compression does. Both ends run the same detector,
so nothing else changes on the wire; the generator was trained on this detector's keypoints and sees
smoother ones of the same kind.

Held-out persons (the shipped model's own ``val_groups``) decide which step is kept: the share of frames
the default predictive stream (``shared.kpcodec.DEFAULT_STREAM``) has to send, among the steps whose
keypoints stay as close to the smoothed trajectory as the shipped detector's (its error is the bar).
Reported beside it: the error to the shipped detector's raw and smoothed keypoints and the jitter ratio.

    python -m models.fomm.train_stable --minutes 90 --run-dir runs/detector_stable --resume
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from scipy.signal import savgol_filter

from models.cli import add_config_arguments
from models.data import load_clips, load_frames, split_by_group
from models.fomm.io import load_motion_model, save_motion_model
from models.fomm.model import MotionModel, kp_to_vector
from models.forecast.dataset import extract_series
from shared.kpcodec import DEFAULT_STREAM, PredictiveEncoder

log = logging.getLogger(__name__)
NC = 20  # coordinates in a keypoint vector; the 40 Jacobian entries follow


@dataclass
class StableConfig:
    data: str = "../shared/data"
    weights: str = "models/weights/fomm_face64.pt"  # the shipped detector: teacher and starting point
    extra_val: str = "runs/vox2_val"  # in-the-wild held-out clips, reported beside the split's ('' for none)
    run_dir: str = "runs/detector_stable"
    out: str = ""  # best checkpoint (a full 64 motion model); default RUN_DIR/fomm_face64_stable.pt
    minutes: float = 60.0
    steps: int = 1_000_000
    batch: int = 32
    lr: float = 5e-5
    window: int = 7  # Savitzky-Golay window (frames) of the target trajectories
    order: int = 2
    jac_weight: float = 0.3  # Jacobian entries against coordinates (the codec's jac_factor is 10: 0.1)
    max_frames: int = 150  # per training clip
    val_clips: int = 24  # held-out clips measured at each check (spread over the split), and
    val_frames: int = 90  # their first frames: a check costs about a minute on one core
    warmup: int = 100  # steps of linear learning-rate warm-up (Adam's first steps move every weight)
    val_every: int = 150
    threads: int = 1
    seed: int = 0
    tiny: bool = False  # a smoke run: few clips, few steps
    resume: bool = False


# --------------------------------------------------------------------------- data


def smooth(kp: np.ndarray, window: int, order: int) -> np.ndarray:
    """(T, 60) trajectories -> zero-phase Savitzky-Golay smoothed (a clip shorter than the window: as is)."""
    w = min(window, len(kp) - (1 - len(kp) % 2))  # odd, at most T
    if w <= order:
        return kp.copy()
    return savgol_filter(kp, w, order, axis=0, mode="interp").astype(np.float32)


def noisy(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(B, H, W, 3) uint8 -> the same frames through what video compression and sensors do to them."""
    out = np.empty_like(frames)
    for i, f in enumerate(frames):
        g = f.astype(np.float32) * rng.uniform(0.93, 1.07) + rng.uniform(-6, 6)
        g += rng.normal(0, rng.uniform(0.5, 3.0), g.shape)
        f = np.clip(g, 0, 255).astype(np.uint8)
        ok, buf = cv2.imencode(".jpg", f, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(40, 95))])
        out[i] = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED) if ok else f
    return out


def to_batch(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def detect(model: MotionModel, frames: np.ndarray, batch: int = 64) -> np.ndarray:
    return np.concatenate([model.keypoints(to_batch(frames[i:i + batch])).numpy()
                           for i in range(0, len(frames), batch)]).astype(np.float32)


# --------------------------------------------------------------------------- held-out measures


def sent_fraction(kp: np.ndarray) -> float:
    """Share of frames the default predictive stream codes (keyframes included)."""
    enc = PredictiveEncoder(DEFAULT_STREAM)
    sent = sum(enc.encode(t, v) is not None for t, v in enumerate(kp))
    return sent / len(kp)


def jitter_ratio(kp: np.ndarray) -> float:
    """median |second difference| / median |first difference| of the coordinates (1.41: white noise)."""
    d1 = np.abs(np.diff(kp[:, :NC], axis=0))
    d2 = np.abs(np.diff(kp[:, :NC], 2, axis=0))
    return float(np.median(d2) / max(np.median(d1), 1e-9))


def measure(model: MotionModel, clips: list[np.ndarray], raw: list[np.ndarray], target: list[np.ndarray]) -> dict:
    """Per-clip means over held-out clips: what the stream sends, jitter, and errors to the teacher."""
    rows = []
    for frames, r, s in zip(clips, raw, target, strict=True):
        kp = detect(model, frames)
        rows.append({"sent": sent_fraction(kp), "jitter": jitter_ratio(kp),
                     "d1": float(np.median(np.abs(np.diff(kp[:, :NC], axis=0)))),
                     "err_smooth": float(np.abs(kp[:, :NC] - s[:, :NC]).mean()),
                     "err_smooth_jac": float(np.abs(kp[:, NC:] - s[:, NC:]).mean()),
                     "err_raw": float(np.abs(kp[:, :NC] - r[:, :NC]).mean())})
    return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}


def half_rounded(model: MotionModel) -> MotionModel:
    """What a checkpoint holds (weights are saved in float16): measure that, not the float32 weights."""
    import copy

    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for p in m.kp_detector.parameters():
            p.copy_(p.half().float())
    return m


# --------------------------------------------------------------------------- training


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, StableConfig())
    cfg = StableConfig(**vars(p.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    out = Path(cfg.out or run / "fomm_face64_stable.pt")

    teacher, meta = load_motion_model(cfg.weights)
    student, _ = load_motion_model(cfg.weights)
    size = teacher.config.motion_size

    # --- the project's split by person (as the motion model's and the refiner's): its validation persons
    # stay held out
    train_info, val_info = split_by_group(load_clips(cfg.data, ["face"]), 0.15)
    shipped = set(meta.get("val_persons") or [])
    if shipped and shipped != {c.person for c in val_info}:
        log.warning("the split's validation persons differ from the shipped model's (%d vs %d)",
                    len({c.person for c in val_info}), len(shipped))
    if cfg.tiny:
        train_info, val_info = train_info[:4], val_info[:2]
    t0 = time.time()
    extra_info = load_clips(cfg.extra_val) if cfg.extra_val and Path(cfg.extra_val).is_dir() else []
    frames, raw = {}, {}
    if len(val_info) > cfg.val_clips:
        val_info = [val_info[int(i)] for i in np.linspace(0, len(val_info) - 1, cfg.val_clips)]
    for name, infos, root in (("train", train_info, cfg.data), ("val", val_info, cfg.data),
                              ("extra", extra_info, cfg.extra_val)):
        # the teacher's keypoints of whole clips, cached per detector (models.forecast.dataset), cut like the frames
        series = {s.clip.path: s.kp for s in extract_series(cfg.weights, infos, root)}
        most = cfg.max_frames if name == "train" else cfg.val_frames
        pairs = [(f, series[c.path][:len(f)]) for c in infos if c.path in series
                 for f in load_frames([c], size, min_frames=cfg.window, max_frames=most)]
        frames[name] = [f for f, _ in pairs]
        raw[name] = [r for _, r in pairs]
    train, val, extra = frames["train"], frames["val"], frames["extra"]
    target = {k: [smooth(r, cfg.window, cfg.order) for r in v] for k, v in raw.items()}
    log.info("%d train / %d val / %d extra clips (%d / %d / %d frames), teacher keypoints, targets in %.0f s",
             len(train), len(val), len(extra), sum(map(len, train)), sum(map(len, val)), sum(map(len, extra)),
             time.time() - t0)

    frames_all = np.concatenate(train)
    target_all = torch.from_numpy(np.concatenate(target["train"]))
    weight = torch.ones(60)
    weight[NC:] = cfg.jac_weight

    opt = torch.optim.Adam(student.kp_detector.parameters(), lr=cfg.lr)
    state_path = run / "state.pt"
    step, elapsed, best = 0, 0.0, {"sent": math.inf}
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        student.kp_detector.load_state_dict(st["detector"])
        opt.load_state_dict(st["opt"])
        step, elapsed, best = st["step"], st["elapsed"], st["best"]
        log.info("resumed at step %d (%.0f min trained), best %s", step, elapsed / 60, best)

    def validate() -> dict:
        m = half_rounded(student)
        res = {"step": step, "minutes": round(elapsed / 60, 2), "val": measure(m, val, raw["val"], target["val"])}
        if extra:
            res["extra"] = measure(m, extra, raw["extra"], target["extra"])
        return res

    bar = measure(teacher, val, raw["val"], target["val"])
    log.info("shipped detector on held-out persons: %s; its smoothed keypoints (the floor) send %.3f", json.dumps(bar),
             np.mean([sent_fraction(t) for t in target["val"]]))
    if extra:
        log.info("shipped detector on %s: %s", cfg.extra_val,
                 json.dumps(measure(teacher, extra, raw["extra"], target["extra"])))

    student.requires_grad_(False)
    student.kp_detector.requires_grad_(True)
    student.train()
    for mod in student.kp_detector.modules():  # batch statistics stay the shipped ones: the renderer expects them
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.eval()
    started = time.time() - elapsed
    while step < cfg.steps and elapsed < cfg.minutes * 60:
        idx = rng.integers(0, len(frames_all), cfg.batch)
        x = frames_all[idx]
        xb = to_batch(np.concatenate([x, noisy(x, rng)]))
        y = target_all[idx].repeat(2, 1)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        pred = kp_to_vector(student.kp_detector(xb))  # MotionModel.keypoints is no-grad
        loss = ((pred - y).abs() * weight).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        elapsed = time.time() - started
        if step % cfg.val_every == 0 or elapsed >= cfg.minutes * 60 or step >= cfg.steps:
            res = validate()
            res["loss"] = float(loss.detach())
            v = res["val"]
            # kept: the fewest frames sent among steps at least as close to the smooth trajectory as the teacher
            ok = v["err_smooth"] <= bar["err_smooth"] and v["err_smooth_jac"] <= bar["err_smooth_jac"]
            if ok and v["sent"] < best["sent"]:
                best = {"step": step, **v}
                save_motion_model(out, half_rounded(student), {
                    **{k: meta[k] for k in ("anchor_kp", "anchor_templates", "val_persons") if k in meta},
                    "derived_from": cfg.weights, "stable": {"config": asdict(cfg), "step": step,
                                                             "train_seconds": elapsed, "val": v,
                                                             "shipped_val": bar, **({"extra": res["extra"]}
                                                                                    if extra else {})}})
            res["best_step"] = best.get("step")
            with open(run / "val.jsonl", "a") as f:
                f.write(json.dumps(res) + "\n")
            log.info("step %d (%.1f min): loss %.5f val %s%s best %s", step, elapsed / 60, res["loss"],
                     json.dumps({k: round(x, 5) for k, x in v.items()}),
                     f" extra sent {res['extra']['sent']:.3f}" if extra else "", best.get("step"))
            torch.save({"detector": student.kp_detector.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed": elapsed, "best": best}, state_path)
    log.info("done at step %d (%.1f min); best %s -> %s", step, elapsed / 60, best, out)


if __name__ == "__main__":
    main()
