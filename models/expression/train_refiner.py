"""Train the region refiner on rendered / driving / source patches; select by held-out persons.

Usage:
  python -m models.expression.region_data --split train --out cache/region_train.npz     # samples first
  python -m models.expression.region_data --split val --keep-frames --out cache/region_val.npz
  python -m models.expression.train_refiner --train cache/region_train.npz --val cache/region_val.npz \\
      --minutes 120 --out models/weights/region_refiner.pt    # resumable: --resume continues RUN_DIR/state.pt

Loss, per sample (eye patches and the mouth patch, refined vs the driving frame's patches cut at the same
centres): ``w_l1`` x L1 + ``w_ssim`` x (1 - SSIM) + ``w_open`` x |regressor(refined) - target opening|
(the **frozen** opening regressor ``--regressor``, in its standardised units; the term is off when that
file does not exist, and the card says so) + ``w_mask`` x the mean of the blend masks (change only what
must change). Augmentation: brightness / contrast per sample and a mirrored mouth, applied alike to the
rendered, source and driving patches. The target opening the refiner is given (and the opening loss
aims at) is the regressor's reading of the driving patches (``--target regressor``: what the sender
measures and would send; the default ``auto`` takes it when the regressor exists), or what a receiver can
compute from today's wire alone (``--target wire``: the source's openings read by the regressor off the
source image, plus a per-channel gain times the change of the anchored keypoints' Jacobian scales since
the source; the gain is fitted on the training rows' dlib labels and stored in the checkpoint's meta), or
the driving frame's dlib opening (``--target dlib``: not available in a call, and the validation's labels
themselves, so it leaks the answer into the refiner's input).

Validation, every ``val_every`` steps, on samples of held-out persons: per (clip, source) sequence, the
Pearson correlation over time of openings against the driving frames' dlib openings (mean over
sequences), read by two judges: **dlib** on the rendered frame with the patches pasted back
(``paste_patches``; the driving frame's HOG box, as ``bench.expression`` scores a call; needs validation
samples built with ``--keep-frames``): independent of the training; and the **regressor** on the
patches: the judge the opening loss trains against, so a refiner can satisfy it without drawing a
better eye (it did, in the first smoke run: see the report). Also the mean absolute opening errors and
the L1 (grey levels) against the driving patches. Rows: the refined patches, and the baselines: the
rendered patches as they are (what the product shows today), the source patches (static), and the
driving patches themselves (a perfect patch: the ceiling of this approach). The shipped weights are
those of the check with the best mean correlation of eye_left, eye_right and mouth_open of the refined
patches by dlib (by the regressor without the frames; by the lowest L1 without either); chosen on the
validation split, so the shipped numbers are optimistic.

Writes OUT (weights), OUT with .md (model card), RUN_DIR/val.jsonl, RUN_DIR/state.pt and RUN_DIR/sheet.png
(validation rows: source | rendered | refined by the shipped weights | driving patches: look at it).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from models.cli import add_config_arguments
from models.expression import DEFAULT_WEIGHTS as REGRESSOR_WEIGHTS
from models.expression import load_regressor
from models.expression.openings import openings
from models.expression.region_data import RegionSamples, load_samples
from models.expression.region_refiner import RefinerConfig, RegionRefiner, load_refiner, paste_patches, save_refiner
from models.expression.regressor import OpeningNet
from models.expression.train import SELECT, WILD_SETS, apply_degradation, draw_degradation, per_clip_corr
from models.fomm.losses import ssim

log = logging.getLogger(__name__)


@dataclass
class RefinerTrainConfig:
    train: str = "cache/region_train.npz"
    val: str = "cache/region_val.npz"
    regressor: str = str(REGRESSOR_WEIGHTS)  # frozen judge of openings; '' or a missing file: no opening loss
    # target opening: 'wire' (what a receiver can compute from the keypoints alone: the source's openings read
    # by the regressor + a gain x the change of the anchored keypoints' Jacobian scales since the source),
    # 'regressor' (its reading of the driving patches: needs the sender to send it), 'dlib' (labels), 'auto'
    target: str = "auto"
    kp_weights: str = "models/weights/fomm_face64.pt"  # 'wire': the detector whose cached keypoints give the Jacobians
    kp_cache: str = "runs/kp_cache"
    out: str = "models/weights/region_refiner.pt"
    run_dir: str = "runs/region_refiner"
    minutes: float = 60.0
    steps: int = 1_000_000
    batch: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    width: int = 16
    levels: int = 3  # the U-Nets' levels (RefinerConfig.levels); 2 renders faster
    w_l1: float = 1.0
    w_ssim: float = 1.0
    w_open: float = 0.1
    w_mask: float = 0.01
    val_every: int = 250
    threads: int = 1
    seed: int = 0
    tiny: bool = False
    resume: bool = False
    # share of training samples degraded as webcam video is (JPEG, rescale, blur, noise: train.draw_degradation),
    # the rendered, source and driving patches of a sample alike: in-the-wild faces (#29)
    degrade: float = 0.0
    init: str = ""  # start from this refiner checkpoint's weights (not with --resume, which continues its own)
    # quantisation-aware fine-tuning (models.expression.qat): 'all' convolutions in simulated int8, 'mixed' all
    # but each branch's first and output (refiner_int8.FLOAT_CONVS), '' none (float32)
    qat: str = ""


# --------------------------------------------------------------------------- batches


def _f(x: np.ndarray) -> torch.Tensor:
    """(..., H, W, 3) uint8 -> (..., 3, H, W) float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(x)).movedim(-1, -3).float() / 255.0


def degrade_alike(groups: list[np.ndarray], rng: np.random.Generator, share: float) -> list[np.ndarray]:
    """Degrade ``share`` of the samples: one ``draw_degradation`` per sample, applied to that sample's patches
    in every group (uint8 arrays (N, ..., H, W, 3): its rendered, source and driving eyes and mouth alike, as a
    webcam degrades the source image and the driving frames alike and the render inherits the source's)."""
    out = [g.copy() for g in groups]
    flats = [o.reshape(len(o), -1, *o.shape[-3:]) for o in out]
    for i in range(len(groups[0])):
        if rng.random() >= share:
            continue
        d = draw_degradation(rng)
        for f in flats:
            for j in range(f.shape[1]):
                f[i, j] = apply_degradation(f[i, j], d, rng)
    return out


def batch_of(s: RegionSamples, idx: np.ndarray, target: np.ndarray, rng: np.random.Generator | None = None,
             degrade: float = 0.0) -> dict[str, torch.Tensor]:
    si = s.source[idx]
    patches = [s.rendered_eyes[idx], s.rendered_mouth[idx], s.source_eyes[si], s.source_mouth[si],
               s.driving_eyes[idx], s.driving_mouth[idx]]
    if rng is not None and degrade > 0:
        patches = degrade_alike(patches, rng, degrade)
    re, rm, se, sm, de, dm = (_f(x) for x in patches)
    return {"rendered_eyes": re, "rendered_mouth": rm, "source_eyes": se, "source_mouth": sm,
            "driving_eyes": de, "driving_mouth": dm,
            "target": torch.from_numpy(target[idx]), "source_open": torch.from_numpy(s.source_open[si])}


def augment(b: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Brightness / contrast per sample and a mirrored mouth, alike for the rendered, source and driving patches."""
    n = b["target"].shape[0]
    gain = 1 + 0.2 * (torch.rand(n, generator=gen) * 2 - 1)
    bias = 0.06 * (torch.rand(n, generator=gen) * 2 - 1)
    flip = torch.rand(n, generator=gen) < 0.5
    out = dict(b)
    for k in ("rendered", "source", "driving"):
        e, m = b[f"{k}_eyes"], b[f"{k}_mouth"]
        out[f"{k}_eyes"] = (e * gain.view(n, 1, 1, 1, 1) + bias.view(n, 1, 1, 1, 1)).clamp(0, 1)
        m = (m * gain.view(n, 1, 1, 1) + bias.view(n, 1, 1, 1)).clamp(0, 1)
        out[f"{k}_mouth"] = torch.where(flip.view(n, 1, 1, 1), m.flip(-1), m)
    return out


def refine(net: RegionRefiner, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return net(b["rendered_eyes"], b["source_eyes"], b["rendered_mouth"], b["source_mouth"], b["target"],
               b["source_open"])


def losses(net: RegionRefiner, reg: OpeningNet | None, b: dict[str, torch.Tensor],
           cfg: RefinerTrainConfig) -> dict[str, torch.Tensor]:
    """The training loss and its terms for one batch."""
    out = refine(net, b)
    e, m = out["eyes"], out["mouth"]
    de, dm = b["driving_eyes"], b["driving_mouth"]
    l1 = (e - de).abs().mean() + (m - dm).abs().mean()
    dssim = (1 - ssim(e.flatten(0, 1), de.flatten(0, 1))) + (1 - ssim(m, dm))
    mask = out["eye_mask"].mean() + out["mouth_mask"].mean()
    total = cfg.w_l1 * l1 + cfg.w_ssim * dssim + cfg.w_mask * mask
    terms = {"l1": l1, "dssim": dssim, "mask": mask}
    if reg is not None and cfg.w_open > 0:
        opening = (reg.normalised(e, m) - (b["target"] - reg.mean) / reg.std).abs().mean()
        total = total + cfg.w_open * opening
        terms["open"] = opening
    return {"loss": total, **terms}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _refined(net: RegionRefiner, s: RegionSamples, target: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, ...]:
    """Refined eyes (N, 2, 3, 32, 32), mouth (N, 3, 32, 48) as float32 arrays and the mean mask per row."""
    net.eval()
    eyes, mouth, mask = [], [], []
    for i in range(0, len(s), chunk):
        idx = np.arange(i, min(i + chunk, len(s)))
        out = refine(net, batch_of(s, idx, target))
        eyes.append(out["eyes"].numpy())
        mouth.append(out["mouth"].numpy())
        mask.append(((out["eye_mask"].mean((1, 2, 3, 4)) + out["mouth_mask"].mean((1, 2, 3))) / 2).numpy())
    net.train()
    return np.concatenate(eyes), np.concatenate(mouth), np.concatenate(mask)


@torch.no_grad()
def _read(reg: OpeningNet, eyes: np.ndarray, mouth: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Regressor openings (N, 4) of float patches (N, 2, 3, 32, 32) / (N, 3, 32, 48)."""
    return np.concatenate([reg(torch.from_numpy(eyes[i:i + chunk]), torch.from_numpy(mouth[i:i + chunk])).numpy()
                           for i in range(0, len(eyes), chunk)])


def _chw(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, -1, -3).astype(np.float32) / 255.0


def _u8(x: np.ndarray) -> np.ndarray:
    """(..., 3, H, W) float in [0, 1] -> (..., H, W, 3) uint8."""
    return np.clip(np.rint(np.moveaxis(x, -3, -1) * 255), 0, 255).astype(np.uint8)


def dlib_openings(fl, s: RegionSamples, eyes: np.ndarray | None, mouth: np.ndarray | None) -> np.ndarray:
    """(N, 4) openings dlib reads on each rendered frame with these patches (uint8 HWC) pasted back at the
    driving centres (``None``: the rendered frame as is), with the driving frame's face box; NaN without a box."""
    out = np.full((len(s), 4), np.nan, np.float32)
    for i in range(len(s)):
        box = tuple(int(v) for v in s.boxes[i])
        if box[2] <= box[0]:
            continue
        frame = s.rendered_frames[i]
        if eyes is not None:
            frame = paste_patches(frame, s.centres[i], eyes[i], mouth[i])
        out[i] = openings(fl.shape(frame, box))
    return out


def wild_rows(s: RegionSamples) -> np.ndarray:
    """(N,) bool: rows of clips from the in-the-wild sets (``train.WILD_SETS``: webcam and interview footage)."""
    names = s.meta.get("clips") or []
    wild = np.array([Path(n).parent.name in WILD_SETS for n in names], bool)
    return wild[s.clip] if len(wild) else np.zeros(len(s), bool)


def score(eyes: np.ndarray, mouth: np.ndarray, s: RegionSamples, reg: OpeningNet | None, fl=None,
          as_is: bool = False) -> dict:
    """Metrics of float patches (CHW in [0, 1]) against the driving patches and the dlib openings; ``fl``
    (``FaceLandmarks``): also dlib's reading of the frames with the patches pasted back (``as_is``: of the
    rendered frames unchanged)."""
    m = {"l1_eyes": float(np.abs(eyes - _chw(s.driving_eyes)).mean() * 255),
         "l1_mouth": float(np.abs(mouth - _chw(s.driving_mouth)).mean() * 255)}
    if reg is not None:
        pred = _read(reg, eyes, mouth)
        m["corr"] = per_clip_corr(pred, s.target, s.seq)
        m["mae"] = np.abs(pred - s.target).mean(0).tolist()
    if fl is not None and s.rendered_frames is not None:
        pred = dlib_openings(fl, s, None, None) if as_is else dlib_openings(fl, s, _u8(eyes), _u8(mouth))
        ok = np.isfinite(pred[:, 0])
        if not ok.any():
            return m
        m["dlib_corr"] = per_clip_corr(pred[ok], s.target[ok], s.seq[ok])
        wild = ok & wild_rows(s)
        if wild.any():  # in-the-wild clips of held-out persons (train.WILD_SETS): reported, not selected by
            m["dlib_corr_wild"] = per_clip_corr(pred[wild], s.target[wild], s.seq[wild])
        m["dlib_mae"] = np.abs(pred[ok] - s.target[ok]).mean(0).tolist()
        m["dlib_frames"] = int(ok.sum())
    return m


def _select(m: dict) -> float:
    for key in ("dlib_corr", "corr"):
        if key in m:
            return float(np.mean([m[key][i] for i in SELECT]))
    return -(m["l1_eyes"] + m["l1_mouth"])


def selected_by(m: dict) -> str:
    if "dlib_corr" in m:
        return ("best mean per-sequence correlation of eye_left, eye_right and mouth_open read by dlib on the "
                "refined frames")
    if "corr" in m:
        return "best mean per-sequence correlation of eye_left, eye_right and mouth_open read by the regressor"
    return "lowest L1 (eyes + mouth) of the refined patches"


def evaluate(net: RegionRefiner, s: RegionSamples, target: np.ndarray, reg: OpeningNet | None, fl=None) -> dict:
    eyes, mouth, mask = _refined(net, s, target)
    m = score(eyes, mouth, s, reg, fl)
    m["mask"] = float(mask.mean())
    m["select"] = _select(m)
    return m


def baselines(s: RegionSamples, reg: OpeningNet | None, fl=None) -> dict:
    """The rendered patches as they are, the source patches (static) and the driving patches (the ceiling)."""
    src_e, src_m = s.source_eyes[s.source], s.source_mouth[s.source]
    return {"rendered": score(_chw(s.rendered_eyes), _chw(s.rendered_mouth), s, reg, fl, as_is=True),
            "source": score(_chw(src_e), _chw(src_m), s, reg, fl),
            "driving": score(_chw(s.driving_eyes), _chw(s.driving_mouth), s, reg, fl)}


# --------------------------------------------------------------------------- training


def _regressor(cfg: RefinerTrainConfig) -> OpeningNet | None:
    if not cfg.regressor or not Path(cfg.regressor).exists():
        log.warning("no opening regressor at %r: the opening loss is off and its correlations are not measured",
                    cfg.regressor)
        return None
    reg, _ = load_regressor(cfg.regressor)
    for p in reg.parameters():
        p.requires_grad_(False)
    return reg.eval()


@torch.no_grad()
def _targets(s: RegionSamples, reg: OpeningNet | None, mode: str) -> np.ndarray:
    if mode == "auto":
        mode = "regressor" if reg is not None else "dlib"
    if mode == "dlib":
        return s.target
    if mode != "regressor":
        raise SystemExit(f"--target must be 'auto', 'wire', 'dlib' or 'regressor', not {mode!r}")
    if reg is None:
        raise SystemExit("--target regressor needs the opening regressor (--regressor)")
    return _read(reg, _chw(s.driving_eyes), _chw(s.driving_mouth)).astype(np.float32)


def jacobian_scales(s: RegionSamples, cfg: RefinerTrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """The anchored keypoints' Jacobian scales (``train._jac_baseline``) of every row's driving frame (N, 4)
    and of every source (S, 4), from the keypoint series cached for ``kp_weights``."""
    from models.data import load_clips
    from models.expression.train import _jac_baseline, keypoint_series

    names = s.meta["clips"]
    by_path = {str(c.path): c for c in load_clips(s.meta.get("data", "../shared/data"), ["face"])}
    clips = [by_path[n] for n in names]
    series = keypoint_series(cfg.kp_weights, clips, s.meta.get("data", "../shared/data"), cfg.kp_cache)
    anchor = s.meta["anchor_kp"]
    jd = np.stack([_jac_baseline(series[names[c]][[f]], anchor)[0] for c, f in zip(s.clip, s.frame, strict=True)])
    src_clip = np.zeros(len(s.source_open), np.int64)
    src_clip[s.source] = s.clip
    js = np.stack([_jac_baseline(series[names[c]][[f]], anchor)[0] for c, f in zip(src_clip, s.source_frame,
                                                                                   strict=True)])
    return jd.astype(np.float32), js.astype(np.float32)


def fit_wire_gain(s: RegionSamples, jd: np.ndarray, js: np.ndarray) -> np.ndarray:
    """Per channel, the least-squares gain from the Jacobian scale's change since the source to the dlib
    opening's change since the source, on training rows: what the receiver multiplies the wire's change by."""
    dj = jd - js[s.source]
    dopen = s.target - s.source_open[s.source]
    return ((dj * dopen).sum(0) / np.maximum((dj * dj).sum(0), 1e-9)).astype(np.float32)


def wire_targets(s: RegionSamples, source_open: np.ndarray, gain: np.ndarray, jd: np.ndarray,
                 js: np.ndarray) -> np.ndarray:
    """What a receiver computes with no expression on the wire: the source's openings + gain x the change."""
    return (source_open[s.source] + gain * (jd - js[s.source])).astype(np.float32)


QAT_FLOAT = ("eye.enc0.0.0", "eye.out", "mouth.enc0.0.0", "mouth.out")  # refiner_int8.FLOAT_CONVS, by module


@torch.no_grad()
def warm_fake_quant(net: RegionRefiner, cfg: RefinerTrainConfig, tr: RegionSamples, target: np.ndarray,
                    rng: np.random.Generator, batches: int = 20) -> None:
    """Simulate the int8 graph (``qat.fake_quantise``) and measure its running ranges on training batches before
    the first check (a resumed run starts its ranges afresh: they are not in the state)."""
    from models.expression.qat import fake_quantise, ranges_seen

    names = fake_quantise(net, QAT_FLOAT if cfg.qat == "mixed" else ())
    net.train()
    for _ in range(batches):
        refine(net, batch_of(tr, rng.integers(0, len(tr), cfg.batch), target))
    log.info("qat %s: %d convolutions in simulated int8; input ranges %s", cfg.qat, len(names),
             {k: [round(v, 2) for v in r] for k, r in list(ranges_seen(net).items())[:4]})


def qat_meta(net: RegionRefiner) -> dict:
    """A quantisation-aware run's ranges, for the checkpoint's meta (``refiner_int8 --qat`` quantises with them)."""
    from models.expression.qat import ranges_seen

    seen = ranges_seen(net)
    return {"qat_ranges": seen} if seen else {}


def train(cfg: RefinerTrainConfig, tr: RegionSamples, va: RegionSamples, meta: dict) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    reg = _regressor(cfg)
    wire_gain = None
    if cfg.target == "wire":
        if reg is None:
            raise SystemExit("--target wire reads the source's openings with the opening regressor (--regressor)")
        (tr_jd, tr_js), (va_jd, va_js) = jacobian_scales(tr, cfg), jacobian_scales(va, cfg)
        wire_gain = fit_wire_gain(tr, tr_jd, tr_js)  # on dlib's labels of the training rows
        # the receiver reads the source's openings off the source image (it has no labels): so do both splits
        tr.source_open = _read(reg, _chw(tr.source_eyes), _chw(tr.source_mouth)).astype(np.float32)
        va.source_open = _read(reg, _chw(va.source_eyes), _chw(va.source_mouth)).astype(np.float32)
        tr_target = wire_targets(tr, tr.source_open, wire_gain, tr_jd, tr_js)
        va_target = wire_targets(va, va.source_open, wire_gain, va_jd, va_js)
        log.info("wire targets: gain %s; per-clip corr with dlib on validation %s", np.round(wire_gain, 4).tolist(),
                 np.round(per_clip_corr(va_target, va.target, va.seq), 3).tolist())
    else:
        tr_target, va_target = _targets(tr, reg, cfg.target), _targets(va, reg, cfg.target)
    fl = None
    if va.rendered_frames is not None:
        from models.landmarks import FaceLandmarks

        fl = FaceLandmarks()
    else:
        log.warning("validation samples without rendered frames (region_data --keep-frames): no dlib judge")
    net = RegionRefiner(RefinerConfig(width=4 if cfg.tiny else cfg.width, levels=cfg.levels))
    net.set_open_stats(torch.from_numpy(tr_target.mean(0)), torch.from_numpy(tr_target.std(0) + 1e-6))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"
    step, elapsed, best = 0, 0.0, {"select": -float("inf"), "step": -1}
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        step, elapsed, best = st["step"], st["elapsed"], st["best"]
        log.info("resumed at step %d (%.1f min, best %.3f)", step, elapsed / 60, best["select"])
    elif cfg.init:
        start, _ = load_refiner(cfg.init)
        if start.config.width != net.config.width:
            raise SystemExit(f"--init {cfg.init} has width {start.config.width}, not --width {net.config.width}")
        if start.config.levels == net.config.levels:
            net.load_state_dict(start.state_dict())
        else:  # fewer levels: every layer the two share (all but the dropped level's), the rest as initialised
            own = net.state_dict()
            shared = {k: v for k, v in start.state_dict().items() if k in own and own[k].shape == v.shape}
            net.load_state_dict(shared, strict=False)
            log.info("--init: %d of %d tensors taken from %s (levels %d -> %d)", len(shared), len(own), cfg.init,
                     start.config.levels, net.config.levels)
        net.set_open_stats(torch.from_numpy(tr_target.mean(0)), torch.from_numpy(tr_target.std(0) + 1e-6))
        log.info("started from the weights of %s", cfg.init)
    if cfg.qat:
        warm_fake_quant(net, cfg, tr, tr_target, rng)
    meta = {**meta, "wire_gain": None if wire_gain is None else wire_gain.tolist(),
            "opening_loss": reg is not None and cfg.w_open > 0, "regressor": cfg.regressor if reg else None,
            "target": ("regressor" if reg is not None else "dlib") if cfg.target == "auto" else cfg.target,
            "dlib_judge": fl is not None, "train_config": asdict(cfg)}
    base = baselines(va, reg, fl)
    log.info("baselines: %s", json.dumps(base))
    history: list[float] = []
    t0 = time.monotonic() - elapsed

    def save_state() -> None:
        torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": time.monotonic() - t0, "best": best}, state_path)

    def check() -> dict:
        nonlocal best
        m = {"step": step, "minutes": round((time.monotonic() - t0) / 60, 2),
             "train_loss": float(np.mean(history[-cfg.val_every:])) if history else None,
             **evaluate(net, va, va_target, reg, fl)}
        with (run / "val.jsonl").open("a") as f:
            f.write(json.dumps(m) + "\n")
        if m["select"] > best["select"]:
            best = m
            save_refiner(cfg.out, net, {**meta, "selected": m, "baselines": base, **qat_meta(net)})
        log.info("step %d: loss %s, val corr dlib %s regressor %s, L1 eyes %.2f mouth %.2f, mask %.3f (best %.3f at "
                 "%d)", step, m["train_loss"] and round(m["train_loss"], 4), np.round(m.get("dlib_corr", []), 3),
                 np.round(m.get("corr", []), 3), m["l1_eyes"], m["l1_mouth"], m["mask"], best["select"], best["step"])
        return m

    final = None
    while True:
        if step % cfg.val_every == 0:
            final = check()
            save_state()
        if step >= cfg.steps or time.monotonic() - t0 >= cfg.minutes * 60:
            break
        idx = rng.integers(0, len(tr), cfg.batch)
        out = losses(net, reg, augment(batch_of(tr, idx, tr_target, rng, cfg.degrade), gen), cfg)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        history.append(float(out["loss"].detach()))
        step += 1
    if final is None or final["step"] != step:
        final = check()
    save_state()
    return {"best": best, "final": final, "baselines": base, "meta": meta, "va_target": va_target,
            "first_loss": float(np.mean(history[:10])) if history else None,
            "last_loss": float(np.mean(history[-10:])) if history else None}


def write_sheet(net: RegionRefiner, s: RegionSamples, target: np.ndarray, path: str | Path, rows: int = 16) -> Path:
    """A contact sheet of validation rows spread over the sequences: source | rendered | refined | driving
    (each: image-left eye, image-right eye mirrored, mouth), 2x nearest-neighbour."""
    import cv2

    idx = np.linspace(0, len(s) - 1, min(rows, len(s))).round().astype(int)
    sub = s.subset(idx)
    eyes, mouth, _ = _refined(net, sub, target[idx])
    eyes, mouth = _u8(eyes), _u8(mouth)

    def cell(e: np.ndarray, m: np.ndarray) -> np.ndarray:
        return np.concatenate([e[0], e[1], m], 1)

    lines = [np.concatenate([cell(sub.source_eyes[sub.source[i]], sub.source_mouth[sub.source[i]]),
                             cell(sub.rendered_eyes[i], sub.rendered_mouth[i]), cell(eyes[i], mouth[i]),
                             cell(sub.driving_eyes[i], sub.driving_mouth[i])], 1) for i in range(len(sub))]
    img = cv2.resize(np.concatenate(lines, 0), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img[..., ::-1])
    return path


def write_card(cfg: RefinerTrainConfig, summary: dict, meta: dict, command: str) -> Path:
    best, final, base = summary["best"], summary["final"], summary["baselines"]

    def nums(m: dict, key: str, idx: list[int], fmt: str) -> list[str]:
        return [f"{m[key][i]:{fmt}}" for i in idx] if key in m else ["n/a"] * len(idx)

    def row(name: str, m: dict) -> str:
        cells = (nums(m, "dlib_corr", [0, 1, 2, 3], ".3f") + nums(m, "dlib_mae", [0, 2], ".4f")
                 + nums(m, "corr", [0, 1, 2, 3], ".3f") + [f"{m['l1_eyes']:.2f}", f"{m['l1_mouth']:.2f}"])
        return f"| {name} | " + " | ".join(cells) + " |"

    short = ("eye L", "eye R", "mouth open", "mouth width")
    head = ["| patches | " + " | ".join(f"dlib corr {c}" for c in short) + " | dlib MAE eye L | dlib MAE mouth open | "
            + " | ".join(f"regressor corr {c}" for c in short) + " | L1 eyes | L1 mouth |",
            "|---|" + "---|" * 12]
    rows = [row(f"**refined** (shipped, step {best['step']}, mask {best['mask']:.3f})", best),
            row(f"refined (final step {final['step']}, mask {final['mask']:.3f})", final),
            row("rendered as is (today's product)", base["rendered"]),
            row("source patch (static)", base["source"]),
            row("driving patch (a perfect patch: the ceiling)", base["driving"])]
    tm, vm = meta["train_data"], meta["val_data"]
    opening = (f"on, frozen regressor `{cfg.regressor}`, weight {cfg.w_open} (standardised units)"
               if meta["opening_loss"] else
               f"**off**: no opening regressor at `{cfg.regressor}` (its correlations are not measured)")
    card = Path(cfg.out).with_suffix(".md")
    card.write_text("\n".join([
        "# region_refiner — eyes and mouth redrawn at full resolution",
        "",
        "Per rendered 256x256 frame: the two eye patches (32x32, the image-right eye mirrored, one shared",
        "branch) and the mouth patch (48x32) cut at the driving keypoints' anchored centres, with the source",
        "image's patches and the target / source openings as constant planes -> a small U-Net per region ->",
        "rendered + sigmoid(mask) x residual, pasted back with a feathered window.",
        "Interface: `models.expression.region_refiner.load_refiner()`, `refine_frame`, `paste_patches`.",
        "",
        "## Reproduce",
        f"```\n{command}\n```",
        "",
        "## Data",
        f"- training samples `{cfg.train}`: {meta['n_train']} rendered frames from {meta['n_train_sources']} "
        f"sources of {tm.get('n_clips')} clips (every {tm.get('every')}th frame, {tm.get('sources')} sources per "
        f"clip: the first frame and random later ones), rendered by `{tm.get('weights')}` with the keypoints of "
        f"`{tm.get('kp_weights')}`.",
        f"- validation samples `{cfg.val}`: {meta['n_val']} frames from {meta['n_val_sources']} sources of "
        f"{vm.get('n_clips')} clips of {vm.get('n_persons')} persons never trained on (`models.data.split_by_group`).",
        f"- target opening given to the refiner: `{meta['target']}`; labels: dlib 68-point landmarks.",
        "",
        "## Training",
        f"- {final['step']} steps, {final['minutes']} min on CPU ({cfg.threads} thread), batch {cfg.batch}, AdamW lr "
        f"{cfg.lr}; loss {cfg.w_l1} x L1 + {cfg.w_ssim} x (1 - SSIM) + opening term + {cfg.w_mask} x mask mean; "
        "brightness/contrast and mirrored-mouth augmentation"
        + (f"; {cfg.degrade:.0%} of the samples degraded as webcam video is (JPEG 15-70, rescale, blur, noise; "
           "rendered, source and driving patches alike)" if cfg.degrade > 0 else "") + "."
        + (f" Started from the weights of `{cfg.init}`." if cfg.init else ""),
        f"- opening loss: {opening}.",
        *([f"- in-the-wild validation clips (train.WILD_SETS), dlib corr eye L / eye R / mouth open / width at the "
           f"selected check: {', '.join(f'{v:.3f}' for v in best['dlib_corr_wild'])} (rendered as is: "
           f"{', '.join(f'{v:.3f}' for v in base['rendered'].get('dlib_corr_wild', []))})"]
          if "dlib_corr_wild" in best else []),
        f"- **model selection**: the validation check (every {cfg.val_every} steps) with the {selected_by(best)}: "
        f"step {best['step']}. Selected on the validation split, so its numbers are optimistic.",
        "",
        "## Validation (held-out persons)",
        "Correlation over time, per (clip, source) sequence, of the openings read on the shown frames against dlib's",
        "openings of the driving frames, mean over sequences. **dlib**: dlib on the rendered frame with the patches",
        "pasted back, in the driving frame's face box (as `bench.expression`; independent of the training;",
        (f"{best.get('dlib_frames', 0)} frames scored)." if "dlib_frames" in best else
         "n/a: validation samples built without `--keep-frames`).") + " **regressor**: the opening regressor on the",
        "patches — the judge the opening loss trains against, so the refined rows can overstate (a refiner can",
        "satisfy it without drawing a better eye). MAE in openings' units; L1 in grey levels against the driving",
        "patches.",
        "",
        *head, *rows,
        "",
        f"Contact sheet of validation rows (source | rendered | refined | driving): `{cfg.run_dir}/sheet.png`.",
        "",
    ]))
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, RefinerTrainConfig())
    a = p.parse_args(argv)
    if not 0.0 <= a.degrade <= 1.0:  # NaN fails it too
        p.error("--degrade is a share of the training samples: 0..1")
    if a.init and a.resume:
        p.error("--init starts a run from other weights; --resume continues this run's own state")
    if a.levels not in (2, 3):
        p.error("--levels is the U-Nets' depth: 2 or 3")
    if a.qat not in ("", "all", "mixed"):
        p.error("--qat is 'all', 'mixed' or '' (float32)")
    cfg = RefinerTrainConfig(**vars(a))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(cfg.threads)
    tr, va = load_samples(cfg.train), load_samples(cfg.val)
    overlap = set(tr.meta.get("persons", [])) & set(va.meta.get("persons", []))
    if overlap:
        raise SystemExit(f"training and validation samples share persons: {sorted(overlap)[:5]}")
    meta = {"n_train": len(tr), "n_val": len(va), "n_train_sources": len(tr.source_open),
            "n_val_sources": len(va.source_open),
            "train_data": {k: tr.meta.get(k) for k in ("every", "sources", "weights", "kp_weights", "split")}
            | {"n_clips": len(tr.meta.get("clips", []))},
            "val_data": {k: va.meta.get(k) for k in ("every", "sources", "weights", "kp_weights", "split")}
            | {"n_clips": len(va.meta.get("clips", [])), "n_persons": len(set(va.meta.get("persons", [])))},
            "val_persons": sorted(set(va.meta.get("persons", [])))}
    summary = train(cfg, tr, va, meta)
    command = ".venv/bin/python -m models.expression.train_refiner " + " ".join(
        shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))
    card = write_card(cfg, summary, summary["meta"], command)
    shipped, _ = load_refiner(cfg.out)  # the shipped file loads
    sheet = write_sheet(shipped, va, summary["va_target"], Path(cfg.run_dir) / "sheet.png")
    b = summary["best"]
    print(f"region refiner: best step {b['step']} (select {b['select']:.3f}); rendered baseline "
          f"{json.dumps(summary['baselines']['rendered'])}; wrote {cfg.out}, {card} and {sheet} (source | rendered | "
          "refined | driving)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
