"""Train the motion model (keypoint detector + dense motion + generator) on real clips.

Usage:
  python -m models.fomm.train --data ../shared/data --kinds face --size 64 --out runs/face64 --minutes 100
  python -m models.fomm.train ... --resume                  # continue from OUT/last.pt
  python -m models.fomm.train --size 128 --init runs/face64/best.pt --freeze kp_detector ...  # 128 from 64
  python -m models.fomm.train --size 256 --init models/weights/fomm_face64.pt --freeze kp_detector ...  # Refiner
  python -m models.fomm.train --data ../shared/data --steps 2 --tiny --out /tmp/x   # smoke run
  python -m models.landmarks --out cache/landmarks_face256.npz     # once: dlib landmarks of every face clip
  python -m models.fomm.train --size 256 --init models/weights/fomm_face256.pt \
      --landmarks cache/landmarks_face256.npz ...   # keypoints anchored to eyes/mouth (models.fomm.anchors)

Self-supervised reconstruction, as in FOMM: two frames of one clip, the source is
warped to look like the driving frame using keypoints detected on both. Validation
uses clips from source videos (manifest ``group``) never seen in training, and always
reports the static-source baseline (the source frame shown unchanged) beside the model.
Checkpoints keep weights in float16 plus the step count; Adam's moments are not
stored (they would triple the file), so a resumed run re-warms them in a few steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.checkpoint import load_state, read_checkpoint
from models.data import PairSampler, load_clips, load_frames, split_by_group
from models.fomm.anchors import LandmarkSupervision, assign_anchors, weighted_l1
from models.fomm.blocks import resize
from models.fomm.config import FommConfig
from models.fomm.io import KIND, save_motion_model
from models.fomm.losses import equivariance_losses, keypoint_spread, pyramid_l1, separation_loss, ssim
from models.fomm.model import MotionModel
from models.landmarks import ANCHOR_GROUPS, AnchorTemplates, LandmarkCache

log = logging.getLogger(__name__)


def preset(size: int, tiny: bool = False) -> FommConfig:
    """The shipped architecture for each output size (motion always at 64x64)."""
    if tiny:
        return FommConfig.tiny(size)
    # Every tier is one motion model (detector, dense motion and generator at 64x64); 128 and
    # 256 add the full-resolution Refiner (models.fomm.derive makes 64 and 128 from a 256 run).
    return FommConfig(size=size, motion_size=64, kp_max_features=128, dm_block_expansion=16,
                      dm_max_features=128, gen_block_expansion=32, gen_max_features=128,
                      gen_size=0 if size == 64 else 64)


@dataclass
class TrainConfig:
    data: str = "../shared/data"
    kinds: list[str] = field(default_factory=lambda: ["face"])
    size: int = 64
    out: str = "runs/face64"
    batch: int = 8
    lr: float = 2e-4
    steps: int = 1_000_000  # upper bound; --minutes usually ends the run first
    minutes: float = 60.0
    val_every: int = 250
    val_fraction: float = 0.15
    threads: int = 2
    seed: int = 0
    resume: bool = False
    init: str | None = None
    tiny: bool = False
    freeze: list[str] = field(default_factory=list)  # e.g. kp_detector: keep keypoints identical across sizes
    w_rec: float = 10.0
    w_ssim: float = 1.0
    w_equi_value: float = 10.0
    w_equi_jac: float = 1.0
    w_separation: float = 1.0
    # landmark supervision (models.fomm.anchors); off without --landmarks
    landmarks: str = ""
    anchor_kp: list[str] = field(default_factory=list)  # keypoint per anchor group; default: nearest (Hungarian)
    w_anchor: float = 10.0
    w_anchor_jac: float = 2.0
    w_region: float = 10.0


def validation_set(val_clips: list[np.ndarray], per_clip: int = 8) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Fixed (source = first frame, driving = evenly spaced later frames) pairs per clip."""
    src, drv, owner = [], [], []
    for ci, clip in enumerate(val_clips):
        idx = np.linspace(1, len(clip) - 1, num=min(per_clip, len(clip) - 1)).round().astype(int)
        for j in idx:
            src.append(clip[0])
            drv.append(clip[j])
            owner.append(ci)
    t = lambda xs: torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255.0  # noqa: E731
    return t(src), t(drv), owner


@torch.no_grad()
def validate(model: MotionModel, src: torch.Tensor, drv: torch.Tensor, owner: list[int],
             grid_path: Path | None = None) -> dict[str, float]:
    model.eval()
    preds, spreads = [], []
    for i in range(0, len(src), 32):
        out = model(src[i:i + 32], drv[i:i + 32])
        preds.append(out["prediction"].clamp(0, 1))
        spreads.append(keypoint_spread(out["kp_driving"]["value"]))
    pred = torch.cat(preds)
    l1_model = (pred - drv).abs().mean(dim=(1, 2, 3))
    l1_static = (src - drv).abs().mean(dim=(1, 2, 3))
    own = torch.tensor(owner)
    wins = sum(int(l1_model[own == c].mean() < l1_static[own == c].mean()) for c in own.unique().tolist())
    metrics = {
        "l1": l1_model.mean().item(), "l1_static": l1_static.mean().item(),
        "ssim": ssim(pred, drv).item(), "ssim_static": ssim(src, drv).item(),
        "kp_spread": float(torch.stack(spreads).mean()), "clips_won": wins, "clips": len(own.unique()),
    }
    if grid_path is not None:
        from models.fomm.visual import save_grid
        pick = torch.linspace(0, len(src) - 1, 8).long()
        kp = model.kp_detector(drv[pick])["value"]
        save_grid(grid_path, src[pick], drv[pick], pred[pick], kp)
    # Back to training mode only now: a detector call in training mode would update a
    # frozen detector's BatchNorm statistics (the shipped 128 model's detector drifted so).
    model.train()
    return metrics


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in TrainConfig.__dataclass_fields__.values():
        default = f.default if f.default is not dataclasses_missing else f.default_factory()  # type: ignore[misc]
        if isinstance(default, bool):
            p.add_argument(f"--{f.name.replace('_', '-')}", action="store_true")
        elif isinstance(default, list):
            p.add_argument(f"--{f.name.replace('_', '-')}", nargs="+", default=default)
        else:
            p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default) if default is not None else str,
                           default=default)
    cfg = TrainConfig(**vars(p.parse_args(argv)))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    # --- data, split by source video ---
    clips = load_clips(cfg.data, cfg.kinds)
    train_info, val_info = split_by_group(clips, cfg.val_fraction)
    (out / "split.json").write_text(json.dumps({
        "train": sorted({c.group for c in train_info}), "val": sorted({c.group for c in val_info})}, indent=1))
    t0 = time.time()
    loaded = [(c, f) for c in train_info for f in load_frames([c], cfg.size)]
    train_info = [c for c, _ in loaded]
    train_clips = [f for _, f in loaded]
    val_clips = load_frames(val_info, cfg.size)
    log.info("loaded %d train / %d val clips (%d / %d frames) in %.0fs", len(train_clips), len(val_clips),
             sum(map(len, train_clips)), sum(map(len, val_clips)), time.time() - t0)
    sampler = PairSampler(train_clips, seed=cfg.seed)
    vsrc, vdrv, vowner = validation_set(val_clips)

    # --- model, optionally resumed or initialised from another size ---
    model = MotionModel(preset(cfg.size, cfg.tiny))
    step, elapsed, best = 0, 0.0, math.inf
    last = out / "last.pt"
    if cfg.resume and last.exists():
        blob = read_checkpoint(last, KIND)
        load_state(model, blob["state_dict"], last)
        step, elapsed = blob["meta"]["step"], blob["meta"]["train_seconds"]
        best = blob["meta"].get("best_l1", math.inf)
        log.info("resumed from %s at step %d (%.0f min trained)", last, step, elapsed / 60)
    elif cfg.init:
        blob = read_checkpoint(cfg.init, KIND)
        own = model.state_dict()
        same = {k: v for k, v in blob["state_dict"].items() if k in own and v.shape == own[k].shape}
        model.load_state_dict({**own, **{k: v.float() for k, v in same.items()}})
        log.info("initialised %d/%d tensors from %s", len(same), len(own), cfg.init)
    for name in cfg.freeze:
        # A frozen detector gives the same keypoints at every output size, so senders,
        # forecasters and the wire format are shared by all shipped models.
        module = getattr(model, name)
        module.requires_grad_(False)
        log.info("frozen: %s", name)
    supervision = None
    if cfg.landmarks:
        supervision = landmark_supervision(cfg, model, train_info, train_clips,
                                           blob["meta"] if cfg.resume and last.exists() else None)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, betas=(0.5, 0.999))

    stop = {"now": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))

    def checkpoint(metrics: dict[str, float] | None) -> None:
        nonlocal best
        meta = {"step": step, "train_seconds": elapsed, "best_l1": best, "train_config": asdict(cfg),
                "metrics": metrics, "train_groups": len({c.group for c in train_info}),
                "val_groups": len({c.group for c in val_info}),
                "val_persons": sorted({c.person for c in val_info})}
        if supervision is not None:
            meta["anchor_kp"] = supervision.anchor_kp
            meta["anchor_templates"] = supervision.templates.to_list()
        if metrics is not None and metrics["l1"] < best:
            best = metrics["l1"]
            meta["best_l1"] = best
            save_motion_model(out / "best.pt", model, meta)
        save_motion_model(last, model, meta)

    model.train()
    deadline = time.time() + cfg.minutes * 60
    bar = tqdm(total=cfg.steps, initial=step, dynamic_ncols=True, mininterval=5)
    while step < cfg.steps and time.time() < deadline and not stop["now"]:
        ts = time.time()
        s, d = sampler.sample(cfg.batch)
        src, drv = torch.from_numpy(s), torch.from_numpy(d)
        for name in cfg.freeze:
            getattr(model, name).eval()  # frozen BatchNorm statistics too
        res = model(src, drv)
        rec = pyramid_l1(res["prediction"], drv)
        if "low" in res:  # keep the low-resolution generator a good renderer on its own
            rec = rec + 0.5 * pyramid_l1(res["low"], resize(drv, res["low"].shape[-1]), scales=(1, 0.5))
        ssim_term = 1.0 - ssim(res["prediction"], drv)
        anc_v = anc_j = region = rec.new_zeros(())
        if supervision is not None:
            anc = supervision.losses(res["kp_source"], res["kp_driving"], sampler.last_draw,
                                     res["prediction"].shape[-1])
            anc_v, anc_j = anc.value, anc.jacobian
            region = weighted_l1(res["prediction"], drv, anc.region)
            if "low" in res:
                region = region + 0.5 * weighted_l1(res["low"], resize(drv, res["low"].shape[-1]), anc.region)
        if "kp_detector" in cfg.freeze:  # keypoint losses have nothing left to train
            eq_v = eq_j = sep = rec.new_zeros(())
        else:
            eq_v, eq_j = equivariance_losses(model.kp_detector, drv, res["kp_driving"])
            sep = separation_loss(res["kp_driving"]["value"])
        loss = (cfg.w_rec * rec + cfg.w_ssim * ssim_term + cfg.w_equi_value * eq_v
                + cfg.w_equi_jac * eq_j + cfg.w_separation * sep
                + cfg.w_anchor * anc_v + cfg.w_anchor_jac * anc_j + cfg.w_region * region)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        step += 1
        elapsed += time.time() - ts
        bar.update(1)
        bar.set_postfix(rec=f"{rec.item():.4f}", ssim=f"{1 - ssim_term.item():.3f}", eq=f"{eq_v.item():.4f}",
                        sep=f"{sep.item():.3f}", anc=f"{anc_v.item():.3f}/{anc_j.item():.3f}",
                        reg=f"{region.item():.4f}", refresh=False)
        if step % cfg.val_every == 0:
            m = validate(model, vsrc, vdrv, vowner, out / "val_grid.png")
            m["step"] = step
            m["minutes"] = elapsed / 60
            with (out / "val.jsonl").open("a") as f:
                f.write(json.dumps(m) + "\n")
            tqdm.write(f"step {step} val l1 {m['l1']:.4f} (static {m['l1_static']:.4f}) ssim {m['ssim']:.3f} "
                       f"(static {m['ssim_static']:.3f}) spread {m['kp_spread']:.3f} won {m['clips_won']}/{m['clips']}")
            checkpoint(m)
    bar.close()
    m = validate(model, vsrc, vdrv, vowner, out / "val_grid.png")
    m["step"], m["minutes"] = step, elapsed / 60
    checkpoint(m)
    print(json.dumps(m))


def landmark_supervision(cfg: TrainConfig, model: MotionModel, infos: list, clips: list[np.ndarray],
                         resumed_meta: dict | None) -> LandmarkSupervision:
    """Landmarks of the training clips from the cache, and the keypoint tied to each group
    (kept from the run being resumed, else given, else the nearest by Hungarian assignment)."""
    cache = LandmarkCache(cfg.landmarks)
    lms, valids = [], []
    for info, frames in zip(infos, clips, strict=True):
        got = cache.get(info.path, cfg.data)
        if got is None or len(got[0]) != len(frames):
            lms.append(None)
            valids.append(None)
        else:
            lms.append(got[0])
            valids.append(got[1])
    templates = None
    if resumed_meta and resumed_meta.get("anchor_kp"):
        anchor_kp = resumed_meta["anchor_kp"]
        templates = AnchorTemplates.from_list(resumed_meta["anchor_templates"])
    elif cfg.anchor_kp:
        anchor_kp = [int(k) for k in cfg.anchor_kp]
    else:
        anchor_kp = list(range(len(ANCHOR_GROUPS)))  # placeholder until assigned below
    sup = LandmarkSupervision(lms, valids, anchor_kp, templates)
    if not (resumed_meta and resumed_meta.get("anchor_kp")) and not cfg.anchor_kp:
        rng = np.random.default_rng(cfg.seed)
        pairs = [(ci, fi) for ci, v in enumerate(valids) if v is not None for fi in np.flatnonzero(v)]
        pick = [pairs[i] for i in rng.choice(len(pairs), size=min(256, len(pairs)), replace=False)]
        frames = torch.from_numpy(np.stack([clips[ci][fi] for ci, fi in pick])).permute(0, 3, 1, 2).float() / 255
        model.kp_detector.eval()
        with torch.no_grad():
            kp = torch.cat([model.kp_detector(frames[i:i + 32])["value"] for i in range(0, len(frames), 32)])
        model.kp_detector.train()
        lm = torch.stack([sup.lm[ci][fi] for ci, fi in pick])
        sup.anchor_kp = assign_anchors(kp, lm, sup.templates)
    log.info("landmark supervision: %.1f %% of training frames have landmarks; anchors %s",
             100 * sup.coverage(), dict(zip(ANCHOR_GROUPS, sup.anchor_kp, strict=True)))
    return sup


from dataclasses import MISSING as dataclasses_missing  # noqa: E402

if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
