"""Train the opening regressor on dlib's landmarks of the training clips; select by held-out persons.

Usage:
  python -m models.expression.train --data ../shared/data --landmarks cache/landmarks_face256.npz \\
      --minutes 60 --out models/weights/openings.pt          # resumable: --resume continues RUN_DIR/state.pt
  python -m models.expression.train ... --tiny --steps 20    # smoke run

Data: every face clip with cached landmarks (``python -m models.landmarks``), split by person
(``models.data.split_by_group``, the split every model here uses). Patches are cut where the sender
cuts them: around the detector's landmark-anchored keypoints (``--weights``' detector, keypoints
cached per checkpoint as for the forecasters), training patches with their centres jittered (2 draws
per frame, sigma ``jitter`` x the inter-ocular distance), validation patches exactly. Labels are the
frame's own landmark openings (``models.expression.openings``).

Validation, every ``val_every`` steps: per clip, the Pearson correlation over time of each channel
against dlib (then the mean over clips, as ``bench.expression`` scores a rendered call), and the mean
absolute error in label units. Beside it two baselines: the training mean (MAE only; correlation 0)
and what the wire already carries, the anchored keypoint's Jacobian (its vertical scale ``J[1,1]``
for the eye openings and the mouth opening, its horizontal scale for the mouth width), correlated
per clip the same way. The shipped weights are those of the check with the best mean correlation
of the three openings (eyes, mouth); the validation numbers of the shipped model are therefore
optimistic (best of N checks), and the model card says so.

Writes OUT (weights), OUT with .md (model card), RUN_DIR/val.jsonl, RUN_DIR/state.pt.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from models.cli import add_config_arguments
from models.data import center_square, load_clips, read_clip, split_by_group
from models.expression import load_regressor, save_regressor
from models.expression.openings import CHANNELS, EYE_PATCH, MOUTH_PATCH, centres_from_keypoints, cut_patches, openings
from models.expression.regressor import OpeningConfig, OpeningNet

log = logging.getLogger(__name__)

SIZE = 256  # the sender's frame, where landmarks are labelled and patches cut
SELECT = (0, 1, 2)  # channels whose mean correlation selects the shipped weights: both eyes, mouth opening
# in-the-wild sources (interview, news and DFDC camera footage: compressed, soft, small eyes), scored apart
WILD_SETS = ("pcavs_vox2", "megaportrait_faces", "pdfgc_faces", "styletalk_faces", "icpr2020dfdc_faces")


@dataclass
class TrainConfig:
    data: str = "../shared/data"
    landmarks: str = "cache/landmarks_face256.npz"
    weights: str = "models/weights/fomm_face64.pt"  # its detector locates the patches (anchor_kp from fomm_face256)
    anchor_from: str = "models/weights/fomm_face256.pt"  # checkpoint whose meta names the anchored keypoints
    out: str = "models/weights/openings.pt"
    run_dir: str = "runs/openings"
    cache_dir: str = "runs/kp_cache"
    minutes: float = 60.0
    steps: int = 1_000_000
    batch: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    jitter: float = 0.04  # patch centre jitter, x inter-ocular distance
    draws: int = 2  # jittered patches per training frame
    val_every: int = 250
    threads: int = 1
    seed: int = 0
    tiny: bool = False
    resume: bool = False
    max_clips: int = 0  # 0: all (smoke runs use a few)
    degrade: float = 0.0  # share of training patches degraded as in-the-wild video is (JPEG, blur, rescale, noise)
    width: int = 16  # the network's first-layer width (OpeningConfig.width)


# --------------------------------------------------------------------------- data


@dataclass
class Patches:
    eyes: np.ndarray  # (N, 2, 32, 32, 3) uint8
    mouth: np.ndarray  # (N, 32, 48, 3) uint8
    labels: np.ndarray  # (N, 4) float32
    jac: np.ndarray  # (N, 4) float32: the anchored keypoints' Jacobian scales, the wire's baseline
    clip: np.ndarray  # (N,) int: which clip (per-clip correlation)


def _anchor_kp(path: str) -> list[int]:
    meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
    if not meta.get("anchor_kp"):
        raise SystemExit(f"{path} has no anchored keypoints (meta anchor_kp): the patches cannot be located")
    return [int(i) for i in meta["anchor_kp"]]


def _jac_baseline(kp: np.ndarray, anchor_kp: list[int]) -> np.ndarray:
    """(T, 60) -> (T, 4): J[1,1] of both eye keypoints and the mouth's, J[0,0] of the mouth's."""
    jac = kp[:, 20:].reshape(-1, 10, 2, 2)
    el, er, mo = anchor_kp[:3]
    return np.stack([jac[:, el, 1, 1], jac[:, er, 1, 1], jac[:, mo, 1, 1], jac[:, mo, 0, 0]], 1).astype(np.float32)


def build_patches(clips: list, series: dict[str, np.ndarray], lm_cache, root: str, anchor_kp: list[int],
                  jitter: float, draws: int, seed: int) -> Patches:
    """Patches of every frame with a face; ``draws`` jittered ones per frame when ``jitter`` > 0."""
    rng = np.random.default_rng(seed)
    eyes, mouths, labels, jacs, ids = [], [], [], [], []
    for ci, clip in enumerate(clips):
        got = lm_cache.get(clip.path, root)
        kp = series.get(str(clip.path))
        if got is None or kp is None:
            continue
        lm, valid = got
        frames = read_clip(clip.path, "png_stack" if clip.format == "png_stack" else "video")
        n = min(len(frames), len(lm), len(kp))
        centres = centres_from_keypoints(kp[:n], anchor_kp, SIZE)
        lab = openings(lm[:n])
        jb = _jac_baseline(kp[:n], anchor_kp)
        for t in range(n):
            if not valid[t]:
                continue
            frame = center_square(frames[t], SIZE)
            d = float(np.linalg.norm(centres[t, 1] - centres[t, 0]))
            for _ in range(draws if jitter > 0 else 1):
                c = centres[t] + (rng.normal(0, jitter * d, (3, 2)) if jitter > 0 else 0)
                e, m = cut_patches(frame, c)
                eyes.append(e)
                mouths.append(m)
                labels.append(lab[t])
                jacs.append(jb[t])
                ids.append(ci)
    if not eyes:
        raise SystemExit("no patches: are the landmarks cached for these clips (python -m models.landmarks)?")
    return Patches(np.stack(eyes), np.stack(mouths), np.stack(labels), np.stack(jacs), np.array(ids))


def keypoint_series(weights: str, clips: list, root: str, cache_dir: str) -> dict[str, np.ndarray]:
    from models.forecast.dataset import extract_series

    return {str(s.clip.path): s.kp for s in extract_series(weights, clips, root, cache_dir)}


def to_tensors(p: Patches, idx: np.ndarray, rng: np.random.Generator | None = None,
               share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    eyes, mouth = p.eyes[idx], p.mouth[idx]
    if rng is not None and share > 0:
        eyes, mouth = degrade(eyes, rng, share), degrade(mouth, rng, share)
    eyes = torch.from_numpy(eyes).permute(0, 1, 4, 2, 3).float() / 255.0
    mouth = torch.from_numpy(mouth).permute(0, 3, 1, 2).float() / 255.0
    return eyes, mouth


@dataclass(frozen=True)
class Degradation:
    """One webcam-like degradation (``draw_degradation``), applied alike to every patch of a sample."""

    quality: int  # JPEG quality
    scale: float  # rescale to this share of the side and back
    sigma: float  # Gaussian blur (px; <= 0.3: none)
    noise: float  # sensor noise, grey levels (<= 0.5: none)


def draw_degradation(rng: np.random.Generator) -> Degradation:
    """A JPEG round trip at quality 15-70, a rescale to 45-100 % and back, a blur and sensor noise."""
    return Degradation(int(rng.integers(15, 71)), float(rng.uniform(0.45, 1.0)), float(rng.uniform(0, 1.0)),
                       float(rng.uniform(0, 5.0)))


def apply_degradation(x: np.ndarray, d: Degradation, rng: np.random.Generator) -> np.ndarray:
    """One uint8 patch (H, W, 3) degraded by ``d`` (the noise drawn from ``rng``)."""
    h, w = x.shape[:2]
    if d.scale < 0.97:
        x = cv2.resize(cv2.resize(x, (max(4, round(w * d.scale)), max(4, round(h * d.scale))),
                                  interpolation=cv2.INTER_AREA), (w, h), interpolation=cv2.INTER_LINEAR)
    if d.sigma > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), d.sigma)
    x = cv2.imdecode(cv2.imencode(".jpg", x, [cv2.IMWRITE_JPEG_QUALITY, d.quality])[1], cv2.IMREAD_UNCHANGED)
    if d.noise > 0.5:
        x = np.clip(x + rng.normal(0, d.noise, x.shape), 0, 255).astype(np.uint8)
    return x


def degrade(patches: np.ndarray, rng: np.random.Generator, share: float) -> np.ndarray:
    """Degrade ``share`` of the uint8 patches (N, ..., H, W, 3) as a webcam's compressed, soft, noisy
    video is (in-the-wild faces read worst: VoxCeleb2 eyes): ``draw_degradation`` per sample, the
    sample's patches (2 eyes) alike."""
    if share <= 0:
        return patches
    out = patches.copy()
    flat = out.reshape(-1, *patches.shape[-3:])
    per = flat.shape[0] // patches.shape[0]  # patches per sample (2 eyes) degrade alike
    for i in range(patches.shape[0]):
        if rng.random() >= share:
            continue
        d = draw_degradation(rng)
        for j in range(i * per, (i + 1) * per):
            flat[j] = apply_degradation(flat[j], d, rng)
    return out


def augment(eyes: torch.Tensor, mouth: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample brightness / contrast (cameras and lighting differ) and a mirrored mouth (labels unchanged)."""
    b = eyes.shape[0]
    gain = 1 + 0.25 * (torch.rand(b, generator=gen) * 2 - 1)
    bias = 0.08 * (torch.rand(b, generator=gen) * 2 - 1)
    eyes = (eyes * gain.view(b, 1, 1, 1, 1) + bias.view(b, 1, 1, 1, 1)).clamp(0, 1)
    mouth = (mouth * gain.view(b, 1, 1, 1) + bias.view(b, 1, 1, 1)).clamp(0, 1)
    flip = torch.rand(b, generator=gen) < 0.5
    mouth = torch.where(flip.view(b, 1, 1, 1), mouth.flip(-1), mouth)
    return eyes, mouth


# --------------------------------------------------------------------------- evaluation


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (as bench.expression)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if len(a) < 2 or a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def per_clip_corr(pred: np.ndarray, truth: np.ndarray, clip: np.ndarray) -> list[float]:
    """Mean over clips of each channel's correlation over time."""
    out = []
    for c in range(truth.shape[1]):
        out.append(float(np.mean([pearson(pred[clip == k, c], truth[clip == k, c]) for k in np.unique(clip)])))
    return out


def predict(net: OpeningNet, p: Patches, chunk: int = 512) -> np.ndarray:
    net.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(p.labels), chunk):
            idx = np.arange(i, min(i + chunk, len(p.labels)))
            outs.append(net(*to_tensors(p, idx)).numpy())
    net.train()
    return np.concatenate(outs)


def evaluate(net: OpeningNet, val: Patches, wild: np.ndarray | None = None) -> dict:
    """``wild``: the clip ids of in-the-wild footage, also scored on their own (``wild_corr``)."""
    pred = predict(net, val)
    corr = per_clip_corr(pred, val.labels, val.clip)
    mae = np.abs(pred - val.labels).mean(0).tolist()
    out = {"corr": corr, "mae": mae, "select": float(np.mean([corr[i] for i in SELECT]))}
    if wild is not None and len(wild):
        keep = np.isin(val.clip, wild)
        out["wild_corr"] = per_clip_corr(pred[keep], val.labels[keep], val.clip[keep])
    return out


def baselines(train: Patches, val: Patches, wild: np.ndarray | None = None) -> dict:
    mean = train.labels.mean(0)
    out = {"mean_mae": np.abs(val.labels - mean).mean(0).tolist(),
           "jacobian_corr": per_clip_corr(val.jac, val.labels, val.clip)}
    if wild is not None and len(wild):
        keep = np.isin(val.clip, wild)
        out["wild_jacobian_corr"] = per_clip_corr(val.jac[keep], val.labels[keep], val.clip[keep])
    return out


# --------------------------------------------------------------------------- training


def train(cfg: TrainConfig, tr: Patches, va: Patches, meta: dict, wild: np.ndarray | None = None) -> dict:
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    net = OpeningNet(OpeningConfig(width=8, stages=2) if cfg.tiny else OpeningConfig(width=cfg.width))
    drng = np.random.default_rng(cfg.seed + 1)
    net.set_label_stats(torch.from_numpy(tr.labels.mean(0)), torch.from_numpy(tr.labels.std(0) + 1e-6))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    state_path = run / "state.pt"
    step, elapsed, best = 0, 0.0, {"select": -2.0}
    if cfg.resume and state_path.exists():
        st = torch.load(state_path, map_location="cpu", weights_only=False)
        net.load_state_dict(st["net"])
        opt.load_state_dict(st["opt"])
        step, elapsed, best = st["step"], st["elapsed"], st["best"]
        log.info("resumed at step %d (%.1f min, best %.3f)", step, elapsed / 60, best["select"])
    base = baselines(tr, va, wild)
    log.info("baselines: %s", json.dumps(base))
    loss_fn = nn.SmoothL1Loss(beta=0.5)
    t0 = time.monotonic() - elapsed
    mean, std = net.mean, net.std
    while step < cfg.steps and time.monotonic() - t0 < cfg.minutes * 60:
        if step % cfg.val_every == 0:
            m = {"step": step, "minutes": round((time.monotonic() - t0) / 60, 2), **evaluate(net, va, wild)}
            with (run / "val.jsonl").open("a") as f:
                f.write(json.dumps(m) + "\n")
            if m["select"] > best["select"]:
                best = m
                save_regressor(cfg.out, net, {**meta, "selected": m, "baselines": base})
            log.info("step %d: val corr %s wild %s mae %s (best %.3f at %d)", step, np.round(m["corr"], 3),
                     np.round(m.get("wild_corr", []), 3), np.round(m["mae"], 4), best["select"], best["step"])
            torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
                        "elapsed": time.monotonic() - t0, "best": best}, state_path)
        idx = torch.randint(0, len(tr.labels), (cfg.batch,), generator=gen).numpy()
        eyes, mouth = augment(*to_tensors(tr, idx, drng, cfg.degrade), gen)
        target = (torch.from_numpy(tr.labels[idx]) - mean) / std
        loss = loss_fn(net.normalised(eyes, mouth), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    final = {"step": step, "minutes": round((time.monotonic() - t0) / 60, 2), **evaluate(net, va, wild)}
    torch.save({"net": net.state_dict(), "opt": opt.state_dict(), "step": step,
                "elapsed": time.monotonic() - t0, "best": best}, state_path)
    if final["select"] > best["select"]:
        best = final
        save_regressor(cfg.out, net, {**meta, "selected": final, "baselines": base})
    return {"best": best, "final": final, "baselines": base}


def summary_of_run(cfg: TrainConfig) -> dict:
    """``train``'s summary for a run that was stopped: the best check (the shipped weights' meta), the
    last check in RUN_DIR/val.jsonl as the final one, the baselines from the shipped weights' meta."""
    meta = load_regressor(cfg.out)[1]
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "val.jsonl").read_text().splitlines() if x.strip()]
    return {"best": meta["selected"], "final": rows[-1], "baselines": meta["baselines"]}


def write_card(cfg: TrainConfig, summary: dict, meta: dict, command: str) -> Path:
    best, final, base = summary["best"], summary["final"], summary["baselines"]
    def row(name: str, values: list[float], fmt: str = ".3f") -> str:
        return f"| {name} | " + " | ".join(f"{x:{fmt}}" for x in values) + " |"

    rows = ["| | " + " | ".join(CHANNELS) + " |", "|---|" + "---|" * len(CHANNELS),
            row(f"**regressor corr** (shipped, step {best['step']})", best["corr"]),
            row(f"regressor corr (final step {final['step']})", final["corr"]),
            row("wire's Jacobian scale corr (baseline)", base["jacobian_corr"]),
            row("regressor MAE (shipped)", best["mae"], ".4f"),
            row("training-mean MAE (baseline)", base["mean_mae"], ".4f")]
    card = Path(cfg.out).with_suffix(".md")
    card.write_text("\n".join([
        "# openings — eye and mouth openings from pixels",
        "",
        "Eye patches (32x32, both eyes through one branch) and a mouth patch (48x32) cut around the",
        "detector's landmark-anchored keypoints in the 256x256 frame -> (eye_left, eye_right, mouth_open,",
        "mouth_width), each over the inter-ocular distance, as dlib's 68 landmarks define them.",
        "Interface: `models.expression.load_regressor()`, `models.expression.openings.cut_patches`.",
        "",
        "## Reproduce",
        f"```\n{command}\n```",
        "",
        "## Data",
        f"- clips `{cfg.data}` (faces), split by person: {meta['n_train_clips']} training clips "
        f"({meta['n_train']} patches incl. {cfg.draws} jittered draws per frame), {meta['n_val_clips']} "
        f"validation clips ({meta['n_val']} frames) of persons never seen in training.",
        f"- labels: dlib 68-point landmarks (`{cfg.landmarks}`); patches located by the keypoints of "
        f"`{cfg.weights}` (anchored keypoints {meta['anchor_kp']}), jitter {cfg.jitter} x inter-ocular.",
        "",
        "## Training",
        f"- {final['step']} steps, {final['minutes']} min on CPU ({cfg.threads} thread), batch {cfg.batch}, "
        f"AdamW lr {cfg.lr}, smooth-L1 on standardised labels; brightness/contrast and mirrored-mouth augmentation.",
        f"- **model selection**: the validation check (every {cfg.val_every} steps) with the best mean "
        "per-clip correlation of eye_left, eye_right and mouth_open: step "
        f"{best['step']}. Selected on the validation split, so its numbers are optimistic.",
        "",
        "## Validation (held-out persons, per-clip correlation over time, mean over clips)",
        *rows,
        "",
    ]))
    return card


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, TrainConfig())
    p.add_argument("--card-only", action="store_true",
                   help="write OUT's model card from RUN_DIR's state and val.jsonl (a run stopped early) and exit")
    a = p.parse_args(argv)
    card_only = a.card_only
    del a.card_only
    cfg = TrainConfig(**vars(a))
    if not 0.0 <= cfg.degrade <= 1.0:  # NaN fails it too
        p.error("--degrade is a share of the training patches: 0..1")
    if cfg.width < 1:
        p.error("--width must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if card_only:
        command = ".venv/bin/python -m models.expression.train " + " ".join(
            shlex.quote(x) for x in (argv or sys.argv[1:]) if x != "--card-only")
        print(write_card(cfg, summary_of_run(cfg), load_regressor(cfg.out)[1], command))
        return 0
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(cfg.threads)
    from models.landmarks import LandmarkCache

    t0 = time.monotonic()
    clips = load_clips(cfg.data, ["face"])
    train_clips, val_clips = split_by_group(clips, 0.15)
    if cfg.max_clips:
        train_clips, val_clips = train_clips[:cfg.max_clips], val_clips[:max(1, cfg.max_clips // 2)]
    lm = LandmarkCache(cfg.landmarks)
    anchor_kp = _anchor_kp(cfg.anchor_from)
    series = keypoint_series(cfg.weights, train_clips + val_clips, cfg.data, cfg.cache_dir)
    tr = build_patches(train_clips, series, lm, cfg.data, anchor_kp, cfg.jitter, cfg.draws, cfg.seed)
    va = build_patches(val_clips, series, lm, cfg.data, anchor_kp, 0.0, 1, cfg.seed)
    meta = {"anchor_kp": anchor_kp, "detector": cfg.weights, "n_train": len(tr.labels), "n_val": len(va.labels),
            "n_train_clips": len(np.unique(tr.clip)), "n_val_clips": len(np.unique(va.clip)),
            "val_persons": sorted({c.person for c in val_clips}), "channels": list(CHANNELS),
            "patch": {"eye": EYE_PATCH, "mouth": list(MOUTH_PATCH)}}
    log.info("patches: %d train / %d val in %.0f s", len(tr.labels), len(va.labels), time.monotonic() - t0)
    wild = np.array([i for i, c in enumerate(val_clips) if Path(c.path).parent.name in WILD_SETS])
    meta["wild_val_clips"] = len(wild)
    summary = train(cfg, tr, va, meta, wild)
    command = ".venv/bin/python -m models.expression.train " + " ".join(shlex.quote(x) for x in (argv or sys.argv[1:]))
    card = write_card(cfg, summary, meta, command)
    net, _ = load_regressor(cfg.out)
    b = summary["best"]
    print(f"openings: best step {b['step']}: corr {np.round(b['corr'], 3).tolist()} (wire Jacobian "
          f"{np.round(summary['baselines']['jacobian_corr'], 3).tolist()}); wrote {cfg.out} and {card}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
